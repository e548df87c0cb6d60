"""The MoE layer against a slow per-token reference, hand-computed losses and finite differences."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe
from moe import GATES, FMoETransformerMLP, NoisyGate, grouped_mm_available

TOP_K = {'naive': 2, 'gshard': 2, 'switch': 1, 'noisy': 2, 'auxfree': 2}
HAS_GROUPED_MM = grouped_mm_available('cpu', torch.float32)
FAST_PATHS = ['tiles'] + (['grouped_mm'] if HAS_GROUPED_MM else [])   # the no-host-sync paths
BACKENDS = ['slices'] + FAST_PATHS


def make_layer(gate='naive', num_expert=6, d_model=16, d_hidden=24, top_k=None, seed=0, **kw):
    torch.manual_seed(seed)
    layer = FMoETransformerMLP(num_expert, d_model, d_hidden, activation=nn.ReLU(),
                               top_k=TOP_K[gate] if top_k is None else top_k, gate=gate, **kw)
    router = getattr(layer.gate, 'gate', None)
    with torch.no_grad():   # give biases non-zero values so that they are tested too
        for p in layer.parameters():
            if p.dim() <= 2 and (router is None or p is not router.weight):
                p.normal_(0, 0.3)
        if gate == 'auxfree':   # a selection bias large enough to change choices
            layer.gate.expert_bias.normal_(0, 1)
    return layer


def clean_logits(gate, x):
    """[N][E] router logits as Python floats, one dot product at a time."""
    n_tok, n_exp = x.shape[0], gate.num_expert
    if isinstance(gate, NoisyGate):
        return [[float(x[n] @ gate.w_gate[:, e]) for e in range(n_exp)] for n in range(n_tok)]
    return [[float(x[n] @ gate.gate.weight[e] + gate.gate.bias[e]) for e in range(n_exp)]
            for n in range(n_tok)]


def noisy_logits(gate, x, logits, training):
    """NoisyGate's logits with its training noise replayed (drawn first, [N, E] standard normals),
    and the noise scale per token and expert (None in evaluation)."""
    if not training:
        return logits, None
    noise = torch.randn(x.shape[0], gate.num_expert)
    std = [[math.log1p(math.exp(float(x[n] @ gate.w_noise[:, e]))) + 0.01 for e in range(gate.num_expert)]
           for n in range(x.shape[0])]
    return ([[v + float(noise[n, e]) * std[n][e] for e, v in enumerate(row)] for n, row in enumerate(logits)],
            std)


# ----------------------------------------------------------------------------- slow reference

def reference_routes(layer, x, seed):
    """Per-token routing by the documented rules, in plain Python. Returns [(expert, score)] per token
    (dropped copies omitted) and the number of capacity drops. Replays the layer's random draws:
    switch draws its jitter first, gshard its routing coin after the capacity limit."""
    gate, n_tok, n_exp = layer.gate, x.shape[0], layer.num_expert
    torch.manual_seed(seed)
    logits = clean_logits(gate, x)
    training = layer.training
    if layer.gate_type == 'switch':
        if training:
            noise = torch.rand(n_tok, n_exp) * (2 * gate.switch_eps) + (1 - gate.switch_eps)
            logits = [[v + float(noise[n, e]) for e, v in enumerate(row)] for n, row in enumerate(logits)]
        choices = []
        for row in logits:
            z = sum(math.exp(v) for v in row)
            best = max(range(n_exp), key=lambda e: row[e])
            choices.append([(best, math.exp(row[best]) / z)])
        capacity = math.ceil(gate.capacity[0 if training else 1] * n_tok / n_exp)
    else:
        if layer.gate_type == 'noisy':
            logits = noisy_logits(gate, x, logits, training)[0]
        bias = gate.expert_bias.tolist() if layer.gate_type == 'auxfree' else [0.] * n_exp
        choices = []
        for row in logits:   # the bias picks the experts; the scores ignore it
            top = sorted(range(n_exp), key=lambda e: -(row[e] + bias[e]))[:layer.top_k]
            z = sum(math.exp(row[e]) for e in top)
            choices.append([(e, math.exp(row[e]) / z) for e in top])
        capacity = (math.ceil(gate.capacity[0 if training else 1] * n_tok) * 2 // n_exp
                    if layer.gate_type == 'gshard' else None)

    used, dropped, routes = [0] * n_exp, 0, []
    for copies in choices:                      # token-major: earlier tokens win
        kept = []
        for e, s in copies:
            if capacity is not None and used[e] >= capacity:
                dropped += 1
                kept.append(None)
            else:
                used[e] += 1
                kept.append((e, s))
        routes.append(kept)
    if layer.gate_type == 'gshard' and training and gate.random_routing:
        coin = torch.rand(n_tok)
        for n, kept in enumerate(routes):
            if 2 * choices[n][1][1] < float(coin[n]):
                if kept[1] is not None:
                    used[kept[1][0]] -= 1
                kept[1] = None
    routes = [[c for c in kept if c is not None] for kept in routes]
    return routes, dropped, used


def reference_expert(layer, e, v):
    ex = layer.experts
    h = torch.relu(ex.htoh4.weight[e] @ v + ex.htoh4.bias[e])
    return ex.h4toh.weight[e] @ h + ex.h4toh.bias[e]


def reference_output(layer, x, seed):
    routes, dropped, load = reference_routes(layer, x, seed)
    out = torch.zeros_like(x)
    for n, copies in enumerate(routes):
        for e, s in copies:
            out[n] += s * reference_expert(layer, e, x[n])
    return out, routes, dropped, load


def run_layer(layer, x, seed):
    """The layer's output and MoEStats, with the random stream at `seed`."""
    torch.manual_seed(seed)
    return layer(x)


