"""Corpora and batch iterators, as the original Transformer-XL's data_utils.py.

`get_lm_corpus(datadir, dataset)` returns a Corpus whose `get_iterator(split,
bsz, bptt, device=..., ext_len=...)` yields the original's batches, in the
original's order for the same seed: an iterator draws its varlen lengths and
shuffles from a numpy RandomState(seed) of its own, the stream the original drew
from numpy's global RNG after np.random.seed(seed). What differs:

* the corpus cache is plain data (.npy ids + a JSON vocabulary, keyed on the
  source files, written atomically: utils/corpus_cache.py) instead of a pickled
  `cache.pt`;
* token ids are kept in the smallest integer type that holds the vocabulary
  (int16 or int32: `corpus.train.long()` is the original's LongTensor); the
  batches the iterators yield are int64, as the original's;
* every iterator can save and restore its position (`state_dict()` /
  `load_state_dict()`), so a training run resumes exactly mid-epoch;
* bad input raises DataError with a one-line message naming the file;
* nothing is printed: get_lm_corpus reports through the `log` function it is
  given (none by default).

Besides the benchmarks, `chars` and `words` read any plain text: `datadir` is
one text file (cut 90/5/5 into train/valid/test) or a directory of the three
splits' files, the vocabulary is the training split's plus <unk>
(docs/data.md).
"""

import glob
import os

import numpy as np
import torch

from utils import corpus_cache
from utils.datasets import (ADAPTIVE_CUTOFFS, CHAR_LEVEL, DATASETS, LM1B_TRAIN, ORDERED, PLAIN_TEXT, SPLITS,
                            TEXT_SPLIT)
from utils.vocabulary import DataError, FirstSeen, Vocab, silent

__all__ = ['DataError', 'Corpus', 'get_lm_corpus', 'LMOrderedIterator',
           'LMShuffledIterator', 'LMMultiFileIterator', 'DATASETS', 'CHAR_LEVEL', 'ADAPTIVE_CUTOFFS',
           'DEFAULT_SEED']

# The seed of an iterator not given one: train.py's default --seed, so such an iterator yields the batches of
# a default training run.
DEFAULT_SEED = 1111


