"""Projected adaptive log-softmax (Grave et al., 2017; Baevski & Auli, 2019).

The vocabulary is split by `cutoffs` into a head (the most frequent tokens plus
one logit per tail cluster) and tail clusters. With `div_val > 1` each tail
cluster works in a smaller dimension `d_embed // div_val**i` and has its own
projection from the model dimension. Parameter names and shapes are those of
the original Transformer-XL code, so its checkpoints load unchanged.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def rename_projection_keys(state_dict, prefix, attr):
    """Accept FastMoE's `<attr>.<i>.weight` spelling of the `<attr>.<i>` projections."""
    head = prefix + attr + '.'
    for key in [k for k in state_dict if k.startswith(head) and k.endswith('.weight')]:
        index = key[len(head):-len('.weight')]
        if index.isdigit():
            state_dict[head + index] = state_dict.pop(key)


class ProjectedAdaptiveLogSoftmax(nn.Module):
    def __init__(self, n_token, d_embed, d_proj, cutoffs, div_val=1,
                 keep_order=True):
        super().__init__()
        self.n_token = n_token
        self.d_embed = d_embed
        self.d_proj = d_proj

        self.cutoffs = list(cutoffs) + [n_token]
        self.cutoff_ends = [0] + self.cutoffs
        self.div_val = div_val

        self.shortlist_size = self.cutoffs[0]
        self.n_clusters = len(self.cutoffs) - 1
        self.head_size = self.shortlist_size + self.n_clusters

        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, self.d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))

        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            for _ in range(len(self.cutoffs)):
                # One projection per cluster, as the original: the clusters share
                # out_layers[0] but not the projection (the tail ones are tied to
                # the embedding's projection when tie_projs says so).
                proj = nn.Parameter(torch.empty(d_proj, d_embed)) if d_proj != d_embed else None
                self.out_projs.append(proj)
            self.out_layers.append(nn.Linear(d_embed, n_token))
        else:
            for i in range(len(self.cutoffs)):
                l_idx, r_idx = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_emb_i = d_embed // (div_val ** i)
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_emb_i)))
                self.out_layers.append(nn.Linear(d_emb_i, r_idx - l_idx))

        # The original returns the losses grouped by cluster unless keep_order
        # is set; we keep the token order by default so that loss[t, b] is the
        # loss of target[t, b]. Means and sums are identical either way.
        self.keep_order = keep_order
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *args: rename_projection_keys(sd, prefix, 'out_projs'))

    def _compute_logit(self, hidden, weight, bias, proj):
        if proj is not None:
            hidden = F.linear(hidden, proj.t().contiguous())
        return F.linear(hidden, weight, bias=bias)

    def _cluster_params(self, i):
        """Weight, bias and projection of cluster i (cluster 0 is the head)."""
        if self.div_val == 1:
            l_idx, r_idx = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            weight = self.out_layers[0].weight[l_idx:r_idx]
            bias = self.out_layers[0].bias[l_idx:r_idx]
        else:
            weight, bias = self.out_layers[i].weight, self.out_layers[i].bias
        proj = self.out_projs[i]
        if i == 0 and self.n_clusters > 0:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return weight, bias, proj

    def _cluster_logprob(self, head_logprob, i):
        """The head's log-probability of tail cluster i (the original's column -i)."""
        return head_logprob[:, -i]

    def forward(self, hidden, target, keep_order=False):
        """hidden [N, d_proj], target [N] -> negative log-likelihood [N]."""
        if hidden.size(0) != target.size(0):
            raise RuntimeError('Input and target should have the same size '
                               'in the batch dimension.')

        head_logit = self._compute_logit(hidden, *self._cluster_params(0))
        head_logprob = F.log_softmax(head_logit.float(), dim=-1)
        if self.n_clusters == 0:
            return -head_logprob.gather(1, target[:, None]).squeeze(1)

        nll = torch.zeros_like(target, dtype=head_logprob.dtype)
        for i in range(len(self.cutoffs)):
            l_idx, r_idx = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            # A cluster without targets still runs (on no rows): its parameters then get a zero
            # gradient, as DDP without find_unused_parameters needs at every step, and as the
            # original's optimizer saw them (its zero_grad zeroed gradients instead of dropping them).
            indices_i = ((target >= l_idx) & (target < r_idx)).nonzero().squeeze(1)
            target_i = target.index_select(0, indices_i) - l_idx
            head_logprob_i = head_logprob.index_select(0, indices_i)
            if i == 0:
                logprob_i = head_logprob_i.gather(1, target_i[:, None]).squeeze(1)
            else:
                hidden_i = hidden.index_select(0, indices_i)
                tail_logit_i = self._compute_logit(hidden_i, *self._cluster_params(i))
                tail_logprob_i = F.log_softmax(tail_logit_i.float(), dim=-1)
                logprob_i = self._cluster_logprob(head_logprob_i, i) \
                    + tail_logprob_i.gather(1, target_i[:, None]).squeeze(1)
            nll.index_copy_(0, indices_i, -logprob_i)

        if not (self.keep_order or keep_order):
            # The original's layout: losses grouped by cluster, token order inside.
            cluster = torch.bucketize(target, target.new_tensor(self.cutoffs), right=True)
            nll = nll[torch.argsort(cluster, stable=True)]
        return nll

    def log_prob(self, hidden):
        """Log-probabilities over the whole vocabulary: hidden [N, d_proj] -> [N, n_token]."""
        head_logit = self._compute_logit(hidden, *self._cluster_params(0))
        head_logprob = F.log_softmax(head_logit.float(), dim=-1)
        if self.n_clusters == 0:
            return head_logprob
        parts = [head_logprob[:, :self.shortlist_size]]
        for i in range(1, len(self.cutoffs)):
            tail_logit = self._compute_logit(hidden, *self._cluster_params(i))
            tail_logprob = F.log_softmax(tail_logit.float(), dim=-1)
            parts.append(self._cluster_logprob(head_logprob, i)[:, None] + tail_logprob)
        return torch.cat(parts, dim=1)
