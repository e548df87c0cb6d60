"""fmoe.balance: FastMoE's load-balance profile helpers (plain Python, as FastMoE's)."""
import torch

# How uneven a per-expert load c_e is.
metrics = {
    'coefficient-variation': lambda c_e: torch.std(c_e) / torch.mean(c_e),
    'Lmax-over-Lmin': lambda c_e: (torch.max(c_e) + 1) / (torch.min(c_e) + 1),
    'Lmax-over-Lmean': lambda c_e: torch.max(c_e) / torch.mean(c_e),
}


def reset_balance_profile(balance_dict, num_layers, balance_strategy):
    """One empty slot per layer for every metric (and for `<balance_strategy>_loss` when one is given)."""
    for key in metrics:
        balance_dict[key] = [None] * num_layers
    if balance_strategy:
        balance_dict[f'{balance_strategy}_loss'] = [None] * num_layers


def update_balance_profile(balance_dict, gate_top_k_idx, _gate_score_top_k, gate_context, layer_idx, num_expert,
                           balance_strategy):
    """A hook for user code; does nothing, as FastMoE's."""
