"""run/options.py: train.py's command line resolves once into a read-only run configuration."""
import dataclasses

import pytest

from run.options import build_parser, parse, run_config
from utils.errors import ConfigError


def test_the_command_line_resolves_once_and_stays_as_parsed():
    parser = build_parser()
    args = parser.parse_args(['--fp16', '--d_model', '64', '--d_head', '16', '--n_head', '4'])
    parsed = dict(vars(args))
    config = run_config(args, parser)
    assert vars(args) == parsed                      # the parsed flags are not changed
    assert (config.amp, config.static_loss_scale, config.dynamic_loss_scale) == ('fp16', 1., False)
    assert (config.flags.amp, config.flags.d_embed, config.flags.tied) == ('fp16', 64, True)
    assert list(config.flags)[:len(parsed)] == list(parsed)   # the log lists the flags in the parser's order


@pytest.mark.parametrize('flags,scale,dynamic', [(['--amp', 'fp16'], None, True),
                                                 (['--fp16', '--dynamic-loss-scale'], None, True),
                                                 (['--fp16', '--static-loss-scale', '8'], 8., False),
                                                 ([], None, False)])
def test_loss_scaling_as_the_original_and_the_new_flags_mean_it(flags, scale, dynamic):
    config = parse(flags)
    assert (config.static_loss_scale, config.dynamic_loss_scale) == (scale, dynamic)


def test_the_run_configuration_is_read_only():
    config = parse([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.
    with pytest.raises(AttributeError):
        config.flags.lr = 1.
    with pytest.raises(TypeError):
        config.flags['lr'] = 1.


@pytest.mark.parametrize('flags,message', [(['--fp16', '--amp', 'bf16'], 'contradicts --amp bf16'),
                                           (['--batch_chunk', '7'], 'must divide --batch_size'),
                                           (['--moe', '--moe-gate', 'switch'], '--moe-gate switch routes to exactly 1 expert')])
def test_a_contradictory_command_line_is_a_config_error(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(flags)
