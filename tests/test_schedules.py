"""The closed-form schedules against torch's own schedulers driven the way the original train.py drove them."""
import math
import warnings

import pytest
import torch

from utils.schedules import PlateauDecay, learning_rate


def original_rates(scheduler, lr, warmup_step, max_step, eta_min, n_steps):
    """The rate used by each of the first n_steps updates in the original training loop (torch schedulers,
    warmup written into param_groups after each step), indexed by the number of finished updates."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    if scheduler == 'cosine':
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_step, eta_min=eta_min)
    elif scheduler == 'inv_sqrt':
        def multiplier(step):
            if step == 0 and warmup_step == 0:
                return 1.
            return 1. / step ** 0.5 if step > warmup_step else step / warmup_step ** 1.5
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=multiplier)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # scheduler.step(epoch) is deprecated but is what the original called
        for train_step in range(1, n_steps + 1):
            rates.append(opt.param_groups[0]['lr'])
            opt.step()
            if scheduler in ('cosine', 'constant'):
                if train_step < warmup_step:
                    opt.param_groups[0]['lr'] = lr * train_step / warmup_step
                elif scheduler == 'cosine':
                    sched.step(train_step)
            else:
                sched.step(train_step)
    return rates


@pytest.mark.parametrize('scheduler,warmup', [('cosine', 0), ('cosine', 7), ('inv_sqrt', 0), ('inv_sqrt', 7),
                                              ('constant', 0)])
def test_matches_the_original_loop(scheduler, warmup):
    lr, max_step, eta_min = 0.00025, 50, 1e-5
    expected = original_rates(scheduler, lr, warmup, max_step, eta_min, max_step)
    ours = [learning_rate(step, lr, scheduler, warmup, max_step, eta_min) for step in range(max_step)]
    # With warmup the original's first update used the full rate (documented quirk, not kept): compare the rest.
    first = 1 if warmup and scheduler != 'inv_sqrt' else 0
    assert ours[first:] == pytest.approx(expected[first:], rel=1e-12, abs=1e-15)
    if first:
        assert expected[0] == lr and ours[0] == 0.


def test_warmup_then_values_by_hand():
    lr = 1.0
    assert [learning_rate(s, lr, 'constant', warmup_step=4) for s in range(6)] == [0, .25, .5, .75, 1, 1]
    # Cosine counts from step 0, not from the end of warmup, as the original does.
    assert learning_rate(4, lr, 'cosine', warmup_step=4, max_step=8) == pytest.approx((1 + math.cos(math.pi / 2)) / 2)
    assert learning_rate(8, lr, 'cosine', max_step=8, eta_min=0.1) == pytest.approx(0.1)
    assert learning_rate(100, lr, 'cosine', max_step=8, eta_min=0.1) == pytest.approx(0.1)  # stays at the floor
    assert learning_rate(16, lr, 'inv_sqrt', warmup_step=4) == pytest.approx(0.25)
    assert learning_rate(2, lr, 'inv_sqrt', warmup_step=4) == pytest.approx(2 / 8)
    # dev_perf after warmup reaches lr (the original stayed at lr * (warmup - 1) / warmup).
    assert learning_rate(10, lr, 'dev_perf', warmup_step=4) == 1.
    with pytest.raises(ValueError, match='unknown scheduler'):
        learning_rate(0, lr, 'linear')


def test_plateau_matches_reduce_lr_on_plateau():
    lr, decay_rate, patience, lr_min = 0.1, 0.5, 1, 0.01
    val_losses = [5.0, 4.0, 4.0, 3.9999, 4.1, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 2.5]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=decay_rate, patience=patience, min_lr=lr_min)
    plateau = PlateauDecay(decay_rate, patience)
    for val in val_losses:
        sched.step(val)
        plateau.update(val)
        ours = learning_rate(10, lr, 'dev_perf', plateau_scale=plateau.scale, lr_min=lr_min)
        assert ours == pytest.approx(opt.param_groups[0]['lr'], rel=1e-12)
    assert plateau.scale < 1 and ours == lr_min  # the sequence reached the floor


def test_plateau_state_round_trip():
    a = PlateauDecay(0.5, 0)
    for val in (3., 3., 2., 2.):
        a.update(val)
    b = PlateauDecay(0.5, 0)
    b.load_state_dict(a.state_dict())
    for val in (2., 1., 1.):
        a.update(val)
        b.update(val)
        assert a.state_dict() == b.state_dict()
