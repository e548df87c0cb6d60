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
OUT/results.md, OUT/results.json, OUT/study_bpc.png (valid bpc against steps and against training seconds:
the line the mean over seeds, the band their range, the seconds those of the faster seed) and
OUT/study_imbalance.png (expert load max/mean).
Without --data the enwik8 sample in samples/ is prepared into OUT/data. One study at a time uses an OUT (a lock
on it): a second one is refused instead of deleting the runs the first is training.
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

from utils import files
from run import options, training
from run.model_file import load_model, save_model
from utils.datasets import DATASETS, SPLITS
from utils.errors import CheckpointError, ConfigError, DataError, UserError
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
    add('--eval-interval', type=int, default=25)
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


# train.py's flags that run_argv sets from the study's own flags (train.py dest -> the study's flag).
STUDY_SETS = {'data': '--data', 'dataset': '--dataset', 'work_dir': '--out', 'seed': '--seeds',
              'n_layer': '--n_layer', 'd_model': '--d_model', 'n_head': '--n_head', 'd_head': '--d_model/--n_head',
              'tgt_len': '--tgt_len', 'eval_tgt_len': '--tgt_len', 'mem_len': '--mem_len',
              'batch_size': '--batch_size', 'lr': '--lr', 'max_step': '--steps', 'warmup_step': '--steps',
              'log_interval': '--eval-interval', 'eval_interval': '--eval-interval',
              'save_interval': '--eval-interval', 'max_eval_steps': '--max_eval_steps', 'cuda': '--cuda',
              'restart': 'its runs (it resumes them itself)', 'restart_dir': 'its configurations'}


def check_train_args(args, configs, names):
    """--train_args adds train.py flags to every run but may not set again what the study sets (a --max_step of
    its own left every run short of the study's last step, stopped on every rerun). Every run's command line is
    checked as train.py checks it, before a run directory is made."""
    def parser():
        p = options.build_parser()
        p.error = refuse   # argparse's errors as exceptions, said below in the study's line
        return p

    def refuse(message):
        raise ConfigError(message)
    try:
        unset, marker = parser(), object()   # the dests --train_args sets are those not left at the marker
        unset.set_defaults(**{a.dest: marker for a in unset._actions})
        given = [dest for dest, value in vars(unset.parse_args(args.train_args.split())).items()
                 if value is not marker and dest in STUDY_SETS]
        for name in names:
            if given:   # refused below, in the study's words
                break
            p = parser()
            options.run_config(p.parse_args(run_argv(args, name, configs[name], 1, 'RUN', args.data or 'DATA')), p)
    except ConfigError as e:   # argparse's refusal or train.py's
        extra = f' with --train_args {args.train_args!r}' if args.train_args else ''
        raise ConfigError(f"train.py refuses the runs' flags{extra}: {e}") from None
    if given:
        raise ConfigError(f'--train_args {args.train_args!r} sets {options.flag(unset, given[0])}, which the '
                          f'study sets from {STUDY_SETS[given[0]]}: drop it from --train_args')


# ----------------------------------------------------------------------------- running

def broken_run(work_dir, problem, error=DataError):
    return error(f'{problem}: remove the run directory {work_dir} and rerun the same command to train it again')


def run_records(work_dir):
    """metrics.jsonl's rows (none before the run's first), refused unless each is a row train.py writes: an
    object with an integer step and a split, a train row's tokens/s, a valid or test row's bpc or ppl."""
    path = os.path.join(work_dir, 'metrics.jsonl')
    records = read_metrics(path) if os.path.isfile(path) else []
    for r in records:
        if not (isinstance(r, dict) and isinstance(r.get('step'), int) and isinstance(r.get('split'), str)
                and (r['split'] != 'train' or isinstance(r.get('tokens_per_s'), (int, float))
                     and r['tokens_per_s'] > 0)
                and (r['split'] not in ('valid', 'test') or 'bpc' in r or 'ppl' in r)):
            raise broken_run(work_dir, f'{path} has a line that train.py did not write ({json.dumps(r)[:60]})')
    return records


