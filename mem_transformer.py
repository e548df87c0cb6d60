"""Transformer-XL (Dai et al., 2019) with an optional Mixture-of-Experts feed-forward.

A faithful port of the original PyTorch `mem_transformer.py` and of FastMoE's
`examples/transformer-xl`: the constructor, `forward(data, target, *mems)`,
the memory semantics and every parameter name are the original's, so original
and FastMoE checkpoints load with `strict=True`.

Shapes follow the original: sequences are time-major, [len, bsz, d_model].
Attention runs heads-first, [bsz, n_head, len, d_head] with scores
[bsz, n_head, qlen, klen]: the products are batched matmuls and the softmax runs
over contiguous keys. tests/reference_attention.py holds the original's
seq-first einsums, which tests/test_fast_paths.py checks this against.
"""
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.log_uniform_sampler import LogUniformSampler, sample_logits
from moe import FMoETransformerMLP, FusedExpertLinear, MoEConfig, check_expert_backend, probe_before_compile
from utils.config import (OptionError, all_checks, at_least_zero, check_options, option, plain, positive,
                          probability)
from utils.errors import ConfigError
from utils.proj_adaptive_softmax import ProjectedAdaptiveLogSoftmax, rename_projection_keys

class PositionalEmbedding(nn.Module):
    def __init__(self, demb):
        super().__init__()
        self.demb = demb
        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb))
        self.register_buffer('inv_freq', inv_freq)

    def forward(self, pos_seq):
        """[len] positions -> [len, 1, demb] sinusoids (broadcast over the batch)."""
        sinusoid_inp = torch.outer(pos_seq, self.inv_freq)
        return torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)[:, None, :]


class Dropout(nn.Dropout):
    """nn.Dropout, with a faster CPU training path: one fp32 uniform draw per
    element, kept where it is >= p, instead of bernoulli_, which is slower on
    CPUs (bench/README.md). The arithmetic is ATen's (x * (keep / (1 - p))),
    so is the law; the random stream, from the same generator, differs:
    fast = False (MemTransformerLM.set_fast_paths(dropout=False)) gives
    nn.Dropout's masks."""

    fast = True

    def forward(self, x):
        if not (self.fast and self.training and 0 < self.p < 1 and x.device.type == 'cpu'):
            return super().forward(x)
        noise = (torch.rand(x.shape, device=x.device) >= self.p).to(x.dtype).div_(1 - self.p)
        return x * noise


def residual_norm(inp, core, layer_norm, pre_lnorm):
    """Residual around `core`, with LayerNorm before it (pre-LN) or after the sum (post-LN)."""
    if pre_lnorm:
        return inp + core(layer_norm(inp))
    return layer_norm(inp + core(inp))


class PositionwiseFF(nn.Module):
    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False):
        super().__init__()
        self.d_model = d_model
        self.d_inner = d_inner
        self.dropout = dropout
        self.CoreNet = nn.Sequential(
            nn.Linear(d_model, d_inner), nn.ReLU(),
            Dropout(dropout),
            nn.Linear(d_inner, d_model),
            Dropout(dropout),
        )
        self.layer_norm = nn.LayerNorm(d_model)
        self.pre_lnorm = pre_lnorm

    def forward(self, inp):
        return residual_norm(inp, self.CoreNet, self.layer_norm, self.pre_lnorm)


class MoEPositionwiseFF(FMoETransformerMLP):
    """FastMoE's CustomizedMoEPositionwiseFF: experts are ReLU -> Dropout MLPs,
    then dropout, residual and LayerNorm around the mixture."""

    def __init__(self, d_model, d_inner, dropout, pre_lnorm=False, config=MoEConfig()):
        activation = nn.Sequential(nn.ReLU(), Dropout(dropout))
        super().__init__(d_model=d_model, d_hidden=d_inner, activation=activation, config=config)
        self.pre_lnorm = pre_lnorm
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, inp):
        """-> (output, the mixture's moe.MoEStats)."""
        mixture, stats = super().forward, []

        def branch(x):
            out, layer_stats = mixture(x)
            stats.append(layer_stats)
            return self.dropout(out)
        return residual_norm(inp, branch, self.layer_norm, self.pre_lnorm), stats[0]


def rel_shift(x):
    """Turn scores indexed by relative distance into scores indexed by key position.

    x[..., i, d] holds the score of query i against the key `klen - 1 - d` steps
    back (positions are fed in decreasing order); the result holds at [..., i, j]
    the score for key j, i.e. x[..., i, j + qlen - 1 - i]. Entries above the
    causal diagonal (j > i + mlen) get other rows' values; they are always masked.

    Without a gradient it is one strided view: row i of the result starts
    qlen - 1 - i elements into row i of x. With a gradient we pad one zero
    column and re-read the buffer with one more row (Transformer-XL, appendix
    B), because autograd's backward of an overlapping strided view is slower
    than the pad's (bench/README.md); and inside torch.compile, which cannot
    trace an overlapping view.
    """
    qlen, klen = x.shape[-2:]
    if (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        zero_pad = x.new_zeros(x.shape[:-1] + (1,))
        x_padded = torch.cat([zero_pad, x], dim=-1).view(*x.shape[:-2], klen + 1, qlen)
        return x_padded[..., 1:, :].view_as(x)
    x = x.contiguous()
    return x.as_strided(x.shape, x.stride()[:-2] + (klen - 1, 1), x.storage_offset() + qlen - 1)


def pad_or_trim_front(t, length):
    """The last `length` rows of t; when t is shorter, its first row repeated in front."""
    if length > t.size(0):
        pad = t[0:1].expand(length - t.size(0), *t.shape[1:])
        return torch.cat([pad, t], 0)
    return t[t.size(0) - length:]


def use_sdpa(q, pos_score, dropatt):
    """Whether F.scaled_dot_product_attention can stand in for the explicit softmax.

    Its dropout draws its own random stream, so not while dropatt is active.
    Never when the position scores (an additive bias) need a gradient, on any
    device: the CPU kernels return none for the bias, and the GPU backends that
    accept a bias needing one are not verified here (cuDNN's masked backward has
    open issues); so SDPA serves evaluation and the absolute attention types.
    On the CPU it pays only in fp32 (its bf16 kernel is slower than the explicit
    path, bench/README.md).
    """
    if dropatt.training and dropatt.p > 0:
        return False
    if pos_score is not None and pos_score.requires_grad and torch.is_grad_enabled():
        return False
    return q.device.type != 'cpu' or q.dtype in (torch.float32, torch.float64)


def attention(q, k, v, attn_mask, pos_score, dropatt, sdpa=True):
    """softmax(q·k + pos_score, masked) · v, the probabilities through dropatt, with q and pos_score
    already scaled by 1/sqrt(d_head) (Attention.scaled).

    q [bsz, n_head, qlen, d_head]; k, v [bsz, n_head, klen, d_head]; pos_score
    [bsz|1, n_head, qlen, klen] or None; attn_mask [qlen, klen] bool, True where
    a query may not attend -> [bsz, n_head, qlen, d_head]. sdpa: through
    F.scaled_dot_product_attention where it is exact and faster (use_sdpa).
    """
    if sdpa and use_sdpa(q, pos_score, dropatt):
        if pos_score is None:  # SDPA's boolean mask marks the keys that may be attended
            bias = None if attn_mask is None else ~attn_mask
        else:
            bias = pos_score if attn_mask is None else pos_score.masked_fill(attn_mask, -float('inf'))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.)
    score = torch.matmul(q, k.transpose(-1, -2))
    if pos_score is not None:
        score = score + pos_score
    if attn_mask is not None:
        score = score.masked_fill(attn_mask, -float('inf'))
    prob = dropatt(F.softmax(score, dim=-1))
    return torch.matmul(prob, v)


