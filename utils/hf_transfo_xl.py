"""Read a Hugging Face `TransfoXLLMHeadModel` directory (e.g. transfo-xl-wt103) without transformers.

transformers deprecated its Transformer-XL in 4.35 and removed it in 5.0; its checkpoints are the original
model converted from the authors' TensorFlow weights, so they map onto this repository's MemTransformerLM:
`transformer.` prefixes dropped, a pair of r_w_bias/r_r_bias per layer (untie_r), the rest unchanged.

A directory holds:
  * config.json: plain JSON (TransfoXLConfig's fields; both its current names and the older n_token/tie_weight).
  * the weights: model.safetensors (read here: an 8-byte header length, a JSON header, raw little-endian
    tensors), or pytorch_model.bin (torch.load(weights_only=True)), or a sharded *.index.json of either.
  * the tokenizer's vocabulary: vocab.txt (one symbol per line, first field, in id order: the tokenizer's
    plain-text format), or vocab.pkl, a pickle, read only when trusted, by the restricted unpickler of
    convert_checkpoint.py extended to the tokenizer's plain containers (other objects become inert stand-ins).
"""
import json
import os
import pickle
import struct

import torch
from utils.errors import ConversionError

# TransfoXLConfig's defaults (transformers 4.35) for what a config.json may leave out: save_pretrained writes
# every Transformer-XL field, and omits PretrainedConfig's fields (tie_word_embeddings) when at their default.
HF_DEFAULTS = dict(tie_word_embeddings=True, proj_share_all_but_first=True, layer_norm_epsilon=1e-5,
                   attn_type=0, sample_softmax=-1, pre_lnorm=False, dropout=0.1, dropatt=0.0, untie_r=True,
                   same_length=True, clamp_len=1000, mem_len=1600)
REQUIRED = ('cutoffs', 'd_model', 'd_embed', 'n_head', 'd_head', 'd_inner', 'div_val', 'n_layer')
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
                      'U8': torch.uint8, 'BOOL': torch.bool}
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                'pytorch_model.bin.index.json')


class HFImportError(ConversionError):
    """The directory cannot be imported; the message is one line and says what to do."""


