# coding: utf-8
"""Import a checkpoint of the original Transformer-XL or of FastMoE's example into this project's format.

Accepted sources:
  * a plain state dict (torch.save(model.state_dict())) of the original PyTorch Transformer-XL or of FastMoE's
    examples/transformer-xl, in either FastMoE expert layout: fused (`experts.htoh4.weight` [E, H, D]) or
    per-expert (FastMoE >= 1.0.1: `experts.{i}.htoh4.weight` [1, H, D]), projections spelt `emb_projs.0` or
    `emb_projs.0.weight`. It is read with torch.load(weights_only=True).
  * the original's model.pt, a pickled whole MemTransformerLM (torch.save(model)), only with --trust-pickle.
    It is read by a restricted unpickler: it builds tensors, torch.nn containers and the original's (and
    FastMoE's) classes as inert stand-ins that only hold their attributes, and refuses anything else, so no code
    of the file runs. Nothing of the original code is needed.

The architecture is inferred from the tensor shapes (n_layer, d_model, n_head/d_head, d_inner, attention type,
vocabulary size, adaptive cutoffs and div_val, weight and projection tying, MoE experts); what shapes cannot tell
(dropout, lengths, pre_lnorm, top_k, ...) comes from the flags where given, else from the pickled model's
attributes, else from the original train.py's defaults. The weights are loaded into this project's MemTransformerLM
with strict=True and written as WORK_DIR/model.pt (plain data, as train.py writes it); the inferred configuration
is printed.

    python convert_checkpoint.py original/model.pt --work_dir runs/imported --trust-pickle --dataset enwik8 \
        --data ../data/enwik8
"""
import math
import os
import pickle
import re
import sys
import types
import warnings
import zipfile

import torch

from data_utils import ADAPTIVE_CUTOFFS
from mem_transformer import MemTransformerLM, ModelConfig
from utils import checkpoint as ckpt
from utils import files
from utils import hf_transfo_xl as hf_xl
from utils.exp_utils import OneLineArgumentParser, physical_memory
from moe import GATES
from utils.proj_adaptive_softmax import rename_projection_keys
from run.corpus import open_corpus
from run.model_file import load_model, save_model
from run.upcycle import upcycle, upcycled_bytes
from utils.errors import ConversionError, UserError

# The original train.py's defaults for what the weights do not determine.
ORIGINAL_DEFAULTS = dict(n_head=10, dropout=0.0, dropatt=0.0, tgt_len=70, ext_len=0, mem_len=0, pre_lnorm=False,
                         same_length=False, clamp_len=-1, sample_softmax=-1, moe_top_k=2, moe_gate='naive')




# ----------------------------------------------------------------------------- the restricted unpickler

# Classes of the original code and of FastMoE that a pickled model may contain, by module.
ORIGINAL_CLASSES = {
    'mem_transformer': {'MemTransformerLM', 'RelPartialLearnableDecoderLayer', 'RelPartialLearnableMultiHeadAttn',
                        'RelLearnableDecoderLayer', 'RelLearnableMultiHeadAttn', 'DecoderLayer', 'MultiHeadAttn',
                        'RelMultiHeadAttn', 'PositionwiseFF', 'PositionalEmbedding', 'AdaptiveEmbedding',
                        'CustomizedMoEPositionwiseFF'},
    'proj_adaptive_softmax': {'ProjectedAdaptiveLogSoftmax', 'Projection'},
    'log_uniform_sampler': {'LogUniformSampler'},
}
FASTMOE_PACKAGE = 'fmoe'


class Stand_in:  # noqa: N801 - the name shows in error messages next to the class it replaces
    """An object of a pickled class: holds the attributes the pickle gives it and runs no code of that class."""
    qualified_name = '?'

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f'{self.qualified_name} has a state of type {type(state).__name__}')
        self.__dict__.update(state)


_STAND_INS = {}


def stand_in(module, name):
    key = f'{module}.{name}'
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (Stand_in,), {'qualified_name': key})
    return _STAND_INS[key]


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0 and 1), for stand-ins only."""
    if not (isinstance(cls, type) and issubclass(cls, Stand_in)) or base is not object or state is not None:
        raise pickle.UnpicklingError('copyreg._reconstructor is only allowed for model classes')
    return object.__new__(cls)


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor'): torch._utils._rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
    ('collections', 'OrderedDict'): __import__('collections').OrderedDict,
    ('builtins', 'set'): set, ('__builtin__', 'set'): set,
    ('builtins', 'frozenset'): frozenset, ('__builtin__', 'frozenset'): frozenset,
    ('copyreg', '_reconstructor'): _reconstructor, ('copy_reg', '_reconstructor'): _reconstructor,
    # torch < 1.1 pickled every module's `_backend`; the module it names is gone.
    ('torch.nn.backends.thnn', '_get_thnn_function_backend'): lambda: None,
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith('torch.nn.modules.'):
            cls = getattr(torch.nn, name, None)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                return stand_in(module, name)
        # The original imported these modules from utils/ put on sys.path; a copy may name them utils.X.
        plain_module = module[len('utils.'):] if module.startswith('utils.') else module
        if name in ORIGINAL_CLASSES.get(plain_module, ()):
            return stand_in(module, name)
        if (module == FASTMOE_PACKAGE or module.startswith(FASTMOE_PACKAGE + '.')) and name.isidentifier():
            return stand_in(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not part of a Transformer-XL or FastMoE model')


RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__='restricted_pickle', Unpickler=RestrictedUnpickler,
    load=lambda f, **kwargs: RestrictedUnpickler(f, **kwargs).load())


def load_pickled_model(path):
    """The root object of a pickled torch.save(model), built by the restricted unpickler."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith('constants.pkl') or '/code/' in n for n in z.namelist()):
                raise ConversionError(f'{path} is a TorchScript archive, not a pickled model: it is not loaded')
    try:
        return torch.load(path, map_location='cpu', pickle_module=RESTRICTED_PICKLE, weights_only=False)
    except pickle.UnpicklingError as e:
        raise ConversionError(f'{path} was not unpickled: it contains {e}; only tensors, torch.nn modules and '
                              'the original classes are allowed') from None
    except Exception as e:  # allowed classes called with arguments they do not take (a hand-made REDUCE...)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f'{path} was not unpickled ({type(e).__name__}: {reason}): it is not a pickled '
                              'Transformer-XL model') from None


