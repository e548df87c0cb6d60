import math

import torch

from utils.log_uniform_sampler import LogUniformSampler, sample_logits


def test_distribution_is_log_uniform_and_normalized():
    sampler = LogUniformSampler(1000, 8)
    assert abs(sampler.dist.sum().item() - 1) < 1e-5
    k = 41
    p = (math.log(k + 2) - math.log(k + 1)) / math.log(1001)
    assert abs(sampler.dist[k].item() - p) < 1e-7
    # log expected count under 2 * n_sample draws, in the original's form
    assert abs(sampler.log_q[k].item() - math.log(1 - (1 + p) ** -16)) < 1e-5


def test_sample_logits_by_hand():
    sampler = LogUniformSampler(20, 3)
    negatives = torch.tensor([2, 5, 9])
    sampler.sample = lambda labels: (sampler.log_q[labels], sampler.log_q[negatives], negatives)
    weight, bias = torch.randn(20, 4), torch.randn(20)
    labels = torch.tensor([[5, 1]])
    inputs = torch.randn(1, 2, 4)
    logits = sample_logits(weight, bias, labels, inputs, sampler)
    assert logits.shape == (1, 2, 4)
    for b, label in enumerate([5, 1]):
        x = inputs[0, b]
        expected_true = x @ weight[label] + bias[label] - sampler.log_q[label]
        torch.testing.assert_close(logits[0, b, 0], expected_true)
        for s, neg in enumerate(negatives.tolist()):
            if neg == label:  # the true class drawn as a negative is masked out
                assert logits[0, b, 1 + s] < -1e29
            else:
                torch.testing.assert_close(logits[0, b, 1 + s], x @ weight[neg] + bias[neg] - sampler.log_q[neg])


def test_samples_are_unique_and_in_range():
    torch.manual_seed(0)
    sampler = LogUniformSampler(50, 10)
    _, _, neg = sampler.sample(torch.zeros(2, 3, dtype=torch.long))
    assert neg.unique().numel() == neg.numel() and 0 <= neg.min() and neg.max() < 50


def test_the_table_moves_to_the_labels_device_once():
    """On a GPU the log-probability table stays there (it was copied at every step); 'meta' stands in for it."""
    sampler = LogUniformSampler(50, 4)
    cpu_table = sampler.log_q
    true_cpu, samp_cpu, neg_cpu = sampler.sample(torch.tensor([[3, 7]]))
    assert sampler.log_q is cpu_table and torch.equal(true_cpu, cpu_table[torch.tensor([[3, 7]])])
    labels = torch.tensor([[3, 7]], device='meta')
    true_log_probs, samp_log_probs, neg_samples = sampler.sample(labels)
    table = sampler.log_q
    assert table.device.type == 'meta' and neg_samples.device.type == 'meta'
    assert true_log_probs.shape == (1, 2) and samp_log_probs.shape == neg_samples.shape
    sampler.sample(labels)
    assert sampler.log_q is table  # not copied again
