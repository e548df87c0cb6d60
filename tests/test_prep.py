"""prep_enwik8.py, prep_text8.py and getdata.sh on the real samples. The
network is never used: getdata.sh is pointed (GETDATA_MIRROR) at file://
copies built here, or at an unreachable address to test the failure path."""

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from data_utils import get_lm_corpus
from tests.sample_corpora import (ENWIK8_SAMPLE, LM1B_TREE, REPO, enwik8_bytes, enwik8_files,
                                  listing, make_lm1b, shared, split3, text8_format, wikifil)


def run(*args, env=None, cwd=REPO):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def prep(script, *args):
    return run(sys.executable, script, *args)


# ---- prep_enwik8.py ------------------------------------------------------------------

def test_prep_enwik8_writes_the_original_format(tmp_path):
    out = tmp_path / 'enwik8'
    r = prep('prep_enwik8.py', '--input', str(ENWIK8_SAMPLE), '--out', str(out),
             '--valid', '100000', '--test', '100000')
    assert r.returncode == 0, r.stderr
    parts, texts = enwik8_files(100000, 100000)
    assert [len(p) for p in parts] == [1000000, 100000, 100000]
    for split, part, text in zip(('train', 'valid', 'test'), parts, texts):
        assert (out / (split + '.txt')).read_text() == text
        assert (out / (split + '.txt.raw')).read_bytes() == part
    assert sorted(os.listdir(out)) == sorted(s + e for s in ('train', 'valid', 'test')
                                             for e in ('.txt', '.txt.raw'))
    assert (out / 'train.txt').stat().st_mode & 0o777 == 0o666 & ~current_umask()
    corpus = get_lm_corpus(str(out), 'enwik8')
    assert len(corpus.train) == 1000000 - parts[0].count(b'\n')

    before = listing(out)
    again = prep('prep_enwik8.py', '--input', str(ENWIK8_SAMPLE), '--out', str(out))
    assert again.returncode == 0 and 'skipping' in again.stdout
    assert listing(out) == before


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_prep_enwik8_reads_the_bare_file_and_force_rewrites(tmp_path):
    bare = tmp_path / 'enwik8'
    bare.write_bytes(enwik8_bytes()[:30000])
    out = tmp_path / 'out'
    args = ['--input', str(bare), '--out', str(out), '--valid', '1000', '--test', '2000',
            '--no-raw']
    assert prep('prep_enwik8.py', *args).returncode == 0
    assert sorted(os.listdir(out)) == ['test.txt', 'train.txt', 'valid.txt']
    (out / 'test.txt').write_text('stale')
    assert prep('prep_enwik8.py', *args, '--force').returncode == 0
    train, valid, test = split3(enwik8_bytes()[:30000], 1000, 2000)
    assert (out / 'test.txt').read_text() == ' '.join(
        '\n' if b == 10 else str(b) for b in test)


@pytest.mark.parametrize('args,message', [
    (['--input', 'missing.zip'], 'input missing.zip does not exist: `bash getdata.sh enwik8`'),
    (['--input', str(ENWIK8_SAMPLE)], 'has 1200000 units: --valid 5000000 and --test 5000000 '
                                      'leave no training data'),
    (['--input', str(ENWIK8_SAMPLE), '--valid', '0'], '--valid and --test must be at least 1'),
    (['--input', 'WRONG_ZIP'], 'holds text8, not a file named enwik8'),
])
def test_prep_enwik8_bad_input(tmp_path, args, message):
    wrong = tmp_path / 'wrong.zip'
    with zipfile.ZipFile(wrong, 'w') as z:
        z.writestr('text8', 'abc')
    args = [str(wrong) if a == 'WRONG_ZIP' else a for a in args]
    r = prep('prep_enwik8.py', *args, '--out', str(tmp_path / 'out'))
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_prep_enwik8_refuses_a_truncated_zip(tmp_path):
    """A download cut short is no zip any more (its directory is at the end): it was read as raw text, and the
    compressed bytes became the corpus."""
    cut = tmp_path / 'enwik8.zip'
    cut.write_bytes(ENWIK8_SAMPLE.read_bytes()[:200000])
    r = prep('prep_enwik8.py', '--input', str(cut), '--out', str(tmp_path / 'out'), '--valid', '10', '--test', '10')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert 'is a damaged or incomplete zip (it does not open): delete it and download it again' in r.stderr
    assert not (tmp_path / 'out').exists()


def test_prep_keeps_a_partial_corpus_without_force_and_checks_out(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'train.txt').write_text('mine')
    args = ['--input', str(ENWIK8_SAMPLE), '--valid', '1000', '--test', '1000', '--no-raw']
    r = prep('prep_enwik8.py', *args, '--out', str(out))
    assert r.returncode == 2 and 'already holds train.txt but not all three splits: pass --force' in r.stderr
    assert os.listdir(out) == ['train.txt'] and (out / 'train.txt').read_text() == 'mine'
    (tmp_path / 'file').write_text('x')
    for where, message in ((tmp_path / 'file', 'is a file, not a directory'), ('/proc/txl', 'is not writable')):
        r = prep('prep_enwik8.py', *args, '--out', str(where))
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- prep_text8.py --------------------------------------------------------------------

