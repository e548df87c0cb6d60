"""One prepared check of the GPU paths: run it whenever a GPU is at hand.

    bash bench/gpu_check.sh [--out DIR]              # one CUDA GPU, about 8 minutes
    bash bench/gpu_check.sh --dry-run [--out DIR]    # the same parts on the CPU, tiny shapes, under a minute

Prints one line per check and writes DIR/gpu_check.json (default /tmp/gpu_check): the device and versions;
the CUDA test tier's result; train.py on the enwik8 sample for 40 steps in bf16 and in fp16 (the loss must
fall), killed with SIGKILL and resumed with --restart; eval.py and generate.py on the trained run; the
training-step throughput of train.py's Trainer on the enwik8-base shape (12 x 512, d_inner 2048, tgt/mem 512,
batch 22 or the largest that fits), dense and with 64 experts (top-2, d_inner 1024 each), in fp32, tf32 and
bf16, as tokens/s and as a fraction of the bf16 matrix-product peak measured in the same run; the dense bf16 step
with --deterministic (its cost, and whether two runs repeat bitwise); the MoE layer on each expert path
(grouped_mm, tiles, slices; bf16, fp16, fp32, TF32) against the per-expert slices; the host synchronisations of
one training step. A part that fails is recorded and the others still run. Nothing in the repository is written;
runs go to DIR/work.

The dry run exercises every part's logic on the CPU (tests/test_gpu_check.py runs it); its figures mean nothing.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timing import ROOT, write_json
from flops import flops_per_token
import moe
from run import options
from run.options import build_model, build_parser, parse
from run.trainer import Trainer
from utils.exp_utils import CUBLAS_DETERMINISTIC, set_deterministic

# Ops that read a device value back to the host (each a synchronisation on a GPU).
SYNC_OPS = {'_local_scalar_dense', 'is_nonzero', 'nonzero', 'masked_select', 'unique', 'item'}
SAMPLE = ROOT / 'samples' / 'enwik8-sample.zip'
# The enwik8-base shape (run_enwik8_base.sh) and FastMoE's 64-expert setting (run_enwik8_base_moe.sh).
BASE = ['--n_layer', '12', '--d_model', '512', '--n_head', '8', '--d_head', '64', '--d_inner', '2048',
        '--tgt_len', '512', '--mem_len', '512', '--batch_size', '22', '--dropout', '0.1']
TINY = ['--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16', '--d_inner', '64',
        '--tgt_len', '16', '--mem_len', '16', '--batch_size', '4', '--dropout', '0.1']
DEMO = ['--n_layer', '4', '--d_model', '128', '--n_head', '4', '--d_head', '32', '--d_inner', '256',
        '--tgt_len', '64', '--mem_len', '64', '--batch_size', '16', '--dropout', '0.1']  # demo.sh's model
MOE64 = ['--d_inner', '1024', '--moe', '--moe-num-expert', '64', '--moe-top-k', '2']
MOE_TINY = ['--d_inner', '32', '--moe', '--moe-num-expert', '8', '--moe-top-k', '2']


class Check:
    """The JSON record: one entry per check, each with ok (True/False/None for a figure) and its details."""

    def __init__(self, out):
        self.path = os.path.join(out, 'gpu_check.json')
        self.record = {'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'checks': {}}

    def __call__(self, name, ok, **details):
        self.record['checks'][name] = dict(ok=ok, **details)
        shown = ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in details.items())
        print(f'{"ok  " if ok else "FAIL" if ok is False else "    "} {name}: {shown}', flush=True)
        write_json(self.path, self.record)  # after every check: a part that hangs keeps what came before

    def part(self, name, fn, *args):
        start = time.time()
        try:
            fn(*args)
        except Exception as e:  # recorded; the other parts still run
            traceback.print_exc()
            self(f'{name} crashed', False, error=f'{type(e).__name__}: {str(e)[:300]}')
        print(f'-- {name}: {time.time() - start:.1f} s', flush=True)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- parts

def part_env(check, device):
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(device),
                python=sys.version.split()[0])
    if device.type == 'cuda':
        info.update(name=torch.cuda.get_device_name(device),
                    capability='.'.join(map(str, torch.cuda.get_device_capability(device))),
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1))
    for name, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16), ('fp16', torch.float16)):
        info[f'grouped_mm_{name}'] = moe.grouped_mm_available(device, dtype)
    check('env', None, **info)


def part_tests(check, device):
    """The CUDA test tier: the device-parametrized fast-path tests and the GPU-against-CPU comparison."""
    done = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-k', 'cuda',
                           'tests/test_cuda.py', 'tests/test_fast_paths.py', 'tests/test_moe.py'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    counts = {word: int(n) for n, word in re.findall(r'(\d+) (passed|failed|skipped|error)', summary)}
    # On the CPU every CUDA test must skip; on a GPU they must run and pass.
    ran = counts.get('passed', 0) + counts.get('failed', 0) + counts.get('error', 0)
    ok = done.returncode in (0, 5) and not counts.get('failed') and (ran > 0) == (device.type == 'cuda')
    check('cuda test tier', ok, summary=summary)


def train_flags(args, work, *more):
    return [sys.executable, 'train.py', '--data', os.path.join(args.out, 'data'), '--dataset', 'enwik8',
            '--work_dir', os.path.join(args.out, 'work', work), *(['--cuda'] if args.device == 'cuda' else []),
            *args.model, '--moe', '--moe-num-expert', '8', '--moe-top-k', '2', '--lr', '0.002', '--warmup_step', '5',
            '--scheduler', 'constant',
            '--seed', '1', '--log-interval', '1', '--eval-interval', '100000', '--max_eval_steps', '5',
            '--eval_tgt_len', '32', '--save-interval', str(args.kill_at // 2), '--max_step', str(args.steps),
            *more]


def train_losses(args, work):
    path = os.path.join(args.out, 'work', work, 'metrics.jsonl')
    return [r['loss'] for r in map(json.loads, open(path)) if r['split'] == 'train']


def part_train(check, args):
    subprocess.run([sys.executable, 'prep_enwik8.py', '--input', str(SAMPLE), '--out',
                    os.path.join(args.out, 'data'), '--valid', '100000', '--test', '100000', '--no-raw', '--force'],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    for name, precision in (('bf16', ['--amp', 'bf16']), ('fp16', ['--amp', 'fp16'])):
        done = subprocess.run(train_flags(args, name, *precision), cwd=ROOT, capture_output=True, text=True,
                              timeout=args.timeout)
        losses = train_losses(args, name) if done.returncode == 0 else []
        falling = len(losses) > 4 and sum(losses[-3:]) < sum(losses[:3])
        check(f'train {name}', done.returncode == 0 and falling, rc=done.returncode, steps=len(losses),
              first=losses[0] if losses else None, last=losses[-1] if losses else None,
              stderr=done.stderr.strip().splitlines()[-1][:200] if done.returncode else '')

    # SIGKILL once step kill_at is logged, then --restart: the losses after it against the uninterrupted run.
    proc = subprocess.Popen(train_flags(args, 'killed', '--amp', 'bf16'), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + args.timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if len(train_losses(args, 'killed')) >= args.kill_at:
                break
        except OSError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(train_losses(args, 'killed'))
    done = subprocess.run(train_flags(args, 'killed', '--amp', 'bf16', '--restart'), cwd=ROOT,
                          capture_output=True, text=True, timeout=args.timeout)
    resumed, whole = train_losses(args, 'killed'), train_losses(args, 'bf16')
    diff = max((abs(a - b) for a, b in zip(resumed, whole)), default=None)
    # Bitwise on the CPU; on a GPU atomics reorder sums, so the same trajectory up to rounding.
    ok = done.returncode == 0 and len(resumed) == len(whole) and diff is not None and \
        diff <= (0 if args.device == 'cpu' else 0.05)
    check('kill and --restart', ok, killed_after_step=killed_at, rc=done.returncode, max_loss_diff=diff)

    cuda = ['--cuda'] if args.device == 'cuda' else []
    work = os.path.join(args.out, 'work', 'bf16')
    done = subprocess.run([sys.executable, 'eval.py', '--work_dir', work, '--split', 'test', '--tgt_len', '32',
                           '--mem_len', '64', '--clamp_len', '64', *cuda], cwd=ROOT, capture_output=True,
                          text=True, timeout=args.timeout)
    bpc = re.search(r'test bpc +([\d.]+)', done.stdout)
    check('eval.py', done.returncode == 0 and bpc is not None, bpc=float(bpc.group(1)) if bpc else None)
    done = subprocess.run([sys.executable, 'generate.py', '--work_dir', work, '--prompt', '<title>',
                           '--max_tokens', '32', '--seed', '1', *cuda], cwd=ROOT, capture_output=True, text=True,
                          timeout=args.timeout)
    check('generate.py', done.returncode == 0 and len(done.stdout.strip()) > 0,
          text=done.stdout.strip()[-60:] if done.returncode == 0 else done.stderr.strip()[-200:])


def make_trainer(flags, device, n_token=204):
    """train.py's Trainer (optimizer, scaler, clipping, memory) for a model given by train.py flags."""
    config = parse(['--log-interval', '1000000', *(['--cuda'] if device.type == 'cuda' else []), *flags])
    return Trainer(config, build_model(config.flags, n_token), device, print, None), config.flags


