"""Sparse upcycling (Komatsuzaki et al., 2023): a trained dense model becomes a Mixture of Experts.

Every MoE layer's experts start as copies of the dense layer's feed-forward (optionally with a little
noise to break their symmetry); everything else is copied as it is. A top-k mixture of identical experts
whose weights sum to 1 is the dense feed-forward, so with the naive gate (and the noisy and auxfree gates,
which also take a softmax over the k chosen experts and drop nothing in evaluation) the upcycled model
computes the dense model's function, whatever the router. GShard's capacity limit drops copies of
overloaded experts (their output is then missing) and Switch scales its one expert by its probability
(< 1): those two start close to, not equal to, the dense model.
"""
import math

import torch

from mem_transformer import MemTransformerLM, init_weights
from utils.errors import CheckpointError, ConfigError

# dense PositionwiseFF parameter -> MoE experts parameter (both layers are ReLU MLPs of d_inner)
DENSE_TO_EXPERTS = {'CoreNet.0.weight': 'experts.htoh4.weight', 'CoreNet.0.bias': 'experts.htoh4.bias',
                    'CoreNet.3.weight': 'experts.h4toh.weight', 'CoreNet.3.bias': 'experts.h4toh.bias'}


def upcycled_config(config, num_expert, top_k, gate='naive', **moe_options):
    """The dense model's ModelConfig with every feed-forward a Mixture of Experts of d_inner each; moe_options:
    other MoE options as MemTransformerLM's keywords (moe_capacity_factor=...)."""
    if config.moe:
        raise CheckpointError('the model is already a Mixture of Experts: upcycling starts from a dense model')
    return config.replace(moe=True, moe_num_expert=num_expert, moe_top_k=top_k, moe_gate=gate, **moe_options)


def upcycled_bytes(dense, num_expert):
    """The bytes of the upcycled model's weights, its routers aside: the dense model's, with each feed-forward
    num_expert times."""
    total = 0
    for key, value in dense.state_dict().items():
        copies = num_expert if key.partition('.pos_ff.')[2] in DENSE_TO_EXPERTS else 1
        total += copies * value.numel() * value.element_size()
    return total


def upcycle(dense, num_expert, top_k, gate='naive', noise=0.0, seed=0, init_std=0.02, **moe_options):
    """A new MemTransformerLM: dense's weights, each FFN copied into num_expert experts.

    noise: each expert copy gets Gaussian noise of noise x the standard deviation of the tensor it copies
    (0 keeps the copies identical). The router is initialized as train.py initializes it (N(0, init_std),
    zero bias), from `seed`.
    """
    if not 0 <= noise < math.inf:
        raise ConfigError(f'noise must be a finite number >= 0, got {noise!r}')
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # the router's initial weights (NoisyGate's too)
    try:
        model = MemTransformerLM(upcycled_config(dense.config, num_expert, top_k, gate, **moe_options))
    except ConfigError as e:  # the model's and the MoE layer's checks name the option that cannot work
        raise ConfigError(f'upcycling: {e}') from None
    init_weights(model, init_std=init_std)
    state = model.state_dict()
    dense_state = dense.state_dict()
    for key, value in dense_state.items():
        prefix, _, name = key.partition('.pos_ff.')
        if f'{prefix}.pos_ff.{DENSE_TO_EXPERTS.get(name)}' in state:   # an MoE layer (all of them, but --moe-every)
            copies = value.detach().unsqueeze(0).repeat(num_expert, *[1] * value.dim())
            if noise > 0:
                scale = noise * float(value.std()) if value.numel() > 1 else noise
                copies += torch.randn(copies.shape, generator=generator, dtype=copies.dtype) * scale
            state[f'{prefix}.pos_ff.{DENSE_TO_EXPERTS[name]}'] = copies
        else:
            state[key] = value
    # The routers (and auxfree biases) have no dense counterpart: they keep their initial values.
    model.load_state_dict(state, strict=True)
    return model