def test_prep_text8_on_a_text8_sample_from_real_wikipedia(tmp_path):
    text = wikifil(enwik8_bytes().decode('utf-8'))
    archive = tmp_path / 'text8.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('text8', text)
    out = tmp_path / 'text8'
    r = prep('prep_text8.py', '--input', str(archive), '--out', str(out),
             '--valid', '50000', '--test', '60000')
    assert r.returncode == 0, r.stderr
    for split, part in zip(('train', 'valid', 'test'), split3(text, 50000, 60000)):
        assert (out / (split + '.txt')).read_text() == text8_format(part)
        assert (out / (split + '.txt.raw')).read_text() == part
    corpus = get_lm_corpus(str(out), 'text8')
    assert len(corpus.vocab) == 27 and len(corpus.test) == len(split3(text, 50000, 60000)[2]
                                                                .strip())


# ---- getdata.sh ---------------------------------------------------------------------------

needs_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ('curl', 'unzip', 'tar', 'gzip')),
    reason='getdata.sh tests need curl (file:// mirrors), unzip, tar and gzip')


def getdata(data_root, *names, **env):
    return run('bash', 'getdata.sh', *names, env=dict(env, DATA_ROOT=str(data_root)))


def test_getdata_unknown_corpus_writes_nothing(tmp_path):
    r = getdata(tmp_path / 'data', 'enwik8', 'wt3')
    assert r.returncode == 2
    assert "unknown corpus 'wt3': choose from enwik8 text8 wt2 wt103 ptb pennchar lm1b" in r.stderr
    assert not (tmp_path / 'data').exists()


@needs_tools
def test_getdata_without_network_fails_at_once_naming_the_url(tmp_path):
    start = time.time()
    r = getdata(tmp_path / 'data', 'enwik8', GETDATA_MIRROR='http://127.0.0.1:9/mirror')
    assert r.returncode != 0 and time.time() - start < 30
    assert 'could not download enwik8.zip from http://127.0.0.1:9/mirror/enwik8.zip' in r.stderr
    assert sorted(os.listdir(tmp_path / 'data')) == ['downloads']     # no corpus, no .partial


def mirror_with(tmp_path, files):
    mirror = tmp_path / 'mirror'
    mirror.mkdir(parents=True)
    for name, data in files.items():
        (mirror / name).write_bytes(data)
    return 'file://{}'.format(mirror)


@needs_tools
def test_getdata_rejects_a_wrong_checksum(tmp_path):
    url = mirror_with(tmp_path, {'enwik8.zip': ENWIK8_SAMPLE.read_bytes()})
    r = getdata(tmp_path / 'data', 'enwik8', GETDATA_MIRROR=url)
    assert r.returncode != 0
    assert 'enwik8.zip (sha256 7b07e715' in r.stderr
    assert 'expected 547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc' in r.stderr
    assert os.listdir(tmp_path / 'data' / 'downloads') == []   # the bad file is not kept


