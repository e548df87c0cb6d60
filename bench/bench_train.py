"""Training-step benchmark: throughput, model FLOPs, and the bf16 loss check.

1. Throughput: tokens/s of one optimizer step as train.py takes it (forward and
   backward of MemTransformerLM, gradient clipping, Adam), after warm-up, median
   of repeated steps, with a full memory. Configurations: a CPU-sized model,
   dense and MoE (16 and 64 experts, top-2), and the enwik8 base shape at
   tgt_len 128; fp32 and bf16 autocast of one configuration run side by side,
   as do the plain paths (the original's attention arithmetic from
   tests/reference_attention.py, nn.Dropout, no SDPA) for the dense CPU model,
   so their ratios are measured under the same load.
2. Model FLOPs per token (bench/flops.py) and the achieved fraction of the
   matrix-product peak measured in the same run.
3. bf16 against fp32 on real text: the same model, data and seed trained for
   --loss-steps steps in each precision; their training losses over the last
   steps and their held-out losses are compared.

    python bench/bench_train.py [--quick] [--json out.json]
"""
import argparse
import math
import statistics
import zipfile

import torch

from timing import (SAMPLE, add_common_args, check_common_args, describe, machine, matmul_products,
                    time_side_by_side, write_json)
import original
from flops import flops_per_token
from report import print_loss_check
from steps import (CLIP, CONFIGS, DROPATT, DROPOUT, DTYPES, MOE_VS_DENSE, TrainStep, add_train_args, build_model,
                   check_train_args, random_batch, trainer_args)
from utils import malloc
from run.trainer import build_optimizer


class OriginalStep:
    """The original Transformer-XL's model with the same weights as TrainStep's, stepped as the original
    train.py did (loss mean, backward, clip, step), with train.py's optimizer and autocast."""

    def __init__(self, module, config, dtype='fp32', seed=0):
        ours = build_model(config, seed)
        self.model = original.build_model(module, config, DROPOUT, DROPATT, ours.state_dict()).train()
        self.optimizer = build_optimizer(trainer_args(dtype), self.model)
        self.amp_dtype, self.mems, self.batch = DTYPES[dtype], (), random_batch(config, seed)

    def __call__(self):
        self.model.zero_grad()
        with torch.autocast('cpu', dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            ret = self.model(self.batch[:-1], self.batch[1:], *self.mems)
            loss = ret[0].float().mean()
        self.mems = ret[1:]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        return loss.item()


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
                             vs_fp32=seconds.get(('fp32', path), math.nan) / s,
                             vs_fp32_range=seconds.ratio_range(('fp32', path), (dtype, path))
                             if ('fp32', path) in seconds else None))
        del variants
    return rows


def same_function(ours, theirs, batch):
    """Largest difference of the two models' per-token losses in evaluation (no dropout): the rows compare
    the same computation."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(batch[:-1], batch[1:])[0] - theirs(batch[:-1], batch[1:])[0]).abs().max().item()
    ours.train(), theirs.train()
    return diff


def versus_original(dtypes, repeats, warmup, config_name='cpu-dense'):
    """Row (a): train.py's step against the original's model stepped the original's way, with the same
    weights, batch and optimizer, side by side. [] when the original's code is absent."""
    module = original.load()
    if module is None:
        return []
    config, rows = CONFIGS[config_name], []
    for dtype in dtypes:
        steps = {'train.py': TrainStep(config, dtype), 'original': OriginalStep(module, config, dtype)}
        diff = same_function(steps['train.py'].model, steps['original'].model, steps['original'].batch)
        seconds = time_side_by_side(steps, repeats, warmup)
        rows.append(dict(config=config_name, dtype=dtype, ms=seconds['train.py'] * 1e3,
                         original_ms=seconds['original'] * 1e3, speedup=seconds['original'] / seconds['train.py'],
                         speedup_range=seconds.ratio_range('original', 'train.py'),
                         max_loss_diff=diff))
    return rows


def moe_versus_dense(dtypes, repeats, warmup, threads=(1, 2)):
    """Rows (c) and (d): the 64-expert step against the dense step of equal active FLOPs, side by side, at
    each thread count (every dtype on the first, fp32 on the others), and the optimizer's share of each
    step (its step hooks' time over the step's); on the first thread count in fp32 also the 64-expert step
    with the per-parameter Adam train.py used before."""
    moe, dense = MOE_VS_DENSE
    rows, saved = [], torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            for dtype in dtypes if n == threads[0] else dtypes[:1]:
                steps = {dense: TrainStep(CONFIGS[dense], dtype), moe: TrainStep(CONFIGS[moe], dtype)}
                if n == threads[0] and dtype == 'fp32':
                    steps[moe + ', per-parameter Adam'] = TrainStep(CONFIGS[moe], dtype,
                                                                    optimizer='per-parameter loop')
                seconds = time_side_by_side(steps, repeats, warmup)
                for name, step in steps.items():
                    optimizer_s = statistics.median(step.clock.seconds[warmup:])
                    config = CONFIGS[name.split(',')[0]]
                    rows.append(dict(threads=n, dtype=dtype, step=name, ms=seconds[name] * 1e3,
                                     gflop_per_token=flops_per_token(config) / 1e9,
                                     optimizer_ms=optimizer_s * 1e3, optimizer_share=optimizer_s / seconds[name],
                                     vs_dense=seconds[dense] / seconds[name],
                                     vs_dense_range=seconds.ratio_range(dense, name)))
                del steps
    finally:
        torch.set_num_threads(saved)
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
            curves[dtype].append(float(run(batch)))  # a plain number: the figures go to JSON
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


def print_original(rows):
    if not rows:
        print(f'(a) skipped: the original Transformer-XL is not at {original.WHERE}')
    for r in rows:
        print(f"(a) {r['config']} {r['dtype']}: train.py step {r['ms']:.0f} ms, the original's model "
              f"{r['original_ms']:.0f} ms: {r['speedup']:.2f}x (same weights, batch and optimizer; losses "
              f"within {r['max_loss_diff']:.1e} in evaluation)")


def print_moe_versus_dense(rows):
    print(f"{'threads':>7} {'dtype':>5} {'step':>31} {'ms':>7} {'x dense':>7} {'optimizer ms':>12} {'share':>6}")
    for r in rows:
        print(f"{r['threads']:>7} {r['dtype']:>5} {r['step']:>31} {r['ms']:>7.0f} {r['vs_dense']:>7.2f} "
              f"{r['optimizer_ms']:>12.1f} {100 * r['optimizer_share']:>5.0f}%")
    print('(c) x dense: the dense step time over this step\'s (throughput ratio, equal active FLOPs); '
          '(d) share: optimizer.step() time over the step\'s')


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
    print(malloc.tune() or 'malloc: not glibc, left alone')   # as train.py does at start-up
    print(describe(machine()))
    rows = throughput(args.configs, args.dtypes, args.repeats, args.warmup, compiled=args.compiled)
    print_rows(rows)
    versus = versus_original(args.dtypes, args.repeats, args.warmup)
    print_original(versus)
    moe = moe_versus_dense(args.dtypes, args.repeats, args.warmup)
    print_moe_versus_dense(moe)
    check = bf16_loss_check(args.loss_steps) if args.loss_steps else None
    if args.loss_steps:
        print_loss_check(check)
    if args.json:
        write_json(args.json, dict(machine=machine(), rows=rows, versus_original=versus, moe_versus_dense=moe,
                                   bf16_loss_check=check))


if __name__ == '__main__':
    main()
