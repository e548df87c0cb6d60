"""Model FLOPs of a Transformer-XL step, counted analytically.

Only matrix products count (2 FLOPs per multiply-add), as is usual for "model
FLOPs": softmax, LayerNorm, dropout and the optimizer are left out. A training
step costs three forward passes (the backward computes a gradient for each
operand of each product). Memory is counted at its steady-state length
(mem_len): every layer re-projects it to keys and values at every step, as the
original does, so it is part of the model's work.

    python bench/flops.py   # prints the suite's configurations
"""


def forward_macs(n_token, n_layer, n_head, d_model, d_head, d_inner, tgt_len, mem_len, bsz,
                 attn_type=0, d_embed=None, cutoffs=(), moe=False, moe_num_expert=64, moe_top_k=2,
                 **unused):
    """Multiply-adds of one forward pass over a [tgt_len, bsz] batch with a full memory."""
    if cutoffs:
        raise NotImplementedError('adaptive softmax FLOPs depend on the data; count a full softmax')
    d_embed = d_model if d_embed is None else d_embed
    tokens = tgt_len * bsz
    klen = tgt_len + mem_len
    inner = n_head * d_head

    per_layer = 0
    # Queries of the segment; keys and values of memory and segment. (The original
    # relative attention also projects queries for the memory, and drops them.)
    per_layer += tokens * d_model * inner + bsz * klen * d_model * 2 * inner
    if attn_type == 0:       # position embeddings projected once per layer, shared by the batch
        per_layer += klen * d_model * inner
    score_products = 3 if attn_type in (0, 1) else 2  # q.k, (q.r), prob.v
    per_layer += score_products * tokens * klen * inner
    per_layer += tokens * inner * d_model             # output projection
    if moe:  # the gate, top_k experts per token, and the weighted sum of their outputs
        per_layer += tokens * (d_model * moe_num_expert + moe_top_k * 2 * d_model * d_inner
                               + moe_top_k * d_model)
    else:
        per_layer += tokens * 2 * d_model * d_inner

    embed = tokens * d_embed * d_model if d_embed != d_model else 0
    softmax = tokens * d_model * n_token + (tokens * d_model * d_embed if d_embed != d_model else 0)
    return n_layer * per_layer + embed + softmax


def flops_per_token(config, train=True):
    """FLOPs per target token of a training step (forward + backward) or of an evaluation step."""
    passes = 3 if train else 1
    return 2 * passes * forward_macs(**config) / (config['tgt_len'] * config['bsz'])


if __name__ == '__main__':
    from steps import CONFIGS
    for name, config in CONFIGS.items():
        print(f'{name:>12}: {flops_per_token(config) / 1e6:8.1f} MFLOP per token (training step)')
