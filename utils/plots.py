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