def _as_ids(x):
    """A batch as the model takes it: contiguous int64."""
    return x.to(torch.int64, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------
# Iterators
# ---------------------------------------------------------------------------

class _LMIterator(object):
    """What every iterator holds: bsz columns of bptt rows (plus ext_len rows of extended context), the device
    batches go to, and the RNG of its random choices (varlen lengths, shuffles): numpy.random.RandomState(seed)
    of its own, seed DEFAULT_SEED when none is given; the stream the original drew from numpy's global RNG
    after np.random.seed(seed)."""

    def __init__(self, bsz, bptt, device='cpu', ext_len=None, seed=DEFAULT_SEED):
        self.bsz = bsz
        self.bptt = bptt
        self.ext_len = ext_len if ext_len is not None else 0
        self.device = device
        self.rng = np.random.RandomState(DEFAULT_SEED if seed is None else seed)


class LMOrderedIterator(_LMIterator):
    def __init__(self, data, bsz, bptt, device='cpu', ext_len=None, varlen=False, seed=DEFAULT_SEED):
        """data: 1-D tensor of ids, strictly ordered (any integer type). varlen: batches of random lengths
        around bptt (the original's --varlen)."""
        super(LMOrderedIterator, self).__init__(bsz, bptt, device, ext_len, seed)
        self.varlen = varlen

        # bsz parallel streams, each a contiguous run of the data; the rest is trimmed.
        self.n_step = data.size(0) // bsz
        data = data.narrow(0, 0, self.n_step * bsz)
        # [n_step, bsz] as the original, but a transposed view instead of a
        # copy: the corpus is not duplicated in memory (batches are copied).
        self.data = data.view(bsz, self.n_step).t().to(device)
        self.n_batch = (self.n_step + self.bptt - 1) // self.bptt

        self._next = 0      # row where the batch after the last one yielded starts
        self._resume = None

    def get_batch(self, i, bptt=None):
        if bptt is None:
            bptt = self.bptt
        seq_len = min(bptt, self.data.size(0) - 1 - i)
        end_idx = i + seq_len
        beg_idx = max(0, i - self.ext_len)
        data = _as_ids(self.data[beg_idx:end_idx])
        target = _as_ids(self.data[i + 1:i + 1 + seq_len])
        return data, target, seq_len

    def _start(self, start):
        """start=None continues from load_state_dict's position, else 0."""
        resume, self._resume = self._resume, None
        if start is None:
            start = resume or 0
        return start

    def get_fixlen_iter(self, start=None):
        start = self._start(start)
        for i in range(start, self.data.size(0) - 1, self.bptt):
            self._next = i + self.bptt
            yield self.get_batch(i)

    def get_varlen_iter(self, start=None, std=5, min_len=5, max_deviation=3):
        """Batches of random length; the same lengths for the same RNG state,
        so (position, RNG state) resumes the sequence exactly."""
        i = self._start(start)
        max_len = self.bptt + max_deviation * std
        # the original stops after the batch that reaches the end; a resumed
        # position already there must yield nothing, and draw nothing
        while i < self.data.size(0) - 2:
            bptt = self.bptt if self.rng.random() < 0.95 else self.bptt / 2.
            bptt = min(max_len, max(min_len, int(self.rng.normal(bptt, std))))
            data, target, seq_len = self.get_batch(i, bptt)
            i += seq_len
            self._next = i
            yield data, target, seq_len

    def __iter__(self):
        """An epoch: from load_state_dict's position if one was loaded since, else from the start."""
        return self.get_varlen_iter() if self.varlen else self.get_fixlen_iter()

    def state_dict(self):
        """Plain data: where the next batch starts (a row of self.data, i.e. the original's `start`), and the
        state of the iterator's RNG (which draws the varlen lengths)."""
        return {'position': int(self._next), 'rng': _plain_rng_state(self.rng)}

    def load_state_dict(self, state):
        """The next iteration continues from the saved position (and RNG state)."""
        position = state.get('position') if isinstance(state, dict) else None
        if not isinstance(position, int) or position < 0:
            raise DataError('data iterator state {!r} is not a saved position'.format(state))
        self._resume = self._next = position
        _restore_rng(self.rng, state)


def _plain_rng_state(rng):
    """A numpy RNG's state as plain data (lists and numbers)."""
    name, keys, pos, has_gauss, gauss = rng.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _rng_from(plain):
    rng = np.random.RandomState()
    rng.set_state(_state_from(plain))
    return rng


def _state_from(plain):
    return (plain[0], np.asarray(plain[1], dtype=np.uint32), int(plain[2]), int(plain[3]), float(plain[4]))


def _restore_rng(rng, state):
    """Set an iterator's RNG to a saved state['rng'], where there is one."""
    if state.get('rng') is not None:
        rng.set_state(_state_from(state['rng']))


class _Sentences(object):
    """Sentences as one flat array of ids plus the start and length of each."""

    def __init__(self, flat, lengths):
        self.flat = np.ascontiguousarray(flat)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths

    @classmethod
    def from_list(cls, sents):
        lengths = [len(s) for s in sents]
        flat = torch.cat([torch.as_tensor(s).view(-1) for s in sents]).numpy() if sents \
            else np.zeros(0, np.int64)
        return cls(flat, lengths)

    def __len__(self):
        return len(self.lengths)


class _StreamPosition(object):
    """Where the sentence streams stand: the next sentence to hand out
    (`cursor`, an index into the epoch's order), the sentence and offset each
    batch column is reading, and the rows kept for ext_len."""

    def __init__(self, bsz, state=None):
        state = state or {}
        self.cursor = int(state.get('cursor', 0))
        self.sent = np.array(state.get('sent', [-1] * bsz), dtype=np.int64)
        self.offset = np.array(state.get('offset', [0] * bsz), dtype=np.int64)
        retained = state.get('retained')
        self.retained = None if retained is None else np.array(retained, dtype=np.int64)
        if len(self.sent) != bsz or len(self.offset) != bsz:
            raise DataError('saved data position is for batch size {}, not {}'.format(
                len(self.sent), bsz))

    def state(self):
        return {'cursor': self.cursor, 'sent': self.sent.tolist(),
                'offset': self.offset.tolist(),
                'retained': None if self.retained is None else self.retained.tolist()}


class LMShuffledIterator(_LMIterator):
    def __init__(self, data, bsz, bptt, device='cpu', ext_len=None, shuffle=False, seed=DEFAULT_SEED):
        """data: list of 1-D tensors (sentences), with no order among them. shuffle: a new sentence order
        every epoch."""
        super(LMShuffledIterator, self).__init__(bsz, bptt, device, ext_len, seed)
        self.data = data
        self.shuffle = shuffle
        self._sents = None
        self._live = None    # the position of the epoch in progress (a dict)
        self._resume = None

    def _sentences(self):
        if self._sents is None:
            self._sents = _Sentences.from_list(self.data)
        return self._sents

    def _epoch_order(self, n, rng_state):
        """The original's np.random.permutation, drawn from the iterator's RNG,
        or the same permutation replayed from a saved RNG state (which the
        iterator's RNG then continues from, as in a run that never stopped)."""
        if not self.shuffle:
            return np.arange(n)
        rng = self.rng if rng_state is None else _rng_from(rng_state)
        order = np.arange(n)
        rng.shuffle(order)
        if rng_state is not None:
            _restore_rng(self.rng, {'rng': _plain_rng_state(rng)})
        return order

    def stream_iterator(self, sents, order, pos):
        """The original's stream_iterator: each of the bsz columns reads
        sentences one after another from the shared order, a sentence's last
        token serving only as a target; the first incomplete batch ends it."""
        bsz, bptt = self.bsz, self.bptt
        flat, starts, lengths = sents.flat, sents.starts, sents.lengths
        while True:
            n_retain = 0 if pos.retained is None else len(pos.retained)
            data = np.empty((n_retain + bptt, bsz), dtype=np.int64)
            target = np.empty((bptt, bsz), dtype=np.int64)
            if n_retain:
                data[:n_retain] = pos.retained
            for col in range(bsz):
                n_filled = 0
                while n_filled < bptt:
                    s = pos.sent[col]
                    left = lengths[order[s]] - pos.offset[col] if s >= 0 else 0
                    if left <= 1:   # exhausted: take the next sentence
                        if pos.cursor >= len(order):
                            return
                        pos.sent[col], pos.offset[col] = pos.cursor, 0
                        pos.cursor += 1
                        continue
                    n_new = min(left - 1, bptt - n_filled)
                    beg = starts[order[s]] + pos.offset[col]
                    row = n_retain + n_filled
                    data[row:row + n_new, col] = flat[beg:beg + n_new]
                    target[n_filled:n_filled + n_new, col] = flat[beg + 1:beg + 1 + n_new]
                    pos.offset[col] += n_new
                    n_filled += n_new
            n_keep = min(data.shape[0], self.ext_len)
            pos.retained = data[-n_keep:].copy() if n_keep > 0 else None
            yield (torch.from_numpy(data).to(self.device),
                   torch.from_numpy(target).to(self.device), bptt)

    def __iter__(self):
        resume, self._resume = self._resume, None
        sents = self._sentences()
        if resume is None:
            rng_state = _plain_rng_state(self.rng) if self.shuffle else None
            order = self._epoch_order(len(sents), None)
            pos = _StreamPosition(self.bsz)
        else:
            rng_state = resume['rng']
            order = self._epoch_order(len(sents), rng_state)
            pos = _StreamPosition(self.bsz, resume)
        self._live = lambda: dict(pos.state(), rng=rng_state)
        for batch in self.stream_iterator(sents, order, pos):
            yield batch
        self._live = None

    def state_dict(self):
        """Plain data: the position after the last batch yielded (None between
        epochs), with the RNG state the epoch's shuffle came from, so restoring
        it replays that shuffle; and between epochs the state of the iterator's
        RNG, which the next shuffle draws from."""
        if self._live is not None:
            return {'position': self._live()}
        return {'position': None, 'rng': _plain_rng_state(self.rng)}

    def load_state_dict(self, state):
        """The next iteration continues the saved epoch where it stopped."""
        self._resume = _checked_position(state)
        _restore_rng(self.rng, state)


def _checked_position(state):
    if not isinstance(state, dict) or 'position' not in state:
        raise DataError('data iterator state {!r} is not a saved position'.format(state))
    return state['position']


class LMMultiFileIterator(LMShuffledIterator):
    def __init__(self, paths, vocab, bsz, bptt, device='cpu', ext_len=None,
                 shuffle=False, seed=DEFAULT_SEED):
        super(LMMultiFileIterator, self).__init__(
            None, bsz, bptt, device=device, ext_len=ext_len, shuffle=shuffle, seed=seed)
        # the original shuffles this list in place every epoch, so epoch k's
        # file order starts from epoch k-1's: a copy keeps that, per iterator
        self.paths = list(paths)
        self.vocab = vocab

    def file_sentences(self, path):
        """A training file's lines, each '<S> words <S>'."""
        ids, lengths = self.vocab.encode_file_ids(path, add_double_eos=True, by_line=True)
        return _Sentences(ids, lengths)

    def __iter__(self):
        resume, self._resume = self._resume, None
        first = 0
        if resume is None:
            if self.shuffle:
                self.rng.shuffle(self.paths)
        else:  # saved by file name, so the data directory may move
            by_name = {os.path.basename(p): p for p in self.paths}
            if sorted(resume['paths']) != sorted(by_name):
                raise DataError('the saved data position is for other training files than '
                                'the {} in {}'.format(len(by_name), os.path.dirname(
                                    self.paths[0]) if self.paths else 'data directory'))
            self.paths, first = [by_name[name] for name in resume['paths']], resume['file']
        for k in range(first, len(self.paths)):
            sents = self.file_sentences(self.paths[k])
            resuming = resume is not None and k == first
            if resuming:
                rng_state = resume['rng']
            else:
                rng_state = _plain_rng_state(self.rng) if self.shuffle else None
            # a fresh file shuffles with the iterator's RNG
            order = self._epoch_order(len(sents), rng_state if resuming else None)
            pos = _StreamPosition(self.bsz, resume if resuming else None)
            self._live = (lambda pos=pos, rng=rng_state, k=k: dict(
                pos.state(), rng=rng, file=k, paths=[os.path.basename(p) for p in self.paths]))
            for batch in self.stream_iterator(sents, order, pos):
                yield batch
        self._live = None


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

def _check_source_files(path, dataset):
    """Raise DataError for a missing directory or split file, or an empty one;
    return the files the corpus is built from ({role: path})."""
    if dataset in PLAIN_TEXT:
        files = _plain_text_files(path, dataset)
    else:
        files = _benchmark_files(path, dataset)
    for f in files.values():
        if os.path.getsize(f) == 0:
            fix = ('delete {} and run `bash getdata.sh {}` again'.format(path, dataset) if dataset not in PLAIN_TEXT
                   else 'give a file that holds text')
            raise DataError('{} is empty: {}'.format(f, fix))
    return files


def _benchmark_files(path, dataset):
    dirname = DATASETS[dataset][0]
    fix = '`bash getdata.sh {}` creates it ({}/ under the data root)'.format(dataset, dirname)
    if os.path.isfile(path):
        raise DataError('{} is a file; --dataset {} reads a directory: {}{}'.format(
            path, dataset, fix, _other_layouts(dataset)))
    if not os.path.isdir(path):
        raise DataError('data directory {} does not exist: {}'.format(path, fix))
    files = {split: os.path.join(path, split + '.txt') for split in SPLITS}
    if dataset == 'lm1b':  # training text is in the shards, found by _lm1b_train_paths
        files['vocab'] = os.path.join(path, DATASETS['lm1b'][1]['vocab_file'])
        del files['train']
    for role, f in files.items():
        if not os.path.isfile(f):
            names = [os.path.basename(files[r]) for r in files]
            found = _split_files(path, role) if role in SPLITS else []
            raise DataError('{} is missing: --dataset {} reads {} and {} there (`bash getdata.sh {}` creates '
                            'them in {}/ under the data root){}{}'.format(
                                f, dataset, ', '.join(names[:-1]), names[-1], dataset, dirname,
                                '; this directory has {}'.format(', '.join(map(os.path.basename, found)))
                                if found else '', _other_layouts(dataset)))
    return files


def _other_layouts(dataset):
    other = 'chars' if dataset in CHAR_LEVEL else 'words'
    return ('; text laid out otherwise (one file, or files named like ptb.train.txt) trains with --dataset '
            '{}'.format(other))


def _lm1b_train_paths(path):
    paths = sorted(glob.glob(os.path.join(path, LM1B_TRAIN)))
    if not paths:
        raise DataError('no lm1b training shards {} in {}: `bash getdata.sh lm1b` creates '
                        'them'.format(os.path.basename(LM1B_TRAIN), path))
    return paths


def _check_char_symbols(dataset, vocab, files):
    """enwik8 files hold decimal byte ids, text8 files single characters:
    anything else is the wrong file. Name the first line that shows it."""
    if dataset == 'enwik8':
        def ok(s):
            return s.isascii() and s.isdigit() and str(int(s)) == s and int(s) < 256
        what = 'is not a byte id (an integer 0-255, as prep_enwik8.py writes them)'
    else:
        def ok(s):
            return len(s) == 1
        what = 'is not a single character (as prep_text8.py writes them)'
    bad = [s for s in vocab.idx2sym if not ok(s)]
    if not bad:
        return
    bad = set(bad)
    for split in SPLITS:
        with open(files[split], encoding='utf-8') as f:
            for line_no, line in enumerate(f, 1):
                for sym in vocab.tokenize(line):
                    if sym in bad:
                        raise DataError('{} line {}: {!r} {}; is this a {} file?'.format(
                            files[split], line_no, sym, what, dataset))


# ---- any plain text: --dataset chars / words ---------------------------------

def _plain_text_files(path, dataset):
    """{'text': path} for one text file (split by _cut_splits), or {split: file} of a directory: train.txt,
    valid.txt and test.txt, or else the one file named *.train.*, *.valid.*, *.test.* (ptb.train.txt,
    wiki.train.tokens)."""
    if os.path.isfile(path):
        return {'text': path}
    wanted = ('--dataset {} reads one text file (split {}/{}/{} into train/valid/test) or a directory holding '
              'train.txt, valid.txt and test.txt (or one file each named *.train.*, *.valid.*, *.test.*)'.format(
                  dataset, *TEXT_SPLIT))
    if not os.path.isdir(path):
        raise DataError('{} does not exist: {}'.format(path, wanted))
    files = {}
    for split in SPLITS:
        plain = os.path.join(path, split + '.txt')
        found = [plain] if os.path.isfile(plain) else _split_files(path, split)
        if len(found) != 1:
            raise DataError('{} has {} for the {} split: {}'.format(
                path, 'no {}.txt and no *.{}.* file'.format(split, split) if not found else
                'several *.{}.* files ({})'.format(split, ', '.join(map(os.path.basename, found))), split, wanted))
        files[split] = found[0]
    return files


def _split_files(directory, split):
    """The files of `directory` named *.split.* (ptb.train.txt), sorted."""
    pattern = os.path.join(glob.escape(directory), '*.{}.*'.format(split))
    return sorted(f for f in glob.glob(pattern) if os.path.isfile(f))


def _cut_splits(ids):
    """One text's ids cut into contiguous train, valid and test blocks of TEXT_SPLIT percent of its tokens."""
    n_train, n_valid, _ = TEXT_SPLIT
    return np.split(ids, [len(ids) * n_train // 100, len(ids) * (n_train + n_valid) // 100])


def _plain_text_ids(files, dataset, vocab, given):
    """{split: ids} of a plain-text corpus. The vocabulary is counted from the training split (unless `given`:
    then vocab holds a model's symbols); valid and test symbols outside it are <unk>."""
    chars = dataset in CHAR_LEVEL
    first_seen = FirstSeen()  # provisional ids: every file of the corpus is tokenized once

    def read(path):
        pieces, _ = vocab.first_seen_ids(path, first_seen, add_eos=not chars, chars=chars)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    if 'text' in files:
        parts = dict(zip(SPLITS, _cut_splits(read(files['text']))))
    else:
        parts = {split: read(files[split]) for split in SPLITS}
    symbols = list(first_seen)
    if given:
        table = vocab.id_table(symbols)
    else:
        table = vocab.build_from_counts(symbols, np.bincount(parts['train'], minlength=len(symbols)))
    return {split: table[parts[split]] for split in SPLITS}


class Corpus(object):
    """A dataset's vocabulary and its three splits: `train`, `valid`, `test` are 1-D id tensors for an ordered
    corpus; for lm1b `train` is the list of training shard paths (read as training goes) and `valid`/`test`
    lists of one id tensor per sentence. Built by from_files (the text) or from_cache (get_lm_corpus does both)."""

    def __init__(self, dataset, vocab, train, valid, test):
        self.dataset = dataset
        self.vocab = vocab
        self.train, self.valid, self.test = train, valid, test

    @classmethod
    def from_files(cls, datadir, dataset, symbols=None, log=silent):
        """Read the dataset's files in `datadir` and count the vocabulary from them as the original did; with
        `symbols` (a model's vocabulary in id order) the ids are those instead."""
        if dataset not in DATASETS:
            raise DataError(_unknown_dataset(dataset))
        files = _check_source_files(datadir, dataset)
        vocab = Vocab(log=log, **_vocab_options(datadir, dataset))
        if symbols is not None:
            vocab.set_given_symbols(symbols)
        if dataset in PLAIN_TEXT:
            ids = _plain_text_ids(files, dataset, vocab, given=symbols is not None)
            for split in SPLITS:
                if len(ids[split]) < 2:
                    raise DataError('the {} split of {} holds {} tokens: it needs at least 2 (give more text)'.format(
                        split, files.get(split, datadir), len(ids[split])))
            return cls(dataset, vocab, *(torch.from_numpy(ids[split]) for split in SPLITS))
        if dataset not in ORDERED:  # lm1b: the vocabulary file; the training shards are read by the iterator
            train = _lm1b_train_paths(datadir)
            if symbols is None:
                vocab.build_vocab()
            held_out = [vocab.encode_file(files[split], ordered=False, add_double_eos=True)
                        for split in ('valid', 'test')]
            return cls(dataset, vocab, train, *held_out)
        add_eos = dataset not in CHAR_LEVEL
        if symbols is not None:
            ids = {files[s]: vocab.encode_file_ids(files[s], add_eos) for s in SPLITS}
        else:
            # as the original: count all three splits (wt103: train only), build the vocabulary, encode all
            # three; fused so each file is read once
            counted = [files[s] for s in (('train',) if dataset == 'wt103' else SPLITS)]
            others = [files[s] for s in SPLITS if files[s] not in counted]
            ids = vocab.build_and_encode(counted, others, add_eos=add_eos)
        if dataset in CHAR_LEVEL:
            _check_char_symbols(dataset, vocab, files)
        for split in SPLITS:
            if len(ids[files[split]]) < 2:
                raise DataError('{} holds no {} text'.format(files[split], dataset))
        return cls(dataset, vocab, *(torch.from_numpy(ids[files[split]]) for split in SPLITS))

    @classmethod
    def from_cache(cls, datadir, dataset, arrays, symbols, given=False):
        """The corpus from what corpus_cache.load returned (cache_arrays' arrays, the vocabulary's symbols);
        given: the symbols came with a model (from_files' `symbols`), not counted from the text."""
        vocab = Vocab(**_vocab_options(datadir, dataset))
        if given:
            vocab.set_given_symbols(symbols)
        else:
            vocab.set_symbols(symbols)
        if dataset in ORDERED:
            return cls(dataset, vocab, *(torch.from_numpy(arrays[split]) for split in SPLITS))
        held_out = [list(torch.from_numpy(arrays[split].astype(np.int64)).split(
            arrays[split + '.lengths'].tolist())) for split in ('valid', 'test')]
        return cls(dataset, vocab, _lm1b_train_paths(datadir), *held_out)

    def cache_arrays(self):
        """The corpus as named 1-D arrays for the cache: the ordered splits, or lm1b's held-out sentences as
        flat ids plus lengths ('valid' and 'valid.lengths')."""
        if self.dataset in ORDERED:
            return {split: getattr(self, split).numpy() for split in SPLITS}
        arrays = {}
        for split in ('valid', 'test'):
            sents = _Sentences.from_list(getattr(self, split))
            arrays[split] = sents.flat
            arrays[split + '.lengths'] = sents.lengths
        return arrays

    def check_batches(self, split, iterator, varlen=False):
        """Raise DataError (one line: the split, its size, what it needs) if `iterator` would yield no batch:
        a training loop would otherwise wait forever for one, and an evaluation divide by zero."""
        if split == 'train' and self.dataset not in ORDERED:
            return  # lm1b's training shards are read as training goes (each is checked to be non-empty)
        data, bsz = getattr(self, split), iterator.bsz
        if self.dataset in ORDERED:
            # bsz streams of at least 2 rows give one target; --varlen stops a row before the end
            rows = 3 if varlen else 2
            if len(data) >= rows * bsz:
                return
            size, need = '{} tokens'.format(len(data)), 'at least {} ({} rows of the batch)'.format(rows * bsz, rows)
        else:
            if next(iter(LMShuffledIterator(data, bsz, iterator.bptt)), None) is not None:
                return
            size = '{} sentences of {} tokens'.format(len(data), sum(len(x) for x in data))
            need = 'enough to fill {} columns of {} tokens'.format(bsz, iterator.bptt)
        raise DataError('the {} split has {}, too few for a batch of {}: it needs {}'.format(
            split, size, bsz, need))

    def get_iterator(self, split, *args, **kwargs):
        if split not in SPLITS:
            raise DataError('unknown split {!r}: choose one of {}'.format(split, ', '.join(SPLITS)))
        if self.dataset not in ORDERED and kwargs.pop('varlen', False):
            raise DataError('varlen needs an ordered corpus; {} is read as shuffled sentences'.format(self.dataset))
        if split == 'train':
            if self.dataset in ORDERED:
                return LMOrderedIterator(self.train, *args, **kwargs)
            kwargs['shuffle'] = True
            return LMMultiFileIterator(self.train, self.vocab, *args, **kwargs)
        data = self.valid if split == 'valid' else self.test
        if self.dataset in ORDERED:
            return LMOrderedIterator(data, *args, **kwargs)
        return LMShuffledIterator(data, *args, **kwargs)


def _unknown_dataset(dataset):
    return 'unknown dataset {!r}: choose one of {}'.format(dataset, ', '.join(DATASETS))


def _vocab_options(datadir, dataset):
    options = dict(DATASETS[dataset][1])
    if 'vocab_file' in options:
        options['vocab_file'] = os.path.join(datadir, options['vocab_file'])
    return options


def _cache_key(dataset, files, symbols=None):
    rules = DATASETS[dataset][1]
    if dataset in PLAIN_TEXT:
        rules = dict(rules, split=TEXT_SPLIT)
    return corpus_cache.cache_key(dataset, rules, files, symbols)


def _cache_place(datadir, dataset):
    """(directory, name) of a corpus's cache: in its data directory under the dataset's name; for one text
    file, beside it under the dataset's and the file's names (so that each file of a directory keeps its own)."""
    if os.path.isfile(datadir):
        return os.path.dirname(os.path.abspath(datadir)), '{}-{}'.format(dataset, os.path.basename(datadir))
    return datadir, dataset


def get_lm_corpus(datadir, dataset, symbols=None, log=silent):
    """The corpus of `dataset` in `datadir`, from its cache when there is one, else from the text (then cached:
    corpus_cache says where). `symbols`: the vocabulary in id order that a model came with (an imported
    checkpoint's), else it is counted from the text as the original did. log: a function taking a line, for
    what a user may want to know (cache loaded, built, damaged; the vocabulary's size)."""
    if dataset not in DATASETS:
        raise DataError(_unknown_dataset(dataset))
    key = _cache_key(dataset, _check_source_files(datadir, dataset), symbols)
    if os.path.exists(os.path.join(datadir, 'cache.pt')):
        log('Not loading {}: pickles can run code; using the plain-data cache'.format(
            os.path.join(datadir, 'cache.pt')))
    place, name = _cache_place(datadir, dataset)
    roots = corpus_cache.cache_roots(place)
    for root in roots:
        try:
            cached = corpus_cache.load(root, name, key)
        except corpus_cache.DamagedCache as err:
            log('Ignoring damaged cache {}; rebuilding it'.format(err))
            continue
        if cached is not None:
            log('Loading cached dataset from {}'.format(corpus_cache.cache_dir(root, name, key)))
            return Corpus.from_cache(datadir, dataset, *cached, given=symbols is not None)

    log('Producing dataset {}...'.format(dataset))
    corpus = Corpus.from_files(datadir, dataset, symbols=symbols, log=log)
    errors = []
    for root in roots:
        try:
            where = corpus_cache.save(root, name, key, corpus.cache_arrays(), corpus.vocab.idx2sym)
        except OSError as err:  # read-only corpus directory: try the next place
            errors.append('{}: {}'.format(root, err.strerror or err))
            continue
        log('Cached dataset in {}'.format(where))
        break
    else:
        log('Could not cache the dataset ({})'.format('; '.join(errors)))
    return corpus


if __name__ == '__main__':
    import argparse
    import sys
    parser = argparse.ArgumentParser(description='build (or load) a corpus and its cache')
    parser.add_argument('--datadir', type=str, default='../data/text8',
                        help='location of the data corpus')
    parser.add_argument('--dataset', type=str, default='text8', choices=list(DATASETS),
                        help='dataset name')
    args = parser.parse_args()
    try:
        corpus = get_lm_corpus(args.datadir, args.dataset, log=print)
    except DataError as err:
        print('error: {}'.format(err), file=sys.stderr)
        sys.exit(2)
    print('Vocab size : {}'.format(len(corpus.vocab.idx2sym)))
