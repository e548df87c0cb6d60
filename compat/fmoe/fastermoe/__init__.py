"""fmoe.fastermoe: FasterMoE's smart schedule and expert shadowing, refused."""
from .._repo import refuse

raise ImportError(str(refuse('fmoe.fastermoe (smart schedule, expert shadowing)',
                             'both are built on FastMoE\'s CUDA extension; fmoe.FMoE runs without them '
                             '(FMOE_FASTER_SCHEDULE_ENABLE and FMOE_FASTER_SHADOW_ENABLE have no effect)')))
