"""compat/fmoe, FastMoE's names on this repository's MoE layer: FastMoE's own example model
(../shared/reference/fastmoe/examples/transformer-xl/mem_transformer.py, skipped when absent) builds on it,
exchanges state dicts with this repository's MemTransformerLM and gives the same per-token losses; the gates'
constructor order and the options that are not supported."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mem_transformer import MemTransformerLM, init_weights
import moe

REPO = Path(__file__).resolve().parents[1]
FASTMOE = Path(os.environ.get('FASTMOE_REFERENCE', REPO / '..' / 'shared' / 'reference' / 'fastmoe'))
EXAMPLE = FASTMOE / 'examples' / 'transformer-xl'


@pytest.fixture
def fmoe(monkeypatch):
    """The shim package, imported as a FastMoE user's script would with compat/ on the path."""
    monkeypatch.syspath_prepend(str(REPO / 'compat'))
    others = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split('.')[0] == 'fmoe'}
    import fmoe
    import fmoe.gates  # noqa: F401
    yield fmoe
    for name in [name for name in sys.modules if name.split('.')[0] == 'fmoe']:
        del sys.modules[name]
    sys.modules.update(others)


@pytest.fixture
def example(fmoe, monkeypatch):
    """FastMoE's example mem_transformer.py, unmodified, imported under another name (this repository has its own
    mem_transformer). Its utils/proj_adaptive_softmax.py parses torch.version.cuda at import, which is None on
    CPU builds: a version is set while it imports (the modern-torch patch the reference README lists)."""
    if not (EXAMPLE / 'mem_transformer.py').is_file():
        pytest.skip(f'FastMoE\'s example is not at {EXAMPLE} (set FASTMOE_REFERENCE)')
    monkeypatch.syspath_prepend(str(EXAMPLE / 'utils'))
    helpers = ('proj_adaptive_softmax', 'log_uniform_sampler')
    before = {name: sys.modules.pop(name) for name in helpers if name in sys.modules}
    with monkeypatch.context() as patch:
        patch.setattr(torch.version, 'cuda', torch.version.cuda or '12.1')
        spec = importlib.util.spec_from_file_location('fastmoe_example_mem_transformer',
                                                      EXAMPLE / 'mem_transformer.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    yield module
    for name in helpers:
        sys.modules.pop(name, None)
    sys.modules.update(before)


def segment_losses(model, data, tgt_len=5):
    mems, losses = (), []
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, tgt_len):
            out = model(data[i:i + tgt_len], data[i + 1:i + 1 + tgt_len], *mems)
            losses.append(out[0])
            mems = out[1:]
    return torch.cat(losses)


def randomise(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize('kw', [dict(), dict(pre_lnorm=True), dict(same_length=True, clamp_len=3),
                                dict(attn_type=1)], ids=['post-ln', 'pre-ln', 'same-length-clamp', 'attn1'])
def test_fastmoes_example_runs_on_the_shim_like_this_repositorys_model(example, fmoe, kw):
    config = dict(n_token=40, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=24, dropout=0.0, dropatt=0.0,
                  tgt_len=5, ext_len=0, mem_len=7, moe=True, moe_num_expert=4, moe_top_k=2, **kw)
    theirs = example.MemTransformerLM(**config)
    assert all(isinstance(layer.pos_ff, fmoe.FMoETransformerMLP) and isinstance(layer.pos_ff.gate,
                                                                                 fmoe.gates.NaiveGate)
               for layer in theirs.layers)
    ours = randomise(init_weights(MemTransformerLM(**config)), seed=0)
    data = torch.randint(0, 40, (16, 3), generator=torch.Generator().manual_seed(0))

    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    torch.testing.assert_close(segment_losses(theirs, data), segment_losses(ours, data), rtol=1e-6, atol=1e-6)

    randomise(theirs, seed=1)  # and back: their weights into this repository's model
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(segment_losses(ours, data), segment_losses(theirs, data), rtol=1e-6, atol=1e-6)
    # the routing differs from token to token, so every expert's weights count
    segment_losses(ours, data)
    assert ((ours.moe_load() > 0).sum(1) > 1).all()


@pytest.mark.parametrize('gate_name,top_k', [('NaiveGate', 2), ('GShardGate', 2), ('SwitchGate', 1)])
def test_gates_in_fastmoes_order_route_as_this_repositorys(fmoe, gate_name, top_k):
    gate_class = getattr(fmoe.gates, gate_name)
    gate = gate_class(16, 4, 1, top_k)  # FastMoE's order: d_model, num_expert, world_size, top_k
    assert gate.gate.weight.shape == (4, 16) and gate.top_k == top_k

    torch.manual_seed(0)
    shim = fmoe.FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=top_k, gate=gate_class,
                                   activation=nn.ReLU(), expert_dp_comm='dp').eval()
    assert type(shim.gate) is gate_class
    plain = moe.FMoETransformerMLP(4, 16, 24, activation=nn.ReLU(), top_k=top_k,
                                   gate={'NaiveGate': 'naive', 'GShardGate': 'gshard', 'SwitchGate': 'switch'}
                                   [gate_name]).eval()
    plain.load_state_dict(shim.state_dict(), strict=True)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(shim(x), plain(x)[0], rtol=0, atol=0)
    assert shim(x).shape == x.shape


