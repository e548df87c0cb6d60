"""How the benchmark suite's figures read (bench/report.py, bench/run_all.py's report, bench/timing.py's Timings):
ratios whose repeats disagree are shown with their range, --quick judges no target, and a skipped row (b) says
which transformers it found and which it needs. On bench/results.json, a real run, and on hand-made figures."""
import copy
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / 'bench'
sys.path.insert(0, str(BENCH))
import report  # noqa: E402
import run_all  # noqa: E402
from timing import Timings  # noqa: E402


@pytest.fixture
def real_run():
    """bench/results.json: a full run of the suite (with transformers 5.24.0's Mixtral rows, no loss check)."""
    return json.loads((BENCH / 'results.json').read_text())


def test_timings_keep_every_repeat_and_give_the_range_of_the_paired_ratios():
    # repeat 3: a load burst slowed 'a' alone; its medians' ratio hides it, the paired ratios do not
    timings = Timings({'a': [2.0, 2.2, 20.0], 'b': [1.0, 1.0, 1.1]})
    assert timings == {'a': 2.2, 'b': 1.0}
    assert timings.ratio_range('a', 'b') == pytest.approx([2.0, 20.0 / 1.1])
    assert timings.scaled(1e3) == {'a': pytest.approx(2200.0), 'b': pytest.approx(1000.0)}
    assert timings.scaled(1e3).ratio_range('b', 'a') == pytest.approx([1.1 / 20.0, 1 / 2.0])


def test_a_ratio_whose_repeats_disagree_is_printed_with_their_range():
    assert report.ratio_text(28.1, [1.6, 28.1]) == '28.10 (noisy: repeats 1.60-28.10)'
    assert report.ratio_text(1.65, [1.6, 1.7]) == '1.65'   # within 25%: the median alone
    assert report.ratio_text(1.65) == '1.65'               # an earlier run's JSON has no ranges
    assert report.ratio_text(0.5, [0.25, 1.0], invert=True) == '2.00 (noisy: repeats 1.00-4.00)'


@pytest.mark.parametrize('value,spread,quick,expected', [
    (1.6, [1.55, 1.7], False, 'MISSED'),
    (2.6, [2.55, 2.7], False, 'holds'),
    (2.6, [1.6, 28.0], False, 'UNCLEAR: its repeats gave 1.60-28.00, on both sides of the target'),
    (1.6, [1.55, 1.7], True, 'not judged (--quick)'),
    (2.6, None, False, 'holds'),
])
def test_verdicts(value, spread, quick, expected):
    assert report.verdict(value, 2.5, '>=', spread, quick) == expected


def test_full_run_report_judges_every_target_under_a_heading(real_run, capsys):
    run_all.report(real_run)
    out = capsys.readouterr().out
    heading = next(line for line in out.splitlines() if line.startswith('Targets:'))
    assert "bench/README.md, 'Targets'" in heading
    judged = [line for line in out.split(heading)[1].splitlines() if line.startswith('  ')]
    # 7 of training (bf16 step, enwik8-base, (a) in fp32 and bf16, (c) three times); of the MoE layer, at each of
    # 2 shapes x 3 expert counts: against the floor, Mixtral's time and its peak memory, and in bf16 moe-stepped
    # against the floor too: 2 x 3 x 7
    assert len(judged) == 7 + 42
    assert all(line.endswith(('holds', 'MISSED')) or 'UNCLEAR: its repeats gave' in line for line in judged)
    assert '  train, (c) 64-expert step fp32, 1 thread(s): 0.67x' in out
    assert "  MoE layer, 64 experts bf16, 5632x512x1024, moe: time / transformers' grouped_mm Mixtral" in out
    assert '(b) skipped' not in out   # its Mixtral rows are there


def test_quick_run_report_says_why_no_target_is_judged(real_run, capsys):
    quick = dict(real_run, quick=True, repeats=3, warmup=1)
    quick['bf16_loss_check'] = dict(quick['bf16_loss_check'] or {}, steps=40, train_rel_diff=0.003,
                                    heldout_rel_diff=0.002, config='cpu-dense', first_loss=5.4, last=20,
                                    train_loss={'fp32': 2.6, 'bf16': 2.6}, heldout_loss={'fp32': 2.7, 'bf16': 2.7})
    run_all.report(quick)
    out = capsys.readouterr().out
    assert 'MISSED' not in out and 'holds' not in out
    assert out.count('not judged (--quick)\n') == 49 + 1   # and the loss check
    heading = next(line for line in out.splitlines() if line.startswith('Targets, not judged'))
    assert '--quick times 3 repeats after 1 warm-up (a full run: 10 after 2)' in heading
    assert 'the bf16 loss check over 40 steps (the target: 200)' in heading and 'not judged' in heading


