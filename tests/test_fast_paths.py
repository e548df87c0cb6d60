"""Each fast path of mem_transformer against the plain computation it replaces: the heads-first attention
against the original's seq-first einsums (tests/reference_attention.py), SDPA and the fast dropout against the
explicit paths (MemTransformerLM.set_fast_paths), the key/value cache against projecting the memory again.

Exact rewrites are compared in fp32 at |diff| < 1e-5 (outputs and gradients);
bf16 autocast, whose products round to 8 bits of mantissa, is compared with
fp32 at a tolerance stated where it is used.
"""
import functools
import itertools
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

import mem_transformer as mt
import moe
import reference_attention as reference
from conftest import SYNCS, OpLog, segments_and_grads, tiny_model
from reference_attention import original_layout
from run.options import build_model, parse
from run.trainer import Trainer, skips_on_device


make_model = functools.partial(tiny_model, init_std=0.1, tgt_len=5)


def assert_close_dicts(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


CONFIGS = [dict(attn_type=t, pre_lnorm=pre, same_length=same, clamp_len=clamp)
           for t, pre, same, clamp in itertools.product([0, 1, 2, 3], [False, True], [False, True], [-1, 3])
           if not (pre and same)] + [dict(attn_type=0, untie_r=True, same_length=True, clamp_len=3)]


# ------------------------------------------------- heads-first attention, SDPA, query-only projection

@pytest.mark.parametrize('kw', CONFIGS, ids=lambda kw: '-'.join(f'{k}{v}' for k, v in kw.items()))
def test_fast_attention_equals_the_original_layout(kw, device):
    """Losses and every gradient over segments with memory: heads-first layout (with the
    query-only projection, and SDPA where it applies) against the original's einsums."""
    model = make_model(**kw).to(device)
    data = torch.randint(0, 40, (16, 3)).to(device)
    for train in (True, False):
        with original_layout():
            plain_loss, plain_grads = segments_and_grads(model.set_fast_paths(sdpa=False), data, train=train)
        for sdpa in (False, True):
            loss, grads = segments_and_grads(model.set_fast_paths(sdpa=sdpa), data, train=train)
            torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=0)
            assert_close_dicts(grads, plain_grads, atol=1e-5)


@pytest.mark.parametrize('kw', CONFIGS, ids=lambda kw: '-'.join(f'{k}{v}' for k, v in kw.items()))
def test_kv_cache_equals_projecting_the_memory_again(kw, device):
    """Evaluation with each layer's memory keys and values kept between segments (mem_len 6 > tgt_len 5,
    so the memory slides within the cached rows) against projecting memory + segment every time."""
    model = make_model(**kw).to(device)
    data = torch.randint(0, 40, (16, 3)).to(device)
    plain, _ = segments_and_grads(model, data, train=False)
    for layout in (original_layout, nullcontext):
        with layout(), mt.kv_caching(mt.new_kv_caches(model)) as caches:
            cached, _ = segments_and_grads(model, data, train=False)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
        assert len(caches) == (model.n_layer if kw['attn_type'] in (0, 1) else 0)
        assert all(cache.rows is not None for cache in caches.values())  # they were used
    with mt.kv_caching(mt.new_kv_caches(model)) as caches:  # a training step ignores them
        segments_and_grads(model, data, train=True)
    assert all(cache.rows is None for cache in caches.values())


class ReplayedDropout(nn.Module):
    """Attention dropout whose masks are drawn once (recording) and then replayed, permuted to the other
    layout: both layouts then drop the same (query, key, batch, head) entries."""

    def __init__(self, p):
        super().__init__()
        self.p, self.masks, self.calls, self.replay = p, [], 0, False

    def forward(self, prob):
        if not self.training:
            return prob
        if not self.replay:  # the model's [bsz, n_head, qlen, klen]: recorded here
            keep = torch.rand(prob.shape) >= self.p
            self.masks.append(keep)
        else:  # the original's [qlen, klen, bsz, n_head]: the recorded mask of the same call
            keep = self.masks[self.calls].permute(2, 3, 0, 1)
        self.calls += 1
        return prob * keep / (1 - self.p)


