"""The original's attention arithmetic, seq-first: the reference the model's heads-first attention is checked
against (tests/test_fast_paths.py).

The original lays heads out [len, bsz, n_head, d_head] and scores [qlen, klen, bsz, n_head], computes them with
einsums, shifts relative scores by padding the key axis, and projects queries, keys and values of every row.
`original_layout()` makes a model compute exactly that, converting layouts at the edges (permutations are exact).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import mem_transformer as mt


def rel_shift(x):
    """The original's _rel_shift on [qlen, klen, ...] scores: pad one zero column, re-read the buffer with one
    more row, drop the first: [i, j] becomes x[i, j + qlen - 1 - i] (Transformer-XL, appendix B)."""
    qlen, klen = x.shape[:2]
    zero_pad = x.new_zeros((qlen, 1) + x.shape[2:])
    x_padded = torch.cat([zero_pad, x], dim=1).view(klen + 1, qlen, *x.shape[2:])
    return x_padded[1:].view_as(x)


def attention_seq_first(q, k, v, attn_mask, pos_score, dropatt):
    """The paper's score q·k + position terms, masked, softmax over keys, dropout, times v. The original
    multiplies the scores by 1/sqrt(d_head); the model scales the queries (and position terms) before the
    products instead (the same function), and hands them over scaled.
    q [qlen, bsz, n, d]; k, v [klen, bsz, n, d]; pos_score [qlen, klen, bsz|1, n] -> [qlen, bsz, n, d]."""
    score = torch.einsum('ibnd,jbnd->ijbn', q, k)
    if pos_score is not None:
        score = score + pos_score
    if attn_mask is not None:
        score = score.masked_fill(attn_mask[:, :, None, None], -float('inf'))
    prob = dropatt(F.softmax(score, dim=1))
    return torch.einsum('ijbn,jbnd->ibnd', prob, v)


def seq_first(x):  # [bsz, n, len, d] -> [len, bsz, n, d]
    return x.permute(2, 0, 1, 3)


def scores_seq_first(x):  # [bsz, n, qlen, klen] -> [qlen, klen, bsz, n]
    return x.permute(2, 3, 0, 1)


def scores_heads_first(x):  # [qlen, klen, bsz, n] -> [bsz, n, qlen, klen]
    return x.permute(2, 3, 0, 1)


def position_scores(q, r):
    return scores_heads_first(torch.einsum('ibnd,jnd->ijbn', seq_first(q), r))


def shift(x):
    return scores_heads_first(rel_shift(scores_seq_first(x)))


def attention(q, k, v, attn_mask, pos_score, dropatt, sdpa=False):
    pos = None if pos_score is None else scores_seq_first(pos_score)
    out = attention_seq_first(seq_first(q), seq_first(k), seq_first(v), attn_mask, pos, dropatt)
    return out.permute(1, 2, 0, 3)


def project_rows(self, rows, qlen):
    """The original's projection: queries, keys and values of every row, queries of the segment kept."""
    q, k, v = torch.chunk(self.qkv_net(rows), 3, dim=-1)
    return q[-qlen:], k, v


@contextmanager
def original_layout():
    """Inside this block every model computes attention with the original's arithmetic."""
    saved = {name: mt.Attention.__dict__[name] for name in ('position_scores', 'rel_shift', 'attention')}
    saved_projection = mt.RelMultiHeadAttn.project_rows
    mt.Attention.position_scores = staticmethod(position_scores)
    mt.Attention.rel_shift = staticmethod(shift)
    mt.Attention.attention = staticmethod(attention)
    mt.RelMultiHeadAttn.project_rows = project_rows
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mt.Attention, name, value)
        mt.RelMultiHeadAttn.project_rows = saved_projection
