"""The CUDA tier's reference check: each GPU path (fp32 without TF32, bf16 and fp16 autocast) against the same
model in float64 on the CPU, losses and gradients over segments with memory. Skipped without a CUDA device; the
device-parametrized fast-path tests (test_fast_paths.py, test_moe.py: `-k cuda`) are the rest of the tier."""
import copy

import pytest
import torch

from conftest import CUDA, segments_and_grads, tiny_model

pytestmark = CUDA

CONFIGS = {
    'attn0': dict(attn_type=0), 'attn0-same-clamp': dict(attn_type=0, same_length=True, clamp_len=3),
    'attn1-preln': dict(attn_type=1, pre_lnorm=True), 'attn2': dict(attn_type=2), 'attn3': dict(attn_type=3),
    'adaptive': dict(cutoffs=[10, 25], div_val=2, d_embed=16, tie_projs=[False, True, True]),
    'moe-naive': dict(moe=True, moe_num_expert=4, moe_top_k=2),
    # capacity factors under 1 drop token copies in training and evaluation alike
    'moe-gshard-drops': dict(moe=True, moe_num_expert=4, moe_top_k=2, moe_gate='gshard',
                             moe_capacity_factor=0.5, moe_eval_capacity_factor=0.5),
    'moe-switch-drops': dict(moe=True, moe_num_expert=4, moe_top_k=1, moe_gate='switch',
                             moe_capacity_factor=0.5, moe_eval_capacity_factor=0.5),
}
# (autocast dtype, loss tolerance in nats, least cosine similarity of each gradient with float64's)
PRECISIONS = {'fp32': (None, 1e-4, 0.99999), 'bf16': (torch.bfloat16, 0.05, 0.98),
              'fp16': (torch.float16, 0.02, 0.99)}


def deterministic_routing(model):
    """GShard's random second expert and Switch's jitter draw from each device's own generator: off, so
    both devices route alike (the capacity drops stay)."""
    for layer in model.layers:
        gate = getattr(getattr(layer.pos_ff, 'moe', layer.pos_ff), 'gate', None)
        if gate is not None:
            gate.random_routing, gate.switch_eps = False, 0.0
    return model


@pytest.mark.parametrize('precision', PRECISIONS)
@pytest.mark.parametrize('name', CONFIGS)
def test_cuda_matches_float64_on_the_cpu(name, precision):
    dtype, loss_tol, least_cosine = PRECISIONS[precision]
    model = deterministic_routing(tiny_model(init_std=0.1, tgt_len=5, **CONFIGS[name]))
    data = torch.randint(0, 40, (16, 3))
    want_loss, want_grads = segments_and_grads(copy.deepcopy(model).double(), data)
    gpu = copy.deepcopy(model).cuda()
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, grads = segments_and_grads(gpu, data.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double().cpu(), want_loss.double(), atol=loss_tol, rtol=0)
    assert grads.keys() == want_grads.keys()
    for key, want in want_grads.items():
        got = grads[key].double().cpu().flatten()
        if want.abs().max() == 0:  # e.g. an expert that received no token
            assert got.abs().max() == 0, key
            continue
        cosine = torch.nn.functional.cosine_similarity(got, want.flatten(), dim=0)
        assert cosine >= least_cosine, (key, float(cosine))
