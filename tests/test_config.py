"""Typed configurations (utils/config.py): ModelConfig and MoEConfig check each value once, and train.py's model
flags are generated from them and map back onto them (run/options.py)."""
import dataclasses
import re

import pytest

from mem_transformer import MemTransformerLM, ModelConfig
from moe import FMoETransformerMLP, GATES, MoEConfig
from run.options import build_parser, model_config, run_config
from utils.config import OptionError, flag_fields
from utils.errors import ConfigError

SMALL = dict(n_token=40, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24)


# ----------------------------------------------------------------------------- every check, once

MODEL_CASES = [
    (dict(n_token=0), 'n_token=0: must be a positive integer'),
    (dict(n_layer=2.5), 'n_layer=2.5: must be an integer'),
    (dict(n_head=True), 'n_head=True: must be an integer'),
    (dict(d_model=0), 'd_model=0: must be a positive integer'),
    (dict(d_head=0), 'd_head=0: must be a positive integer'),
    (dict(attn_type=3, d_head=4), 'd_head=4: attn_type=3 adds per-head position embeddings to the hidden state, '
                                  'so n_head * d_head must equal d_model=16'),
    (dict(d_inner=-1), 'd_inner=-1: must be a positive integer'),
    (dict(dropout=1.0), 'dropout=1.0: must be in [0, 1)'),
    (dict(dropatt=float('nan')), 'dropatt=nan: must be in [0, 1)'),
    (dict(tie_weight=1), 'tie_weight=1: must be True or False'),
    (dict(d_embed=-2), 'd_embed=-2: must be a positive integer'),
    (dict(div_val=0), 'div_val=0: must be a positive integer'),
    (dict(div_val=32, cutoffs=[10]), 'div_val=32: the last cluster of d_embed=16 would have no dimensions'),
    (dict(tie_projs=[0]), 'tie_projs=[0]: must be a list of bool'),
    (dict(tgt_len=0), 'tgt_len=0: must be a positive integer'),
    (dict(attn_type=1, tgt_len=None), 'tgt_len=None: attn_type=1 sizes its position table by tgt_len + ext_len'),
    (dict(ext_len=-1), 'ext_len=-1: must be >= 0'),
    (dict(mem_len=-1), 'mem_len=-1: must be >= 0'),
    (dict(cutoffs=[20, 10]), 'cutoffs=[20, 10]: must be strictly increasing and within (0, n_token=40)'),
    (dict(cutoffs=[40]), 'cutoffs=[40]: must be strictly increasing and within (0, n_token=40)'),
    (dict(attn_type=4), 'attn_type=4: unknown attention type; known: 0 (relative positions'),
    (dict(sample_softmax=8, d_embed=8), 'sample_softmax=8: the sampled softmax needs div_val=1 and d_embed=d_model'),
    (dict(moe='yes'), "moe='yes': must be True or False"),
    (dict(untie_r=True, attn_type=2), 'untie_r=True: only attn_type 0 shares r_w_bias/r_r_bias across layers '
                                      '(attn_type=2)'),
    (dict(moe=True, moe_top_k=5, moe_num_expert=4), 'moe_top_k=5: must be between 1 and moe_num_expert=4'),
    (dict(clamp_len=None), 'clamp_len=None: must be an integer'),
    (dict(unknown=1), "unknown model option 'unknown'"),
]


@pytest.mark.parametrize('changes,message', MODEL_CASES)
def test_model_config_checks_each_option_and_names_it_as_a_keyword(changes, message):
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict(dict(SMALL, **changes))
    assert str(error.value).startswith(message) and '\n' not in str(error.value)


MOE_CASES = [
    (dict(num_expert=0), 'num_expert=0: must be a positive integer'),
    (dict(top_k=0), 'top_k=0: must be between 1 and num_expert=64'),
    (dict(top_k=65), 'top_k=65: must be between 1 and num_expert=64'),
    (dict(gate='gshard', top_k=1), "top_k=1: gate='gshard' routes to exactly 2 experts"),
    (dict(gate='switch'), "top_k=2: gate='switch' routes to exactly 1 expert"),
    (dict(gate='hash'), "gate='hash': unknown gate; known: naive, gshard, switch, noisy, auxfree"),
    (dict(capacity_factor=0.0), 'capacity_factor=0.0: must be a finite number above 0'),
    (dict(eval_capacity_factor=float('inf')), 'eval_capacity_factor=inf: must be a finite number above 0'),
    (dict(balance_coef=-0.1), 'balance_coef=-0.1: must be a finite number at least 0'),
    (dict(zloss_coef=float('nan')), 'zloss_coef=nan: must be a finite number at least 0'),
    (dict(gate_bias=None), 'gate_bias=None: must be True or False'),
    (dict(switch_eps=-1), 'switch_eps=-1: must be in [0, 1)'),
    # the jitter is uniform in [1-eps, 1+eps]: 1e30 (or inf) drowned the logits and gave NaN steps
    (dict(switch_eps=1e30), 'switch_eps=1e+30: must be in [0, 1)'),
    (dict(switch_eps=float('inf')), 'switch_eps=inf: must be in [0, 1)'),
    (dict(switch_eps=float('nan')), 'switch_eps=nan: must be in [0, 1)'),
    (dict(random_routing=0), 'random_routing=0: must be True or False'),
    (dict(shared_expert=-1), 'shared_expert=-1: must be >= 0'),
    (dict(every=0), 'every=0: must be a positive integer'),
]


