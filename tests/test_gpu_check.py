"""bench/gpu_check.sh: its dry run on the CPU (every part's logic, tiny shapes) writes a JSON record with no failed
check. The train part (seven train/eval/generate processes, about a minute) is left to
`bash bench/gpu_check.sh --dry-run`, which runs every part."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*flags):
    return subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_check.sh'), *flags], capture_output=True, text=True,
                          env={'PYTHON': sys.executable, 'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'},
                          timeout=300)


def test_dry_run_writes_every_check(tmp_path):
    done = gpu_check('--dry-run', '--skip', 'train', '--out', str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / 'gpu_check.json').read_text())
    checks = record['checks']
    assert record['dry_run'] and record['failed'] == []
    assert checks['env']['device'] == 'cpu' and checks['env']['torch'] == torch.__version__
    assert checks['cuda test tier']['ok']  # on the CPU: every CUDA test skipped, none failed
    for precision in ('fp32', 'tf32', 'bf16'):
        for name in ('dense', 'moe64'):
            row = checks[f'train step {name} {precision}']
            assert row['tokens_per_s'] > 0 and 0 < row['bf16_peak_fraction']
    deterministic = checks['train step dense bf16 deterministic']
    assert deterministic['ok'] and deterministic['time_ratio'] > 0  # two runs of the same steps repeat bitwise
    if moe.grouped_mm_fits(torch.device('cpu'), torch.float32, (32, 64)):  # torch >= 2.8 on the CPU
        assert checks['moe layer grouped_mm = slices']['ok']
    else:
        assert 'moe layer grouped_mm = slices' not in checks and 'moe layer slices' in checks
    assert checks['host syncs in a moe training step']['read_back_ops'] >= 0
    assert f"wrote {tmp_path / 'gpu_check.json'}" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is visible')
def test_without_a_gpu_it_asks_for_one_or_a_dry_run(tmp_path):
    done = gpu_check('--out', str(tmp_path))
    assert done.returncode == 2 and 'no CUDA device is visible' in done.stderr
    assert not (tmp_path / 'gpu_check.json').exists()
    done = gpu_check('--dry-run', '--skip', 'bogus', '--out', str(tmp_path))
    assert done.returncode == 2 and '--skip bogus: unknown part' in done.stderr


@pytest.fixture
def fitting(monkeypatch):
    """bench/gpu_check.py's time_fitting on the CPU, where a batch larger than `fits` runs out of memory in the
    trainer's build (`where='build'`) or its step; returns (time_fitting, the batches tried)."""
    sys.path.insert(0, str(ROOT / 'bench'))
    import gpu_check
    sys.path.remove(str(ROOT / 'bench'))
    tried = []

    def out_of_memory_above(fits, where):
        def build(self, args, *rest, **kw):
            tried.append(args.batch_size)
            assert len(tried) < 20, f'still fitting after {tried}'
            if where == 'build' and args.batch_size > fits:
                raise torch.OutOfMemoryError('simulated: CUDA out of memory')
            self.batch_size = args.batch_size
            return init(self, args, *rest, **kw)

        def train_step(self, data, target):
            if where == 'step' and self.batch_size > fits:
                raise torch.OutOfMemoryError('simulated: CUDA out of memory')
            return step(self, data, target)
        init, step = gpu_check.Trainer.__init__, gpu_check.Trainer.train_step
        monkeypatch.setattr(gpu_check.Trainer, '__init__', build)
        monkeypatch.setattr(gpu_check.Trainer, 'train_step', train_step)
        return lambda: gpu_check.time_fitting([*gpu_check.TINY, '--batch_size', '22'], torch.device('cpu'), 1)
    return out_of_memory_above, tried


@pytest.mark.parametrize('where', ['build', 'step'])
def test_the_batch_is_halved_until_it_fits(fitting, where):
    """An out-of-memory error in the first trainer build raised UnboundLocalError."""
    out_of_memory_above, tried = fitting
    targs, seconds, losses = out_of_memory_above(5, where)()
    assert tried == [22, 11, 5] and targs.batch_size == 5 and seconds > 0 and len(losses) == 3


@pytest.mark.parametrize('where', ['build', 'step'])
def test_when_not_even_a_batch_of_1_fits_it_says_so(fitting, where):
    """The batch halved to 0, which meant the flags' own 22 again: the fitting looped forever."""
    out_of_memory_above, tried = fitting
    with pytest.raises(torch.OutOfMemoryError, match='not even a batch of 1 fits: simulated'):
        out_of_memory_above(0, where)()
    assert tried == [22, 11, 5, 2, 1]
