"""Evaluating a trained model: the lengths it is evaluated with, and the mean loss over a split.

train.py (validation during training), eval.py and moe_report.py evaluate through here.
"""
from contextlib import nullcontext

import torch

from mem_transformer import kv_caching, new_kv_caches
from utils.errors import ConfigError, DataError


def set_eval_lengths(model, tgt_len=None, mem_len=None, ext_len=0, clamp_len=-1, same_length=False):
    """Set the segment, memory and extended-context lengths an evaluation (or generation) runs with, and
    clamp_len/same_length where given; None means the training value. Returns (tgt_len, mem_len).

    ConfigError when same_length attention (asked, or trained with) has no memory: it would mask every key,
    and every probability would be NaN.
    """
    tgt_len = tgt_len or model.config['tgt_len'] or 128
    mem_len = (model.config['mem_len'] or 0) if mem_len is None else mem_len
    if (same_length or model.same_length) and mem_len == 0:
        raise ConfigError('same_length attention (--same_length, or the model was trained with it) needs '
                         '--mem_len > 0: without a memory it masks every key')
    model.reset_length(tgt_len, ext_len, mem_len)
    if clamp_len > 0:
        model.clamp_len = clamp_len
    if same_length:
        model.same_length = True
    return tgt_len, mem_len


def validation_lengths(tgt_len, eval_tgt_len, ext_len, mem_len):
    """The original's lengths for validating during training on eval_tgt_len segments: the context a shorter
    segment loses goes to the memory, or without memory to the extended context. -> (tgt, ext, mem)."""
    if mem_len == 0:
        return eval_tgt_len, ext_len + tgt_len - eval_tgt_len, mem_len
    return eval_tgt_len, ext_len, mem_len + tgt_len - eval_tgt_len


def run_eval_lengths(model, run_flags=None):
    """(tgt_len, ext_len, mem_len) the run evaluated its model with: its validations and its end-of-training test
    read --eval_tgt_len segments with the lost context moved to the memory (validation_lengths), so evaluating
    with these reproduces the run's own figure. A model without the run's flags (run_flags None, or no
    eval_tgt_len: a converted checkpoint) or with an eval_tgt_len longer than its segments: the training lengths."""
    tgt_len, ext_len, mem_len = model.tgt_len or 128, model.ext_len, model.mem_len
    eval_tgt_len = (run_flags or {}).get('eval_tgt_len')
    if eval_tgt_len and eval_tgt_len <= tgt_len:
        return validation_lengths(tgt_len, eval_tgt_len, ext_len, mem_len)
    return tgt_len, ext_len, mem_len


def evaluate(model, eval_iter, max_steps=-1, autocast=nullcontext, dist=None, kv_cache=True, progress=None):
    """Mean per-token loss in nats over a split, and the number of segments read.

    The memory of each segment is carried into the next; each segment's mean loss counts in proportion to its
    length (the original's total_loss += seq_len * loss.mean()). Losses are summed on the device, so there is one
    host synchronisation per split instead of one per segment. Leaves the model in eval mode.
    With several processes (dist), each evaluates its batch columns; the same mean is then the sum of every
    token's loss over the number of tokens, added up over the ranks.
    progress, if given, is called with the number of segments read after each one (it must not read the loss:
    the losses stay on the device).
    """
    sharded = dist is not None and dist.active
    model.eval()
    total_loss, total_len, n_segments, n_tokens = 0., 0, 0, 0
    # Each segment's memory is the previous one's tail: its keys and values are kept, not projected again
    # (kv_cache=False projects them again: the plain computation, for comparison).
    with torch.no_grad(), kv_caching(new_kv_caches(model) if kv_cache else {}):
        mems = []
        for data, target, seq_len in eval_iter:
            if 0 < max_steps <= n_segments:
                break
            if sharded:
                data, target = dist.local(data), dist.local(target)
            with autocast():
                ret = model(data, target, *mems)
            loss, mems = ret[0], ret[1:]
            if sharded:
                total_loss = total_loss + loss.float().sum().double()
                n_tokens += loss.numel()
            else:
                total_loss = total_loss + seq_len * loss.float().mean().double()
            total_len += seq_len
            n_segments += 1
            if progress is not None:
                progress(n_segments)
    if total_len == 0:
        raise DataError('the split yields no segment: it is too small for this batch size and length')
    if sharded:
        totals = dist.sum(torch.stack([torch.as_tensor(total_loss, dtype=torch.float64, device=loss.device),
                                       torch.tensor(n_tokens, dtype=torch.float64, device=loss.device)]))
        return float(totals[0] / totals[1]), n_segments
    return float(total_loss) / total_len, n_segments