class Attention(nn.Module):
    """What the four attention types share: heads [bsz, n_head, len, d_head],
    the masked softmax over keys (scores [bsz, n_head, qlen, klen]), the output
    projection, dropout, residual and LayerNorm. An attention type adds its
    input projections and its position scores."""

    sdpa = True  # MemTransformerLM.set_fast_paths(sdpa=False): the explicit softmax only

    def __init__(self, n_head, d_model, d_head, dropout, dropatt=0, pre_lnorm=False):
        super().__init__()
        self.n_head = n_head
        self.d_model = d_model
        self.d_head = d_head
        self.dropout = dropout
        # Input projections are made before o_net, as in the original, so that
        # a seeded construction consumes the random stream in the same order.
        self._make_input_nets()
        self.drop = Dropout(dropout)
        self.dropatt = Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.scale = 1 / (d_head ** 0.5)
        self.pre_lnorm = pre_lnorm
        self.kv_cache = None  # relative attention, inside kv_caching(): a KVCache

    def _make_input_nets(self):
        raise NotImplementedError

    def heads(self, x):
        """[len, bsz, n_head * d_head] -> [bsz, n_head, len, d_head]."""
        return x.view(x.size(0), x.size(1), self.n_head, self.d_head).permute(1, 2, 0, 3)

    @staticmethod
    def per_head(bias):
        """A [n_head, d_head] bias, broadcast over the positions of heads."""
        return bias[:, None]

    @staticmethod
    def position_scores(q, r):
        """q·r for every query and relative distance: r [klen, n_head, d_head] -> [bsz, n_head, qlen, klen]."""
        return torch.matmul(q, r.permute(1, 2, 0))

    def scaled(self, *xs):
        """xs times 1/sqrt(d_head). Queries (and the biases added to them) are scaled before the
        products rather than the scores after them: the same function, but fp16 scores stay in range."""
        return [x * self.scale for x in xs]

    rel_shift = staticmethod(rel_shift)
    attention = staticmethod(attention)

    def attend(self, h, q, k, v, attn_mask, pos_score=None):
        """h [qlen, bsz, d_model] residual input; q, k, v heads, pos_score scores, q and pos_score
        scaled by 1/sqrt(d_head) (see scaled); attn_mask [qlen, klen] bool, True = may not attend."""
        vec = self.attention(q, k, v, attn_mask, pos_score, self.dropatt, self.sdpa)
        vec = vec.permute(2, 0, 1, 3)
        out = self.drop(self.o_net(vec.reshape(vec.size(0), vec.size(1), -1)))
        return h + out if self.pre_lnorm else self.layer_norm(h + out)


class KVCache:
    """The rows a relative-attention layer last projected, with their keys and
    values, and its last position projection.

    The memory of a call is the tail of the rows the layer saw in the call
    before, so when it is (checked exactly) only the new rows are projected:
    a decoding step costs O(1) projections instead of O(mem_len), an
    evaluation segment O(tgt_len) instead of O(mem_len + tgt_len). Used only
    inside kv_caching() and without gradients.
    """

    def __init__(self):
        self.rows = self.k = self.v = None   # [len, bsz, d_model], [len, bsz, n_head * d_head] x 2
        self.r = self.r_head_k = None

    def lookup(self, mems):
        """(k, v) of the rows of `mems`, or None when they are not the tail of the stored rows."""
        if self.rows is None or mems.size(0) > self.rows.size(0):
            return None
        n = mems.size(0)
        start = self.rows.size(0) - n
        if not torch.equal(self.rows[start:], mems):
            return None
        return self.k[start:], self.v[start:]

    def store(self, rows, k, v):
        self.rows, self.k, self.v = rows, k, v

    def positions(self, r, r_net):
        """r_net(r), projected again only when r changes (it depends on klen alone)."""
        if self.r is None or not (self.r is r or (self.r.shape == r.shape and torch.equal(self.r, r))):
            self.r, self.r_head_k = r, r_net(r)
        return self.r_head_k


def new_kv_caches(model):
    """A fresh KVCache for each relative-attention layer of `model` (none for attn_type 2 and 3)."""
    return {layer.dec_attn: KVCache() for layer in model.layers
            if isinstance(layer.dec_attn, RelMultiHeadAttn)}


@contextmanager
def kv_caching(caches):
    """Inside this block, calls without gradients keep each layer's keys and values in `caches`
    (from new_kv_caches) for the next call; a training step is never affected."""
    for attn, cache in caches.items():
        attn.kv_cache = cache
    try:
        yield caches
    finally:
        for attn in caches:
            attn.kv_cache = None


