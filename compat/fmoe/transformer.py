"""fmoe.FMoETransformerMLP: FastMoE's constructor on this repository's layer (moe.FMoETransformerMLP)."""
import torch

import moe

from .gates import GATE_TYPES, NaiveGate, Unsupported, check_world_size


def _gate_type(gate):
    for cls, name in GATE_TYPES.items():
        if isinstance(gate, type) and issubclass(gate, cls):
            return name
    raise Unsupported(f'fmoe (compat/fmoe): gate={getattr(gate, "__name__", gate)!r} is not supported: use '
                      f'fmoe.gates.{", fmoe.gates.".join(cls.__name__ for cls in GATE_TYPES)} (or a subclass)')


class FMoETransformerMLP(moe.FMoETransformerMLP):
    """FastMoE's FMoETransformerMLP(num_expert, d_model, d_hidden, activation, expert_dp_comm, expert_rank,
    **FMoE's options). forward([..., d_model]) -> [..., d_model]: the mixture alone (no residual, no norm),
    as FastMoE's. The gate is built as FastMoE builds it: gate(d_model, num_expert, world_size, top_k)."""

    def __init__(self, num_expert=32, d_model=1024, d_hidden=4096, activation=torch.nn.GELU(),
                 expert_dp_comm='none', expert_rank=0, world_size=1, mp_group=None, slice_group=None,
                 moe_group=None, top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None, mask_dict=None,
                 gate_bias=True):
        check_world_size(world_size)
        for name, value, why in (
                ('mp_group', mp_group, 'model-parallel slicing needs FastMoE\'s CUDA extension'),
                ('slice_group', slice_group, 'model-parallel slicing needs FastMoE\'s CUDA extension'),
                ('moe_group', moe_group, 'expert parallelism here is train.py --expert-parallel under torchrun'),
                ('expert', expert, 'the experts are FastMoE\'s default two-layer MLPs (htoh4, activation, h4toh)'),
                ('gate_hook', gate_hook, 'gate hooks are not called by this layer'),
                ('mask', mask, 'token masks are not supported'),
                ('mask_dict', mask_dict, 'token masks are not supported')):
            if value is not None:
                raise Unsupported(f'fmoe (compat/fmoe): {name}={value!r} is not supported: {why}')
        gate_type = _gate_type(gate)
        super().__init__(num_expert, d_model, d_hidden, activation=activation, top_k=top_k, gate=gate_type,
                         gate_bias=gate_bias)
        # The gate object FastMoE would make, in place of the equivalent one made above (same parameters,
        # gate.gate.weight/bias): code may check its class or subclass it.
        self.gate = gate(d_model, num_expert, world_size, top_k, gate_bias=gate_bias)
        # FastMoE's attributes that code may read. expert_dp_comm only tells FastMoE's
        # DistributedGroupedDataParallel how to reduce expert gradients; DDP reduces every parameter here.
        self.world_size, self.expert_dp_comm, self.expert_rank = world_size, expert_dp_comm, expert_rank
        self.experts_fused = True
        self.gate_hook = self.mask = self.mask_dict = None

    def forward(self, inp):
        return super().forward(inp)[0]   # FastMoE's returns the mixture alone (its gate keeps the loss)