# A pickled model's module tree is walked only this far: the original model nests 5 deep and has some hundreds
# of modules; a deeper or larger tree (or one that contains itself) is not a Transformer-XL.
MAX_DEPTH, MAX_MODULES = 64, 100_000


def tree_state_dict(root):
    """What model.state_dict() would give, read off the stand-in tree (_parameters, _buffers, _modules)."""
    out, stack, visited = {}, [(root, '', 0)], 0
    while stack:
        obj, prefix, depth = stack.pop()
        visited += 1
        if depth > MAX_DEPTH or visited > MAX_MODULES:
            raise ConversionError(f'the pickled model nests modules more than {MAX_DEPTH} deep or has more than '
                                  f'{MAX_MODULES} (or contains itself): it is not a Transformer-XL model')
        attrs = vars(obj)
        tables = [attrs.get(name) or {} for name in ('_parameters', '_buffers', '_modules')]
        skip = attrs.get('_non_persistent_buffers_set') or set()
        if not all(isinstance(t, dict) for t in tables) or not isinstance(skip, (set, frozenset)):
            raise ConversionError(f'the pickled module {prefix.rstrip(".") or "at the root"} has a _parameters, '
                                  '_buffers or _modules that is not a dict: it is not a torch.nn module')
        parameters, buffers, modules = tables
        for name, value in [*parameters.items(), *((n, b) for n, b in buffers.items() if n not in skip)]:
            if value is not None and not isinstance(value, torch.Tensor):
                raise ConversionError(f'the pickled model holds a {type(value).__name__} as the parameter '
                                      f'{prefix}{name}, not a tensor: it is not a Transformer-XL model')
            if value is not None:
                out[f'{prefix}{name}'] = value.detach()
        stack.extend((m, f'{prefix}{name}.', depth + 1) for name, m in modules.items() if isinstance(m, Stand_in))
    return out


def _child(obj, *path):
    """obj._modules[a]._modules[b]..., or None."""
    for name in path:
        modules = vars(obj).get('_modules') if isinstance(obj, Stand_in) else None
        obj = modules.get(name) if isinstance(modules, dict) else None
    return obj


def _attr(obj, name, kind):
    value = vars(obj).get(name) if isinstance(obj, Stand_in) else None
    return value if isinstance(value, kind) and not (kind is int and isinstance(value, bool)) else None


GATE_CLASSES = {'NaiveGate': 'naive', 'GShardGate': 'gshard', 'SwitchGate': 'switch'}
# The longest length a pickled model's attributes may give (the original's largest runs use a few thousand):
# a larger one, taken as it is, would make eval.py and train.py allocate memories and masks of that length.
MAX_LENGTH = 1 << 20


def pickled_hints(root):
    """Settings the weights do not show, read off the pickled model's attributes (what is there)."""
    hints = {}
    for name in ('n_head', 'tgt_len', 'ext_len', 'mem_len', 'clamp_len', 'sample_softmax'):
        hints[name] = _attr(root, name, int)
    for name in ('tgt_len', 'ext_len', 'mem_len', 'sample_softmax'):
        if (hints[name] or 0) > MAX_LENGTH:
            raise ConversionError(f'the pickled model\'s {name} is {hints[name]}, more than the {MAX_LENGTH} this '
                                  f'converter takes from a file: pass the --{name} it was trained with')
    hints['same_length'] = _attr(root, 'same_length', bool)
    cutoffs = _attr(_child(root, 'word_emb'), 'cutoffs', list)
    hints['cutoffs'] = cutoffs[:-1] if cutoffs and all(isinstance(c, int) for c in cutoffs) else None
    hints['dropout'] = _attr(_child(root, 'drop'), 'p', float)
    attn = _child(root, 'layers', '0', 'dec_attn')
    hints['pre_lnorm'] = _attr(attn, 'pre_lnorm', bool)
    hints['dropatt'] = _attr(_child(attn, 'dropatt'), 'p', float)
    pos_ff = _child(root, 'layers', '0', 'pos_ff')
    hints['moe_top_k'] = _attr(pos_ff, 'top_k', int)
    gate = _child(pos_ff, 'gate')
    if gate is not None:
        gate_name = type(gate).__name__
        if gate_name not in GATE_CLASSES:
            raise ConversionError(f'the MoE layers use FastMoE\'s {type(gate).qualified_name}, which this project '
                                  f'does not have (it has {", ".join(GATE_CLASSES)})')
        hints['moe_gate'] = GATE_CLASSES[gate_name]
    return {k: v for k, v in hints.items() if v is not None}