def batch_for(args, device, n_token=204):
    data = torch.randint(0, n_token, (args.tgt_len + 1, args.batch_size), device=device)
    return data[:-1], data[1:]


def model_config(args, n_token=204):
    return dict(options.model_config(args, n_token), bsz=args.batch_size)


def matmul_peak(device, dtype, n, repeats):
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def time_steps(trainer, data, target, device, repeats):
    """Seconds per training step after two warm-up steps, and the losses of all the steps (read after timing)."""
    losses = [trainer.train_step(data, target) for _ in range(2)]
    sync(device)
    start = time.perf_counter()
    losses += [trainer.train_step(data, target) for _ in range(repeats)]
    sync(device)
    return (time.perf_counter() - start) / repeats, [float(loss) for loss in losses]


def time_fitting(flags, device, repeats):
    """train.py's step for these flags at their batch, halved until it fits: (args, seconds per step, losses).
    OutOfMemoryError if not even a batch of 1 fits."""
    batch = build_parser().parse_args(flags).batch_size
    while True:
        try:
            trainer, targs = make_trainer([*flags, '--batch_size', str(batch)], device)
            return (targs, *time_steps(trainer, *batch_for(targs, device), device, repeats))
        except torch.OutOfMemoryError as e:
            if batch == 1:
                raise torch.OutOfMemoryError(f'not even a batch of 1 fits: {str(e)[:200]}') from None
        # Out of the except block, whose traceback holds the failed step's tensors: now they can be freed.
        trainer = None
        torch.cuda.empty_cache()
        batch //= 2


