"""utils/python_env.sh: which Python the Quick start's commands (demo.sh, test.sh) run with and what they install.

The helper runs from a copy in a temporary directory, so the .venv it may make is made there; the Pythons that
stand for an externally managed system Python are small scripts that answer the helper's probe, so nothing is
installed anywhere.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.sample_corpora import REPO


@pytest.fixture
def repo_copy(tmp_path):
    """A directory laid out like the repository for the helper: utils/python_env.sh and a requirements file."""
    (tmp_path / 'utils').mkdir()
    shutil.copy(REPO / 'utils' / 'python_env.sh', tmp_path / 'utils')
    (tmp_path / 'req.txt').write_text('torch>=2.0,==99.0  # a pin the environment need not match\nnumpy\n')
    return tmp_path


def write_script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n' + text)
    path.chmod(0o755)
    return path


def use_python(root, *files, path, **env):
    """Runs use_python FILES in a clean environment with PATH=path; returns (status, stdout, stderr)."""
    script = f'source {root}/utils/python_env.sh && use_python {" ".join(files)} && echo "PY=$PY"'
    result = subprocess.run(['bash', '-c', script], env={'PATH': path, 'HOME': str(root), **env},
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


def probe(root, python, requirements):
    (root / 'probe.txt').write_text(requirements)
    result = subprocess.run(['bash', '-c', f'source {root}/utils/python_env.sh && _py_env_probe "$0" {root}/probe.txt',
                             python], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_probe_lists_what_is_missing_and_keeps_versions_the_file_accepts(repo_copy):
    import numpy
    state, *missing = probe(repo_copy, sys.executable,
                            f'torch>=2.0,==99.0\nnumpy>={numpy.__version__}  # comment\n\n'
                            f'torch>=99.1\nno-such-package-here[extra]==1.0\npytest ; python_version > "3"\n'
                            f'numpy=={numpy.__version__}\nnumpy==0.1\n')
    in_venv = sys.prefix != sys.base_prefix
    managed = not in_venv and os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))
    assert state == ('managed' if managed else 'ok')
    assert missing == ['torch>=99.1', 'no-such-package-here[extra]==1.0', 'numpy==0.1']


@pytest.mark.skipif(not os.path.exists('/usr/lib/python3/dist-packages') or not os.path.exists('/usr/bin/python3'),
                    reason='no Debian/Ubuntu system Python here')
def test_probe_recognises_an_externally_managed_system_python(repo_copy):
    marker = subprocess.run(['/usr/bin/python3', '-c', 'import os, sysconfig; print(os.path.exists(os.path.join('
                             'sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'],
                            capture_output=True, text=True).stdout.strip()
    if marker != 'True':
        pytest.skip('this system Python is not externally managed')
    assert probe(repo_copy, '/usr/bin/python3', '')[0] == 'managed'


def test_an_activated_environment_that_has_everything_is_used_as_it_is(repo_copy, tmp_path_factory):
    env = tmp_path_factory.mktemp('env')   # its python: the one running these tests, which has numpy and torch
    write_script(env / 'bin' / 'python', f'exec {sys.executable} "$@"\n')
    status, out, err = use_python(repo_copy, 'req.txt', path=f'{env}/bin:/usr/bin:/bin', VIRTUAL_ENV=str(env))
    assert (status, err) == (0, '')
    assert out == f'PY={env}/bin/python\n'   # nothing installed, no other environment made


def managed_python(bin_dir, venv_works):
    """A python3 that answers the probe as an externally managed Python lacking a package; `-m venv DIR` makes
    DIR/bin/python, a Python that has everything, or fails as Debian's does without python3-venv."""
    make_venv = ('mkdir -p "$3/bin" && printf \'#!/bin/sh\\necho ok\\n\' > "$3/bin/python" && chmod +x "$3/bin/python"'
                 if venv_works else 'echo "ensurepip is not available" >&2; exit 1')
    write_script(bin_dir / 'python3', f'if [ "$1" = -c ]; then echo managed; echo numpy; exit 0; fi\n{make_venv}\n')


def test_an_externally_managed_python_gets_a_venv_in_the_repository_made_once(repo_copy, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp('bin')
    managed_python(bin_dir, venv_works=True)
    status, out, err = use_python(repo_copy, 'req.txt', path=f'{bin_dir}:/usr/bin:/bin')
    assert (status, err) == (0, '')
    assert out.splitlines() == [f'== Making a virtual environment in {repo_copy}/.venv for the packages (python3 is '
                                'externally managed); later calls reuse it', f'PY={repo_copy}/.venv/bin/python']
    status, out, err = use_python(repo_copy, 'req.txt', path=f'{bin_dir}:/usr/bin:/bin')
    assert out.splitlines() == [f'== Using the virtual environment {repo_copy}/.venv (python3 is externally managed)',
                                f'PY={repo_copy}/.venv/bin/python']


def test_without_the_venv_module_it_names_the_package_to_install(repo_copy, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp('bin')
    managed_python(bin_dir, venv_works=False)
    status, out, err = use_python(repo_copy, 'req.txt', path=f'{bin_dir}:/usr/bin:/bin')
    assert status == 1
    assert err.count('\n') == 1 and 'apt-get install python3-venv' in err
    assert not (repo_copy / '.venv').exists()   # no half-made environment for the next call to trip on


def test_a_directory_named_venv_that_is_not_one_is_left_alone(repo_copy, tmp_path_factory):
    bin_dir = tmp_path_factory.mktemp('bin')
    managed_python(bin_dir, venv_works=True)
    (repo_copy / '.venv').mkdir()
    (repo_copy / '.venv' / 'notes.txt').write_text('mine')
    status, out, err = use_python(repo_copy, 'req.txt', path=f'{bin_dir}:/usr/bin:/bin')
    assert status == 1 and err == f'error: {repo_copy}/.venv is not a virtual environment: remove it and run again\n'
    assert (repo_copy / '.venv' / 'notes.txt').read_text() == 'mine'
