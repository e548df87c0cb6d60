"""compat/fmoe, FastMoE's names on this repository's MoE layer: FastMoE's own example model
(../shared/reference/fastmoe/examples/transformer-xl/mem_transformer.py, skipped when absent) builds on it,
exchanges state dicts with this repository's MemTransformerLM and gives the same per-token losses; the gates'
constructor order; FMoE with experts of one's own against a token-by-token loop; the refusals; a user's own moe.py
first on sys.path. FastMoE's own test suite runs in tests/test_fastmoe_suite.py."""
import importlib.util
import subprocess
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
    with torch.no_grad():
        _, moe_stats = ours(data[:5], data[1:6], return_moe_stats=True)
    assert ((ours.moe_load(moe_stats) > 0).sum(1) > 1).all()


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
    loss this repository's layer returns in its MoEStats for the same weights and noise."""
    gate_class = getattr(fmoe.gates, gate_name)
    torch.manual_seed(0)
    shim = fmoe.FMoETransformerMLP(num_expert=4, d_model=16, d_hidden=24, top_k=top_k, gate=gate_class).train()
    plain = moe.FMoETransformerMLP(4, 16, 24, top_k=top_k, gate=gate_name[:-4].lower()).train()
    plain.load_state_dict(shim.state_dict(), strict=True)
    assert not shim.gate.has_loss and shim.gate.get_loss() is None
    x = torch.randn(20, 16)
    torch.manual_seed(1)
    shim(x)
    assert shim.gate.has_loss
    loss = shim.gate.get_loss(clear=False)
    assert shim.gate.has_loss and loss.requires_grad and loss > 0
    torch.manual_seed(1)
    stats = plain(x)[1]
    if gate_name != 'SwitchGate':   # the shim's Switch jitter is FastMoE's expression, which rounds otherwise
        torch.testing.assert_close(loss, stats.balance_loss, rtol=0, atol=0)
    assert shim.gate.get_loss() is loss
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


@pytest.mark.parametrize('make,message', [
    (lambda fmoe: fmoe.FMoETransformerMLP(4, 8, 12, expert=nn.Linear), 'FMoETransformerMLP(expert=...) is not'),
    (lambda fmoe: fmoe.gates.GShardGate(8, 4, 1, 3), 'GShardGate(topk=3) is not supported: GShardGate routes to '
                                                     'exactly 2'),
    (lambda fmoe: fmoe.gates.SwitchGate(8, 4, 2), 'SwitchGate(world_size=2) is not supported'),
    (lambda fmoe: fmoe.gates.SwipeGate(8, 4, 1).train()(torch.randn(3, 8)), 'SwipeGate in training mode'),
])
def test_unsupported_options_raise_one_clear_error(fmoe, make, message):
    with pytest.raises(fmoe.Unsupported) as error:
        make(fmoe)
    assert message in str(error.value) and '\n' not in str(error.value)
    assert str(error.value).startswith('fmoe (compat/fmoe): ')


@pytest.mark.parametrize('statement,message', [
    ('from fmoe.functions import MOEScatter', 'fmoe.functions.MOEScatter is not supported'),
    ('from fmoe.functions import count_by_gate', 'fmoe.functions.count_by_gate is not supported'),
    ('import fmoe.fastermoe', 'smart schedule, expert shadowing'),
    ('from fmoe.gates.faster_gate import FasterGate', 'fmoe.gates.faster_gate'),
    ('from fmoe.megatron import fmoefy', 'fmoe.megatron.fmoefy is not supported'),
    ('from fmoe.megatron.layers import MegatronMLP', 'fmoe.megatron.layers.MegatronMLP is not supported'),
])
def test_refused_names_raise_one_line_import_errors(fmoe, statement, message):
    with pytest.raises(ImportError) as error:
        exec(statement, {})
    assert message in str(error.value) and '\n' not in str(error.value)


def test_expert_parallelism_needs_torch_distributed(fmoe):
    with pytest.raises(RuntimeError, match='needs torch.distributed initialized'):
        fmoe.FMoE(num_expert=2, d_model=8, world_size=2, expert=nn.Linear)


