"""Corpus directories for the data tests, laid out as getdata.sh leaves them,
made from the real samples: the committed samples/enwik8-sample.zip and, when
present, ../shared/data (PTB, WikiText, One Billion Word held-out text).

The formats are written out here independently of the prep scripts (the
original's one-line expressions), so the tests can compare against them."""

import functools
import re
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / '..' / 'shared' / 'data'
ENWIK8_SAMPLE = REPO / 'samples' / 'enwik8-sample.zip'
LM1B_TREE = '1-billion-word-language-modeling-benchmark-r13output'


def shared(rel):
    path = SHARED / rel
    if not path.exists():
        pytest.skip('shared sample data not present: {}'.format(path))
    return path


def enwik8_bytes():
    return zipfile.ZipFile(ENWIK8_SAMPLE).read('enwik8')


def split3(data, n_valid, n_test):
    n_train = len(data) - n_valid - n_test
    return data[:n_train], data[n_train:n_train + n_valid], data[n_train + n_valid:]


def enwik8_format(part):
    return ' '.join(str(c) if c != ord('\n') else '\n' for c in part)


def text8_format(part):
    return ' '.join('_' if c == ' ' else c for c in part.strip())


def wikifil(xml):
    """text8's filter, roughly (Matt Mahoney's wikifil.pl): the article text
    only, lower-case letters and single spaces, digits spelled out."""
    text = ' '.join(re.findall(r'<text[^>]*>(.*?)</text>', xml, flags=re.S))
    text = re.sub(r'<ref[^<]*</ref>|<[^>]*>|\{\{[^}]*\}\}|&[a-z]+;', ' ', text).lower()
    for digit, word in enumerate('zero one two three four five six seven eight nine'.split()):
        text = text.replace(str(digit), ' {} '.format(word))
    return ' ' + re.sub(r'[^a-z]+', ' ', text).strip() + ' '


@functools.lru_cache(maxsize=None)
def enwik8_files(n_valid, n_test):
    parts = split3(enwik8_bytes(), n_valid, n_test)
    return parts, [enwik8_format(part) for part in parts]


def make_enwik8(root, n_valid=100000, n_test=100000):
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    parts, texts = enwik8_files(n_valid, n_test)
    for split, text in zip(('train', 'valid', 'test'), texts):
        (out / (split + '.txt')).write_text(text)
    return out, parts


def make_text8(root, n_valid=50000, n_test=50000):
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    parts = split3(wikifil(enwik8_bytes().decode('utf-8')), n_valid, n_test)
    for split, part in zip(('train', 'valid', 'test'), parts):
        (out / (split + '.txt')).write_text(text8_format(part))
    return out, parts


def make_ptb(root):
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    for split in ('train', 'valid', 'test'):
        shutil.copy(shared('ptb/ptb.{}.txt'.format(split)), out / (split + '.txt'))
    return out


def make_wikitext(root, name):
    """WikiText with its valid split standing in for train (train is not in
    the samples). WikiText-103's vocabulary comes from train only, so its test
    split must be covered by it: valid stands in for test too."""
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    test = 'valid' if name == 'wikitext-103' else 'test'
    for split, source in (('train', 'valid'), ('valid', 'valid'), ('test', test)):
        shutil.copy(shared('{}/wiki.{}.tokens'.format(name, source)), out / (split + '.txt'))
    return out


def make_lm1b(root, n_shards=4, per_shard=300, n_heldout=400, min_count=2):
    """The One Billion Word layout from real held-out sentences: training
    shards, held-out shard 0 as valid/test, and a vocabulary file in the
    format of 1b_word_vocab.txt ("word count", most frequent first, with <S>
    and <UNK>), made from the shards."""
    lines = shared('lm1b-sample/heldout-00010-00011.tokens').read_text(
        encoding='utf-8').split('\n')[:-1]
    out = Path(root)
    train_dir = out / LM1B_TREE / 'training-monolingual.tokenized.shuffled'
    held_dir = out / LM1B_TREE / 'heldout-monolingual.tokenized.shuffled'
    train_dir.mkdir(parents=True)
    held_dir.mkdir(parents=True)
    train = lines[:n_shards * per_shard]
    for k in range(n_shards):
        shard = train[k * per_shard:(k + 1) * per_shard]
        (train_dir / 'news.en-{:05d}-of-00100'.format(k + 1)).write_text('\n'.join(shard) + '\n')
    heldout = '\n'.join(lines[len(train):len(train) + n_heldout]) + '\n'
    (held_dir / 'news.en.heldout-00000-of-00050').write_text(heldout)
    (out / 'valid.txt').write_text(heldout)
    (out / 'test.txt').write_text(heldout)
    counts = Counter(w for line in train for w in line.split())
    rare = sum(c for c in counts.values() if c < min_count)
    entries = [('<S>', len(train)), ('<UNK>', rare)] + \
        [(w, c) for w, c in counts.items() if c >= min_count]
    entries.sort(key=lambda e: -e[1])
    (out / '1b_word_vocab.txt').write_text(''.join('{} {}\n'.format(w, c) for w, c in entries))
    return out, [e[0] for e in entries]


def listing(root):
    """Every path under root with its size and mtime: to show nothing changed."""
    root = Path(root)
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob('*'))
