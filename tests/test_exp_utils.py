"""utils/exp_utils.py: metrics.jsonl and its TensorBoard copy; the device-wide precision switches."""
import json
import math
import os

import pytest
import torch

from utils.exp_utils import MetricsWriter, demo_device_flags, set_deterministic, use_tf32


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
