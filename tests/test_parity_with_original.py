"""Parity with the original code: this repository against the original Transformer-XL `pytorch/` (and FastMoE's
`examples/transformer-xl` for MoE initialization), imported from ../shared/reference (or $ORIGINAL_TXL,
$ORIGINAL_FASTMOE) and run side by side with the same weights. Skipped when the reference code is absent.

The original is imported from its unmodified files with only what today's PyTorch needs, patched in its source
text at import time (each patch must apply, so a different copy fails loudly instead of testing something else):
  - attention masks as bool (`.byte()` masks are refused by masked_fill);
  - `torch.version.cuda` is None on CPU builds (proj_adaptive_softmax parses it at import);
  - attn_type 2 adds position embeddings into the memory in place, which fails on the first, empty memory;
and the documented fixes (docs/differences.md), against which this repository is compared:
  - `_update_mems` called with qlen and mlen in their order (the original swapped them: wrong for ext_len > 0);
  - the sampled softmax tied to the embedding table `word_emb.emb_layers[0]` (the original named a
    `word_emb.weight` that does not exist).
FastMoE needs its CUDA extension `fmoe_cuda` (and dm-tree) only to run a forward: empty stand-ins let its classes
be built, which is all the initialization test needs.

Run with `-s` to print the largest differences measured.
"""
import ast
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import data_utils
import mem_transformer
from tests.original_code import CUDA_VERSION_PATCH, FASTMOE, ORIGINAL, isolated_imports, load_model, load_source
from tests.sample_corpora import enwik8_bytes, enwik8_format, make_lm1b, make_wikitext, shared, split3, \
    text8_format, wikifil

if not (ORIGINAL / 'mem_transformer.py').is_file():
    pytest.skip(f'the original Transformer-XL code is not at {ORIGINAL} (set $ORIGINAL_TXL)', allow_module_level=True)

# Largest |ours - original| per kind of value, printed at the end of the module (pytest -s).
LARGEST = {}


# ----------------------------------------------------------------------------- importing the originals

def weights_init_of(train_py, init='normal', init_range=0.1, init_std=0.02, proj_init_std=0.01):
    """`weights_init` as defined in a reference train.py (with its init_weight/init_bias), bound to these args."""
    tree = ast.parse(Path(train_py).read_text(encoding='utf-8'))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ('init_weight', 'init_bias', 'weights_init')]
    assert len(wanted) == 3, f'{train_py} does not define init_weight, init_bias and weights_init'
    namespace = {'nn': nn, 'args': types.SimpleNamespace(init=init, init_range=init_range, init_std=init_std,
                                                         proj_init_std=proj_init_std)}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(train_py), 'exec'), namespace)
    return namespace['weights_init']


@pytest.fixture(scope='module')
def original():
    model = load_model()
    vocabulary = load_source('original_vocabulary', ORIGINAL / 'utils' / 'vocabulary.py')
    with isolated_imports({'utils.vocabulary': vocabulary}):
        data = load_source('original_data_utils', ORIGINAL / 'data_utils.py')
    # The classes really are the reference's, not this repository's files of the same names.
    assert model.ProjectedAdaptiveLogSoftmax.__module__ == 'original_proj_adaptive_softmax'
    assert data.Vocab.__module__ == 'original_vocabulary'
    return types.SimpleNamespace(model=model, data=data)


@pytest.fixture(scope='module', autouse=True)
def report_largest_differences():
    yield
    if LARGEST:
        print('\nlargest |ours - original|: ' + ', '.join(f'{k} {v:.2g}' for k, v in sorted(LARGEST.items())))


def assert_close(kind, what, got, want, atol, rtol):
    """Both finite (a NaN anywhere fails) and |got - want| <= atol + rtol |want| everywhere."""
    assert got.shape == want.shape, f'{what}: shape {tuple(got.shape)}, the original {tuple(want.shape)}'
    assert bool(torch.isfinite(want).all()), f'{what}: the original gives non-finite values'
    assert bool(torch.isfinite(got).all()), f'{what}: non-finite values (the original\'s are finite)'
    diff = (got.detach().double() - want.detach().double()).abs()
    if diff.numel():
        largest = diff.max().item()
        LARGEST[kind] = largest if kind not in LARGEST else max(LARGEST[kind], largest)
        assert bool((diff <= atol + rtol * want.detach().double().abs()).all()), \
            f'{what}: differs from the original by up to {largest:.3g}'