@pytest.mark.parametrize('changes,message', MOE_CASES)
def test_moe_config_checks_each_option(changes, message):
    with pytest.raises(OptionError, match=f'^{re.escape(message)}$'):
        MoEConfig(**changes)


@pytest.mark.parametrize('cls,cases', [(ModelConfig, MODEL_CASES), (MoEConfig, MOE_CASES)], ids=['model', 'moe'])
def test_every_check_has_a_case_above(cls, cases):
    """A new option's check gets its case here: the tables above reach every field that has a check."""
    reached = {message.split('=')[0].split(':')[0] for _, message in cases}
    assert {f.name for f in dataclasses.fields(cls) if f.metadata.get('check')} <= reached


def test_the_model_and_the_layer_get_the_moe_options_from_one_check():
    """MemTransformerLM's moe_* keywords, FMoETransformerMLP's FastMoE keywords and a MoEConfig meet the same
    checks; the model's messages spell the options as its keywords."""
    with pytest.raises(OptionError, match=r'^moe_top_k=2: moe_gate=.switch. routes to exactly 1 expert$'):
        MemTransformerLM(**SMALL, moe=True, moe_gate='switch')
    with pytest.raises(OptionError, match=r"^top_k=2: gate='switch' routes to exactly 1 expert$"):
        FMoETransformerMLP(4, 8, 16, gate='switch')
    config = MoEConfig(num_expert=4, top_k=1, gate='switch', switch_eps=0.3, capacity_factor=1.5)
    by_config = FMoETransformerMLP(d_model=8, d_hidden=16, config=config)
    by_keywords = FMoETransformerMLP(4, 8, 16, top_k=1, gate='switch', switch_eps=0.3, capacity_factor=(1.5, 2.4))
    for layer in (by_config, by_keywords):
        assert (type(layer.gate).__name__, layer.gate.switch_eps, layer.gate.capacity) == ('SwitchGate', 0.3,
                                                                                            (1.5, 2.4))


# ----------------------------------------------------------------------------- the configuration as plain data

def test_the_config_reads_as_the_flat_dict_of_the_constructors_keywords():
    config = ModelConfig.from_dict(dict(SMALL, cutoffs=[10, 20], div_val=2, moe=True, moe_top_k=1))
    flat = dict(config)
    assert list(flat)[:8] == ['n_token', 'n_layer', 'n_head', 'd_model', 'd_head', 'd_inner', 'dropout', 'dropatt']
    assert flat['cutoffs'] == [10, 20] and flat['moe_top_k'] == 1 and 'moe_options' not in flat
    assert config.cutoffs == (10, 20) and config.moe_options.top_k == 1
    assert ModelConfig.from_dict(flat) == config == flat
    assert MemTransformerLM(**flat).config == config
    assert config.replace(dropout=0.1, moe_gate='noisy') == dict(flat, dropout=0.1, moe_gate='noisy')
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dropout = 0.5


def test_the_original_positional_call_maps_onto_the_fields_in_order():
    model = MemTransformerLM(40, 2, 2, 16, 8, 24, 0.1, 0.2, False, 12)
    c = model.config
    assert (c.n_token, c.n_layer, c.n_head, c.d_model, c.d_head, c.d_inner, c.dropout, c.dropatt, c.tie_weight,
            c.d_embed) == (40, 2, 2, 16, 8, 24, 0.1, 0.2, False, 12)
    with pytest.raises(TypeError, match="'n_layer' both by position and by keyword"):
        MemTransformerLM(40, 2, n_layer=3)
    fastmoe = (40, 2, 2, 16, 8, 24, 0., 0., True, None, 1, [False], False, 6, 0, 6, [], False, False, 0, -1, -1,
               True, 4, 1)   # FastMoE's signature, every option by position
    assert MemTransformerLM(*fastmoe).config.moe_options.top_k == 1
    with pytest.raises(TypeError, match='at most 25 positional options'):
        MemTransformerLM(*fastmoe, 'naive')


def test_d_embed_and_the_lengths_have_one_spelling_each():
    """None and -1 (the constructor's and train.py's way of saying d_model) are stored as d_model; no memory is 0."""
    for d_embed in (None, -1, 16):
        assert ModelConfig.from_dict(dict(SMALL, d_embed=d_embed, mem_len=None, ext_len=None))['d_embed'] == 16
    assert ModelConfig(**SMALL, mem_len=None).mem_len == 0


# ----------------------------------------------------------------------------- flags -> configuration

def other_value(field, default):
    """A valid value other than the default, and the command-line words that give it."""
    flag = field.metadata['flag']
    if isinstance(default, bool):
        return (not default), [flag]
    if field.metadata['choices']:
        value = next(c for c in field.metadata['choices'] if c != default)
        return value, [flag, value]
    value = default + (2 if isinstance(default, int) else 0.25)
    return value, [flag, str(value)]


