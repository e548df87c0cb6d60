"""fmoe.gates: FastMoE's gate names and constructor order (d_model, num_expert, world_size, top_k, ...) on
this repository's gates (moe.py: same routing, capacity and balance losses)."""
import moe


class Unsupported(ValueError):
    """A FastMoE option this compatibility layer does not provide; the message names it."""


class FastMoELoss:
    """FastMoE's gate loss accessors (fmoe.gates.BaseGate): each forward stores the gate's balance loss for
    code that reads it with get_loss() (this repository's layer takes it from the gate's Routing instead)."""

    loss = None

    def forward(self, x):
        routing = super().forward(x)
        self.set_loss(routing.balance_loss)
        return routing

    def set_loss(self, loss):
        self.loss = loss

    def get_loss(self, clear=True):
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    @property
    def has_loss(self):
        return self.loss is not None


def check_world_size(world_size):
    if world_size != 1:
        raise Unsupported(f'fmoe (compat/fmoe): world_size={world_size!r} is not supported: FastMoE\'s expert '
                          'parallelism needs its CUDA extension; here run with world_size=1 and use train.py '
                          '--expert-parallel under torchrun')


class NaiveGate(FastMoELoss, moe.NaiveGate):
    def __init__(self, d_model, num_expert, world_size=1, top_k=2, gate_bias=True):
        check_world_size(world_size)
        super().__init__(d_model, num_expert, top_k, gate_bias)


class GShardGate(FastMoELoss, moe.GShardGate):
    def __init__(self, d_model, num_expert, world_size=1, topk=2, capacity=(1.2, 2.4), random_routing=True,
                 gate_bias=True):
        check_world_size(world_size)
        if topk != 2:
            raise Unsupported(f'fmoe (compat/fmoe): GShardGate routes to 2 experts, not topk={topk!r}')
        super().__init__(d_model, num_expert, 2, tuple(capacity), random_routing, gate_bias)


class SwitchGate(FastMoELoss, moe.SwitchGate):
    def __init__(self, d_model, num_expert, world_size=1, topk=1, switch_eps=.1, capacity=(1.2, 2.4),
                 gate_bias=True):
        check_world_size(world_size)
        if topk != 1:
            raise Unsupported(f'fmoe (compat/fmoe): SwitchGate routes to 1 expert, not topk={topk!r}')
        super().__init__(d_model, num_expert, 1, switch_eps, tuple(capacity), gate_bias)


class NoisyGate(FastMoELoss, moe.NoisyGate):
    def __init__(self, d_model, num_expert, world_size=1, top_k=2, gate_bias=True):
        check_world_size(world_size)   # FastMoE's NoisyGate has no bias: gate_bias is accepted and unused
        super().__init__(d_model, num_expert, top_k)


# This repository's gate type for each class above (moe.FMoETransformerMLP's `gate` argument).
GATE_TYPES = {NaiveGate: 'naive', GShardGate: 'gshard', SwitchGate: 'switch', NoisyGate: 'noisy'}
