"""The adaptive softmax's host syncs: is computing every tail cluster for every token cheap enough?

utils/proj_adaptive_softmax.py finds each cluster's tokens with `nonzero` (on a GPU, one host sync per cluster)
and runs each tail cluster on its own tokens only. The sync-free alternative computes every tail cluster for
every token and picks each token's loss with masks. Both are timed here side by side, forward and backward, on
the wt103-base softmax (d_model 410, cutoffs 20000/40000/200000, 267735 symbols, div_val 1; tgt_len 150 at a
smaller batch than the original's 60), targets drawn from a Zipf law over the frequency-sorted vocabulary.

    OMP_NUM_THREADS=1 python bench/bench_adaptive.py [--batch 2] [--repeats 3] [--zipf 1.0]
"""
import argparse

import torch
import torch.nn.functional as F

from timing import time_side_by_side
from utils.proj_adaptive_softmax import ProjectedAdaptiveLogSoftmax

WT103 = dict(n_token=267735, d_embed=410, d_proj=410, cutoffs=[20000, 40000, 200000], div_val=1)


def masked_nll(crit, hidden, target):
    """The sync-free variant: every tail cluster's log-softmax over all tokens, each token's loss by masks."""
    head_logprob = F.log_softmax(crit._compute_logit(hidden, *crit._cluster_params(0)).float(), dim=-1)
    in_head = target < crit.shortlist_size
    nll = -head_logprob.gather(1, torch.where(in_head, target, 0)[:, None]).squeeze(1)
    for i in range(1, len(crit.cutoffs)):
        l_idx, r_idx = crit.cutoff_ends[i], crit.cutoff_ends[i + 1]
        inside = (target >= l_idx) & (target < r_idx)
        tail_logprob = F.log_softmax(crit._compute_logit(hidden, *crit._cluster_params(i)).float(), dim=-1)
        target_i = torch.where(inside, target - l_idx, 0)
        logprob = crit._cluster_logprob(head_logprob, i) + tail_logprob.gather(1, target_i[:, None]).squeeze(1)
        nll = torch.where(inside, -logprob, nll)
    return nll


def zipf_targets(n, n_token, s, gen):
    """n symbol ids, rank r drawn with probability proportional to 1/r^s (rank 0 the most frequent)."""
    weights = 1.0 / torch.arange(1, n_token + 1, dtype=torch.float64) ** s
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=2, help='batch columns of tgt_len 150 (the original: 60)')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--zipf', type=float, default=1.0, help='exponent of the targets\' Zipf law')
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(**WT103)
    with torch.no_grad():
        for param in crit.parameters():
            param.normal_(0, 0.02, generator=gen)
    n = 150 * args.batch
    hidden = torch.randn(n, WT103['d_proj'], generator=gen, requires_grad=True)
    target = zipf_targets(n, WT103['n_token'], args.zipf, gen)
    tail_share = (target >= WT103['cutoffs'][0]).double().mean().item()

    def step(nll_fn):
        crit.zero_grad(set_to_none=True)
        hidden.grad = None
        nll_fn(crit, hidden, target).mean().backward()

    gathered = lambda c, h, t: c(h, t)  # noqa: E731 - the module's own forward
    with torch.no_grad():
        diff = (masked_nll(crit, hidden, target) - gathered(crit, hidden, target)).abs().max().item()
    assert diff < 1e-4, f'the masked variant computes another loss (max difference {diff})'
    times = time_side_by_side({'gather (nonzero)': lambda: step(gathered),
                               'all rows masked': lambda: step(masked_nll)}, args.repeats, warmup=1)
    print(f'wt103-base adaptive softmax, {n} tokens (tgt_len 150 x batch {args.batch}), Zipf {args.zipf}: '
          f'{tail_share:.1%} of the targets in tail clusters; forward+backward, 1 thread, median of {args.repeats}')
    for name, seconds in times.items():
        print(f'  {name:<18} {seconds * 1e3:8.1f} ms')
    print(f'  all rows masked / gather: {times["all rows masked"] / times["gather (nonzero)"]:.2f}x')


if __name__ == '__main__':
    main()