def part_throughput(check, args, device):
    peak = matmul_peak(device, torch.bfloat16, 8192 if device.type == 'cuda' else 256, args.repeats)
    check('bf16 matrix-product peak', None, tflops=peak)
    tokens_per_s = {}
    for precision in ('fp32', 'tf32', 'bf16'):
        torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
        # dense d_inner 2048 and 64 experts top-2 of d_inner 1024: the same active FLOPs per token
        for name, extra in (('dense', []), ('moe64', MOE64 if device.type == 'cuda' else MOE_TINY)):
            flags = [*args.model, *extra, *(['--amp', 'bf16'] if precision == 'bf16' else [])]
            targs, seconds, _ = time_fitting(flags, device, args.repeats)  # the original's batch where it fits
            tokens = targs.tgt_len * targs.batch_size
            tokens_per_s[name] = tokens / seconds
            tflops = flops_per_token(model_config(targs)) * tokens / seconds / 1e12
            check(f'train step {name} {precision}', None, batch=targs.batch_size, tokens_per_s=tokens / seconds,
                  tflops=tflops, bf16_peak_fraction=tflops / peak)
        check(f'train step moe64/dense {precision}', None, tokens_per_s_ratio=tokens_per_s['moe64'] /
              tokens_per_s['dense'])
    torch.backends.cuda.matmul.allow_tf32 = False


