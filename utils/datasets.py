"""The corpora this repository knows: where getdata.sh puts each benchmark, how each vocabulary is built, how it
is scored and which adaptive-softmax clusters the original gave it. Plain data, imported by the data code and the
run layer alike."""
import os

# dataset -> (directory getdata.sh creates under the data root, or None; Vocab options)
DATASETS = {
    'enwik8': ('enwik8', {}),
    'text8': ('text8', {}),
    'wt103': ('wikitext-103', dict(special=['<eos>'], lower_case=False)),
    'wt2': ('wikitext-2', dict(special=['<eos>'], lower_case=False)),
    'ptb': ('penn', dict(special=['<eos>'], lower_case=True)),
    'lm1b': ('one-billion-words', dict(special=[], lower_case=False,
                                       vocab_file='1b_word_vocab.txt')),
    # Any plain UTF-8 text: every character a token, or words split on whitespace with '<eos>' at line ends.
    # The vocabulary is the training split's; what only valid/test hold becomes '<unk>'.
    'chars': (None, dict(special=['<unk>'], lower_case=False)),
    'words': (None, dict(special=['<eos>', '<unk>'], lower_case=False)),
}
ORDERED = ('enwik8', 'text8', 'wt103', 'wt2', 'ptb', 'chars', 'words')
CHAR_LEVEL = ('enwik8', 'text8', 'chars')   # scored in bits per character, not perplexity
PLAIN_TEXT = ('chars', 'words')   # --data: one text file, or a directory of the three splits' files
# A single text file is cut into contiguous train/valid/test blocks of these percentages of its tokens.
TEXT_SPLIT = (90, 5, 5)
# The original's adaptive-softmax clusters (--adaptive) and whether the tail clusters tie their projections.
ADAPTIVE_CUTOFFS = {'wt103': ([20000, 40000, 200000], True), 'lm1b': ([60000, 100000, 640000], False)}
SPLITS = ('train', 'valid', 'test')
LM1B_TRAIN = os.path.join('1-billion-word-language-modeling-benchmark-r13output',
                          'training-monolingual.tokenized.shuffled', 'news.en-*')
