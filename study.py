"""Dense vs Mixture-of-Experts study: one command trains a list of configurations on the same corpus for the
same number of steps, two seeds each, and writes a results table and plots.

    python study.py [--out study_run] [--data DIR --dataset enwik8] [--steps 150] [--d_model 64] [--cuda] ...

The default configurations have equal active FLOPs per token (the dense FFN's width is split over the k
experts a token visits): dense; naive top-2 MoE with 8, 16 and 64 experts; at 16 experts the gshard, switch
(top-1 of double-width experts), noisy and auxfree gates and a shared expert (top-1 + 1 shared); and sparse
upcycling: the finished dense run upcycled to 8 top-1 experts of its own width and trained for half as many
steps again, next to the dense run trained for those steps too and the same MoE trained from scratch.

Every run is a train.py run directory under OUT/runs/NAME-sSEED: a finished one is skipped, an interrupted
one resumes from its checkpoint (train.py --restart), so rerunning the command continues the study. Results:
OUT/results.md, OUT/results.json, OUT/study_bpc.png (valid bpc against steps and training seconds, the
line the mean over seeds, the band their range) and OUT/study_imbalance.png (expert load max/mean).
Without --data the enwik8 sample in samples/ is prepared into OUT/data.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import matplotlib.pyplot as plt
import numpy as np

from mem_transformer import MemTransformerLM
from utils import checkpoint as ckpt
from run import training
from utils.exp_utils import OneLineArgumentParser, read_metrics
from utils.plots import load_imbalance, save  # files only: the Agg backend
from run.upcycle import upcycle

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, 'samples', 'enwik8-sample.zip')


# ----------------------------------------------------------------------------- configurations

def configurations(d_inner, steps):
    """name -> (train.py flags, what it starts from). d_inner is the dense FFN's width; a top-k MoE gets
    experts of d_inner / k, so every configuration computes the same FFN FLOPs per token."""
    def moe(n_expert, top_k, gate='naive', *extra):
        return ['--moe', '--moe-num-expert', str(n_expert), '--moe-top-k', str(top_k), '--moe-gate', gate,
                '--d_inner', str(d_inner // top_k // (2 if '--moe-shared-expert' in extra else 1)), *extra]
    half = max(steps // 2, 1)
    upcycled = ['--moe', '--moe-num-expert', '8', '--moe-top-k', '1', '--d_inner', str(d_inner)]
    return {
        'dense': dict(flags=['--d_inner', str(d_inner)]),
        'moe8-naive': dict(flags=moe(8, 2)),
        'moe16-naive': dict(flags=moe(16, 2)),
        'moe64-naive': dict(flags=moe(64, 2)),
        'moe16-gshard': dict(flags=moe(16, 2, 'gshard')),
        'moe16-switch': dict(flags=moe(16, 1, 'switch')),
        'moe16-noisy': dict(flags=moe(16, 2, 'noisy')),
        'moe16-auxfree': dict(flags=moe(16, 2, 'auxfree')),   # DeepSeek-V3's rate, 0.001
        'moe16-auxfree-0.01': dict(flags=moe(16, 2, 'auxfree', '--moe-bias-update-rate', '0.01')),
        'moe16-shared': dict(flags=moe(16, 1, 'naive', '--moe-shared-expert', '1')),
        'moe8-top1-scratch': dict(flags=upcycled),
        'dense-continued': dict(flags=['--d_inner', str(d_inner)], start='dense', steps=half),
        'moe8-top1-upcycled': dict(flags=upcycled, start='dense', steps=half, upcycle=(8, 1)),
    }


def build_parser():
    p = OneLineArgumentParser(prog='study.py', description=__doc__.split('\n\n')[0])
    add = p.add_argument
    add('--out', default='study_run', help='output directory (run directories, tables, plots)')
    add('--data', default=None, help='corpus directory (default: the enwik8 sample, prepared into OUT/data)')
    add('--dataset', default='enwik8', help='dataset name of --data')
    add('--configs', default='all', help='comma-separated configuration names (default: all)')
    add('--seeds', default='1,2', help='comma-separated seeds')
    add('--steps', type=int, default=150, help='training steps of every run (the continued ones: half as many)')
    add('--n_layer', type=int, default=2)
    add('--d_model', type=int, default=64)
    add('--n_head', type=int, default=2)
    add('--d_inner', type=int, default=256, help="the dense FFN's width (MoE experts: d_inner / top-k)")
    add('--tgt_len', type=int, default=64)
    add('--mem_len', type=int, default=64)
    add('--batch_size', type=int, default=8)
    add('--lr', type=float, default=0.002)
    add('--eval_interval', type=int, default=25)
    add('--max_eval_steps', type=int, default=10, help='batches of each evaluation (-1: the whole split)')
    add('--cuda', action='store_true', help='train on the GPU')
    add('--train_args', default='', help='more train.py flags for every run, e.g. "--amp bf16"')
    return p


def run_argv(args, name, config, seed, work_dir, data):
    steps = config.get('steps', args.steps)
    log_interval = max(1, min(args.eval_interval, steps) // 5)
    argv = ['--data', data, '--dataset', args.dataset, '--work_dir', work_dir, '--seed', str(seed),
            '--n_layer', str(args.n_layer), '--d_model', str(args.d_model), '--n_head', str(args.n_head),
            '--d_head', str(args.d_model // args.n_head), '--tgt_len', str(args.tgt_len),
            '--mem_len', str(args.mem_len), '--eval_tgt_len', str(args.tgt_len),
            '--batch_size', str(args.batch_size), '--lr', str(args.lr), '--warmup_step', str(max(steps // 10, 1)),
            '--max_step', str(steps), '--log-interval', str(log_interval),
            '--eval-interval', str(min(args.eval_interval, steps)), '--save-interval', str(log_interval),
            '--max_eval_steps', str(args.max_eval_steps), *config['flags'], *args.train_args.split()]
    return argv + (['--cuda'] if args.cuda else [])


# ----------------------------------------------------------------------------- running

def finished(work_dir, steps):
    """Whether the run reached its last step and was tested there."""
    path = os.path.join(work_dir, 'metrics.jsonl')
    return os.path.isfile(path) and any(r.get('split') == 'test' and r['step'] == steps for r in read_metrics(path))


def check_same_run(work_dir, argv):
    """A run directory is reused only by the command that made it (other flags: another --out)."""
    path = os.path.join(work_dir, 'study_argv.json')
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != argv:
            changed = sorted(set(saved) ^ set(argv))[:6]
            raise ValueError(f'{work_dir} was trained with other flags (differing: {" ".join(changed)}); '
                             'rerun with the same flags to continue, or choose another --out')


def prepare_start(args, config, seed, work_dir, runs):
    """--restart_dir for a run that starts from another: the finished run itself, or its upcycled model."""
    source = os.path.join(runs, f'{config["start"]}-s{seed}')
    if not finished(source, args.steps):
        raise RuntimeError(f'{source} must finish before {work_dir} starts')
    if 'upcycle' not in config:
        return source
    init = work_dir + '.init'
    if not os.path.isfile(os.path.join(init, 'model.pt')):
        saved = ckpt.load(os.path.join(source, 'model.pt'), 'model')
        dense = MemTransformerLM(**saved['config'])
        ckpt.load_weights(dense, saved['model_state'], source)
        n_expert, top_k = config['upcycle']
        model = upcycle(dense, n_expert, top_k, noise=0.01, seed=seed)
        os.makedirs(init, exist_ok=True)
        ckpt.atomic_save({'format': ckpt.FORMAT, 'kind': 'model', 'config': model.config,
                          'model_state': model.state_dict(), 'args': saved['args'], 'step': None,
                          'val_loss': None}, os.path.join(init, 'model.pt'))
    return init


def run_one(args, name, config, seed, runs, data):
    """Train (or resume, or skip) one run; returns train.py's exit code (0 when already finished)."""
    work_dir = os.path.join(runs, f'{name}-s{seed}')
    steps = config.get('steps', args.steps)
    argv = run_argv(args, name, config, seed, work_dir, data)
    check_same_run(work_dir, argv)
    if finished(work_dir, steps):
        print(f'== {name} seed {seed}: finished, skipped')
        return 0
    if os.path.isfile(os.path.join(work_dir, 'checkpoint.pt')):
        print(f'== {name} seed {seed}: resuming')
        argv.append('--restart')
    else:
        shutil.rmtree(work_dir, ignore_errors=True)   # started but stopped before its first checkpoint
        os.makedirs(work_dir)
        with open(os.path.join(work_dir, 'study_argv.json'), 'w') as f:
            json.dump(argv, f)
        print(f'== {name} seed {seed}: training')
        if 'start' in config:
            argv += ['--restart_dir', prepare_start(args, config, seed, work_dir, runs)]
    code = training.main(argv)   # train.py's run, in this process
    if code == 0 and not finished(work_dir, steps):
        code = 128 + signal.SIGINT   # Ctrl-C: train.py stopped early and tested; the study stops too
    return code


