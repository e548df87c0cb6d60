"""utils/exp_utils.py: metrics.jsonl and its TensorBoard copy; the device-wide precision switches."""
import json
import math
import os

import pytest
import torch

from utils.exp_utils import MetricsWriter, OneLineArgumentParser, demo_device_flags, set_deterministic, use_tf32


def board_scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(directory), size_guidance={'scalars': 0})
    board.Reload()
    return [(e.step, e.value) for e in board.Scalars(tag)]


def test_a_resumed_run_replaces_the_events_after_its_checkpoint_in_both_logs(tmp_path):
    pytest.importorskip('tensorboard')
    path = str(tmp_path / 'metrics.jsonl')
    killed = MetricsWriter(path, tensorboard=True)
    for step in (1, 2, 3, 4):
        killed.write(step=step, split='train', loss=float(step))
    killed.close()
    resumed = MetricsWriter(path, tensorboard=True)
    resumed.truncate_after(2)    # the checkpoint was at step 2: steps 3 and 4 run again
    resumed.write(step=3, split='train', loss=math.nan)
    resumed.close()
    with open(path) as f:
        assert [(r['step'], r['loss']) for r in map(json.loads, f)] == [(1, 1.0), (2, 2.0), (3, 'nan')]
    events = board_scalars(tmp_path, 'train/loss')
    assert events[:2] == [(1, 1.0), (2, 2.0)]
    assert len(events) == 3 and events[2][0] == 3 and math.isnan(events[2][1])   # TensorBoard keeps the NaN


def test_without_tensorboard_nothing_but_metrics_jsonl_is_written(tmp_path):
    writer = MetricsWriter(str(tmp_path / 'metrics.jsonl'))
    writer.write(step=1, split='train', loss=1.0)
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']


@pytest.fixture
def tf32_switches():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize('capability,allowed,on', [((7, 0), True, False), ((8, 0), True, True),
                                                   ((9, 0), True, True), ((9, 0), False, False)])
def test_tf32_on_ampere_and_newer_unless_refused(monkeypatch, tf32_switches, capability, allowed, on):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert use_tf32(torch.device('cuda', 0), allowed) is on
    assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on


def test_tf32_leaves_the_cpu_alone(tf32_switches):
    torch.backends.cuda.matmul.allow_tf32 = True
    assert use_tf32(torch.device('cpu')) is False
    assert torch.backends.cuda.matmul.allow_tf32 is True  # the CPU's products are not TF32's business


@pytest.mark.parametrize('capability,amp', [((7, 0), 'fp16'), ((7, 5), 'fp16'), ((8, 0), 'bf16'), ((9, 0), 'bf16')])
def test_demo_trains_in_bf16_only_on_gpus_with_bf16_units(monkeypatch, capability, amp):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)  # also on V100/T4 (emulated)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
    assert demo_device_flags() == ['--cuda', '--amp', amp]


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)  # monkeypatch restores the variable afterwards
    yield
    set_deterministic(False)


@pytest.mark.parametrize('exported, kept', [(None, ':4096:8'), (':16:8', ':16:8'), (':0:0', ':4096:8')])
def test_deterministic_sets_torch_cudnn_and_a_deterministic_cublas_workspace(restore_determinism, monkeypatch,
                                                                            exported, kept):
    if exported is not None:
        monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', exported)
    torch.backends.cudnn.benchmark = True
    set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == kept  # one of cuBLAS's two reproducible settings
    set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def spellings_parser():
    parser = OneLineArgumentParser(prog='x.py')
    parser.add_argument('--eval-interval', type=int, default=25)
    parser.add_argument('--work_dir', required=True)
    parser.add_argument('--clamp_len', type=int, default=-1)
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--prompt_file', default=None)
    return parser


@pytest.mark.parametrize('argv', [
    ['--work_dir', 'a-b_c', '--eval-interval', '7', '--prompt_file', 'x_y-z'],
    ['--work-dir', 'a-b_c', '--eval_interval', '7', '--prompt-file', 'x_y-z'],
    ['--work-dir=a-b_c', '--eval_interval=7', '--prompt-file=--x_y-z'],
    ['--work_d', 'a-b_c', '--eval_int', '7', '--prompt-f', 'x_y-z'],   # abbreviations of either spelling
])
def test_a_flag_takes_either_spelling_and_values_are_left_alone(argv):
    args = spellings_parser().parse_args(argv)
    assert vars(args) == dict(work_dir='a-b_c', eval_interval=7, clamp_len=-1, prompt_file=argv[-1].split('=')[-1])


def test_an_abbreviation_of_both_spellings_is_one_flag_and_help_shows_the_declared_one(capsys):
    assert spellings_parser().parse_args(['--work_dir', 'w', '--clam', '3']).clamp_len == 3
    with pytest.raises(SystemExit):
        spellings_parser().parse_args(['--help'])
    text = capsys.readouterr().out
    assert '--eval-interval EVAL_INTERVAL' in text and '--prompt_file PROMPT_FILE' in text
    assert '--eval_interval' not in text and '--work-dir' not in text and '--prompt-file' not in text


def script_parsers():
    import convert_checkpoint, eval, generate, moe_report, plot, study
    from run import options
    return {'train.py': options.build_parser, 'eval.py': eval.build_parser, 'generate.py': generate.build_parser,
            'study.py': study.build_parser, 'moe_report.py': moe_report.build_parser, 'plot.py': plot.build_parser,
            'convert_checkpoint.py': convert_checkpoint.build_parser}


def a_value(action):
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(list(action.choices)[-1])]
    return ['3'] if action.type in (int, float) else ['x']


@pytest.mark.parametrize('script', ['train.py', 'eval.py', 'generate.py', 'study.py', 'moe_report.py', 'plot.py',
                                    'convert_checkpoint.py'])
def test_every_flag_of_every_script_takes_both_spellings_and_help_shows_one(script, capsys):
    parser = script_parsers()[script]()
    flags = [a for a in parser._actions if getattr(a, 'aliases', ())]
    required = [arg for a in parser._actions if a.required for arg in (a.option_strings[0], *a_value(a))]
    checked = 0
    for action in flags:
        declared = parser.parse_args([*required, action.option_strings[0], *a_value(action)])
        for alias in action.aliases:
            assert action.option_strings[0].replace('_', '-') == alias.replace('_', '-')
            assert vars(parser.parse_args([*required, alias, *a_value(action)])) == vars(declared), alias
            checked += 1
    assert checked > 0
    with pytest.raises(SystemExit):
        parser.parse_args(['--help'])
    text = capsys.readouterr().out
    for action in flags:
        assert not any(alias in text.replace(',', ' ').split() for alias in getattr(action, 'aliases', ())), action
