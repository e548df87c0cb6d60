"""Symbols <-> ids, as the original Transformer-XL's utils/vocabulary.py.

The API and the results are the original's (same vocabulary, same ids), but
whole files are tokenized in blocks of many lines with C-level str/dict
operations instead of a Python loop per line, and a corpus is counted and
encoded in one pass (build_and_encode): WikiText-103 takes seconds instead of
minutes. The per-line methods (`tokenize`, `encode_sents`, ...) are kept.
What the original printed (the vocabulary's size, verbose progress) goes to the
`log` function a Vocab is given, none by default.
"""

import os
from collections import Counter
from itertools import repeat

import numpy as np
import torch

from utils.files import progress_bar
from utils.errors import DataError


def silent(line):
    """The default log function of the data layer: the line goes nowhere."""

# Blocks of whole lines are tokenized at once; 8 MiB keeps the temporary token
# lists (~1.5M str objects) small while amortizing the per-block overhead.
BLOCK_BYTES = 1 << 23

# A lone surrogate cannot come out of a strict UTF-8 decode, so it can never
# be a token of a real file: it marks line ends when every line is encoded
# separately (lm1b's sentences).
_LINE_END = '\ud800'


def read_line_blocks(path, desc=None):
    """Yield (text, first_line_number) blocks of whole lines of a UTF-8 file.

    Every block ends with '\\n' (one is added to a last line without it), and
    newlines are translated as Python's text mode does ('\\r\\n' and '\\r' become
    '\\n'), so a block splits into exactly the lines the original iterated over.
    """
    bar = progress_bar(os.path.getsize(path), 'B', desc=desc) if desc else None
    line_no, carry = 1, b''
    try:
        with open(path, 'rb') as f:
            while True:
                raw = f.read(BLOCK_BYTES)
                if bar is not None:
                    bar.update(len(raw))
                if not raw:
                    break
                raw = carry + raw
                cut = raw.rfind(b'\n') + 1
                if cut == 0:
                    carry = raw
                    continue
                carry = raw[cut:]
                yield _decode(raw[:cut], path, line_no), line_no
                line_no += raw.count(b'\n', 0, cut)
            if carry:
                yield _decode(carry + b'\n', path, line_no), line_no
    finally:
        if bar is not None:
            bar.close()


def _decode(raw, path, first_line):
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b'\n', 0, err.start)
        raise DataError('{} line {}: not UTF-8 text ({}); is this the right file?'.format(
            path, line, err.reason)) from None
    if '\r' in text:
        text = text.replace('\r\n', '\n').replace('\r', '\n')
    return text


def _ends_a_line(path):
    with open(path, 'rb') as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) in (b'\n', b'\r')


def ids_dtype(vocab_size):
    """The smallest signed integer type that holds every id. Signed, so -1 can
    mark line ends while encoding, and never uint8, which torch takes for a
    mask when indexing."""
    return np.dtype(np.int16) if vocab_size < 2 ** 15 else np.dtype(np.int32)


class FirstSeen(dict):
    """symbol -> order of first occurrence. Lookups of known symbols stay in
    C (dict.__getitem__); only a new symbol calls __missing__."""

    def __missing__(self, symbol):
        self[symbol] = n = len(self)
        return n


