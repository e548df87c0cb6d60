"""What prep_enwik8.py and prep_text8.py share: read the corpus (a zip as
downloaded, or the bare file), cut the last `valid + test` units off for the
valid and test splits as the original prep scripts do, and write
train/valid/test.txt (plus the untokenized .raw files) atomically (no torch
here: the prep scripts start fast).
"""

import argparse
import os
import sys
import zipfile

from utils.files import WriteError, atomic_write, check_writable_dir, progress_bar
from utils.errors import DataError, UserError

SPLITS = ('train', 'valid', 'test')
BLOCK = 1 << 22


class PrepError(DataError):
    """Bad input to a prep script; the message is one line."""


def parse_args(name, unit, description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument('--input', default=name + '.zip',
                   help='{0}.zip as downloaded, or the unzipped {0} file '
                        '(default: %(default)s)'.format(name))
    p.add_argument('--out', default='.', help='output directory (default: %(default)s)')
    p.add_argument('--valid', type=int, default=5000000,
                   help='{} for valid.txt, cut before the test part (default: %(default)s)'
                   .format(unit))
    p.add_argument('--test', type=int, default=5000000,
                   help='{} for test.txt, cut from the end (default: %(default)s)'.format(unit))
    p.add_argument('--force', action='store_true', help='rewrite existing output')
    p.add_argument('--no-raw', action='store_true',
                   help='skip the untokenized train.txt.raw etc. the original also writes')
    return p.parse_args()


def read_corpus(path, member):
    """The bytes of `member` in the zip at `path`, or of the file itself."""
    if not os.path.isfile(path):
        raise PrepError('input {} does not exist: `bash getdata.sh {}` downloads it, or pass '
                        '--input PATH'.format(path, member))
    if not zipfile.is_zipfile(path):
        with open(path, 'rb') as f:
            head = f.read(4)
        # A zip cut short (a download stopped early) has lost its directory but still starts like a zip.
        if head == b'PK\x03\x04' or path.lower().endswith('.zip'):
            raise PrepError('{} is a damaged or incomplete zip (it does not open): delete it and download it '
                            'again'.format(path))
        with open(path, 'rb') as f:
            return f.read()
    try:
        with zipfile.ZipFile(path) as z:
            if member not in z.namelist():
                raise PrepError('{} holds {}, not a file named {}'.format(
                    path, ', '.join(z.namelist()[:5]) or 'nothing', member))
            return z.read(member)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as err:
        raise PrepError('{} is a damaged zip ({}): delete it and download it again'.format(
            path, err)) from None


def split_parts(data, n_valid, n_test, path):
    """train, valid, test: the last n_test units are test, the n_valid before
    them valid, as the original (90M/5M/5M for the 100M of enwik8/text8)."""
    if n_valid < 1 or n_test < 1:
        raise PrepError('--valid and --test must be at least 1')
    n_train = len(data) - n_valid - n_test
    if n_train < 1:
        raise PrepError('{} has {} units: --valid {} and --test {} leave no training data; '
                        'pass smaller sizes'.format(path, len(data), n_valid, n_test))
    return data[:n_train], data[n_train:n_train + n_valid], data[n_train + n_valid:]


def write_atomic(path, pieces, mode='w'):
    """Write an iterable of str (or bytes) to `path` atomically (utils.files.atomic_write)."""
    with atomic_write(path, mode) as f:
        for piece in pieces:
            f.write(piece)


def blocks(seq, desc):
    """seq in blocks of BLOCK units, with a progress bar on a terminal."""
    bar = progress_bar(len(seq), 'B', desc=desc)
    for i in range(0, len(seq), BLOCK):
        yield i, seq[i:i + BLOCK]
        if bar is not None:
            bar.update(min(BLOCK, len(seq) - i))
    if bar is not None:
        bar.close()


def run(name, unit, description, decode, tokenize):
    """The whole prep script: decode(bytes) -> the corpus as a sequence,
    tokenize(part) -> the pieces of its .txt file."""
    args = parse_args(name, unit, description)
    outputs = [os.path.join(args.out, split + '.txt') for split in SPLITS]
    if all(os.path.exists(f) for f in outputs) and not args.force:
        print('Tokenized {} already exists in {} - skipping processing (--force redoes it)'
              .format(name, args.out))
        return 0
    try:
        existing = [os.path.basename(f) for f in outputs if os.path.exists(f)]
        if existing and not args.force:  # a part of a corpus is still someone's files
            raise PrepError('{} already holds {} but not all three splits: pass --force to rewrite them'.format(
                args.out, ', '.join(existing)))
        check_writable_dir(args.out, '--out')
        data = decode(read_corpus(args.input, name), args.input)
        parts = split_parts(data, args.valid, args.test, args.input)
    except UserError as err:  # PrepError, or an --out that cannot be written (ConfigError)
        print('{}: error: {}'.format(os.path.basename(sys.argv[0]), err), file=sys.stderr)
        return 2
    print('Length of {}: {}'.format(name, len(data)))
    os.makedirs(args.out, exist_ok=True)
    try:
        for path, part in zip(outputs, parts):
            print('{} will have {} {}'.format(os.path.basename(path), len(part), unit))
            if not args.no_raw:
                write_atomic(path + '.raw', [part], 'wb' if isinstance(part, bytes) else 'w')
            write_atomic(path, tokenize(part, os.path.basename(path)))
    except WriteError as err:  # a full disk: the files written so far are whole, the rest untouched
        print('{}: error: {}'.format(os.path.basename(sys.argv[0]), err), file=sys.stderr)
        return 2
    return 0