class MultiHeadAttn(Attention):
    """Absolute-position attention (attn_type 2 and 3)."""

    def _make_input_nets(self):
        self.q_net = nn.Linear(self.d_model, self.n_head * self.d_head, bias=False)
        self.kv_net = nn.Linear(self.d_model, 2 * self.n_head * self.d_head, bias=False)

    def forward(self, h, attn_mask=None, mems=None):
        c = h if mems is None else torch.cat([mems, h], 0)
        if self.pre_lnorm:
            c = self.layer_norm(c)
        # As in the original, queries come from the un-normalized h even in pre-LN.
        head_q, = self.scaled(self.heads(self.q_net(h)))
        head_k, head_v = map(self.heads, torch.chunk(self.kv_net(c), 2, dim=-1))
        return self.attend(h, head_q, head_k, head_v, attn_mask)


class RelMultiHeadAttn(Attention):
    """Relative-position attention: one projection for queries, keys and values
    over [memory; segment], queries kept for the segment only."""

    def _make_input_nets(self):
        self.qkv_net = nn.Linear(self.d_model, 3 * self.n_head * self.d_head, bias=False)

    def active_cache(self):
        # Never in training (the weights change between steps), nor in a compiled graph (the cache is
        # Python state that a graph would freeze).
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        return self.kv_cache

    def project(self, w, mems):
        cat = w if mems is None else torch.cat([mems, w], 0)
        cache = self.active_cache()
        cached = cache.lookup(mems) if cache is not None and mems is not None else None
        if cached is not None:
            # The memory's keys and values are known: project the new rows only.
            q, k, v = torch.chunk(self.qkv_net(self.layer_norm(w) if self.pre_lnorm else w), 3, dim=-1)
            k, v = torch.cat([cached[0], k], 0), torch.cat([cached[1], v], 0)
        else:
            normed = self.layer_norm(cat) if self.pre_lnorm else cat
            q, k, v = self.project_rows(normed, w.size(0))
        if cache is not None:
            cache.store(cat, k, v)
        return self.heads(q), self.heads(k), self.heads(v)

    def project_rows(self, rows, qlen):
        """Queries of the last qlen rows, keys and values of all: with a memory only the segment
        needs queries, so the memory is projected to keys and values alone."""
        if qlen == rows.size(0):
            return torch.chunk(self.qkv_net(rows), 3, dim=-1)
        inner = self.n_head * self.d_head
        q = F.linear(rows[-qlen:], self.qkv_net.weight[:inner])
        k, v = torch.chunk(F.linear(rows, self.qkv_net.weight[inner:]), 2, dim=-1)
        return q, k, v


class RelPartialLearnableMultiHeadAttn(RelMultiHeadAttn):
    """attn_type 0, the paper's: score = (q + u)·k + rel_shift((q + v)·W_r r).

    The biases u, v (r_w_bias, r_r_bias) are the model's, shared by every layer as in the
    original PyTorch code, or with untie_r this layer's own, as in the TensorFlow code and the
    Hugging Face checkpoints (keys layers.N.dec_attn.r_w_bias). Empty parameters draw no random
    numbers, so a seeded construction is the same either way."""

    def __init__(self, *args, untie_r=False, **kwargs):
        super().__init__(*args, **kwargs)
        if untie_r:
            self.r_r_bias = nn.Parameter(torch.empty(self.n_head, self.d_head))
            self.r_w_bias = nn.Parameter(torch.empty(self.n_head, self.d_head))
        self.r_net = nn.Linear(self.d_model, self.n_head * self.d_head, bias=False)

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask=None, mems=None):
        q, k, v = self.project(w, mems)
        cache = self.active_cache()
        r_head_k = self.r_net(r) if cache is None else cache.positions(r, self.r_net)
        r_head_k = r_head_k.view(r.size(0), self.n_head, self.d_head)
        q, u, v_bias = self.scaled(q, self.per_head(r_w_bias), self.per_head(r_r_bias))
        BD = self.rel_shift(self.position_scores(q + v_bias, r_head_k))
        return self.attend(w, q + u, k, v, attn_mask, BD)


class RelLearnableMultiHeadAttn(RelMultiHeadAttn):
    """attn_type 1: learnable relative embeddings r_emb and biases r_bias per distance."""

    def forward(self, w, r_emb, r_w_bias, r_bias, attn_mask=None, mems=None):
        q, k, v = self.project(w, mems)
        klen = w.size(0) + (0 if mems is None else mems.size(0))
        r_emb, r_bias = pad_or_trim_front(r_emb, klen), pad_or_trim_front(r_bias, klen)
        D_ = r_bias.t()[:, None]  # per head and distance
        q, u, D_ = self.scaled(q, self.per_head(r_w_bias), D_)
        B_ = self.position_scores(q, r_emb)
        return self.attend(w, q + u, k, v, attn_mask, self.rel_shift(B_ + D_))


class DecoderLayer(nn.Module):
    """Attention (any type) followed by the position-wise feed-forward (dense or MoE)."""

    def __init__(self, dec_attn, pos_ff):
        super().__init__()
        self.dec_attn = dec_attn
        self.pos_ff = pos_ff

    def forward(self, dec_inp, *pos_args, dec_attn_mask=None, mems=None):
        """-> (output, the MoE feed-forward's moe.MoEStats, or None for a dense one)."""
        out = self.dec_attn(dec_inp, *pos_args, attn_mask=dec_attn_mask, mems=mems)
        if isinstance(self.pos_ff, MoEPositionwiseFF):
            return self.pos_ff(out)
        return self.pos_ff(out), None


class Positions:
    """How an attention type brings positions into one forward pass; one subclass per attn_type.

    The class says which attention layer the type uses and creates the model's position parameters (with
    the original's names, in the original's order); an instance, made per forward, gives the first hidden
    state, each layer's input, the memory it attends to and the position arguments of its attention.
    """

    attention = None     # the attention layer class
    description = ''

    @staticmethod
    def create_params(model):
        pass

    def __init__(self, model, word_emb, qlen, mlen):
        self.model, self.qlen, self.mlen = model, qlen, mlen
        self.klen = qlen + mlen

    def embed(self, word_emb):
        """The first hidden state."""
        return self.model.drop(word_emb)

    def layer_input(self, i, h):
        """Layer i's input, kept as hidden state i (in the memory too)."""
        return h

    def memory(self, i, mem):
        """The memory layer i attends to; the original added positions to it in place, so it is also what
        the next memory keeps."""
        return mem

    def layer_args(self, i):
        """The position arguments of layer i's attention."""
        return ()