def test_a_folder_with_its_own_moe_py_first_on_sys_path_imports_fmoe(tmp_path):
    """FastMoE's tests/ (like many users' folders) holds a moe.py; it comes first on sys.path, and fmoe must still
    run on this repository's moe.py (found by its path), leaving the name `moe` to the user's module."""
    (tmp_path / 'moe.py').write_text('NAME = "the user\'s moe"\n')
    (tmp_path / 'utils.py').write_text('NAME = "the user\'s utils"\n')
    script = (
        'import sys, torch, fmoe, fmoe.gates\n'
        'assert "moe" not in sys.modules and "utils" not in sys.modules\n'
        'import moe, utils\n'
        'assert moe.NAME == "the user\'s moe", moe.__file__\n'
        'assert utils.NAME == "the user\'s utils", utils.__file__\n'
        'layer = fmoe.FMoETransformerMLP(num_expert=4, d_model=8, d_hidden=16, gate=fmoe.gates.GShardGate)\n'
        'print(tuple(layer(torch.randn(5, 8)).shape))\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / 'compat')]))
    out = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '(5, 8)'


def test_the_repositorys_moe_module_is_shared_when_already_imported(fmoe):
    from fmoe import _repo
    assert _repo.moe is moe   # one module object: isinstance checks agree with the repository's code
    assert isinstance(fmoe.gates.NaiveGate(8, 4, 1), moe.NaiveGate)


def brute_force(layer, x):
    """Token by token, copy by copy: sum_j score_j * expert_j(x) with the gate's own (index, score)."""
    expert, score = layer.gate(x)
    expert, score = expert.reshape(x.shape[0], -1), score.reshape(x.shape[0], -1)
    rows = []
    for n in range(x.shape[0]):
        rows.append(sum(score[n, j] * layer.experts[int(expert[n, j])](x[n:n + 1], None)[0]
                        for j in range(expert.shape[1]) if expert[n, j] >= 0))
    return torch.stack(rows)


class Expert(nn.Module):
    def __init__(self, d_model, width=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, width * d_model), nn.Tanh(), nn.Linear(width * d_model, d_model))

    def forward(self, x, fwd_expert_count=None):
        return self.net(x)


@pytest.mark.parametrize('top_k', [1, 2, 3])
def test_fmoe_with_a_list_of_experts_matches_a_token_by_token_loop(fmoe, top_k):
    torch.manual_seed(0)
    hooked = []
    layer = fmoe.FMoE(num_expert=None, d_model=8, top_k=top_k, expert=[Expert, lambda d: Expert(d, 2), Expert, Expert],
                      gate_hook=lambda *args: hooked.append(args))
    assert len(layer.experts) == layer.num_expert == 4 and layer.gate.gate.weight.shape == (4, 8)
    x = torch.randn(11, 8, requires_grad=True)
    out = layer(x)
    assert len(hooked) == 1 and hooked[0][0].shape == (11, top_k) and hooked[0][2] is None
    torch.testing.assert_close(out, brute_force(layer, x))
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(brute_force(layer, x).square().sum(), x)[0])


def test_masked_tokens_skip_the_experts_and_take_mask_dicts_value(fmoe):
    torch.manual_seed(0)
    mask = torch.tensor([0, 1, 0, 2, 0, 3])
    fill = {1: torch.full((8,), 2.0), 2: torch.arange(8.0)}
    layer = fmoe.FMoE(num_expert=3, d_model=8, top_k=2, expert=Expert, mask=mask, mask_dict=fill)
    x = torch.randn(6, 8)
    out = layer(x)
    expected = brute_force(layer, x)
    score = layer.gate(x)[1]
    expected[1], expected[3], expected[5] = score[1].sum() * fill[1], score[3].sum() * fill[2], 0
    torch.testing.assert_close(out, expected)


def test_fused_experts_index_one_by_one_as_fastmoes_list(fmoe):
    torch.manual_seed(0)
    layer = fmoe.FMoETransformerMLP(num_expert=3, d_model=8, d_hidden=16, activation=nn.ReLU())
    assert len(layer.experts) == 3 and len(list(layer.experts)) == 3
    second = layer.experts[1]
    assert second.htoh4.weight.shape == (1, 16, 8) and second.h4toh.bias.shape == (1, 8)
    x = torch.randn(4, 8)
    w1, b1 = layer.experts.htoh4.weight[1], layer.experts.htoh4.bias[1]
    w2, b2 = layer.experts.h4toh.weight[1], layer.experts.h4toh.bias[1]
    torch.testing.assert_close(second(x), torch.relu(x @ w1.T + b1) @ w2.T + b2)
    with torch.no_grad():
        layer.experts[-1].htoh4.weight.data.fill_(0.5)   # writes reach the fused parameter
    assert (layer.experts.htoh4.weight[2] == 0.5).all()
    with pytest.raises(IndexError, match='expert index 3 out of range for 3 experts'):
        layer.experts[3]


def test_fastmoe_per_expert_state_dicts_load_into_the_fused_experts(fmoe):
    """FastMoE >= 1.0.1 saves experts.{i}.htoh4.weight [1, out, in]; the shim's layer stacks them."""
    torch.manual_seed(0)
    layer = fmoe.FMoETransformerMLP(num_expert=3, d_model=8, d_hidden=16)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith('experts.')}
    for i, expert in enumerate(layer.experts):
        state.update({f'experts.{i}.{name}': value.detach().clone() + 1 for name, value in expert.named_parameters()})
    other = fmoe.FMoETransformerMLP(num_expert=3, d_model=8, d_hidden=16)
    other.load_state_dict(state, strict=True)
    torch.testing.assert_close(other.experts.h4toh.weight, layer.experts.h4toh.weight + 1)