# ----------------------------------------------------------------------------- the model, segment by segment

BASE = dict(n_token=40, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, dropout=0.0, dropatt=0.0,
            tie_weight=True, d_embed=None, div_val=1, tie_projs=[False], pre_lnorm=False, tgt_len=5, ext_len=0,
            mem_len=6, cutoffs=[], same_length=False, attn_type=0, clamp_len=-1, sample_softmax=-1)
CUTOFFS = [10, 20, 30]  # three tail clusters over the 40 tokens


def attention_grid():
    """Every attention type with and without same_length, clamp_len and pre_lnorm (full product)."""
    for attn_type in range(4):
        for same_length in (False, True):
            for clamp_len in (-1, 3):
                for pre_lnorm in (False, True):
                    yield dict(attn_type=attn_type, same_length=same_length, clamp_len=clamp_len,
                               pre_lnorm=pre_lnorm)


def extended_context_grid():
    """ext_len > 0 in every attention type (the fixed memory update), and without memory."""
    for attn_type in range(4):
        yield dict(attn_type=attn_type, ext_len=2, same_length=attn_type % 2 == 1)
    yield dict(attn_type=0, ext_len=3, mem_len=0)


def softmax_grid():
    """Adaptive softmax with div_val 1 and 2, d_embed equal to d_model or not, weights and projections tied or
    not (full product), each in another attention type."""
    k = 0
    for div_val in (1, 2):
        for d_embed in (16, 8):
            for tie_weight in (True, False):
                for tie_projs in (True, False):
                    yield dict(div_val=div_val, d_embed=d_embed, tie_weight=tie_weight, cutoffs=CUTOFFS,
                               tie_projs=[False] + [tie_projs] * len(CUTOFFS), attn_type=k % 4, pre_lnorm=k % 3 == 0)
                    k += 1


def sampled_grid():
    """The sampled softmax (training only: the original had no evaluation path for it), tied as it requires."""
    for attn_type in (0, 2):
        yield dict(sample_softmax=8, attn_type=attn_type, same_length=attn_type == 2)


GRID = [dict(BASE, **c) for c in (*attention_grid(), *extended_context_grid(), *softmax_grid(), *sampled_grid())]


def config_id(config):
    keys = ('attn_type', 'same_length', 'clamp_len', 'pre_lnorm', 'ext_len', 'mem_len', 'div_val', 'd_embed',
            'tie_weight', 'tie_projs', 'sample_softmax')
    return '-'.join(f'{k}={config[k]}' for k in keys if config[k] != BASE[k])


