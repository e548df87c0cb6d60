"""FastMoE's own test suite (laekov/fastmoe tests/, unmodified, in ../shared/reference/fastmoe) against compat/fmoe.

1. The shared harness (../shared/tools/fastmoe_suite/run.sh, strict mode) on the files that test the layer on one
   process; every collected test must pass, or skip for FastMoE's own reason.
2. test_ddp.py's multi-process tests with 2 processes on gloo: the harness counts the CPU as one device (so they
   skip), so this file sets up the same kind of environment itself with two CPU "devices": a venv of its own whose
   .pth loads the harness's CUDA -> CPU mapping (its py/fmoe_suite_cpu.py, unchanged) and then sets
   torch.cuda.device_count() to 2. FastMoE's tests/ is copied as it is, its own moe.py included (first on sys.path:
   the shim must not pick it up). FastMoE's benchmark_mlp.py runs there to its end too.

Skipped when ../shared (or $FASTMOE_SHARED) lacks FastMoE. CI runs a subset that fits its time budget;
FASTMOE_SUITE_FULL=1 runs every in-scope file and test (about 4 minutes on 2 cores).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('FASTMOE_SHARED', REPO / '..' / 'shared'))
FASTMOE = SHARED / 'reference' / 'fastmoe'
HARNESS = SHARED / 'tools' / 'fastmoe_suite'
FULL = os.environ.get('FASTMOE_SUITE_FULL') == '1'

pytestmark = pytest.mark.skipif(not (FASTMOE / 'tests').is_dir() or not (HARNESS / 'run.sh').is_file(),
                                reason=f'FastMoE\'s tests or the harness are not under {SHARED} (set FASTMOE_SHARED)')

# file: (collected, passed, failed, skipped, errors, collection errors), as the harness's summary counts them
EXPECTED = {
    'test_numerical.py': (40, 40, 0, 0, 0, 0),
    'test_mimo.py': (32, 32, 0, 0, 0, 0),
    'test_dp.py': (4, 4, 0, 0, 0, 0),
    'test_zero.py': (2, 2, 0, 0, 0, 0),
    'test_gates.py': (8, 6, 0, 2, 0, 0),   # n_expert=1 skips: "No enough experts", FastMoE's own condition
}
CI_FILES = ('test_numerical.py', 'test_mimo.py', 'test_zero.py')
TORCH_SITE = Path(torch.__file__).resolve().parents[1]


def summary_counts(summary):
    """{file: counts} from the harness's summary.md table."""
    rows = re.findall(r'^\| (test_\w+\.py) \|((?: \d+ \|)+)$', summary, re.M)
    return {name: tuple(int(n) for n in cells.split('|') if n.strip()) for name, cells in rows}


