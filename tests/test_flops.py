"""bench/flops.py's analytic count against torch's own FLOP counter on real forward/backward passes."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mem_transformer as mt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
from flops import flops_per_token  # noqa: E402

SMALL = dict(n_token=30, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, tgt_len=5, mem_len=7, bsz=3)


def counted_flops(config, train):
    """FLOPs torch counts for one step with a full memory. SDPA is off: torch has no
    formula for its fused CPU kernel, and the explicit path does the same products."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in config.items() if k != 'bsz'}
    model = mt.MemTransformerLM(dropout=0.0, dropatt=0.0, ext_len=0, **kwargs).train(train)
    model.set_fast_paths(sdpa=False, expert_backend='slices')  # slices: plain matmuls, which the counter knows
    qlen, bsz = config['tgt_len'], config['bsz']
    data = torch.randint(0, config['n_token'], (qlen + 1, bsz))
    mems = [torch.randn(config['mem_len'], bsz, config['d_model']) for _ in range(config['n_layer'] + 1)]
    with FlopCounterMode(display=False) as counter:
        out = model(data[:-1], data[1:], *mems)
        if train:
            out[0].sum().backward()
    return counter.get_total_flops() / (qlen * bsz)


@pytest.mark.parametrize('config', [dict(SMALL, attn_type=t) for t in range(4)]
                         + [dict(SMALL, moe=True, moe_num_expert=4, moe_top_k=2)],
                         ids=['attn0', 'attn1', 'attn2', 'attn3', 'moe'])
def test_forward_flops_equal_torch_count(config):
    assert flops_per_token(config, train=False) == pytest.approx(counted_flops(config, False))


@pytest.mark.parametrize('attn_type', [1, 2, 3])
def test_training_flops_are_three_forward_passes(attn_type):
    config = dict(SMALL, attn_type=attn_type)
    assert flops_per_token(config) == pytest.approx(counted_flops(config, True))


def test_training_flops_of_relative_attention():
    """attn_type 0: autograd skips the gradient of the position embeddings (constants), one
    product per layer the 'three forward passes' convention counts."""
    config = dict(SMALL, attn_type=0)
    klen, d, inner = SMALL['tgt_len'] + SMALL['mem_len'], SMALL['d_model'], SMALL['n_head'] * SMALL['d_head']
    skipped = SMALL['n_layer'] * 2 * klen * d * inner / (SMALL['tgt_len'] * SMALL['bsz'])
    assert flops_per_token(config) - skipped == pytest.approx(counted_flops(config, True))


def test_adaptive_softmax_is_refused():
    with pytest.raises(NotImplementedError):
        flops_per_token(dict(SMALL, cutoffs=[10]))
