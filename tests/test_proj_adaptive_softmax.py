import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from utils.proj_adaptive_softmax import ProjectedAdaptiveLogSoftmax


def make_crit(div_val, d_proj=12, d_embed=8, n_token=30, cutoffs=(5, 17)):
    torch.manual_seed(0)
    crit = ProjectedAdaptiveLogSoftmax(n_token, d_embed, d_proj, list(cutoffs), div_val=div_val)
    for p in crit.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    return crit


@pytest.mark.parametrize('div_val,d_proj', [(1, 8), (1, 12), (2, 12)])
def test_log_probs_are_normalized_and_match_the_loss(div_val, d_proj):
    crit = make_crit(div_val, d_proj=d_proj)
    hidden = torch.randn(40, d_proj)
    target = torch.randint(0, 30, (40,))
    log_prob = crit.log_prob(hidden)
    torch.testing.assert_close(log_prob.exp().sum(-1), torch.ones(40))
    torch.testing.assert_close(crit(hidden, target), -log_prob[torch.arange(40), target])


def test_tail_cluster_probability_by_hand():
    """Head = shortlist + one logit per cluster; cluster i uses head column -i (the original's layout)."""
    crit = make_crit(div_val=2, d_proj=12)
    h = torch.randn(1, 12)
    head_w = torch.cat([crit.out_layers[0].weight, crit.cluster_weight])
    head_b = torch.cat([crit.out_layers[0].bias, crit.cluster_bias])
    head = F.log_softmax((h @ crit.out_projs[0]) @ head_w.t() + head_b, -1)
    tail = F.log_softmax((h @ crit.out_projs[1]) @ crit.out_layers[1].weight.t() + crit.out_layers[1].bias, -1)
    # token 7 is in cluster 1 (ids 5..16) at offset 2; cluster 1's head logit is the last column
    expected = -(head[0, -1] + tail[0, 2])
    torch.testing.assert_close(crit(h, torch.tensor([7]))[0], expected)


def test_div_val_1_tail_cluster_uses_its_own_projection():
    """With div_val 1 the clusters share out_layers[0] but each has its projection (the original's out_projs[i])."""
    crit = make_crit(div_val=1, d_proj=12)
    h = torch.randn(1, 12)
    w, b = crit.out_layers[0].weight, crit.out_layers[0].bias
    head = F.log_softmax((h @ crit.out_projs[0]) @ torch.cat([w[:5], crit.cluster_weight]).t()
                         + torch.cat([b[:5], crit.cluster_bias]), -1)
    tail = F.log_softmax((h @ crit.out_projs[2]) @ w[17:].t() + b[17:], -1)
    # token 20 is in cluster 2 (ids 17..29) at offset 3; cluster 2's head logit is the second-to-last column
    torch.testing.assert_close(crit(h, torch.tensor([20]))[0], -(head[0, -2] + tail[0, 3]))


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not built in')
def test_ddp_trains_through_a_cluster_without_targets(tmp_path):
    """DDP without find_unused_parameters needs a gradient for every parameter at every step: a cluster with no
    target in the batch still gives its parameters one (zero), where skipping it broke the next step."""
    dist.init_process_group('gloo', store=dist.FileStore(str(tmp_path / 'store'), 1), rank=0, world_size=1)
    try:
        for div_val in (1, 2):
            crit = make_crit(div_val, d_proj=12)
            ddp = torch.nn.parallel.DistributedDataParallel(crit)
            for _ in range(3):  # the head and cluster 1 only
                ddp(torch.randn(6, 12), torch.arange(6)).sum().backward()
            assert crit.out_projs[1].grad.any() and not crit.out_projs[2].grad.any()
    finally:
        dist.destroy_process_group()


def test_no_clusters_is_a_plain_softmax():
    crit = ProjectedAdaptiveLogSoftmax(10, 6, 6, [])
    h, t = torch.randn(5, 6), torch.randint(0, 10, (5,))
    expected = F.cross_entropy(crit.out_layers[0](h), t, reduction='none')
    torch.testing.assert_close(crit(h, t), expected)
    assert list(crit.state_dict()) == ['out_layers.0.weight', 'out_layers.0.bias']


def test_mismatched_sizes_raise():
    crit = make_crit(1, d_proj=8)
    with pytest.raises(RuntimeError, match='same size'):
        crit(torch.randn(3, 8), torch.zeros(4, dtype=torch.long))
