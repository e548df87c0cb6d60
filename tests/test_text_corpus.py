"""--dataset chars and words: any plain text file (split 90/5/5) or directory of three splits, with the corpus
code's vocabulary, cache, batches and resume, and train.py, eval.py, generate.py end to end on it."""
import json
import math
import os
import random

import pytest
import torch

import data_utils
import eval as evaluation
import generate
import train
from conftest import TINY, WORDS
from data_utils import DataError, get_lm_corpus
from moe_report import BYTE_CLASSES, token_classes
from run.generation import TextCodec
from run.model_file import load_model
from tests.sample_corpora import listing, shared
from utils.vocabulary import Vocab

# Tokens that first appear in the last 5% of TAIL_TEXT: outside a vocabulary counted from the training split.
LATE_CHAR, LATE_WORD = 'Ω', 'zzzlateword'


def sample_text(n_chars=24000, seed=0):
    """Sentences of conftest's words, some of them with a non-ASCII character, one a line; LATE_CHAR and
    LATE_WORD only in the last 2% of the text."""
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < n_chars:
        words = [rng.choice(WORDS + ['café', 'straße']) for _ in range(rng.randint(3, 11))]
        lines.append(' '.join(words).capitalize() + rng.choice('.,;') + '\n')
    tail = max(1, len(lines) // 50)
    lines[-tail] = f'{LATE_WORD} {LATE_CHAR} ' + lines[-tail]
    return ''.join(lines)


def cuts(n):
    """The split points the documentation gives: 90% and 95% of the tokens, rounded down."""
    return n * 90 // 100, n * 95 // 100


def word_tokens(text):
    return [tok for line in text.splitlines() for tok in line.split() + ['<eos>']]


def known(tokens, training):
    """tokens, those not among the training tokens as <unk>."""
    training = set(training)
    return [t if t in training else '<unk>' for t in tokens]


def decoded(corpus, split):
    return [corpus.vocab.idx2sym[i] for i in getattr(corpus, split).tolist()]


@pytest.fixture(scope='module')
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('text') / 'book.txt'
    path.write_text(sample_text(), encoding='utf-8')
    return path


# ----------------------------------------------------------------------------- the corpus


def test_chars_split_covers_the_file_once_in_order(tmp_path):
    text = sample_text(6000)
    (tmp_path / 'book.txt').write_text(text, encoding='utf-8')
    corpus = get_lm_corpus(str(tmp_path / 'book.txt'), 'chars')
    a, b = cuts(len(text))
    train_chars, seen = set(text[:a]), known(text, text[:a])
    assert [decoded(corpus, s) for s in ('train', 'valid', 'test')] == [seen[:a], seen[a:b], seen[b:]]
    # the vocabulary is the training text's characters, most frequent first, after <unk>
    assert corpus.vocab.idx2sym[0] == '<unk>' and set(corpus.vocab.idx2sym[1:]) == train_chars
    counts = [text[:a].count(c) for c in corpus.vocab.idx2sym[1:]]
    assert counts == sorted(counts, reverse=True)
    # a character only in the held-out text is <unk> there
    assert LATE_CHAR not in train_chars and LATE_CHAR in text[b:]
    assert corpus.test.tolist().count(0) == seen[b:].count('<unk>') > 0
    # the same file gives the same ids, built again from the text
    again = data_utils.Corpus.from_files(str(tmp_path / 'book.txt'), 'chars')
    assert all(torch.equal(getattr(corpus, s), getattr(again, s)) for s in ('train', 'valid', 'test'))


def test_words_split_the_token_stream_and_count_the_training_words(tmp_path):
    text = sample_text(6000)
    (tmp_path / 'book.txt').write_text(text, encoding='utf-8')
    corpus = get_lm_corpus(str(tmp_path / 'book.txt'), 'words')
    tokens = word_tokens(text)
    a, b = cuts(len(tokens))
    seen = known(tokens, tokens[:a])
    assert [decoded(corpus, s) for s in ('train', 'valid', 'test')] == [tokens[:a], seen[a:b], seen[b:]]
    assert LATE_WORD in tokens[b:] and LATE_WORD not in corpus.vocab.sym2idx
    assert corpus.vocab.idx2sym[:2] == ['<eos>', '<unk>']
    assert set(corpus.vocab.idx2sym[2:]) == set(tokens[:a]) - {'<eos>'}
    assert {'The', 'the'} <= set(corpus.vocab.sym2idx)  # case is kept


def test_exact_characters_line_ends_and_no_final_newline(tmp_path):
    path = tmp_path / 'raw.txt'
    path.write_bytes('  indented line\r\nwindows\rold mac\n\nno newline at the end é'.encode() * 40)
    corpus = get_lm_corpus(str(path), 'chars')
    text = ''.join(decoded(corpus, 'train') + decoded(corpus, 'valid') + decoded(corpus, 'test'))
    assert text == path.read_bytes().decode().replace('\r\n', '\n').replace('\r', '\n')


def test_directory_of_splits_and_ptb_style_names(tmp_path):
    text = sample_text(9000)
    parts = dict(zip(('train', 'valid', 'test'), (text[:7000], text[7000:8000], text[8000:])))
    plain, ptb = tmp_path / 'plain', tmp_path / 'ptb'
    for directory, name in ((plain, '{}.txt'), (ptb, 'ptb.{}.txt')):
        directory.mkdir()
        for split, part in parts.items():
            (directory / name.format(split)).write_text(part, encoding='utf-8')
    for directory in (plain, ptb):
        corpus = get_lm_corpus(str(directory), 'chars')
        assert {s: decoded(corpus, s) for s in parts} == {s: known(part, parts['train']) for s, part in parts.items()}
        assert set(corpus.vocab.idx2sym) == set(parts['train']) | {'<unk>'}
    words = get_lm_corpus(str(ptb), 'words')
    assert decoded(words, 'valid') == known(word_tokens(parts['valid']), word_tokens(parts['train']))


def test_a_benchmark_directory_laid_out_otherwise_names_the_files_it_wants(tmp_path):
    for split in ('train', 'valid', 'test'):
        (tmp_path / f'ptb.{split}.txt').write_text('a b c\n' * 50)
    before = listing(tmp_path)
    with pytest.raises(DataError) as err:
        get_lm_corpus(str(tmp_path), 'ptb')
    message = str(err.value)
    assert '\n' not in message
    assert message.startswith(f'{tmp_path / "train.txt"} is missing: --dataset ptb reads train.txt, valid.txt and '
                              f'test.txt there')
    assert 'this directory has ptb.train.txt' in message and message.endswith('--dataset words')
    with pytest.raises(DataError, match=r'is a file; --dataset enwik8 reads a directory.*--dataset chars$'):
        get_lm_corpus(str(tmp_path / 'ptb.train.txt'), 'enwik8')
    assert listing(tmp_path) == before
    assert get_lm_corpus(str(tmp_path), 'words').vocab.idx2sym[:2] == ['<eos>', '<unk>']  # the way it points to


@pytest.mark.parametrize('files,message', [
    ({}, r"nowhere does not exist: --dataset chars reads one text file \(split 90/5/5"),
    ({'train.txt': 'ab\n', 'valid.txt': 'ab\n'}, r'has no test.txt and no \*.test.\* file for the test split'),
    ({'train.txt': 'ab\n', 'valid.txt': 'ab\n', 'a.test.txt': 'ab\n', 'b.test.txt': 'ab\n'},
     r'has several \*.test.\* files \(a.test.txt, b.test.txt\) for the test split'),
    ({'book.txt': ''}, r'book.txt is empty'),
    ({'book.txt': 'tiny\n'}, r'the valid split of .*book.txt holds 0 tokens: it needs at least 2 \(give more text\)'),
    ({'book.txt': b'fine\n\xff\xfe\n'}, r'book.txt line 2: not UTF-8'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    data = tmp_path / 'book.txt' if 'book.txt' in files else tmp_path if files else tmp_path / 'nowhere'
    before = listing(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        get_lm_corpus(str(data), 'chars')
    assert '\n' not in str(err.value) and listing(tmp_path) == before


def test_cache_is_reused_kept_per_file_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    book, other = tmp_path / 'book.txt', tmp_path / 'other.txt'
    book.write_text(sample_text(3000))
    other.write_text(sample_text(3000, seed=1))
    first = get_lm_corpus(str(book), 'chars')
    get_lm_corpus(str(other), 'chars')
    caches = sorted(p.name for p in tmp_path.glob('cache-*'))
    assert [name.rsplit('-', 1)[0] for name in caches] == ['cache-chars-book.txt', 'cache-chars-other.txt']

    def no_text(*args, **kwargs):
        raise AssertionError('the corpus was read from the text, not from its cache')
    with monkeypatch.context() as m:
        m.setattr(data_utils.Corpus, 'from_files', no_text)
        said = []
        cached = get_lm_corpus(str(book), 'chars', log=said.append)
    assert said == [f'Loading cached dataset from {tmp_path / caches[0]}']
    assert cached.vocab.idx2sym == first.vocab.idx2sym and torch.equal(cached.test, first.test)

    book.write_text('¤ a new character\n' + sample_text(3000, seed=2))
    changed = get_lm_corpus(str(book), 'chars')
    assert '¤' in changed.vocab.sym2idx and ''.join(decoded(changed, 'train')).startswith('¤ a new')
    assert not (tmp_path / caches[0]).exists() and (tmp_path / caches[1]).exists()  # the stale one only


def test_a_models_own_vocabulary_gives_its_ids(text_file):
    symbols = ['<unk>', '\n'] + sorted(set(text_file.read_text()) - {'\n', 'e'})  # no 'e': it becomes <unk>
    corpus = get_lm_corpus(str(text_file), 'chars', symbols=symbols)
    assert corpus.vocab.idx2sym == symbols
    text = text_file.read_text()
    a, _ = cuts(len(text))
    assert decoded(corpus, 'train') == [c if c != 'e' else '<unk>' for c in text[:a]]


@pytest.mark.parametrize('dataset', ['chars', 'words'])
def test_batches_resume_mid_epoch(text_file, dataset):
    corpus = get_lm_corpus(str(text_file), dataset)
    it = corpus.get_iterator('train', 4, 9, varlen=True, seed=3)
    batches = iter(it)
    for _ in range(5):
        next(batches)
    state = json.loads(json.dumps(it.state_dict()))
    rest = [(d.tolist(), t.tolist()) for d, t, _ in batches]
    resumed = corpus.get_iterator('train', 4, 9, varlen=True, seed=99)
    resumed.load_state_dict(state)
    assert [(d.tolist(), t.tolist()) for d, t, _ in resumed] == rest and rest


# ----------------------------------------------------------------------------- text <-> tokens


def test_char_codec_round_trip_unknowns_and_empty_prompt():
    vocab = Vocab(special=['<unk>'], lower_case=False)
    vocab.set_symbols(['<unk>', ' ', '\n', 'a', 'b', 'é'])
    codec = TextCodec(vocab, 'chars')
    assert codec.decode(codec.encode('ab é\nba')) == 'ab é\nba'
    assert codec.encode('a\r\nb') == codec.encode('a\nb') == [3, 2, 4]
    assert codec.decode(codec.encode('aZb')) == 'a\ufffdb'
    assert codec.encode('') == [2]  # starts at a line break
    assert [BYTE_CLASSES[c] for c in token_classes(codec).tolist()] == \
        ['non-ASCII', 'whitespace', 'whitespace', 'letters', 'letters', 'non-ASCII']


# ----------------------------------------------------------------------------- train.py, eval.py, generate.py

def train_run(work, data, dataset, *flags):
    # TINY's other flags, on a text file rather than its enwik8 corpus
    tiny = TINY[2:]
    try:
        return train.main(['--data', str(data), '--dataset', dataset, '--work_dir', str(work), *tiny,
                           '--scheduler', 'constant', *flags])
    except SystemExit as e:
        return e.code


def records(work):
    return [json.loads(line) for line in (work / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('dataset', ['chars', 'words'])
def test_train_resume_eval_and_generate(tmp_path, text_file, dataset, capsys):
    assert train_run(tmp_path / 'reference', text_file, dataset, '--max_step', '8', '--eval-interval', '4') == 0
    assert train_run(tmp_path / 'resumed', text_file, dataset, '--max_step', '4', '--eval-interval', '4') == 0
    assert train_run(tmp_path / 'resumed', text_file, dataset, '--max_step', '8', '--eval-interval', '4',
                     '--restart') == 0

    def figures(work):
        return [(r['step'], r['split'], r['loss']) for r in records(work)
                if not (r['step'] == 4 and r['split'] == 'test')]  # the stopped run's final test
    assert figures(tmp_path / 'resumed') == figures(tmp_path / 'reference')
    assert ('bpc' if dataset == 'chars' else 'ppl') in records(tmp_path / 'reference')[-1]

    # eval.py: the valid split's loss, read here from the text at batch 1 without memory
    work = tmp_path / 'reference'
    capsys.readouterr()
    assert evaluation.main(['--work_dir', str(work), '--split', 'valid', '--batch_size', '1', '--tgt_len', '16',
                            '--mem_len', '0']) == 0
    report = json.loads((work / 'eval.json').read_text())
    model, _ = load_model(work / 'model.pt')
    model.eval().reset_length(16, 0, 0)
    vocab = get_lm_corpus(str(text_file), dataset).vocab
    text = text_file.read_text()
    tokens = list(text) if dataset == 'chars' else word_tokens(text)
    a, b = cuts(len(tokens))
    ids = torch.tensor([vocab.sym2idx.get(t, vocab.unk_idx) for t in tokens[a:b]])[:, None]
    with torch.no_grad():
        losses = [model(ids[i:j], ids[i + 1:j + 1])[0].reshape(-1)
                  for i, j in ((i, min(i + 16, len(ids) - 1)) for i in range(0, len(ids) - 1, 16))]
    assert report['valid']['loss'] == pytest.approx(torch.cat(losses).double().mean().item(), rel=1e-5)
    assert report['dataset'] == dataset and report['data'] == str(text_file)
    metric = report['valid']['bpc' if dataset == 'chars' else 'ppl']
    assert metric == pytest.approx(report['valid']['loss'] / math.log(2) if dataset == 'chars'
                                   else math.exp(report['valid']['loss']))

    # generate.py: text in the file's alphabet (or its words), after the prompt
    capsys.readouterr()
    assert generate.main(['--work_dir', str(work), '--prompt', 'The first', '--max_tokens', '60']) == 0
    out = capsys.readouterr().out
    assert out.startswith('The first') and out.endswith('\n')
    if dataset == 'chars':
        assert set(out[:-1]) <= set(text) | {'\ufffd'} and len(out) == len('The first') + 60 + 1
    else:
        assert set(out.split()) <= set(vocab.idx2sym) - {'<eos>'} and len(out.split()) >= 2


def test_resume_on_changed_text_is_refused(tmp_path):
    data = tmp_path / 'book.txt'
    data.write_text(sample_text(12000))
    assert train_run(tmp_path / 'run', data, 'chars', '--max_step', '2', '--eval-interval', '2') == 0
    data.write_text(sample_text(12000) + '¤ a character the run never saw\n' * 400)
    before = listing(tmp_path / 'run')
    assert train_run(tmp_path / 'run', data, 'chars', '--max_step', '4', '--restart') == 2
    assert listing(tmp_path / 'run') == before


# ----------------------------------------------------------------------------- the documented example


def test_tinyshakespeare():
    path = shared('tinyshakespeare/input.txt')
    text = path.read_text(encoding='utf-8')
    corpus = data_utils.Corpus.from_files(str(path), 'chars')  # the shared directory is read-only: no cache
    a, b = cuts(len(text))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (a, b - a, len(text) - b)
    assert set(corpus.vocab.idx2sym) == set(text) | {'<unk>'} and len(corpus.vocab) == 66
    assert ''.join(decoded(corpus, 'valid')) == text[a:b]
    assert os.path.getsize(path) == len(text) == 1115394
