import copy
import math

import pytest
import torch

from conftest import tiny_model
from mem_transformer import MemTransformerLM, init_weights, rel_shift


def run_segments(model, data, tgt_len):
    """Per-token losses of consecutive segments of data [len, bsz], carrying memory."""
    mems, losses = (), []
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, tgt_len):
            inp, tgt = data[i:i + tgt_len], data[i + 1:i + 1 + tgt_len]
            inp = inp[:tgt.size(0)]
            out = model(inp, tgt, *mems)
            losses.append(out[0])
            mems = out[1:]
    return losses, mems


# ---------------------------------------------------------------- state dict

def test_state_dict_keys_and_shapes_match_the_original_layout():
    model = tiny_model(n_token=30, n_layer=1, d_model=16, d_embed=8, n_head=2, d_head=4, d_inner=20,
                       div_val=1, cutoffs=[10, 20], tie_projs=[False, True, True])
    expected = {
        'r_w_bias': (2, 4), 'r_r_bias': (2, 4),
        'word_emb.emb_layers.0.weight': (30, 8), 'word_emb.emb_projs.0': (16, 8),
        'layers.0.dec_attn.qkv_net.weight': (24, 16), 'layers.0.dec_attn.o_net.weight': (16, 8),
        'layers.0.dec_attn.layer_norm.weight': (16,), 'layers.0.dec_attn.layer_norm.bias': (16,),
        'layers.0.dec_attn.r_net.weight': (8, 16),
        'layers.0.pos_ff.CoreNet.0.weight': (20, 16), 'layers.0.pos_ff.CoreNet.0.bias': (20,),
        'layers.0.pos_ff.CoreNet.3.weight': (16, 20), 'layers.0.pos_ff.CoreNet.3.bias': (16,),
        'layers.0.pos_ff.layer_norm.weight': (16,), 'layers.0.pos_ff.layer_norm.bias': (16,),
        'crit.cluster_weight': (2, 8), 'crit.cluster_bias': (2,),
        'crit.out_layers.0.weight': (30, 8), 'crit.out_layers.0.bias': (30,),
        'crit.out_projs.0': (16, 8), 'crit.out_projs.1': (16, 8), 'crit.out_projs.2': (16, 8),
        'pos_emb.inv_freq': (8,),
    }
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    # The original's order: own parameters, then submodules in construction order.
    assert list(model.state_dict())[:3] == ['r_w_bias', 'r_r_bias', 'word_emb.emb_layers.0.weight']


def test_adaptive_div_val_layout_and_tying():
    model = tiny_model(n_token=50, d_model=16, d_embed=16, div_val=2, cutoffs=[10, 30],
                       tie_projs=[False, True, True])
    sd = model.state_dict()
    assert sd['word_emb.emb_layers.1.weight'].shape == (20, 8)
    assert sd['word_emb.emb_layers.2.weight'].shape == (20, 4)
    assert sd['crit.out_layers.2.weight'].shape == (20, 4)
    assert sd['crit.out_projs.2'].shape == (16, 4)
    for i in range(3):
        assert model.crit.out_layers[i].weight is model.word_emb.emb_layers[i].weight
    assert model.crit.out_projs[0] is not model.word_emb.emb_projs[0]
    assert model.crit.out_projs[1] is model.word_emb.emb_projs[1]
    assert model.crit.out_projs[2] is model.word_emb.emb_projs[2]


@pytest.mark.parametrize('attn_type,keys', [
    (1, {'r_emb': (2, 12, 2, 8), 'r_w_bias': (2, 2, 8), 'r_bias': (2, 12, 2),
         'layers.0.dec_attn.qkv_net.weight': (48, 16)}),
    (2, {'pos_emb.inv_freq': (8,), 'layers.0.dec_attn.q_net.weight': (16, 16),
         'layers.0.dec_attn.kv_net.weight': (32, 16)}),
    (3, {'r_emb': (2, 12, 2, 8), 'layers.1.dec_attn.q_net.weight': (16, 16)}),
])
def test_attention_type_parameters(attn_type, keys):
    model = tiny_model(attn_type=attn_type)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in keys.items():
        assert shapes[key] == shape
    assert ('layers.0.dec_attn.r_net.weight' in shapes) == (attn_type == 0)