def prepare_data(args):
    if args.data:
        return args.data
    data = os.path.join(args.out, 'data')
    if not all(os.path.isfile(os.path.join(data, f'{s}.txt')) for s in ('train', 'valid', 'test')):
        subprocess.run([sys.executable, os.path.join(HERE, 'prep_enwik8.py'), '--input', SAMPLE, '--out', data,
                        '--valid', '100000', '--test', '100000', '--no-raw', '--force'], check=True)
    return data


# ----------------------------------------------------------------------------- results

def seconds_at_steps(records, tokens_per_step):
    """Training seconds (validations excluded: from tokens_per_s) at the end of each logged step: step -> s."""
    total, last, out = 0., 0, {}
    for r in records:
        if r.get('split') == 'train':
            total += (r['step'] - last) * tokens_per_step / r['tokens_per_s']
            last = r['step']
            out[r['step']] = total
    return out


def run_summary(work_dir, tokens_per_step, step_offset=0, time_offset=0.):
    """One run's curves and figures; bpc for character-level corpora, else perplexity (still named bpc)."""
    records = read_metrics(os.path.join(work_dir, 'metrics.jsonl'))
    unit = 'bpc' if any('bpc' in r for r in records) else 'ppl'
    seconds = seconds_at_steps(records, tokens_per_step)
    valid = [r for r in records if r['split'] == 'valid' and r['step'] in seconds]
    test = [r for r in records if r['split'] == 'test'][-1]
    train_lines = [r for r in records if r['split'] == 'train']
    state = ckpt.load(os.path.join(work_dir, 'model.pt'), 'model')
    config = state['config']
    total = sum(v.numel() for k, v in state['model_state'].items() if not k.endswith('expert_bias'))
    experts = sum(v.numel() for k, v in state['model_state'].items() if '.experts.' in k)
    active = total - experts + (experts * config['moe_top_k'] // config['moe_num_expert'] if config['moe'] else 0)
    imbalance_steps, imbalance = load_imbalance(records)
    return {
        'steps': [step_offset + r['step'] for r in valid],
        'seconds': [time_offset + seconds[r['step']] for r in valid],
        'valid_bpc': [r[unit] for r in valid],
        'final_valid_bpc': valid[-1][unit], 'test_bpc': test[unit],
        'train_seconds': time_offset + max(seconds.values()),
        'tokens_per_s': float(np.mean([r['tokens_per_s'] for r in train_lines])),
        'params_total': total, 'params_active': active,
        'imbalance_steps': [] if imbalance is None else (step_offset + imbalance_steps).tolist(),
        'imbalance': [] if imbalance is None else imbalance.mean(axis=0).tolist(),
    }


def summarize(args, names, configs, seeds, runs):
    results, tokens_per_step = {}, args.batch_size * args.tgt_len
    for name in names:
        config = configs[name]
        per_seed = []
        for seed in seeds:
            offset_steps, offset_s = 0, 0.
            if 'start' in config:   # continued runs sit after the run they start from
                offset_steps = args.steps
                start = os.path.join(runs, f'{config["start"]}-s{seed}')
                offset_s = run_summary(start, tokens_per_step)['train_seconds']
            per_seed.append(run_summary(os.path.join(runs, f'{name}-s{seed}'), tokens_per_step, offset_steps,
                                        offset_s))
        results[name] = {'flags': config['flags'], 'seeds': seeds, 'runs': per_seed}
        for key in ('final_valid_bpc', 'test_bpc', 'tokens_per_s', 'train_seconds'):
            values = [r[key] for r in per_seed]
            results[name][key] = {'mean': float(np.mean(values)), 'spread': float(np.max(values) - np.min(values))}
        final_imbalance = [r['imbalance'][-1] for r in per_seed if r['imbalance']]
        results[name]['imbalance'] = float(np.mean(final_imbalance)) if final_imbalance else None
        results[name]['params_total'] = per_seed[0]['params_total']
        results[name]['params_active'] = per_seed[0]['params_active']
        results[name]['steps'] = per_seed[0]['steps'][-1]
    return results


def markdown_table(results):
    lines = ['| configuration | steps | params (total / active) | valid bpc | test bpc | tokens/s | imbalance |',
             '|---|---|---|---|---|---|---|']
    for name, r in results.items():
        imbalance = '—' if r['imbalance'] is None else f'{r["imbalance"]:.2f}'
        lines.append(f'| {name} | {r["steps"]} | {r["params_total"]:,} / {r["params_active"]:,} | '
                     f'{r["final_valid_bpc"]["mean"]:.3f} ± {r["final_valid_bpc"]["spread"] / 2:.3f} | '
                     f'{r["test_bpc"]["mean"]:.3f} ± {r["test_bpc"]["spread"] / 2:.3f} | '
                     f'{r["tokens_per_s"]["mean"]:,.0f} | {imbalance} |')
    return '\n'.join(lines) + '\n'


def band(ax, xs, ys, label, color):
    """The mean over seeds as a line, their range as a band (x: the mean over seeds too)."""
    n = min(len(y) for y in ys)
    x = np.mean([x[:n] for x in xs], axis=0)
    y = np.array([y[:n] for y in ys])
    ax.plot(x, y.mean(axis=0), label=label, color=color)
    ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=color, alpha=0.2)


