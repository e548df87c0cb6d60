"""Plots of a run from WORK_DIR/metrics.jsonl (it can run while training goes on).

    python plot.py --work_dir DIR [--out DIR]

writes curves.png (training and validation loss, in bits per character for enwik8/text8 and nats otherwise,
the learning rate and, for MoE runs, the load imbalance max/mean and the balance loss of gates that have one) and, for MoE runs, moe_load.png: for every layer, the load
of each expert over training as a multiple of an even share (1 = every expert gets the same number of tokens).
"""
import os
import sys

import matplotlib.pyplot as plt
import numpy as np

from utils import files
from utils.exp_utils import OneLineArgumentParser, read_metrics
from utils.plots import expert_load, load_imbalance, save  # files only: the Agg backend


def series(records, split, key):
    """(steps, values) of one field over the records of a split."""
    chosen = [r for r in records if r.get('split') == split and key in r]
    return np.array([r['step'] for r in chosen]), np.array([float(r[key]) for r in chosen])


def plot_curves(records, path):
    key, unit = ('bpc', 'bits per character') if any('bpc' in r for r in records) else ('loss', 'loss (nats)')
    moe = any('moe_load' in r for r in records)
    fig, axes = plt.subplots(3 if moe else 2, 1, figsize=(8, 8 if moe else 6), sharex=True,
                             gridspec_kw={'height_ratios': [3, 1, 1] if moe else [3, 1]})
    ax = axes[0]
    for split, style in (('train', '-'), ('valid', 'o-'), ('test', '*')):
        steps, values = series(records, split, key)
        if len(steps):
            ax.plot(steps, values, style, label=split, markersize=8 if split == 'test' else 4)
    ax.set_ylabel(unit)
    ax.legend()
    ax.grid(alpha=0.3)
    steps, lr = series(records, 'train', 'lr')
    axes[1].plot(steps, lr)
    axes[1].set_ylabel('learning rate')
    axes[1].grid(alpha=0.3)
    if moe:
        steps, imbalance = load_imbalance(records)
        axes[2].plot(steps, imbalance.mean(axis=0), label='load imbalance max/mean (mean of layers)')
        axes[2].set_ylabel('imbalance')
        axes[2].legend(loc='upper left')
        axes[2].grid(alpha=0.3)
        # The naive and auxfree gates have no balance loss: a line of zeros would only take room.
        chosen = [r for r in records if r.get('split') == 'train' and any(r.get('moe_balance_loss', []))]
        if chosen:
            twin = axes[2].twinx()
            balance = np.array([r['moe_balance_loss'] for r in chosen])
            twin.plot([r['step'] for r in chosen], balance.mean(axis=1), 'C1', label='balance loss (mean of layers)')
            twin.legend(loc='upper right')
    axes[-1].set_xlabel('step')
    save(fig, path)


def plot_expert_load(records, path):
    steps, load = expert_load(records)
    n_layer, n_expert, _ = load.shape
    fig, axes = plt.subplots(n_layer, 1, figsize=(8, 1.0 + 0.15 * n_expert * n_layer ** 0.5 + 0.9 * n_layer),
                             sharex=True, squeeze=False)
    vmax = max(2.0, float(load.max()))
    extent = [steps[0], steps[-1], n_expert - 0.5, -0.5] if len(steps) > 1 else None
    for layer in range(n_layer):
        ax = axes[layer, 0]
        image = ax.imshow(load[layer], aspect='auto', interpolation='nearest', cmap='magma', vmin=0, vmax=vmax,
                          extent=extent)
        ax.set_ylabel(f'layer {layer}\nexpert')
    axes[-1, 0].set_xlabel('step')
    fig.colorbar(image, ax=axes[:, 0].tolist(), label='load / even share')
    fig.suptitle('tokens routed to each expert over training (1 = even load)')
    save(fig, path)


def make_plots(work_dir, out_dir=None):
    """Write the PNGs for the run in work_dir; returns their paths."""
    path = os.path.join(work_dir, 'metrics.jsonl')
    if not os.path.isfile(path):
        raise ValueError(f'{path} does not exist: is {work_dir} a run directory of train.py?')
    try:
        records = read_metrics(path)
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not UTF-8 text (byte {e.start}): is it the metrics.jsonl of a run?') from None
    out_dir = out_dir or work_dir
    files.check_writable_dir(out_dir, '--out' if out_dir != work_dir else '--work_dir')
    if not any(r.get('split') in ('train', 'valid', 'test') for r in records):
        raise ValueError(f'{path} has no training or evaluation line yet (training writes one every '
                         '--log-interval steps, and evaluates every --eval-interval steps and at the end)')
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, 'curves.png')]
    plot_curves(records, written[0])
    if expert_load(records)[0] is not None:
        written.append(os.path.join(out_dir, 'moe_load.png'))
        plot_expert_load(records, written[1])
    return written


def main(argv=None):
    parser = OneLineArgumentParser(prog='plot.py', description='Plot the curves of a training run')
    parser.add_argument('--work_dir', required=True, help='the run directory (holds metrics.jsonl)')
    parser.add_argument('--out', default=None, help='where to write the PNG files (default: work_dir)')
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.work_dir, args.out)
    except (ValueError, OSError) as e:  # files.WriteError (a full disk...) is an OSError
        print(f'plot.py: error: {e}', file=sys.stderr)
        return 2
    for path in written:
        print(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
