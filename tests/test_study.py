"""study.py in a tiny fast mode: tables and plots, a continued (upcycled) run, and resuming after Ctrl-C."""
import argparse
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import study
from run.model_file import load_model
from conftest import ROOT, sigint_at_training_forward, write_corpus

TINY = ['--steps', '4', '--n_layer', '1', '--d_model', '16', '--n_head', '2', '--d_inner', '32', '--tgt_len', '8',
        '--mem_len', '8', '--batch_size', '2', '--eval_interval', '2', '--max_eval_steps', '2']
PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp('enwik8'), sizes=(6000, 2000, 2000))


def run_study(out, corpus, *flags):
    return study.main(['--out', str(out), '--data', str(corpus), *TINY, *flags])


def train_losses(run_dir):
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    return [(r['step'], r['loss']) for r in map(json.loads, lines) if r['split'] == 'train']


def test_default_configurations_have_equal_active_ffn_width():
    for name, config in study.configurations(256, 100).items():
        flags = config['flags']
        width = int(flags[flags.index('--d_inner') + 1])
        top_k = int(flags[flags.index('--moe-top-k') + 1]) if '--moe' in flags else 1
        shared = int(flags[flags.index('--moe-shared-expert') + 1]) if '--moe-shared-expert' in flags else 0
        assert width * (top_k + shared) == 256, name


def test_study_writes_results_resumes_after_ctrl_c_and_skips_finished_runs(tmp_path, corpus, monkeypatch, capsys):
    configs = ['--configs', 'moe8-top1-upcycled,moe16-auxfree']   # pulls in dense, which upcycling starts from
    reference = tmp_path / 'reference'
    assert run_study(reference, corpus, '--configs', 'moe16-auxfree', '--seeds', '1') == 0

    with monkeypatch.context() as m:
        sigint_at_training_forward(m, 3, when=lambda model: model.config['moe_gate'] == 'auxfree')
        assert run_study(tmp_path / 'out', corpus, *configs) == 128 + signal.SIGINT
    assert 'rerun the same command to continue' in capsys.readouterr().err
    runs = tmp_path / 'out' / 'runs'
    assert not (tmp_path / 'out' / 'results.json').exists()

    assert run_study(tmp_path / 'out', corpus, *configs) == 0
    out = capsys.readouterr().out
    assert out.count('finished, skipped') == 4 and 'moe16-auxfree seed 1: resuming' in out
    assert 'Resuming from' in (runs / 'moe16-auxfree-s1' / 'log.txt').read_text()
    assert train_losses(runs / 'moe16-auxfree-s1') == train_losses(reference / 'runs' / 'moe16-auxfree-s1')

    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert list(results) == ['dense', 'moe8-top1-upcycled', 'moe16-auxfree']
    assert results['dense']['params_active'] == results['dense']['params_total']
    upcycled = results['moe8-top1-upcycled']
    assert upcycled['params_active'] < upcycled['params_total'] and upcycled['steps'] == 4 + 2
    assert upcycled['runs'][0]['steps'][0] > 4   # plotted after the dense run it starts from
    for r in results.values():
        assert r['final_valid_bpc']['spread'] >= 0 and len(r['runs']) == 2
    table = (tmp_path / 'out' / 'results.md').read_text()
    assert all(f'| {name} |' in table for name in results)
    for png in ('study_bpc.png', 'study_imbalance.png'):
        assert (tmp_path / 'out' / png).read_bytes().startswith(PNG)

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob('*/metrics.jsonl')}
    assert run_study(tmp_path / 'out', corpus, *configs) == 0
    assert capsys.readouterr().out.count('finished, skipped') == 6
    assert {p: p.stat().st_mtime_ns for p in runs.glob('*/metrics.jsonl')} == stamps
    assert run_study(tmp_path / 'out', corpus, *configs, '--lr', '0.001') == 2   # not the runs it made
    assert 'was trained with other flags (differing: 0.001 0.002)' in capsys.readouterr().err