def plot_results(results, out):
    colors = plt.get_cmap('tab20')(np.linspace(0, 1, max(len(results), 2)))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for (name, r), color in zip(results.items(), colors):
        runs = r['runs']
        band(axes[0], [x['steps'] for x in runs], [x['valid_bpc'] for x in runs], name, color)
        band(axes[1], [x['seconds'] for x in runs], [x['valid_bpc'] for x in runs], name, color)
    axes[0].set_xlabel('step')
    axes[1].set_xlabel('training seconds')
    axes[0].set_ylabel('valid bpc (band: range over seeds)')
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    save(fig, os.path.join(out, 'study_bpc.png'))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, r), color in zip(results.items(), colors):
        runs = [x for x in r['runs'] if x['imbalance']]
        if runs:
            band(ax, [x['imbalance_steps'] for x in runs], [x['imbalance'] for x in runs], name, color)
    ax.set_xlabel('step')
    ax.set_ylabel('expert load max/mean (mean of layers)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save(fig, os.path.join(out, 'study_imbalance.png'))


def write_results(results, out):
    with open(os.path.join(out, 'results.json.tmp'), 'w') as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(out, 'results.json.tmp'), os.path.join(out, 'results.json'))
    with open(os.path.join(out, 'results.md.tmp'), 'w') as f:
        f.write(markdown_table(results))
    os.replace(os.path.join(out, 'results.md.tmp'), os.path.join(out, 'results.md'))
    plot_results(results, out)


