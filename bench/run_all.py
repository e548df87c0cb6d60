"""The whole benchmark suite in one command: one table, and the same figures as JSON.

    python bench/run_all.py [--quick] [--json bench_results.json] [--threads N]
    python bench/run_all.py --from-json bench_results.json   # reprint an earlier run's table

1+2  training step (bench_train.py: train.py's own Trainer.train_step): tokens/s, model
     FLOPs/token, fraction of the matrix-product peak timed side by side; bf16 vs fp32 loss on
     real text; and as ratios measured side by side:
     (a) the dense step against the original Transformer-XL's model (same weights, batch and
         optimizer; skipped when ../shared/reference/transformer-xl is absent)
     (c) the 64-expert step against the dense step of equal active FLOPs, 1 and 2 threads
     (d) the optimizer's share of those steps
3    the MoE layer alone (bench_moe.py, the MoE layer's own benchmark) against its floor (the expert products
     alone) and a dense FFN, at the benchmark's shape and at run_enwik8_base_moe.sh's per-GPU shape; with
     transformers >= 5.0 installed (optional), (b) against its Mixtral experts at equal FLOPs
4    long-memory evaluation (bench_eval.py)
5    peak resident memory of a training step, --batch_chunk 1 and 2 (bench_memory.py)

Each part is its bench script, run in a process of its own with --json (what it
prints goes to stderr; stdout holds the report). Every comparison the targets make
is between figures measured side by side in one loop (the variants take turns in
every repeat), so load from other processes on a shared machine slows them alike;
each figure is a median. A ratio whose repeats (each a ratio of the two variants' times in the same
repeat) spread by more than 25% is printed with their range, and a target they straddle is UNCLEAR.
--quick shortens every part (a smoke run, not for bench/README.md) and judges no target.
Row (b) needs transformers 5.0 or later (report.MIXTRAL_NEEDS) in a virtual environment of its own: the
test suite's transformers 4.35.2 has no grouped_mm Mixtral experts.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import add_common_args, check_common_args, describe, machine, matmul_peak, write_json
from utils import malloc
import original
from report import (MIXTRAL_NEEDS, mixtral_skipped, moe_target_lines, print_loss_check, ratio_text,
                    transformers_version, verdict)
from steps import MOE_VS_DENSE, add_train_args, check_train_args

BENCH = Path(__file__).resolve().parent
QUICK_TRAIN_CONFIGS = ('cpu-dense', 'cpu-moe16')
# The MoE layer at run_enwik8_base_moe.sh's shape: 22 x 512 tokens a step on 2 GPUs, d_model 512, d_inner 1024; the
# variants the targets read (the slow ones, the loop and the eager Mixtral, are left to the benchmark's own shape).
REAL_MOE_SHAPE = ['--tokens', '5632', '--d-model', '512', '--d-hidden', '1024',
                  '--variants', 'moe', 'moe-stepped', 'dense', 'mixtral-grouped_mm']


def run_script(name, flags, folder):
    """The figures of bench/NAME.py, run in a process of its own with --json. What it prints goes to stderr
    with the progress lines, so that stdout holds this suite's report."""
    path = Path(folder) / f'{name}.json'
    subprocess.run([sys.executable, str(BENCH / f'{name}.py'), *flags, '--json', str(path)], stdout=sys.stderr,
                   check=True)
    with open(path) as f:
        return json.load(f)


