"""Fixtures shared by the test modules."""
import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')


@pytest.fixture(params=['cpu', pytest.param('cuda', marks=CUDA)])
def device(request):
    """Every device the fast paths run on: a test taking `device` runs on the CPU, and again on the GPU where
    there is one (the CUDA tier: `python -m pytest -k cuda`). TF32 stays off: the comparisons are fp32's."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device(request.param)
    torch.backends.cuda.matmul.allow_tf32 = saved