# ----------------------------------------------------------------------------- reading a source file

def read_source(path, trust_pickle):
    """(state dict, hints from a pickled model, description of the source)."""
    if not os.path.isfile(path):
        raise ConversionError(f'{path} does not exist')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        holds_objects, reason = ckpt.weights_only_failure(e)
        if not holds_objects:
            raise ConversionError(f'{path} is not a torch checkpoint ({reason})') from None
        if not trust_pickle:
            raise ConversionError(
                f'{path} holds pickled Python objects (the original\'s torch.save(model)); unpickling can run code, '
                'so it is only done with --trust-pickle (a restricted unpickler that builds tensors and inert '
                'stand-ins of the original classes)') from None
        root = load_pickled_model(path)
        if not isinstance(root, Stand_in):
            raise ConversionError(f'{path} holds a pickled {type(root).__name__}, not a model')
        return tree_state_dict(root), pickled_hints(root), f'pickled {type(root).qualified_name}'
    if isinstance(obj, dict) and obj.get('format') == ckpt.FORMAT:
        raise ConversionError(f'{path} is already a checkpoint of this project: use it as it is')
    return find_state_dict(obj, path), {}, 'state dict'


def find_state_dict(obj, path):
    """A flat {name: tensor} mapping, possibly under one of the usual keys."""
    def is_state_dict(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in d.items())
    if is_state_dict(obj):
        state = dict(obj)
    else:
        nested = [obj[k] for k in ('model_state', 'model_state_dict', 'state_dict', 'model')
                  if isinstance(obj, dict) and is_state_dict(obj.get(k))]
        if not nested:
            raise ConversionError(f'{path} holds a {type(obj).__name__} that is not a state dict '
                                  '(a mapping from parameter names to tensors)')
        state = dict(nested[0])
    if all(k.startswith('module.') for k in state):  # saved from a DataParallel wrapper
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------- inferring the configuration

class Inferred:
    """The configuration being inferred, with where each value came from."""

    def __init__(self, state, hints, flags):
        self.state, self.hints, self.flags = state, hints, flags
        self.config, self.source = {}, {}

    def set(self, key, value, source='shapes'):
        self.config[key], self.source[key] = value, source

    def setting(self, key):
        """A value the weights do not show: the flag, else the pickled model's, else the original default."""
        if self.flags.get(key) is not None:
            self.set(key, self.flags[key], 'flag')
        elif key in self.hints:
            self.set(key, self.hints[key], 'pickled model')
        else:
            self.set(key, ORIGINAL_DEFAULTS[key], 'original default')
        return self.config[key]

    def shape(self, key, ndim):
        """The shape of a tensor the architecture is read from, which must have `ndim` dimensions, none empty."""
        if key not in self.state:
            raise ConversionError(f'the weights have no {key}: they are not a Transformer-XL model')
        shape = tuple(self.state[key].shape)
        if len(shape) != ndim or 0 in shape:
            raise ConversionError(f'{key} has the shape {list(shape)}, where a Transformer-XL has a {ndim}-d tensor '
                                  'of non-empty dimensions: the weights are not a Transformer-XL model')
        return shape


def infer_config(state, hints, flags, dataset=None):
    """Our MemTransformerLM configuration for the weights; (config, {key: source})."""
    inf = Inferred(state, hints, flags)
    layers = sorted({int(k.split('.')[1]) for k in state if k.startswith('layers.') and k.split('.')[1].isdigit()})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError('the weights have no layers.0, layers.1, ...: they are not a Transformer-XL model')
    inf.set('n_layer', len(layers))
    d_model = inf.shape('layers.0.dec_attn.layer_norm.weight', 1)[0]
    inf.set('d_model', d_model)
    _infer_attention(inf)
    _infer_feed_forward(inf)
    _infer_vocabulary(inf, dataset)
    for key in ('dropout', 'dropatt', 'pre_lnorm', 'same_length', 'clamp_len'):
        inf.setting(key)
    _infer_lengths(inf)
    return inf.config, inf.source