@pytest.mark.parametrize('flags,message', [
    (['--configs', 'moe3'], '--configs: unknown moe3'),
    (['--seeds', 'one'], "--seeds 'one'"),
    (['--d_inner', '30'], '--d_inner 30 must be a multiple of 4'),
    (['--dataset', 'enwik9'], '--dataset enwik9: unknown'),
    # a --max_step of its own kept every run short of the study's: "stopped (exit code 130)" on every rerun
    (['--train_args=--max_step 2'], "--train_args '--max_step 2' sets --max_step, which the study sets from --steps"),
    (['--train_args=--max_st=2'], "sets --max_step"),
    (['--train_args=--bogus'], "train.py refuses the runs' flags with --train_args '--bogus': unrecognized"),
])
def test_bad_input_exits_2_in_one_line(tmp_path, corpus, capsys, flags, message):
    assert run_study(tmp_path / 'out', corpus, *flags) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('out', ['file', '/proc/study'])
def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path, corpus, capsys, out):
    if out == 'file':
        out = tmp_path / 'file'
        out.write_text('mine')
    assert run_study(out, corpus) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'study.py: error: --out {out} ')
    assert out == '/proc/study' or out.read_text() == 'mine'


# The first study, stopped (SIGSTOP) at its first training step: train.py holds the run directory's lock and has
# written no checkpoint yet.
STOPPED_AT_THE_FIRST_STEP = """
import os, signal, sys
from run.trainer import Trainer
step = Trainer.train_step
def stop_then_step(self, *args):
    os.kill(os.getpid(), signal.SIGSTOP)
    return step(self, *args)
Trainer.train_step = stop_then_step
import study
sys.exit(study.main(sys.argv[1:]))
"""


