"""fmoe.gates.base_gate: FastMoE's gate base class, and the bridge from this repository's gates (which return a
moe.Routing) to FastMoE's call convention (gate(x) -> (expert index, score), the balance loss kept on the gate)."""
import torch.nn as nn


class BaseGate(nn.Module):
    """FastMoE's BaseGate(num_expert, world_size): num_expert experts on each of world_size workers."""

    loss = None

    def __init__(self, num_expert, world_size):
        super().__init__()
        self.set_sizes(num_expert, world_size)

    def set_sizes(self, num_expert, world_size):
        self.num_expert, self.world_size = num_expert, world_size
        self.tot_expert = num_expert * world_size

    def forward(self, x):
        raise NotImplementedError(f'{type(self).__name__} is a base gate: subclass it and define forward')

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


class RoutedGate(BaseGate):
    """A FastMoE gate whose routing is one of this repository's gates: `repository_forward` (a moe.py gate's
    forward, returning a moe.Routing) runs over every worker's experts; the balance loss goes to set_loss."""

    repository_forward = None

    def route(self, inp):
        local = self.num_expert
        self.num_expert = self.tot_expert   # the repository's gates read num_expert as "all experts"
        try:
            routing = self.repository_forward(inp)
        finally:
            self.num_expert = local
        self.set_loss(routing.balance_loss)
        return routing