def _infer_attention(inf):
    state, n_layer = inf.state, inf.config['n_layer']
    untie_r = 'r_w_bias' not in state and 'layers.0.dec_attn.r_w_bias' in state  # a pair per layer (TF, HF)
    if 'layers.0.dec_attn.r_net.weight' in state:
        attn_type, (n_head, d_head) = 0, inf.shape('layers.0.dec_attn.r_w_bias' if untie_r else 'r_w_bias', 2)
        inf.set('untie_r', untie_r)
    elif 'r_bias' in state:
        attn_type, (_, n_head, d_head) = 1, inf.shape('r_w_bias', 3)
    elif 'r_emb' in state:
        attn_type, (_, _, n_head, d_head) = 3, inf.shape('r_emb', 4)
    elif 'pos_emb.inv_freq' in state:
        attn_type = 2
        n_head = inf.setting('n_head')
        rows = inf.shape('layers.0.dec_attn.q_net.weight', 2)[0]
        if n_head < 1 or rows % n_head:
            raise ConversionError(f'attn_type 2 weights have {rows} query rows, which --n_head {n_head} does not '
                                  'divide: pass the --n_head the model was trained with')
        d_head = rows // n_head
    else:
        raise ConversionError('the weights have none of r_w_bias, r_emb, pos_emb.inv_freq: unknown attention type')
    inf.set('attn_type', attn_type)
    if attn_type != 2:
        inf.set('n_head', n_head)
    inf.set('d_head', d_head)
    qkv = 'layers.0.dec_attn.qkv_net.weight' if attn_type in (0, 1) else 'layers.0.dec_attn.q_net.weight'
    expected = (3 if attn_type in (0, 1) else 1) * n_head * d_head
    if inf.shape(qkv, 2)[0] != expected:
        raise ConversionError(f'{qkv} has {inf.shape(qkv, 2)[0]} rows, not {expected} for {n_head} heads of {d_head}')
    if attn_type in (1, 3) and inf.shape('r_emb', 4)[0] != n_layer:
        raise ConversionError(f'r_emb has {inf.shape("r_emb", 4)[0]} layers but the weights have {n_layer}')


def _infer_feed_forward(inf):
    state, n_layer = inf.state, inf.config['n_layer']
    gates = [f'layers.{i}.pos_ff.gate.gate.weight' for i in range(n_layer)]
    n_moe = sum(k in state for k in gates)
    if n_moe not in (0, n_layer):
        raise ConversionError(f'{n_moe} of {n_layer} layers are MoE layers; this model has all or none')
    inf.set('moe', n_moe > 0)
    if not n_moe:
        inf.set('d_inner', inf.shape('layers.0.pos_ff.CoreNet.0.weight', 2)[0])
        return
    num_expert = inf.shape(gates[0], 2)[0]
    inf.set('moe_num_expert', num_expert)
    fused = 'layers.0.pos_ff.experts.htoh4.weight'
    if fused in state:
        inf.set('d_inner', inf.shape(fused, 3)[1], 'shapes (fused experts)')
    else:
        per_expert = 'layers.0.pos_ff.experts.0.htoh4.weight'
        inf.set('d_inner', inf.shape(per_expert, 3)[1], 'shapes (per-expert layout, FastMoE >= 1.0.1)')
    inf.setting('moe_top_k')
    inf.setting('moe_gate')


