"""utils/python_env.sh: which Python the Quick start's commands (demo.sh, test.sh) run with and what they install;
requirements.txt read as pip reads it.

The helper runs from a copy in a temporary directory, so the .venv it may make is made there. The environments
it is given are real virtual environments (made without pip) whose installed packages are bare .dist-info
records and whose `pip` is a stand-in that records its arguments, so the helper's own probe runs for real and
nothing is downloaded. The Pythons that stand for an externally managed system Python are small scripts that
answer the probe.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.sample_corpora import REPO

FULL = {'torch': '2.13.0', 'numpy': '2.0.0', 'tqdm': '4.0.0', 'matplotlib': '3.9.0'}


@pytest.fixture
def repo_copy(tmp_path):
    """A directory laid out like the repository for the helper: utils/python_env.sh and requirements.txt."""
    (tmp_path / 'repo' / 'utils').mkdir(parents=True)
    shutil.copy(REPO / 'utils' / 'python_env.sh', tmp_path / 'repo' / 'utils')
    shutil.copy(REPO / 'requirements.txt', tmp_path / 'repo')
    return tmp_path / 'repo'


def write_script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n' + text)
    path.chmod(0o755)
    return path


def make_env(path, installed):
    """A virtual environment whose installed distributions are `installed` ({name: version}, metadata only) and
    whose `python -m pip ...` appends its arguments, one call a line, to path/pip-calls."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True, timeout=60)
    site = site_packages(path)
    for name, version in installed.items():
        info = os.path.join(site, f'{name}-{version}.dist-info')
        os.makedirs(info)
        with open(os.path.join(info, 'METADATA'), 'w') as f:
            f.write(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    os.makedirs(os.path.join(site, 'pip'))
    with open(os.path.join(site, 'pip', '__main__.py'), 'w') as f:
        f.write(f'import sys\nopen({str(path / "pip-calls")!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")\n')
    return path


def site_packages(env):
    return subprocess.run([env / 'bin' / 'python', '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                          capture_output=True, text=True, check=True).stdout.strip()


def pip_calls(env):
    calls = env / 'pip-calls'
    return calls.read_text().splitlines() if calls.exists() else []


def use_python(root, *files, path='/usr/bin:/bin', **env):
    """Runs use_python FILES in a clean environment with PATH=path; returns (status, stdout, stderr)."""
    script = f'source {root}/utils/python_env.sh && use_python {" ".join(files)} && echo "PY=$PY"'
    result = subprocess.run(['bash', '-c', script], env={'PATH': path, 'HOME': str(root), **env},
                            capture_output=True, text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


def fresh_torch():
    return re.search(r'^TESTED_TORCH=(\S+)$', (REPO / 'utils' / 'python_env.sh').read_text(), re.M).group(1)


def test_an_environment_that_satisfies_the_file_is_used_as_it_is(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', FULL)
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert (status, err) == (0, '')
    assert out == f'PY={env}/bin/python\n'
    assert pip_calls(env) == []


@pytest.mark.parametrize('torch', ['2.6.0', '2.7.1+cu126', '3.0.0'])
def test_an_installed_torch_from_2_6_on_is_kept(repo_copy, tmp_path, torch):
    env = make_env(tmp_path / 'env', {**FULL, 'torch': torch})
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert (status, err, pip_calls(env)) == (0, '', [])
    # With another package missing, pip gets the file alone: no torch pin that would replace the installed one.
    env = make_env(tmp_path / 'env2', {'torch': torch, 'tqdm': '4.0.0', 'matplotlib': '3.9.0'})
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert status == 0
    assert pip_calls(env) == [f'install -q -r {repo_copy}/requirements.txt']


def test_a_fresh_environment_gets_the_tested_torch(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', {})
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert status == 0
    assert pip_calls(env) == [f'install -q torch=={fresh_torch()} -r {repo_copy}/requirements.txt']
    assert 'torch>=2.6' in out


def test_a_torch_older_than_2_6_is_left_to_pip(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', {**FULL, 'torch': '2.5.1'})
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert status == 0
    assert pip_calls(env) == [f'install -q -r {repo_copy}/requirements.txt']   # pip upgrades it to satisfy >= 2.6


def test_a_conda_environment_is_used_when_no_virtual_environment_is_active(repo_copy, tmp_path):
    env = make_env(tmp_path / 'conda', {**FULL, 'torch': '2.6.0'})
    status, out, err = use_python(repo_copy, 'requirements.txt', CONDA_PREFIX=str(env))
    assert (status, err, out, pip_calls(env)) == (0, '', f'PY={env}/bin/python\n', [])


def test_the_tested_torch_satisfies_requirements_txt(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', {**FULL, 'torch': fresh_torch()})
    assert use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))[0] == 0
    assert pip_calls(env) == []


def test_pip_itself_keeps_an_installed_torch_from_2_6_on(tmp_path):
    """`pip install -r requirements.txt` as a user runs it: with torch 2.6.0 installed (a record put first on the
    path, beside this environment's numpy, tqdm and matplotlib) pip has nothing to install, so it needs no index."""
    pytest.importorskip('matplotlib')
    pytest.importorskip('tqdm')
    site = tmp_path / 'site'
    (site / 'torch-2.6.0.dist-info').mkdir(parents=True)
    (site / 'torch-2.6.0.dist-info' / 'METADATA').write_text('Metadata-Version: 2.1\nName: torch\nVersion: 2.6.0\n')
    result = subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index',
                             '--disable-pip-version-check', '-r', str(REPO / 'requirements.txt')],
                            env={**os.environ, 'PYTHONPATH': str(site)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'torch>=2.6 in' in result.stdout and 'Would install' not in result.stdout


def test_the_probe_reads_greater_equal_and_equal_bounds(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', {'torch': '2.13.0+cpu', 'numpy': '1.26.4'})
    (repo_copy / 'req.txt').write_text('torch>=2.6  # comment\n\ntorch==2.13\ntorch>=2.13.1\nnumpy>=1.2,==1.26.4\n'
                                       'numpy==1.26.3\nno-such-package[extra]\ntqdm ; python_version > "3"\n'
                                       'numpy~=1.26\n')
    status, out, err = use_python(repo_copy, 'req.txt', VIRTUAL_ENV=str(env))
    assert status == 0
    assert out.splitlines()[0] == (f'== Installing into {env}/bin/python (it lacks torch>=2.13.1 numpy==1.26.3 '
                                   f'no-such-package[extra] tqdm numpy~=1.26): pip install -r {repo_copy}/req.txt')


@pytest.mark.skipif(not os.path.exists('/usr/lib/python3/dist-packages') or not os.path.exists('/usr/bin/python3'),
                    reason='no Debian/Ubuntu system Python here')
def test_an_externally_managed_system_python_is_never_installed_into(repo_copy):
    marker = subprocess.run(['/usr/bin/python3', '-c', 'import os, sysconfig; print(os.path.exists(os.path.join('
                             'sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'],
                            capture_output=True, text=True).stdout.strip()
    if marker != 'True':
        pytest.skip('this system Python is not externally managed')
    (repo_copy / 'req.txt').write_text('no-such-package-here\n')
    write_script(repo_copy / '.venv' / 'bin' / 'python', 'echo "venv python $*" >&2; exit 1\n')
    status, out, err = use_python(repo_copy, 'req.txt', path='/usr/bin:/bin')
    assert out.splitlines() == [f'== Using the virtual environment {repo_copy}/.venv (python3 is externally managed)']
    assert status == 1 and err.endswith(f'does not run as a Python 3: remove {repo_copy}/.venv and run again\n')


def managed_python(bin_dir, venv_works):
    """A python3 that answers the probe as an externally managed Python lacking a package; `-m venv DIR` makes
    DIR/bin/python, a Python that has everything, or fails as Debian's does without python3-venv."""
    make_venv = ('mkdir -p "$3/bin" && printf \'#!/bin/sh\\necho ok\\n\' > "$3/bin/python" && chmod +x "$3/bin/python"'
                 if venv_works else 'echo "ensurepip is not available" >&2; exit 1')
    write_script(bin_dir / 'python3', f'if [ "$1" = -c ]; then echo managed; echo numpy; exit 0; fi\n{make_venv}\n')


def test_an_externally_managed_python_gets_a_venv_in_the_repository_made_once(repo_copy, tmp_path):
    managed_python(tmp_path / 'bin', venv_works=True)
    status, out, err = use_python(repo_copy, 'requirements.txt', path=f'{tmp_path}/bin:/usr/bin:/bin')
    assert (status, err) == (0, '')
    assert out.splitlines() == [f'== Making a virtual environment in {repo_copy}/.venv for the packages (python3 is '
                                'externally managed); later calls reuse it', f'PY={repo_copy}/.venv/bin/python']
    status, out, err = use_python(repo_copy, 'requirements.txt', path=f'{tmp_path}/bin:/usr/bin:/bin')
    assert out.splitlines() == [f'== Using the virtual environment {repo_copy}/.venv (python3 is externally managed)',
                                f'PY={repo_copy}/.venv/bin/python']


def test_without_the_venv_module_it_names_the_package_to_install(repo_copy, tmp_path):
    managed_python(tmp_path / 'bin', venv_works=False)
    status, out, err = use_python(repo_copy, 'requirements.txt', path=f'{tmp_path}/bin:/usr/bin:/bin')
    assert status == 1
    assert err.count('\n') == 1 and 'apt-get install python3-venv' in err
    assert not (repo_copy / '.venv').exists()   # no half-made environment for the next call to trip on


def test_a_directory_named_venv_that_is_not_one_is_left_alone(repo_copy, tmp_path):
    managed_python(tmp_path / 'bin', venv_works=True)
    (repo_copy / '.venv').mkdir()
    (repo_copy / '.venv' / 'notes.txt').write_text('mine')
    status, out, err = use_python(repo_copy, 'requirements.txt', path=f'{tmp_path}/bin:/usr/bin:/bin')
    assert status == 1 and err == f'error: {repo_copy}/.venv is not a virtual environment: remove it and run again\n'
    assert (repo_copy / '.venv' / 'notes.txt').read_text() == 'mine'


def test_a_python_without_pip_is_named_with_what_it_lacks(repo_copy, tmp_path):
    env = make_env(tmp_path / 'env', {name: v for name, v in FULL.items() if name != 'tqdm'})
    shutil.rmtree(os.path.join(site_packages(env), 'pip'))
    status, out, err = use_python(repo_copy, 'requirements.txt', VIRTUAL_ENV=str(env))
    assert status == 1
    assert err == f'error: {env}/bin/python has no pip to install tqdm: install them, or set PYTHON to another Python\n'
