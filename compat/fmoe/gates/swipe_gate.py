"""fmoe.gates.swipe_gate: the SWIPE balanced gate, whose training-time rebalancing is a FastMoE CUDA kernel."""
from .._repo import refuse
from .naive_gate import NaiveGate


class SwipeGate(NaiveGate):
    """FastMoE's SwipeGate(d_model, num_expert, world_size, top_k=2, gate_bias=True). In evaluation it is the
    naive top-k gate, as FastMoE's; in training it raises fmoe.Unsupported: FastMoE moves the tokens between
    experts with its CUDA kernel swipe_once, which has no Python definition to reproduce."""

    def forward(self, inp, return_all_scores=False):
        if self.training:
            raise refuse('SwipeGate in training mode', 'its rebalancing step is FastMoE\'s CUDA kernel '
                         'swipe_once; use GShardGate or SwitchGate for balanced routing')
        return super().forward(inp, return_all_scores)