class RelativeSinusoids(Positions):
    """attn_type 0 (Transformer-XL): sinusoids of relative distances, projected per layer; biases u, v
    shared by the layers (or each layer's own with untie_r)."""

    attention = RelPartialLearnableMultiHeadAttn
    description = 'relative positions, global biases (Transformer-XL)'

    @staticmethod
    def create_params(model):
        model.pos_emb = PositionalEmbedding(model.d_model)
        if not model.untie_r:  # else each layer has its own (RelPartialLearnableMultiHeadAttn)
            model.r_w_bias = nn.Parameter(torch.empty(model.n_head, model.d_head))
            model.r_r_bias = nn.Parameter(torch.empty(model.n_head, model.d_head))

    def __init__(self, model, word_emb, qlen, mlen):
        super().__init__(model, word_emb, qlen, mlen)
        self.pos_emb = model._position_embedding(self.klen, word_emb)

    def embed(self, word_emb):
        core_out = self.model.drop(word_emb)
        self.pos_emb = self.model.drop(self.pos_emb)  # after the embedding's dropout, as the original
        return core_out

    def layer_args(self, i):
        biases = self.model.layers[i].dec_attn if self.model.untie_r else self.model
        return self.pos_emb, biases.r_w_bias, biases.r_r_bias


class RelativeLearnt(Positions):
    """attn_type 1 (Shaw et al.): a learnt embedding and bias per relative distance and layer."""

    attention = RelLearnableMultiHeadAttn
    description = 'relative learnable embeddings (Shaw et al.)'

    @staticmethod
    def create_params(model):
        model.r_emb = nn.Parameter(torch.empty(model.n_layer, model.max_klen, model.n_head, model.d_head))
        model.r_w_bias = nn.Parameter(torch.empty(model.n_layer, model.n_head, model.d_head))
        model.r_bias = nn.Parameter(torch.empty(model.n_layer, model.max_klen, model.n_head))

    def layer_args(self, i):
        model = self.model
        r_emb, r_bias = model.r_emb[i], model.r_bias[i]
        if model.clamp_len > 0:
            r_emb, r_bias = r_emb[-model.clamp_len:], r_bias[-model.clamp_len:]
        return r_emb, model.r_w_bias[i], r_bias


class AbsoluteSinusoids(Positions):
    """attn_type 2 (vanilla Transformer): sinusoids of absolute positions added to the embeddings (and to
    the embeddings' memory)."""

    attention = MultiHeadAttn
    description = 'absolute sinusoids (vanilla Transformer)'

    @staticmethod
    def create_params(model):
        model.pos_emb = PositionalEmbedding(model.d_model)

    def __init__(self, model, word_emb, qlen, mlen):
        super().__init__(model, word_emb, qlen, mlen)
        self.pos_emb = model._position_embedding(self.klen, word_emb)

    def embed(self, word_emb):
        return self.model.drop(word_emb + self.pos_emb[-self.qlen:])

    def memory(self, i, mem):
        return mem + self.pos_emb[:self.mlen] if i == 0 else mem


class AbsoluteLearnt(Positions):
    """attn_type 3 (Al-Rfou et al.): a learnt embedding per absolute position, added to every layer's input
    and memory."""

    attention = MultiHeadAttn
    description = 'absolute learnable embeddings per layer (Al-Rfou et al.)'

    @staticmethod
    def create_params(model):
        model.r_emb = nn.Parameter(torch.empty(model.n_layer, model.max_klen, model.n_head, model.d_head))

    def layer_input(self, i, h):
        return h + self.model.r_emb[i][-self.qlen:].view(self.qlen, 1, -1)

    def memory(self, i, mem):
        emb = pad_or_trim_front(self.model.r_emb[i][:-self.qlen], self.mlen)
        return mem + emb.view(self.mlen, 1, -1)


ATTN_TYPES = {0: RelativeSinusoids, 1: RelativeLearnt, 2: AbsoluteSinusoids, 3: AbsoluteLearnt}


class AdaptiveEmbedding(nn.Module):
    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1):
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.cutoffs = list(cutoffs) + [n_token]
        self.div_val = div_val
        self.d_proj = d_proj
        self.emb_scale = d_proj ** 0.5
        self.cutoff_ends = [0] + self.cutoffs

        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i in range(len(self.cutoffs)):
                l_idx, r_idx = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_emb_i = d_embed // (div_val ** i)
                self.emb_layers.append(nn.Embedding(r_idx - l_idx, d_emb_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i)))
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *args: rename_projection_keys(sd, prefix, 'emb_projs'))

    def forward(self, inp):
        if self.div_val == 1:
            embed = self.emb_layers[0](inp)
            if self.d_proj != self.d_embed:
                # In the parameters' dtype, as the div_val > 1 branch: under autocast the
                # projection is bf16, and the embedding is the first memory and residual.
                embed = F.linear(embed, self.emb_projs[0]).to(self.emb_projs[0].dtype)
        else:
            param = self.emb_projs[0]
            inp_flat = inp.reshape(-1)
            emb_flat = torch.zeros([inp_flat.size(0), self.d_proj],
                                   dtype=param.dtype, device=param.device)
            for i in range(len(self.cutoffs)):
                l_idx, r_idx = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                indices_i = ((inp_flat >= l_idx) & (inp_flat < r_idx)).nonzero().squeeze(1)
                if indices_i.numel() == 0:
                    continue
                emb_i = self.emb_layers[i](inp_flat.index_select(0, indices_i) - l_idx)
                emb_i = F.linear(emb_i, self.emb_projs[i])
                emb_flat.index_copy_(0, indices_i, emb_i.to(emb_flat.dtype))
            embed = emb_flat.view(*inp.size(), self.d_proj)
        return embed * self.emb_scale


def attention_mask(qlen, mlen, mem_len, same_length, device):
    """[qlen, klen] bool, True where query i may not see key j: keys after it and,
    with same_length, keys more than mem_len back, so every query sees as many keys."""
    klen = mlen + qlen
    dist = torch.arange(klen, device=device)[None, :] - torch.arange(qlen, device=device)[:, None]
    mask = dist > mlen
    if same_length:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        mask = mask | (dist <= -mask_shift_len)
    return mask


def _cutoffs_fit(cutoffs, c):
    if any(not 0 < x < c.n_token for x in cutoffs) or list(cutoffs) != sorted(set(cutoffs)):
        return 'must be strictly increasing and within (0, {n_token})'
    return None