def _infer_vocabulary(inf, dataset):
    state, d_model = inf.state, inf.config['d_model']
    sizes = []
    while f'word_emb.emb_layers.{len(sizes)}.weight' in state:
        sizes.append(inf.shape(f'word_emb.emb_layers.{len(sizes)}.weight', 2))
    if not sizes:
        raise ConversionError('the weights have no word_emb.emb_layers.0.weight: not a Transformer-XL model')
    d_embed = sizes[0][1]
    inf.set('n_token', sum(rows for rows, _ in sizes))
    inf.set('d_embed', d_embed)
    if len(sizes) > 1:
        div_val = d_embed // sizes[1][1]
        if any(d_embed // div_val ** i != cols for i, (_, cols) in enumerate(sizes)):
            raise ConversionError(f'the embedding widths {[c for _, c in sizes]} do not follow d_embed // div_val**i')
        inf.set('div_val', div_val)
        bounds = [sum(rows for rows, _ in sizes[:i + 1]) for i in range(len(sizes) - 1)]
        inf.set('cutoffs', bounds)
    else:
        inf.set('div_val', 1)
        n_clusters = inf.shape('crit.cluster_weight', 2)[0] if 'crit.cluster_weight' in state else 0
        if n_clusters:
            _cutoffs_without_shapes(inf, n_clusters, dataset)
        else:
            inf.set('cutoffs', [])
    _infer_softmax_and_tying(inf, d_model)


def _cutoffs_without_shapes(inf, n_clusters, dataset):
    """With div_val 1 only the number of tail clusters shows; the boundaries come from elsewhere."""
    n_token = inf.config['n_token']
    if inf.flags.get('cutoffs') is not None:
        inf.set('cutoffs', inf.flags['cutoffs'], 'flag')
    elif 'cutoffs' in inf.hints:
        inf.set('cutoffs', inf.hints['cutoffs'], 'pickled model')
    elif dataset in ADAPTIVE_CUTOFFS:  # train.py's --adaptive cutoffs, the original's
        inf.set('cutoffs', list(ADAPTIVE_CUTOFFS[dataset][0]), f'original train.py for {dataset}')
    else:
        raise ConversionError(f'the adaptive softmax has {n_clusters} tail clusters whose boundaries the shapes do '
                              f'not show: pass --cutoffs (or --dataset wt103/lm1b for the original\'s)')
    cutoffs = inf.config['cutoffs']
    if len(cutoffs) != n_clusters or not all(0 < c < n_token for c in cutoffs) or cutoffs != sorted(set(cutoffs)):
        raise ConversionError(f'cutoffs {cutoffs} ({inf.source["cutoffs"]}) do not fit the weights: they need '
                              f'{n_clusters} increasing values below n_token={n_token}')


def _same(state, a, b):
    return a in state and b in state and state[a].shape == state[b].shape and torch.equal(state[a], state[b])


def _infer_softmax_and_tying(inf, d_model):
    state, div_val = inf.state, inf.config['div_val']
    if 'out_layer.weight' in state:  # the sampled softmax's output layer
        sample_softmax = inf.setting('sample_softmax')
        if sample_softmax <= 0:
            raise ConversionError('the weights have the sampled softmax\'s out_layer: pass the --sample_softmax '
                                  'N they were trained with (the original lm1b scripts use 8192)')
        inf.set('tie_weight', _same(state, 'out_layer.weight', 'word_emb.emb_layers.0.weight'))
        inf.set('tie_projs', [False])
        return
    if (inf.flags.get('sample_softmax') or 0) > 0:
        raise ConversionError('--sample_softmax was given but the weights have an adaptive softmax (crit.*)')
    inf.set('sample_softmax', -1)
    n_out = 1 if div_val == 1 else len(inf.config['cutoffs']) + 1
    tied = [_same(state, f'crit.out_layers.{i}.weight', f'word_emb.emb_layers.{i}.weight') for i in range(n_out)]
    if any(tied) and not all(tied):
        raise ConversionError(f'only some output layers are tied to the embeddings ({tied}); this model ties all '
                              'or none')
    inf.set('tie_weight', all(tied))
    emb_proj = (lambda i: 'word_emb.emb_projs.0') if div_val == 1 else (lambda i: f'word_emb.emb_projs.{i}')
    inf.set('tie_projs', [_same(state, f'crit.out_projs.{i}', emb_proj(i))
                          for i in range(len(inf.config['cutoffs']) + 1)])


def _infer_lengths(inf):
    """tgt/ext/mem lengths do not change the weights except for attn_type 1 and 3, whose position tables
    hold tgt_len + ext_len + mem_len rows."""
    mem_len, ext_len = inf.setting('mem_len'), inf.setting('ext_len')
    if inf.config['attn_type'] not in (1, 3):
        inf.setting('tgt_len')
        return
    max_klen = inf.shape('r_emb', 4)[1]
    if inf.flags.get('tgt_len') is None and 'tgt_len' not in inf.hints:
        inf.set('tgt_len', max_klen - mem_len - ext_len, 'shapes (r_emb rows - mem_len - ext_len)')
    else:
        inf.setting('tgt_len')
    total = inf.config['tgt_len'] + ext_len + mem_len
    if total != max_klen or inf.config['tgt_len'] < 1:
        raise ConversionError(f'r_emb has {max_klen} positions but tgt_len + ext_len + mem_len = {total}: pass '
                              'the --tgt_len/--ext_len/--mem_len the model was trained with')


# ----------------------------------------------------------------------------- conversion

def normalised_state(state):
    """The projections spelt as the original (`emb_projs.0`, not FastMoE's `emb_projs.0.weight`)."""
    state = dict(state)
    rename_projection_keys(state, 'word_emb.', 'emb_projs')
    rename_projection_keys(state, 'crit.', 'out_projs')
    return state


def check_tensors(state, src):
    """Refuse what no Transformer-XL weight is, before anything is built from it: a tensor that is not floating
    point (integers would be converted into weights silently), or one whose memory holds fewer elements than
    its shape (an expand()ed view: a few bytes in the file, gigabytes in the model)."""
    for key, value in state.items():
        if value.layout != torch.strided or value.device.type != 'cpu' or not value.is_floating_point():
            raise ConversionError(f'{src}: {key} is a {value.dtype} tensor ({value.layout}, {value.device.type}); a '
                                  'Transformer-XL\'s weights are dense floating-point tensors: this is not one')
        if value.untyped_storage().nbytes() < value.numel() * value.element_size():
            raise ConversionError(f'{src}: {key} is a {list(value.shape)} view of {value.untyped_storage().nbytes()} '
                                  'bytes (an expand()ed tensor): save the weights themselves (tensor.clone())')


LAYER_KEY = re.compile(r'(?:transformer\.)?layers\.(\d+)\.')
COMPUTED_BUFFERS = ('pos_emb.inv_freq',)  # fixed by d_model; transformers may leave it out


def model_on_meta(config, state, rejected):
    """The model `config` describes, on the meta device (its tensors take no memory), once its values are
    checked and it declares as many layers as `state` holds (building a billion layers would take the memory)."""
    try:
        config = ModelConfig.from_dict(config)
    except ValueError as e:
        raise ConversionError(f'{rejected}: {e}') from None
    layers = {m.group(1) for m in map(LAYER_KEY.match, state) if m}
    if config.n_layer != len(layers):
        raise ConversionError(f'{rejected}: n_layer={config.n_layer} but the weights hold {len(layers)} layers')
    try:
        with torch.device('meta'):
            return MemTransformerLM(config)
    except ValueError as e:
        raise ConversionError(f'{rejected}: {e}') from None


def build_model(config, state, src, meta):
    """MemTransformerLM(**config) holding `state`, whose names and shapes are first checked on `meta` (the model
    on the meta device), so that a configuration declaring more than the weights hold is refused before any
    memory is taken. A buffer the configuration fixes keeps its computed value when `state` leaves it out."""
    computed = [k for k in COMPUTED_BUFFERS if k in meta.state_dict() and k not in state]
    try:
        with warnings.catch_warnings():  # (that copying into a meta tensor does nothing: only shapes are compared)
            warnings.simplefilter('ignore')
            ckpt.load_weights(meta, {**state, **{k: meta.state_dict()[k] for k in computed}}, src)
        model = MemTransformerLM(**config)
        ckpt.load_weights(model, {**state, **{k: model.state_dict()[k] for k in computed}}, src)
    except ckpt.CheckpointError as e:
        raise ConversionError(str(e)) from None
    check_finite(model, src)
    return model.eval()


def check_finite(model, src, fix='use weights from before they went bad'):
    """Refuse a model holding a NaN or an infinity: its model.pt would load, then compute only NaN."""
    for key, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConversionError(f'{src}: {key} holds NaN or infinite values, with which a model computes '
                                  f'nothing: {fix}')


def convert(src, trust_pickle=False, flags=None, dataset=None):
    """(model with the source's weights, inferred config sources, description of the source)."""
    raw, hints, kind = read_source(src, trust_pickle)
    check_tensors(raw, src)
    state = normalised_state(raw)
    config, sources = infer_config(state, hints, flags or {}, dataset)
    model = build_model(config, state, src, model_on_meta(config, state, 'the inferred configuration is rejected'))
    return model, sources, kind


# ----------------------------------------------------------------------------- Hugging Face directories

HF_RUNTIME_FLAGS = ('tgt_len', 'ext_len', 'mem_len', 'dropout', 'dropatt', 'same_length', 'clamp_len')


def convert_hf(directory, trust_pickle=False, flags=None):
    """(model, vocabulary symbols, config sources, description) of a Hugging Face TransfoXLLMHeadModel
    directory; the settings that shape no tensor may be overridden by flags."""
    flags = flags or {}
    fixed = [k for k, v in flags.items() if v is not None and k not in HF_RUNTIME_FLAGS]
    if fixed:
        raise ConversionError(f'--{fixed[0]} is read from {directory}/config.json for a Hugging Face model; only '
                              f'{", ".join("--" + k for k in HF_RUNTIME_FLAGS)} may be given')
    config, sources = hf_xl.model_config(hf_xl.read_config(directory), os.path.join(directory, 'config.json'))
    for key in HF_RUNTIME_FLAGS:
        if flags.get(key) is not None:
            config[key], sources[key] = flags[key], 'flag'
    hf_state, weights = hf_xl.read_weights(directory)
    check_tensors(hf_state, directory)
    meta = model_on_meta(config, hf_state, f'{directory}/config.json describes a model this code rejects')
    model = build_model(config, hf_xl.our_state_dict(hf_state, meta, directory), directory, meta)
    symbols, vocab_file = hf_xl.read_vocab(directory, trust_pickle, RestrictedUnpickler)
    if symbols is None:
        raise ConversionError(f'{directory} has no vocab.txt or vocab.pkl: the token ids mean nothing without the '
                              'tokenizer\'s vocabulary (vocab.txt: one symbol per line, in id order)')
    if len(symbols) != model.n_token or len(set(symbols)) != len(symbols):
        raise ConversionError(f'{directory}/{vocab_file} has {len(symbols)} symbols ({len(set(symbols))} different) '
                              f'but the model has {model.n_token} tokens')
    return model, symbols, sources, f'Hugging Face TransfoXLLMHeadModel ({weights}, {vocab_file})'


def model_info(sources, src, kind, dataset, data, vocab=None):
    """What model.pt holds beside the model: where it came from (and an imported model's own vocabulary)."""
    return dict(vocab=vocab, args={'dataset': dataset, 'data': data}, step=None, val_loss=None,
                converted_from={'path': os.path.abspath(src), 'kind': kind, 'sources': sources})


def describe(config, sources):
    width = max(len(k) for k in sources)
    return '\n'.join(f'  {k:<{width}}  {config[k]!r:<24} {sources[k]}' for k in sources)


# ----------------------------------------------------------------------------- command line

def build_parser():
    parser = OneLineArgumentParser(
        description='Import a checkpoint of the original Transformer-XL or of FastMoE\'s example (a state dict, '
                    'or with --trust-pickle a pickled model.pt) into WORK_DIR/model.pt of this project.')
    parser.add_argument('src', nargs='?', help='the checkpoint to import, or a Hugging Face TransfoXLLMHeadModel '
                                               'directory (config.json, model.safetensors or pytorch_model.bin, '
                                               'vocab.txt or vocab.pkl); not with --upcycle')
    parser.add_argument('--work_dir', required=True, help='directory to write model.pt into (created if needed)')
    parser.add_argument('--trust-pickle', dest='trust_pickle', action='store_true',
                        help='allow a pickled whole model (the original\'s torch.save(model)): it is read with a '
                             'restricted unpickler that only builds tensors, torch.nn containers and inert '
                             'stand-ins of the original and FastMoE classes; other content is refused')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace the model.pt of an earlier import; a training run\'s directory (train.py\'s '
                             'checkpoint.pt) is never written into')
    parser.add_argument('--dataset', default=None, help='dataset the model was trained on (stored for eval.py and '
                                                         'generate.py; wt103/lm1b also give the original cutoffs)')
    parser.add_argument('--data', default=None, help='location of that data corpus (stored with the model)')
    given = parser.add_argument_group('settings the weights do not show (default: the pickled model\'s, else '
                                      'the original train.py\'s)')
    given.add_argument('--n_head', type=int, help='number of heads (read from the shapes except for attn_type 2)')
    given.add_argument('--tgt_len', type=int)
    given.add_argument('--ext_len', type=int)
    given.add_argument('--mem_len', type=int)
    given.add_argument('--dropout', type=float)
    given.add_argument('--dropatt', type=float)
    given.add_argument('--pre_lnorm', action='store_const', const=True, help='LayerNorm before each sub-layer')
    given.add_argument('--same_length', action='store_const', const=True)
    given.add_argument('--clamp_len', type=int)
    given.add_argument('--cutoffs', type=lambda s: [int(c) for c in s.split(',')],
                       help='adaptive softmax cutoffs, e.g. 20000,40000,200000 (shown by the shapes if div_val>1)')
    given.add_argument('--sample_softmax', type=int, help='samples of the sampled softmax (if it has out_layer)')
    given.add_argument('--moe-top-k', dest='moe_top_k', type=int, help='experts per token')
    given.add_argument('--moe-gate', dest='moe_gate', choices=GATES, help="the gate's type")
    upcycling = parser.add_argument_group('sparse upcycling: a dense model becomes a Mixture of Experts')
    upcycling.add_argument('--upcycle', metavar='DENSE', default=None,
                           help="a dense run directory or model.pt of this project, or a checkpoint of the original "
                                "(imported as without --upcycle); needs --moe-num-expert and --moe-top-k")
    upcycling.add_argument('--moe-num-expert', dest='moe_num_expert', type=int, help='experts per layer')
    upcycling.add_argument('--upcycle-noise', type=float, default=0.0,
                           help='Gaussian noise on each expert copy, as a fraction of the std of the tensor copied '
                                '(0: identical experts, the naive gate then computes the dense model exactly)')
    upcycling.add_argument('--seed', type=int, default=1111, help="seed of the router's init and the noise")
    return parser