def test_fast_attention_with_adaptive_softmax_and_attention_dropout():
    """dropatt > 0 in training takes the explicit softmax (SDPA's dropout is another random stream): with
    the same entries dropped, the heads-first layout gives the original layout's losses and gradients."""
    model = make_model(cutoffs=[10, 25], div_val=2, d_embed=16, tie_projs=[False, True, True])
    data = torch.randint(0, 40, (16, 3))
    fast_eval, _ = segments_and_grads(model, data, train=False)
    dropatt = ReplayedDropout(0.3)  # one for every layer: the calls come in the same order in both layouts
    for layer in model.layers:
        layer.dec_attn.dropatt = dropatt
    fast, fast_grads = segments_and_grads(model, data, train=True)
    dropatt.calls, dropatt.replay = 0, True
    with original_layout():
        plain, plain_grads = segments_and_grads(model, data, train=True)
    dropped = 1 - torch.cat([m.flatten() for m in dropatt.masks]).float().mean()
    assert dropatt.calls == len(dropatt.masks) == 3 * model.n_layer and 0.2 < dropped < 0.4
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    assert_close_dicts(fast_grads, plain_grads, atol=1e-5)
    assert not torch.allclose(fast, fast_eval)  # the dropped entries changed the losses
    with original_layout():
        plain_eval, _ = segments_and_grads(model, data, train=False)
    torch.testing.assert_close(plain_eval, fast_eval, atol=1e-5, rtol=0)