@pytest.fixture(scope='module')
def harness_run(tmp_path_factory):
    files = tuple(EXPECTED) if FULL else CI_FILES
    work = tmp_path_factory.mktemp('fastmoe_suite')
    env = dict(os.environ, PY=sys.executable, WORK=str(work), FILE_TIMEOUT='600')
    out = subprocess.run(['bash', str(HARNESS / 'run.sh'), '--files', ' '.join(files), str(REPO)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return files, work / 'results'


def test_fastmoes_suite_passes_in_strict_mode(harness_run):
    files, results = harness_run
    counts = summary_counts((results / 'summary.md').read_text())
    assert counts == {name: EXPECTED[name] for name in files}, (results / 'summary.md').read_text()


def test_fastmoes_benchmark_runs_the_shims_layer(harness_run):
    """benchmark_mlp.py at the harness's size (top_k 2): FMoETransformerMLP runs its forwards and backwards. The
    script's second half, its brute-force reference, fails there by itself: BruteForceMoE repeats the input
    top_k times and then its BruteForceMoELinear repeats it again (see the test below for top_k 1)."""
    log = (harness_run[1] / 'benchmark_mlp.log').read_text()
    assert re.search(r'Performance test of FMoETransformerMLP .*\nTime mean/max/stdev/back [\d. ]+ ms', log), log


# FastMoE's worker processes (started by test_ddp._run_distributed, which sets OMPI_COMM_WORLD_RANK) end through
# the interpreter's finalization with their gloo process group alive, and gloo's threads then abort now and then
# ("terminate called without an active exception", exit -6) after the work is done and checked: the repository's
# own scripts leave through os._exit under torchrun for the same reason (run.distributed.exit_process). These
# workers do the same: after every other exit handler, flush and leave with 1 if an exception went uncaught, else 0.
WORKER_EXIT = """import atexit, os, sys
if 'OMPI_COMM_WORLD_RANK' in os.environ:
    _uncaught = []
    _excepthook = sys.excepthook

    def _record(*exc_info):
        _uncaught.append(exc_info[0])
        _excepthook(*exc_info)

    def _leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if _uncaught else 0)
    sys.excepthook = _record
    atexit.register(_leave)
"""


@pytest.fixture(scope='module')
def two_device_tests(tmp_path_factory):
    """FastMoE's tests/ as it is, and a venv of their own whose Python processes see the shim as `fmoe`, the
    harness's CUDA -> CPU mapping and two devices. Returns (run(args...) -> CompletedProcess, tests folder)."""
    work = tmp_path_factory.mktemp('fastmoe_two_devices')
    tests = work / 'tests'
    shutil.copytree(FASTMOE / 'tests', tests, ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(work / 'venv')], check=True)
    python = work / 'venv' / 'bin' / 'python'
    site = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / 'fastmoe_worker_exit.py').write_text(WORKER_EXIT)
    (Path(site) / 'fastmoe_two_devices.pth').write_text('\n'.join([
        str(TORCH_SITE), str(REPO / 'compat'), str(HARNESS / 'py'),
        'import sys; sys.dont_write_bytecode = True; import fmoe_suite_cpu, torch, fastmoe_worker_exit; '
        'torch.cuda.device_count = lambda: 2', '']))
    # test_ddp's launcher copies LD_LIBRARY_PATH into its processes' environment and fails when it is unset
    env = dict(os.environ, LD_LIBRARY_PATH=os.environ.get('LD_LIBRARY_PATH') or str(TORCH_SITE / 'torch' / 'lib'))
    env.pop('PYTHONPATH', None)

    def run(*args, extra_env=None):
        return subprocess.run([str(python), *args], cwd=tests, env=dict(env, **(extra_env or {})),
                              capture_output=True, text=True, timeout=1200)
    return run


# test_fmoe_distributed (FMoE with expert modules over 2 processes) is left out: its body asserts
# `para.device.type == 'cuda'` on the experts' parameters, which no CPU run can satisfy.
DDP_TESTS_CI = 'local_ddp or linear_distributed and torch.float32-1-32-16-4-2-4'
DDP_TESTS_FULL = 'local_ddp or linear_distributed'


def test_fastmoes_two_process_tests_pass_on_gloo(two_device_tests):
    """test_fmoe_local_ddp (DistributedGroupedDataParallel's per-group gradient averaging) and
    test_fmoe_linear_distributed (FMoE with fused experts, expert parallelism over 2 processes: all_to_all of the
    rows, gradients back) with 2 processes; their 4-process variants (mp_size 2) skip with FastMoE's message."""
    out = two_device_tests('-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rs', 'test_ddp.py',
                           '-k', DDP_TESTS_FULL if FULL else DDP_TESTS_CI)
    assert out.returncode == 0, out.stdout[-5000:]
    passed, skipped = (6 + 1, 6 + 1) if FULL else (2, 1)
    assert f'{passed} passed, {skipped} skipped' in out.stdout, out.stdout[-3000:]
    assert f'SKIPPED [{skipped}] test_ddp.py:33: No enough GPU, only 2 found' in out.stdout, out.stdout[-3000:]


@pytest.mark.skipif(not FULL, reason='FASTMOE_SUITE_FULL=1 only: its brute-force half is slow')
def test_fastmoes_benchmark_runs_to_its_end_with_top_1(two_device_tests):
    out = two_device_tests('benchmark_mlp.py', extra_env=dict(WORLD_SIZE='1', BATCH_SIZE='64', D_MODEL='16',
                                                              D_HIDDEN='32', NUM_EXPERT='4', TOP_K='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    timings = re.findall(r'Performance test of (\w+) .*\nTime mean', out.stdout)
    assert timings == ['FMoETransformerMLP', 'BruteForceMoE'], out.stdout
