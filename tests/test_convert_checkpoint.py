"""convert_checkpoint.py: state dicts of the original and of FastMoE (both expert layouts) and pickled original
models come back as this project's checkpoints with the same weights, the same outputs and the configuration
they were built with."""
import copy
import functools
import os
import sys
import types

import pytest
import torch
import torch.nn as nn

import convert_checkpoint as cc
import data_utils
from conftest import convert_with_memory_limit, make_enwik8_dir, tiny_model
from run.model_file import load_model
from utils import files

ARCH_KEYS = ('n_token', 'n_layer', 'n_head', 'd_model', 'd_head', 'd_inner', 'div_val', 'cutoffs',
             'tie_weight', 'tie_projs', 'attn_type', 'pre_lnorm', 'sample_softmax', 'moe', 'moe_num_expert',
             'moe_top_k', 'moe_gate', 'tgt_len', 'mem_len', 'ext_len', 'untie_r')


# No memory unless a test asks; routing that varies from token to token.
make_model = functools.partial(tiny_model, mem_len=0, router_bias_std=1.0)


def log_probs(model, n_token, seed=0):
    data = torch.randint(0, n_token, (9, 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden, _ = model._forward(data)
        return model.log_prob(hidden)


def convert(tmp_path, src, *flags, name='out'):
    out = tmp_path / name
    assert cc.main([str(src), '--work_dir', str(out), *flags]) == 0
    model, saved = load_model(str(out))
    return model, saved


def assert_same_model(converted, original, **expected_config):
    config = {k: original.config[k] for k in ARCH_KEYS}
    config.update(expected_config)
    assert {k: converted.config[k] for k in ARCH_KEYS} == config
    assert converted.d_embed == original.d_embed  # (None in a config means d_model)
    ours, theirs = converted.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    n_token = original.config['n_token']
    torch.testing.assert_close(log_probs(converted, n_token), log_probs(original, n_token), rtol=0, atol=0)


def save(obj, path):
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------- FastMoE's state-dict spellings

def per_expert_layout(state):
    """FastMoE >= 1.0.1: experts.{i}.htoh4.weight [1, H, D] instead of experts.htoh4.weight [E, H, D]."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition('.experts.')
        if sep and tail.split('.')[0] in ('htoh4', 'h4toh'):
            for i, piece in enumerate(value.split(1)):
                out[f'{head}.experts.{i}.{tail}'] = piece.clone()
        else:
            out[key] = value
    return out


def weight_spelling(state):
    """FastMoE's example wraps projections in modules: emb_projs.0.weight instead of emb_projs.0."""
    return {(k + '.weight' if '_projs.' in k else k): v for k, v in state.items()}


# ------------------------------------------------------------------- state dicts

@pytest.mark.parametrize('kw,flags', [
    (dict(), ()),
    (dict(cutoffs=[10, 30], div_val=2, d_embed=16, tie_projs=[False, True, True]), ()),
    (dict(cutoffs=[10, 20], d_embed=8, tie_projs=[False, True, False], tie_weight=False),
     ('--cutoffs', '10,20')),
    (dict(attn_type=1, tgt_len=5, mem_len=3), ('--mem_len', '3')),
    (dict(attn_type=2, n_head=4, d_head=4), ('--n_head', '4')),
    (dict(attn_type=3, tgt_len=10), ()),
    (dict(pre_lnorm=True, same_length=True, clamp_len=3, mem_len=9),
     ('--pre_lnorm', '--same_length', '--clamp_len', '3', '--mem_len', '9')),
    (dict(sample_softmax=8), ('--sample_softmax', '8')),
    (dict(untie_r=True), ()),
], ids=['plain', 'adaptive-div2', 'adaptive-div1-proj', 'attn1', 'attn2', 'attn3', 'pre-lnorm', 'sampled',
        'untie-r'])
def test_dense_state_dict_round_trip(tmp_path, kw, flags):
    original = make_model(**kw)
    src = save(original.state_dict(), tmp_path / 'sd.pt')
    converted, saved = convert(tmp_path, src, *flags)
    # The lengths not fixed by the weights fall back to the original train.py's defaults.
    expected = dict(tgt_len=70) if kw.get('attn_type', 0) in (0, 2) else {}
    assert_same_model(converted, original, **expected)
    assert converted.same_length == kw.get('same_length', False)
    assert converted.clamp_len == kw.get('clamp_len', -1)
    assert saved['converted_from']['kind'] == 'state dict'


@pytest.mark.parametrize('layout,key', [
    (dict, 'layers.0.pos_ff.experts.htoh4.weight'),
    (per_expert_layout, 'layers.0.pos_ff.experts.3.htoh4.weight'),
    (lambda s: weight_spelling(per_expert_layout(s)), 'word_emb.emb_projs.1.weight'),
], ids=['fused', 'per-expert', 'per-expert+weight-spelling'])
def test_moe_state_dict_round_trip_in_both_fastmoe_layouts(tmp_path, layout, key):
    original = make_model(n_token=50, moe=True, moe_num_expert=4, moe_top_k=2, cutoffs=[10, 30], div_val=2,
                          d_embed=16, tie_projs=[False, True, True])
    state = layout(original.state_dict())
    assert key in state
    converted, _ = convert(tmp_path, save(state, tmp_path / 'sd.pt'))
    assert_same_model(converted, original, tgt_len=70)
    # Our layout is the fused one, whatever came in.
    assert converted.state_dict()['layers.1.pos_ff.experts.h4toh.weight'].shape == (4, 16, 24)


def test_moe_settings_the_weights_do_not_show_come_from_flags(tmp_path):
    original = make_model(moe=True, moe_num_expert=4, moe_top_k=1, moe_gate='switch')
    src = save(per_expert_layout(original.state_dict()), tmp_path / 'sd.pt')
    converted, saved = convert(tmp_path, src, '--moe-top-k', '1', '--moe-gate', 'switch')
    assert_same_model(converted, original, tgt_len=70)
    assert saved['converted_from']['sources']['moe_top_k'] == 'flag'


def test_dataparallel_prefix_and_nested_state_dict(tmp_path):
    original = make_model()
    state = {'module.' + k: v for k, v in original.state_dict().items()}
    converted, _ = convert(tmp_path, save({'state_dict': state, 'epoch': 3}, tmp_path / 'sd.pt'))
    assert_same_model(converted, original, tgt_len=70)


def test_dataset_and_data_are_checked_and_stored_for_generate_and_eval(tmp_path, capsys):
    data = make_enwik8_dir(tmp_path / 'data')
    n_token = len(data_utils.get_lm_corpus(data, 'enwik8').vocab)
    src = save(make_model(n_token=n_token).state_dict(), tmp_path / 'sd.pt')
    _, saved = convert(tmp_path, src, '--dataset', 'enwik8', '--data', data)
    assert saved['args'] == {'dataset': 'enwik8', 'data': data}
    assert saved['format'] == cc.ckpt.FORMAT and saved['kind'] == 'model'

    other = save(make_model(n_token=n_token + 1).state_dict(), tmp_path / 'other.pt')
    err = run_error(tmp_path, capsys, str(other), '--work_dir', str(tmp_path / 'bad'), '--dataset', 'enwik8',
                    '--data', data)
    assert f'has {n_token} tokens but the model in' in err and not (tmp_path / 'bad').exists()
    err = run_error(tmp_path, capsys, str(src), '--work_dir', str(tmp_path / 'bad'), '--dataset', 'enwik8')
    assert 'pass --data DIR and --dataset NAME' in err


def test_original_cutoffs_for_the_dataset_when_div_val_is_1(tmp_path):
    state = make_model(n_token=200001, d_model=8, d_head=4, d_inner=8, cutoffs=[20000, 40000, 200000],
                       n_layer=1).state_dict()
    config, sources = cc.infer_config(cc.normalised_state(state), {}, {}, dataset='wt103')
    assert config['cutoffs'] == [20000, 40000, 200000]
    assert sources['cutoffs'] == 'original train.py for wt103'


# ------------------------------------------------------------------- pickled original models

OUR_TO_ORIGINAL = {
    'MemTransformerLM': ('mem_transformer', 'MemTransformerLM'),
    'AdaptiveEmbedding': ('mem_transformer', 'AdaptiveEmbedding'),
    'PositionalEmbedding': ('mem_transformer', 'PositionalEmbedding'),
    'PositionwiseFF': ('mem_transformer', 'PositionwiseFF'),
    'RelPartialLearnableMultiHeadAttn': ('mem_transformer', 'RelPartialLearnableMultiHeadAttn'),
    'RelLearnableMultiHeadAttn': ('mem_transformer', 'RelLearnableMultiHeadAttn'),
    'MultiHeadAttn': ('mem_transformer', 'MultiHeadAttn'),
    'MoEPositionwiseFF': ('mem_transformer', 'CustomizedMoEPositionwiseFF'),
    'ProjectedAdaptiveLogSoftmax': ('proj_adaptive_softmax', 'ProjectedAdaptiveLogSoftmax'),
    'NaiveGate': ('fmoe.gates.naive_gate', 'NaiveGate'),
    'ExpertFFN': ('fmoe.transformer', '_Expert'),
    'FusedExpertLinear': ('fmoe.linear', 'FMoELinear'),
}
DECODER_LAYER = {0: 'RelPartialLearnableDecoderLayer', 1: 'RelLearnableDecoderLayer', 2: 'DecoderLayer',
                 3: 'DecoderLayer'}


class FakeModules:
    """Classes named as the original's, in modules registered under the original's names while pickling."""

    def __init__(self):
        self.modules = {}

    def cls(self, module, name):
        mod = self.modules.setdefault(module, types.ModuleType(module))
        if not hasattr(mod, name):
            setattr(mod, name, type(name, (nn.Module,), {'__module__': module, '__qualname__': name}))
        return getattr(mod, name)

    def install(self, monkeypatch):
        for module, mod in self.modules.items():
            parts = module.split('.')
            for i in range(1, len(parts)):
                parent = '.'.join(parts[:i])
                if parent not in sys.modules:
                    monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
            monkeypatch.setitem(sys.modules, module, mod)


def as_original(model, fakes, per_expert=False):
    """A copy of our model whose modules are of the original's (stand-in) classes, without our extras."""
    model = copy.deepcopy(model)
    del model.config
    for m in list(model.modules()):
        for hooks in ('_load_state_dict_pre_hooks', '_state_dict_pre_hooks', '_load_state_dict_post_hooks'):
            getattr(m, hooks).clear()
        name = type(m).__name__
        if name == 'DecoderLayer':
            m.__class__ = fakes.cls('mem_transformer', DECODER_LAYER[model.attn_type])
        elif name in OUR_TO_ORIGINAL:
            m.__class__ = fakes.cls(*OUR_TO_ORIGINAL[name])
        elif not type(m).__module__.startswith('torch.'):  # our subclass of a torch.nn class (e.g. Dropout)
            m.__class__ = next(c for c in type(m).__mro__ if c.__module__.startswith('torch.nn.'))
        if per_expert and name == 'MoEPositionwiseFF':
            m.experts = nn.ModuleList(single_expert(m.experts, i, fakes) for i in range(m.num_expert))
    return model


def single_expert(experts, i, fakes):
    expert = nn.Module()
    expert.__class__ = fakes.cls('fmoe.transformer', '_Expert')
    for lin_name in ('htoh4', 'h4toh'):
        fused = getattr(experts, lin_name)
        lin = nn.Module()
        lin.__class__ = fakes.cls('fmoe.linear', 'FMoELinear')
        lin.weight = nn.Parameter(fused.weight.detach()[i:i + 1].clone())
        lin.bias = nn.Parameter(fused.bias.detach()[i:i + 1].clone())
        setattr(expert, lin_name, lin)
    expert.activation = experts.activation
    return expert


class ThnnBackend:
    """What torch < 1.1 stored in every module's `_backend`: it pickled as a call of a function of a module that
    no longer exists."""

    def __reduce__(self):
        return sys.modules['torch.nn.backends.thnn']._get_thnn_function_backend, ()


def pickle_original(model, path, monkeypatch, per_expert=False, legacy=False):
    fakes = FakeModules()
    original = as_original(model, fakes, per_expert)
    if legacy:
        fakes.cls('torch.nn.backends.thnn', '_get_thnn_function_backend')
        for m in original.modules():
            m._backend = ThnnBackend()
    with monkeypatch.context() as m:
        fakes.install(m)
        torch.save(original, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch < 1.6 format saves class sources
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy-format'])
def test_pickled_original_model_needs_trust_pickle_and_round_trips(tmp_path, monkeypatch, legacy):
    original = make_model(cutoffs=[10, 20], d_embed=8, tie_projs=[False, True, True], pre_lnorm=True,
                          mem_len=5, tgt_len=4, dropout=0.1, dropatt=0.05)
    src = pickle_original(original, tmp_path / 'model.pt', monkeypatch, legacy=legacy)
    monkeypatch.delitem(sys.modules, 'fmoe', raising=False)

    assert cc.main([str(src), '--work_dir', str(tmp_path / 'refused')]) == 2
    assert not (tmp_path / 'refused').exists()

    converted, saved = convert(tmp_path, src, '--trust-pickle')
    # pre_lnorm, lengths, dropout and the div_val-1 cutoffs are not in the shapes: the pickle's attributes give them.
    assert_same_model(converted, original)
    assert (converted.config['dropout'], converted.config['dropatt']) == (0.1, 0.05)
    sources = saved['converted_from']['sources']
    assert sources['cutoffs'] == sources['pre_lnorm'] == sources['mem_len'] == 'pickled model'
    assert saved['converted_from']['kind'] == 'pickled mem_transformer.MemTransformerLM'


@pytest.mark.parametrize('per_expert', [False, True], ids=['fused', 'per-expert'])
def test_pickled_fastmoe_model_round_trips(tmp_path, monkeypatch, per_expert):
    original = make_model(moe=True, moe_num_expert=3, moe_top_k=1, attn_type=1, mem_len=2, tgt_len=4)
    src = pickle_original(original, tmp_path / 'model.pt', monkeypatch, per_expert=per_expert)
    converted, saved = convert(tmp_path, src, '--trust-pickle')
    assert_same_model(converted, original)
    assert saved['converted_from']['sources']['moe_top_k'] == 'pickled model'


class Malicious:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_restricted_unpickler_runs_no_code_of_the_file(tmp_path, capsys):
    marker = tmp_path / 'pwned'
    src = save({'model': Malicious(str(marker))}, tmp_path / 'evil.pt')
    assert cc.main([str(src), '--work_dir', str(tmp_path / 'out'), '--trust-pickle']) == 2
    assert not marker.exists() and not (tmp_path / 'out').exists()
    err = capsys.readouterr().err
    assert 'makedirs is not part of a Transformer-XL or FastMoE model' in err and len(err.splitlines()) == 1


class CallsAStandIn:
    """Pickles as a REDUCE that calls FastMoE's FMoE (a stand-in when unpickled) with an argument."""
    def __init__(self, cls):
        self.cls = cls

    def __reduce__(self):
        return self.cls, (1, 2)


def test_a_reduce_on_a_stand_in_is_one_line(tmp_path, monkeypatch, capsys):
    fakes = FakeModules()
    cls = fakes.cls('fmoe.layers', 'FMoE')
    with monkeypatch.context() as m:
        fakes.install(m)
        torch.save({'model': CallsAStandIn(cls)}, tmp_path / 'odd.pt')
    err = run_error(tmp_path, capsys, str(tmp_path / 'odd.pt'), '--work_dir', str(tmp_path / 'out'), '--trust-pickle')
    assert 'was not unpickled (TypeError' in err and 'not a pickled Transformer-XL model' in err


def test_an_unwritable_work_dir_is_refused_before_reading(tmp_path, capsys):
    src = save(make_model().state_dict(), tmp_path / 'sd.pt')
    (tmp_path / 'file').write_text('x')
    assert 'is a file, not a directory' in run_error(tmp_path, capsys, str(src), '--work_dir', str(tmp_path / 'file'))
    assert 'is not writable' in run_error(tmp_path, capsys, str(src), '--work_dir', '/proc/txl-import')


def test_a_vocabulary_mismatch_names_no_missing_run(tmp_path, capsys):
    """A converted state dict has no training run to point at: the message ended '(None at None)'."""
    src = save(make_model().state_dict(), tmp_path / 'sd.pt')
    data = tmp_path / 'data'
    data.mkdir()
    for split in ('train', 'valid', 'test'):
        (data / f'{split}.txt').write_text('65 66 67 68\n' * 50)
    err = run_error(tmp_path, capsys, str(src), '--work_dir', str(tmp_path / 'out'), '--data', str(data),
                    '--dataset', 'enwik8')
    assert err.endswith('pass the --data/--dataset it was trained on'), err


def test_unknown_fastmoe_gate_is_refused(tmp_path, monkeypatch):
    fakes = FakeModules()
    original = as_original(make_model(moe=True, moe_num_expert=2), fakes)
    for layer in original.layers:
        layer.pos_ff.gate.__class__ = fakes.cls('fmoe.gates.swipe_gate', 'SwipeGate')
    with monkeypatch.context() as m:
        fakes.install(m)
        torch.save(original, tmp_path / 'model.pt')
    with pytest.raises(cc.ConversionError, match='SwipeGate, which this project does not have'):
        cc.convert(str(tmp_path / 'model.pt'), trust_pickle=True)


# ------------------------------------------------------------------- errors

def run_error(tmp_path, capsys, *argv):
    capsys.readouterr()
    assert cc.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after what loading a corpus reported
    assert err.startswith('convert_checkpoint.py: error: ')
    return err


def test_error_cases(tmp_path, capsys):
    out = str(tmp_path / 'out')
    assert 'does not exist' in run_error(tmp_path, capsys, str(tmp_path / 'nope.pt'), '--work_dir', out)

    (tmp_path / 'text.pt').write_text('hello')
    assert 'is not a torch checkpoint' in run_error(tmp_path, capsys, str(tmp_path / 'text.pt'), '--work_dir', out)
    (tmp_path / 'noise.pt').write_bytes(bytes(range(256))[::-3] * 4)   # no pickle, though torch names weights_only
    assert 'noise.pt is not a torch checkpoint (UnpicklingError: Unsupported operand' in run_error(
        tmp_path, capsys, str(tmp_path / 'noise.pt'), '--work_dir', out)

    save({'a': 1}, tmp_path / 'other.pt')
    assert 'not a state dict' in run_error(tmp_path, capsys, str(tmp_path / 'other.pt'), '--work_dir', out)

    save({'x.weight': torch.zeros(2)}, tmp_path / 'foreign.pt')
    assert 'not a Transformer-XL model' in run_error(tmp_path, capsys, str(tmp_path / 'foreign.pt'), '--work_dir', out)

    model = make_model(attn_type=2, n_head=4, d_head=4)
    save(model.state_dict(), tmp_path / 'attn2.pt')
    err = run_error(tmp_path, capsys, str(tmp_path / 'attn2.pt'), '--work_dir', out, '--n_head', '3')
    assert 'pass the --n_head' in err

    save(make_model(cutoffs=[10, 20]).state_dict(), tmp_path / 'adaptive.pt')
    assert 'pass --cutoffs' in run_error(tmp_path, capsys, str(tmp_path / 'adaptive.pt'), '--work_dir', out)
    err = run_error(tmp_path, capsys, str(tmp_path / 'adaptive.pt'), '--work_dir', out, '--cutoffs', '10')
    assert 'do not fit the weights' in err

    save(make_model(sample_softmax=8).state_dict(), tmp_path / 'sampled.pt')
    assert '--sample_softmax' in run_error(tmp_path, capsys, str(tmp_path / 'sampled.pt'), '--work_dir', out)

    save(make_model(attn_type=1, tgt_len=5, mem_len=3).state_dict(), tmp_path / 'attn1.pt')
    err = run_error(tmp_path, capsys, str(tmp_path / 'attn1.pt'), '--work_dir', out, '--tgt_len', '5')
    assert 'tgt_len + ext_len + mem_len = 5' in err

    moe = make_model(moe=True, moe_num_expert=2).state_dict()
    mixed = {k: v for k, v in moe.items() if not k.startswith('layers.1.')}
    mixed.update({k: v for k, v in make_model().state_dict().items() if k.startswith('layers.1.')})
    save(mixed, tmp_path / 'mixed.pt')
    assert '1 of 2 layers are MoE' in run_error(tmp_path, capsys, str(tmp_path / 'mixed.pt'), '--work_dir', out)
    assert not os.path.exists(out)


def test_refuses_to_overwrite_and_to_reconvert(tmp_path, capsys):
    src = save(make_model().state_dict(), tmp_path / 'sd.pt')
    convert(tmp_path, src)
    out = tmp_path / 'out' / 'model.pt'
    before = out.read_bytes()
    assert 'pass --overwrite' in run_error(tmp_path, capsys, str(src), '--work_dir', str(tmp_path / 'out'))
    assert out.read_bytes() == before
    assert 'already a checkpoint of this project' in run_error(tmp_path, capsys, str(out), '--work_dir',
                                                               str(tmp_path / 'again'))
    assert cc.main([str(src), '--work_dir', str(tmp_path / 'out'), '--overwrite']) == 0


def test_weights_that_are_not_a_models_are_refused_before_anything_is_built(tmp_path, capsys):
    """Non-finite, integer and expand()ed tensors, and tensors of the wrong number of dimensions: one line each,
    nothing written (NaN weights were written as they were, integers converted; a 29 KB expand()ed embedding
    became a 4 GB model before it was refused)."""
    state = make_model().state_dict()
    out = str(tmp_path / 'out')

    def error(changes, *flags):
        src = save({**state, **changes}, tmp_path / 'sd.pt')
        return run_error(tmp_path, capsys, str(src), '--work_dir', out, *flags)

    key = 'layers.1.pos_ff.CoreNet.3.weight'
    nan = state[key].clone()
    nan[2, 3] = float('nan')
    assert f'{key} holds NaN or infinite values' in error({key: nan})
    assert 'layers.0.dec_attn.o_net.weight is a torch.int32 tensor' in error(
        {'layers.0.dec_attn.o_net.weight': state['layers.0.dec_attn.o_net.weight'].view(torch.int32)})
    expanded = torch.zeros(1).expand(*state['word_emb.emb_layers.0.weight'].shape)
    assert 'word_emb.emb_layers.0.weight is a [40, 16] view of 4 bytes' in error(
        {'word_emb.emb_layers.0.weight': expanded})
    for key, bad in [('r_w_bias', torch.zeros(16)), ('layers.0.dec_attn.layer_norm.weight', torch.tensor(1.0)),
                     ('word_emb.emb_layers.0.weight', torch.zeros(40)),
                     ('layers.0.pos_ff.CoreNet.0.weight', torch.tensor(1.0)),
                     ('word_emb.emb_layers.0.weight', torch.zeros(40, 0))]:
        assert f'{key} has the shape {list(bad.shape)}, where a Transformer-XL has a' in error({key: bad})
    assert 'layers.0.pos_ff.CoreNet.0.bias' in error({'layers.0.pos_ff.CoreNet.0.bias': torch.tensor(1.0)})
    assert not os.path.exists(out)


def test_an_expanded_tensor_takes_no_memory_before_it_is_refused(tmp_path):
    """torch.zeros(1).expand(10**5, 10**5): a 29 KB file, 40 GB as a model (an allocator traceback)."""
    state = make_model().state_dict()
    src = save({**state, 'word_emb.emb_layers.0.weight': torch.zeros(1).expand(10 ** 5, 10 ** 5)}, tmp_path / 'x.pt')
    codes, errors = convert_with_memory_limit([[src, '--work_dir', tmp_path / 'out']], limit=1 << 29)
    assert codes == [2] and len(errors) == 1 and 'expand()ed' in errors[0], errors


def pickled_tree(tmp_path, monkeypatch, change):
    """A pickled original model, changed by change(model) first."""
    fakes = FakeModules()
    original = as_original(make_model(), fakes)
    change(original)
    with monkeypatch.context() as m:
        fakes.install(m)
        torch.save(original, tmp_path / 'model.pt')
    return tmp_path / 'model.pt'


def nested(depth):
    def change(model):
        inner = model.layers[0]
        for _ in range(depth):
            inner.__dict__['_modules']['deeper'] = nn.Module()
            inner = inner.__dict__['_modules']['deeper']
        inner.__dict__['_modules']['deeper'] = nn.Module()
    return change


@pytest.mark.parametrize('change,message', [
    (lambda m: m.layers[0].__dict__['_modules'].update(loop=m), 'or contains itself'),
    (nested(3000), 'more than 64 deep'),
    (lambda m: m.layers[0].__dict__.update(_modules=[1, 2]), 'is not a dict'),
    (lambda m: m.layers[0].dec_attn.__dict__.update(_parameters='weights'), 'is not a dict'),
    (lambda m: m.layers[0].dec_attn.__dict__['_parameters'].update(r_w_bias=[1.0]), 'holds a list as the parameter'),
    (lambda m: m.__dict__.update(mem_len=10 ** 12), "mem_len is 1000000000000, more than the 1048576"),
    (lambda m: m.__dict__.update(tgt_len=10 ** 12), "tgt_len is 1000000000000"),
], ids=['cyclic', 'deep', 'modules-list', 'parameters-str', 'parameter-list', 'mem_len', 'tgt_len'])
def test_a_pickled_tree_that_is_not_a_model_is_one_line(tmp_path, monkeypatch, capsys, change, message):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # to pickle 3000 nested modules
    try:
        src = pickled_tree(tmp_path, monkeypatch, change)
    finally:
        sys.setrecursionlimit(limit)
    err = run_error(tmp_path, capsys, str(src), '--work_dir', str(tmp_path / 'out'), '--trust-pickle')
    assert message in err and not (tmp_path / 'out').exists()


def test_a_locked_or_training_run_directory_is_never_written(tmp_path, capsys):
    """--overwrite replaces an imported model.pt, never a run's: train.py's lock (held while it runs) and its
    checkpoint.pt (a finished run) refuse the directory, and nothing in it changes."""
    src = save(make_model().state_dict(), tmp_path / 'sd.pt')
    run = tmp_path / 'run'
    convert(tmp_path, src, name='run')
    before = (run / 'model.pt').read_bytes()
    lock = files.lock_directory(str(run), '--work_dir')  # as train.py holds it
    assert 'is in use by another process' in run_error(tmp_path, capsys, str(src), '--work_dir', str(run),
                                                       '--overwrite')
    lock.release()
    (run / 'checkpoint.pt').write_bytes(b'a run')
    err = run_error(tmp_path, capsys, str(src), '--work_dir', str(run), '--overwrite')
    assert 'holds a training run (checkpoint.pt)' in err
    assert (run / 'model.pt').read_bytes() == before and (run / 'checkpoint.pt').read_bytes() == b'a run'