@needs_tools
def test_getdata_enwik8_resumes_prepares_and_skips_when_done(tmp_path):
    data = ENWIK8_SAMPLE.read_bytes()
    url = mirror_with(tmp_path, {'enwik8.zip': data})
    downloads = tmp_path / 'data' / 'downloads'
    downloads.mkdir(parents=True)
    (downloads / 'enwik8.zip.part').write_bytes(data[:len(data) // 3])   # a broken download
    env = dict(GETDATA_MIRROR=url, GETDATA_NO_VERIFY='1',
               GETDATA_PREP_ARGS='--valid 100000 --test 100000')
    r = getdata(tmp_path / 'data', 'enwik8', **env)
    assert r.returncode == 0, r.stderr
    assert (downloads / 'enwik8.zip').read_bytes() == data
    out = tmp_path / 'data' / 'enwik8'
    for split, text in zip(('train', 'valid', 'test'), enwik8_files(100000, 100000)[1]):
        assert (out / (split + '.txt')).read_text() == text
    assert len(get_lm_corpus(str(out), 'enwik8').vocab) > 150

    before = listing(tmp_path / 'data')
    r = getdata(tmp_path / 'data', 'enwik8', GETDATA_MIRROR='http://127.0.0.1:9/x')
    assert r.returncode == 0 and 'exists, skipping' in r.stdout
    assert listing(tmp_path / 'data') == before


@needs_tools
def test_getdata_failed_prep_leaves_no_corpus(tmp_path):
    url = mirror_with(tmp_path, {'enwik8.zip': ENWIK8_SAMPLE.read_bytes()})
    r = getdata(tmp_path / 'data', 'enwik8', GETDATA_MIRROR=url, GETDATA_NO_VERIFY='1')
    assert r.returncode != 0 and 'leave no training data' in r.stderr   # default 5M/5M splits
    assert sorted(os.listdir(tmp_path / 'data')) == ['downloads']


def tgz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@needs_tools
def test_getdata_ptb_and_pennchar_verify_the_ptb_files(tmp_path):
    members = {}
    for split in ('train', 'valid', 'test'):
        words = shared('ptb/ptb.{}.txt'.format(split)).read_bytes()
        members['simple-examples/data/ptb.{}.txt'.format(split)] = words
        members['simple-examples/data/ptb.char.{}.txt'.format(split)] = \
            ' '.join(words.decode()[:2000].replace(' ', '_')).encode()
    members['simple-examples/models/unused'] = b'x'
    url = mirror_with(tmp_path, {'simple-examples.tgz': tgz(members)})
    r = getdata(tmp_path / 'data', 'ptb', 'pennchar', GETDATA_MIRROR=url)
    assert r.returncode == 0, r.stderr
    for split in ('train', 'valid', 'test'):
        assert (tmp_path / 'data' / 'penn' / (split + '.txt')).read_bytes() == \
            members['simple-examples/data/ptb.{}.txt'.format(split)]
        assert (tmp_path / 'data' / 'pennchar' / (split + '.txt')).read_bytes() == \
            members['simple-examples/data/ptb.char.{}.txt'.format(split)]
    assert sorted(os.listdir(tmp_path / 'data' / 'penn')) == ['test.txt', 'train.txt', 'valid.txt']

    members['simple-examples/data/ptb.valid.txt'] += b' tampered\n'
    url = mirror_with(tmp_path / 'again', {'simple-examples.tgz': tgz(members)})
    r = getdata(tmp_path / 'data2', 'ptb', GETDATA_MIRROR=url)
    assert r.returncode != 0 and 'ptb.valid.txt from simple-examples.tgz has sha256' in r.stderr
    assert not (tmp_path / 'data2' / 'penn').exists()


@needs_tools
def test_getdata_wikitext_layout(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for split in ('train', 'valid', 'test'):
            source = 'test' if split == 'test' else 'valid'
            z.writestr('wikitext-2/wiki.{}.tokens'.format(split),
                       shared('wikitext-2/wiki.{}.tokens'.format(source)).read_bytes())
    url = mirror_with(tmp_path, {'wikitext-2-v1.zip': buf.getvalue()})
    r = getdata(tmp_path / 'data', 'wt2', GETDATA_MIRROR=url, GETDATA_NO_VERIFY='1')
    assert r.returncode == 0, r.stderr
    out = tmp_path / 'data' / 'wikitext-2'
    assert sorted(os.listdir(out)) == ['test.txt', 'train.txt', 'valid.txt']
    assert (out / 'test.txt').read_bytes() == shared('wikitext-2/wiki.test.tokens').read_bytes()
    assert len(get_lm_corpus(str(out), 'wt2').vocab) > 10000


@needs_tools
def test_getdata_lm1b_layout(tmp_path):
    tree, symbols = make_lm1b(tmp_path / 'src')
    members = {str(p.relative_to(tree)): p.read_bytes()
               for p in (tree / LM1B_TREE).rglob('*') if p.is_file()}
    vocab = (tree / '1b_word_vocab.txt').read_bytes()
    url = mirror_with(tmp_path, {LM1B_TREE + '.tar.gz': tgz(members), '1b_word_vocab.txt': vocab})
    # a broken download of the vocabulary, marked so that we can see it was continued
    (tmp_path / 'data' / 'downloads').mkdir(parents=True)
    space = vocab.index(b' ') + 1        # keep the word, overwrite its count with 9s
    marked = vocab[:space] + b'9' * (vocab.index(b'\n') - space)
    (tmp_path / 'data' / 'downloads' / '1b_word_vocab.txt.part').write_bytes(marked)
    r = getdata(tmp_path / 'data', 'lm1b', GETDATA_MIRROR=url, GETDATA_NO_VERIFY='1')
    assert r.returncode == 0, r.stderr
    out = tmp_path / 'data' / 'one-billion-words'
    assert (out / '1b_word_vocab.txt').read_bytes() == marked + vocab[len(marked):]
    heldout = (tree / LM1B_TREE / 'heldout-monolingual.tokenized.shuffled' /
               'news.en.heldout-00000-of-00050').read_bytes()
    assert (out / 'valid.txt').read_bytes() == (out / 'test.txt').read_bytes() == heldout
    corpus = get_lm_corpus(str(out), 'lm1b')
    assert corpus.vocab.idx2sym == symbols and len(corpus.train) == 4