def test_sdpa_is_used_only_where_exact(monkeypatch):
    q = torch.randn(2, 2, 3, 4)
    bias = torch.randn(2, 2, 3, 5, requires_grad=True)
    off, on = nn.Dropout(0.0), nn.Dropout(0.5)
    assert mt.use_sdpa(q, None, off) and mt.use_sdpa(q, bias.detach(), off)
    assert not mt.use_sdpa(q, bias, off)  # CPU: SDPA has no gradient for the bias
    with torch.no_grad():
        assert mt.use_sdpa(q, bias, off)
    assert not mt.use_sdpa(q, None, on.train()) and mt.use_sdpa(q, None, on.eval())
    assert not mt.use_sdpa(q.bfloat16(), None, off)  # CPU: its bf16 kernel is the slower
    gpu_q, gpu_bias = q.to('meta'), bias.to('meta')  # a device other than the CPU, without a GPU
    assert not mt.use_sdpa(gpu_q, gpu_bias, off)  # never with a bias that needs a gradient
    assert mt.use_sdpa(gpu_q.bfloat16(), gpu_bias.detach(), off) and mt.use_sdpa(gpu_q.half(), None, off)
    sdpa, calls = mt.F.scaled_dot_product_attention, []
    monkeypatch.setattr(mt.F, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    model, data = make_model(attn_type=2), torch.randint(0, 40, (6, 2))
    with torch.no_grad():
        model(data[:5], data[1:6])
        assert len(calls) == model.n_layer
        model.set_fast_paths(sdpa=False)(data[:5], data[1:6])
    assert len(calls) == model.n_layer  # switched off: no further call


def test_fp16_scores_stay_in_range_where_q_dot_k_alone_would_overflow():
    """Queries are scaled by 1/sqrt(d_head) before q·k: here q·k is 2e5 (fp16 overflows at 65504) and the
    scaled score 2.5e4, so fp16 attention gives fp32's output instead of NaN."""
    torch.manual_seed(0)
    layer = mt.MultiHeadAttn(1, 64, 64, 0.0).eval()
    with torch.no_grad():
        layer.q_net.weight.copy_(torch.eye(64) * 56)
        layer.kv_net.weight.copy_(torch.cat([torch.eye(64) * 56, torch.randn(64, 64) * 0.1]))
    h = torch.ones(3, 2, 64) + 0.001 * torch.randn(3, 2, 64)
    assert (56 * h[0, 0]).dot(56 * h[0, 0]) > 65504
    expected = layer(h)
    out = layer.half()(h.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------- rel_shift

def test_strided_and_padded_rel_shift_agree_on_the_visible_scores():
    qlen, mlen = 5, 4
    klen = qlen + mlen
    x = torch.randn(2, 3, qlen, klen)
    strided = mt.rel_shift(x)                      # no gradient: a strided view
    padded = mt.rel_shift(x.clone().requires_grad_())  # with one: padding
    assert strided.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    seq_first = reference.rel_shift(x.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
    for i in range(qlen):
        visible = slice(0, i + mlen + 1)
        expected = x[..., i, qlen - 1 - i:qlen - 1 - i + i + mlen + 1]
        assert torch.equal(strided[..., i, visible], expected)
        assert torch.equal(padded[..., i, visible], expected)
        assert torch.equal(seq_first[..., i, visible], expected)


# ------------------------------------------------------------------------------ dropout

def test_fast_dropout_is_the_documented_function_of_the_random_stream():
    x = torch.randn(64, 32)
    drop = mt.Dropout(0.25).train()
    torch.manual_seed(3)
    out = drop(x)
    torch.manual_seed(3)
    keep = torch.rand(64, 32) >= 0.25
    assert torch.equal(out, x * (keep.float() / 0.75))


def test_fast_dropout_law_gradient_and_dtype():
    drop = mt.Dropout(0.3).train()
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    out = drop(x)
    kept = out != 0
    # 400k Bernoulli(0.7) draws: the kept share is 0.7 within 5 standard deviations (0.0036).
    assert abs(kept.float().mean().item() - 0.7) < 0.0036
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.7))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d(x * noise)/dx = noise = out for x = 1
    assert drop(torch.ones(8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(mt.Dropout(0.0).train()(x), x)


def test_plain_dropout_is_reachable_and_is_nn_dropout():
    model = make_model(moe=True, moe_num_expert=2).set_fast_paths(dropout=False)
    dropouts = [m for m in model.modules() if isinstance(m, mt.Dropout)]
    assert len(dropouts) > 2 * model.n_layer and not any(m.fast for m in dropouts)  # experts' too
    x = torch.randn(50, 20)
    torch.manual_seed(5)
    plain = mt.Dropout(0.4).train()
    plain.fast = False
    ours = plain(x)
    torch.manual_seed(5)
    assert torch.equal(ours, nn.Dropout(0.4).train()(x))


# --------------------------------------------------- masks and positions cached, no host syncs



@pytest.mark.parametrize('attn_type', [0, 1, 2, 3])
def test_a_training_step_has_no_host_sync_and_builds_no_mask(attn_type, device):
    """On a character-level model (no adaptive clusters), forward and backward read no value
    back to the host (.item(), bool(), nonzero: each a device synchronisation on a GPU), and
    the second step of a shape builds no mask or position table (no arange, sin, cos)."""
    model = make_model(attn_type=attn_type, dropout=0.1).to(device).train()
    data = torch.randint(0, 40, (6, 3)).to(device)
    model(data[:5], data[1:6])[0].sum().backward()  # fills the caches for this shape
    mems = model(data[:5], data[1:6])[1:]
    model(data[:5], data[1:6], *mems)[0].sum().backward()
    log = OpLog()
    with log:
        out = model(data[:5], data[1:6], *mems)
        out[0].sum().backward()
    assert not SYNCS & set(log.ops)
    assert not {'arange', 'sin', 'cos'} & set(log.ops)


@pytest.mark.parametrize('backend', ['grouped_mm', 'tiles'])
@pytest.mark.parametrize('gate,top_k', [('naive', 2), ('gshard', 2), ('switch', 1)])
def test_an_moe_training_step_has_no_host_sync_on_the_fast_paths(gate, top_k, backend, device):
    """FastMoE's setting (naive top-2 gate) and the capacity-limited gates with copies dropped, on grouped_mm (bf16
    on GPUs) and on the tiles (fp32: CUDA's fp32/TF32 and fp16 take them under 'auto'): routing, dispatch
    (counts from the sorted keys; dropped copies kept as padding rows), experts, combine and the balance losses
    read nothing back to the host, forward or backward."""
    dtype = torch.float32 if device.type == 'cpu' or backend == 'tiles' else torch.bfloat16
    if backend == 'grouped_mm' and not moe.grouped_mm_fits(device, dtype, (16, 24)):
        pytest.skip(f'grouped_mm does not run {dtype} on this {device.type}')
    # capacity 0.5: at most half the copies fit (15 tokens; gshard 4 per expert of 30, switch 2 of 15)
    model = make_model(moe=True, moe_num_expert=4, moe_top_k=top_k, moe_gate=gate, moe_capacity_factor=0.5,
                       dropout=0.1).to(device).train()
    model.set_fast_paths(expert_backend=backend)
    data = torch.randint(0, 40, (6, 3)).to(device)

    def step(*mems):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out, moe_stats = model(data[:5], data[1:6], *mems, return_moe_stats=True)
            (out[0].float().mean() + model.aux_loss(moe_stats)).backward()
        return out[1:], moe_stats

    mems, _ = step(*step()[0])
    log = OpLog()
    with log:
        _, moe_stats = step(*mems)
        load = model.moe_load(moe_stats)
    assert not SYNCS & set(log.ops)
    ran = {'grouped_mm': 'grouped_mm', 'tiles': 'baddbmm'}[backend]   # the path's own product ran
    assert ran in ' '.join(log.ops) and load.sum() > 0
    dropped = sum(stats.dropped for stats in moe_stats)
    assert (dropped > 0) == (gate != 'naive')   # the capacity-limited gates drop copies, naive none


def test_mask_cache_returns_the_mask_of_its_key():
    model = make_model(mem_len=5)
    mask = model._attn_mask(4, 3, 'cpu')
    assert model._attn_mask(4, 3, 'cpu') is mask
    model.same_length = True
    same = model._attn_mask(4, 5, 'cpu')
    assert same is not mask
    for i in range(4):  # causal; with same_length, every query sees mem_len keys
        assert torch.equal(torch.nonzero(~mask[i]).flatten(), torch.arange(i + 4))
        assert torch.equal(torch.nonzero(~same[i]).flatten(), torch.arange(i + 1, i + 6))


def test_position_cache_follows_inv_freq_and_inference_mode():
    model = make_model().eval()
    data = torch.randint(0, 40, (6, 2))
    with torch.inference_mode():
        before = model(data[:5], data[1:6])[0].clone()
    # A position table made under inference_mode must not be reused by a training step.
    model.train()
    model(data[:5], data[1:6])[0].sum().backward()
    # load_state_dict changes inv_freq in place: the cached table must follow.
    state = model.state_dict()
    state['pos_emb.inv_freq'] = state['pos_emb.inv_freq'] * 2
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        after = model(data[:5], data[1:6])[0]
        pos = model._position_embedding(11, torch.zeros(1))
    seq = torch.arange(10, -1, -1.0)
    expected = torch.cat([torch.outer(seq, state['pos_emb.inv_freq']).sin(),
                          torch.outer(seq, state['pos_emb.inv_freq']).cos()], -1)
    torch.testing.assert_close(pos[:, 0], expected)
    assert not torch.allclose(before, after)


# ---------------------------------------------------------------------------- bf16 autocast

@pytest.mark.parametrize('kw', [dict(attn_type=0), dict(attn_type=1, pre_lnorm=True), dict(attn_type=2),
                                dict(attn_type=3, same_length=True),
                                dict(cutoffs=[10, 25], div_val=2, d_embed=16, tie_projs=[False, True, True]),
                                dict(d_embed=8, cutoffs=[10]), dict(sample_softmax=8),
                                dict(moe=True, moe_num_expert=4, moe_top_k=2),
                                dict(moe=True, moe_num_expert=4, moe_top_k=1, moe_gate='switch')])
def test_bf16_autocast_trains_and_stays_near_fp32(kw, device):
    """Under CPU bf16 autocast, fast paths on: no dtype error in training or evaluation, memory
    kept in fp32, and evaluation losses within 0.05 nats of fp32 (bf16 products carry ~3
    significant digits; over two layers and a softmax of ~3.7 nats this is a loose bound)."""
    model = make_model(dropout=0.1, **kw).to(device)
    data = torch.randint(0, 40, (11, 3)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, moe_stats = model.train()(data[:5], data[1:6], return_moe_stats=True)
        (out[0].float().mean() + model.aux_loss(moe_stats)).backward()
        out = model(data[5:10], data[6:11], *out[1:])
        assert all(m.dtype == torch.float32 for m in out[1:])
    model.eval()
    with torch.no_grad():
        fp32 = model(data[:5], data[1:6])[0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(data[:5], data[1:6])[0]
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0)


def test_fast_and_plain_paths_agree_under_bf16(device):
    """The same model under bf16 autocast with and without the fast paths: both round
    products to bf16, in a different order, so they agree to bf16 precision (0.05 nats)."""
    model = make_model().to(device).eval()
    data = torch.randint(0, 40, (16, 3)).to(device)
    results = {}
    for fast in (False, True):
        with (nullcontext() if fast else original_layout()), torch.autocast(device.type, dtype=torch.bfloat16):
            results[fast], _ = segments_and_grads(model.set_fast_paths(sdpa=fast), data, train=False)
    torch.testing.assert_close(results[True].float(), results[False].float(), atol=0.05, rtol=0)


def test_positions_are_counted_in_fp32_under_autocast():
    """A projected word embedding is bf16 under autocast; bf16 cannot count past 256."""
    model = make_model(d_embed=8, tgt_len=300, mem_len=0)
    like = torch.zeros(1, dtype=torch.bfloat16)
    seq = model._position_sequence(300, like)
    assert seq.dtype == torch.float32 and torch.equal(seq, torch.arange(299, -1, -1.0))


# ------------------------------------------------------------------------------- compile

def test_maybe_compile_falls_back_to_eager_and_keeps_the_state_dict(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def failing_compile(fn, **options):
        def compiled(*args, **kwargs):
            raise TorchDynamoException('no C++ compiler found')
        return compiled

    model = make_model().eval()
    data = torch.randint(0, 40, (6, 2))
    with torch.no_grad():
        expected = model(data[:5], data[1:6])[0]
    keys = list(model.state_dict())
    monkeypatch.setattr(torch, 'compile', failing_compile)
    assert mt.maybe_compile(model) is model
    with pytest.warns(UserWarning, match='no C.. compiler found.*running eagerly'), torch.no_grad():
        assert torch.equal(model(data[:5], data[1:6])[0], expected)
    assert list(model.state_dict()) == keys
    with torch.no_grad():  # later calls go straight to the eager forward, silently
        assert torch.equal(model(data[:5], data[1:6])[0], expected)


def test_maybe_compile_compiles_the_call_in_place(monkeypatch):
    """nn.Module.compile: the options reach torch.compile, the calls go through the compiled function, and
    the model keeps its class's forward (no instance attribute shadows it)."""
    seen = []

    def recording_compile(fn, **options):
        def compiled(*args, **kwargs):
            seen.append(options)
            return fn(*args, **kwargs)
        return compiled

    model = make_model().eval()
    data = torch.randint(0, 40, (6, 2))
    with torch.no_grad():
        expected = model(data[:5], data[1:6])[0]
    monkeypatch.setattr(torch, 'compile', recording_compile)
    assert mt.maybe_compile(model, mode='max-autotune') is model and 'forward' not in vars(model)
    with torch.no_grad():
        assert torch.equal(model(data[:5], data[1:6])[0], expected)
    assert seen == [{'mode': 'max-autotune'}]


def test_maybe_compile_without_torch_compile(monkeypatch):
    monkeypatch.delattr(torch, 'compile')
    model = make_model()
    with pytest.warns(UserWarning, match='not available'):
        assert mt.maybe_compile(model) is model


def test_maybe_compile_lets_model_errors_through(monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda fn, **options: fn)  # a "compiler" that changes nothing
    model = mt.maybe_compile(make_model())
    data = torch.randint(0, 40, (6, 2))
    with pytest.raises(RuntimeError, match='same size'):
        model(data[:5], data[1:6, :1])  # targets for one of the two sequences


def test_the_grouped_mm_probe_runs_before_compiling_not_inside_the_graph(monkeypatch):
    """The first compiled MoE step in bf16 meets the grouped_mm probe (grouped_mm_fits); run inside the compiled
    call, its backward breaks the graph there. maybe_compile probes first: the step compiles without a break."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(moe, '_GROUPED_MM_PROBES', {})   # nothing probed yet, as in a fresh process
    torch._dynamo.reset()
    counters.clear()
    model = make_model(moe=True, moe_num_expert=4, moe_top_k=2).train()
    mt.maybe_compile(model, backend='eager')
    data = torch.randint(0, 40, (6, 2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = model(data[:5], data[1:6])[0].float().mean()
    loss.backward()
    assert counters['stats']['unique_graphs'] >= 1   # it did compile
    assert not counters['graph_break'], list(counters['graph_break'])


def test_a_whole_trainer_step_has_no_host_sync_with_a_fused_optimizer(device):
    """train.py's whole step between log lines (forward and backward, clipping, the fused optimizer that skips
    a non-finite step on the device, the loss and skip accounting) reads no value back to the host."""
    config = parse(['--n_layer', '2', '--d_model', '32', '--n_head', '2', '--d_head', '16', '--d_inner', '64',
                    '--tgt_len', '8', '--mem_len', '8', '--batch_size', '3', '--dropout', '0.1',
                    *(['--cuda'] if device.type == 'cuda' else [])])
    trainer = Trainer(config, build_model(config.flags, 40), device, print, None)
    assert skips_on_device(trainer.optimizer)  # torch's fused Adam, on the CPU as on GPUs
    data = torch.randint(0, 40, (9, 3), device=device)
    losses = [trainer.train_step(data[:-1], data[1:]) for _ in range(2)]
    log = OpLog()
    with log:
        losses.append(trainer.train_step(data[:-1], data[1:]))
    assert not SYNCS & set(log.ops) and '_fused_adam_' in log.ops
    # what the window kept on the device: the sum of the returned losses (as Python floats would add them)
    assert trainer.window.totals() == dict(loss_sum=sum(float(loss) for loss in losses), n_losses=3,
                                           n_nonfinite=0, n_skipped=0)
