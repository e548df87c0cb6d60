"""data_utils.py: every dataset's loader on real samples, the iterators
against the original's algorithms written out plainly, exact resume, the
plain-data cache, and the one-line errors for bad input."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data_utils
from data_utils import (DEFAULT_SEED, DataError, LMMultiFileIterator, LMOrderedIterator,
                        LMShuffledIterator, get_lm_corpus)
from utils import corpus_cache
from utils.datasets import DATASETS
from tests.sample_corpora import (listing, make_enwik8, make_lm1b, make_ptb, make_text8,
                                  make_wikitext)


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user-cache'))


@pytest.fixture(scope='module')
def ptb(tmp_path_factory):
    return get_lm_corpus(str(make_ptb(tmp_path_factory.mktemp('penn'))), 'ptb')


@pytest.fixture(scope='module')
def lm1b(tmp_path_factory):
    root, symbols = make_lm1b(tmp_path_factory.mktemp('lm1b'))
    return get_lm_corpus(str(root), 'lm1b'), symbols


def words_and_lines(path, lower=False):
    text = Path(path).read_text(encoding='utf-8')
    return (text.lower() if lower else text).split(), text.count('\n')


# ---- each dataset on a real sample -------------------------------------------------

def test_ptb(ptb, tmp_path):
    root = make_ptb(tmp_path / 'p')
    assert len(ptb.vocab) == 10000 and ptb.vocab.idx2sym[0] == '<eos>'
    for split in ('train', 'valid', 'test'):
        words, lines = words_and_lines(root / (split + '.txt'), lower=True)
        ids = getattr(ptb, split)
        assert ids.dtype == torch.int16 and len(ids) == len(words) + lines
        assert (ids == ptb.vocab.eos_idx).sum() == lines
        assert (ids == ptb.vocab.sym2idx['<unk>']).sum() == words.count('<unk>')
        assert ptb.vocab.convert_to_sent(ids[:5].tolist()) == ' '.join(words[:5])


@pytest.mark.parametrize('dataset,name', [('wt2', 'wikitext-2'), ('wt103', 'wikitext-103')])
def test_wikitext(tmp_path, dataset, name):
    root = make_wikitext(tmp_path / name, name)
    corpus = get_lm_corpus(str(root), dataset)
    train_words, _ = words_and_lines(root / 'train.txt')
    assert len(corpus.vocab) == len(set(train_words + words_and_lines(root / 'test.txt')[0]
                                        + ['<eos>']))
    words, lines = words_and_lines(root / 'valid.txt')
    assert (corpus.valid == corpus.vocab.eos_idx).sum() == lines
    unk = corpus.vocab.sym2idx['<unk>']
    assert (corpus.valid == unk).sum() == words.count('<unk>') > 0   # case kept: '<unk>' only


def test_enwik8_ids_are_the_bytes(tmp_path):
    root, parts = make_enwik8(tmp_path / 'enwik8')
    corpus = get_lm_corpus(str(root), 'enwik8')
    distinct = set(b''.join(parts)) - {ord('\n')}   # newlines vanish, as in the original
    assert sorted(int(s) for s in corpus.vocab.idx2sym) == sorted(distinct)
    for split, part in zip(('train', 'valid', 'test'), parts):
        ids = getattr(corpus, split)
        decoded = bytes(int(corpus.vocab.idx2sym[i]) for i in ids.tolist())
        assert decoded == part.replace(b'\n', b'')


def test_text8_ids_are_the_characters(tmp_path):
    root, parts = make_text8(tmp_path / 'text8')
    corpus = get_lm_corpus(str(root), 'text8')
    assert set(corpus.vocab.idx2sym) == set('abcdefghijklmnopqrstuvwxyz_')
    for split, part in zip(('train', 'valid', 'test'), parts):
        ids = getattr(corpus, split).tolist()
        assert ''.join(corpus.vocab.idx2sym[i] for i in ids) == part.strip().replace(' ', '_')


def test_lm1b(lm1b, tmp_path):
    corpus, symbols = lm1b
    assert corpus.vocab.idx2sym == symbols and corpus.vocab.unk_idx == symbols.index('<UNK>')
    assert [os.path.basename(p) for p in corpus.train] == [
        'news.en-{:05d}-of-00100'.format(k) for k in (1, 2, 3, 4)]
    lines = Path(corpus.vocab.vocab_file).with_name('valid.txt').read_text().split('\n')[:-1]
    assert len(corpus.valid) == len(lines)
    known = set(symbols)
    s = corpus.vocab.sym2idx['<S>']
    for sent, line in zip(corpus.valid, lines):
        words = line.split()
        assert sent.dtype == torch.int64 and sent[0] == s and sent[-1] == s
        assert len(sent) == len(words) + 2
        assert (sent == corpus.vocab.unk_idx).sum() == sum(w not in known for w in words)


# ---- the ordered iterator -----------------------------------------------------------

def test_ordered_batches_first_last_and_offset(ptb):
    ids = ptb.train.tolist()
    bsz, bptt = 10, 35
    it = ptb.get_iterator('train', bsz, bptt)
    batches = list(it)
    n_step = len(ids) // bsz
    assert len(batches) == it.n_batch == -(-n_step // bptt)
    # column j reads the j-th of bsz equal runs of the data
    first_data, first_target, seq_len = batches[0]
    assert seq_len == bptt and first_data.dtype == torch.int64
    assert first_data.tolist() == [[ids[j * n_step + t] for j in range(bsz)] for t in range(bptt)]
    assert first_target.tolist() == [[ids[j * n_step + t + 1] for j in range(bsz)]
                                     for t in range(bptt)]
    last_data, last_target, last_len = batches[-1]
    start = (len(batches) - 1) * bptt
    assert last_len == n_step - 1 - start
    assert last_target.tolist() == [[ids[j * n_step + t + 1] for j in range(bsz)]
                                    for t in range(start, n_step - 1)]
    for (d, t, _), (d2, _, _) in zip(batches, batches[1:]):
        assert torch.equal(d[1:], t[:-1]) and torch.equal(d2[0], t[-1])


def test_ext_len_prepends_context(ptb):
    it = ptb.get_iterator('valid', 4, 20, ext_len=7)
    batches = list(it)
    assert batches[0][0].shape == (20, 4)
    for (d, t, n), (prev, prev_t, _) in zip(batches[1:], batches):
        assert d.shape[0] == 7 + n and torch.equal(d[:7], prev[-7:])
        assert torch.equal(d[7], prev_t[-1])


def test_varlen_reproducible_and_covering(ptb):
    def run(seed):
        return [(d, t, n) for d, t, n in ptb.get_iterator('valid', 6, 30, seed=seed).get_varlen_iter()]

    it = ptb.get_iterator('valid', 6, 30)

    a, b, c = run(0), run(0), run(1)
    assert [n for *_, n in a] == [n for *_, n in b] != [n for *_, n in c]
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert all(5 <= n <= 30 + 3 * 5 for *_, n in a[:-1])
    # the targets cover every row after the first exactly once, in order
    assert torch.equal(torch.cat([t for _, t, _ in a]), it.data[1:1 + sum(n for *_, n in a)])


@pytest.mark.parametrize('varlen', [False, True])
def test_ordered_resume(ptb, varlen):
    it = ptb.get_iterator('valid', 5, 25)

    def batches(iterator):
        return iterator.get_varlen_iter() if varlen else iterator.get_fixlen_iter()

    it.rng.seed(3)
    full = list(batches(it))
    it.rng.seed(3)
    gen = batches(it)
    head = [next(gen) for _ in range(7)]
    state = json.loads(json.dumps(it.state_dict()))
    fresh = ptb.get_iterator('valid', 5, 25, seed=99)   # a restarted process
    fresh.load_state_dict(state)
    rest = list(batches(fresh))
    assert len(head) + len(rest) == len(full)
    for (d, t, n), (d2, t2, n2) in zip(head + rest, full):
        assert n == n2 and torch.equal(d, d2) and torch.equal(t, t2)
    fresh.rng.seed(3)                            # the next epoch starts at row 0 again
    assert torch.equal(next(batches(fresh))[1], full[0][1])


def test_seeded_varlen_iterator_owns_its_rng_and_resumes_from_its_state(ptb):
    """With a seed, varlen draws from the iterator's own RandomState: the lengths of numpy's RNG seeded alike
    (the original's global RNG after np.random.seed(3), written out here), the global RNG untouched, and
    state_dict/load_state_dict alone resume exactly."""
    rng, want, i = np.random.RandomState(3), [], 0
    while i < ptb.valid.size(0) // 5 - 2:                  # the original's get_varlen_iter, lengths only
        bptt = 25 if rng.random() < 0.95 else 25 / 2.
        n = min(min(25 + 3 * 5, max(5, int(rng.normal(bptt, 5)))), ptb.valid.size(0) // 5 - 1 - i)
        want.append(n)
        i += n
    original = list(ptb.get_iterator('valid', 5, 25, varlen=True, seed=3))
    assert [n for *_, n in original] == want
    original = as_lists(original)
    np.random.seed(0)
    it = ptb.get_iterator('valid', 5, 25, varlen=True, seed=3)
    gen = iter(it)
    head = [next(gen) for _ in range(7)]
    assert np.random.random() == np.random.RandomState(0).random()  # the global RNG drew nothing
    fresh = ptb.get_iterator('valid', 5, 25, varlen=True, seed=99)
    fresh.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert as_lists(head) + as_lists(fresh) == original
    assert torch.equal(next(iter(fresh))[0][:5], it.data[:5])  # then a new epoch, from row 0


def test_seeded_multifile_iterator_gives_the_global_rngs_epochs_and_resumes(lm1b):
    corpus, _ = lm1b
    np.random.seed(4)
    want = ref_multifile(corpus, 4, 9, epochs=2)          # numpy's global RNG, as the original
    it = corpus.get_iterator('train', 4, 9, seed=4)
    original = as_lists(it) + as_lists(it)
    assert original == want
    it = corpus.get_iterator('train', 4, 9, seed=4)
    np.random.seed(1234)
    gen = iter(it)
    head = [next(gen) for _ in range(60)]
    fresh = corpus.get_iterator('train', 4, 9, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(it.state_dict())))
    assert as_lists(head) + as_lists(fresh) + as_lists(fresh) == original
    with pytest.raises(DataError, match='varlen needs an ordered corpus'):
        corpus.get_iterator('train', 4, 9, varlen=True)


def test_an_iterator_without_a_seed_has_its_own_rng(lm1b):
    """No seed: RandomState(DEFAULT_SEED) of its own (the batches of a seed=DEFAULT_SEED iterator); numpy's global
    RNG is neither read nor moved."""
    corpus, _ = lm1b
    np.random.seed(0)
    unseeded = as_lists(corpus.get_iterator('train', 4, 9))
    assert np.random.random() == np.random.RandomState(0).random()
    np.random.seed(1)
    assert unseeded == as_lists(corpus.get_iterator('train', 4, 9, seed=DEFAULT_SEED))
    assert unseeded != as_lists(corpus.get_iterator('train', 4, 9, seed=DEFAULT_SEED + 1))


def test_fixlen_start_is_a_row_offset(ptb):
    it = ptb.get_iterator('valid', 5, 25)
    assert torch.equal(next(it.get_fixlen_iter(start=50))[0], it.data[50:75])


# ---- shuffled and multi-file iterators, against the original's stream_iterator -------

def ref_stream(sents, bsz, bptt, ext_len=0):
    """The original stream_iterator, element by element: column i takes the
    next sentence when its current one has at most one token left."""
    sents, streams, retained, out = iter(sents), [None] * bsz, [], []
    while True:
        data = [[None] * bsz for _ in range(bptt)]
        target = [[None] * bsz for _ in range(bptt)]
        for i in range(bsz):
            filled = 0
            while filled < bptt:
                if streams[i] is None or len(streams[i]) <= 1:
                    try:
                        streams[i] = list(next(sents))
                    except StopIteration:
                        return out
                n_new = min(len(streams[i]) - 1, bptt - filled)
                for k in range(n_new):
                    data[filled + k][i] = streams[i][k]
                    target[filled + k][i] = streams[i][k + 1]
                streams[i] = streams[i][n_new:]
                filled += n_new
        data = retained + data
        out.append((data, target))
        keep = min(len(data), ext_len)
        retained = data[len(data) - keep:] if keep else []


def as_lists(batches):
    return [(d.tolist(), t.tolist()) for d, t, _ in batches]


@pytest.mark.parametrize('shuffle,ext_len', [(False, 0), (True, 0), (True, 2)])
def test_shuffled_matches_reference(lm1b, shuffle, ext_len):
    corpus, _ = lm1b
    np.random.seed(5)
    order = np.random.permutation(len(corpus.valid)) if shuffle else range(len(corpus.valid))
    want = ref_stream([corpus.valid[i] for i in order], 3, 6, ext_len)
    got = as_lists(LMShuffledIterator(corpus.valid, 3, 6, ext_len=ext_len, shuffle=shuffle, seed=5))
    assert got == want and len(got) > 100


def ref_multifile(corpus, bsz, bptt, epochs):
    paths, out = list(corpus.train), []
    for _ in range(epochs):
        np.random.shuffle(paths)
        for path in paths:
            sents = [[corpus.vocab.get_idx(s) for s in ['<S>'] + line.split() + ['<S>']]
                     for line in open(path, encoding='utf-8')]
            np.random.shuffle(sents)
            out += ref_stream(sents, bsz, bptt)
    return out


def test_multifile_matches_reference_over_two_epochs(lm1b):
    corpus, _ = lm1b
    np.random.seed(11)
    want = ref_multifile(corpus, 4, 9, epochs=2)
    it = corpus.get_iterator('train', 4, 9, seed=11)
    assert isinstance(it, LMMultiFileIterator)
    assert as_lists(it) + as_lists(it) == want


@pytest.mark.parametrize('stop', [1, 37, 60])
def test_multifile_resumes_exactly(lm1b, stop):
    """Stop after `stop` batches (60 is past the first file), save the
    position as plain data, restore into a fresh iterator: the rest of the
    epoch and the next epoch are what an uninterrupted run gives."""
    corpus, _ = lm1b
    it = corpus.get_iterator('train', 4, 9, seed=4)
    full = as_lists(it) + as_lists(it)

    it = corpus.get_iterator('train', 4, 9, seed=4)
    gen = iter(it)
    head = [next(gen) for _ in range(stop)]
    state = json.loads(json.dumps(it.state_dict()))
    fresh = corpus.get_iterator('train', 4, 9, seed=1234)
    fresh.load_state_dict(state)
    assert as_lists(head) + as_lists(fresh) + as_lists(fresh) == full


def test_shuffled_resume_and_idle_state(lm1b):
    corpus, _ = lm1b
    it = LMShuffledIterator(corpus.valid, 3, 6, ext_len=2, shuffle=True)
    idle = it.state_dict()     # between epochs: no position, and the RNG the next shuffle draws from
    assert idle == {'position': None, 'rng': data_utils._plain_rng_state(np.random.RandomState(DEFAULT_SEED))}
    it.rng.seed(8)
    full = as_lists(it)
    it.rng.seed(8)
    gen = iter(it)
    head = [next(gen) for _ in range(25)]
    fresh = LMShuffledIterator(corpus.valid, 3, 6, ext_len=2, shuffle=True, seed=77)
    fresh.load_state_dict(json.loads(json.dumps(it.state_dict())))   # the saved epoch replays its own shuffle
    assert as_lists(head) + as_lists(fresh) == full
    bad = LMShuffledIterator(corpus.valid, 5, 6)
    bad.load_state_dict(it.state_dict())
    with pytest.raises(DataError, match='batch size 3, not 5'):
        next(iter(bad))


def test_get_iterator_kinds_and_bad_split(ptb, lm1b):
    assert isinstance(ptb.get_iterator('test', 2, 3), LMOrderedIterator)
    assert isinstance(lm1b[0].get_iterator('valid', 2, 3), LMShuffledIterator)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ptb.get_iterator('dev', 2, 3)
    with pytest.raises(DataError, match='not a saved position'):
        ptb.get_iterator('test', 2, 3).load_state_dict({'pos': 3})


# ---- the cache -----------------------------------------------------------------------

def cache_dirs(root):
    return sorted(p.name for p in Path(root).iterdir() if p.name.startswith('cache-'))


def logged_corpus(root, dataset):
    """get_lm_corpus, and what it reported through its log function (one string)."""
    said = []
    return get_lm_corpus(str(root), dataset, log=said.append), '\n'.join(said)


def test_cache_round_trip_is_plain_data(tmp_path, capsys):
    root, _ = make_enwik8(tmp_path / 'enwik8')
    built, said = logged_corpus(root, 'enwik8')
    assert 'Cached dataset in {}'.format(root) in said
    assert 'final vocab size' in said                 # the vocabulary's report goes to the same log
    assert capsys.readouterr().out == ''              # and nothing to stdout
    (cache,) = cache_dirs(root)
    files = sorted(os.listdir(root / cache))
    assert files == ['meta.json', 'test.npy', 'train.npy', 'valid.npy', 'vocab.json']
    assert np.load(root / cache / 'train.npy', allow_pickle=False).dtype == np.uint8
    loaded, said = logged_corpus(root, 'enwik8')
    assert 'Loading cached dataset from {}'.format(root / cache) in said
    assert loaded.vocab.idx2sym == built.vocab.idx2sym
    for split in ('train', 'valid', 'test'):
        a, b = getattr(loaded, split), getattr(built, split)
        assert a.dtype == b.dtype == torch.int16 and torch.equal(a, b)


def test_a_cache_in_the_format_written_so_far_loads_as_it_is(tmp_path):
    """The on-disk format written out by hand (format 2: ids as .npy in the smallest unsigned type, vocab.json,
    meta.json with each array's length, size and mtime and vocab.json's sha256; the key a hash of the dataset, its
    vocabulary rules and the sources' names, sizes and mtimes): caches written by earlier versions load, unbuilt."""
    root, _ = make_enwik8(tmp_path / 'enwik8')
    described = {'format': 2, 'dataset': 'enwik8', 'vocab': DATASETS['enwik8'][1], 'files': sorted(
        [s, s + '.txt', (root / (s + '.txt')).stat().st_size, (root / (s + '.txt')).stat().st_mtime_ns]
        for s in ('train', 'valid', 'test'))}
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode('utf-8')).hexdigest()[:16]
    cache = root / 'cache-enwik8-{}'.format(key)
    cache.mkdir()
    symbols = ['65', '66', '67']  # not what the text holds: a rebuild would show
    arrays = {'train': [0, 1, 2, 1, 0], 'valid': [2, 1, 0], 'test': [1, 1, 2]}
    for name, ids in arrays.items():
        np.save(cache / (name + '.npy'), np.array(ids, np.uint8))
    (cache / 'vocab.json').write_text(json.dumps(symbols))
    (cache / 'meta.json').write_text(json.dumps({
        'format': 2, 'dataset': 'enwik8', 'key': key, 'vocab_size': 3,
        'arrays': {name: len(ids) for name, ids in arrays.items()},
        'stamps': {name: [(cache / (name + '.npy')).stat().st_size, (cache / (name + '.npy')).stat().st_mtime_ns]
                   for name in arrays},
        'vocab_sha256': hashlib.sha256((cache / 'vocab.json').read_bytes()).hexdigest()}))
    corpus, said = logged_corpus(root, 'enwik8')
    assert 'Loading cached dataset from {}'.format(cache) in said
    assert corpus.vocab.idx2sym == symbols
    assert {name: getattr(corpus, name).tolist() for name in arrays} == arrays


def test_lm1b_cache_round_trip(lm1b):
    corpus, symbols = lm1b
    root = Path(corpus.vocab.vocab_file).parent
    loaded = get_lm_corpus(str(root), 'lm1b')
    assert loaded.vocab.idx2sym == symbols and loaded.vocab.unk_idx == corpus.vocab.unk_idx
    assert loaded.train == corpus.train
    assert all(torch.equal(a, b) for a, b in zip(loaded.valid, corpus.valid))


def test_changed_source_rebuilds_and_drops_the_stale_cache(tmp_path):
    root = make_ptb(tmp_path / 'penn')
    first = get_lm_corpus(str(root), 'ptb')
    old = cache_dirs(root)
    with open(root / 'valid.txt', 'a') as f:
        f.write(' brandnewword\n')
    second, said = logged_corpus(root, 'ptb')
    assert 'Producing dataset ptb' in said
    assert len(second.vocab) == len(first.vocab) + 1
    assert len(cache_dirs(root)) == 1 and cache_dirs(root) != old


def test_dataset_name_is_part_of_the_key(tmp_path):
    root = make_ptb(tmp_path / 'penn')
    ptb_corpus = get_lm_corpus(str(root), 'ptb')
    wt2_corpus = get_lm_corpus(str(root), 'wt2')        # same files, case kept
    assert len(cache_dirs(root)) == 2
    assert ptb_corpus.vocab.lower_case and not wt2_corpus.vocab.lower_case


@pytest.mark.parametrize('damage', ['truncate', 'vocab', 'empty', 'swapped symbols', 'edited ids'])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    """Also the damage that keeps every size: an edited vocab.json of the same length or an edited .npy."""
    root, _ = make_enwik8(tmp_path / 'enwik8')
    built = get_lm_corpus(str(root), 'enwik8')
    cache = root / cache_dirs(root)[0]
    data = (cache / 'train.npy').read_bytes()
    vocab = json.loads((cache / 'vocab.json').read_text())
    if damage == 'truncate':
        (cache / 'train.npy').write_bytes(data[:len(data) // 2])
    elif damage == 'vocab':
        (cache / 'vocab.json').write_text(json.dumps(vocab[:-1]))
    elif damage == 'empty':
        (cache / 'train.npy').write_bytes(b'')
    elif damage == 'swapped symbols':
        vocab[0], vocab[1] = vocab[1], vocab[0]
        (cache / 'vocab.json').write_text(json.dumps(vocab))
    else:  # the same size, ids still in the vocabulary
        (cache / 'train.npy').write_bytes(data[:-1] + bytes([data[-2]]))
    again, said = logged_corpus(root, 'enwik8')
    assert 'Ignoring damaged cache' in said
    assert torch.equal(again.train, built.train)
    assert get_lm_corpus(str(root), 'enwik8').vocab.idx2sym == built.vocab.idx2sym


def test_interrupted_build_leaves_no_loadable_cache(tmp_path, monkeypatch):
    root, _ = make_enwik8(tmp_path / 'enwik8')

    def killed(path, obj):
        raise KeyboardInterrupt

    write_json = corpus_cache._write_json
    monkeypatch.setattr(corpus_cache, '_write_json', killed)
    with pytest.raises(KeyboardInterrupt):
        get_lm_corpus(str(root), 'enwik8')
    assert cache_dirs(root) == []
    monkeypatch.setattr(corpus_cache, '_write_json', write_json)
    # a build killed harder (SIGKILL) leaves its temporary directory: removed once dead
    key = data_utils._cache_key('enwik8', data_utils._check_source_files(str(root), 'enwik8'))
    dead = root / 'cache-enwik8-{}.tmp999999999-x'.format(key)
    alive = root / 'cache-enwik8-{}.tmp{}-y'.format(key, os.getpid())
    dead.mkdir()
    alive.mkdir()
    get_lm_corpus(str(root), 'enwik8')
    assert cache_dirs(root) == sorted(['cache-enwik8-' + key, alive.name])


def test_unwritable_corpus_dir_uses_the_user_cache(tmp_path, monkeypatch):
    root, _ = make_enwik8(tmp_path / 'enwik8')
    real_mkdtemp = corpus_cache.tempfile.mkdtemp

    def read_only(prefix, dir):
        if Path(dir) == root:
            raise PermissionError(13, 'Permission denied')
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(corpus_cache.tempfile, 'mkdtemp', read_only)
    _, said = logged_corpus(root, 'enwik8')
    assert 'Cached dataset in {}'.format(tmp_path / 'user-cache' / 'transformer-xl-moe') in said
    assert cache_dirs(root) == []
    _, said = logged_corpus(root, 'enwik8')
    assert 'Loading cached dataset from {}'.format(tmp_path / 'user-cache') in said


def test_original_pickle_cache_is_never_loaded(tmp_path):
    root, _ = make_enwik8(tmp_path / 'enwik8')
    (root / 'cache.pt').write_bytes(b'not a pickle; loading it would fail loudly')
    _, said = logged_corpus(root, 'enwik8')
    assert 'Not loading' in said


# ---- bad input: one line naming the file; nothing written ------------------------------

def broken(tmp_path, dataset, edit):
    if dataset == 'enwik8':
        root, _ = make_enwik8(tmp_path / 'enwik8')
    elif dataset == 'text8':
        root, _ = make_text8(tmp_path / 'text8')
    elif dataset == 'lm1b':
        root, _ = make_lm1b(tmp_path / 'lm1b')
    else:
        root = make_wikitext(tmp_path / 'wt103', 'wikitext-103')
    edit(root)
    return root


def insert_line(name, line_no, text):
    def edit(root):
        lines = (root / name).read_text().split('\n')
        lines.insert(line_no - 1, text)
        (root / name).write_text('\n'.join(lines))
    return edit


BAD_INPUT = [
    ('enwik8', lambda r: (r / 'valid.txt').unlink(),
     r"enwik8/valid.txt is missing: --dataset enwik8 reads train.txt, valid.txt and test.txt there "
     r"\(`bash getdata.sh enwik8` creates them in enwik8/ under the data root\); text laid out otherwise "
     r"\(one file, or files named like ptb.train.txt\) trains with --dataset chars$"),
    ('enwik8', lambda r: (r / 'test.txt').write_text(''),
     r'enwik8/test.txt is empty'),
    ('enwik8', lambda r: (r / 'valid.txt').write_text('\n \n\n'),
     r'enwik8/valid.txt holds no enwik8 text'),
    ('enwik8', insert_line('valid.txt', 3, '60 61 abc 62'),
     r"enwik8/valid.txt line 3: 'abc' is not a byte id"),
    ('enwik8', insert_line('train.txt', 2, '60 300'),
     r"enwik8/train.txt line 2: '300' is not a byte id"),
    ('text8', insert_line('test.txt', 1, 'a b cd'),
     r"text8/test.txt line 1: 'cd' is not a single character"),
    ('wt103', insert_line('test.txt', 5, 'a zzzunseenword'),
     r"wt103/test.txt line 5: 'zzzunseenword' is not in the vocabulary"),
    ('wt103', lambda r: (r / 'valid.txt').write_bytes(b'ok\n\xfe\xff\n'),
     r'wt103/valid.txt line 2: not UTF-8'),
    ('lm1b', lambda r: (r / '1b_word_vocab.txt').write_text('<S> 1\nthe 1\n'),
     r'1b_word_vocab.txt does not match'),
    ('lm1b', lambda r: shutil.rmtree(next(r.glob('1-billion*')) / 'training-monolingual.tokenized.shuffled'),
     r'no lm1b training shards news.en-\* in'),
]


@pytest.mark.parametrize('dataset,edit,message', BAD_INPUT)
def test_bad_input_message_and_nothing_written(tmp_path, dataset, edit, message):
    root = broken(tmp_path, dataset, edit)
    before = listing(root)
    with pytest.raises(DataError, match=message) as err:
        get_lm_corpus(str(root), dataset)
    assert '\n' not in str(err.value)
    assert listing(root) == before


def test_missing_directory_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match=r'data directory .*nowhere does not exist: '
                                        r'`bash getdata.sh wt103` creates it \(wikitext-103/'):
        get_lm_corpus(str(tmp_path / 'nowhere'), 'wt103')
    with pytest.raises(DataError, match="unknown dataset 'wt3': choose one of enwik8, text8, "
                                        "wt103, wt2, ptb, lm1b"):
        get_lm_corpus(str(tmp_path), 'wt3')


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError) and data_utils.DataError is DataError


def test_multifile_position_survives_a_moved_data_dir(lm1b, tmp_path):
    corpus, _ = lm1b
    it = corpus.get_iterator('train', 4, 9, seed=6)
    gen = iter(it)
    for _ in range(5):
        next(gen)
    state = json.loads(json.dumps(it.state_dict()))
    assert all(os.sep not in name for name in state['position']['paths'])
    rest = as_lists(gen)                  # the uninterrupted run
    moved = tmp_path / 'moved'
    shutil.copytree(os.path.dirname(corpus.train[0]), moved)
    fresh = LMMultiFileIterator(sorted(str(p) for p in moved.iterdir()), corpus.vocab, 4, 9,
                                shuffle=True, seed=0)
    fresh.load_state_dict(state)
    assert as_lists(fresh) == rest
    other = LMMultiFileIterator(corpus.train[:2], corpus.vocab, 4, 9, shuffle=True)
    other.load_state_dict(state)
    with pytest.raises(DataError, match='other training files than the 2 in'):
        next(iter(other))