def randomize(model, seed):
    """Finite random values in every parameter (the original leaves r_w_bias, r_emb... uninitialized)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if 'layer_norm.weight' in name else 0.3 * noise)


def twin_models(original, config, seed=0):
    """The original with random weights, and this repository's model with the same state dict (strict)."""
    theirs = original.model.MemTransformerLM(**config)
    randomize(theirs, seed)
    ours = mem_transformer.MemTransformerLM(**config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if hasattr(theirs, 'crit'):
        theirs.crit.keep_order = True  # the per-token order (ours by default; see docs/differences.md)
    return ours, theirs


def segments(config, n_segments=3, bsz=3, seed=0):
    """Consecutive (data, target) segments as the ordered iterator gives them (ext_len tokens of context)."""
    gen = torch.Generator().manual_seed(seed + 1)
    tgt, ext = config['tgt_len'], config['ext_len']
    stream = torch.randint(0, config['n_token'], (n_segments * tgt + 1, bsz), generator=gen)
    for s in range(n_segments):
        i = s * tgt
        yield stream[max(0, i - ext):i + tgt], stream[i + 1:i + 1 + tgt]


def gradients(model):
    """Every parameter name (tied ones under each of their names) -> its gradient, zero where it has none."""
    return {name: (torch.zeros_like(p) if p.grad is None else p.grad.to_dense())
            for name, p in model.named_parameters(remove_duplicate=False)}


def compare_memories(config, step, got, want):
    assert len(got) == len(want), f'{step}: {len(got)} memories, the original {len(want)}'
    for layer, (g, w) in enumerate(zip(got, want)):
        assert_close('memory', f'{config_id(config)} {step} memory {layer}', g, w, atol=5e-5, rtol=1e-5)


def run_segments(ours, theirs, config, train):
    """Feed both models the same segments, each with its own returned memory; compare as they go."""
    mems_ours, mems_theirs = [], []
    for s, (data, target) in enumerate(segments(config)):
        step = f'{"train" if train else "eval"} segment {s}'
        with torch.set_grad_enabled(train):
            torch.manual_seed(100 + s)  # the sampled softmax draws its negatives here
            ret_theirs = theirs(data, target, *mems_theirs)
            torch.manual_seed(100 + s)
            ret_ours = ours(data, target, *mems_ours)
        assert_close('loss', f'{config_id(config)} {step} loss', ret_ours[0], ret_theirs[0], atol=5e-5, rtol=1e-5)
        compare_memories(config, step, ret_ours[1:], ret_theirs[1:])
        if train:
            theirs.zero_grad(set_to_none=True)
            ours.zero_grad(set_to_none=True)
            ret_theirs[0].mean().backward()
            ret_ours[0].mean().backward()
            got, want = gradients(ours), gradients(theirs)
            assert set(got) == set(want)
            for name in want:
                assert_close('gradient', f'{config_id(config)} {step} gradient of {name}', got[name], want[name],
                             atol=5e-6, rtol=1e-4)
        # The original adds position embeddings into its memories in place (attn_type 2 and 3): keep copies.
        mems_theirs = [m.detach().clone() for m in ret_theirs[1:]]
        mems_ours = list(ret_ours[1:])


@pytest.mark.parametrize('config', GRID, ids=config_id)
def test_losses_memories_and_gradients_match_the_original(original, config):
    ours, theirs = twin_models(original, config)
    run_segments(ours.train(), theirs.train(), config, train=True)
    if config['sample_softmax'] <= 0:  # evaluation: the fast paths that run without gradients
        run_segments(ours.eval(), theirs.eval(), config, train=False)


def test_original_loss_layout_when_asked(original):
    """keep_order=False gives the original's adaptive-softmax layout: losses grouped by cluster."""
    config = dict(BASE, cutoffs=CUTOFFS, tie_projs=[False, True, True, True], d_embed=8)
    ours, theirs = twin_models(original, config)
    theirs.crit.keep_order = False
    ours.crit.keep_order = False
    data, target = next(segments(config))
    assert_close('loss', 'grouped layout', ours(data, target)[0], theirs(data, target)[0], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize('tied', [True, False], ids=['tails-tied-as-wt103', 'untied-as-lm1b'])
def test_original_state_dict_through_convert_checkpoint_gives_the_original_losses(original, tmp_path, tied):
    """Adaptive softmax with div_val 1 and d_embed != d_model, where every tail cluster has its own projection."""
    import convert_checkpoint
    config = dict(BASE, cutoffs=CUTOFFS, d_embed=8, tie_projs=[False] + [tied] * len(CUTOFFS))
    theirs = original.model.MemTransformerLM(**config)
    randomize(theirs, seed=3)
    theirs.crit.keep_order = True
    torch.save(theirs.state_dict(), tmp_path / 'state_dict.pt')
    assert convert_checkpoint.main([str(tmp_path / 'state_dict.pt'), '--work_dir', str(tmp_path / 'run'),
                                    '--cutoffs', ','.join(map(str, CUTOFFS)), '--mem_len', '6']) == 0
    saved = torch.load(tmp_path / 'run' / 'model.pt', weights_only=True)
    assert saved['config']['tie_projs'] == config['tie_projs']
    ours = mem_transformer.MemTransformerLM(**saved['config'])
    ours.load_state_dict(saved['model_state'])
    run_segments(ours.eval(), theirs.eval(), config, train=False)


# ----------------------------------------------------------------------------- initialization

INIT_CONFIGS = [
    dict(BASE, attn_type=0),
    dict(BASE, attn_type=1, pre_lnorm=True),
    dict(BASE, attn_type=2),
    dict(BASE, attn_type=3),
    dict(BASE, cutoffs=CUTOFFS, d_embed=8, tie_projs=[False, True, True, True]),
    dict(BASE, cutoffs=CUTOFFS, d_embed=8, tie_projs=[False] * 4, tie_weight=False),
    dict(BASE, cutoffs=CUTOFFS, div_val=2, tie_projs=[False, True, True, True]),
    dict(BASE, sample_softmax=8),
]


def assert_same_state(ours, theirs, what):
    got, want = ours.state_dict(), theirs.state_dict()
    assert list(got) == list(want), f'{what}: state-dict keys differ'
    for key in want:
        assert bool(torch.isfinite(want[key]).all()), f'{what}: the original leaves {key} non-finite'
        assert torch.equal(got[key], want[key]), f'{what}: {key} differs from the original\'s initial value'


@pytest.mark.parametrize('init', ['normal', 'uniform'])
@pytest.mark.parametrize('config', INIT_CONFIGS, ids=config_id)
def test_same_seed_same_initial_weights(original, config, init):
    """The original train.py's construction and weights_init (read from its train.py) against init_weights."""
    weights_init = weights_init_of(ORIGINAL / 'train.py', init=init)
    torch.manual_seed(1111)
    theirs = original.model.MemTransformerLM(**config)
    theirs.apply(weights_init)
    theirs.word_emb.apply(weights_init)
    torch.manual_seed(1111)
    ours = mem_transformer.MemTransformerLM(**config)
    mem_transformer.init_weights(ours, init=init)
    assert_same_state(ours, theirs, config_id(config) or 'base')


@pytest.fixture(scope='module')
def fastmoe():
    """FastMoE's example model twice: as in the reference (FastMoE >= 1.0.1: one module per expert, registered
    before the gate) and with FastMoE < 1.0.1's fused experts (FMoE with expert=None, then one _Expert of all
    experts after the gate), built from the reference's own FMoE and _Expert classes."""
    example = FASTMOE / 'examples' / 'transformer-xl'
    if not (example / 'mem_transformer.py').is_file():
        pytest.skip(f'FastMoE is not at {FASTMOE} (set $ORIGINAL_FASTMOE)')
    stand_ins = {'fmoe_cuda': types.ModuleType('fmoe_cuda'), 'tree': types.ModuleType('tree')}
    with isolated_imports(stand_ins, path=[FASTMOE]):
        import fmoe
        from fmoe.layers import FMoE
        from fmoe.transformer import _Expert

        class FusedFMoETransformerMLP(FMoE):
            def __init__(self, num_expert=32, d_model=1024, d_hidden=4096, activation=None, **kwargs):
                super().__init__(num_expert=num_expert, d_model=d_model, **kwargs)
                self.experts = _Expert(num_expert, d_model, d_hidden, activation)
                self.mark_parallel_comm('none')

        softmax = load_source('fastmoe_proj_adaptive_softmax', example / 'utils' / 'proj_adaptive_softmax.py',
                              [CUDA_VERSION_PATCH])
        sampler = load_source('fastmoe_log_uniform_sampler', example / 'utils' / 'log_uniform_sampler.py')
        sys.modules.update(proj_adaptive_softmax=softmax, log_uniform_sampler=sampler)
        per_expert = load_source('fastmoe_mem_transformer', example / 'mem_transformer.py')
        sys.modules['fmoe'] = types.SimpleNamespace(FMoETransformerMLP=FusedFMoETransformerMLP)
        fused = load_source('fastmoe_fused_mem_transformer', example / 'mem_transformer.py')
    assert issubclass(per_expert.CustomizedMoEPositionwiseFF, fmoe.FMoETransformerMLP)
    return types.SimpleNamespace(per_expert=per_expert, fused=fused,
                                 weights_init=weights_init_of(example / 'train.py'))


# FastMoE's example cannot build adaptive projections (its Projection skips nn.Module.__init__): d_embed = d_model.
MOE_CONFIG = dict(BASE, moe=True, moe_num_expert=4, moe_top_k=2)


def fastmoe_model(module, weights_init, config):
    torch.manual_seed(1111)
    model = module.MemTransformerLM(**config)
    model.apply(weights_init)
    model.word_emb.apply(weights_init)
    return model


@pytest.mark.parametrize('attn_type', [0, 1])  # its attn_type 2 and 3 layers refuse the moe arguments
def test_moe_initial_weights_match_fastmoe_with_fused_experts(fastmoe, attn_type):
    config = dict(MOE_CONFIG, attn_type=attn_type)
    theirs = fastmoe_model(fastmoe.fused, fastmoe.weights_init, config)
    torch.manual_seed(1111)
    ours = mem_transformer.MemTransformerLM(**config)
    mem_transformer.init_weights(ours)
    assert_same_state(ours, theirs, f'MoE attn_type {attn_type}')


def test_moe_per_expert_layout_loads_and_differs_only_in_the_moe_draws(fastmoe):
    """FastMoE >= 1.0.1 draws the experts (one at a time) before the gate: for the same seed its gate and expert
    weights are other draws of the same laws, and every other tensor is the same. Its state dict loads here."""
    theirs = fastmoe_model(fastmoe.per_expert, fastmoe.weights_init, MOE_CONFIG)
    torch.manual_seed(1111)
    ours = mem_transformer.MemTransformerLM(**MOE_CONFIG)
    mem_transformer.init_weights(ours)
    loaded = mem_transformer.MemTransformerLM(**MOE_CONFIG)
    loaded.load_state_dict(theirs.state_dict(), strict=True)
    want, got = loaded.state_dict(), ours.state_dict()
    per_expert = theirs.state_dict()
    for key in want:
        if '.pos_ff.gate.' in key or '.pos_ff.experts.' in key:
            if key.endswith('weight'):
                assert not torch.equal(got[key], want[key]), key
            else:  # biases start at zero in both
                assert torch.equal(got[key], want[key]) and not got[key].any(), key
        else:
            assert torch.equal(got[key], want[key]), key
    for layer in range(MOE_CONFIG['n_layer']):
        for i in range(MOE_CONFIG['moe_num_expert']):
            expert = per_expert[f'layers.{layer}.pos_ff.experts.{i}.htoh4.weight']
            assert torch.equal(want[f'layers.{layer}.pos_ff.experts.htoh4.weight'][i:i + 1], expert)


# ----------------------------------------------------------------------------- the corpus

def write_splits(root, texts):
    root.mkdir(parents=True)
    for split, text in zip(('train', 'valid', 'test'), texts):
        (root / f'{split}.txt').write_text(text, encoding='utf-8')
    return root


def corpus_dir(tmp_path, dataset):
    """A directory in the dataset's layout, from the real samples (kept small where they are large)."""
    if dataset == 'ptb':
        texts = [shared(f'ptb/ptb.{split}.txt').read_text() for split in ('train', 'valid', 'test')]
        return write_splits(tmp_path / 'penn', [texts[0][:300000], *texts[1:]])
    if dataset in ('wt2', 'wt103'):
        return make_wikitext(tmp_path / dataset, {'wt2': 'wikitext-2', 'wt103': 'wikitext-103'}[dataset])
    if dataset == 'enwik8':
        parts = split3(enwik8_bytes()[:200000], 20000, 20000)
        return write_splits(tmp_path / 'enwik8', [enwik8_format(p) for p in parts])
    if dataset == 'text8':
        parts = split3(wikifil(enwik8_bytes()[:600000].decode('utf-8', 'ignore')), 20000, 20000)
        return write_splits(tmp_path / 'text8', [text8_format(p) for p in parts])
    raise ValueError(dataset)


def original_corpus(original, path, dataset, monkeypatch):
    """The original get_lm_corpus, without the cache.pt pickle it writes (its classes live under other names)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch, 'save', lambda *args, **kwargs: None)
        return original.data.get_lm_corpus(str(path), dataset)


def collect(batches):
    # The original's shuffled iterators fill one tensor again for every batch: copy each as it comes.
    return [(d.clone(), t.clone(), n) for d, t, n in batches]


def assert_same_batches(got, want, what):
    got, want = collect(got), collect(want)
    assert len(got) == len(want) > 0, f'{what}: {len(got)} batches, the original {len(want)}'
    for k, ((d, t, n), (d0, t0, n0)) in enumerate(zip(got, want)):
        assert n == n0 and torch.equal(d, d0) and torch.equal(t, t0), f'{what}: batch {k} differs'


@pytest.mark.parametrize('dataset', ['ptb', 'wt2', 'wt103', 'enwik8', 'text8'])
def test_ordered_corpus_vocabulary_ids_and_batches(original, tmp_path, monkeypatch, dataset):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user-cache'))
    theirs = original_corpus(original, corpus_dir(tmp_path / 'theirs', dataset), dataset, monkeypatch)
    ours = data_utils.get_lm_corpus(str(corpus_dir(tmp_path / 'ours', dataset)), dataset)
    assert list(ours.vocab.idx2sym) == list(theirs.vocab.idx2sym)
    for split in ('train', 'valid', 'test'):
        assert torch.equal(getattr(ours, split).long(), getattr(theirs, split)), f'{split} ids differ'
    for split, bsz, bptt, ext_len in (('train', 7, 30, 0), ('valid', 10, 25, 5)):
        assert_same_batches(ours.get_iterator(split, bsz, bptt, ext_len=ext_len),
                            theirs.get_iterator(split, bsz, bptt, ext_len=ext_len), f'{dataset} {split}')
    np.random.seed(3)  # the original draws from numpy's global RNG, ours from its own RandomState(seed)
    want = collect(theirs.get_iterator('train', 7, 30, ext_len=4).get_varlen_iter())
    assert_same_batches(ours.get_iterator('train', 7, 30, ext_len=4, seed=3).get_varlen_iter(), want,
                        f'{dataset} varlen')


def test_lm1b_vocabulary_ids_and_shuffled_multifile_batches(original, tmp_path, monkeypatch):
    """lm1b: the vocabulary file, held-out sentences, and the training stream over two epochs, shards and
    sentences shuffled by numpy's global RNG. The original took its shard list in directory-listing order, which
    depends on the filesystem; this repository sorts it, so it is handed the sorted list here."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user-cache'))
    theirs = original_corpus(original, make_lm1b(tmp_path / 'theirs')[0], 'lm1b', monkeypatch)
    ours = data_utils.get_lm_corpus(str(make_lm1b(tmp_path / 'ours')[0]), 'lm1b')
    assert list(ours.vocab.idx2sym) == list(theirs.vocab.idx2sym)
    theirs.train = sorted(theirs.train)
    assert [Path(p).name for p in ours.train] == [Path(p).name for p in theirs.train]
    for split in ('valid', 'test'):
        got, want = getattr(ours, split), getattr(theirs, split)
        assert len(got) == len(want) and all(torch.equal(g.long(), w) for g, w in zip(got, want))
        assert_same_batches(ours.get_iterator(split, 5, 12, ext_len=3),
                            theirs.get_iterator(split, 5, 12, ext_len=3), f'lm1b {split}')
    np.random.seed(7)  # the original draws from numpy's global RNG, ours from its own RandomState(seed)
    it = theirs.get_iterator('train', 4, 9)
    want = collect(b for epoch in range(2) for b in it)
    it = ours.get_iterator('train', 4, 9, seed=7)
    assert_same_batches([b for epoch in range(2) for b in it], want, 'lm1b train, two epochs')
