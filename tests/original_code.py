"""The original code, imported from its unmodified files in ../shared/reference (or $ORIGINAL_TXL,
$ORIGINAL_FASTMOE), patched in their source text at import time with what today's PyTorch needs and the
fixes of docs/differences.md (tests/test_parity_with_original.py says which and why): for the parity tests and
bench/original.py. Each patch must apply, so a different copy fails loudly instead of testing something else.
"""
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / '..' / 'shared' / 'reference'
ORIGINAL = Path(os.environ.get('ORIGINAL_TXL') or REFERENCE / 'transformer-xl' / 'pytorch')
FASTMOE = Path(os.environ.get('ORIGINAL_FASTMOE') or REFERENCE / 'fastmoe')

CUDA_VERSION_PATCH = ('torch.version.cuda.split', "(torch.version.cuda or '0.0').split")
MODEL_PATCHES = [
    (').byte()[:, :, None] # -1', ').bool()[:, :, None] # -1'),
    ('diagonal=1+mlen).byte()[:,:,None]', 'diagonal=1+mlen).bool()[:,:,None]'),
    ('if mems_i is not None and i == 0:', 'if mems_i is not None and mlen > 0 and i == 0:'),
    ('self._update_mems(hids, mems, mlen, qlen)', 'self._update_mems(hids, mems, qlen, mlen)'),
    ('self.out_layer.weight = self.word_emb.weight', 'self.out_layer.weight = self.word_emb.emb_layers[0].weight'),
    ('sample_logits(self.word_emb,', 'sample_logits(self.word_emb.emb_layers[0],'),
]


def load_source(name, path, patches=()):
    """Execute a reference file as module `name`, after replacing each (old, new) in its text."""
    source = Path(path).read_text(encoding='utf-8')
    for old, new in patches:
        assert old in source, f'{path} has no {old!r}: not the reference copy this test was written for'
        source = source.replace(old, new)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(source, str(path), 'exec'), module.__dict__)
    return module


@contextmanager
def isolated_imports(modules, path=()):
    """Let the reference code import `modules` (name -> module) and `path`; afterwards sys.modules and sys.path
    are as before, so the originals' top-level names (utils, proj_adaptive_softmax, fmoe) never leak into this
    repository's imports, nor this repository's `utils/` into theirs."""
    saved_path, saved_modules = list(sys.path), dict(sys.modules)
    sys.path[:0] = [str(p) for p in path]
    sys.modules.update(modules)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - set(saved_modules):
            del sys.modules[name]
        sys.modules.update(saved_modules)


def load_model():
    """The original's mem_transformer module (with its adaptive softmax and sampler), or None when its code is
    not there."""
    if not (ORIGINAL / 'mem_transformer.py').is_file():
        return None
    utils = ORIGINAL / 'utils'
    softmax = load_source('original_proj_adaptive_softmax', utils / 'proj_adaptive_softmax.py', [CUDA_VERSION_PATCH])
    sampler = load_source('original_log_uniform_sampler', utils / 'log_uniform_sampler.py')
    with isolated_imports({'proj_adaptive_softmax': softmax, 'log_uniform_sampler': sampler}):
        return load_source('original_mem_transformer', ORIGINAL / 'mem_transformer.py', MODEL_PATCHES)
