"""The original Transformer-XL's model (../shared/reference/transformer-xl/pytorch, or $ORIGINAL_TXL), loaded
as tests/test_parity_with_original.py loads it (tests/original_code.py: its loader and its patches for today's
torch, reused), for the side-by-side rows of bench_train.py. Nothing of the original is copied into this
repository.
"""
from timing import ROOT  # noqa: F401  (puts the repository on sys.path for `tests`)
from tests.original_code import load_model

WHERE = '../shared/reference/transformer-xl/pytorch (or $ORIGINAL_TXL)'


def load():
    """The original's mem_transformer module, or None when its code is not there."""
    return load_model()


def build_model(module, config, dropout, dropatt, state_dict):
    """The original's MemTransformerLM of a bench_train configuration, holding `state_dict` (the state-dict
    keys are the same as this repository's model's)."""
    c = config
    model = module.MemTransformerLM(c['n_token'], c['n_layer'], c['n_head'], c['d_model'], c['d_head'],
                                    c['d_inner'], dropout, dropatt, tgt_len=c['tgt_len'], ext_len=0,
                                    mem_len=c['mem_len'])
    model.load_state_dict(state_dict)
    return model
