"""utils/launch.sh, the run scripts' launcher: python, or torchrun with one process per GPU (--multi_gpu) or NPROC.

The scripts run with PYTHON set to a fake interpreter that prints its command line (conftest.launch); asked for
the number of visible GPUs (`python -c ...`) it answers FAKE_GPUS, so a machine with any number of GPUs can be
pretended.
"""
import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, fake_python, launch, write_corpus


def test_multi_gpu_launches_one_process_per_visible_gpu(tmp_path):
    out = launch(tmp_path, 'run_enwik8_base.sh', 'train', FAKE_GPUS='4')
    assert out[:2] == ['Run training...', '--multi_gpu: torchrun with 4 processes, one per visible GPU '
                                          '(NPROC=N to choose)']
    assert out[2:9] == ['-m', 'torch.distributed.run',
                        '--standalone', '--nproc_per_node', '4', str(ROOT / 'train.py'), '--cuda']
    assert '--multi_gpu' in out and '--gpu0_bsz' in out  # train.py says what it makes of them


@pytest.mark.parametrize('gpus', ['0', '1'])
def test_multi_gpu_without_several_gpus_runs_one_process(tmp_path, gpus):
    out = launch(tmp_path, 'run_wt103_large.sh', 'train', FAKE_GPUS=gpus)
    assert out[:3] == ['Run training...', f'--multi_gpu: {gpus} GPU visible: one process', str(ROOT / 'train.py')]


def test_nproc_and_torchrun_args_win_over_the_gpu_count(tmp_path):
    out = launch(tmp_path, 'run_wt103_base.sh', 'train', FAKE_GPUS='8', NPROC='4', TORCHRUN_ARGS='--nnodes 2')
    assert out[1:8] == ['-m', 'torch.distributed.run', '--nproc_per_node', '4', '--nnodes', '2',
                        str(ROOT / 'train.py')]
    assert f'{ROOT}/data/wikitext-103/' in out  # a relative DATA_ROOT is taken from the repository
    out = launch(tmp_path, 'run_wt103_base.sh', 'train', FAKE_GPUS='8', NPROC='1')
    assert out[1] == str(ROOT / 'train.py')


def test_amp_chooses_the_training_precision(tmp_path):
    assert '--amp' not in launch(tmp_path, 'run_text8_base.sh', 'train', NPROC='1')  # the original's fp32
    out = launch(tmp_path, 'run_text8_base.sh', 'train', '--amp', 'fp16', NPROC='1', AMP='bf16')
    assert out[-4:] == ['--amp', 'bf16', '--amp', 'fp16']  # flags given after the mode still win
    assert '--amp' not in launch(tmp_path, 'run_text8_base.sh', 'eval', NPROC='1', AMP='bf16')


def test_evaluation_uses_one_process_unless_asked(tmp_path):
    out = launch(tmp_path, 'run_enwik8_base.sh', 'eval', FAKE_GPUS='4')  # the original's eval has no --multi_gpu
    assert out[:2] == ['Run evaluation...', str(ROOT / 'eval.py')]
    out = launch(tmp_path, 'run_enwik8_base.sh', 'eval', FAKE_GPUS='4', NPROC='2')
    assert out[1:6] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']


def test_size_tiny_runs_the_script_at_the_quick_starts_scale(tmp_path):
    out = launch(tmp_path, 'run_enwik8_base_moe.sh', 'train', '--max_step', '7', NPROC='1', SIZE='tiny')
    assert out[0] == 'Run training... (SIZE=tiny)'
    flags = out[2:]
    # the script's flags, then the preset's (later flags win in argparse), then the command line's
    assert flags.index('--d_model') < flags.index('--d_model', flags.index('--d_model') + 1)
    assert last_value(flags, '--d_model') == '128' and last_value(flags, '--n_layer') == '4'
    assert last_value(flags, '--moe-num-expert') == '8'  # the MoE script's own addition
    assert last_value(flags, '--log-interval') == '10' and last_value(flags, '--max_step') == '7'
    assert last_value(flags, '--data') == f'{ROOT}/data/enwik8/' and '--moe' in flags  # the script's data and model
    out = launch(tmp_path, 'run_wt103_base.sh', 'eval', SIZE='tiny')
    assert last_value(out, '--mem_len') == '256' and '--same_length' in out and '--moe-num-expert' not in out
    assert launch(tmp_path, 'run_wt103_base.sh', 'train', NPROC='1', SIZE='full') == \
        launch(tmp_path, 'run_wt103_base.sh', 'train', NPROC='1')


def last_value(flags, name):
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]


def test_an_unknown_size_or_mode_is_one_line(tmp_path):
    done = run_script(ROOT, 'run_enwik8_base.sh', 'train', env=dict(PYTHON=str(fake_python(tmp_path)), SIZE='small'),
                      path=tools_without_python(tmp_path))
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.startswith('error: SIZE=small: unknown; SIZE=tiny ') and done.stderr.count('\n') == 1
    done = run_script(ROOT, 'run_enwik8_base.sh', 'tran', env=dict(PYTHON=str(fake_python(tmp_path))),
                      path=tools_without_python(tmp_path))
    assert (done.returncode, done.stderr) == (2, 'usage: [SIZE=tiny] bash run_enwik8_base.sh train|eval [flags]\n')