def _tie_projs_fit(tie_projs, c):
    if isinstance(c.cutoffs, tuple) and len(tie_projs) > len(c.cutoffs) + 1:
        return f'{len(tie_projs)} entries, more than the {len(c.cutoffs) + 1} clusters of {{cutoffs}}'
    return None


def _div_val_fits(div_val, c):
    if div_val > 1 and c.d_embed // div_val ** len(c.cutoffs) < 1:
        return 'the last cluster of {d_embed} would have no dimensions'
    return None


def _attn_type_known(attn_type, c):
    if attn_type not in ATTN_TYPES:
        return 'unknown attention type; known: ' + ', '.join(f'{k} ({v.description})' for k, v in ATTN_TYPES.items())
    return None


def _tgt_len_fits(tgt_len, c):
    if tgt_len is not None and tgt_len < 1:
        return 'must be a positive integer'
    if c.attn_type in (1, 3) and not tgt_len:
        return '{attn_type} sizes its position table by tgt_len + ext_len + mem_len'
    return None


def _d_head_fits(d_head, c):
    if d_head < 1:
        return 'must be a positive integer'
    if c.attn_type == 3 and c.n_head * d_head != c.d_model:
        return ('{attn_type} adds per-head position embeddings to the hidden state, so n_head * d_head must '
                'equal {d_model}')
    return None


def _sample_softmax_fits(sample_softmax, c):
    if sample_softmax > 0 and (c.div_val != 1 or c.d_embed != c.d_model):
        return 'the sampled softmax needs div_val=1 and d_embed=d_model'
    return None


def _untie_r_fits(untie_r, c):
    return 'only attn_type 0 shares r_w_bias/r_r_bias across layers ({attn_type})' if untie_r and c.attn_type else None


@dataclass(frozen=True, eq=False)
class ModelConfig(Mapping):
    """Everything that defines a MemTransformerLM, checked when made: MemTransformerLM(config).

    Each option is defined here once, with its train.py flag (the original's names, defaults and help).
    It reads as the flat dict of MemTransformerLM's keywords (config['moe_top_k'], dict(config)), which is
    also what model.pt and checkpoint.pt store, as plain data: ModelConfig.from_dict reads it back.
    """
    n_token: int = option(help='vocabulary size', check=positive)
    n_layer: int = option(12, 'number of layers', '--n_layer', positive)
    n_head: int = option(10, 'number of attention heads', '--n_head', positive)
    d_model: int = option(500, 'model dimension', '--d_model', positive)
    d_head: int = option(50, 'dimension of each head', '--d_head', _d_head_fits)
    d_inner: int = option(1000, 'inner dimension of the feed-forward (of each expert)', '--d_inner', positive)
    dropout: float = option(0.0, 'global dropout rate', '--dropout', probability)
    dropatt: float = option(0.0, 'attention probability dropout rate', '--dropatt', probability)
    tie_weight: bool = option(True, 'do not tie the word embedding and softmax weights', '--not_tied',
                              negated=True)
    d_embed: int = option(-1, 'embedding dimension (-1: d_model)', '--d_embed', positive)
    div_val: int = option(1, 'divident value for adaptive input and softmax', '--div_val',
                          all_checks(positive, _div_val_fits))
    tie_projs: Tuple[bool, ...] = option((False,), 'tie the adaptive softmax projections to the embedding\'s',
                                         check=_tie_projs_fit)
    pre_lnorm: bool = option(False, 'apply LayerNorm to the input instead of the output', '--pre_lnorm')
    tgt_len: Optional[int] = option(70, 'number of tokens to predict', '--tgt_len', _tgt_len_fits)
    ext_len: int = option(0, 'length of the extended context', '--ext_len', at_least_zero)
    mem_len: int = option(0, 'length of the retained previous heads', '--mem_len', at_least_zero)
    cutoffs: Tuple[int, ...] = option((), 'adaptive softmax cluster boundaries', check=_cutoffs_fit)
    adapt_inp: bool = option(False, "the original's, unused")
    same_length: bool = option(False, 'use the same attn length for all tokens', '--same_length')
    attn_type: int = option(0, 'attention type. 0 for ours, 1 for Shaw et al, 2 for Vaswani et al, 3 for Al Rfou '
                            'et al.', '--attn_type', _attn_type_known)
    clamp_len: int = option(-1, 'use the same pos embeddings after clamp_len', '--clamp_len')
    sample_softmax: int = option(-1, 'number of samples in sampled softmax', '--sample_softmax',
                                 _sample_softmax_fits)
    moe: bool = option(False, 'replace the position-wise FFN with a Mixture of Experts', '--moe')
    moe_options: MoEConfig = field(default_factory=MoEConfig)   # the MoE layers' (their keys: moe_top_k, ...)
    untie_r: bool = option(False, 'attn_type 0: a pair of r_w_bias/r_r_bias per layer (the TensorFlow and Hugging '
                           'Face models) instead of one pair shared by all layers (the original PyTorch code)',
                           '--untie_r', _untie_r_fits)

    def __post_init__(self):
        # The spellings of "the default" that older callers and files use: d_embed None or -1 is d_model,
        # no length is 0; lists become tuples (the configuration is immutable).
        resolved = dict(d_embed=self.d_model if self.d_embed in (None, -1) else self.d_embed,
                        ext_len=self.ext_len or 0, mem_len=self.mem_len or 0)
        for name in ('tie_projs', 'cutoffs'):
            value = getattr(self, name)
            resolved[name] = tuple(value) if isinstance(value, (list, tuple)) else value
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        check_options(self)

    # ---------------------------------------------------------------- the flat view: keywords and plain data
    @classmethod
    def keys_in_order(cls):
        """MemTransformerLM's keywords, in the original constructor's order (the MoE options as moe_*)."""
        out = []
        for f in fields(cls):
            if f.name == 'moe_options':
                out += [MOE_PREFIX + g.name for g in fields(MoEConfig)]
            else:
                out.append(f.name)
        return tuple(out)

    def __getitem__(self, key):
        if key.startswith(MOE_PREFIX) and key in MOE_KEYS:
            return plain(getattr(self.moe_options, key[len(MOE_PREFIX):]))
        if key == 'moe_options' or key not in FLAT_KEYS:
            raise KeyError(key)
        return plain(getattr(self, key))

    def __iter__(self):
        return iter(FLAT_KEYS)

    def __len__(self):
        return len(FLAT_KEYS)

    @classmethod
    def from_dict(cls, flat):
        """The configuration a flat dict of keywords describes (what checkpoints store); an option it does not
        name (a file written before the option existed) takes its default. A ConfigError for a bad value.
        A dense model's MoE options shape nothing: ones MoEConfig rejects (an older file's, or the original
        constructor's, which ignores them without moe) take their defaults rather than refuse the model."""
        unknown = [k for k in flat if k not in FLAT_KEYS]
        if unknown:
            raise ConfigError(f'unknown model option {unknown[0]!r}; known: {", ".join(FLAT_KEYS)}')
        moe = {k[len(MOE_PREFIX):]: v for k, v in flat.items() if k in MOE_KEYS}
        try:
            moe_options = MoEConfig(**moe)
        except OptionError as e:
            if flat.get('moe', False):
                raise e.with_prefix(MOE_PREFIX) from None
            moe_options = MoEConfig()
        return cls(**{k: v for k, v in flat.items() if k not in MOE_KEYS}, moe_options=moe_options)

    @classmethod
    def from_keywords(cls, *args, **kwargs):
        """The original constructor's call: MemTransformerLM(n_token, n_layer, n_head, d_model, d_head, d_inner,
        dropout, dropatt, tie_weight, ...), positionally up to FastMoE's last one (moe_top_k), with keywords for
        the rest: a newer option is a keyword only, so adding one moves no position."""
        if len(args) > len(POSITIONAL_KEYS):
            raise TypeError(f'MemTransformerLM takes at most {len(POSITIONAL_KEYS)} positional options '
                            f'({", ".join(POSITIONAL_KEYS)}); give the others as keywords')
        given = dict(zip(POSITIONAL_KEYS, args))
        twice = [k for k in kwargs if k in given]
        if twice:
            raise TypeError(f'MemTransformerLM got {twice[0]!r} both by position and by keyword')
        return cls.from_dict({**given, **kwargs})

    def replace(self, **changes):
        """A copy with some options changed, given as keywords (moe_top_k=1), checked again."""
        return ModelConfig.from_dict({**self, **changes})

    def to_dict(self):
        """Plain data: what model.pt and checkpoint.pt store."""
        return dict(self)