# ----------------------------------------------------------------------------- main

def check_args(args):
    configs = configurations(args.d_inner, args.steps)
    names = list(configs) if args.configs == 'all' else args.configs.split(',')
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f'--configs: unknown {", ".join(unknown)}; known: {", ".join(configs)}')
    for name in names:   # a continued run needs the one it starts from
        start = configs[name].get('start')
        if start and start not in names:
            names.insert(names.index(name), start)
    try:
        seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        raise ValueError(f'--seeds {args.seeds!r}: comma-separated integers, e.g. 1,2') from None
    for dest in ('steps', 'n_layer', 'd_model', 'n_head', 'd_inner', 'tgt_len', 'batch_size', 'eval_interval'):
        if getattr(args, dest) < 1:
            raise ValueError(f'--{dest} {getattr(args, dest)} must be at least 1')
    if args.d_inner % 4 or args.d_model % args.n_head:
        raise ValueError(f'--d_inner {args.d_inner} must be a multiple of 4 (experts of d_inner/2 and /4) and '
                         f'--n_head {args.n_head} must divide --d_model {args.d_model}')
    if args.data and not os.path.isdir(args.data):
        raise ValueError(f'--data {args.data} is not a directory')
    return configs, list(dict.fromkeys(names)), seeds


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        configs, names, seeds = check_args(args)
    except ValueError as e:
        print(f'study.py: error: {e}', file=sys.stderr)
        return 2
    start = time.time()
    data = prepare_data(args)
    runs = os.path.join(args.out, 'runs')
    os.makedirs(runs, exist_ok=True)
    for name in names:
        for seed in seeds:
            try:
                code = run_one(args, name, configs[name], seed, runs, data)
            except ValueError as e:
                print(f'study.py: error: {e}', file=sys.stderr)
                return 2
            if code != 0:
                print(f'study.py: {name} seed {seed} stopped (exit code {code}); rerun the same command to '
                      'continue', file=sys.stderr)
                return code
    results = summarize(args, names, configs, seeds, runs)
    write_results(results, args.out)
    print(markdown_table(results))
    print(f'Wrote {args.out}/results.md, results.json, study_bpc.png, study_imbalance.png '
          f'({time.time() - start:.0f} s in this invocation)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