def part_deterministic(check, args, device):
    """train.py --deterministic on the enwik8-base dense step in bf16: its cost against the default kernels,
    measured side by side, and its promise: the same steps from the same seed twice give bitwise the same losses.
    An op of the step without a deterministic kernel on this device raises here (the part fails)."""
    flags = [*args.model, '--amp', 'bf16']
    seconds, losses = {}, {}
    try:
        for run in ('default', 'deterministic', 'deterministic again'):
            set_deterministic(run != 'default')
            torch.manual_seed(1)  # weights, batch and dropout
            targs, seconds[run], losses[run] = time_fitting(flags, device, args.repeats)
    finally:
        set_deterministic(False)
    check('train step dense bf16 deterministic', losses['deterministic'] == losses['deterministic again'],
          batch=targs.batch_size, tokens_per_s=targs.tgt_len * targs.batch_size / seconds['deterministic'],
          time_ratio=seconds['deterministic'] / seconds['default'],
          losses_as_default_kernels=losses['default'] == losses['deterministic'])


def part_moe_layer(check, args, device):
    """The MoE layer alone (forward and backward) on each expert path, same weights: its time per dtype, the path
    'auto' takes, and each no-host-sync path (grouped_mm, tiles) against the per-expert slices. On CUDA: bf16,
    fp16, fp32 and TF32 (the dtypes users train in); the dry run: fp32. Check names without a dtype are the
    default one's (bf16 on CUDA, fp32 on the CPU)."""
    cuda = device.type == 'cuda'
    n_tok, d_model, d_hidden, n_exp = (22 * 512, 512, 1024, 64) if cuda else (256, 32, 64, 8)
    precisions = ('bf16', 'fp16', 'fp32', 'tf32') if cuda else ('fp32',)
    x = torch.randn(n_tok, d_model, device=device)
    for precision in precisions:
        dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision, torch.float32)
        prefix = 'moe layer ' if precision == precisions[0] else f'moe layer {precision} '
        with tf32_matmuls(precision == 'tf32'):
            results = moe_layer_paths(check, args, device, x, dtype, prefix, (n_exp, d_model, d_hidden))
        loose = cuda and precision != 'fp32'   # TF32 and half precisions: about one bf16/fp16 ulp apart
        for path in ('grouped_mm', 'tiles'):
            if path in results:
                # One tensor of relative differences, so that a NaN anywhere makes the maximum NaN (and the check fail).
                diff = torch.stack([(a - b).abs().max() / b.abs().max().clamp(min=1e-12)
                                    for a, b in zip(results[path], results['slices'])]).max().item()
                check(f'{prefix}{path} = slices', diff < (2e-2 if loose else 1e-4 if cuda else 1e-5),
                      max_rel_diff=diff)