MOE_PREFIX = 'moe_'
MOE_KEYS = frozenset(MOE_PREFIX + f.name for f in fields(MoEConfig))
FLAT_KEYS = ModelConfig.keys_in_order()
POSITIONAL_KEYS = FLAT_KEYS[:FLAT_KEYS.index('moe_top_k') + 1]   # FastMoE's MemTransformerLM signature


class MemTransformerLM(nn.Module):
    def __init__(self, *args, **kwargs):
        """MemTransformerLM(config), a ModelConfig; or the original's call, MemTransformerLM(n_token, n_layer,
        n_head, d_model, d_head, d_inner, dropout, dropatt, ..., moe=False, moe_num_expert=64, ...)."""
        super().__init__()
        if len(args) == 1 and not kwargs and isinstance(args[0], ModelConfig):
            config = args[0]
        else:
            config = ModelConfig.from_keywords(*args, **kwargs)
        self.config = config
        n_token, n_layer, n_head, d_model, d_head = (config.n_token, config.n_layer, config.n_head, config.d_model,
                                                     config.d_head)
        d_embed, dropout, cutoffs, div_val = config.d_embed, config.dropout, config.cutoffs, config.div_val
        tgt_len, attn_type, untie_r, pre_lnorm = config.tgt_len, config.attn_type, config.untie_r, config.pre_lnorm

        self.n_token = n_token
        self.d_embed = d_embed
        self.d_model = d_model
        self.n_head = n_head
        self.d_head = d_head

        self.word_emb = AdaptiveEmbedding(n_token, d_embed, d_model, cutoffs, div_val=div_val)
        self.drop = Dropout(dropout)
        self.n_layer = n_layer

        self.tgt_len = tgt_len
        self.mem_len = config.mem_len
        self.ext_len = config.ext_len
        self.max_klen = (tgt_len or 0) + self.ext_len + self.mem_len
        self.attn_type = attn_type

        attn_class = ATTN_TYPES[attn_type].attention
        self.untie_r = untie_r
        attn_options = dict(untie_r=untie_r) if attn_type == 0 else {}
        self.layers = nn.ModuleList()
        for i in range(n_layer):
            dec_attn = attn_class(n_head, d_model, d_head, dropout, dropatt=config.dropatt,
                                  pre_lnorm=pre_lnorm, **attn_options)
            if config.moe and (i + 1) % config.moe_options.every == 0:
                pos_ff = MoEPositionwiseFF(d_model, config.d_inner, dropout, pre_lnorm, config.moe_options)
            else:
                pos_ff = PositionwiseFF(d_model, config.d_inner, dropout, pre_lnorm=pre_lnorm)
            self.layers.append(DecoderLayer(dec_attn, pos_ff))

        self.sample_softmax = sample_softmax = config.sample_softmax
        if sample_softmax > 0:
            self.out_layer = nn.Linear(d_model, n_token)
            if config.tie_weight:
                # The original tied to `word_emb.weight`, which does not exist.
                self.out_layer.weight = self.word_emb.emb_layers[0].weight
            self.sampler = LogUniformSampler(n_token, sample_softmax)
        else:
            self.crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_model, cutoffs,
                                                    div_val=div_val)
            if config.tie_weight:
                for i in range(len(self.crit.out_layers)):
                    self.crit.out_layers[i].weight = self.word_emb.emb_layers[i].weight
            for i, tie_proj in enumerate(config.tie_projs):
                if tie_proj and div_val == 1 and d_model != d_embed:
                    self.crit.out_projs[i] = self.word_emb.emb_projs[0]
                elif tie_proj and div_val != 1:
                    self.crit.out_projs[i] = self.word_emb.emb_projs[i]

        self.same_length = config.same_length
        self.clamp_len = config.clamp_len
        self.moe_balance_coef = config.moe_options.balance_coef
        self.moe_zloss_coef = config.moe_options.zloss_coef
        self._shape_cache = {}  # masks and position tables by shape (see _cached)
        ATTN_TYPES[attn_type].create_params(self)

    def set_fast_paths(self, sdpa=True, dropout=True, expert_backend='auto'):
        """This model's fast paths (all on unless switched off here). Each computes the same function
        as the plain code it replaces (tests/test_fast_paths.py): sdpa, F.scaled_dot_product_attention
        where it is exact and faster (see use_sdpa); dropout, the CPU dropout from one uniform draw per
        element (the same law, another random stream); expert_backend, the MoE layers' expert compute
        (moe.EXPERT_BACKENDS: 'auto' is grouped_mm where it runs). The key/value cache is kv_caching()'s."""
        check_expert_backend(expert_backend)
        for module in self.modules():
            if isinstance(module, Attention):
                module.sdpa = sdpa
            elif isinstance(module, Dropout):
                module.fast = dropout
            elif isinstance(module, FMoETransformerMLP):
                module.expert_backend = expert_backend
        return self

    def reset_length(self, tgt_len, ext_len, mem_len):
        self.tgt_len = tgt_len
        self.mem_len = mem_len
        self.ext_len = ext_len

    def parameter_counts(self):
        """{'total', 'layers' (the original's "non emb"), 'experts'}: each parameter counted once, a tied weight too
        (a state dict lists it under each of its names)."""
        named = dict(self.named_parameters())  # a shared tensor under its first name only
        return {'total': sum(p.numel() for p in named.values()),
                'layers': sum(p.numel() for name, p in named.items() if name.startswith('layers.')),
                'experts': sum(p.numel() for name, p in named.items() if '.experts.' in name)}

    def init_mems(self):
        """One empty memory per hidden state (embeddings + each layer), or None without memory."""
        if self.mem_len <= 0:
            return None
        param = next(self.parameters())
        return [torch.empty(0, dtype=param.dtype, device=param.device)
                for _ in range(self.n_layer + 1)]

    def _update_mems(self, hids, mems, qlen, mlen):
        """Keep the last mem_len states before the ext_len tokens reused as extended context.

        (The original passed qlen and mlen swapped here, harmless only for ext_len = 0.)
        """
        if mems is None:
            return None
        assert len(hids) == len(mems), 'len(hids) != len(mems)'
        with torch.no_grad():
            end_idx = mlen + max(0, qlen - self.ext_len)
            beg_idx = max(0, end_idx - self.mem_len)
            return [(h if mlen == 0 else torch.cat([m, h], 0))[beg_idx:end_idx].detach()
                    for h, m in zip(hids, mems)]

    def _cached(self, key, build):
        """build() once per key, so that a step of a known shape builds no mask or position table.
        Inside a compiled graph building is fused, and nothing is kept. Callers must not modify
        the result. Inference mode is part of every key: a tensor made under it cannot be saved
        for backward by a later step."""
        if torch.compiler.is_compiling():
            return build()
        key = key + (torch.is_inference_mode_enabled(),)
        if key not in self._shape_cache:
            if len(self._shape_cache) >= 32:  # varying lengths: keep the cache small
                self._shape_cache.clear()
            self._shape_cache[key] = build()
        return self._shape_cache[key]

    def _attn_mask(self, qlen, mlen, device):
        """[qlen, klen] bool, True where query i may not see key j (see attention_mask)."""
        args = (qlen, mlen, self.mem_len, self.same_length, torch.device(device))
        return self._cached(('mask',) + args, lambda: attention_mask(*args))

    def _position_sequence(self, klen, like):
        """Distances klen-1 ... 0 (the original's decreasing order), clamped to clamp_len.

        In like's dtype as the original, but never below inv_freq's: under bf16
        autocast a projected word embedding is bf16, which cannot count past 256.
        """
        dtype = torch.promote_types(like.dtype, self.pos_emb.inv_freq.dtype)
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=like.device, dtype=dtype)
        if self.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=self.clamp_len)
        return pos_seq

    def _position_embedding(self, klen, like):
        """[klen, 1, d_model] sinusoids of _position_sequence, built once per shape.

        The cache key holds everything the values depend on, inv_freq's storage
        and version included (load_state_dict and .to() change them).
        """
        inv_freq = self.pos_emb.inv_freq
        key = ('pos', klen, self.clamp_len, like.dtype, like.device, inv_freq.data_ptr(), inv_freq._version)
        return self._cached(key, lambda: self.pos_emb(self._position_sequence(klen, like)))

    def _forward(self, dec_inp, mems=None):
        """dec_inp [len, bsz] -> (the last layer's hidden states [len, bsz, d_model], new_mems)."""
        hidden, new_mems, _ = self._forward_with_stats(dec_inp, mems)
        return hidden, new_mems

    def _forward_with_stats(self, dec_inp, mems=None):
        """_forward's results and the MoE layers' moe.MoEStats, in layer order ([] for a dense model)."""
        qlen, bsz = dec_inp.size()
        word_emb = self.word_emb(dec_inp)
        mlen = mems[0].size(0) if mems is not None else 0
        dec_attn_mask = self._attn_mask(qlen, mlen, word_emb.device)
        positions = ATTN_TYPES[self.attn_type](self, word_emb, qlen, mlen)
        # Memories as the layers see them; types 2 and 3 add position embeddings
        # to them, and the original did so in place, so its stored memory keeps
        # those additions: we reproduce that without mutating the caller's tensors.
        layer_mems = list(mems) if mems is not None else None
        core_out = positions.embed(word_emb)
        hids, moe_stats = [core_out], []
        for i, layer in enumerate(self.layers):
            core_out = hids[-1] = positions.layer_input(i, core_out)
            mem = None
            if mlen > 0:
                mem = layer_mems[i] = positions.memory(i, layer_mems[i])
            core_out, stats = layer(core_out, *positions.layer_args(i), dec_attn_mask=dec_attn_mask, mems=mem)
            hids.append(core_out)
            if stats is not None:
                moe_stats.append(stats)

        core_out = self.drop(core_out)
        new_mems = self._update_mems(hids, layer_mems, qlen, mlen)
        return core_out, new_mems, moe_stats

    def forward(self, data, target, *mems, return_moe_stats=False):
        """data [len, bsz], target [tgt_len, bsz] -> [loss [tgt_len, bsz]] + new_mems.

        loss is the per-token negative log-likelihood in nats. With return_moe_stats=True the call returns
        ([loss] + new_mems, moe_stats): the MoE layers' moe.MoEStats of this call, in layer order ([] for a
        dense model), in the loss's autograd graph; aux_loss, moe_load and moe_balance_loss read them. The model
        keeps nothing of a call.
        """
        if not mems:
            mems = self.init_mems()
        tgt_len = target.size(0)
        hidden, new_mems, moe_stats = self._forward_with_stats(data, mems=mems)
        pred_hid = hidden[-tgt_len:]
        if self.sample_softmax > 0 and self.training:
            logit = sample_logits(self.out_layer.weight, self.out_layer.bias,
                                  target, pred_hid, self.sampler)
            loss = -F.log_softmax(logit.float(), -1)[:, :, 0]
        elif self.sample_softmax > 0:
            loss = -self.log_prob(pred_hid).gather(-1, target[..., None]).squeeze(-1)
        else:
            loss = self.crit(pred_hid.reshape(-1, pred_hid.size(-1)), target.reshape(-1))
            loss = loss.view(tgt_len, -1)
        out = [loss] if new_mems is None else [loss] + new_mems
        return (out, moe_stats) if return_moe_stats else out

    def log_prob(self, hidden):
        """Log-probabilities of the next token over the vocabulary: [..., d_model] -> [..., n_token]."""
        flat = hidden.reshape(-1, hidden.size(-1))
        if self.sample_softmax > 0:
            out = F.log_softmax(self.out_layer(flat).float(), dim=-1)
        else:
            out = self.crit.log_prob(flat)
        return out.view(*hidden.shape[:-1], -1)

    # Mixture-of-Experts bookkeeping for the training loop, from the statistics a forward returns
    # (forward(..., return_moe_stats=True)).
    def moe_layers(self):
        return [layer.pos_ff for layer in self.layers if isinstance(layer.pos_ff, MoEPositionwiseFF)]

    def aux_loss(self, moe_stats):
        """A forward's balance and router z-losses, weighted by their coefficients: a 0-dim tensor in the forward's
        graph (0 for a dense model)."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for stats in moe_stats:   # a loss with weight 0 is not computed (z_loss is computed when read)
            if self.moe_balance_coef:
                total = total + self.moe_balance_coef * stats.balance_loss
            if self.moe_zloss_coef:
                total = total + self.moe_zloss_coef * stats.z_loss
        return total

    def moe_load(self, moe_stats):
        """Tokens a forward routed to each expert, [n_moe_layers, num_expert] (None for a dense model)."""
        return torch.stack([stats.load for stats in moe_stats]) if moe_stats else None

    def update_expert_bias(self, load, rate):
        """After an optimizer step: move the aux-loss-free gates' biases toward balance, given the
        step's load [n_moe_layers, num_expert] (global: summed over processes). A no-op for other gates."""
        for ff, layer_load in zip(self.moe_layers(), load):
            if hasattr(ff.gate, 'update_bias'):
                ff.gate.update_bias(layer_load, rate)

    def moe_balance_loss(self, moe_stats):
        """A forward's raw balance loss of each MoE layer, detached, [n_moe_layers] (None for a dense model)."""
        return torch.stack([stats.balance_loss.detach().float() for stats in moe_stats]) if moe_stats else None