def test_fastmoe_projection_spelling_loads_strict():
    model = tiny_model(n_token=50, d_embed=16, div_val=2, cutoffs=[10, 30])
    sd = model.state_dict()
    renamed = {}
    for k, v in sd.items():
        if '_projs.' in k:
            k = k + '.weight'
        renamed[k] = v.clone() + 1
    fresh = tiny_model(n_token=50, d_embed=16, div_val=2, cutoffs=[10, 30], seed=1)
    fresh.load_state_dict(renamed, strict=True)
    assert torch.equal(fresh.word_emb.emb_projs[2], sd['word_emb.emb_projs.2'] + 1)
    assert torch.equal(fresh.crit.out_projs[0], sd['crit.out_projs.0'] + 1)


def test_config_rebuilds_the_same_model():
    model = tiny_model(cutoffs=[10, 20], div_val=2, d_embed=16, same_length=True, clamp_len=4)
    rebuilt = MemTransformerLM(**model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.same_length and rebuilt.clamp_len == 4


# ------------------------------------------------------- attention internals

def test_rel_shift_indexes_by_key_position():
    qlen, mlen = 4, 3
    klen = qlen + mlen
    x = torch.randn(2, 3, qlen, klen)
    for y in (rel_shift(x), rel_shift(x.clone().requires_grad_())):  # a strided view, or padded for autograd
        for i in range(qlen):
            for j in range(i + mlen + 1):  # the visible (unmasked) part
                assert torch.equal(y[..., i, j], x[..., i, j + qlen - 1 - i])


def test_causal_and_same_length_masks():
    model = tiny_model(mem_len=5)
    mask = model._attn_mask(4, 3, 'cpu')
    for i in range(4):
        assert not mask[i, :i + 4].any() and mask[i, i + 4:].all()
    model.same_length = True
    mask = model._attn_mask(4, 5, 'cpu')  # a full memory
    for i in range(4):  # every query sees the same number (mem_len) of most recent keys
        assert torch.equal(torch.nonzero(~mask[i]).flatten(), torch.arange(i + 1, i + 6))


def slow_relative_attention(attn, w, mems, r_w_bias, r_r_bias, clamp_len=-1):
    """The paper's formula (Dai et al., eq. in section 3.3), one score at a time, post-LN."""
    qlen, bsz, _ = w.shape
    cat = torch.cat([mems, w], 0)
    klen = cat.size(0)
    mlen = klen - qlen
    n, d = attn.n_head, attn.d_head
    q, k, v = attn.qkv_net(cat).view(klen, bsz, 3, n, d).unbind(2)
    q = q[-qlen:]
    out = torch.zeros(qlen, bsz, n, d)
    for b in range(bsz):
        for h in range(n):
            for i in range(qlen):
                scores = []
                for j in range(i + mlen + 1):
                    dist = float(i + mlen - j)
                    if clamp_len > 0:
                        dist = min(dist, clamp_len)
                    inv_freq = 1 / (10000 ** (torch.arange(0.0, attn.d_model, 2.0) / attn.d_model))
                    r = torch.cat([torch.sin(dist * inv_freq), torch.cos(dist * inv_freq)])
                    rk = attn.r_net(r).view(n, d)[h]
                    s = (q[i, b, h] + r_w_bias[h]) @ k[j, b, h] + (q[i, b, h] + r_r_bias[h]) @ rk
                    scores.append(s / math.sqrt(d))
                p = torch.softmax(torch.stack(scores), 0)
                out[i, b, h] = (p[:, None] * v[:i + mlen + 1, b, h]).sum(0)
    return attn.layer_norm(w + attn.o_net(out.view(qlen, bsz, n * d)))


@pytest.mark.parametrize('clamp_len', [-1, 2])
def test_relative_attention_matches_the_papers_formula(clamp_len):
    model = tiny_model(clamp_len=clamp_len)
    layer = model.layers[0].dec_attn
    qlen, mlen, bsz = 3, 4, 2
    w, mems = torch.randn(qlen, bsz, 16), torch.randn(mlen, bsz, 16)
    pos_emb = model.pos_emb(model._position_sequence(qlen + mlen, w))
    with torch.no_grad():
        fast = layer(w, pos_emb, model.r_w_bias, model.r_r_bias,
                     attn_mask=model._attn_mask(qlen, mlen, 'cpu'), mems=mems)
        slow = slow_relative_attention(layer, w, mems, model.r_w_bias, model.r_r_bias, clamp_len)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_untie_r_gives_each_layer_its_own_biases():
    """untie_r (the TensorFlow/Hugging Face layout): layers.N.dec_attn.r_w_bias instead of one shared pair.
    Untied biases all equal to the shared pair give the tied model; layer 1's own pair is the one it uses."""
    tied = tiny_model(n_layer=3)
    untied = tiny_model(n_layer=3, untie_r=True)
    keys = set(untied.state_dict())
    assert 'r_w_bias' not in keys and 'r_r_bias' not in keys
    assert {f'layers.{i}.dec_attn.{b}' for i in range(3) for b in ('r_w_bias', 'r_r_bias')} <= keys
    assert keys - {k for k in keys if '.dec_attn.r_' in k and k.endswith('_bias')} == set(tied.state_dict()) - \
        {'r_w_bias', 'r_r_bias'}
    state = {k: v for k, v in tied.state_dict().items() if k not in ('r_w_bias', 'r_r_bias')}
    for i in range(3):
        state[f'layers.{i}.dec_attn.r_w_bias'] = tied.r_w_bias.detach()
        state[f'layers.{i}.dec_attn.r_r_bias'] = tied.r_r_bias.detach()
    untied.load_state_dict(state, strict=True)
    data = torch.randint(0, 40, (13, 2))
    torch.testing.assert_close(run_segments(untied, data, 6)[0], run_segments(tied, data, 6)[0], rtol=0, atol=0)
    with torch.no_grad():
        untied.layers[1].dec_attn.r_r_bias.add_(0.5)
    assert not torch.allclose(run_segments(untied, data, 6)[0][0], run_segments(tied, data, 6)[0][0])
    # The layer computes the paper's formula with its own pair.
    layer = untied.layers[1].dec_attn
    w, mems = torch.randn(3, 2, 16), torch.randn(4, 2, 16)
    with torch.no_grad():
        fast = untied.layers[1](w, untied.pos_emb(untied._position_sequence(7, w)), layer.r_w_bias,
                                layer.r_r_bias, dec_attn_mask=untied._attn_mask(3, 4, 'cpu'), mems=mems)[0]
        slow = untied.layers[1].pos_ff(slow_relative_attention(layer, w, mems, layer.r_w_bias, layer.r_r_bias))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_untie_r_init_and_construction_stream():
    """Each layer's pair is drawn by init_weights (N(0, init_std), as the shared pair); building a model
    draws no random numbers for them, so a tied model is unchanged by the option's existence."""
    torch.manual_seed(0)
    MemTransformerLM(40, 2, 2, 16, 8, 24, 0.0, 0.0, untie_r=True)
    after_untied = torch.rand(1)
    torch.manual_seed(0)
    MemTransformerLM(40, 2, 2, 16, 8, 24, 0.0, 0.0)
    assert torch.equal(torch.rand(1), after_untied)
    torch.manual_seed(0)
    model = init_weights(MemTransformerLM(40, 8, 4, 64, 16, 24, 0.0, 0.0, untie_r=True), init_std=0.5)
    biases = torch.stack([getattr(layer.dec_attn, b) for layer in model.layers for b in ('r_w_bias', 'r_r_bias')])
    assert biases.std().item() == pytest.approx(0.5, rel=0.1) and biases.mean().abs() < 0.1
    assert len({tuple(b.flatten().tolist()) for b in biases}) == 16  # 16 different draws


def test_untie_r_is_only_for_the_shared_biases_of_attn_type_0():
    with pytest.raises(ValueError, match='untie_r=True: only attn_type 0'):
        tiny_model(attn_type=1, untie_r=True)


# ------------------------------------------------------------------ memory

@pytest.mark.parametrize('attn_type', [0, 1])
@pytest.mark.parametrize('pre_lnorm', [False, True])
def test_memory_equals_running_the_concatenated_sequence(attn_type, pre_lnorm):
    """Relative attention with enough memory: segment 2 with segment 1 as memory
    sees exactly what the last positions of one long segment see."""
    tgt = 5
    model = tiny_model(attn_type=attn_type, pre_lnorm=pre_lnorm, tgt_len=2 * tgt, mem_len=2 * tgt)
    data = torch.randint(0, 40, (2 * tgt + 1, 3))
    with torch.no_grad():
        seg_losses, _ = run_segments(model, data, tgt)
        whole = model(data[:2 * tgt], data[1:2 * tgt + 1])[0]
    torch.testing.assert_close(torch.cat(seg_losses), whole, atol=1e-5, rtol=1e-5)


def test_memory_is_detached_and_has_the_right_length():
    model = tiny_model(mem_len=4).train()
    data = torch.randint(0, 40, (7, 2))
    out = model(data[:6], data[1:7])
    mems = out[1:]
    assert len(mems) == model.n_layer + 1
    assert all(m.shape == (4, 2, 16) and not m.requires_grad for m in mems)


def test_update_mems_keeps_the_states_before_the_extended_context():
    model = tiny_model(mem_len=4, ext_len=2)
    qlen, mlen = 6, 3
    hids = [torch.arange(qlen, dtype=torch.float).view(qlen, 1, 1) + 100 * i for i in range(3)]
    mems = [torch.arange(-mlen, 0, dtype=torch.float).view(mlen, 1, 1) + 100 * i for i in range(3)]
    new = model._update_mems(hids, mems, qlen, mlen)
    # Positions -3..5; the last ext_len=2 (4, 5) are re-fed next time; keep the 4 before them.
    assert new[1].flatten().tolist() == [100.0, 101.0, 102.0, 103.0]


def test_no_memory_when_mem_len_is_zero():
    model = tiny_model(mem_len=0)
    data = torch.randint(0, 40, (7, 2))
    out = model(data[:6], data[1:7])
    assert len(out) == 1 and out[0].shape == (6, 2)


def test_reset_length_changes_the_memory_size():
    model = tiny_model(mem_len=6)
    model.reset_length(tgt_len=3, ext_len=0, mem_len=2)
    data = torch.randint(0, 40, (4, 2))
    out = model(data[:3], data[1:4])
    assert out[1].shape[0] == 2


def test_forward_does_not_modify_the_callers_memory():
    """The original added position embeddings to the memory in place (attn_type 2, 3)."""
    for attn_type in (2, 3):
        model = tiny_model(attn_type=attn_type, d_head=8, n_head=2)
        data = torch.randint(0, 40, (13, 2))
        mems = model(data[:6], data[1:7])[1:]
        before = [m.clone() for m in mems]
        model(data[6:12], data[7:13], *mems)
        assert all(torch.equal(a, b) for a, b in zip(before, mems))


@pytest.mark.parametrize('attn_type', [2, 3])
def test_absolute_attention_memory_holds_the_position_additions(attn_type):
    """The original added position embeddings into the memory in place (type 2: the memory positions'
    sinusoids to the embeddings' memory; type 3: each layer's learnt embeddings to its input's memory and to
    its input), so the next memory holds them. Two segments of 4 with mem_len 6, checked by hand."""
    mlen = 4
    model = tiny_model(attn_type=attn_type, tgt_len=4, mem_len=6)
    data = torch.randint(0, 40, (9, 2), generator=torch.Generator().manual_seed(0))
    outputs = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, out: outputs.append(out[0]))  # (hidden, MoE stats)
    with torch.no_grad():
        mems = model(data[:4], data[1:5])[1:]
        outputs.clear()
        new = model(data[4:8], data[5:9], *mems)[1:]
        emb = model.word_emb(data[4:8])
    n = model.n_layer
    if attn_type == 2:  # sinusoids of the distances 7 ... 0: the memory's first
        angles = torch.arange(7, -1, -1.0)[:, None] * model.pos_emb.inv_freq
        pos = torch.cat([angles.sin(), angles.cos()], -1)[:, None]
        added = [pos[:mlen]] + [0] * n
        rows = [emb + pos[mlen:]] + outputs
    else:  # r_emb[i] holds max_klen = 10 rows: the segment's are the last 4, the memory's the 4 before
        r = model.r_emb.detach().view(n, 10, 1, -1)
        added = [r[i, 2:6] for i in range(n)] + [0]
        rows = [x + r[i, 6:] for i, x in enumerate([emb] + outputs[:-1])] + outputs[-1:]
    for i in range(n + 1):  # keep the last mem_len = 6 of the 8 rows
        torch.testing.assert_close(new[i], torch.cat([mems[i] + added[i], rows[i]])[2:], msg=f'hidden {i}')


