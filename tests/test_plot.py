"""plot.py and utils/plots.py: the load matrix by hand, PNG files from synthetic and real metrics, errors."""
import json
import os

import numpy as np
import pytest

import plot
import train
from conftest import MOE, TINY, write_corpus
from utils import plots

PNG = b'\x89PNG\r\n\x1a\n'


def write_metrics(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def moe_records():
    return [
        {'step': 10, 'split': 'train', 'loss': 3.0, 'bpc': 4.3, 'lr': 1e-3, 'moe_balance_loss': [1.0, 1.2],
         'moe_load': [[30, 10], [20, 20]]},
        {'step': 20, 'split': 'train', 'loss': 2.5, 'bpc': 3.6, 'lr': 5e-4, 'moe_balance_loss': [1.0, 1.1],
         'moe_load': [[0, 40], [10, 30]]},
        {'step': 20, 'split': 'valid', 'loss': 2.6, 'bpc': 3.75},
    ]


def test_expert_load_is_relative_to_an_even_share():
    steps, load = plots.expert_load(moe_records())
    assert steps.tolist() == [10, 20]
    # layer 0: 30 and 10 of 40 copies over 2 experts (even share 20) -> 1.5, 0.5; then 0 and 40 -> 0, 2.
    expected = np.array([[[1.5, 0.0], [0.5, 2.0]],
                         [[1.0, 0.5], [1.0, 1.5]]])
    np.testing.assert_allclose(load, expected)
    assert plots.expert_load([{'step': 1, 'split': 'train', 'loss': 1.0}]) == (None, None)


def test_load_imbalance_is_max_over_mean_per_layer():
    steps, imbalance = plots.load_imbalance(moe_records())
    assert steps.tolist() == [10, 20]
    np.testing.assert_allclose(imbalance, [[1.5, 2.0], [1.0, 1.5]])   # max of the even-share ratios above
    assert plots.load_imbalance([{'step': 1, 'split': 'train', 'loss': 1.0}]) == (None, None)


def test_pngs_for_moe_and_dense_runs(tmp_path, capsys):
    moe_dir, dense_dir = tmp_path / 'moe', tmp_path / 'dense'
    moe_dir.mkdir(), dense_dir.mkdir()
    write_metrics(moe_dir / 'metrics.jsonl', moe_records())
    assert plot.main(['--work_dir', str(moe_dir)]) == 0
    for name in ('curves.png', 'moe_load.png'):
        assert (moe_dir / name).read_bytes().startswith(PNG)
    assert f'Wrote {moe_dir / "moe_load.png"}' in capsys.readouterr().out
    dense = [{k: v for k, v in r.items() if not k.startswith('moe')} for r in moe_records()]
    write_metrics(dense_dir / 'metrics.jsonl', dense)
    assert plot.main(['--work_dir', str(dense_dir), '--out', str(tmp_path / 'out')]) == 0
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['curves.png']


def test_plots_a_real_run(tmp_path):
    corpus = write_corpus(tmp_path / 'enwik8', sizes=(6000, 2000, 2000))
    work = tmp_path / 'run'
    assert train.main(['--data', str(corpus), '--work_dir', str(work), *TINY, *MOE, '--max_step', '4',
                       '--eval-interval', '2']) == 0
    assert [p.split('/')[-1] for p in plot.make_plots(str(work))] == ['curves.png', 'moe_load.png']
    assert (work / 'moe_load.png').stat().st_size > 1000


def test_errors(tmp_path, capsys):
    assert plot.main(['--work_dir', str(tmp_path)]) == 2
    assert 'metrics.jsonl does not exist' in capsys.readouterr().err
    write_metrics(tmp_path / 'metrics.jsonl', [])
    with (tmp_path / 'metrics.jsonl').open('a') as f:
        f.write('{"step": 1, "spl')  # a line cut by a kill is skipped
    assert plot.main(['--work_dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no training or evaluation line yet' in err
    assert not (tmp_path / 'curves.png').exists()


def test_unwritable_out_and_undecodable_metrics_are_one_line(tmp_path, capsys):
    write_metrics(tmp_path / 'metrics.jsonl', moe_records())
    (tmp_path / 'file').write_text('x')
    for out, message in ((tmp_path / 'file', '--out {} is a file, not a directory'), ('/proc/txl', 'is not writable')):
        assert plot.main(['--work_dir', str(tmp_path), '--out', str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message.format(out) in err, err
    (tmp_path / 'metrics.jsonl').write_bytes(b'{"step": 1}\n\xff\xfe\n')
    assert plot.main(['--work_dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{tmp_path}/metrics.jsonl is not UTF-8 text (byte' in err, err
    assert sorted(os.listdir(tmp_path)) == ['file', 'metrics.jsonl']


def test_a_run_shorter_than_its_log_interval_still_plots(tmp_path):
    # e.g. bash demo.sh --max_step 40 with --log-interval 50: only the final evaluation is logged
    write_metrics(tmp_path / 'metrics.jsonl', [{'step': 40, 'split': 'valid', 'loss': 2.0, 'bpc': 2.9},
                                               {'step': 40, 'split': 'test', 'loss': 2.1, 'bpc': 3.0}])
    assert [p.split('/')[-1] for p in plot.make_plots(str(tmp_path))] == ['curves.png']
    assert (tmp_path / 'curves.png').read_bytes().startswith(PNG)


def random_load_records(n_layer, n_expert, steps=(5, 10, 15)):
    rng = np.random.default_rng(0)
    return [{'step': s, 'split': 'train', 'loss': 1.0, 'lr': 1e-3,
             'moe_load': rng.integers(0, 100, (n_layer, n_expert)).tolist(),
             'moe_balance_loss': [1.0] * n_layer} for s in steps]


@pytest.mark.parametrize('n_layer,n_expert', [(1, 2), (12, 64)])
def test_heat_map_sizes_label_every_expert_of_every_layer(tmp_path, n_layer, n_expert):
    fig = plot.load_figure(random_load_records(n_layer, n_expert), 'run')
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == n_layer
    for ax in panels:
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(e) for e in range(n_expert)]
        assert ax.get_yticks().tolist() == list(range(n_expert))
    plots.save(fig, tmp_path / 'moe_load.png')
    assert (tmp_path / 'moe_load.png').read_bytes().startswith(PNG)


def pixel(fig, ax, x, y):
    """The RGB colour (0..1) drawn at data point (x, y) of ax."""
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    col, row = ax.transData.transform((x, y))
    return rgba[rgba.shape[0] - 1 - int(round(row)), int(round(col)), :3] / 255


def test_load_map_is_white_at_an_even_share_red_above_blue_below():
    # Layer 0: 30 and 10 copies then 0 and 40 (even share 20); layer 1: 20 and 20 (even) then 10 and 30.
    fig = plot.load_figure(moe_records(), 'enwik8-moe')
    top, bottom = [ax for ax in fig.axes if ax.images]
    image = top.images[0]
    assert image.cmap.name == 'RdBu_r'
    white = np.array(image.cmap(0.5)[:3])   # the diverging map's neutral middle
    assert image.norm(1.0) == pytest.approx(0.5) and white.min() > 0.9
    # as drawn: the even cell (layer 1, step 10, expert 0) in the neutral colour, 1.5 x red, 0 blue
    np.testing.assert_allclose(pixel(fig, bottom, 12, 0), white, atol=2 / 255)
    red, blue = pixel(fig, top, 12, 0), pixel(fig, top, 18, 0)
    assert red[0] > red[2] + 0.2 and blue[2] > blue[0] + 0.2
    assert 'enwik8-moe' in fig._suptitle.get_text()
    plots.plt.close(fig)


def test_load_scale_keeps_two_x_visible_when_one_expert_takes_everything():
    records = [{'step': 1, 'split': 'train', 'moe_load': [[64, 0, 0, 0, 0, 0, 0, 0]]}]   # 8 x an even share
    fig = plot.load_figure(records, 'run')
    norm = fig.axes[0].images[0].norm
    assert norm.vmax == 4.0 and norm(2.0) == pytest.approx(2 / 3)   # capped at 4 x: 2 x is a third of the red
    assert fig.axes[-1].get_ylabel().startswith('load / even share')
    plots.plt.close(fig)


def test_curves_are_titled_with_the_run_and_its_last_figures(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plot, 'save', lambda fig, path: figures.append(fig))
    run = tmp_path / 'enwik8-moe8'
    run.mkdir()
    write_metrics(run / 'metrics.jsonl', moe_records())
    plot.make_plots(str(run) + '/')
    curves, load = figures
    assert curves.axes[0].get_title() == 'enwik8-moe8: valid 3.750 at step 20'
    assert 'enwik8-moe8' in load._suptitle.get_text()
    for fig in figures:
        plots.plt.close(fig)


def test_a_one_point_curve_has_a_marker():
    records = [{'step': 4, 'split': 'train', 'loss': 2.0, 'bpc': 2.9, 'lr': 1e-3},
               {'step': 4, 'split': 'valid', 'loss': 2.1, 'bpc': 3.0}]
    fig = plot.curves_figure(records, 'run')
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines['train'].get_marker() not in ('None', '', None) and lines['valid'].get_marker() == 'o'
    assert fig.axes[1].get_lines()[0].get_marker() not in ('None', '', None)   # the learning rate
    plots.plt.close(fig)
