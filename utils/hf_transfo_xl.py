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
import math
import os
import pickle
import struct

import torch
from utils.checkpoint import weights_only_failure
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
MAX_HEADER = 100 << 20  # bytes of a safetensors header (the safetensors library's limit too)
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
    except (OSError, ValueError, RecursionError) as e:
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
    if get('sample_softmax') not in (-1, 0):
        raise HFImportError(f'{path}: sample_softmax {get("sample_softmax")!r}; Hugging Face\'s model has none (-1)')
    if get('layer_norm_epsilon') != 1e-5:
        raise HFImportError(f'{path}: layer_norm_epsilon {get("layer_norm_epsilon")!r}; this model\'s LayerNorms '
                            'use 1e-5, as the original')
    cutoffs = hf['cutoffs']
    if not isinstance(cutoffs, list):
        raise HFImportError(f'{path}: cutoffs is {cutoffs!r}, not a list of token ids')
    tie_projs = hf.get('tie_projs')
    if tie_projs is None:  # the current config stores the rule; TransfoXLConfig turns it into the list
        tie_projs = [False] + [get('proj_share_all_but_first')] * len(cutoffs)
    # The values as config.json gives them: ModelConfig checks them ("false" is not a bool, "yes" no list).
    config = dict(n_token=hf.get('vocab_size', hf.get('n_token')), n_layer=hf['n_layer'], n_head=hf['n_head'],
                  d_model=hf['d_model'], d_head=hf['d_head'], d_inner=hf['d_inner'], dropout=get('dropout'),
                  dropatt=get('dropatt'), tie_weight=get('tie_word_embeddings'), d_embed=hf['d_embed'],
                  div_val=hf['div_val'], tie_projs=tie_projs, pre_lnorm=get('pre_lnorm'),
                  tgt_len=hf.get('tgt_len', 128), ext_len=hf.get('ext_len', 0), mem_len=get('mem_len'),
                  cutoffs=cutoffs, same_length=get('same_length'), attn_type=0, clamp_len=get('clamp_len'),
                  sample_softmax=-1, untie_r=get('untie_r'))
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
    """{name: tensor} of a .safetensors file (the format: u64 header size, JSON header, raw little-endian data).
    Each tensor is read from the file straight into its own memory, so reading needs about the file's size."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack('<Q', f.read(8).ljust(8, b'\xff'))
            if n > min(size - 8, MAX_HEADER):
                raise ValueError(f'its header size {n} does not fit in its {size} bytes')
            header = json.loads(f.read(n).decode('utf-8'))
            out = {}
            for name, dtype, shape, begin, end in safetensors_entries(header, size - 8 - n):
                out[name] = torch.empty(shape, dtype=dtype)
                f.seek(8 + n + begin)
                _read_into(f, out[name].reshape(-1).view(torch.uint8).numpy())
            return out
    except (ValueError, RecursionError) as e:  # (a UnicodeDecodeError and json's errors are ValueErrors)
        raise HFImportError(f'{path} is not a safetensors file ({type(e).__name__}: {e}): write it again with '
                            'save_pretrained, or give pytorch_model.bin') from None
    except OSError as e:
        raise HFImportError(f'{path} cannot be read ({e.strerror or e})') from None


def _read_into(f, buffer):
    done = 0
    while done < len(buffer):
        got = f.readinto(buffer[done:])
        if not got:
            raise ValueError('the file ends before its last tensor')
        done += got


def safetensors_entries(header, data_size):
    """[(name, dtype, shape, begin, end)] of a safetensors header, checked against the format: every tensor's
    bytes are its shape's, and the tensors tile the data that follows the header (no gap, no overlap), so
    they hold no more than the file does."""
    if not isinstance(header, dict):
        raise ValueError(f'its header is a JSON {type(header).__name__}, not an object')
    entries = []
    for name, info in header.items():
        if name == '__metadata__':
            continue
        if not isinstance(info, dict) or info.get('dtype') not in SAFETENSORS_DTYPES:
            raise ValueError(f'{name} has no known dtype (one of {", ".join(SAFETENSORS_DTYPES)})')
        shape, offsets = info.get('shape'), info.get('data_offsets')
        if not _int_list(shape) or any(d < 0 for d in shape):
            raise ValueError(f'{name} has the shape {shape!r}, not a list of integers >= 0')
        if not _int_list(offsets) or len(offsets) != 2:
            raise ValueError(f'{name} has the data_offsets {offsets!r}, not two integers')
        dtype = SAFETENSORS_DTYPES[info['dtype']]
        if offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
            raise ValueError(f'{name}: offsets {offsets[0]}..{offsets[1]} do not hold {shape} {info["dtype"]}')
        entries.append((name, dtype, shape, *offsets))
    entries.sort(key=lambda e: (e[3], e[4]))
    end = 0
    for name, _, _, begin, stop in entries:
        if begin != end:
            raise ValueError(f'{name} starts at byte {begin} of the data, not at {end} where the tensor before '
                             'it ends')
        end = stop
    if end != data_size:
        raise ValueError(f'its tensors hold {end} bytes but {data_size} follow the header')
    return entries


def _int_list(value):
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def read_bin(path):
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        holds_objects, reason = weights_only_failure(e)
        if holds_objects:
            raise HFImportError(f'{path} holds pickled Python objects besides tensors, which are not unpickled '
                                '(that can run code): save the state dict of tensors, or a model.safetensors') from None
        raise HFImportError(f'{path} is not a weights-only torch checkpoint ({reason})') from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise HFImportError(f'{path} is not a state dict (a mapping from names to tensors)')
    return obj


def read_shard_index(path):
    """{tensor name: shard file} of a *.index.json."""
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise HFImportError(f'{path} is not readable JSON ({type(e).__name__}: {e})') from None
    weight_map = index.get('weight_map') if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFImportError(f'{path} is not a shard index: it needs a "weight_map" object from tensor names to '
                            'shard file names')
    return weight_map


def read_weights(directory):
    """(the model's tensors under Hugging Face's names, the file(s) they came from). A sharded model's tensors
    are each taken from the shard its index names; a copy in another shard is refused, not guessed between."""
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))]
    if not present:
        raise HFImportError(f'{directory} has no weights: none of {", ".join(WEIGHT_FILES)}')
    name = present[0]
    path = os.path.join(directory, name)
    reader = read_safetensors if name.startswith('model.safetensors') else read_bin
    if not name.endswith('.index.json'):
        return reader(path), name
    weight_map = read_shard_index(path)
    shards = sorted(set(weight_map.values()))
    state = {}
    for shard in shards:
        if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(directory, shard)):
            raise HFImportError(f'{path} names a shard {shard!r} that is not a file in {directory}')
        for key, value in reader(os.path.join(directory, shard)).items():
            if weight_map.get(key) != shard:
                where = f'in {weight_map[key]}' if key in weight_map else 'nowhere'
                raise HFImportError(f'{directory}/{shard} holds {key}, which {name} puts {where}: remove the stray '
                                    'copy or fix the index')
            state[key] = value
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise HFImportError(f'{path} puts {missing[0]} in {weight_map[missing[0]]}, which does not hold it')
    return state, f'{name} ({len(shards)} shards)'


def our_state_dict(hf_state, model, directory):
    """Hugging Face's tensors under this model's names (`model` may be on the meta device). save_pretrained drops
    the output layers and projections tied to the embeddings from a safetensors file: they are taken from the
    tensors they are tied to. pos_emb.inv_freq, which transformers may leave out, is left to the model."""
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
        try:
            with open(text, encoding='utf-8') as f:
                symbols = [line.split()[0] for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise HFImportError(f'{text} is not UTF-8 text (byte {e.start} of a line is not): save it as UTF-8') \
                from None
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