# ------------------------------------------------------- outputs and losses

@pytest.mark.parametrize('kw', [
    dict(), dict(cutoffs=[10, 25]), dict(cutoffs=[10, 25], div_val=2, d_embed=16),
    dict(d_embed=8, cutoffs=[10])])
def test_loss_is_the_negative_log_probability_of_the_target(kw):
    model = tiny_model(**kw)
    data = torch.randint(0, 40, (7, 3))
    with torch.no_grad():
        loss = model(data[:6], data[1:7])[0]
        hidden, _ = model._forward(data[:6], mems=model.init_mems())
        log_prob = model.log_prob(hidden)
    assert loss.shape == (6, 3)
    torch.testing.assert_close(log_prob.logsumexp(-1), torch.zeros(6, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, -log_prob.gather(-1, data[1:7, :, None]).squeeze(-1),
                               atol=1e-5, rtol=1e-5)


def test_original_cluster_grouped_loss_order_is_available():
    model = tiny_model(cutoffs=[10, 25])
    data = torch.randint(0, 40, (7, 3))
    with torch.no_grad():
        ordered = model(data[:6], data[1:7])[0].flatten()
        model.crit.keep_order = False
        grouped = model(data[:6], data[1:7])[0].flatten()
    target = data[1:7].flatten()
    cluster = (target >= 10).long() + (target >= 25).long()
    expected = torch.cat([ordered[cluster == c] for c in range(3)])
    assert torch.equal(grouped, expected)


def test_sampled_softmax_trains_and_evaluates():
    model = tiny_model(n_token=200, sample_softmax=20).train()
    assert model.out_layer.weight is model.word_emb.emb_layers[0].weight
    data = torch.randint(0, 200, (7, 3))
    loss = model(data[:6], data[1:7])[0]
    assert loss.shape == (6, 3) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.word_emb.emb_layers[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        eval_loss = model(data[:6], data[1:7])[0]
        hidden, _ = model._forward(data[:6], mems=model.init_mems())
        full = torch.log_softmax(model.out_layer(hidden), -1)
    torch.testing.assert_close(eval_loss, -full.gather(-1, data[1:7, :, None]).squeeze(-1))


def test_training_reduces_the_loss_on_a_repeated_pattern():
    torch.manual_seed(0)
    model = tiny_model(n_token=10, mem_len=4).train()
    data = torch.arange(10).repeat(4)[:, None].expand(-1, 2).contiguous()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss = model(data[:30], data[1:31])[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first


# ------------------------------------------------------------ initialization

def test_init_weights_follows_the_original_scheme():
    torch.manual_seed(0)
    model = MemTransformerLM(300, 2, 4, 64, 16, 128, 0.1, 0.0, d_embed=32, div_val=2,
                             cutoffs=[100, 200], tgt_len=8, mem_len=8, ext_len=0,
                             tie_projs=[False, True, True])
    init_weights(model, init='normal', init_std=0.02, proj_init_std=0.01)
    ln = model.layers[0].pos_ff.layer_norm
    assert abs(ln.weight.mean().item() - 1) < 0.01 and 0.01 < ln.weight.std().item() < 0.03
    assert torch.count_nonzero(ln.bias) == 0
    assert abs(model.layers[0].dec_attn.qkv_net.weight.std().item() - 0.02) < 0.002
    assert abs(model.word_emb.emb_projs[0].std().item() - 0.01) < 0.002
    assert torch.count_nonzero(model.crit.cluster_bias) == 0
    assert torch.count_nonzero(model.layers[1].pos_ff.CoreNet[0].bias) == 0
    init_weights(model, init='uniform', init_range=0.05)
    w = model.layers[0].pos_ff.CoreNet[3].weight
    assert w.abs().max() <= 0.05 and w.abs().max() > 0.04


def init_by_class_name(model, std=0.02, proj_std=0.01):
    """The original train.py's weights_init rule, transcribed: it dispatches on substrings of class names."""
    def rule(m):
        name = type(m).__name__
        if 'Linear' in name:
            for p, how in ((getattr(m, 'weight', None), 'normal'), (getattr(m, 'bias', None), 'zero')):
                if p is not None:
                    torch.nn.init.normal_(p, 0.0, std) if how == 'normal' else torch.nn.init.constant_(p, 0.0)
        elif 'AdaptiveEmbedding' in name:
            for p in m.emb_projs:
                torch.nn.init.normal_(p, 0.0, proj_std)
        elif 'Embedding' in name and hasattr(m, 'weight'):
            torch.nn.init.normal_(m.weight, 0.0, std)
        elif 'ProjectedAdaptiveLogSoftmax' in name:
            if hasattr(m, 'cluster_weight'):
                torch.nn.init.normal_(m.cluster_weight, 0.0, std)
                torch.nn.init.constant_(m.cluster_bias, 0.0)
            for p in m.out_projs:
                if p is not None:
                    torch.nn.init.normal_(p, 0.0, proj_std)
        elif 'LayerNorm' in name:
            torch.nn.init.normal_(m.weight, 1.0, std)
            torch.nn.init.constant_(m.bias, 0.0)
        elif 'TransformerLM' in name:
            for attr in ('r_emb', 'r_w_bias', 'r_r_bias'):
                if hasattr(m, attr):
                    torch.nn.init.normal_(getattr(m, attr), 0.0, std)
            if hasattr(m, 'r_bias'):
                torch.nn.init.constant_(m.r_bias, 0.0)
    with torch.no_grad():
        model.apply(rule)
        model.word_emb.apply(rule)


@pytest.mark.parametrize('kw', [dict(attn_type=1, cutoffs=[10, 25], div_val=2, d_embed=16,
                                     tie_projs=[False, True, True]),
                                dict(moe=True, moe_num_expert=3, d_embed=8, cutoffs=[20]),
                                dict(sample_softmax=8, attn_type=3), dict(attn_type=0, pre_lnorm=True)])
def test_init_weights_draws_what_the_originals_rule_draws(kw):
    models = []
    for init in (init_weights, init_by_class_name):
        torch.manual_seed(0)
        model = MemTransformerLM(40, 2, 2, 16, 8, 24, 0.0, 0.0, tgt_len=5, mem_len=5, **kw)
        torch.manual_seed(1)
        init(model)
        models.append(model.state_dict())
    assert models[0].keys() == models[1].keys()
    for key in models[0]:
        assert torch.equal(models[0][key], models[1][key]), key


def test_same_seed_same_model():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ------------------------------------------------------------------- errors

@pytest.mark.parametrize('kw,name', [
    (dict(cutoffs=[20, 10]), 'cutoffs'),
    (dict(cutoffs=[10, 40]), 'cutoffs'),
    (dict(cutoffs=[0]), 'cutoffs'),
    (dict(div_val=0), 'div_val'),
    (dict(mem_len=-1), 'mem_len'),
    (dict(attn_type=4), 'attn_type'),
    (dict(moe=True, moe_num_expert=4, moe_top_k=5), 'moe_top_k'),
    (dict(moe=True, moe_num_expert=4, moe_top_k=0), 'moe_top_k'),
    (dict(moe=True, moe_gate='nope'), 'moe_gate'),
    (dict(sample_softmax=10, d_embed=8), 'sample_softmax'),
    (dict(attn_type=3, d_head=4), 'd_head'),
])
def test_bad_configuration_names_the_argument(kw, name):
    with pytest.raises(ValueError, match=rf'^{name}='):
        tiny_model(**kw)


# ------------------------------------------------------- mixture of experts

def test_moe_model_has_fastmoe_keys_and_trains():
    model = tiny_model(moe=True, moe_num_expert=4, moe_top_k=2).train()
    sd = model.state_dict()
    assert sd['layers.0.pos_ff.gate.gate.weight'].shape == (4, 16)
    assert sd['layers.0.pos_ff.gate.gate.bias'].shape == (4,)
    assert sd['layers.1.pos_ff.experts.htoh4.weight'].shape == (4, 24, 16)
    assert sd['layers.1.pos_ff.experts.htoh4.bias'].shape == (4, 24)
    assert sd['layers.1.pos_ff.experts.h4toh.weight'].shape == (4, 16, 24)
    assert sd['layers.1.pos_ff.experts.h4toh.bias'].shape == (4, 16)
    assert sd['layers.0.pos_ff.layer_norm.weight'].shape == (16,)
    assert not any('CoreNet' in k for k in sd)
    data = torch.randint(0, 40, (7, 3))
    out, moe_stats = model(data[:6], data[1:7], return_moe_stats=True)
    load = model.moe_load(moe_stats)
    assert load.shape == (2, 4) and load.sum(1).tolist() == [6 * 3 * 2] * 2
    (out[0].mean() + model.aux_loss(moe_stats)).backward()
    assert model.layers[0].pos_ff.experts.htoh4.weight.grad.abs().sum() > 0
    assert model.layers[0].pos_ff.gate.gate.weight.grad.abs().sum() > 0


def test_moe_with_identical_experts_equals_the_dense_model():
    """All experts equal to the dense FFN and top_k = num_expert: the scores sum to 1,
    so the mixture is the dense feed-forward and the whole model agrees."""
    dense = tiny_model()
    moe = tiny_model(moe=True, moe_num_expert=3, moe_top_k=3)
    sd = {k: v for k, v in dense.state_dict().items() if 'CoreNet' not in k}
    for i in range(2):
        core = dense.layers[i].pos_ff.CoreNet
        for name, lin in (('htoh4', core[0]), ('h4toh', core[3])):
            sd[f'layers.{i}.pos_ff.experts.{name}.weight'] = lin.weight.detach().expand(3, -1, -1).clone()
            sd[f'layers.{i}.pos_ff.experts.{name}.bias'] = lin.bias.detach().expand(3, -1).clone()
        sd[f'layers.{i}.pos_ff.gate.gate.weight'] = torch.randn(3, 16)
        sd[f'layers.{i}.pos_ff.gate.gate.bias'] = torch.randn(3)
    moe.load_state_dict(sd, strict=True)
    data = torch.randint(0, 40, (13, 2))
    dense_losses, _ = run_segments(dense, data, 6)
    moe_losses, _ = run_segments(moe, data, 6)
    torch.testing.assert_close(torch.cat(moe_losses), torch.cat(dense_losses), atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_uses_the_coefficients():
    model = tiny_model(moe=True, moe_num_expert=4, moe_top_k=2, moe_gate='gshard',
                       moe_balance_coef=0.5, moe_zloss_coef=0.25).train()
    data = torch.randint(0, 40, (7, 3))
    out, moe_stats = model(data[:6], data[1:7], return_moe_stats=True)
    assert len(out) == 1 + 3 and len(moe_stats) == 2   # [loss, *mems] (the embedding's and each layer's), a MoEStats per layer
    expected = sum(0.5 * stats.balance_loss + 0.25 * stats.z_loss for stats in moe_stats)
    torch.testing.assert_close(model.aux_loss(moe_stats), expected)
    assert all(stats.z_loss > 0 for stats in moe_stats)
    assert model.moe_balance_loss(moe_stats).shape == (2,) and (model.moe_balance_loss(moe_stats) > 0).all()
    dense = tiny_model()
    out, moe_stats = dense(data[:6], data[1:7], return_moe_stats=True)
    assert moe_stats == [] and dense.aux_loss(moe_stats).item() == 0 and dense.moe_load(moe_stats) is None


@pytest.mark.parametrize('moe', [False, True])
def test_a_forward_leaves_no_tensor_on_the_model(moe):
    """The statistics of a forward are returned, never kept: after a training forward and backward no module holds
    a tensor it did not hold before (parameters and buffers aside), and the model deep-copies (autograd's
    non-leaf tensors cannot be)."""
    model = tiny_model(**(dict(moe=True, moe_num_expert=4, moe_top_k=2, moe_gate='gshard') if moe else {})).train()

    def tensors(value):
        if torch.is_tensor(value):
            return [value]
        if isinstance(value, dict):
            value = list(value.values())
        return [t for v in value for t in tensors(v)] if isinstance(value, (list, tuple)) else []

    def holding_tensors():   # (module, attribute) holding a tensor, in containers too; parameters, buffers aside
        return {(name, key) for name, module in model.named_modules() for key, value in vars(module).items()
                if key not in ('_parameters', '_buffers', '_modules') and tensors(value)}
    before = holding_tensors()
    data = torch.randint(0, 40, (7, 3))
    out, moe_stats = model(data[:6], data[1:7], return_moe_stats=True)
    (out[0].mean() + model.aux_loss(moe_stats)).backward()
    # the cache of masks and position tables by shape holds constants, outside any graph
    assert holding_tensors() - before == {('', '_shape_cache')}
    assert not any(t.requires_grad for t in tensors(model._shape_cache))
    assert len(moe_stats) == (2 if moe else 0)
    assert all(any(t.grad_fn is not None for t in stats) for stats in moe_stats)   # what a kept copy would block
    copy.deepcopy(model)


def test_init_weights_covers_the_experts_and_gate():
    torch.manual_seed(0)
    model = MemTransformerLM(30, 1, 2, 32, 16, 64, 0.1, 0.0, tgt_len=4, mem_len=4, ext_len=0,
                             moe=True, moe_num_expert=8, moe_top_k=2)
    init_weights(model, init_std=0.02)
    ff = model.layers[0].pos_ff
    assert abs(ff.experts.htoh4.weight.std().item() - 0.02) < 0.002
    assert abs(ff.gate.gate.weight.std().item() - 0.02) < 0.004
    assert torch.count_nonzero(ff.experts.h4toh.bias) == 0 and torch.count_nonzero(ff.gate.gate.bias) == 0


def test_parameter_counts_count_a_tied_weight_once():
    model = tiny_model(tie_weight=True, moe=True, moe_num_expert=4, moe_top_k=2)
    counts = model.parameter_counts()
    assert counts['total'] == sum(p.numel() for p in model.parameters())
    # every name of a parameter (as a state dict lists them) names the tied softmax weight twice (word_emb and
    # out_layer): 40 tokens x 16 once too many
    named = model.named_parameters(remove_duplicate=False)
    assert counts['total'] == sum(p.numel() for _, p in named) - 40 * 16
    assert counts['layers'] == sum(p.numel() for p in model.layers.parameters())
    # each layer's experts: 4 x (16 x 24 + 24 + 24 x 16 + 16) weights and biases
    assert counts['experts'] == 2 * 4 * (16 * 24 + 24 + 24 * 16 + 16)
