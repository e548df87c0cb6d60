"""fmoe.gates.faster_gate: FasterMoE's topology-aware gate, refused."""
from .._repo import refuse

raise ImportError(str(refuse('fmoe.gates.faster_gate (FasterGate, gen_faster_gate)',
                             'FasterMoE\'s gate works with its CUDA shadowing and scheduling; use NaiveGate '
                             'or GShardGate')))
