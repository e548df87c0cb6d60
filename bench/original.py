"""The original Transformer-XL's model (../shared/reference/transformer-xl/pytorch, or $ORIGINAL_TXL), loaded
as tests/test_parity_with_original.py loads it (its loader and its patches for today's torch, reused), for
the side-by-side rows of bench_train.py. Nothing of the original is copied into this repository.
"""
import pytest

from timing import ROOT  # noqa: F401  (puts the repository on sys.path for `tests`)

WHERE = '../shared/reference/transformer-xl/pytorch (or $ORIGINAL_TXL)'


def load():
    """The original's mem_transformer module, or None when its code is not there."""
    try:
        from tests import test_parity_with_original as parity
    except pytest.skip.Exception:   # the module skips itself when the reference code is absent
        return None
    utils = parity.ORIGINAL / 'utils'
    softmax = parity.load_source('original_proj_adaptive_softmax', utils / 'proj_adaptive_softmax.py',
                                 [parity.CUDA_VERSION_PATCH])
    sampler = parity.load_source('original_log_uniform_sampler', utils / 'log_uniform_sampler.py')
    with parity.isolated_imports({'proj_adaptive_softmax': softmax, 'log_uniform_sampler': sampler}):
        return parity.load_source('original_mem_transformer', parity.ORIGINAL / 'mem_transformer.py',
                                  parity.MODEL_PATCHES)


def build_model(module, config, dropout, dropatt, state_dict):
    """The original's MemTransformerLM of a bench_train configuration, holding `state_dict` (the state-dict
    keys are the same as this repository's model's)."""
    c = config
    model = module.MemTransformerLM(c['n_token'], c['n_layer'], c['n_head'], c['d_model'], c['d_head'],
                                    c['d_inner'], dropout, dropatt, tgt_len=c['tgt_len'], ext_len=0,
                                    mem_len=c['mem_len'])
    model.load_state_dict(state_dict)
    return model
