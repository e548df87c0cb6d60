"""What the plotting scripts share (plot.py, study.py): the experts' load from a run's metrics, and PNG files
written atomically. Importing it selects matplotlib's Agg backend: these programs write files and need no display."""
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.files import atomic_write  # noqa: E402


def expert_load(records):
    """Steps of the MoE log lines and the load of each expert relative to an even share,
    as an array [n_layer, n_expert, n_lines]: tokens routed to the expert / (tokens routed in the layer / E)."""
    chosen = [r for r in records if r.get('split') == 'train' and 'moe_load' in r]
    if not chosen:
        return None, None
    load = np.array([r['moe_load'] for r in chosen], dtype=np.float64)  # [n_lines, n_layer, n_expert]
    even = load.sum(axis=2, keepdims=True) / load.shape[2]
    return np.array([r['step'] for r in chosen]), (load / np.maximum(even, 1e-12)).transpose(1, 2, 0)


def load_imbalance(records):
    """Steps of the MoE log lines and each layer's load imbalance there, max/mean of the experts' copy
    counts (1 = even), as an array [n_layer, n_lines]; (None, None) for a dense run."""
    steps, load = expert_load(records)
    return (None, None) if steps is None else (steps, load.max(axis=1))


def save(fig, path):
    try:
        with atomic_write(path, 'wb') as f:
            fig.savefig(f, format='png', dpi=110, bbox_inches='tight')
    finally:
        plt.close(fig)


# Load and share maps: red above an even share, blue below, white at it, so that over- and under-loaded
# experts read apart at a glance and an even layer is pale.
DIVERGING = 'RdBu_r'


def centred_norm(center, vmax):
    """A colour scale from 0 through `center` (the even share: the colour map's neutral middle) to vmax, kept
    between 2 and 4 x center: a layer with one expert at 20 x its share would otherwise leave 2 x nearly white.
    Values above the top take its colour (colour bars: extend='max')."""
    from matplotlib.colors import TwoSlopeNorm
    return TwoSlopeNorm(vmin=0.0, vcenter=center, vmax=min(max(float(vmax), 2.0 * center), 4.0 * center))


def colour_bar(fig, image, values, ax, label, **options):
    """The colour bar of a centred_norm image, with an arrow at the top where some values are above its range."""
    clipped = np.nanmax(np.asarray(values, dtype=np.float64)) > image.norm.vmax
    return fig.colorbar(image, ax=ax, label=label, extend='max' if clipped else 'neither', **options)


def label_cells(ax, image, values, fmt, fontsize=7):
    """Write a number on each cell of a heat map (values: the image's own, or others of its shape), black on light
    cells and white on dark ones; NaN: left blank."""
    values = np.asarray(values, dtype=np.float64)
    colours = image.to_rgba(image.get_array())
    for (row, col), value in np.ndenumerate(values):
        if np.isnan(value):
            continue
        r, g, b, _ = colours[row, col]
        ax.text(col, row, format(value, fmt), ha='center', va='center', fontsize=fontsize,
                color='black' if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else 'white')


def label_every_tick(ax, axis, n, fontsize=None):
    """A tick and label for each of n rows (axis='y') or columns (axis='x'): every expert named."""
    ticks = list(range(n))
    fontsize = fontsize or (8 if n <= 16 else 6 if n <= 32 else 5)
    if axis == 'y':
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=fontsize)
    else:
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=fontsize)
