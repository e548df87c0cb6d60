"""The closed-form schedules against torch's own schedulers driven the way the original train.py drove them."""
import math
import warnings

import pytest
import torch

from utils.schedules import PlateauDecay, learning_rate, stretched_anchor


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


@pytest.mark.parametrize('warmup', [0, 10])
@pytest.mark.parametrize('new_max', [150, 60])
def test_a_changed_max_step_stretches_the_rest_of_the_cosine_from_the_rate_reached(warmup, new_max):
    """A resume at step 40 of a 100-step cosine with another max_step: the rate goes on from where it was (no jump
    back up, as the closed form of the new max_step would give), falls steadily and reaches eta_min at the new end;
    a resume during warmup finishes the warmup first."""
    lr, eta_min = 1.0, 0.1
    for at in (40, 5):
        anchor = stretched_anchor(at, 100, new_max, warmup)
        start = max(at, warmup)
        old = [learning_rate(s, lr, 'cosine', warmup, 100, eta_min) for s in range(start + 1)]
        new = [learning_rate(s, lr, 'cosine', warmup, new_max, eta_min, anchor=anchor) for s in range(new_max + 5)]
        assert new[at:start + 1] == pytest.approx(old[at:])  # the same rates at the resume (to the end of warmup)
        assert all(b < a for a, b in zip(new[start:new_max], new[start + 1:new_max + 1]))
        assert new[new_max:] == pytest.approx([eta_min] * 5)
        plain = learning_rate(start + 1, lr, 'cosine', warmup, new_max, eta_min)
        assert (new[start + 1] < plain) == (new_max > 100)  # not the new max_step's curve, which jumps
    assert stretched_anchor(40, 100, 100, warmup, anchor=(7, 0.25)) == (7, 0.25)  # unchanged: the saved anchor
    # a second change goes on from the first one's rate
    first = stretched_anchor(40, 100, 150)
    second = stretched_anchor(90, 150, 120, anchor=first)
    assert learning_rate(90, lr, 'cosine', 0, 120, eta_min, anchor=second) == \
        pytest.approx(learning_rate(90, lr, 'cosine', 0, 150, eta_min, anchor=first))