def test_noisy_ratios_in_the_table_and_an_unclear_target(real_run, capsys):
    noisy = copy.deepcopy(real_run)
    row = next(r for r in noisy['train'] if (r['config'], r['dtype'], r['paths']) == ('cpu-dense', 'bf16', 'fast'))
    row.update(vs_fp32=28.1, vs_fp32_range=[1.6, 28.1])   # the fp32 step's median caught a load burst
    run_all.report(noisy)
    out = capsys.readouterr().out
    assert '| 28.10 (noisy: repeats 1.60-28.10) (fp32) |' in out
    assert ('train, CPU-sized dense: bf16 step 28.10 (noisy: repeats 1.60-28.10)x the fp32 step (target >= 2.5x) '
            'UNCLEAR: its repeats gave 1.60-28.10, on both sides of the target') in out


@pytest.mark.parametrize('version,expected', [
    (None, 'transformers is not installed; they need transformers 5.0 or later'),
    ('4.35.2', 'transformers 4.35.2 is installed, but they need transformers 5.0 or later'),
    ('5.0.0rc1', 'transformers 5.0.0rc1 has no grouped_mm Mixtral experts; they need transformers 5.0 or later'),
])
def test_the_skipped_mixtral_rows_name_the_transformers_found_and_needed(version, expected):
    message = report.mixtral_skipped(version)
    assert message.startswith(expected)
    assert ("'grouped_mm' experts implementation" in message) and '\n' not in message
    if version == '4.35.2':   # why the test suite's 4.35.2 cannot simply be upgraded
        assert 'tests/test_hf_transfo_xl.py' in message and 'pip install "transformers>=5"' in message


def test_the_installed_version_is_read_and_reported(real_run, monkeypatch, capsys):
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: {'transformers': '4.35.2'}[name])
    assert report.transformers_version() == '4.35.2'
    without_mixtral = dict(real_run, transformers=report.transformers_version(),
                           moe_layer=[r for r in real_run['moe_layer'] if not r['variant'].startswith('mixtral')])
    for r in without_mixtral['moe_layer']:
        r['vs_mixtral'] = None
    run_all.report(without_mixtral)
    out = capsys.readouterr().out
    assert '(b) skipped: transformers 4.35.2 is installed, but they need transformers 5.0 or later' in out

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, 'version', missing)
    assert report.transformers_version() is None
    del without_mixtral['transformers']   # an earlier run's JSON: what was installed then is not known
    run_all.report(without_mixtral)
    assert '(b) skipped: no Mixtral rows in this run (they need transformers 5.0 or later' in capsys.readouterr().out


def moe_row(variant, dtype='fp32', vs_floor=1.0, vs_mixtral=None, peak_mib=None, shape='1024x256x512'):
    return dict(shape=shape, experts=8, dtype=dtype, variant=variant, vs_floor=vs_floor, vs_mixtral=vs_mixtral,
                vs_mixtral_range=None, peak_mib=peak_mib)


def test_the_moe_layer_is_judged_against_its_floor_and_the_mixtral_experts_cell_by_cell():
    rows = [moe_row('moe', vs_floor=1.09, vs_mixtral=0.97, peak_mib=30.0),
            moe_row('moe-stepped', vs_floor=1.12),                       # fp32: no copy to make, not judged
            moe_row('mixtral-grouped_mm', vs_floor=1.2, vs_mixtral=1.0, peak_mib=29.0),
            moe_row('moe', 'bf16', vs_floor=1.21, vs_mixtral=0.6),
            moe_row('mixtral-grouped_mm', 'bf16', vs_floor=2.0, vs_mixtral=1.0),
            moe_row('moe-stepped', 'bf16', vs_floor=1.19),
            moe_row('moe', shape='5632x512x1024', vs_floor=1.11)]       # no Mixtral row in this cell
    lines = report.moe_target_lines(rows)
    assert lines == [
        '  8 experts fp32, 1024x256x512, moe: time / floor = 1.09 (target <= 1.1) holds',
        "  8 experts fp32, 1024x256x512, moe: time / transformers' grouped_mm Mixtral experts = 0.97 (target <= 1.0) "
        'holds',
        "  8 experts fp32, 1024x256x512, moe: peak MiB 30.0 vs the Mixtral experts' 29.0 (target <=) MISSED",
        '  8 experts bf16, 1024x256x512, moe: time / floor = 1.21 (target <= 1.2) MISSED',
        "  8 experts bf16, 1024x256x512, moe: time / transformers' grouped_mm Mixtral experts = 0.60 (target <= 1.0) "
        'holds',
        '  8 experts bf16, 1024x256x512, moe-stepped: time / floor = 1.19 (target <= 1.2) holds',
        '  8 experts fp32, 5632x512x1024, moe: time / floor = 1.11 (target <= 1.1) MISSED']
    assert all(line.endswith('not judged (--quick)') for line in report.moe_target_lines(rows, quick=True))