class Vocab(object):
    def __init__(self, special=[], min_freq=0, max_size=None, lower_case=True,
                 delimiter=None, vocab_file=None, log=silent):
        """log: a function taking a line, for what the original printed (the vocabulary's size, and the
        verbose=True progress lines)."""
        self.log = log
        self.counter = Counter()
        self.special = special
        self.min_freq = min_freq
        self.max_size = max_size
        self.lower_case = lower_case
        self.delimiter = delimiter
        self.vocab_file = vocab_file

    # ---- per-line API, as the original -------------------------------------

    def tokenize(self, line, add_eos=False, add_double_eos=False):
        line = line.strip()
        if self.lower_case:
            line = line.lower()
        # an empty delimiter means characters
        symbols = line if self.delimiter == '' else line.split(self.delimiter)
        if add_double_eos:  # lm1b
            return ['<S>'] + list(symbols) + ['<S>']
        if add_eos:
            return list(symbols) + ['<eos>']
        return list(symbols)

    def count_sents(self, sents, verbose=False):
        """sents: a list of sentences, each a list of tokenized symbols."""
        if verbose:
            self.log('counting {} sents ...'.format(len(sents)))
        for symbols in sents:
            self.counter.update(symbols)

    def encode_sents(self, sents, ordered=False, verbose=False):
        if verbose:
            self.log('encoding {} sents ...'.format(len(sents)))
        encoded = [self.convert_to_tensor(symbols) for symbols in sents]
        return torch.cat(encoded) if ordered else encoded

    # ---- whole files --------------------------------------------------------

    def _line_tokens(self, text, add_eos=False, double_eos=False, mark_lines=False):
        """The symbols of a block of whole lines: tokenize(line, add_eos,
        double_eos) of every line, concatenated; with mark_lines, _LINE_END
        after each line's symbols."""
        if self.lower_case:
            text = text.lower()
        end = ' ' + _LINE_END + ' ' if mark_lines else ' '
        if double_eos:
            tokens = ('<S> ' + text.replace('\n', ' <S>' + end + '<S> ')).split()
            tokens.pop()  # the '<S>' that would open a line after the last one
            return tokens
        if add_eos:
            return text.replace('\n', ' <eos>' + end).split()
        return text.replace('\n', end).split() if mark_lines else text.split()

    def _line_blocks(self, path, verb):
        if not os.path.isfile(path):
            raise DataError('{} is missing'.format(path))
        return read_line_blocks(path, desc='{} {}'.format(verb, os.path.basename(path)))

    def count_file(self, path, verbose=False, add_eos=False):
        """Add the symbols of a file to the counter. Unlike the original this
        does not also return every tokenized line (gigabytes at WikiText-103
        size); call tokenize() per line if you need them."""
        if verbose:
            self.log('counting file {} ...'.format(path))
        for text, _ in self._line_blocks(path, 'counting'):
            if self.delimiter is None:
                self.counter.update(self._line_tokens(text, add_eos))
            else:  # the block tokenizer splits on whitespace only
                for line in text.split('\n')[:-1]:
                    self.counter.update(self.tokenize(line, add_eos=add_eos))

    def encode_file(self, path, ordered=False, verbose=False, add_eos=True,
                    add_double_eos=False):
        """As the original: one LongTensor of the whole file if ordered, else a
        list of one LongTensor per line."""
        if verbose:
            self.log('encoding file {} ...'.format(path))
        if ordered:
            ids = self.encode_file_ids(path, add_eos, add_double_eos)
            return torch.from_numpy(ids.astype(np.int64))
        ids, lengths = self.encode_file_ids(path, add_eos, add_double_eos, by_line=True)
        return list(torch.from_numpy(ids.astype(np.int64)).split(lengths.tolist()))

    def encode_file_ids(self, path, add_eos=True, add_double_eos=False, by_line=False):
        """Encode a whole file into a numpy array of ids (of ids_dtype), the
        same ids as the original's encode_file. add_eos: '<eos>' after every
        line; add_double_eos: '<S>' before and after every line instead (lm1b);
        by_line: also return the number of ids of every line."""
        if self.delimiter is not None:
            sents = [self.tokenize(line, add_eos, add_double_eos)
                     for line in open(path, encoding='utf-8')]
            ids = np.array(self.get_indices([s for sent in sents for s in sent]),
                           dtype=ids_dtype(len(self)))
            return (ids, np.array([len(s) for s in sents])) if by_line else ids
        table = self.sym2idx
        if by_line:  # line ends map to -1, found and dropped after the lookup
            table = dict(table)
            table[_LINE_END] = -1
        pieces, lengths = [], []
        for text, first_line in self._line_blocks(path, 'encoding'):
            tokens = self._line_tokens(text, add_eos, add_double_eos, mark_lines=by_line)
            try:
                ids = self._lookup(table, tokens)
            except KeyError as err:
                raise self._unknown_symbol(err.args[0], path, text, first_line) from None
            if by_line:
                ends = np.flatnonzero(ids == -1)
                lengths.append(np.diff(ends - np.arange(len(ends)), prepend=0))
                ids = ids[ids != -1]
            pieces.append(ids)
        ids = np.concatenate(pieces) if pieces else np.zeros(0, ids_dtype(len(self)))
        if by_line:
            return ids, (np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
        return ids

    def build_and_encode(self, count_paths, encode_paths=(), add_eos=True):
        """count_file() each of count_paths, build_vocab(), then
        encode_file_ids(path, add_eos) each of count_paths + encode_paths: the
        same vocabulary and ids, but count_paths are tokenized only once.
        Returns {path: ids}.

        While counting, every symbol gets a provisional id in order of first
        occurrence; the provisional ids give the counts (bincount), the counts
        give the vocabulary, and a table maps provisional ids to final ones."""
        if self.delimiter is not None:  # the per-line path
            for path in count_paths:
                self.count_file(path)
            self.build_vocab()
            return {path: self.encode_file_ids(path, add_eos)
                    for path in list(count_paths) + list(encode_paths)}
        first_seen = FirstSeen()
        provisional, n_lines = {}, 0
        for path in count_paths:
            provisional[path], n = self.first_seen_ids(path, first_seen, add_eos)
            n_lines += n if add_eos else 0
        symbols = list(first_seen)
        counts = np.zeros(len(symbols), np.int64)
        for pieces in provisional.values():
            for piece in pieces:
                counts += np.bincount(piece, minlength=len(symbols))
        if n_lines:  # the '<eos>' added to every line is encoded, not counted
            counts[first_seen['<eos>']] -= n_lines
        table = self.build_from_counts(symbols, counts)
        encoded = {}
        for path, pieces in provisional.items():
            ids = encoded[path] = np.empty(sum(len(p) for p in pieces), table.dtype)
            at = 0
            for k, piece in enumerate(pieces):
                ids[at:at + len(piece)] = table[piece]
                at += len(piece)
                pieces[k] = None  # at most one copy of the corpus in memory at a time
        for path in encode_paths:
            encoded[path] = self.encode_file_ids(path, add_eos)
        return encoded

    def first_seen_ids(self, path, first_seen, add_eos=False, chars=False):
        """(pieces, lines): the symbols of a file as provisional ids, one int32 array per block, and its number
        of lines. first_seen[symbol] numbers the symbols in order of first occurrence (a FirstSeen, shared by
        the files of a corpus). chars: every character is a symbol, newlines and spaces included (nothing is
        stripped or lower-cased), but not the newline read_line_blocks adds to a last line without one."""
        pieces, lines = [], 0
        for text, _ in self._line_blocks(path, 'reading'):
            tokens = text if chars else self._line_tokens(text, add_eos)
            pieces.append(np.fromiter(map(first_seen.__getitem__, tokens), np.int32, len(tokens)))
            lines += text.count('\n')
        if chars and pieces and not _ends_a_line(path):
            pieces[-1] = pieces[-1][:-1]
        return pieces, lines

    def build_from_counts(self, symbols, counts):
        """Count symbols[i] counts[i] times (zeros skipped), build_vocab(), and return id_table(symbols)."""
        self.counter.update({symbols[i]: int(counts[i]) for i in np.flatnonzero(counts > 0)})
        self.build_vocab()
        return self.id_table(symbols)

    def id_table(self, symbols):
        """The array (of ids_dtype) that maps each index of `symbols` to its id, symbols outside the
        vocabulary to <unk>; DataError naming one if there is no <unk>."""
        table = np.array([self.sym2idx.get(s, -1) for s in symbols], dtype=np.int64)
        if (table < 0).any():
            missing = symbols[int(np.flatnonzero(table < 0)[0])]
            if not hasattr(self, 'unk_idx'):
                raise DataError('{!r} is not in the vocabulary (min_freq/max_size cut it) '
                                'and there is no <unk> to map it to'.format(missing))
            table[table < 0] = self.unk_idx
        return table.astype(ids_dtype(len(self)))

    def _lookup(self, table, tokens):
        if hasattr(self, 'unk_idx'):
            ids = map(table.get, tokens, repeat(self.unk_idx))
        else:
            ids = map(table.__getitem__, tokens)
        return np.fromiter(ids, dtype=ids_dtype(len(self)), count=len(tokens))

    def _unknown_symbol(self, sym, path, text, first_line):
        line = first_line
        for offset, content in enumerate(text.split('\n')):
            if sym in self.tokenize(content):
                line = first_line + offset
                break
        return DataError('{} line {}: {!r} is not in the vocabulary, which has no <unk> to '
                         'map it to (is this the right file for the dataset?)'.format(
                             path, line, sym))

    # ---- building the vocabulary -------------------------------------------

    def _build_from_file(self, vocab_file):
        self.idx2sym = []
        self.sym2idx = {}  # insertion-ordered, lighter than OrderedDict
        if not os.path.isfile(vocab_file):
            raise DataError('vocabulary file {} is missing'.format(vocab_file))
        with open(vocab_file, 'r', encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    raise DataError('vocabulary file {} line {}: empty line (expected '
                                    '"word count")'.format(vocab_file, line_no))
                self.add_symbol(fields[0])
        if '<UNK>' not in self.sym2idx or '<S>' not in self.sym2idx:
            raise DataError('vocabulary file {} does not match: it has no <S> or no <UNK> entry '
                            '(the lm1b vocabulary 1b_word_vocab.txt has both)'.format(vocab_file))
        self.unk_idx = self.sym2idx['<UNK>']

    def build_vocab(self):
        if self.vocab_file:
            self.log('building vocab from {}'.format(self.vocab_file))
            self._build_from_file(self.vocab_file)
            self.log('final vocab size {}'.format(len(self)))
        else:
            self.log('building vocab with min_freq={}, max_size={}'.format(
                self.min_freq, self.max_size))
            self.idx2sym = []
            self.sym2idx = {}
            for sym in self.special:
                self.add_special(sym)
            # most_common sorts stably: ties keep first-occurrence order, as the original
            for sym, cnt in self.counter.most_common(self.max_size):
                if cnt < self.min_freq:
                    break
                self.add_symbol(sym)
            self.log('final vocab size {} from {} unique tokens'.format(
                len(self), len(self.counter)))

    def set_symbols(self, idx2sym):
        """Restore a built vocabulary from its symbol list (the cache)."""
        self.idx2sym = []
        self.sym2idx = {}
        for sym in idx2sym:
            if sym in self.special:
                self.add_special(sym)
            else:
                self.add_symbol(sym)
        if len(self.idx2sym) != len(idx2sym):
            raise DataError('vocabulary has duplicate symbols')
        if self.vocab_file:
            self.unk_idx = self.sym2idx['<UNK>']

    def set_given_symbols(self, idx2sym):
        """A vocabulary that comes with a model (its ids, e.g. an imported checkpoint's), not built
        from counts; words outside it map to its <unk> (or <UNK>) where it has one."""
        self.vocab_file = None
        self.set_symbols(idx2sym)
        unk = next((s for s in ('<unk>', '<UNK>') if s in self.sym2idx), None)
        if unk is not None:
            self.unk_idx = self.sym2idx[unk]

    def add_special(self, sym):
        if sym not in self.sym2idx:
            self.idx2sym.append(sym)
            self.sym2idx[sym] = len(self.idx2sym) - 1
            setattr(self, '{}_idx'.format(sym.strip('<>')), self.sym2idx[sym])

    def add_symbol(self, sym):
        if sym not in self.sym2idx:
            self.idx2sym.append(sym)
            self.sym2idx[sym] = len(self.idx2sym) - 1

    # ---- lookups -----------------------------------------------------------

    def get_sym(self, idx):
        assert 0 <= idx < len(self), 'Index {} out of range'.format(idx)
        return self.idx2sym[idx]

    def get_idx(self, sym):
        if sym in self.sym2idx:
            return self.sym2idx[sym]
        if not hasattr(self, 'unk_idx'):
            raise KeyError('{!r} is not in the vocabulary and it has no <unk>'.format(sym))
        return self.unk_idx

    def get_symbols(self, indices):
        return [self.get_sym(idx) for idx in indices]

    def get_indices(self, symbols):
        return [self.get_idx(sym) for sym in symbols]

    def convert_to_tensor(self, symbols):
        return torch.LongTensor(self.get_indices(symbols))

    def convert_to_sent(self, indices, exclude=None):
        if exclude is None:
            return ' '.join([self.get_sym(idx) for idx in indices])
        return ' '.join([self.get_sym(idx) for idx in indices if idx not in exclude])

    def __len__(self):
        return len(self.idx2sym)
