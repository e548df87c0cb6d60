"""The Quick start's scripts: demo.sh's care for directories it did not make (the demo itself runs in the Quick
start, not in the suite), and test.sh's refusal of an interpreter that is not a Python."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def user_files(mine):
    """A directory of the user's with a work/ and a data/ that the demo would delete and rewrite."""
    (mine / 'work').mkdir(parents=True)
    (mine / 'work' / 'precious.txt').write_text('keep me')
    (mine / 'data').mkdir()
    (mine / 'data' / 'train.txt').write_text('my corpus')
    return sorted(str(p.relative_to(mine)) for p in mine.rglob('*'))


def demo(root, **env):
    return subprocess.run(['bash', str(root / 'demo.sh')], env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=60)


def test_an_existing_demo_dir_is_left_alone(tmp_path):
    """DEMO_DIR=<a directory of the user's> deleted its work/ and rewrote its data/*.txt."""
    mine = tmp_path / 'mine'
    before = user_files(mine)
    r = demo(ROOT, DEMO_DIR=str(mine))
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert f'{mine} already holds files that demo.sh did not make' in r.stderr
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob('*')) == before
    assert (mine / 'work' / 'precious.txt').read_text() == 'keep me'


@pytest.fixture
def demo_copy(tmp_path):
    """demo.sh and its helper in a directory of their own, with a stand-in Python that answers the helper's probe
    and does nothing else: what the script deletes before it trains shows, and nothing trains."""
    root = tmp_path / 'repo'
    (root / 'utils').mkdir(parents=True)
    shutil.copy(ROOT / 'demo.sh', root)
    shutil.copy(ROOT / 'utils' / 'python_env.sh', root / 'utils')
    python = tmp_path / 'python'
    python.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo ok; fi\n')
    python.chmod(0o755)
    return root, str(python)


@pytest.mark.parametrize('kind', ['directory', 'link'])
def test_the_default_demo_run_of_the_user_is_left_alone(tmp_path, demo_copy, kind):
    """demo_run/ made by the user, or a link to a directory of theirs: `rm -rf demo_run/work` deleted their work/."""
    root, python = demo_copy
    mine = tmp_path / 'scratch' if kind == 'link' else root / 'demo_run'
    before = user_files(mine)
    if kind == 'link':
        (root / 'demo_run').symlink_to(mine)
    r = demo(root, PYTHON=python, DEMO_DIR='')
    assert r.returncode == 2 and r.stderr.count('\n') == 1, r.stderr
    assert r.stderr.startswith('demo.sh: error: demo_run ')
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob('*')) == before


def test_the_demo_makes_and_reuses_its_own_directory(demo_copy):
    """The checks above leave the demo's own runs alone: a new demo_run/ is made, marked, and used again."""
    root, python = demo_copy
    for _ in range(2):
        r = demo(root, PYTHON=python, DEMO_DIR='')
        assert r.returncode == 0, r.stderr
    assert (root / 'demo_run' / '.made-by-demo.sh').is_file()


@pytest.mark.parametrize('python', ['true', 'echo'])
def test_test_sh_refuses_an_interpreter_that_is_not_a_python(python):
    """PYTHON=true bash test.sh exited 0 without running a test: the probe's output was never checked."""
    r = subprocess.run(['bash', str(ROOT / 'test.sh')], env=dict(os.environ, PYTHON=python), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and r.stderr == f'error: {python} does not run as a Python 3: set PYTHON to one\n'