def init_weights(model, init='normal', init_range=0.1, init_std=0.02, proj_init_std=0.01):
    """The original training script's initialization, experts and gates included.

    Visits the modules in the original's order (model.apply, then the embedding again, so that tied output
    layers do not override it), so a seeded model draws the same random numbers as the original's.
    """
    def init_weight(weight):
        if init == 'uniform':
            nn.init.uniform_(weight, -init_range, init_range)
        elif init == 'normal':
            nn.init.normal_(weight, 0.0, init_std)

    def init_projs(projs):
        for proj in projs:
            if proj is not None:
                nn.init.normal_(proj, 0.0, proj_init_std)

    def weights_init(m):
        if isinstance(m, (nn.Linear, FusedExpertLinear)):  # the experts' fused linears as FastMoE's
            init_weight(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, AdaptiveEmbedding):
            init_projs(m.emb_projs)
        elif isinstance(m, nn.Embedding):
            init_weight(m.weight)
        elif isinstance(m, ProjectedAdaptiveLogSoftmax):
            if m.n_clusters > 0:
                init_weight(m.cluster_weight)
                nn.init.zeros_(m.cluster_bias)
            init_projs(m.out_projs)
        elif isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RelPartialLearnableMultiHeadAttn) and hasattr(m, 'r_w_bias'):  # untie_r: per layer
            init_weight(m.r_w_bias)
            init_weight(m.r_r_bias)
        elif isinstance(m, MemTransformerLM):
            for name in ('r_emb', 'r_w_bias', 'r_r_bias'):
                if hasattr(m, name):
                    init_weight(getattr(m, name))
            if hasattr(m, 'r_bias'):
                nn.init.zeros_(m.r_bias)

    with torch.no_grad():
        model.apply(weights_init)
        model.word_emb.apply(weights_init)
    return model


