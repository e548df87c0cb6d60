"""utils/vocabulary.py: the block tokenizer/encoder gives exactly what the
original's per-line loop gives (reference written out below), on real text
and on the awkward cases (line endings, Unicode whitespace, no final newline)."""

import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from utils import vocabulary
from utils.vocabulary import DataError, Vocab, ids_dtype

SHARED = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data'


def shared(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip('shared sample data not present: {}'.format(path))
    return path


# ---- a slow reference: the original's semantics, one line at a time -------

def ref_lines(path):
    with open(path, encoding='utf-8') as f:   # universal newlines, as the original
        return list(f)


def ref_tokens(line, lower, add_eos=False, double_eos=False):
    line = line.strip()
    if lower:
        line = line.lower()
    symbols = line.split()
    if double_eos:
        return ['<S>'] + symbols + ['<S>']
    return symbols + ['<eos>'] if add_eos else symbols


def ref_vocab(paths, special, lower):
    counter = Counter()
    for path in paths:
        for line in ref_lines(path):
            counter.update(ref_tokens(line, lower))
    # sorted() is stable: ties keep first-occurrence order
    ranked = [sym for sym, _ in sorted(counter.items(), key=lambda kv: -kv[1])]
    return list(special) + [sym for sym in ranked if sym not in set(special)]


def built(paths, **kwargs):
    vocab = Vocab(**kwargs)
    for path in paths:
        vocab.count_file(str(path))
    vocab.build_vocab()
    return vocab


# ---- real text --------------------------------------------------------------

@pytest.mark.parametrize('rel,lower', [('ptb/ptb.valid.txt', True),
                                       ('wikitext-2/wiki.valid.tokens', False)])
def test_vocab_and_ids_match_the_per_line_reference(rel, lower):
    path = shared(rel)
    vocab = built([path], special=['<eos>'], lower_case=lower)
    assert vocab.idx2sym == ref_vocab([path], ['<eos>'], lower)
    expected = [vocab.sym2idx[s] for line in ref_lines(path)
                for s in ref_tokens(line, lower, add_eos=True)]
    ids = vocab.encode_file(str(path), ordered=True)
    assert ids.dtype == torch.int64
    assert ids.tolist() == expected


def test_ptb_counts_against_independent_count():
    path = shared('ptb/ptb.train.txt')
    vocab = built([path], special=['<eos>'], lower_case=True)
    assert len(vocab) == 10000                      # the famous PTB vocabulary
    ids = vocab.encode_file_ids(str(path))
    raw = path.read_text(encoding='utf-8')
    assert (ids == vocab.sym2idx['<eos>']).sum() == raw.count('\n')
    assert (ids == vocab.sym2idx['<unk>']).sum() == raw.split().count('<unk>')
    assert ids.dtype == np.int16


def test_unordered_encoding_is_one_tensor_per_line():
    path = shared('lm1b-sample/heldout-00010-00011.tokens')
    vocab = built([path], special=['<S>'], lower_case=False)
    sents = vocab.encode_file(str(path), ordered=False, add_double_eos=True)
    lines = ref_lines(path)
    assert len(sents) == len(lines) == 12216
    for k in (0, 1, 5000, len(lines) - 1):
        want = [vocab.sym2idx[s] for s in ref_tokens(lines[k], False, double_eos=True)]
        assert sents[k].tolist() == want


# ---- awkward input ------------------------------------------------------------

AWKWARD = ('First line\r\nSecond\tline  with \u2028 odd\x85spaces\r'
           'lone-CR ended\n\n  \nUPPER lower <eos> x\x1cy\nno final newline')


@pytest.mark.parametrize('lower', [True, False])
@pytest.mark.parametrize('mode', ['eos', 'plain', 'double'])
def test_awkward_text_matches_reference(tmp_path, lower, mode):
    path = tmp_path / 'a.txt'
    path.write_bytes(AWKWARD.encode('utf-8'))
    vocab = built([path], special=['<eos>', '<S>'], lower_case=lower)
    assert vocab.idx2sym == ref_vocab([path], ['<eos>', '<S>'], lower)
    add_eos, double = mode == 'eos', mode == 'double'
    lines = ref_lines(path)
    want = [[vocab.sym2idx[s] for s in ref_tokens(line, lower, add_eos, double)] for line in lines]
    got = vocab.encode_file(str(path), ordered=False, add_eos=add_eos, add_double_eos=double)
    assert [t.tolist() for t in got] == want
    flat = vocab.encode_file(str(path), ordered=True, add_eos=add_eos, add_double_eos=double)
    assert flat.tolist() == [i for line in want for i in line]


def test_blocks_split_only_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(vocabulary, 'BLOCK_BYTES', 7)   # force many small blocks
    path = tmp_path / 'b.txt'
    text = ''.join('w{} é{} x\r\n'.format(i, i % 3) for i in range(50)) + 'tail'
    path.write_bytes(text.encode('utf-8'))
    blocks = list(vocabulary.read_line_blocks(str(path)))
    assert all(b.endswith('\n') for b, _ in blocks)
    assert ''.join(b for b, _ in blocks) == text.replace('\r\n', '\n') + '\n'
    assert [n for _, n in blocks] == [1 + ''.join(b for b, _ in blocks[:k]).count('\n')
                                      for k in range(len(blocks))]
    vocab = built([path], special=['<eos>'], lower_case=False)
    assert vocab.encode_file(str(path), ordered=True).tolist() == [
        vocab.sym2idx[s] for line in ref_lines(path) for s in ref_tokens(line, False, True)]


def test_ties_keep_first_occurrence_order(tmp_path):
    path = tmp_path / 't.txt'
    path.write_text('b a c\nc a b d\n')
    vocab = built([path], special=['<eos>'], lower_case=False)
    # counts: b2 a2 c2 d1; equal counts in first-seen order
    assert vocab.idx2sym == ['<eos>', 'b', 'a', 'c', 'd']


def test_min_freq_and_max_size(tmp_path):
    path = tmp_path / 'm.txt'
    path.write_text('a a a b b c\n')
    assert built([path], min_freq=2).idx2sym == ['a', 'b']
    assert built([path], max_size=1).idx2sym == ['a']


# ---- errors -------------------------------------------------------------------

def test_unknown_symbol_without_unk_names_file_and_line(tmp_path):
    train, valid = tmp_path / 'train.txt', tmp_path / 'valid.txt'
    train.write_text('a b\n')
    valid.write_text('a\nb a\nb zzz a\n')
    vocab = built([train], special=['<eos>'], lower_case=False)
    with pytest.raises(DataError, match=r"valid.txt line 3: 'zzz' is not in the vocabulary"):
        vocab.encode_file_ids(str(valid))


def test_unknown_symbol_maps_to_unk_with_a_vocab_file(tmp_path):
    vocab_file = tmp_path / 'v.txt'
    vocab_file.write_text('<S> 5\nthe 4\n<UNK> 2\n')
    text = tmp_path / 'x.txt'
    text.write_text('the cat\n')
    vocab = Vocab(special=[], lower_case=False, vocab_file=str(vocab_file))
    vocab.build_vocab()
    assert vocab.idx2sym == ['<S>', 'the', '<UNK>'] and vocab.unk_idx == 2
    assert [t.tolist() for t in vocab.encode_file(str(text), add_double_eos=True)] == [[0, 1, 2, 0]]


@pytest.mark.parametrize('content,message', [
    ('<S> 3\nthe 2\n', 'does not match'),
    ('<S> 3\n\n<UNK> 1\n', 'line 2: empty line'),
])
def test_bad_vocab_file(tmp_path, content, message):
    vocab_file = tmp_path / '1b_word_vocab.txt'
    vocab_file.write_text(content)
    vocab = Vocab(special=[], vocab_file=str(vocab_file))
    with pytest.raises(DataError, match=message):
        vocab.build_vocab()


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / 'bin.txt'
    path.write_bytes(b'fine\nalso fine\nbad \xff byte\n')
    with pytest.raises(DataError, match=r'bin.txt line 3: not UTF-8'):
        Vocab().count_file(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match='nope.txt is missing'):
        Vocab().count_file(str(tmp_path / 'nope.txt'))


# ---- odds and ends --------------------------------------------------------------

def test_set_symbols_restores_special_attributes():
    vocab = Vocab(special=['<eos>'])
    vocab.set_symbols(['<eos>', 'a', 'b'])
    assert vocab.eos_idx == 0 and vocab.get_idx('b') == 2 and len(vocab) == 3
    with pytest.raises(KeyError):
        vocab.get_idx('zzz')


def test_ids_dtype_is_smallest_signed_type():
    assert ids_dtype(204) == np.int16 and ids_dtype(32767) == np.int16
    assert ids_dtype(32768) == np.int32 and ids_dtype(793471) == np.int32


def test_custom_delimiter_uses_the_per_line_path(tmp_path):
    path = tmp_path / 'c.txt'
    path.write_text('ab,c\nc\n')
    vocab = built([path], delimiter=',', special=['<eos>'], lower_case=False)
    assert vocab.idx2sym == ['<eos>', 'c', 'ab']
    assert vocab.encode_file(str(path), ordered=True).tolist() == [2, 1, 0, 1, 0]


@pytest.mark.parametrize('options', [dict(special=['<eos>'], lower_case=False),
                                     dict(special=['<eos>', 'the'], lower_case=True, max_size=50),
                                     dict(special=['<eos>'], min_freq=3)])
def test_build_and_encode_equals_count_build_encode(tmp_path, options):
    """The one-pass corpus build gives what count_file + build_vocab +
    encode_file_ids give, including specials that occur in the text, a
    literal '<eos>', and min_freq/max_size cuts (mapped to <unk>)."""
    train = tmp_path / 'train.txt'
    train.write_text(shared('wikitext-2/wiki.valid.tokens').read_text(encoding='utf-8')[:200000]
                     + 'The the <eos> x\n')
    valid = tmp_path / 'valid.txt'
    valid.write_text('the cat <unk>\n')
    options = dict(options, special=options['special'] + ['<unk>'])
    slow = Vocab(**options)
    slow.count_file(str(train))
    slow.build_vocab()
    fast = Vocab(**options)
    got = fast.build_and_encode([str(train)], [str(valid)])
    assert fast.idx2sym == slow.idx2sym and fast.counter == slow.counter
    for path in (train, valid):
        np.testing.assert_array_equal(got[str(path)], slow.encode_file_ids(str(path)))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    path = tmp_path / 'p.txt'
    path.write_text('a b c\n' * 1000)
    monkeypatch.setattr(sys, 'stderr', io.StringIO())          # a log file or CI
    Vocab().count_file(str(path))
    assert sys.stderr.getvalue() == ''
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    Vocab().count_file(str(path))
    assert 'counting p.txt' in terminal.getvalue()
