"""fmoe.megatron.layers: the weight initializers FastMoE's tests use (they need no Megatron-LM). MegatronMLP,
fmoefy and _FakeMegatronMLP (Megatron's argument namespace) are refused by name."""
import math

import torch
import torch.nn as nn

from . import refused_name


def _megatron_init_method(self, rng, sigma):
    """Megatron's N(0, sigma) for self.weight, drawn with the numpy Generator rng; self.bias (if any) zeroed."""
    weight = rng.normal(loc=0.0, scale=sigma, size=tuple(self.weight.size()))
    self.weight.data = torch.from_numpy(weight).to(dtype=self.weight.dtype, device=self.weight.device)
    if self.bias is not None:
        with torch.no_grad():
            self.bias.zero_()


def _random_init_weight(self, rng):
    """nn.Linear's default initialization of one expert's [out, in] slice, for all experts, drawn with the numpy
    Generator rng: weight and bias uniform in +-1/sqrt(fan_in) (kaiming_uniform_ with a=sqrt(5) for the weight)."""
    fan_in = self.weight[0].shape[1]
    bound = math.sqrt(3.0) * nn.init.calculate_gain('leaky_relu', math.sqrt(5)) / math.sqrt(fan_in)
    weight = rng.uniform(-bound, bound, size=tuple(self.weight.size()))
    self.weight.data = torch.from_numpy(weight).to(dtype=self.weight.dtype, device=self.weight.device)
    if self.bias is not None:
        bias = rng.uniform(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), size=tuple(self.bias.size()))
        self.bias.data = torch.from_numpy(bias).to(dtype=self.bias.dtype, device=self.bias.device)


def __getattr__(name):
    return refused_name('fmoe.megatron.layers', name, ('MegatronMLP', 'fmoefy', '_FakeMegatronMLP'))
