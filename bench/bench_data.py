#!/usr/bin/env python
"""Data pipeline benchmark.

1. Tokenizing + encoding WikiText-format text on one core: our block
   tokenizer vs the original's per-line Python loop (Vocab.tokenize per line,
   Counter.update per line, one LongTensor per line, torch.cat), side by side
   on the same text, same vocabulary and ids checked equal.
2. A WikiText-103-size corpus (103M tokens, ~267k word types, made by
   repeating the WikiText-103 valid/test samples with a share of the rare
   words renamed per copy so the vocabulary grows like the real one's):
   building it and its cache, then loading the cache in a fresh process:
   load time, bytes per token of the id arrays, peak memory.

    python bench/bench_data.py [--json out.json] [--tokens 103227021] [--speed-tokens 5000000]
                               [--original-vocab ORIGINAL/pytorch/utils/vocabulary.py]

Needs the shared samples (../shared/data/wikitext-103); writes ~1.3 GB in a
temporary directory (removed at the end) and peaks around 2 GB of memory.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLES = REPO / '..' / 'shared' / 'data' / 'wikitext-103'
WT103_TRAIN_TOKENS = 103227021      # WikiText-103 train, <eos> included
WT103_TYPES = 267735


def pin_to_one_core():
    import torch
    torch.set_num_threads(1)
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


class Timer(object):
    """Wall and CPU seconds: on a shared machine the CPU time is what one core
    spent, the honest single-core figure; the wall time includes waiting."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the corpus ------------------------------------------------------------------

def base_lines():
    lines = []
    for name in ('wiki.valid.tokens', 'wiki.test.tokens'):
        path = SAMPLES / name
        if not path.exists():
            sys.exit('bench_data.py: error: {} is missing: the benchmark repeats the shared '
                     'WikiText-103 samples'.format(path))
        lines += path.read_text(encoding='utf-8').split('\n')[:-1]
    return lines


