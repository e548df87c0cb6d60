"""run/trainer.py: the Trainer's step on its own (the runs end to end are in test_train.py)."""
import copy

import pytest
import torch

from conftest import MOE, TINY
from run.options import build_model, parse
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