def get(config, path):
    for name in path:
        config = getattr(config, name)
    return config


@pytest.mark.parametrize('path', sorted(flag_fields(ModelConfig)), ids='.'.join)
def test_every_model_flag_reaches_its_config_field(path):
    field = flag_fields(ModelConfig)[path]
    default = get(ModelConfig(n_token=100), path)
    value, argv = other_value(field, default if field.default is dataclasses.MISSING else field.default)
    args = build_parser().parse_args(argv)
    config = model_config(args, 100)
    assert get(config, path) == value
    # and nothing else changed (but d_embed, which follows d_model when not given)
    unchanged = dict(ModelConfig(n_token=100))
    key = 'moe_' + path[1] if path[0] == 'moe_options' else path[0]
    changed = {k for k in unchanged if config[k] != unchanged[k]}
    assert key in changed and changed <= {key, 'd_embed'}, changed


def test_the_parser_has_every_model_flag_with_the_configs_default_and_help():
    parser = build_parser()
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for path, field in flag_fields(ModelConfig).items():
        action = actions[field.metadata['flag']]
        assert action.help == field.metadata['help']
        default = get(ModelConfig(n_token=100), path) if field.default is dataclasses.MISSING else field.default
        assert action.default == (False if isinstance(default, bool) else default)
    assert actions['--moe-gate'].choices == GATES


@pytest.mark.parametrize('argv,message', [
    (['--dropout', '1.5'], '--dropout 1.5: must be in [0, 1)'),
    (['--n_layer', '0'], '--n_layer 0: must be a positive integer'),
    (['--moe-num-expert', '4', '--moe-top-k', '5'], '--moe-top-k 5: must be between 1 and --moe-num-expert 4'),
    (['--moe-gate', 'switch'], '--moe-top-k 2: --moe-gate switch routes to exactly 1 expert'),
    (['--moe-capacity-factor', '0'], '--moe-capacity-factor 0.0: must be a finite number above 0'),
    (['--moe-switch-eps', '-1'], '--moe-switch-eps -1.0: must be in [0, 1)'),
    (['--moe-switch-eps', 'inf'], '--moe-switch-eps inf: must be in [0, 1)'),
    (['--untie_r', '--attn_type', '2'], '--untie_r: only attn_type 0 shares r_w_bias/r_r_bias across layers '
                                        '(--attn_type 2)'),
    (['--attn_type', '3', '--d_head', '4'], '--d_head 4: --attn_type 3 adds per-head position embeddings'),
    (['--sample_softmax', '8', '--d_embed', '8'], '--sample_softmax 8: the sampled softmax needs div_val=1'),
])
def test_a_bad_model_flag_is_one_line_naming_the_flag(argv, message):
    parser = build_parser()
    args = parser.parse_args(['--work_dir', 'w', *argv])
    with pytest.raises(ConfigError) as error:
        run_config(args, parser)
    assert str(error.value).startswith(message) and '\n' not in str(error.value)


def test_the_gate_options_reach_the_layers():
    """What train.py's gate flags set (test_every_model_flag_reaches_its_config_field) builds these layers."""
    model = MemTransformerLM(ModelConfig(**SMALL, moe=True, moe_options=MoEConfig(
        num_expert=4, gate='gshard', gate_bias=False, random_routing=False, shared_expert=2)))
    ff = model.layers[0].pos_ff
    assert ff.gate.gate.bias is None and ff.gate.random_routing is False
    assert ff.shared_expert.htoh4.weight.shape == (2 * 24, 16)
    switch = MemTransformerLM(**SMALL, moe=True, moe_num_expert=4, moe_top_k=1, moe_gate='switch', moe_switch_eps=0.3)
    assert switch.layers[1].pos_ff.gate.switch_eps == 0.3


def test_moe_every_n_th_layer_and_its_upcycling():
    """--moe-every 2: MoE feed-forwards in layers 1 and 3, dense ones in 0 and 2; upcycling a dense model copies
    only those layers' feed-forwards into experts, and the naive gate keeps the dense model's function."""
    import torch
    from conftest import tiny_model
    from run.upcycle import upcycle
    config = dict(n_layer=4, moe=True, moe_num_expert=3, moe_every=2)
    model = MemTransformerLM(**SMALL | config)
    assert [type(layer.pos_ff).__name__ for layer in model.layers] == ['PositionwiseFF', 'MoEPositionwiseFF'] * 2
    assert len(model.moe_layers()) == 2
    dense = tiny_model(n_layer=4)
    moe = upcycle(dense, 3, 2, moe_every=2).eval()
    assert moe.config.moe_options.every == 2 and len(moe.moe_layers()) == 2
    assert torch.equal(moe.layers[0].pos_ff.CoreNet[0].weight, dense.layers[0].pos_ff.CoreNet[0].weight)
    data = torch.arange(12).remainder(40).view(6, 2)
    with torch.no_grad():
        torch.testing.assert_close(moe(data, data)[0], dense(data, data)[0])