def script_flags(args):
    """Each script's flags for this suite's --quick, --repeats, --warmup, --threads and training options."""
    timing = ['--repeats', str(args.repeats), '--warmup', str(args.warmup)]
    threads = ['--threads', str(args.threads)] if args.threads else []
    train = ['--loss-steps', str(args.loss_steps)] + ['--compile'] * args.compile
    return {'bench_train': timing + threads + train + (['--configs', *QUICK_TRAIN_CONFIGS] if args.quick else []),
            'bench_moe': timing + threads + (['--experts', '8', '64', '--no-memory'] if args.quick else []),
            'bench_moe_real': (['--repeats', str(max(args.repeats // 2, 1)), '--warmup', '1'] + threads + REAL_MOE_SHAPE
                               + (['--experts', '8', '--no-memory'] if args.quick else [])),
            'bench_eval': timing + threads,
            'bench_memory': threads + ['--quick'] * args.quick}


def table_rows(peaks, train, moe, evaluation, memory, versus=(), moe_dense=()):
    """Every figure as one Markdown table row: item, workload, dtype, variant, ms, tokens/s,
    TFLOP/s, % of peak, x reference (the reference's time / this row's time), peak MiB."""
    rows = [('peak', '2048^3 matrix product', dtype, '', '', '', f'{tflops:.3f}', '100', '', '')
            for dtype, tflops in peaks.items()]
    for r in train:
        ref = 'fp32' if r['dtype'] == 'bf16' else ''
        rows.append(('1 train step', r['config'], r['dtype'], r['paths'], f"{r['ms']:.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3f}", f"{100 * r['peak_fraction']:.0f}",
                     f"{ratio_text(r['vs_fp32'], r.get('vs_fp32_range'))} ({ref})" if ref else '', ''))
    for r in versus:
        rows.append(('1a vs original', r['config'], r['dtype'], 'train.py', f"{r['ms']:.0f}", '', '', '',
                     f"{ratio_text(r['speedup'], r.get('speedup_range'))} (original: {r['original_ms']:.0f} ms)", ''))
    for r in moe_dense:
        rows.append(('1c+d MoE vs dense', r['step'], r['dtype'], f"{r['threads']} thread(s)", f"{r['ms']:.0f}",
                     '', '', '', f"{ratio_text(r['vs_dense'], r.get('vs_dense_range'))} (dense); "
                                 f"optimizer {100 * r['optimizer_share']:.0f}% "
                                 f"({r['optimizer_ms']:.0f} ms)", ''))
    for r in moe:
        mem = f"{r['peak_mib']:.1f}" if r.get('peak_mib') is not None else ''
        mixtral = (f", {ratio_text(r['vs_mixtral'], r.get('vs_mixtral_range'), invert=True)} (mixtral grouped_mm)"
                   if r.get('vs_mixtral') else '')
        shape = f", {r['shape']}" if 'shape' in r else ''
        floor = f", {1 / r['vs_floor']:.2f} (floor)" if r.get('vs_floor') else ''
        rows.append(('3 MoE layer', f"{r['experts']} experts{shape}", r['dtype'], r['variant'], f"{r['ms']:.2f}",
                     '', '', '', f"{ratio_text(r['vs_dense'], r.get('vs_dense_range'), invert=True)} (dense)"
                                 f"{floor}{mixtral}", mem))
    for r in evaluation:
        rows.append(('4 evaluation', 'tgt 80, mem 2100', r['dtype'], r['paths'], f"{r['ms']:.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3f}", '',
                     f"{ratio_text(r['vs_plain'], r.get('vs_plain_range'))} (plain)", ''))
    for r in memory:
        rows.append(('5 memory', r['config'], r['dtype'], f"batch_chunk {r['batch_chunk']}", '', '', '', '', '',
                     f"{r['peak_mib']:.0f} (steps +{r['step_mib']:.0f})"))
    return rows


def markdown(rows):
    head = ('item', 'workload', 'dtype', 'variant', 'ms', 'tokens/s', 'TFLOP/s', '% of peak', 'x reference',
            'peak MiB')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def target_lines(train, check, moe, versus=(), moe_dense=(), quick=False):
    """The issue's targets, each with what it compares, its measured figure and whether it holds."""
    lines = []
    by = {(r['config'], r['dtype'], r['paths']): r for r in train}
    dense_bf16 = by.get(('cpu-dense', 'bf16', 'fast'))
    if dense_bf16:
        spread = dense_bf16.get('vs_fp32_range')
        lines.append(f"train, CPU-sized dense: bf16 step {ratio_text(dense_bf16['vs_fp32'], spread)}x the fp32 step "
                     f"(target >= 2.5x) {verdict(dense_bf16['vs_fp32'], 2.5, '>=', spread, quick)}")
    if check:
        lines.append(f"train, bf16 loss after {check['steps']} steps on real text: "
                     f"{100 * check['train_rel_diff']:.2f}% from fp32 (held-out: "
                     f"{100 * check['heldout_rel_diff']:.2f}%) (target <= 1% after 200 steps) "
                     f"{verdict(check['train_rel_diff'], 0.01, '<=', quick=quick)}")
    base = by.get(('enwik8-base', 'fp32', 'fast'))
    if base:
        lines.append(f"train, enwik8-base shape fp32: {100 * base['peak_fraction']:.0f}% of the fp32 "
                     f"matrix-product peak (target >= 40%) {verdict(base['peak_fraction'], 0.4, '>=', quick=quick)}")
    for r in versus:
        spread = r.get('speedup_range')
        lines.append(f"train, (a) dense step {r['dtype']}: {ratio_text(r['speedup'], spread)}x the original's model "
                     f"step (target >= 1.5x) {verdict(r['speedup'], 1.5, '>=', spread, quick)}")
    for r in moe_dense:
        if r['step'] == MOE_VS_DENSE[0]:
            bound, spread = 0.75, r.get('vs_dense_range')
            lines.append(f"train, (c) 64-expert step {r['dtype']}, {r['threads']} thread(s): "
                         f"{ratio_text(r['vs_dense'], spread)}x the dense step's throughput (target >= {bound}x) "
                         f"{verdict(r['vs_dense'], bound, '>=', spread, quick)}")
    lines += ['MoE layer, ' + line.strip() for line in moe_target_lines(moe, quick)]
    return lines


def targets_heading(r):
    """What the target lines are, and on a --quick run why they are not judged."""
    if not r.get('quick'):
        return ("Targets: each line the figure measured here against its target (bench/README.md, "
                "'Targets', says what each compares and why those missed on a CPU are missed):")
    check = r.get('bf16_loss_check')
    loss = f", the bf16 loss check over {check['steps']} steps (the target: 200)" if check else ''
    return (f"Targets, not judged: --quick times {r['repeats']} repeats after {r['warmup']} warm-up "
            f"(a full run: 10 after 2){loss}, and leaves out the enwik8-base training rows and most memory rows; "
            "these figures are a smoke test, not the targets' measurements. Run without --quick for verdicts "
            "(bench/README.md, 'Targets', has each target and the last full run's figures):")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_common_args(p, repeats=10)
    p.set_defaults(json='bench_results.json')
    add_train_args(p)
    p.add_argument('--from-json', metavar='PATH', help='print the table and targets of an earlier run, run nothing')
    args = p.parse_args(argv)
    if args.from_json and not Path(args.from_json).is_file():
        p.error(f'--from-json {args.from_json}: no such file')
    check_common_args(p, args)
    check_train_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            report(json.load(f))
        return
    start, load_before = time.time(), os.getloadavg()[0]
    malloc_line = malloc.tune() or 'malloc: not glibc, left alone'   # as train.py does at start-up
    about = machine()
    print(describe(about), flush=True)
    print(malloc_line, flush=True)
    def progress(what):
        print(f'[{(time.time() - start) / 60:5.1f} min] {what}', file=sys.stderr, flush=True)

    progress('matrix-product peak')
    peaks = matmul_peak(repeats=args.repeats)
    flags = script_flags(args)
    with tempfile.TemporaryDirectory() as folder:
        progress('bench_train.py: training steps, (a) against the original\'s model, (c, d) the 64-expert step '
                 'against the dense step, bf16 loss check')
        trained = run_script('bench_train', flags['bench_train'], folder)
        progress('bench_moe.py: the MoE layer')
        moe = run_script('bench_moe', flags['bench_moe'], folder)['rows']
        progress("bench_moe.py: the MoE layer at run_enwik8_base_moe.sh's shape")
        moe += run_script('bench_moe', flags['bench_moe_real'], folder)['rows']
        progress('bench_eval.py: long-memory evaluation')
        evaluation = run_script('bench_eval', flags['bench_eval'], folder)['rows']
        progress('bench_memory.py: peak memory, one process per row')
        memory = run_script('bench_memory', flags['bench_memory'], folder)['rows']
    train, versus, moe_dense, check = (trained[key] for key in ('rows', 'versus_original', 'moe_versus_dense',
                                                                'bf16_loss_check'))

    results = dict(machine=about, malloc=malloc_line, loadavg=(load_before, os.getloadavg()[0]),
                   transformers=transformers_version(),
                   repeats=args.repeats, warmup=args.warmup, quick=args.quick,
                   minutes=(time.time() - start) / 60, peak_tflops=peaks, train=train, bf16_loss_check=check,
                   versus_original=versus, moe_versus_dense=moe_dense,
                   moe_layer=moe, evaluation=evaluation, memory=memory)
    report(results)
    write_json(args.json, results)
    print(f'figures written to {args.json}')


def report(r):
    versus, moe_dense = r.get('versus_original', []), r.get('moe_versus_dense', [])
    print()
    print(markdown(table_rows(r['peak_tflops'], r['train'], r['moe_layer'], r['evaluation'], r['memory'],
                              versus, moe_dense)))
    print()
    if r['bf16_loss_check']:
        print_loss_check(r['bf16_loss_check'])
    if not versus:
        print(f'(a) skipped: the original Transformer-XL is not at {original.WHERE}')
    if not any(row.get('vs_mixtral') for row in r['moe_layer']):
        print('(b) skipped: ' + (mixtral_skipped(r['transformers']) if 'transformers' in r
                                 else f'no Mixtral rows in this run (they need {MIXTRAL_NEEDS})'))
    print(targets_heading(r))
    for line in target_lines(r['train'], r['bf16_loss_check'], r['moe_layer'], versus, moe_dense, r.get('quick')):
        print('  ' + line)
    load = f"; 1-min load average {r['loadavg'][0]:.1f} before, {r['loadavg'][1]:.1f} after" if 'loadavg' in r else ''
    print(f"\n{describe(r['machine'])}; median of {r['repeats']} repeats after {r['warmup']} warm-up"
          + (f"; suite took {r['minutes']:.1f} min" if 'minutes' in r else '') + load)
    if 'malloc' in r:
        print(r['malloc'])


if __name__ == '__main__':
    main()
