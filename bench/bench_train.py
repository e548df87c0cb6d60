"""Training-step benchmark (issue 6, items 1 and 2, and the bf16 loss check).

1. Throughput: tokens/s of one optimizer step as train.py takes it (forward and
   backward of MemTransformerLM, gradient clipping, Adam), after warm-up, median
   of repeated steps, with a full memory. Configurations: a CPU-sized model,
   dense and MoE (16 and 64 experts, top-2), and the enwik8 base shape at
   tgt_len 128; fp32 and bf16 autocast of one configuration run side by side,
   as do the plain paths (mem_transformer's fast paths switched off) for the
   dense CPU model, so their ratios are measured under the same load.
2. Model FLOPs per token (bench/flops.py) and the achieved fraction of the
   matrix-product peak measured in the same run.
3. bf16 against fp32 on real text: the same model, data and seed trained for
   --loss-steps steps in each precision; their training losses over the last
   steps and their held-out losses are compared.

    python bench/bench_train.py [--quick] [--json out.json]
"""
import argparse
import contextlib
import math
import statistics
import zipfile

import torch

from timing import (ROOT, add_common_args, check_common_args, describe, machine, matmul_products,
                    time_side_by_side, write_json)
import mem_transformer as mt
from flops import flops_per_token

DTYPES = {'fp32': None, 'bf16': torch.bfloat16}
CPU_SIZED = dict(n_token=204, n_layer=4, n_head=4, d_model=256, d_head=64, d_inner=1024,
                 tgt_len=128, mem_len=128, bsz=8)
CONFIGS = {
    'cpu-dense': CPU_SIZED,
    'cpu-moe16': dict(CPU_SIZED, d_inner=512, moe=True, moe_num_expert=16, moe_top_k=2),
    'cpu-moe64': dict(CPU_SIZED, d_inner=512, moe=True, moe_num_expert=64, moe_top_k=2),
    # The enwik8 base model (run_enwik8_base.sh) at tgt_len = mem_len = 128 and batch 8.
    'enwik8-base': dict(CPU_SIZED, n_layer=12, n_head=8, d_model=512, d_head=64, d_inner=2048),
}
DROPOUT, DROPATT, LR, CLIP = 0.1, 0.0, 2.5e-4, 0.25  # run_enwik8_base.sh's
FAST_PATH_FLAGS = ('FAST_ATTENTION', 'USE_SDPA', 'FAST_DROPOUT', 'KV_CACHE')
SAMPLE = ROOT / 'samples' / 'enwik8-sample.zip'


@contextlib.contextmanager
def fast_paths(enabled):
    """Switch mem_transformer's fast paths on or off for the duration of a step
    (None leaves the flags as they are, for experiments with single flags)."""
    saved = {name: getattr(mt, name) for name in FAST_PATH_FLAGS}
    for name in FAST_PATH_FLAGS:
        setattr(mt, name, saved[name] if enabled is None else enabled)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mt, name, value)


def build_model(config, seed=0, dropout=DROPOUT):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.items() if k != 'bsz'}
    model = mt.MemTransformerLM(dropout=dropout, dropatt=DROPATT, ext_len=0, **kwargs)
    return mt.init_weights(model)