# ----------------------------------------------------------------------------- output and routing

@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('training', [True, False])
@pytest.mark.parametrize('gate', GATES)
def test_output_matches_slow_reference(gate, training, backend):
    layer = make_layer(gate, expert_backend=backend).train(training)
    x = torch.randn(40, 16)
    out, stats = run_layer(layer, x, seed=7)
    with torch.no_grad():
        ref, routes, dropped, load = reference_output(layer, x, seed=7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.load.tolist() == load
    assert stats.dropped.item() == dropped
    if gate == 'naive':
        assert dropped == 0 and sum(load) == 40 * 2


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('gate', ['gshard', 'switch'])
def test_capacity_drops_contribute_exactly_zero(gate, backend):
    # a gate bias that sends every token to expert 0 first overflows its capacity
    layer = make_layer(gate, random_routing=False, expert_backend=backend).eval()
    with torch.no_grad():
        layer.gate.gate.bias.copy_(torch.tensor([9., 5., 0., 0., 0., 0.]))
    x = torch.randn(30, 16, requires_grad=True)
    out, stats = layer(x)
    with torch.no_grad():
        ref, routes, dropped, _ = reference_output(layer, x, seed=0)
    assert dropped > 0 and stats.dropped.item() == dropped
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    fully_dropped = [n for n, copies in enumerate(routes) if not copies]
    assert fully_dropped, 'the example must drop whole tokens'
    assert out[fully_dropped].eq(0).all()
    out.sum().backward()
    assert x.grad[fully_dropped].eq(0).all()   # no gradient through a dropped copy


@pytest.mark.parametrize('backend', BACKENDS)
def test_top_k_equal_num_expert_with_identical_experts_is_a_dense_ffn(backend):
    layer = make_layer('naive', num_expert=4, top_k=4, expert_backend=backend)
    ex = layer.experts
    with torch.no_grad():
        for p in (ex.htoh4.weight, ex.htoh4.bias, ex.h4toh.weight, ex.h4toh.bias):
            p.copy_(p[:1].expand_as(p))
    x = torch.randn(3, 5, 16)
    dense = F.linear(torch.relu(F.linear(x, ex.htoh4.weight[0], ex.htoh4.bias[0])),
                     ex.h4toh.weight[0], ex.h4toh.bias[0])
    torch.testing.assert_close(layer(x)[0], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('gate,training', [('naive', True), ('gshard', False), ('switch', False),
                                           ('noisy', True), ('auxfree', True)])
def test_gradcheck_float64(gate, training):
    layer = make_layer(gate, num_expert=4, d_model=4, d_hidden=5).double().train(training)
    if gate == 'gshard':   # eval capacity ceil(0.6 * 7) * 2 // 4 = 2: copies get dropped
        layer.gate.capacity = (1.2, 0.6)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        torch.manual_seed(0)   # the same noise (noisy gate) at every evaluation
        out, stats = torch.func.functional_call(layer, dict(zip(names, params)), (x,))
        return out, stats.balance_loss, stats.z_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
    if gate == 'gshard':
        assert run_layer(layer, x, seed=0)[1].dropped.item() > 0


# ----------------------------------------------------------------------------- losses

def tiny_layer(gate, logits, capacity_factor=(1.2, 2.4)):
    """A layer whose gate logits equal its input (identity gate weight, zero bias)."""
    n_exp = len(logits[0])
    layer = FMoETransformerMLP(n_exp, n_exp, 8, top_k=TOP_K[gate], gate=gate,
                               capacity_factor=capacity_factor).eval()
    with torch.no_grad():
        layer.gate.gate.weight.copy_(torch.eye(n_exp))
        layer.gate.gate.bias.zero_()
    return layer, torch.tensor(logits)


def softmax_row(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


LOGITS = [[2., 1., 0.], [0., 3., 1.], [1., 0., -1.], [0., .5, 2.]]


def test_gshard_balance_loss_by_hand():
    layer, x = tiny_layer('gshard', LOGITS)
    stats = layer(x)[1]
    c = [2 / 4, 1 / 4, 1 / 4]                   # top-1 experts: 0, 1, 0, 2
    m = [sum(softmax_row(r)[e] for r in LOGITS) / 4 for e in range(3)]
    expected = sum(ci * mi for ci, mi in zip(c, m)) / 3 * 3 ** 2
    assert stats.balance_loss.item() == pytest.approx(expected, rel=1e-6)
    assert layer.gate(x).balance_loss.item() == stats.balance_loss.item()   # the gate returns it


def test_switch_balance_loss_by_hand_with_a_drop():
    # eval capacity ceil(0.75 * 4 / 3) = 1: token 2 (top-1 expert 0, like token 0) is dropped;
    # kept fractions are 1/3 each and the prob mass per expert is its column sum / 3, so
    # loss = 3 * sum_e (1/3) * colsum_e / 3 = (total prob mass) / 3 = 4 / 3.
    layer, x = tiny_layer('switch', LOGITS, capacity_factor=(1.2, 0.75))
    out, stats = layer(x)
    assert stats.balance_loss.item() == pytest.approx(4 / 3, rel=1e-6)
    assert stats.dropped.item() == 1 and stats.load.tolist() == [1, 1, 1]
    assert out[2].eq(0).all() and out[[0, 1, 3]].ne(0).any(dim=1).all()


def test_naive_balance_loss_is_zero_and_z_loss_by_hand():
    layer, x = tiny_layer('naive', LOGITS)
    layer.top_k = layer.gate.top_k = 2
    stats = layer(x)[1]
    assert stats.balance_loss.item() == 0
    z = [math.log(sum(math.exp(v) for v in r)) ** 2 for r in LOGITS]
    assert stats.z_loss.item() == pytest.approx(sum(z) / 4, rel=1e-6)


@pytest.mark.parametrize('gate', GATES)
def test_the_layer_keeps_no_tensor_between_forwards(gate):
    """What a forward computes leaves through its return value only: no tensor attribute on the layer or its
    modules afterwards (parameters and buffers aside), so a second forward cannot see the first's routing."""
    layer = make_layer(gate).train()
    before = {name: set(vars(m)) for name, m in layer.named_modules()}
    stats = layer(torch.randn(20, 16))[1]
    assert isinstance(stats, moe.MoEStats) and stats.load.sum() > 0
    for name, module in layer.named_modules():
        assert set(vars(module)) == before[name], name
        assert not [k for k, v in vars(module).items() if torch.is_tensor(v)], name


def test_losses_are_in_the_graph():
    layer = make_layer('gshard').train()
    stats = layer(torch.randn(20, 16))[1]
    (stats.balance_loss + stats.z_loss).backward()
    assert layer.gate.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- backends

@pytest.mark.parametrize('path', FAST_PATHS)
@pytest.mark.parametrize('gate', GATES)
def test_fast_paths_equal_slices_fp32(gate, path):
    """Output, input and every parameter gradient of each no-host-sync path against the per-expert slices."""
    x = torch.randn(64, 32)
    results = {}
    for backend in (path, 'slices'):
        layer = make_layer(gate, num_expert=8, d_model=32, d_hidden=64, expert_backend=backend).train()
        xb = x.clone().requires_grad_()
        out = run_layer(layer, xb, seed=3)[0]
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        results[backend] = [out, xb.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(results[path], results['slices']):
        assert (a - b).abs().max() < 1e-5


def nan_past_the_groups(real):
    """grouped_mm writing NaN into the output rows past the last group end (which the kernel leaves
    undefined: uninitialised memory on CPUs), as garbage there may be."""
    def grouped_mm(a, b, offs):
        out = real(a, b, offs=offs)
        if out.dim() == 2:   # [rows, out]: the forward and the input gradient
            past = torch.arange(out.shape[0], device=out.device) >= offs[-1]
            out = out.masked_fill(past[:, None], float('nan'))
        return out
    return grouped_mm


@pytest.mark.parametrize('path', FAST_PATHS)
@pytest.mark.parametrize('gate,training', [('gshard', True), ('gshard', False), ('switch', True)])
def test_fast_paths_with_capacity_drops_keep_static_rows_and_equal_slices(gate, training, path, monkeypatch):
    """The sync-free paths: the dropped copies stay as padding rows after the last expert's (N * k rows whatever
    the drops, no count read back to the host) and give exactly zero output and gradient, even where the
    grouped_mm kernel leaves NaN in those rows (the tiles send them to a spare zero row). Outputs, input and
    parameter gradients equal the slices path, which cuts the dropped copies off; tokens that lost every copy
    get zero output and zero gradient on both."""
    monkeypatch.setattr(moe, 'grouped_mm', nan_past_the_groups(moe.grouped_mm))
    x = torch.randn(48, 16)
    grad_out = torch.randn(48, 16)
    results = {}
    for backend in (path, 'slices'):
        layer = make_layer(gate, capacity_factor=(0.5, 0.5), expert_backend=backend).train(training)
        xb = x.clone().requires_grad_()
        out, stats = run_layer(layer, xb, seed=11)
        (out * grad_out).sum().backward()
        results[backend] = [out, xb.grad] + [p.grad for p in layer.parameters()]
        assert stats.dropped > 0
    with torch.no_grad():
        torch.manual_seed(11)
        routing = layer.gate(x)
    plan = moe.dispatch(routing, 6, need_host_counts=False)
    assert plan.padded and plan.num_rows == plan.num_copies == 48 * TOP_K[gate] > plan.counts.sum()
    lost = (routing.expert < 0).all(1)
    assert lost.any(), 'the example must drop whole tokens'
    for a, b in zip(results[path], results['slices']):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-5
    out, x_grad = results[path][:2]
    assert out[lost].eq(0).all() and x_grad[lost].eq(0).all()


def test_grouped_mm_probe_is_right_under_no_grad(monkeypatch):
    """eval.py, generate.py and moe_report.py call the layer under no_grad first: the probe must still see
    the backward run, and cache the same answer as with gradients."""
    monkeypatch.setattr(moe, '_GROUPED_MM_PROBES', {})
    with torch.no_grad():
        under_no_grad = moe.grouped_mm_available('cpu', torch.float32)
    monkeypatch.setattr(moe, '_GROUPED_MM_PROBES', {})
    assert under_no_grad == moe.grouped_mm_available('cpu', torch.float32)
    assert under_no_grad == (moe.grouped_mm is not None)  # torch 2.8+ runs it on CPUs in fp32
    monkeypatch.setattr(moe, 'grouped_mm', None)
    monkeypatch.setattr(moe, '_GROUPED_MM_PROBES', {})
    assert not moe.grouped_mm_available('cpu', torch.float32)


def test_grouped_mm_on_gpus_only_where_its_fast_kernel_runs():
    fast = {(cap, dtype) for cap in [(8, 0), (8, 9), (9, 0), (10, 0), (12, 0)]
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
            if moe.grouped_mm_fast_on_cuda(cap, dtype)}
    assert fast == {((9, 0), torch.bfloat16), ((10, 0), torch.bfloat16)}


@pytest.mark.skipif(not HAS_GROUPED_MM, reason='grouped_mm does not run here')
def test_experts_without_rows_get_zero_gradients_whatever_the_kernel_leaves(monkeypatch):
    """On sm100 the per-group products leave garbage in the slots of empty groups:
    a kernel that writes NaN there must still give those experts a zero weight and bias gradient."""
    real = moe.grouped_mm

    def garbage_in_empty_groups(a, b, offs):
        out = real(a, b, offs=offs)
        if out.dim() == 3:  # the per-group products of the backward, [groups, ., .]
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
            out = out.masked_fill(empty[:, None, None], float('nan'))
        return out

    monkeypatch.setattr(moe, 'grouped_mm', garbage_in_empty_groups)
    monkeypatch.setattr(moe, 'grouped_mm_zeroes_empty_groups', lambda device: False)   # as on CUDA
    layer = make_layer('naive', num_expert=8, d_model=16, d_hidden=32, top_k=1, expert_backend='grouped_mm').train()
    x = torch.randn(3, 16)  # 3 tokens, top-1: at least 5 of the 8 experts receive none
    out, stats = layer(x)
    out.sum().backward()
    used = stats.load > 0
    for linear in (layer.experts.htoh4, layer.experts.h4toh):
        assert torch.isfinite(linear.weight.grad).all() and torch.isfinite(linear.bias.grad).all()
        assert (linear.weight.grad[~used] == 0).all() and (linear.bias.grad[~used] == 0).all()
        assert (linear.weight.grad[used] != 0).any()


@pytest.mark.parametrize('num_expert', [1, 5])
def test_counts_from_the_sorted_keys_equal_bincount(num_expert):
    expert = torch.randint(-1, num_expert, (200,))
    sorted_key, order, counts = moe.sort_by_expert(expert, num_expert)
    key = torch.where(expert < 0, num_expert, expert)
    assert torch.equal(counts, torch.bincount(key, minlength=num_expert + 1))
    assert torch.equal(sorted_key, key[order])
    assert torch.equal(moe.sort_by_expert(expert[:0], num_expert)[2], torch.zeros(num_expert + 1, dtype=torch.long))


# bf16 tolerance: both paths round inputs and hidden activations to bf16 but accumulate and round
# in different orders. Measured max |grouped - slices| / max|out|: 0.4-0.6% (about one bf16 ulp,
# 2^-8) at 8-64 experts; bf16 vs fp32 0.6-0.7%. The bound below leaves 3x headroom.
BF16_RTOL = 2e-2


@pytest.mark.parametrize('path', ['grouped_mm', 'tiles'])
@pytest.mark.parametrize('gate,capacity', [('naive', 1.2), ('gshard', 0.5)], ids=['naive', 'gshard-drops'])
def test_fast_paths_equal_slices_bf16_autocast(gate, capacity, path, device):
    """Outputs and input gradients; with gshard at capacity 0.5 about half the copies are dropped (padding rows
    on the no-host-sync paths)."""
    if path == 'grouped_mm' and not grouped_mm_available(device, torch.bfloat16):
        pytest.skip(f'grouped_mm does not run bf16 on this {device.type}')
    x = torch.randn(64, 32).to(device)
    outs = {}
    for backend in (path, 'slices'):
        layer = make_layer(gate, num_expert=8, d_model=32, d_hidden=64, capacity_factor=(capacity, capacity),
                           expert_backend=backend).to(device)
        xb = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, stats = run_layer(layer, xb, seed=2)
        out.square().sum().backward()
        assert out.dtype == torch.float32   # combine returns the input's dtype
        assert (stats.dropped > 0) == (gate == 'gshard')
        outs[backend], outs[backend + '_grad'] = out, xb.grad
    for name in ('slices', 'slices_grad'):
        scale = outs[name].abs().max()
        assert torch.isfinite(outs[name.replace('slices', path)]).all()
        assert (outs[name.replace('slices', path)] - outs[name]).abs().max() <= BF16_RTOL * scale
    fp32 = run_layer(layer, x, seed=2)[0]
    assert (outs['slices'] - fp32).abs().max() <= 4 * BF16_RTOL * outs['slices'].abs().max()


def bf16_step(layer, x, seed=2):
    """One bf16-autocast forward and backward of `layer` on a copy of x: (output, input grad, parameter grads)."""
    layer.zero_grad(set_to_none=True)
    xb = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = run_layer(layer, xb, seed)[0]
    out.square().sum().backward()
    return [out, xb.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize('path', FAST_PATHS)
def test_bf16_weight_copy_is_made_once_per_change_and_equals_a_fresh_cast(path, monkeypatch):
    """Under autocast on CPUs the experts read a bf16 copy of their weights, cast once and kept until the parameter
    changes: an optimizer step, load_state_dict, a move. Each step's output and gradients equal, bit for bit and
    through a few optimizer steps, those of a layer that casts afresh at every call (drop_weight_copy), and those
    of the accelerators' rule (keeps_weight_copies False: a cast in the forward, another in the backward)."""
    x = torch.randn(64, 32)
    kept, fresh, recast = (make_layer(num_expert=8, d_model=32, d_hidden=64, expert_backend=path) for _ in range(3))
    optimizers = [torch.optim.Adam(layer.parameters(), lr=1e-2) for layer in (kept, fresh, recast)]
    linears = (kept.experts.htoh4, kept.experts.h4toh)
    for step in range(3):
        copies = [lin.weight_in(torch.bfloat16) for lin in linears]
        for lin in (fresh.experts.htoh4, fresh.experts.h4toh):
            lin.drop_weight_copy()
        got, want = bf16_step(kept, x), bf16_step(fresh, x)
        with monkeypatch.context() as patch:
            patch.setattr(moe, 'keeps_weight_copies', lambda device: False)
            assert recast.experts.htoh4.weight_in(torch.bfloat16) is None
            uncached = bf16_step(recast, x)
        assert recast.experts.htoh4.weight_copy_bytes() == 0
        for a, b, c in zip(got, want, uncached):
            assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c)
        for lin, copy in zip(linears, copies):   # the same copy served the forward and the backward
            assert lin.weight_in(torch.bfloat16) is copy
            assert torch.equal(copy, lin.weight.detach().to(torch.bfloat16))
        for opt in optimizers:
            opt.step()
        for lin, copy in zip(linears, copies):   # the step changed the weights: a new copy, of the new values
            new = lin.weight_in(torch.bfloat16)
            assert new is not copy and torch.equal(new, lin.weight.detach().to(torch.bfloat16))
    lin = kept.experts.htoh4   # fp32 reads the parameter itself
    assert lin.weight_in(torch.float32).data_ptr() == lin.weight.data_ptr()


def test_copies_are_kept_on_cpus_only():
    assert moe.keeps_weight_copies('cpu') and moe.keeps_weight_copies(torch.device('cpu'))
    assert not moe.keeps_weight_copies('cuda') and not moe.keeps_weight_copies(torch.device('cuda', 1))


def test_weight_copy_follows_load_state_dict_moves_and_inference_mode():
    layer = make_layer(num_expert=4, d_model=16, d_hidden=32)
    lin = layer.experts.htoh4
    assert lin.weight_copy_bytes() == 0
    copy = lin.weight_in(torch.bfloat16)
    assert lin.weight_copy_bytes() == 4 * 32 * 16 * 2   # [E, out, in] in bf16
    other = make_layer(num_expert=4, d_model=16, d_hidden=32, seed=1)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(lin.weight_in(torch.bfloat16), other.experts.htoh4.weight.detach().bfloat16())
    assert not torch.equal(copy, lin.weight_in(torch.bfloat16))
    lin.weight.data = lin.weight.detach() * 2   # new storage: seen
    assert torch.equal(lin.weight_in(torch.bfloat16), lin.weight.detach().bfloat16())
    lin.weight.data.mul_(3)                     # through .data, as autograd, unseen until dropped
    lin.drop_weight_copy()
    assert lin.weight_copy_bytes() == 0
    assert torch.equal(lin.weight_in(torch.bfloat16), lin.weight.detach().bfloat16())
    assert 'weight_copy' not in ' '.join(layer.state_dict())
    # A copy made under inference_mode is an inference tensor, which autograd cannot save: a training step
    # after an evaluation under inference_mode makes its own.
    x = torch.randn(8, 16)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x)
    bf16_step(layer, x)[0].sum()
    assert layer.experts.htoh4.weight.grad is not None and torch.isfinite(layer.experts.htoh4.weight.grad).all()


@pytest.mark.parametrize('backend', BACKENDS)
def test_experts_without_tokens_forward_and_backward(backend):
    layer = make_layer('naive', num_expert=8, expert_backend=backend)
    with torch.no_grad():
        layer.gate.gate.bias.copy_(torch.tensor([20., 20., 0, 0, 0, 0, 0, 0]))
    x = torch.randn(10, 16, requires_grad=True)
    out, stats = layer(x)
    assert stats.load.tolist() == [10, 10, 0, 0, 0, 0, 0, 0]
    with torch.no_grad():
        torch.testing.assert_close(out, reference_output(layer, x, seed=0)[0], atol=1e-5, rtol=1e-5)
    out.sum().backward()
    # exact zeros for the experts without rows: on the CPU's grouped_mm (no mask there), the tiles, the slices
    for linear in (layer.experts.htoh4, layer.experts.h4toh):
        w, b = linear.weight.grad, linear.bias.grad
        assert w[2:].eq(0).all() and b[2:].eq(0).all() and w[:2].abs().sum() > 0 and b[:2].abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_all_copies_dropped_and_empty_input():
    layer = make_layer('gshard', num_expert=6).eval()   # 1 token: capacity ceil(2.4) * 2 // 6 = 1
    layer.gate.capacity = (1.2, 0.4)                    # ceil(0.4) * 2 // 6 = 0: all dropped
    x = torch.randn(1, 16, requires_grad=True)
    out, stats = layer(x)
    assert out.eq(0).all() and stats.dropped.item() == 2
    out.sum().backward()
    empty, stats = layer(torch.randn(0, 4, 16))
    assert empty.shape == (0, 4, 16) and stats.load.sum().item() == 0 and stats.balance_loss.item() == 0


# ----------------------------------------------------------------------------- parameters

def test_default_activation_is_each_layers_own_gelu():
    a, b = FMoETransformerMLP(2, 4, 6), FMoETransformerMLP(2, 4, 6)
    assert a.experts.activation is not b.experts.activation  # not one default instance shared by every layer
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(a.experts.activation(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))


def test_fused_parameter_layout_and_init():
    layer = FMoETransformerMLP(5, 16, 24)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {'gate.gate.weight': (5, 16), 'gate.gate.bias': (5,),
                      'experts.htoh4.weight': (5, 24, 16), 'experts.htoh4.bias': (5, 24),
                      'experts.h4toh.weight': (5, 16, 24), 'experts.h4toh.bias': (5, 16)}
    for lin, fan_in in ((layer.experts.htoh4, 24 * 16), (layer.experts.h4toh, 16 * 24)):
        bound = 1 / math.sqrt(fan_in)   # kaiming_uniform(a=sqrt 5) on the 3-D tensor, as FastMoE
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert lin.bias.eq(0).all()


class Block(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.pos_ff = layer


def nested(layer):
    model = nn.Module()
    model.layers = nn.ModuleList([Block(make_layer(seed=99)), Block(layer)])
    return model


def per_expert_state(model):
    """Rewrite a fused state dict the way FastMoE >= 1.0.1 saves it: experts.{i}.*[1, ...]."""
    state = {}
    for key, value in model.state_dict().items():
        if '.experts.' in key:
            head, tail = key.split('.experts.')
            for i in range(value.shape[0]):
                state[f'{head}.experts.{i}.{tail}'] = value[i:i + 1].clone()
        else:
            state[key] = value.clone()
    return state


def test_per_expert_state_dict_converts_and_loads_strict():
    source = nested(make_layer(seed=1))
    state = per_expert_state(source)
    assert 'layers.1.pos_ff.experts.5.h4toh.bias' in state
    assert state['layers.1.pos_ff.experts.0.htoh4.weight'].shape == (1, 24, 16)
    target = nested(make_layer(seed=2))
    target.load_state_dict(state, strict=True)
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_incomplete_per_expert_state_dict_is_an_error():
    state = per_expert_state(nested(make_layer(seed=1)))
    del state['layers.1.pos_ff.experts.3.htoh4.weight']
    with pytest.raises(RuntimeError, match=r'layers\.1\.pos_ff\.experts\.htoh4\.weight.*5 of 6'):
        nested(make_layer(seed=2)).load_state_dict(state)


# ----------------------------------------------------------------------------- configuration errors

# The options' own checks are MoEConfig's (tests/test_config.py); the layer's keywords reach them.
@pytest.mark.parametrize('kwargs,match', [
    (dict(top_k=7), r'^top_k=7: must be between 1 and num_expert=6$'),
    (dict(capacity_factor=(1.2,)), r'capacity_factor.*\(1\.2,\)'),
    (dict(capacity_factor=(1.2, -1)), r'capacity_factor'),
    (dict(capacity_factor=1.2), r'capacity_factor.*1\.2'),
])
def test_bad_configuration_raises_value_error(kwargs, match):
    args = dict(num_expert=6, d_model=8, d_hidden=8, top_k=2) | kwargs
    with pytest.raises(ValueError, match=match):
        FMoETransformerMLP(**args)


def test_wrong_input_width_and_backend_are_value_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match='d_model=16'):
        layer(torch.randn(3, 8))
    with pytest.raises(ValueError, match="expert_backend must be one of auto, grouped_mm, tiles, slices, got 'fast'"):
        make_layer(expert_backend='fast')


# ----------------------------------------------------------------------------- newer gates and shared experts

def cv_squared_by_hand(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / (mean ** 2 + 1e-10)


@pytest.mark.parametrize('training', [True, False])
def test_noisy_gate_importance_and_load_losses_by_hand(training):
    layer = make_layer('noisy', num_expert=5).train(training)
    x = torch.randn(12, 16)
    stats = run_layer(layer, x, seed=4)[1]
    gate, n_exp, k = layer.gate, 5, 2
    with torch.no_grad():
        torch.manual_seed(4)
        clean = clean_logits(gate, x)
        noisy, std = noisy_logits(gate, x, clean, training)
    importance, load = [0.] * n_exp, [0.] * n_exp
    for n, row in enumerate(noisy):
        ranked = sorted(range(n_exp), key=lambda e: -row[e])
        z = sum(math.exp(row[e]) for e in ranked[:k])
        for e in ranked[:k]:
            importance[e] += math.exp(row[e]) / z
            if not training:
                load[e] += 1
        if training:   # P(in the top k with fresh noise): beat the (k+1)-th value if in, the k-th if out
            for e in range(n_exp):
                threshold = row[ranked[k]] if e in ranked[:k] else row[ranked[k - 1]]
                load[e] += 0.5 * (1 + math.erf((clean[n][e] - threshold) / std[n][e] / math.sqrt(2)))
    want = cv_squared_by_hand(importance) + cv_squared_by_hand(load)
    assert stats.balance_loss.item() == pytest.approx(want, rel=1e-5)
    assert stats.balance_loss.requires_grad


def test_noisy_gate_has_fastmoes_parameters_and_no_noise_in_evaluation():
    layer = make_layer('noisy', num_expert=5)
    assert {n for n, _ in layer.gate.named_parameters()} == {'w_gate', 'w_noise'}
    assert layer.gate.w_gate.shape == (16, 5)
    layer.eval()
    x = torch.randn(9, 16)
    torch.testing.assert_close(run_layer(layer, x, seed=1)[0], run_layer(layer, x, seed=2)[0])


def test_auxfree_bias_picks_experts_but_not_scores_and_updates_by_sign():
    layer = make_layer('auxfree', num_expert=4)
    with torch.no_grad():
        layer.gate.expert_bias.copy_(torch.tensor([0., 0., 100., 100.]))   # force experts 2 and 3
    x = torch.randn(6, 16)
    out, stats = layer(x)
    assert stats.load.tolist() == [0, 0, 6, 6]
    with torch.no_grad():
        ref = reference_output(layer, x, seed=0)[0]
        routing = layer.gate(x)
        unbiased = layer.gate.compute_logits(x).gather(1, routing.expert)
        assert torch.allclose(F.softmax(unbiased, -1), routing.score)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert stats.balance_loss.item() == 0
    layer.gate.update_bias(torch.tensor([0, 0, 6, 6]), rate=0.5)     # mean 3: under-loaded up, others down
    assert layer.gate.expert_bias.tolist() == [0.5, 0.5, 99.5, 99.5]
    layer.gate.update_bias(torch.tensor([3, 3, 3, 3]), rate=0.5)     # balanced: no change
    assert layer.gate.expert_bias.tolist() == [0.5, 0.5, 99.5, 99.5]
    assert 'gate.expert_bias' in layer.state_dict()


@pytest.mark.parametrize('gate', ['naive', 'switch'])
def test_shared_expert_adds_a_dense_ffn_of_n_times_the_expert_width(gate):
    layer = make_layer(gate, shared_expert=2)
    shared = layer.shared_expert
    assert shared.htoh4.weight.shape == (2 * 24, 16) and shared.h4toh.weight.shape == (16, 2 * 24)
    assert 'shared_expert.htoh4.weight' in layer.state_dict()
    x = torch.randn(20, 16)
    out = run_layer(layer, x, seed=5)[0]
    with torch.no_grad():
        routed = reference_output(layer, x, seed=5)[0]
        dense = shared.h4toh(torch.relu(shared.htoh4(x)))
    torch.testing.assert_close(out, routed + dense, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason='torch._grouped_mm does not run here')
@pytest.mark.parametrize('num_expert', [128, 256])
def test_fine_grained_experts_use_the_grouped_path_and_equal_slices(num_expert):
    auto = make_layer('naive', num_expert=num_expert, d_model=32, d_hidden=16, top_k=8)
    assert auto._expert_path(torch.device('cpu'), torch.float32) == 'grouped_mm'
    x = torch.randn(96, 32)
    outs = {}
    for backend in ('grouped_mm', 'slices'):
        layer = make_layer('naive', num_expert=num_expert, d_model=32, d_hidden=16, top_k=8, expert_backend=backend)
        outs[backend] = out = layer(x)[0]
        out.square().sum().backward()
        outs[backend + '_grad'] = layer.experts.htoh4.weight.grad.clone()
    assert (outs['grouped_mm'] - outs['slices']).abs().max() < 1e-5
    assert (outs['grouped_mm_grad'] - outs['slices_grad']).abs().max() < 1e-5


# ----------------------------------------------------------------------------- tiles and the path rule

@pytest.mark.parametrize('tile', [16, 128])
@pytest.mark.parametrize('counts', [[0, 0, 37, 0], [1, 1, 1, 1], [16, 17, 0, 15], [64, 0, 0, 0], [0, 0, 0, 0]])
def test_tiling_puts_each_row_in_a_tile_of_its_expert_within_the_static_bound(counts, tile):
    """Every kept row gets its own slot, in a tile whose expert is the row's, the tiles of each expert
    consecutive, whatever the counts (one expert taking all, empty experts, counts one past a tile); padding
    rows (dropped copies) go to the spare row past the last tile."""
    num_expert, n_padding = len(counts), 5
    expert = torch.cat([torch.arange(num_expert).repeat_interleave(torch.tensor(counts)),
                        torch.full((n_padding,), num_expert)])
    plan = moe.Dispatch(None, None, expert, torch.tensor(counts), None, expert.numel(), expert.numel(), True)
    t = moe.tiling(plan, num_expert, tile)
    n_tiles = t.expert.numel()
    assert n_tiles == expert.numel() // tile + num_expert
    kept = t.slot[:sum(counts)]
    assert kept.unique().numel() == kept.numel() and (kept < n_tiles * tile).all()
    assert torch.equal(t.expert[kept // tile], expert[:sum(counts)])
    assert (t.slot[sum(counts):] == n_tiles * tile).all()
    used = [torch.div(torch.tensor(c) + tile - 1, tile, rounding_mode='floor').item() for c in counts]
    assert t.expert[:sum(used)].tolist() == [e for e, n in enumerate(used) for _ in range(n)]


def test_tile_rows_halves_the_mean_rows_per_expert_within_16_and_128():
    assert [moe.tile_rows(rows, 8) for rows in (8, 256, 1024, 4096, 10 ** 6)] == [16, 16, 64, 128, 128]
    assert moe.tile_rows(2 * 5632, 64) == 64   # the MoE run scripts' shape: 176 rows per expert


def test_expert_path_rule(monkeypatch):
    """'auto' takes grouped_mm wherever it runs as one call, else the tiles on accelerators (no host read there)
    and the slices on a CPU without grouped_mm; the named backends are taken as they are."""
    cpu, cuda, widths = torch.device('cpu'), torch.device('cuda', 0), (32, 64)
    runs = {(cpu, torch.float32), (cpu, torch.bfloat16), (cuda, torch.bfloat16)}   # an H100's grouped_mm
    monkeypatch.setattr(moe, 'grouped_mm_available', lambda device, dtype: (device, dtype) in runs)
    auto = {(d.type, str(dt)[6:]): moe.expert_path('auto', d, dt, widths)
            for d in (cpu, cuda) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    assert auto == {('cpu', 'float32'): 'grouped_mm', ('cpu', 'float16'): 'slices', ('cpu', 'bfloat16'): 'grouped_mm',
                    ('cuda', 'float32'): 'tiles', ('cuda', 'float16'): 'tiles', ('cuda', 'bfloat16'): 'grouped_mm'}
    assert moe.expert_path('auto', cpu, torch.float32, (32, 33)) == 'slices'   # a row stride off 16 bytes
    assert moe.expert_path('tiles', cpu, torch.float32, widths) == 'tiles'
    assert moe.expert_path('slices', cuda, torch.bfloat16, widths) == 'slices'
    with pytest.raises(ValueError, match='grouped_mm does not run for torch.float16 on cuda'):
        moe.expert_path('grouped_mm', cuda, torch.float16, widths)
