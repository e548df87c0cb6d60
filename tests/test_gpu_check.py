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