@pytest.mark.parametrize('gate_name,top_k', [('GShardGate', 2), ('SwitchGate', 1), ('NoisyGate', 2)])
def test_gates_keep_fastmoes_loss_accessors(fmoe, gate_name, top_k):
    """Code written against fmoe.gates reads the balance loss with gate.get_loss() after a forward; it is the
    loss this repository's layer returns in its MoEStats."""
    gate_class = getattr(fmoe.gates, gate_name)
    torch.manual_seed(0)
    shim = fmoe.FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=top_k, gate=gate_class).train()
    assert not shim.gate.has_loss and shim.gate.get_loss() is None
    x = torch.randn(20, 16)
    torch.manual_seed(1)
    shim(x)
    assert shim.gate.has_loss
    loss = shim.gate.get_loss(clear=False)
    assert shim.gate.has_loss and loss.requires_grad and loss > 0
    torch.manual_seed(1)
    stats = moe.FMoETransformerMLP.forward(shim, x)[1]
    assert shim.gate.get_loss() is not loss and torch.equal(loss, stats.balance_loss)
    assert not shim.gate.has_loss   # get_loss() clears, as FastMoE's


def test_noisy_gate_in_fastmoes_order_has_its_parameters_and_routes_as_this_repositorys(fmoe):
    gate = fmoe.gates.NoisyGate(16, 4, 1, 2)
    assert gate.w_gate.shape == gate.w_noise.shape == (16, 4) and gate.top_k == 2
    shim = fmoe.FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=2, gate=fmoe.gates.NoisyGate,
                                   activation=nn.ReLU()).eval()
    plain = moe.FMoETransformerMLP(4, 16, 24, activation=nn.ReLU(), top_k=2, gate='noisy').eval()
    plain.load_state_dict(shim.state_dict(), strict=True)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(shim(x), plain(x)[0], rtol=0, atol=0)


def test_a_subclass_calls_super_as_fastmoes_example_does(fmoe):
    class Customized(fmoe.FMoETransformerMLP):
        def __init__(self):
            super().__init__(num_expert=3, d_model=8, d_hidden=12, top_k=2, activation=nn.ReLU())
            self.layer_norm = nn.LayerNorm(8)

        def forward(self, inp):
            return self.layer_norm(inp + super().forward(inp))

    layer = Customized()
    x = torch.randn(4, 2, 8)
    mixture = fmoe.FMoETransformerMLP.forward(layer, x)
    torch.testing.assert_close(layer(x), layer.layer_norm(x + mixture))
    assert set(layer.state_dict()) >= {'gate.gate.weight', 'experts.htoh4.weight', 'experts.h4toh.weight'}


@pytest.mark.parametrize('option,value,message', [
    ('world_size', 2, 'world_size=2 is not supported'),
    ('moe_group', object(), 'moe_group=<object'),
    ('slice_group', object(), 'slice_group=<object'),
    ('gate_hook', print, 'gate_hook=<built-in function print> is not supported'),
    ('mask', torch.zeros(3), 'mask=tensor'),
    ('expert', nn.Linear, 'expert=<class'),
    ('gate', nn.Linear, "gate='Linear' is not supported: use fmoe.gates.NaiveGate"),
])
def test_unsupported_options_raise_one_clear_error(fmoe, option, value, message):
    with pytest.raises(fmoe.Unsupported, match=None) as error:
        fmoe.FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=12, **{option: value})
    assert message in str(error.value) and '\n' not in str(error.value)
    assert str(error.value).startswith('fmoe (compat/fmoe): ')
    with pytest.raises(fmoe.Unsupported, match='routes to 2 experts'):
        fmoe.gates.GShardGate(8, 4, 1, 3)
