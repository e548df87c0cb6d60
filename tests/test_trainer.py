"""run/trainer.py: the Trainer's step on its own (the runs end to end are in test_train.py)."""
import copy

import pytest
import torch

from conftest import MOE, TINY
from run.options import build_model, parse
import run.trainer as trainer_module
from run.trainer import Trainer


@pytest.mark.parametrize('flags', [[], MOE, [*MOE, '--moe-gate', 'auxfree', '--batch_chunk', '2']])
def test_the_model_deep_copies_right_after_a_training_step(flags):
    """The step reads the MoE statistics its forwards return; the model keeps none of them (they are in the step's
    autograd graph, and such tensors cannot be deep-copied)."""
    config = parse([*TINY, *flags])
    torch.manual_seed(0)
    trainer = Trainer(config, build_model(config.flags, 40), torch.device('cpu'), print, None)
    data = torch.randint(0, 40, (config.tgt_len + 1, config.batch_size))
    trainer.train_step(data[:-1], data[1:])
    twin = copy.deepcopy(trainer.model)
    for (name, p), q in zip(trainer.model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(p, q), name
    if flags:
        assert trainer.window.moe_load.sum() > 0   # the step did read the statistics


def trainer_after_one_step(flags, monkeypatch=None, fold=True):
    config = parse([*TINY, *MOE, '--clip', '0.01', *flags])
    torch.manual_seed(0)
    trainer = Trainer(config, build_model(config.flags, 40), torch.device('cpu'), print, None)
    if not fold:
        monkeypatch.setattr(trainer_module, 'clips_in_step', lambda optimizer, params: False)
    data = torch.randint(0, 40, (config.tgt_len + 1, config.batch_size), generator=torch.Generator().manual_seed(1))
    norms = []
    real = trainer.dist.grad_norm
    trainer.dist.grad_norm = lambda params: norms.append(real(params)) or norms[-1]
    trainer.train_step(data[:-1], data[1:])
    return trainer, norms


@pytest.mark.parametrize('optim', ['adam', 'sgd'])
def test_clipping_in_the_fused_optimizers_step_is_the_same_update(optim, monkeypatch):
    """With a fused optimizer the clip factor rides in the optimizer's kernel (grad_scale) instead of a pass over
    every gradient: the same update as clip_grad_norm_ then step, within rounding, at a clip that bites (SGD's
    update is lr x the clipped gradient, so an unapplied factor would show at once; Adam's first step hardly
    depends on the gradients' scale)."""
    flags = ['--optim', optim]
    folded, norms = trainer_after_one_step(flags)
    if not trainer_module.clips_in_step(folded.optimizer, folded.clip_params):
        pytest.skip('no fused Adam on this torch')
    assert norms and norms[0] > 0.01 * 10   # the clip scaled the gradients by less than 1/10
    assert not hasattr(folded.optimizer, 'grad_scale') and not hasattr(folded.optimizer, 'found_inf')
    explicit, _ = trainer_after_one_step(flags, monkeypatch, fold=False)
    lr = folded.optimizer.param_groups[0]['lr']
    for (name, p), q in zip(folded.model.named_parameters(), explicit.model.parameters()):
        assert (p - q).abs().max() <= 1e-3 * lr, name   # rounding apart (Adam moves a weight by about lr)
    torch.manual_seed(0)
    start = build_model(folded.config.flags, 40)
    moved = max((p - q).abs().max() for p, q in zip(folded.model.parameters(), start.parameters()))
    assert moved > (0.5 * lr if optim == 'adam' else 0)


def test_clipping_stays_a_pass_of_its_own_where_the_step_cannot_take_it():
    """--clip_nonemb leaves the embeddings unclipped, which one factor in the step cannot do; an optimizer without
    a fused kernel has no grad_scale."""
    trainer, _ = trainer_after_one_step(['--clip_nonemb'])
    assert not trainer_module.clips_in_step(trainer.optimizer, trainer.clip_params)
    params = list(trainer.model.parameters())
    assert not trainer_module.clips_in_step(torch.optim.Adam(params, foreach=True), params)