def maybe_compile(model, **options):
    """Compile the model in place with nn.Module.compile and return it.

    State-dict keys stay as they are (torch.compile(model) would wrap the model and prefix them with
    `_orig_mod.`), and model.forward stays the class's method. Where torch.compile is missing, or fails to
    compile at the first call (no C++ compiler, an unsupported platform), this warns once and the model runs
    eagerly; errors of the model itself still propagate. Compile a model after copying it: a copy would share
    the compiled call.
    """
    if not hasattr(torch, 'compile'):
        warnings.warn('torch.compile is not available in this version of torch; running eagerly')
        return model
    if any(isinstance(m, FMoETransformerMLP) for m in model.modules()):
        probe_before_compile(next(model.parameters()).device)
    try:
        model.compile(**options)
    except Exception as err:  # e.g. a Python version torch.compile does not support
        warnings.warn(f'torch.compile unavailable ({type(err).__name__}: {err}); running eagerly')
        return model
    from torch._dynamo.exc import TorchDynamoException  # compiler and backend failures
    compiled = model._compiled_call_impl  # what nn.Module.compile set, and __call__ runs when it is set

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ''
            warnings.warn(f'torch.compile failed ({type(err).__name__}: {reason}); running eagerly')
            model._compiled_call_impl = None  # an uncompiled module's: __call__ runs the eager forward
            return model(*args, **kwargs)

    model._compiled_call_impl = call
    return model