class tf32_matmuls:
    """TF32 matrix products on (or off) inside, as train.py's --tf32 sets them; the previous setting after."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.before


def moe_layer_paths(check, args, device, x, dtype, prefix, shape):
    """Time one forward+backward of the layer on each backend ('auto' first, then each path it may take);
    returns each path's output and expert gradients (in fp32)."""
    n_exp, d_model, d_hidden = shape
    results = {}
    for backend in ('auto', 'grouped_mm', 'tiles', 'slices'):
        if backend == 'grouped_mm' and not moe.grouped_mm_fits(device, dtype, (d_model, d_hidden)):
            check(f'{prefix}grouped_mm', None, note=f'does not run fast for {dtype} here')
            continue
        torch.manual_seed(0)   # the same weights for every backend
        layer = moe.FMoETransformerMLP(n_exp, d_model, d_hidden, top_k=2, expert_backend=backend).to(device)

        def step():
            layer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = layer(x)[0]
            out.float().square().mean().backward()
            return out

        out = step()
        if backend != 'auto':
            results[backend] = [out.float()] + [p.grad.float() for p in layer.experts.parameters()]
        sync(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        sync(device)
        check(f'{prefix}{backend}', None, ms=(time.perf_counter() - start) / args.repeats * 1e3,
              **({'path': layer._expert_path(device, dtype)} if backend == 'auto' else {}))
    return results


class SyncCount(TorchDispatchMode):
    """The ops that read a value of a tensor on `device` back to the host (on a GPU, each a synchronisation;
    on the CPU, where they cost nothing, they are counted all the same)."""

    def __init__(self, device):
        super().__init__()
        self.device, self.ops = device, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split('.')[0]
        if name in SYNC_OPS and any(isinstance(a, torch.Tensor) and a.device.type == self.device.type
                                    for a in args):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def part_syncs(check, args, device):
    """Host reads in one training step between log intervals: ops that read a value back (any device) and,
    on CUDA, what torch.cuda's sync debug mode reports."""
    amp = ['--amp', 'bf16'] if device.type == 'cuda' else []
    # 'moe fp32': the MoE run scripts as they are (no --amp), on the tiles where CUDA's grouped_mm is not one kernel
    for name, extra in (('dense', amp), ('moe', [*MOE_TINY, *amp]), ('moe fp32', MOE_TINY)):
        trainer, targs = make_trainer([*TINY, *extra], device)
        data, target = batch_for(targs, device)
        for _ in range(2):
            trainer.train_step(data, target)
        counter = SyncCount(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode('warn')
            try:
                with counter:
                    trainer.train_step(data, target)
            finally:
                if device.type == 'cuda':
                    torch.cuda.set_sync_debug_mode(0)
        reported = [str(w.message)[:80] for w in caught if 'synchroniz' in str(w.message)]
        check(f'host syncs in a {name} training step', None, read_back_ops=len(counter.ops),
              ops=','.join(sorted(set(counter.ops))), cuda_sync_warnings=len(reported))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default='/tmp/gpu_check', help='folder for gpu_check.json and the runs')
    p.add_argument('--dry-run', action='store_true', help='every part on the CPU with tiny shapes')
    p.add_argument('--skip', default='', help='comma-separated parts to leave out: ' + ', '.join(PARTS))
    args = p.parse_args(argv)
    unknown = set(filter(None, args.skip.split(','))) - set(PARTS)
    if unknown:
        p.error(f'--skip {",".join(sorted(unknown))}: unknown part; parts: {", ".join(PARTS)}')
    if not args.dry_run and not torch.cuda.is_available():
        p.error('no CUDA device is visible: run it on a GPU machine, or with --dry-run on the CPU')
    args.device = 'cpu' if args.dry_run else 'cuda'
    args.model = TINY if args.dry_run else BASE
    args.steps, args.kill_at = (8, 4) if args.dry_run else (40, 25)
    args.repeats = 2 if args.dry_run else 10
    args.timeout = 120 if args.dry_run else 240
    return args


PARTS = ('env', 'tests', 'train', 'throughput', 'deterministic', 'moe_layer', 'syncs')


def main(argv=None):
    args = parse_args(argv)
    # cuBLAS takes its workspace setting at the first product on the GPU: the deterministic one from the start
    # (for every row), so that part_deterministic can switch torch's deterministic mode on in this process.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_DETERMINISTIC[0])
    os.makedirs(os.path.join(args.out, 'work'), exist_ok=True)
    check = Check(args.out)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(0)
    check.record['dry_run'] = args.dry_run
    skip = set(args.skip.split(','))
    small = argparse.Namespace(**{**vars(args), 'model': TINY if args.dry_run else DEMO})  # for the train runs
    runs = dict(env=(part_env, check, device), tests=(part_tests, check, device), train=(part_train, check, small),
                throughput=(part_throughput, check, args, device),
                deterministic=(part_deterministic, check, args, device),
                moe_layer=(part_moe_layer, check, args, device), syncs=(part_syncs, check, args, device))
    for name, (fn, *fn_args) in runs.items():
        if name not in skip:
            check.part(name, fn, *fn_args)
    failed = [name for name, c in check.record['checks'].items() if c['ok'] is False]
    check.record['failed'] = failed
    write_json(check.path, check.record)
    print(f'{len(failed)} checks failed{": " + ", ".join(failed) if failed else ""}; wrote {check.path}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
