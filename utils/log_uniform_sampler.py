"""Log-uniform (Zipfian) negative sampling for the sampled softmax (used for lm1b).

Class k is drawn with probability (log(k + 2) - log(k + 1)) / log(range_max + 1),
which matches a vocabulary sorted by decreasing frequency. The logits are
corrected by the log expected count of each class under `2 * n_sample` draws;
like the original we compute it as 1 - (1 + p)^(-2n), which agrees with the
exact 1 - (1 - p)^(2n) to first order in p.
"""
import torch


class LogUniformSampler:
    def __init__(self, range_max, n_sample):
        with torch.no_grad():
            self.range_max = range_max
            log_indices = torch.arange(1., range_max + 2., 1.).log_()
            self.dist = (log_indices[1:] - log_indices[:-1]) / log_indices[-1]
            # -expm1(-2n * log1p(p)) = 1 - (1 + p)^(-2n), the original's formula.
            self.log_q = (-(-self.dist.double().log1p_() * 2 * n_sample).expm1_()).log_().float()
        self.n_sample = n_sample

    def sample(self, labels):
        """labels [b1, b2] -> (true_log_probs [b1, b2], samp_log_probs [S], neg_samples [S]).

        The number of distinct negatives S varies: 2 * n_sample draws, duplicates removed.
        """
        with torch.no_grad():
            # Drawn on the CPU (its random stream, and unique's data-dependent size, need no device sync);
            # on a GPU the few ids travel from pinned memory, without waiting for the GPU's queued work.
            draws = torch.multinomial(self.dist, 2 * self.n_sample, replacement=True)
            neg_samples = draws.unique()
            if labels.device.type == 'cuda':
                neg_samples = neg_samples.pin_memory()
            neg_samples = neg_samples.to(labels.device, non_blocking=True)
            if self.log_q.device != labels.device:  # the table moves to the device once, not every step
                self.log_q = self.log_q.to(labels.device)
            return self.log_q[labels], self.log_q[neg_samples], neg_samples


def sample_logits(weight, bias, labels, inputs, sampler):
    """Logits of the true class (column 0) and of the sampled negatives.

    weight [n_vocab, d], bias [n_vocab], labels [b1, b2], inputs [b1, b2, d]
    -> logits [b1, b2, 1 + S]; a negative equal to the true label is masked out.
    """
    true_log_probs, samp_log_probs, neg_samples = sampler.sample(labels)
    true_w, true_b = weight[labels], bias[labels]
    sample_w, sample_b = weight[neg_samples], bias[neg_samples]

    true_logits = (true_w * inputs).sum(-1) + true_b - true_log_probs
    neg_logits = torch.einsum('sd,ijd->ijs', sample_w, inputs) + sample_b - samp_log_probs
    hit = labels[:, :, None] == neg_samples
    neg_logits = neg_logits.masked_fill(hit, torch.finfo(neg_logits.dtype).min)
    return torch.cat([true_logits[:, :, None], neg_logits], dim=-1)