def write_wikitext(path, n_tokens, target_types=WT103_TYPES):
    """WikiText-format text of about n_tokens tokens (one <eos> per line
    included): copies of the samples in which some words seen once are renamed
    per copy, so that the number of word types approaches target_types."""
    lines = base_lines()
    per_copy = sum(len(line.split()) + 1 for line in lines)
    copies = -(-n_tokens // per_copy)
    counts = Counter(w for line in lines for w in line.split())
    base_types = len(counts)
    hapax = {w for w, c in counts.items() if c == 1}
    where = [(i, w) for i, line in enumerate(lines) for w in line.split() if w in hapax]
    renamed = min(len(where), max(0, (target_types - base_types) // max(copies - 1, 1)))
    with open(path, 'w', encoding='utf-8') as f:
        for k in range(copies):
            copy = list(lines)
            if k:   # copy 0 is the samples as they are
                for i, w in where[:renamed]:
                    copy[i] = copy[i].replace(' {} '.format(w), ' {}@{} '.format(w, k), 1)
            f.write('\n'.join(copy) + '\n')
    return copies * per_copy


# ---- 1. tokenize + encode speed, ours vs the per-line loop ------------------------------

def per_line_build(path):
    """The original's loop: one tokenize(), Counter.update() and LongTensor per line."""
    import torch
    from utils.vocabulary import Vocab
    vocab = Vocab(special=['<eos>'], lower_case=False)
    with open(path, 'r', encoding='utf-8') as f:
        for line in f:
            vocab.counter.update(vocab.tokenize(line))
    vocab.build_vocab()
    with open(path, 'r', encoding='utf-8') as f:
        encoded = [vocab.convert_to_tensor(vocab.tokenize(line, add_eos=True)) for line in f]
    return vocab, torch.cat(encoded)


def two_pass_build(path):
    """count_file, build_vocab, encode_file_ids: our block tokenizer, file read twice."""
    from utils.vocabulary import Vocab
    vocab = Vocab(special=['<eos>'], lower_case=False)
    vocab.count_file(str(path))
    vocab.build_vocab()
    return vocab, vocab.encode_file_ids(str(path))


def one_pass_build(path):
    """build_and_encode, what Corpus uses: the file is tokenized once."""
    from utils.vocabulary import Vocab
    vocab = Vocab(special=['<eos>'], lower_case=False)
    return vocab, vocab.build_and_encode([str(path)])[str(path)]


def original_code_build(vocabulary_py):
    """The original utils/vocabulary.py itself, imported from a path given on
    the command line (it is not part of this repository)."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location('original_vocabulary', vocabulary_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def build(path):
        with contextlib.redirect_stdout(io.StringIO()):  # the original prints as it goes
            vocab = module.Vocab(special=['<eos>'], lower_case=False)
            vocab.count_file(str(path))
            vocab.build_vocab()
            return vocab, vocab.encode_file(str(path), ordered=True)
    return build


BUILDS = (('per-line loop, as original', per_line_build),
          ('blocks, two passes', two_pass_build),
          ('blocks, one pass (ours)', one_pass_build))


def speed(workdir, n_tokens, original_vocabulary=None):
    path = workdir / 'speed.txt'
    n = write_wikitext(path, n_tokens, target_types=0)
    results, reference = {}, None
    builds = list(BUILDS)
    if original_vocabulary:
        builds.insert(1, ('original code itself', original_code_build(original_vocabulary)))
    for name, build in builds:
        with Timer() as t:
            vocab, ids = build(path)
        results[name] = dict(tokens=len(ids), vocab=len(vocab), wall_s=t.wall, cpu_s=t.cpu,
                             tokens_per_cpu_s=len(ids) / t.cpu)
        ids = ids.numpy() if hasattr(ids, 'numpy') else ids
        if reference is None:
            reference = (vocab.idx2sym, ids)
        assert vocab.idx2sym == reference[0] and (ids == reference[1]).all(), name + ' differs'
    path.unlink()
    return n, results


# ---- 2. WikiText-103 size: build the cache, load it ---------------------------------------

def child(mode, datadir):
    """Runs in a fresh process: build or load the corpus, report time and memory."""
    import data_utils
    pin_to_one_core()
    base = rss_mb()
    said = []
    with Timer() as t:
        corpus = data_utils.get_lm_corpus(datadir, 'wt103', log=said.append)
    assert any(line.startswith('Loading cached') for line in said) == (mode == 'load'), said
    n = len(corpus.train)
    ids_bytes = sum(getattr(corpus, s).element_size() * len(getattr(corpus, s))
                    for s in ('train', 'valid', 'test'))
    n_all = n + len(corpus.valid) + len(corpus.test)
    # touch every page: memory-mapped ids count once they are read, as training reads them
    checksum = int(corpus.train[::4096].sum())
    print(json.dumps(dict(
        wall_s=t.wall, cpu_s=t.cpu, train_tokens=n, vocab=len(corpus.vocab), dtype=str(corpus.train.dtype),
        ids_bytes_per_token=ids_bytes / n_all, rss_growth_mb=rss_mb() - base,
        peak_growth_mb=peak_rss_mb() - base, rss_bytes_per_token=(rss_mb() - base) * 2 ** 20 / n_all,
        tokens_per_cpu_s=n_all / t.cpu, checksum=checksum)))


def run_child(mode, datadir):
    r = subprocess.run([sys.executable, __file__, '--child', mode, '--data', str(datadir)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit('bench_data.py: the {} step failed:\n{}'.format(mode, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


def full_size(workdir, n_tokens):
    datadir = workdir / 'wikitext-103'
    datadir.mkdir()
    t0 = time.perf_counter()
    write_wikitext(datadir / 'train.txt', n_tokens)
    for split in ('valid', 'test'):
        shutil.copy(SAMPLES / 'wiki.{}.tokens'.format(split), datadir / (split + '.txt'))
    written_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in datadir.iterdir())
    build = run_child('build', datadir)
    loads = [run_child('load', datadir) for _ in range(2)]
    cache_bytes = sum(f.stat().st_size for d in datadir.glob('cache-*') for f in d.iterdir())
    return dict(text_bytes=size, write_s=written_s, build=build, load=min(
        loads, key=lambda r: r['wall_s']), cache_bytes=cache_bytes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--json', help='also write the figures to this JSON file')
    p.add_argument('--tokens', type=int, default=WT103_TRAIN_TOKENS,
                   help='size of the WikiText-103-size corpus (default: %(default)s)')
    p.add_argument('--speed-tokens', type=int, default=5000000,
                   help='text for the side-by-side speed test (default: %(default)s)')
    p.add_argument('--workdir', help='where to write the corpora (default: a temporary dir)')
    p.add_argument('--original-vocab', metavar='PATH',
                   help="also time the original's utils/vocabulary.py, from a checkout of "
                        'kimiyoung/transformer-xl (pytorch/utils/vocabulary.py)')
    p.add_argument('--child', choices=['build', 'load'], help=argparse.SUPPRESS)
    p.add_argument('--data', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.data)

    pin_to_one_core()
    workdir = Path(tempfile.mkdtemp(prefix='bench_data-', dir=args.workdir))
    try:
        n_speed, speeds = speed(workdir, args.speed_tokens, args.original_vocab)
        full = full_size(workdir, args.tokens)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    base, ours = speeds[BUILDS[0][0]], speeds[BUILDS[-1][0]]
    print('\n1. Tokenize + count + encode {:.1f}M WikiText-format tokens on one core '
          '(load average {:.1f} on {} cores: CPU seconds are the single-core figure)'.format(
              n_speed / 1e6, os.getloadavg()[0], os.cpu_count()))
    print('{:<28}{:>8}{:>8}{:>16}{:>8}'.format('', 'wall s', 'CPU s', 'tokens/CPU-s', 'ratio'))
    for name, r in speeds.items():
        print('{:<28}{:>8.2f}{:>8.2f}{:>16,.0f}{:>7.1f}x'.format(
            name, r['wall_s'], r['cpu_s'], r['tokens_per_cpu_s'],
            r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']))
    print('target >= 2,000,000 tokens/s on one core: {}'.format(
        'met' if ours['tokens_per_cpu_s'] >= 2e6 else 'NOT met'))

    b, l = full['build'], full['load']
    print('\n2. WikiText-103 size: {:,} train tokens, {:,} word types, {:.0f} MB of text'.format(
        b['train_tokens'], b['vocab'], full['text_bytes'] / 2 ** 20))
    print('build corpus + cache: {:.1f} s wall, {:.1f} s CPU ({:,.0f} tokens/CPU-s), '
          'peak memory +{:.0f} MB'.format(b['wall_s'], b['cpu_s'], b['tokens_per_cpu_s'],
                                          b['peak_growth_mb']))
    print('cache on disk: {:.0f} MB ({:.2f} bytes/token)'.format(
        full['cache_bytes'] / 2 ** 20, full['cache_bytes'] / b['train_tokens']))
    print('load from cache: {:.2f} s wall, {:.2f} s CPU (target < 5 s: {})'.format(
        l['wall_s'], l['cpu_s'], 'met' if l['wall_s'] < 5 else 'NOT met'))
    print('in memory: ids {} = {:.2f} bytes/token (target <= 4: {}; the original: int64 = 8); '
          'whole process growth incl. vocabulary {:.2f} bytes/token, peak +{:.0f} MB'.format(
              l['dtype'], l['ids_bytes_per_token'],
              'met' if l['ids_bytes_per_token'] <= 4 else 'NOT met', l['rss_bytes_per_token'],
              l['peak_growth_mb']))

    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(speed_tokens=n_speed, speed=speeds, wt103_size=full), f, indent=2)
        print('\nwrote {}'.format(args.json))


if __name__ == '__main__':
    main()
