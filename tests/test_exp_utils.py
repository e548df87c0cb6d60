"""utils/exp_utils.py: metrics.jsonl and its TensorBoard copy."""
import json
import math

import pytest

from utils.exp_utils import MetricsWriter


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