FLAG_KEYS = ('n_head', 'tgt_len', 'ext_len', 'mem_len', 'dropout', 'dropatt', 'pre_lnorm', 'same_length',
             'clamp_len', 'cutoffs', 'sample_softmax', 'moe_top_k', 'moe_gate')


def write_out(model, info, args, lock):
    """Write WORK_DIR/model.pt (and WORK_DIR) under WORK_DIR's lock (claim_out), then release it; a refusal or a
    failed write, such as a full disk, is one line on stderr."""
    out = os.path.join(args.work_dir, 'model.pt')
    try:
        lock = claim_out(args, lock)
        save_model(out, model, **info)
    except UserError as e:
        print(f'convert_checkpoint.py: error: {e}', file=sys.stderr)
        return False
    except OSError as e:  # files.WriteError says what happened; another OSError: the directory changed under us
        print(f'convert_checkpoint.py: error: {e if isinstance(e, files.WriteError) else files.write_error(e, out)}',
              file=sys.stderr)
        return False
    finally:
        if lock is not None:
            lock.release()
    return True


# train.py's files besides model.pt: a directory holding one is a training run, which no import replaces.
TRAINING_FILES = tuple(name for name in ckpt.RUN_FILES if name != 'model.pt')


def check_out(args, lock=None):
    """(WORK_DIR/model.pt, the lock on WORK_DIR) once writing there destroys nothing of the user's: WORK_DIR is
    locked for this process (None while it does not exist yet; train.py holds the same lock while it runs), holds
    no training run, and holds no model.pt unless --overwrite replaces it."""
    out = os.path.join(args.work_dir, 'model.pt')
    files.check_writable_dir(args.work_dir, '--work_dir')
    if lock is None and os.path.isdir(args.work_dir):
        lock = files.lock_directory(args.work_dir, '--work_dir')
    run = [name for name in TRAINING_FILES if os.path.exists(os.path.join(args.work_dir, name))]
    if run:
        raise ConversionError(f'--work_dir {args.work_dir} holds a training run ({run[0]}), which an import never '
                              'replaces (--overwrite replaces only an imported model.pt): choose another --work_dir')
    if os.path.exists(out) and not args.overwrite:
        raise ConversionError(f'{out} exists: pass --overwrite to replace it or choose another --work_dir')
    return out, lock


