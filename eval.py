# coding: utf-8
"""Evaluate a trained model (WORK_DIR/model.pt) on valid and/or test, as the original eval.py.

Segments are read in order with the memory carried across the whole split, and each segment's mean loss is
weighted by its length. Prints and logs `| test loss X.XX | test bpc Y.YYYYY` (bpc for enwik8/text8, ppl
otherwise) and writes the figures in full precision to WORK_DIR/eval.json.

Under torchrun each process evaluates its columns of every batch and the loss sums are added up, so the split is
read once and the figure is the single-process one (to float rounding); rank 0 prints and writes.
"""
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

import data_utils
from mem_transformer import kv_caching, new_kv_caches
from utils.distributed import Dist, SilentLog
from utils.exp_utils import Logger, OneLineArgumentParser, format_loss, loss_fields, pick_device
from utils.generation import load_trained_model


def build_parser():
    parser = OneLineArgumentParser(prog='eval.py', description='PyTorch Transformer Language Model (evaluation)')
    parser.add_argument('--data', type=str, default=None,
                        help='location of the data corpus (default: the one the model was trained on)')
    parser.add_argument('--dataset', type=str, default=None, choices=data_utils.DATASETS,
                        help='dataset name (default: the one the model was trained on)')
    parser.add_argument('--split', type=str, default='all', choices=['all', 'valid', 'test'],
                        help='which split to evaluate')
    parser.add_argument('--batch_size', type=int, default=10, help='batch size')
    parser.add_argument('--tgt_len', type=int, default=5, help='number of tokens to predict')
    parser.add_argument('--ext_len', type=int, default=0, help='length of the extended context')
    parser.add_argument('--mem_len', type=int, default=0, help='length of the retained previous heads')
    parser.add_argument('--clamp_len', type=int, default=-1, help='max positional embedding index')
    parser.add_argument('--cuda', action='store_true', help='use CUDA')
    parser.add_argument('--work_dir', type=str, required=True, help='path to the work_dir')
    parser.add_argument('--no_log', action='store_true',
                        help='do not log the eval result (nothing is written to work_dir)')
    parser.add_argument('--same_length', action='store_true', help='set same length attention with masking')
    return parser


def evaluate(model, eval_iter, max_steps=-1, autocast=nullcontext, dist=None):
    """Mean per-token loss in nats over a split, and the number of segments read.

    The memory of each segment is carried into the next; each segment's mean loss counts in proportion to its
    length (the original's total_loss += seq_len * loss.mean()). Losses are summed on the device, so there is one
    host synchronisation per split instead of one per segment. Leaves the model in eval mode.
    With several processes (dist), each evaluates its batch columns; the same mean is then the sum of every
    token's loss over the number of tokens, added up over the ranks.
    """
    sharded = dist is not None and dist.active
    model.eval()
    total_loss, total_len, n_segments, n_tokens = 0., 0, 0, 0
    # Each segment's memory is the previous one's tail: its keys and values are kept, not projected again.
    with torch.no_grad(), kv_caching(new_kv_caches(model)):
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
    if total_len == 0:
        raise ValueError('the split yields no segment: it is too small for this batch size and length')
    if sharded:
        totals = dist.sum(torch.stack([torch.as_tensor(total_loss, dtype=torch.float64, device=loss.device),
                                       torch.tensor(n_tokens, dtype=torch.float64, device=loss.device)]))
        return float(totals[0] / totals[1]), n_segments
    return float(total_loss) / total_len, n_segments


def load_model(work_dir, device):
    """The model in WORK_DIR/model.pt (plain data: config + weights) and the checkpoint dict."""
    model, saved, _ = load_trained_model(os.path.join(work_dir, 'model.pt'), device)
    return model, saved


def check_args(args):
    for name in ('batch_size', 'tgt_len'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name} {getattr(args, name)} must be at least 1')
    for name in ('ext_len', 'mem_len'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name} {getattr(args, name)} must be non-negative')
    if not os.path.isdir(args.work_dir):
        raise ValueError(f'--work_dir {args.work_dir} does not exist')


def main(argv=None):
    args = build_parser().parse_args(argv)
    dist = Dist()
    try:
        check_args(args)
        dist = Dist.from_env(args.cuda)
        dist.check_eval_batch(args.batch_size, '--batch_size')
        device = dist.device(pick_device(args.cuda))
        model, saved = load_model(args.work_dir, device)
        if (args.same_length or model.same_length) and args.mem_len == 0:
            raise ValueError('same_length attention (--same_length, or the model was trained with it) needs '
                             '--mem_len > 0: without a memory it masks every key')
        train_args = saved.get('args', {})
        dataset = args.dataset or train_args.get('dataset', 'wt103')
        data_dir = args.data or train_args.get('data', '../data/wikitext-103')
        corpus = data_utils.get_lm_corpus(data_dir, dataset, saved.get('vocab'))
        if len(corpus.vocab) != model.n_token:
            raise ValueError(f'{dataset} at {data_dir} has {len(corpus.vocab)} tokens but the model in '
                             f'{args.work_dir}/model.pt has {model.n_token}: pass the --data/--dataset it '
                             f'was trained on ({train_args.get("dataset")} at {train_args.get("data")})')
        splits = ['test', 'valid'] if args.split == 'all' else [args.split]
        iters = {split: corpus.get_iterator(split, args.batch_size, args.tgt_len, device=device,
                                            ext_len=args.ext_len) for split in splits}
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors
        if dist.is_main:
            print(f'eval.py: error: {e}', file=sys.stderr)
        dist.close()
        return 2
    try:
        return evaluate_splits(args, model, saved, dataset, data_dir, splits, iters, dist)
    finally:
        dist.close()


def evaluate_splits(args, model, saved, dataset, data_dir, splits, iters, dist):
    """Evaluate, print and (rank 0) write eval.json; returns the exit code."""
    log = Logger(None if args.no_log else os.path.join(args.work_dir, 'log.txt')) if dist.is_main else SilentLog()
    log(f'Evaluating with bsz {args.batch_size} tgt_len {args.tgt_len} ext_len {args.ext_len} '
        f'mem_len {args.mem_len} clamp_len {args.clamp_len}')
    model.reset_length(args.tgt_len, args.ext_len, args.mem_len)
    if args.clamp_len > 0:
        model.clamp_len = args.clamp_len
    if args.same_length:
        model.same_length = True

    results = {}
    for split in splits:
        start = time.time()
        try:
            loss, n_segments = evaluate(model, iters[split], dist=dist)
        except ValueError as e:
            if dist.is_main:
                print(f'eval.py: error: {split} split of {data_dir}: {e}', file=sys.stderr)
            return 2
        elapsed = time.time() - start
        log(f'Time : {elapsed:.2f}s, {1000 * elapsed / n_segments:.2f}ms/segment')
        results[split] = {'loss': loss, **loss_fields(dataset, loss)}

    log('=' * 100)
    log(' '.join(format_loss(dataset, split, results[split]['loss']) for split in ('valid', 'test')
                 if split in results))
    log('=' * 100)
    if not args.no_log and dist.is_main:
        report = {'dataset': dataset, 'data': data_dir, 'model_step': saved.get('step'),
                  'settings': {k: getattr(args, k) for k in ('batch_size', 'tgt_len', 'ext_len', 'mem_len',
                                                              'clamp_len', 'same_length')},
                  **results}
        path = os.path.join(args.work_dir, 'eval.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(report, f, indent=2)
        os.replace(path + '.tmp', path)
        log(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