def test_a_second_study_in_the_same_out_leaves_the_first_ones_run_alone(tmp_path, corpus, capsys):
    """It deleted the run directory the first study was training in (no checkpoint yet), then both trained."""
    out, flags = tmp_path / 'out', ['--configs', 'dense', '--seeds', '1']
    first = subprocess.Popen([sys.executable, '-c', STOPPED_AT_THE_FIRST_STEP, '--out', str(out), '--data',
                              str(corpus), *TINY, *flags], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        stat = f'/proc/{first.pid}/stat'
        for _ in range(1200):
            if open(stat).read().rsplit(')', 1)[1].split()[0] == 'T' or first.poll() is not None:
                break
            time.sleep(0.05)
        run = out / 'runs' / 'dense-s1'
        before = (run.stat().st_ino, sorted(os.listdir(run)))
        assert first.poll() is None and 'log.txt' in before[1] and 'checkpoint.pt' not in before[1]
        assert run_study(out, corpus, *flags) == 2
        err = capsys.readouterr().err
        assert err == f'study.py: error: --out {out} is in use by another process (it holds the lock on it): wait ' \
                      'for it to end or choose another directory\n'
        assert (run.stat().st_ino, sorted(os.listdir(run))) == before
    finally:
        first.kill()
        first.wait()


def test_the_sample_is_prepared_into_out_data_and_a_corpus_there_is_left_alone(tmp_path, capsys):
    """Without --data the sample was prepared with --force whenever a split was missing: a train.txt of the
    user's in OUT/data was overwritten."""
    data = study.prepare_data(argparse.Namespace(data=None, out=str(tmp_path / 'fresh')))
    assert sorted(os.listdir(data)) == ['test.txt', 'train.txt', 'valid.txt']
    assert os.listdir(tmp_path / 'fresh') == ['data']   # the partial directory renamed: nothing else left
    mine = tmp_path / 'out' / 'data'
    mine.mkdir(parents=True)
    (mine / 'train.txt').write_text('my corpus')
    assert study.main(['--out', str(tmp_path / 'out'), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{mine} is there but lacks valid.txt, test.txt: it is left alone' in err
    assert os.listdir(mine) == ['train.txt'] and (mine / 'train.txt').read_text() == 'my corpus'


def test_a_run_that_failed_on_its_data_starts_again_with_the_corrected_command(tmp_path, corpus, capsys):
    """Its first command's flags were kept: the corrected one was refused as 'trained with other flags'."""
    small = write_corpus(tmp_path / 'small', sizes=(6000, 10, 2000))   # too short for the evaluation batch
    flags = ['--configs', 'dense', '--seeds', '1']
    assert run_study(tmp_path / 'out', small, *flags) == 2
    assert 'valid' in capsys.readouterr().err
    assert run_study(tmp_path / 'out', corpus, *flags) == 0
    argv = json.loads((tmp_path / 'out' / 'runs' / 'dense-s1' / 'study_argv.json').read_text())
    assert argv[argv.index('--data') + 1] == str(corpus)


@pytest.fixture(scope='module')
def finished_study(tmp_path_factory, corpus):
    """A finished one-run study and a copy of it: fresh() puts the copy back where the study ran (its runs' flags
    name their directories)."""
    out = tmp_path_factory.mktemp('finished') / 'out'
    assert run_study(out, corpus, '--configs', 'dense', '--seeds', '1') == 0
    shutil.copytree(out, out.parent / 'pristine')

    def fresh():
        shutil.rmtree(out)
        shutil.copytree(out.parent / 'pristine', out)
        return out, out / 'runs' / 'dense-s1'
    return fresh


def lines_of(path):
    return path.read_text().splitlines(keepends=True)


@pytest.mark.parametrize('damage,message', [
    (lambda run: (run / 'model.pt').unlink(), 'model.pt is missing'),
    (lambda run: (run / 'model.pt').write_bytes((run / 'model.pt').read_bytes()[:500]), 'model.pt is truncated'),
    (lambda run: (run / 'metrics.jsonl').write_text('[1, 2]\n'), 'metrics.jsonl has a line that train.py did not'),
    (lambda run: (run / 'metrics.jsonl').write_text(''.join(lines_of(run / 'metrics.jsonl')) + '{"split": "test"}\n'),
     'metrics.jsonl has a line that train.py did not write ({"split": "test"})'),
    (lambda run: (run / 'metrics.jsonl').write_text(''.join(l for l in lines_of(run / 'metrics.jsonl')
                                                            if '"valid"' not in l)),
     'metrics.jsonl has no validation results'),
])
def test_a_damaged_finished_run_is_one_line(finished_study, corpus, capsys, damage, message):
    out, run = finished_study()
    damage(run)
    capsys.readouterr()
    assert run_study(out, corpus, '--configs', 'dense', '--seeds', '1') == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err
    assert err.endswith(f': remove the run directory {run} and rerun the same command to train it again\n')


def test_a_full_disk_while_writing_the_results_keeps_the_previous_ones(finished_study, corpus, capsys, monkeypatch):
    """The results were written with open() and replaced: a full disk gave a traceback and a 0-byte .tmp."""
    out, _ = finished_study()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    assert run_study(out, corpus, '--configs', 'dense', '--seeds', '1') == 2
    err = capsys.readouterr().err
    assert err == f'study.py: error: no space left on device writing {out}/results.json: the previous file is ' \
                  'kept; free some space and run again\n'
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ the figures

# The README's study: final valid bpc and tokens/s of each configuration (the curves: shaped like its figure).
README_STUDY = {'dense': (4.817, 3117), 'moe8-naive': (4.722, 2429), 'moe16-naive': (4.657, 3166),
                'moe64-naive': (4.602, 1648), 'moe16-gshard': (4.682, 3084), 'moe16-switch': (4.740, 2554),
                'moe16-noisy': (4.668, 3033), 'moe16-auxfree': (4.648, 3367), 'moe16-auxfree-0.01': (4.662, 1585),
                'moe16-shared': (4.685, 3555), 'moe8-top1-scratch': (4.687, 2846),
                'dense-continued': (4.523, 3623), 'moe8-top1-upcycled': (4.524, 2579)}
SLOW_SEED = 6.0   # moe16-auxfree-0.01's seed 2 ran six times slower (another process took the cores)


def readme_like_results():
    """results.json's plotted fields for the README's study; moe8-top1-upcycled validated once (one point)."""
    results = {}
    for name, (final, tokens_per_s) in README_STUDY.items():
        continued = name in ('dense-continued', 'moe8-top1-upcycled')
        steps = [225] if name == 'moe8-top1-upcycled' else [175, 200, 225] if continued else [25, 50, 75, 100, 125, 150]
        runs = []
        for seed in (1, 2):
            s = np.array(steps, dtype=float)
            bpc = final + (5.75 - final) * np.exp(-(s - 25) / 30) + (0.01 if seed == 1 else -0.01)
            per_step = 512 / tokens_per_s * (SLOW_SEED if (name, seed) == ('moe16-auxfree-0.01', 2) else 1)
            start = 150 * 512 / README_STUDY['dense'][1] if continued else 0.
            seconds = start + (s - (150 if continued else 0)) * per_step
            imbalance_steps = [] if name.startswith('dense') else list(range(5, steps[-1] + 1, 5))
            runs.append(dict(steps=steps, seconds=seconds.tolist(), valid_bpc=bpc.tolist(),
                             imbalance_steps=imbalance_steps, imbalance=[1.5] * len(imbalance_steps)))
        results[name] = dict(seeds=[1, 2], runs=runs, final_valid_bpc=dict(mean=final, spread=0.02))
    return results


def test_study_bpc_figure_shows_short_curves_a_readable_legend_and_seconds_of_the_faster_seed(tmp_path, monkeypatch):
    figures = {}
    monkeypatch.setattr(study, 'save', lambda fig, path: figures.__setitem__(os.path.basename(path), fig))
    study.plot_results(readme_like_results(), str(tmp_path / 'my-study'))
    fig = figures['study_bpc.png']
    steps_ax, seconds_ax = fig.axes
    assert fig._suptitle.get_text() == 'my-study: valid bpc of each configuration, seeds 1, 2'
    lines = {line.get_label(): line for line in steps_ax.get_lines() if not line.get_label().startswith('_')}

    # the one-point curve (the table's best MoE row) is drawn: a marker, and the seeds' range as an error bar
    upcycled, continued = lines['moe8-top1-upcycled  4.524'], lines['dense-continued  4.523']
    assert len(upcycled.get_xdata()) == 1 and upcycled.get_marker() not in ('None', '', None)
    assert upcycled.get_markersize() >= 5 and steps_ax.containers   # the error bar
    assert (upcycled.get_color(), upcycled.get_marker()) != (continued.get_color(), continued.get_marker())
    assert lines['dense  4.817'].get_marker() == 'None'   # six points: a line is enough

    # the legend: every configuration, best final bpc first, in readable type, right of the plots
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert [label.split()[0] for label in labels] == sorted(README_STUDY, key=lambda n: README_STUDY[n][0])
    assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= seconds_ax.get_window_extent(renderer).x1

    # seconds: the faster seed's, so that the slow seed does not stretch the axis
    slow = {line.get_label(): line for line in seconds_ax.get_lines()}['moe16-auxfree-0.01  4.662']
    assert slow.get_xdata()[-1] == pytest.approx(150 * 512 / 1585)
    assert seconds_ax.get_xlim()[1] < 150 * 512 / 1585 * 1.5 and 'faster seed' in seconds_ax.get_xlabel()

    imbalance = figures['study_imbalance.png']
    assert len(imbalance.legends[0].get_texts()) == 11 and 'my-study' in imbalance._suptitle.get_text()
    for fig in figures.values():
        study.plt.close(fig)


def test_the_parameter_count_is_train_py_s(finished_study):
    """The table's count is train.py's #params: each parameter once, the tied softmax weight too (a sum over the
    state dict counts it twice)."""
    out, run = finished_study()
    results = json.loads((out / 'results.json').read_text())
    model, saved = load_model(run / 'model.pt')
    assert model.crit.out_layers[0].weight is model.word_emb.emb_layers[0].weight  # enwik8's default: tied
    total = sum(p.numel() for p in model.parameters())
    assert total < sum(v.numel() for v in saved['model_state'].values())
    assert results['dense']['params_total'] == results['dense']['params_active'] == total
    assert f'#params = {total}\n' in (run / 'log.txt').read_text()