def claim_out(args, lock):
    """Create WORK_DIR, lock it if it was not yet, and check it again under the lock (a run may have started
    there meanwhile): the lock to hold while model.pt is written."""
    os.makedirs(args.work_dir, exist_ok=True)
    return check_out(args, lock)[1]


# ----------------------------------------------------------------------------- sparse upcycling

def load_dense(src, args):
    """(dense model, dataset, data, its own vocabulary or None) from a run directory or model.pt of this project,
    an original checkpoint or a Hugging Face directory (imported as without --upcycle)."""
    flags = {k: getattr(args, k) for k in FLAG_KEYS if k not in ('moe_top_k', 'moe_gate')}
    if hf_xl.is_hf_directory(src):
        model, vocab, _, _ = convert_hf(src, args.trust_pickle, flags)
        return model, args.dataset, args.data, vocab
    path = os.path.join(src, 'model.pt') if os.path.isdir(src) else src
    if not os.path.isfile(path):
        raise ConversionError(f'--upcycle {src}: no such file or run directory with a model.pt')
    if _is_project_checkpoint(path):
        model, saved = load_model(path)
        check_finite(model, path)
        saved_args = saved.get('args') or {}
        return (model, args.dataset or saved_args.get('dataset'), args.data or saved_args.get('data'),
                saved.get('vocab'))
    model, _, _ = convert(path, args.trust_pickle, flags, args.dataset)
    return model, args.dataset, args.data, None


