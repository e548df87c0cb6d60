"""bench/bench_train.py times train.py's own step: the TrainStep of bench/steps.py is run/trainer.py's
Trainer.train_step, its optimizer clock sees every optimizer step, and the original's model it compares with
computes the same losses."""
import json
import sys
from pathlib import Path

import pytest
import torch

from run.trainer import Trainer, fused_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
import bench_train  # noqa: E402
import original  # noqa: E402
import steps  # noqa: E402

@pytest.fixture(autouse=True)
def one_thread():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models gain nothing from a second thread on a busy machine
    yield
    torch.set_num_threads(n_threads)


TINY = dict(n_token=30, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32, tgt_len=6, mem_len=6, bsz=2)


@pytest.mark.parametrize('config', [TINY, dict(TINY, d_inner=16, moe=True, moe_num_expert=4, moe_top_k=2)],
                         ids=['dense', 'moe'])
def test_a_benchmark_step_is_the_trainers_step(config, monkeypatch):
    calls = []
    real = Trainer.train_step
    monkeypatch.setattr(Trainer, 'train_step', lambda self, *a: calls.append(a) or real(self, *a))
    step = steps.TrainStep(config)
    assert step.trainer.optimizer.param_groups[0]['fused'] == fused_available(torch.optim.Adam, 'cpu')
    losses = [step() for _ in range(3)]
    assert len(calls) == 3 and len(step.clock.seconds) == 3 and all(s > 0 for s in step.clock.seconds)
    assert all(torch.equal(data, step.batch[:-1]) and torch.equal(target, step.batch[1:]) for data, target in calls)
    assert step.trainer.step == 3 and losses[-1] < losses[0]   # it trains on its fixed batch


def test_the_per_parameter_loop_variant_is_timed_too():
    step = steps.TrainStep(TINY, optimizer='per-parameter loop')
    step()
    assert step.trainer.optimizer.param_groups[0]['foreach'] is False and len(step.clock.seconds) == 1


def test_the_original_model_computes_the_same_losses():
    module = original.load()
    if module is None:
        pytest.skip(f'the original Transformer-XL is not at {original.WHERE}')
    ours, theirs = steps.TrainStep(TINY), bench_train.OriginalStep(module, TINY)
    assert bench_train.same_function(ours.model, theirs.model, theirs.batch) < 1e-5
    # both train; dropout streams differ. ours() is a 0-dim tensor (Trainer.train_step's), read here: pytest.approx
    # of a tensor fails on newer pytest (9.2 iterates it)
    assert float(theirs()) == pytest.approx(float(ours()), rel=0.2)


def test_the_bf16_loss_check_reports_plain_numbers(monkeypatch):
    """Its figures go into bench_train.py's and run_all.py's JSON: plain floats, not the tensors a step returns."""
    if bench_train.sample_text() is None:
        pytest.skip('the enwik8 sample is not in samples/')
    monkeypatch.setitem(steps.CONFIGS, 'tiny', dict(TINY, n_token=204))
    check = bench_train.bf16_loss_check(3, 'tiny', last=2)
    assert json.loads(json.dumps(check)) == check
    assert (check['steps'], check['last']) == (3, 2) and type(check['first_loss']) is float