def finished(work_dir, steps):
    """Whether the run reached its last step and was tested there."""
    return any(r['split'] == 'test' and r['step'] == steps for r in run_records(work_dir))


def check_same_run(work_dir, argv):
    """A run directory is reused only by the command that made it (other flags: another --out)."""
    path = os.path.join(work_dir, 'study_argv.json')
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != argv:
            changed = sorted(set(saved) ^ set(argv))[:6]
            raise ConfigError(f'{work_dir} was trained with other flags (differing: {" ".join(changed)}); '
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
        dense, saved = load_model(source)
        n_expert, top_k = config['upcycle']
        model = upcycle(dense, n_expert, top_k, noise=0.01, seed=seed)
        os.makedirs(init, exist_ok=True)
        save_model(os.path.join(init, 'model.pt'), model, args=saved['args'], step=None, val_loss=None)
    return init


def run_one(args, name, config, seed, runs, data):
    """Train (or resume, or skip) one run; returns train.py's exit code (0 when already finished)."""
    work_dir = os.path.join(runs, f'{name}-s{seed}')
    steps = config.get('steps', args.steps)
    argv = run_argv(args, name, config, seed, work_dir, data)
    if finished(work_dir, steps):
        check_same_run(work_dir, argv)
        print(f'== {name} seed {seed}: finished, skipped')
        return 0
    if os.path.isfile(os.path.join(work_dir, 'checkpoint.pt')):
        check_same_run(work_dir, argv)
        print(f'== {name} seed {seed}: resuming')
        argv.append('--restart')
    else:
        # Never trained up to a checkpoint (or failed on its flags): started again, with the flags given now.
        # Only this study uses OUT (its lock), so no other process trains here.
        shutil.rmtree(work_dir, ignore_errors=True)
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


def sample_dir(out):
    """OUT/data, where the study prepares the sample without --data: (path, whether it is prepared). Anything
    else there (a corpus of the user's missing a split) is refused, never overwritten."""
    data = os.path.join(out, 'data')
    if not os.path.lexists(data):
        return data, False
    missing = [f'{s}.txt' for s in SPLITS if not os.path.isfile(os.path.join(data, f'{s}.txt'))]
    if missing:
        raise DataError(f'{data} is there but lacks {", ".join(missing)}: it is left alone; pass --data {data} if '
                        'it is a corpus, or remove it to have the enwik8 sample prepared there')
    return data, True


def prepare_data(args):
    """--data, or the enwik8 sample prepared into OUT/data (in a directory of the study's own first, renamed
    once complete, so that an interrupted preparation leaves no partial OUT/data)."""
    if args.data:
        return args.data
    data, ready = sample_dir(args.out)
    if not ready:
        partial = os.path.join(args.out, '.data.partial')
        done = subprocess.run([sys.executable, os.path.join(HERE, 'prep_enwik8.py'), '--input', SAMPLE, '--out',
                               partial, '--valid', '100000', '--test', '100000', '--no-raw', '--force'])
        if done.returncode:
            raise DataError(f'preparing {SAMPLE} into {data} failed (prep_enwik8.py said why above)')
        os.rename(partial, data)
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
    records = run_records(work_dir)
    unit = 'bpc' if any('bpc' in r for r in records) else 'ppl'
    seconds = seconds_at_steps(records, tokens_per_step)
    valid = [r for r in records if r['split'] == 'valid' and r['step'] in seconds]
    tests = [r for r in records if r['split'] == 'test']
    train_lines = [r for r in records if r['split'] == 'train']
    if not (valid and tests):
        raise broken_run(work_dir, f'{work_dir}/metrics.jsonl has no {"test" if valid else "validation"} results')
    test = tests[-1]
    path = os.path.join(work_dir, 'model.pt')
    try:
        model, state = load_model(path)
    except CheckpointError:
        what = 'is missing' if not os.path.isfile(path) else 'is truncated or not a model file of train.py'
        raise broken_run(work_dir, f'{path} {what}', CheckpointError) from None
    config = model.config
    counts = model.parameter_counts()  # train.py's #params
    total, experts = counts['total'], counts['experts']
    active = total - experts + (experts * config['moe_top_k'] // config['moe_num_expert'] if config['moe'] else 0)
    imbalance_steps, imbalance = load_imbalance(records)
    return {
        'steps': [step_offset + r['step'] for r in valid],
        'seconds': [time_offset + seconds[r['step']] for r in valid],
        'valid_bpc': [float(r[unit]) for r in valid],   # float('inf'): train.py writes inf as a string
        'final_valid_bpc': float(valid[-1][unit]), 'test_bpc': float(test[unit]),
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


def band(ax, xs, ys, label, style, x_of_seeds=np.mean):
    """The mean over seeds as a line, their range as a band (x: x_of_seeds over the seeds). A curve of a few
    points gets markers, a one-point curve an error bar: a lone point or a short segment is otherwise lost."""
    n = min(len(y) for y in ys)
    x = x_of_seeds([x[:n] for x in xs], axis=0)
    y = np.array([y[:n] for y in ys])
    mean = y.mean(axis=0)
    line, = ax.plot(x, mean, label=label, markersize=6, **dict(style, marker=style['marker'] if n <= 5 else None))
    if n == 1:
        ax.errorbar(x, mean, yerr=[mean - y.min(axis=0), y.max(axis=0) - mean], color=line.get_color(), capsize=4)
    else:
        ax.fill_between(x, y.min(axis=0), y.max(axis=0), color=line.get_color(), alpha=0.15)
    return line


def curve_styles(names):
    """name -> a colour, line style and marker, no two alike: the dense baselines black, the others ten colours,
    then the same colours dashed."""
    markers, styles, dense = 'os^Dv<>pP*X', {}, 0
    for name in names:
        if name.startswith('dense'):
            style = dict(color='black', linestyle=('-', '--', ':', '-.')[dense % 4])
            dense += 1
        else:
            i = len(styles) - dense
            style = dict(color=f'C{i % 10}', linestyle='-' if i < 10 else '--')
        styles[name] = dict(style, marker=markers[len(styles) % len(markers)])
    return styles


def outside_legend(fig, ax, title):
    """The legend to the right of the plots, in readable type: inside, it hid the curves it names."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.0, 0.93), fontsize=9, title=title,
               title_fontsize=9, frameon=False)


def plot_results(results, out):
    # best final valid bpc first: the legend reads as the table sorted
    names = sorted(results, key=lambda name: results[name]['final_valid_bpc']['mean'])
    styles = curve_styles(results)   # in the configurations' order: the same colours from one study to the next
    seeds = ', '.join(str(s) for s in next(iter(results.values()))['seeds'])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True, layout='constrained')
    for name in names:
        runs, label = results[name]['runs'], f'{name}  {results[name]["final_valid_bpc"]["mean"]:.3f}'
        band(axes[0], [x['steps'] for x in runs], [x['valid_bpc'] for x in runs], label, styles[name])
        # the faster seed's seconds: one seed slowed by other load on the machine does not stretch the axis
        band(axes[1], [x['seconds'] for x in runs], [x['valid_bpc'] for x in runs], label, styles[name],
             x_of_seeds=np.min)
    axes[0].set_xlabel('step')
    axes[1].set_xlabel('training seconds (of the faster seed at each point)')
    axes[0].set_ylabel('valid bpc (line: mean over seeds, band: their range)')
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f'{os.path.basename(os.path.abspath(out))}: valid bpc of each configuration, seeds {seeds}')
    outside_legend(fig, axes[1], 'final valid bpc')
    save(fig, os.path.join(out, 'study_bpc.png'))

    fig, ax = plt.subplots(figsize=(8, 4.5), layout='constrained')
    for name in names:
        runs = [x for x in results[name]['runs'] if x['imbalance']]
        if runs:
            band(ax, [x['imbalance_steps'] for x in runs], [x['imbalance'] for x in runs], name, styles[name])
    ax.set_xlabel('step')
    ax.set_ylabel('expert load max/mean (mean of layers)')
    ax.grid(alpha=0.3)
    fig.suptitle(f'{os.path.basename(os.path.abspath(out))}: expert load imbalance, seeds {seeds} (1 = even)')
    outside_legend(fig, ax, None)
    save(fig, os.path.join(out, 'study_imbalance.png'))


def write_results(results, out):
    """Each file whole or not at all (a full disk: files.WriteError, the previous file kept)."""
    with files.atomic_write(os.path.join(out, 'results.json')) as f:
        json.dump(results, f, indent=1)
    with files.atomic_write(os.path.join(out, 'results.md')) as f:
        f.write(markdown_table(results))
    plot_results(results, out)


# ----------------------------------------------------------------------------- main

def check_args(args):
    configs = configurations(args.d_inner, args.steps)
    names = list(configs) if args.configs == 'all' else args.configs.split(',')
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ConfigError(f'--configs: unknown {", ".join(unknown)}; known: {", ".join(configs)}')
    for name in names:   # a continued run needs the one it starts from
        start = configs[name].get('start')
        if start and start not in names:
            names.insert(names.index(name), start)
    try:
        seeds = [int(s) for s in args.seeds.split(',')]
    except ValueError:
        raise ConfigError(f'--seeds {args.seeds!r}: comma-separated integers, e.g. 1,2') from None
    for flag in ('--steps', '--n_layer', '--d_model', '--n_head', '--d_inner', '--tgt_len', '--batch_size',
                 '--eval-interval'):
        value = getattr(args, flag[2:].replace('-', '_'))
        if value < 1:
            raise ConfigError(f'{flag} {value} must be at least 1')
    if args.d_inner % 4 or args.d_model % args.n_head:
        raise ConfigError(f'--d_inner {args.d_inner} must be a multiple of 4 (experts of d_inner/2 and /4) and '
                         f'--n_head {args.n_head} must divide --d_model {args.d_model}')
    if args.data and not os.path.isdir(args.data):
        raise ConfigError(f'--data {args.data} is not a directory')
    if args.dataset not in DATASETS:
        raise ConfigError(f'--dataset {args.dataset}: unknown; known: {", ".join(DATASETS)}')
    names = list(dict.fromkeys(names))
    check_train_args(args, configs, names)
    files.check_writable_dir(args.out, '--out')
    if not args.data:
        sample_dir(args.out)
    return configs, names, seeds


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        configs, names, seeds = check_args(args)
    except UserError as e:
        print(f'study.py: error: {e}', file=sys.stderr)
        return 2
    start = time.time()
    try:
        os.makedirs(args.out, exist_ok=True)
        lock = files.lock_directory(args.out, '--out')  # kept until the study ends
        data = prepare_data(args)
    except (UserError, OSError) as e:
        print(f'study.py: error: {e}', file=sys.stderr)
        return 2
    runs = os.path.join(args.out, 'runs')
    os.makedirs(runs, exist_ok=True)
    for name in names:
        for seed in seeds:
            try:
                code = run_one(args, name, configs[name], seed, runs, data)
            except UserError as e:
                print(f'study.py: error: {e}', file=sys.stderr)
                return 2
            if code != 0:
                print(f'study.py: {name} seed {seed} stopped (exit code {code}); rerun the same command to '
                      'continue', file=sys.stderr)
                return code
    try:
        results = summarize(args, names, configs, seeds, runs)
        write_results(results, args.out)
    except (UserError, OSError) as e:   # a broken finished run, a full disk
        print(f'study.py: error: {e}', file=sys.stderr)
        return 2
    lock.release()
    print(markdown_table(results))
    print(f'Wrote {args.out}/results.md, results.json, study_bpc.png, study_imbalance.png '
          f'({time.time() - start:.0f} s in this invocation)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