def is_hf_directory(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json'))


# ----------------------------------------------------------------------------- config.json

def read_config(directory):
    path = os.path.join(directory, 'config.json')
    try:
        with open(path, encoding='utf-8') as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise HFImportError(f'{path} is not readable JSON ({e})') from None
    if not isinstance(hf, dict):
        raise HFImportError(f'{path} holds a {type(hf).__name__}, not a configuration object')
    model_type = hf.get('model_type', 'transfo-xl')
    if model_type != 'transfo-xl':
        raise HFImportError(f'{path} is a {model_type!r} model, not a Transformer-XL (model_type transfo-xl)')
    return hf


def model_config(hf, path='config.json'):
    """This repository's MemTransformerLM configuration for a TransfoXLConfig: (config, {key: source})."""
    get = lambda key: hf.get(key, HF_DEFAULTS.get(key))  # noqa: E731
    missing = [k for k in REQUIRED if k not in hf] + ([] if 'vocab_size' in hf or 'n_token' in hf else ['vocab_size'])
    if missing:
        raise HFImportError(f'{path} has no {", ".join(missing)}: it is not a Transformer-XL configuration')
    if get('attn_type') != 0:
        raise HFImportError(f'{path}: attn_type {get("attn_type")}; Hugging Face\'s Transformer-XL has only type 0')
    if get('sample_softmax') > 0:
        raise HFImportError(f'{path}: sample_softmax {get("sample_softmax")}; Hugging Face\'s model has none')
    if get('layer_norm_epsilon') != 1e-5:
        raise HFImportError(f'{path}: layer_norm_epsilon {get("layer_norm_epsilon")}; this model\'s LayerNorms '
                            'use 1e-5, as the original')
    cutoffs = list(hf['cutoffs'])
    tie_projs = hf.get('tie_projs')
    if tie_projs is None:  # the current config stores the rule; TransfoXLConfig turns it into the list
        tie_projs = [False] + [bool(get('proj_share_all_but_first'))] * len(cutoffs)
    config = dict(n_token=hf.get('vocab_size', hf.get('n_token')), n_layer=hf['n_layer'], n_head=hf['n_head'],
                d_model=hf['d_model'], d_head=hf['d_head'], d_inner=hf['d_inner'], dropout=get('dropout'),
                dropatt=get('dropatt'), tie_weight=bool(get('tie_word_embeddings')), d_embed=hf['d_embed'],
                div_val=hf['div_val'], tie_projs=list(tie_projs), pre_lnorm=bool(get('pre_lnorm')),
                tgt_len=hf.get('tgt_len', 128), ext_len=hf.get('ext_len', 0), mem_len=get('mem_len'),
                cutoffs=cutoffs, same_length=bool(get('same_length')), attn_type=0,
                clamp_len=get('clamp_len'), sample_softmax=-1, untie_r=bool(get('untie_r')))
    # Where each value came from: config.json, or what transformers assumes when it is absent.
    hf_name = dict(n_token='vocab_size', tie_weight='tie_word_embeddings', tie_projs='tie_projs')
    sources = {k: 'config.json' if hf_name.get(k, k) in hf or (k == 'n_token' and 'n_token' in hf)
               else 'transformers default' for k in config}
    if 'tie_projs' not in hf:
        sources['tie_projs'] = 'config.json (proj_share_all_but_first)' if 'proj_share_all_but_first' in hf \
            else 'transformers default'
    for key in ('tgt_len', 'ext_len'):  # no TransfoXLConfig field: the lengths eval.py/train.py flags set
        sources[key] = 'config.json' if key in hf else 'default (eval.py and train.py set it)'
    sources['attn_type'] = sources['sample_softmax'] = 'Hugging Face (the only one)'
    return config, sources


# ----------------------------------------------------------------------------- weights

def read_safetensors(path):
    """{name: tensor} of a .safetensors file (the format: u64 header size, JSON header, raw data)."""
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        (n,) = struct.unpack('<Q', raw[:8])
        header = json.loads(raw[8:8 + n].decode('utf-8'))
        data = memoryview(raw)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == '__metadata__':
                continue
            dtype = SAFETENSORS_DTYPES[info['dtype']]
            begin, end = info['data_offsets']
            shape = [int(d) for d in info['shape']]
            numel = 1
            for d in shape:
                numel *= d
            if not 0 <= begin <= end <= len(data) or end - begin != numel * dtype.itemsize:
                raise ValueError(f'{name}: offsets {begin}..{end} do not hold {shape} {info["dtype"]}')
            out[name] = (torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if numel
                         else torch.empty(0, dtype=dtype)).reshape(shape)
        return out
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise HFImportError(f'{path} is not a safetensors file ({type(e).__name__}: {e})') from None


def read_bin(path):
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFImportError(f'{path} is not a weights-only torch checkpoint ({reason})') from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HFImportError(f'{path} is not a state dict (a mapping from names to tensors)')
    return obj


def read_weights(directory):
    """(the model's tensors under Hugging Face's names, the file(s) they came from)."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        raise HFImportError(f'{directory} has no weights: none of {", ".join(WEIGHT_FILES)}')
    name = present[0]
    path = os.path.join(directory, name)
    reader = read_safetensors if name.startswith('model.safetensors') else read_bin
    if not name.endswith('.index.json'):
        return reader(path), name
    try:
        with open(path, encoding='utf-8') as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise HFImportError(f'{path} is not a shard index ({e})') from None
    state = {}
    for shard in shards:
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
            raise HFImportError(f'{path} names a shard {shard!r} that is not a file in {directory}')
        state.update(reader(os.path.join(directory, shard)))
    return state, f'{name} ({len(shards)} shards)'


def our_state_dict(hf_state, model, directory):
    """Hugging Face's tensors under this model's names. save_pretrained drops the output layers and projections
    tied to the embeddings from a safetensors file: they are taken from the tensors they are tied to."""
    state = {}
    for key, value in hf_state.items():
        name = key[len('transformer.'):] if key.startswith('transformer.') else key
        state[name] = value
    if not model.untie_r:
        # Hugging Face's tied biases are also each layer's attributes, so its state dict (a safetensors file may
        # keep only these) holds them once per layer too: all the same tensor.
        for bias in ('r_w_bias', 'r_r_bias'):
            copies = [state.pop(f'layers.{i}.dec_attn.{bias}') for i in range(model.n_layer)
                      if f'layers.{i}.dec_attn.{bias}' in state]
            if copies:
                state.setdefault(bias, copies[0])
            if any(not torch.equal(c, state[bias]) for c in copies):
                raise HFImportError(f'{directory}: config.json says untie_r false but the layers\' {bias} differ')
    if 'crit.cluster_weight' in state:
        # The head's logits of the tail clusters: Hugging Face (as the TensorFlow code its checkpoints come
        # from) reads cluster i at column cutoffs[0] + i - 1, the original PyTorch code at column -i.
        state['crit.cluster_weight'] = state['crit.cluster_weight'].flip(0)
        state['crit.cluster_bias'] = state['crit.cluster_bias'].flip(0)
    shared = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    for names in shared.values():
        known = [n for n in names if n in state]
        for name in names:
            if name not in state and known:
                state[name] = state[known[0]]
    if 'pos_emb.inv_freq' not in state:  # a buffer transformers may leave out; it is fixed by d_model
        state['pos_emb.inv_freq'] = model.pos_emb.inv_freq
    unexpected = sorted(set(state) - set(model.state_dict()))
    if unexpected:
        raise HFImportError(f'{directory} holds weights this Transformer-XL does not have: '
                            f'{", ".join(unexpected[:4])}{" ..." if len(unexpected) > 4 else ""}')
    return state


# ----------------------------------------------------------------------------- the tokenizer's vocabulary

class _Inert:
    """Any object of the pickled tokenizer that is not plain data (regular expressions, Moses tokenizers,
    added-token records): built without running any of its code, and never used."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _vocab_unpickler(base):
    """The restricted unpickler of convert_checkpoint.py, also allowing the containers a tokenizer's
    __dict__ holds (Counter, OrderedDict) and turning any other class into an inert stand-in."""
    import collections

    class VocabUnpickler(base):
        def find_class(self, module, name):
            if (module, name) == ('collections', 'Counter'):
                return collections.Counter
            try:
                return super().find_class(module, name)
            except pickle.UnpicklingError:
                return type(name, (_Inert,), {})
    return VocabUnpickler


def read_vocab(directory, trust_pickle, unpickler):
    """(symbols in id order, file) from vocab.txt, else (trusted) vocab.pkl; (None, None) if neither."""
    text = os.path.join(directory, 'vocab.txt')
    if os.path.isfile(text):
        with open(text, encoding='utf-8') as f:
            symbols = [line.split()[0] for line in f if line.strip()]
        return symbols, 'vocab.txt'
    pkl = os.path.join(directory, 'vocab.pkl')
    if not os.path.isfile(pkl):
        return None, None
    if not trust_pickle:
        raise HFImportError(f'{pkl} is a pickle, which can run code: pass --trust-pickle to read it with the '
                            'restricted unpickler, or give a plain-text vocab.txt (one symbol per line, in id order)')
    try:
        with open(pkl, 'rb') as f:
            obj = _vocab_unpickler(unpickler)(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise HFImportError(f'{pkl} was not read as a tokenizer vocabulary ({type(e).__name__}: {e})') from None
    symbols = obj.get('idx2sym') if isinstance(obj, dict) else None
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        raise HFImportError(f'{pkl} has no idx2sym list of symbols: it is not a Transformer-XL tokenizer\'s')
    return symbols, 'vocab.pkl'