class TrainStep:
    """A model, its Adam optimizer and its memory; each call is one optimizer step,
    split into batch_chunk chunks (each with its own memory) as train.py does.
    paths: 'fast' (the default), 'plain' (fast paths off) or 'compiled' (fast, under
    torch.compile as train.py --compile; the first two calls compile)."""

    def __init__(self, config, dtype='fp32', paths='fast', batch_chunk=1, seed=0):
        self.model = build_model(config, seed).train()
        if paths == 'compiled':
            mt.maybe_compile(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)
        self.amp_dtype, self.fast, self.batch_chunk = DTYPES[dtype], paths != 'plain', batch_chunk
        self.mems = [() for _ in range(batch_chunk)]
        gen = torch.Generator().manual_seed(seed)
        self.batch = torch.randint(0, config['n_token'], (config['tgt_len'] + 1, config['bsz']),
                                   generator=gen)

    def __call__(self, batch=None):
        """One step on `batch` [tgt_len + 1, bsz] (inputs then shifted targets); returns the mean loss."""
        batch = self.batch if batch is None else batch
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.
        with fast_paths(self.fast):
            for i, chunk in enumerate(batch.chunk(self.batch_chunk, 1)):
                with torch.autocast('cpu', dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    out = self.model(chunk[:-1], chunk[1:], *self.mems[i])
                    loss = out[0].float().mean() + self.model.aux_loss()
                self.mems[i] = out[1:]
                (loss / self.batch_chunk).backward()
                total += loss.item() / self.batch_chunk
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        return total


def throughput(names, dtypes, repeats, warmup, plain=('cpu-dense',), compiled=()):
    """One row per configuration, dtype and path set. The steps of one configuration
    run side by side, together with the matrix products whose speed is the peak."""
    rows = []
    products, product_flops = matmul_products()
    for name in names:
        config = CONFIGS[name]
        paths = ['fast'] + ['plain'] * (name in plain) + ['compiled'] * (name in compiled)
        variants = {(dtype, p): TrainStep(config, dtype, p) for p in paths for dtype in dtypes}
        variants.update({('peak', dtype): products[dtype] for dtype in dtypes})
        seconds = time_side_by_side(variants, repeats, warmup)
        peaks = {dtype: product_flops / seconds.pop(('peak', dtype)) / 1e12 for dtype in dtypes}
        tokens, flops = config['tgt_len'] * config['bsz'], flops_per_token(config)
        for (dtype, path), s in seconds.items():
            tflops = flops * tokens / s / 1e12
            rows.append(dict(config=name, dtype=dtype, paths=path, ms=s * 1e3,
                             tokens_per_s=tokens / s, gflop_per_token=flops / 1e9, tflops=tflops,
                             peak_tflops=peaks[dtype], peak_fraction=tflops / peaks[dtype],
                             vs_fp32=seconds.get(('fp32', path), math.nan) / s))
        del variants
    return rows


def sample_text():
    """The committed enwik8 sample as token ids (its bytes, renumbered densely), or None."""
    if not SAMPLE.exists():
        return None
    with zipfile.ZipFile(SAMPLE) as z:
        raw = torch.frombuffer(bytearray(z.read('enwik8')), dtype=torch.uint8).long()
    table = torch.full((256,), -1, dtype=torch.long)
    symbols = torch.unique(raw)
    table[symbols] = torch.arange(len(symbols))
    return table[raw]


def batches(ids, bsz, tgt_len):
    """Consecutive [tgt_len + 1, bsz] batches of a stream cut into bsz columns (the original's order)."""
    columns = ids[:ids.numel() // bsz * bsz].view(bsz, -1).t()
    for i in range(0, columns.size(0) - 1 - tgt_len, tgt_len):
        yield columns[i:i + tgt_len + 1]


def heldout_loss(model, ids, config, max_batches=40):
    """Mean loss (nats/token) in fp32 evaluation over the first batches of held-out text."""
    model.eval()
    losses, mems = [], ()
    with torch.no_grad():
        for i, batch in enumerate(batches(ids, config['bsz'], config['tgt_len'])):
            if i == max_batches:
                break
            out = model(batch[:-1], batch[1:], *mems)
            losses.append(out[0].mean().item())
            mems = out[1:]
    model.train()
    return statistics.fmean(losses)


def bf16_loss_check(steps, config_name='cpu-dense', last=20):
    """Train the same model on the same text in fp32 and bf16; compare the losses at the end."""
    ids = sample_text()
    if ids is None:
        return None
    config = CONFIGS[config_name]
    split = ids.numel() * 9 // 10
    train, valid = ids[:split], ids[split:]
    runs = {dtype: TrainStep(config, dtype) for dtype in DTYPES}
    curves = {dtype: [] for dtype in DTYPES}
    for step, batch in enumerate(batches(train, config['bsz'], config['tgt_len'])):
        if step == steps:
            break
        for dtype, run in runs.items():
            curves[dtype].append(run(batch))
    last = min(last, len(curves['fp32']))
    tail = {dtype: statistics.fmean(c[-last:]) for dtype, c in curves.items()}
    heldout = {dtype: heldout_loss(run.model, valid, config) for dtype, run in runs.items()}
    return dict(config=config_name, steps=len(curves['fp32']), last=last, first_loss=curves['fp32'][0],
                train_loss=tail, heldout_loss=heldout,
                train_rel_diff=abs(tail['bf16'] - tail['fp32']) / tail['fp32'],
                heldout_rel_diff=abs(heldout['bf16'] - heldout['fp32']) / heldout['fp32'])


def print_rows(rows):
    print(f"{'config':>12} {'dtype':>5} {'paths':>8} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/tok':>9} "
          f"{'TFLOP/s':>8} {'peak':>6} {'% peak':>6} {'x fp32':>6}")
    for r in rows:
        print(f"{r['config']:>12} {r['dtype']:>5} {r['paths']:>8} {r['ms']:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['gflop_per_token']:>9.4f} {r['tflops']:>8.3f} {r['peak_tflops']:>6.3f} "
              f"{100 * r['peak_fraction']:>6.0f} {r['vs_fp32']:>6.2f}")
    print('peak: TFLOP/s of a 2048^3 matrix product in the same dtype, timed side by side with the steps')


def print_loss_check(check):
    if check is None:
        print(f'bf16 loss check skipped: {SAMPLE} not found')
        return
    print(f"bf16 vs fp32 on the enwik8 sample, {check['config']}, {check['steps']} steps "
          f"(loss at step 1: {check['first_loss']:.3f} nats):")
    for what in ('train', 'heldout'):
        loss = check[f'{what}_loss']
        label = f"mean training loss of the last {check['last']} steps" if what == 'train' \
            else 'held-out loss (fp32 evaluation)'
        print(f"  {label}: fp32 {loss['fp32']:.4f}, bf16 {loss['bf16']:.4f}, "
              f"relative difference {100 * check[f'{what}_rel_diff']:.2f}%")


def add_train_args(p):
    """The options of the training-step benchmark that run_all.py takes too."""
    p.add_argument('--loss-steps', type=int, default=200, help='steps of the bf16 loss check (0 skips it)')
    p.add_argument('--compile', action='store_true',
                   help='add torch.compile rows (train.py --compile) for cpu-dense; compiling takes minutes')


def check_train_args(p, args):
    if args.loss_steps < 0:
        p.error(f'--loss-steps must be >= 0, got {args.loss_steps}')
    if args.quick:
        args.loss_steps = min(args.loss_steps, 40)
    args.compiled = ('cpu-dense',) if args.compile else ()   # the configurations with compiled rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--configs', nargs='+', choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    add_train_args(p)
    add_common_args(p, repeats=10)
    args = p.parse_args(argv)
    check_common_args(p, args)
    check_train_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    print(describe(machine()))
    rows = throughput(args.configs, args.dtypes, args.repeats, args.warmup, compiled=args.compiled)
    print_rows(rows)
    check = bf16_loss_check(args.loss_steps) if args.loss_steps else None
    if args.loss_steps:
        print_loss_check(check)
    if args.json:
        write_json(args.json, dict(machine=machine(), rows=rows, bf16_loss_check=check))


if __name__ == '__main__':
    main()