def run_script(root, script, *args, env, path):
    """`bash root/script args` with only `env` and PATH=path."""
    return subprocess.run([shutil.which('bash'), str(root / script), *args], capture_output=True, text=True,
                          timeout=600, env={'PATH': str(path), 'HOME': str(root), 'DATA_ROOT': 'data', **env})


def tools_without_python(folder):
    """A PATH directory in folder with the few programs the scripts run besides Python: no python, no python3."""
    folder = folder / 'bin'
    folder.mkdir(exist_ok=True)
    for tool in ('dirname', 'basename'):
        if not (folder / tool).exists():
            (folder / tool).symlink_to(shutil.which(tool))
    return folder


@pytest.fixture
def repo_copy(tmp_path):
    """The launcher's files in a repository of their own, so that a .venv can be made in it."""
    for name in ('run_enwik8_base.sh', 'utils/launch.sh', 'utils/python_env.sh'):
        (tmp_path / 'repo' / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / 'repo' / name)
    return tmp_path / 'repo'


def test_the_quick_starts_venv_is_found_without_python_on_path(repo_copy, tmp_path):
    """On Debian there is no `python`, and the Quick start installs into the repository's .venv."""
    (repo_copy / '.venv' / 'bin').mkdir(parents=True)
    fake_python(repo_copy / '.venv' / 'bin')
    done = run_script(repo_copy, 'run_enwik8_base.sh', 'eval', env={}, path=tools_without_python(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ['Run evaluation...', str(repo_copy / 'eval.py')]
    # an activated environment wins over the .venv
    env = tmp_path / 'env'
    (env / 'bin').mkdir(parents=True)
    (env / 'bin' / 'python').write_text('#!/bin/sh\necho "venv python $*"\n')
    (env / 'bin' / 'python').chmod(0o755)
    done = run_script(repo_copy, 'run_enwik8_base.sh', 'eval', env={'VIRTUAL_ENV': str(env)},
                      path=tools_without_python(tmp_path))
    assert done.stdout.splitlines()[1].startswith('venv python ')


def test_a_python_without_torch_is_one_line_saying_how_to_get_one(repo_copy, tmp_path):
    bin_dir = tools_without_python(tmp_path)
    done = run_script(repo_copy, 'run_enwik8_base.sh', 'train', env={}, path=bin_dir)  # no python3 either
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.startswith('error: no python3 on PATH: run the Quick start (bash demo.sh)')
    (bin_dir / 'python3').write_text('#!/bin/sh\nexit 1\n')  # a system python3 that cannot import torch
    (bin_dir / 'python3').chmod(0o755)
    done = run_script(repo_copy, 'run_enwik8_base.sh', 'train', env={}, path=str(bin_dir))
    assert done.returncode == 2 and done.stderr.count('\n') == 1
    assert done.stderr.startswith('error: python3 has no torch: run the Quick start (bash demo.sh)')


def test_a_tiny_run_trains_and_evaluates_from_a_fresh_shell(tmp_path):
    """The README's first-hour commands as written: a run script at SIZE=tiny, train then eval, in a shell whose
    PATH holds no `python` (Debian), with the environment the Quick start installed into activated."""
    write_corpus(tmp_path / 'data' / 'enwik8', sizes=(20000, 3000, 3000))
    env = tmp_path / 'env'  # an activated environment whose python is this one
    (env / 'bin').mkdir(parents=True)
    (env / 'bin' / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (env / 'bin' / 'python').chmod(0o755)
    shell = dict(VIRTUAL_ENV=str(env), DATA_ROOT=str(tmp_path / 'data'), SIZE='tiny')
    work = tmp_path / 'runs' / 'base'
    done = run_script(ROOT, 'run_enwik8_base.sh', 'train', '--work_dir', str(work), '--max_step', '12',
                      '--eval-interval', '8', '--max_eval_steps', '2', '--batch_size', '4', env=shell,
                      path=tools_without_python(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert re.search(r'^\| epoch +1 step +10 \|', out, re.M)   # SIZE=tiny's line every 10 steps
    assert re.search(r'^\| Eval +1 at step +8 \|', out, re.M)
    assert re.search(r'^\| End of training \| test loss', out, re.M)
    done = run_script(ROOT, 'run_enwik8_base.sh', 'eval', '--work_dir', str(work), env=shell,
                      path=tools_without_python(tmp_path))
    assert done.returncode == 0, done.stderr
    assert 'Evaluating with bsz 10 tgt_len 64 ext_len 0 mem_len 256 clamp_len 256' in done.stdout
    assert json.loads((work / 'eval.json').read_text())['test']['bpc'] > 0
