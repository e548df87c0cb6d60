"""study.py in a tiny fast mode: tables and plots, a continued (upcycled) run, and resuming after Ctrl-C."""
import json
import os
import signal

import pytest

import mem_transformer
import study
from conftest import write_corpus

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

    forward, calls = mem_transformer.MemTransformerLM.forward, [0]

    def interrupt_in_the_auxfree_run(self, *args):
        if self.training and self.config['moe_gate'] == 'auxfree':
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, *args)
    with monkeypatch.context() as m:
        m.setattr(mem_transformer.MemTransformerLM, 'forward', interrupt_in_the_auxfree_run)
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
])
def test_bad_input_exits_2_in_one_line(tmp_path, corpus, capsys, flags, message):
    assert run_study(tmp_path / 'out', corpus, *flags) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err and not (tmp_path / 'out').exists()
