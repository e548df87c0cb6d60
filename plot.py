"""Plots of a run from WORK_DIR/metrics.jsonl (it can run while training goes on).

    python plot.py --work_dir DIR [--out DIR]

writes curves.png (titled with the run's name and its last validation and test figures: training and
validation loss, in bits per character for enwik8/text8 and nats otherwise, the learning rate and, for MoE runs,
the load imbalance max/mean and the balance loss of gates that have one) and, for MoE runs, moe_load.png: for
every layer, the load of each expert over training as a multiple of an even share, on a diverging scale: white
where an expert gets an even share, red above it, blue below.
"""
import os
import sys

import matplotlib.pyplot as plt
import numpy as np

from utils import files
from utils.exp_utils import OneLineArgumentParser, read_metrics
from utils.errors import DataError, UserError
from utils.plots import (DIVERGING, centred_norm, colour_bar, expert_load, label_every_tick,  # the Agg backend
                         load_imbalance, save)


def series(records, split, key):
    """(steps, values) of one field over the records of a split."""
    chosen = [r for r in records if r.get('split') == split and key in r]
    return np.array([r['step'] for r in chosen]), np.array([float(r[key]) for r in chosen])


def short(style, steps):
    """A line of a few points gets dots: a one-point line is otherwise not drawn at all."""
    return '.' + style if len(steps) < 10 and style == '-' else style


def curves_title(run, records, key):
    """The run's name and where it stands: its last validation and test figures."""
    parts = []
    for split in ('valid', 'test'):
        steps, values = series(records, split, key)
        if len(steps):
            parts.append(f'{split} {values[-1]:.3f} at step {steps[-1]}')
    return f'{run}: ' + ('; '.join(parts) if parts else f'training to step {max(r["step"] for r in records)}')


def curves_figure(records, run):
    key, unit = ('bpc', 'bits per character') if any('bpc' in r for r in records) else ('loss', 'loss (nats)')
    moe = any('moe_load' in r for r in records)
    fig, axes = plt.subplots(3 if moe else 2, 1, figsize=(8, 8 if moe else 6), sharex=True,
                             gridspec_kw={'height_ratios': [3, 1, 1] if moe else [3, 1]})
    ax = axes[0]
    for split, style in (('train', '-'), ('valid', 'o-'), ('test', '*')):
        steps, values = series(records, split, key)
        if len(steps):
            ax.plot(steps, values, short(style, steps), label=split, markersize=10 if split == 'test' else 4)
    ax.set_ylabel(unit)
    ax.legend(loc='best')
    ax.grid(alpha=0.3)
    ax.set_title(curves_title(run, records, key), fontsize=11)
    steps, lr = series(records, 'train', 'lr')
    axes[1].plot(steps, lr, short('-', steps))
    axes[1].set_ylabel('learning rate')
    axes[1].grid(alpha=0.3)
    if moe:
        steps, imbalance = load_imbalance(records)
        axes[2].plot(steps, imbalance.mean(axis=0), short('-', steps),
                     label='load imbalance max/mean (mean of layers)')
        axes[2].set_ylabel('imbalance')
        axes[2].grid(alpha=0.3)
        handles = axes[2].get_legend_handles_labels()
        # The naive and auxfree gates have no balance loss: a line of zeros would only take room.
        chosen = [r for r in records if r.get('split') == 'train' and any(r.get('moe_balance_loss', []))]
        if chosen:
            twin = axes[2].twinx()
            balance = np.array([r['moe_balance_loss'] for r in chosen])
            twin.plot([r['step'] for r in chosen], balance.mean(axis=1), 'C1', label='balance loss (mean of layers)')
            twin.set_ylabel('balance loss')
            handles = [a + b for a, b in zip(handles, twin.get_legend_handles_labels())]
        axes[2].legend(*handles, loc='best', fontsize=8)   # one legend for both axes: it avoids both lines
    axes[-1].set_xlabel('step')
    return fig


def load_figure(records, run):
    """One heat map per layer: experts (every one labelled) against steps, the load as a multiple of an even
    share on a diverging scale, white at 1."""
    steps, load = expert_load(records)
    n_layer, n_expert, _ = load.shape
    n_col = min(4, -(-n_layer // 4))   # up to 4 layers a column, then more columns
    n_row = -(-n_layer // n_col)
    panel = 0.4 + max(0.8, (0.14 if n_expert <= 16 else 0.1) * n_expert)
    fig, axes = plt.subplots(n_row, n_col, figsize=(1.5 + (8 if n_col == 1 else 5.5) * n_col, 1.2 + panel * n_row),
                             sharex=True, squeeze=False, layout='constrained')
    norm = centred_norm(1.0, load.max())
    extent = [steps[0], steps[-1], n_expert - 0.5, -0.5] if len(steps) > 1 else None
    for layer, ax in enumerate(axes.T.flat):   # down the first column, then the next
        if layer >= n_layer:
            ax.set_visible(False)
            continue
        image = ax.imshow(load[layer], aspect='auto', interpolation='nearest', cmap=DIVERGING, norm=norm,
                          extent=extent)
        label_every_tick(ax, 'y', n_expert)
        ax.set_ylabel(f'layer {layer}: expert')
    for ax in axes[-1]:
        ax.set_xlabel('step')
    colour_bar(fig, image, load, axes.ravel().tolist(), 'load / even share (1 = even)', aspect=20 * n_row)
    fig.suptitle(f'{run}: tokens routed to each expert over training, as a multiple of an even share\n'
                 '(white: even; red: more tokens, blue: fewer)')
    return fig


def make_plots(work_dir, out_dir=None):
    """Write the PNGs for the run in work_dir; returns their paths."""
    path = os.path.join(work_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise DataError(f'{path} does not exist: is {work_dir} a run directory of train.py?')
    try:
        records = read_metrics(path)
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text (byte {e.start}): is it the metrics.jsonl of a run?') from None
    out_dir = out_dir or work_dir
    files.check_writable_dir(out_dir, '--out' if out_dir != work_dir else '--work_dir')
    if not any(r.get('split') in ('train', 'valid', 'test') for r in records):
        raise DataError(f'{path} has no training or evaluation line yet (training writes one every '
                         '--log-interval steps, and evaluates every --eval-interval steps and at the end)')
    os.makedirs(out_dir, exist_ok=True)
    run = os.path.basename(os.path.abspath(work_dir))
    written = [os.path.join(out_dir, 'curves.png')]
    save(curves_figure(records, run), written[0])
    if expert_load(records)[0] is not None:
        written.append(os.path.join(out_dir, 'moe_load.png'))
        save(load_figure(records, run), written[1])
    return written


def build_parser():
    parser = OneLineArgumentParser(prog='plot.py', description='Plot the curves of a training run')
    parser.add_argument('--work_dir', required=True, help='the run directory (holds metrics.jsonl)')
    parser.add_argument('--out', default=None, help='where to write the PNG files (default: work_dir)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        written = make_plots(args.work_dir, args.out)
    except (UserError, OSError) as e:  # files.WriteError (a full disk...) is an OSError
        print(f'plot.py: error: {e}', file=sys.stderr)
        return 2
    for path in written:
        print(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