def _is_project_checkpoint(path):
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get('format') == ckpt.FORMAT


def check_memory(need, what):
    """Refuse to build what needs more bytes than this machine's memory, rather than fail while building it."""
    have = physical_memory()
    if need > have:
        raise ConversionError(f'{what} needs {need / 2 ** 30:.1f} GiB to build, more than the {have / 2 ** 30:.1f} '
                              'GiB of memory of this machine: ask for less')


def main_upcycle(args):
    """convert_checkpoint.py --upcycle DENSE --moe-num-expert E --moe-top-k K [--moe-gate G] --work_dir NEW."""
    gate = args.moe_gate or 'naive'
    try:
        if args.src:
            raise ConversionError(f'--upcycle takes the dense model itself; drop the extra argument {args.src}')
        if args.moe_num_expert is None or args.moe_top_k is None:
            raise ConversionError('--upcycle needs --moe-num-expert E and --moe-top-k K')
        if not 0 <= args.upcycle_noise < math.inf:
            raise ConversionError(f'--upcycle-noise {args.upcycle_noise} must be a finite number >= 0')
        if not 0 <= args.seed < 2 ** 64:
            raise ConversionError(f'--seed {args.seed} must be between 0 and 2**64 - 1')
        out, lock = check_out(args)
        dense, dataset, data, vocab = load_dense(args.upcycle, args)
        check_memory(2 * upcycled_bytes(dense, args.moe_num_expert),  # the model, and the copies that fill it
                     f'--moe-num-expert {args.moe_num_expert}')
        model = upcycle(dense, args.moe_num_expert, args.moe_top_k, gate, args.upcycle_noise, args.seed)
        check_finite(model, 'the upcycled model', 'pass a smaller --upcycle-noise')
    except UserError as e:  # ConversionError, CheckpointError, the model's own checks (as a ConfigError)
        print(f'convert_checkpoint.py: error: {e}', file=sys.stderr)
        return 2
    n_dense, n_moe = (sum(p.numel() for p in m.parameters()) for m in (dense, model))
    print(f'Upcycled {args.upcycle}: {n_dense:,} parameters -> {n_moe:,} ({args.moe_num_expert} experts of '
          f'd_inner {model.config["d_inner"]}, top-{args.moe_top_k} {gate} gate, noise {args.upcycle_noise})')
    if gate in ('gshard', 'switch'):
        print(f'NOTE: the {gate} gate does not start equal to the dense model: '
              + ('its capacity limit drops copies' if gate == 'gshard' else 'it scales its expert by its probability'))
    how = {'noise': args.upcycle_noise, 'seed': args.seed}
    if not write_out(model, model_info(how, args.upcycle, 'upcycled dense model', dataset, data, vocab), args,
                     lock):
        return 2
    flags = (f'--moe --moe-num-expert {args.moe_num_expert} --moe-top-k {args.moe_top_k} --moe-gate {gate}')
    print(f'Wrote {out}\nContinue training with: python train.py --restart_dir {args.work_dir} {flags} '
          '(and the dense run\'s model flags) --work_dir NEW_RUN')
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.upcycle is not None:
        return main_upcycle(args)
    try:
        if args.src is None:
            raise ConversionError('the checkpoint to import is missing (or pass --upcycle DENSE)')
        out, lock = check_out(args)
        flags = {k: getattr(args, k) for k in FLAG_KEYS}
        vocab = None
        if hf_xl.is_hf_directory(args.src):
            model, vocab, sources, kind = convert_hf(args.src, args.trust_pickle, flags)
        else:
            model, sources, kind = convert(args.src, args.trust_pickle, flags, args.dataset)
        if args.data or args.dataset:  # the corpus must exist and its vocabulary fit the weights
            open_corpus({'vocab': vocab}, args.src, model.n_token, args.data, args.dataset,
                        log=lambda line: print(line, file=sys.stderr))
    except UserError as e:  # ConversionError, HFImportError, CheckpointError and DataError
        print(f'convert_checkpoint.py: error: {e}', file=sys.stderr)
        return 2

    print(f'Read {args.src}: {kind}, {len(model.state_dict())} tensors, '
          f'{sum(p.numel() for p in model.parameters()):,} parameters')
    print('Inferred configuration (value, from):')
    print(describe(model.config, sources))
    if not write_out(model, model_info(sources, args.src, kind, args.dataset, args.data, vocab), args, lock):
        return 2
    print(f'Wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
