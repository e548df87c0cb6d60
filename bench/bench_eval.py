"""Evaluation benchmark with the long-memory settings.

enwik8's evaluation settings (run_enwik8_base.sh: tgt_len 80, mem_len 2100,
clamp_len 820, same_length) on the CPU-sized model of bench/steps.py, batch 10
(eval.py's default), under torch.no_grad as eval.py runs. The memory is full
from the first timed segment (2100 states per layer), so every segment costs
what it costs in the middle of a test set. fp32 and bf16 autocast, fast and
plain paths (mem_transformer's fast paths switched off), side by side.

    python bench/bench_eval.py [--quick] [--json out.json]
"""
import argparse

import torch

from timing import add_common_args, check_common_args, describe, machine, time_side_by_side, write_json
from steps import CPU_SIZED, DTYPES, build_model, fast_paths
from flops import flops_per_token
import mem_transformer as mt

EVAL_CONFIG = dict(CPU_SIZED, tgt_len=80, mem_len=2100, clamp_len=820, same_length=True, bsz=10)


class EvalStep:
    """Each call evaluates one more segment, carrying the (full) memory along."""

    def __init__(self, dtype='fp32', fast=True, config=EVAL_CONFIG, seed=0):
        self.model = build_model(config, seed).eval()
        self.amp_dtype, self.fast = DTYPES[dtype], fast
        gen = torch.Generator().manual_seed(seed)
        qlen, bsz = config['tgt_len'], config['bsz']
        self.batch = torch.randint(0, config['n_token'], (qlen + 1, bsz), generator=gen)
        self.mems = [torch.randn(config['mem_len'], bsz, config['d_model'], generator=gen)
                     for _ in range(config['n_layer'] + 1)]
        self.kv_caches = mt.new_kv_caches(self.model)  # as eval.py: the memory's keys and values are kept

    def __call__(self):
        with fast_paths(self.model, self.fast), torch.no_grad(), mt.kv_caching(self.kv_caches if self.fast else {}), \
                torch.autocast('cpu', dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            out = self.model(self.batch[:-1], self.batch[1:], *self.mems)
        self.mems = out[1:]
        return out[0]


def throughput(dtypes, repeats, warmup, config=EVAL_CONFIG):
    variants = {(dtype, fast): EvalStep(dtype, fast, config) for dtype in dtypes for fast in (True, False)}
    seconds = time_side_by_side(variants, repeats, warmup)
    tokens, flops = config['tgt_len'] * config['bsz'], flops_per_token(config, train=False)
    return [dict(config='enwik8-eval', dtype=dtype, paths='fast' if fast else 'plain', ms=s * 1e3,
                 tokens_per_s=tokens / s, gflop_per_token=flops / 1e9, tflops=flops * tokens / s / 1e12,
                 vs_plain=seconds[(dtype, False)] / s,
                 vs_plain_range=seconds.ratio_range((dtype, False), (dtype, fast)))
            for (dtype, fast), s in seconds.items()]


def print_rows(rows):
    c = EVAL_CONFIG
    print(f"evaluation, {c['n_layer']} layers, d_model {c['d_model']}, tgt_len {c['tgt_len']}, "
          f"mem_len {c['mem_len']}, clamp_len {c['clamp_len']}, same_length, batch {c['bsz']}")
    print(f"{'dtype':>5} {'paths':>5} {'ms/segment':>10} {'tokens/s':>9} {'GFLOP/tok':>9} {'TFLOP/s':>8} "
          f"{'x plain':>7}")
    for r in rows:
        print(f"{r['dtype']:>5} {r['paths']:>5} {r['ms']:>10.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['gflop_per_token']:>9.4f} {r['tflops']:>8.3f} {r['vs_plain']:>7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    add_common_args(p, repeats=10)
    args = p.parse_args(argv)
    check_common_args(p, args)
    print(describe(machine()))
    rows = throughput(args.dtypes, args.repeats, args.warmup)
    print_rows(rows)
    if args.json:
        write_json(args.json, dict(machine=machine(), config=EVAL_CONFIG, rows=rows))


if __name__ == '__main__':
    main()
