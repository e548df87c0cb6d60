# coding: utf-8
"""Evaluate a trained model (WORK_DIR/model.pt) on valid and/or test, as the original eval.py.

Segments are read in order with the memory carried across the whole split, and each segment's mean loss is
weighted by its length. Prints and logs `| test loss X.XX | test bpc Y.YYYYY` (bpc for enwik8/text8, ppl
otherwise) and writes the figures in full precision to WORK_DIR/eval.json.

Under torchrun each process evaluates its columns of every batch and the loss sums are added up, so the split is
read once and the figure is the single-process one (to float rounding); rank 0 prints and writes.
"""
import argparse
import json
import os
import sys
import time

import data_utils
from utils import files
from run.corpus import open_corpus
from run.distributed import Dist, SilentLog, exit_process
from run.evaluation import evaluate, run_eval_lengths, set_eval_lengths
from utils.exp_utils import Logger, OneLineArgumentParser, format_loss, loss_fields, pick_device, set_deterministic
from utils.errors import ConfigError, UserError
from utils.files import atomic_write, progress_bar
from run.model_file import load_model


def build_parser():
    parser = OneLineArgumentParser(prog='eval.py', description='PyTorch Transformer Language Model (evaluation)')
    parser.add_argument('--data', type=str, default=None,
                        help='location of the data corpus (default: the one the model was trained on)')
    parser.add_argument('--dataset', type=str, default=None, choices=data_utils.DATASETS,
                        help='dataset name (default: the one the model was trained on)')
    parser.add_argument('--split', type=str, default='all', choices=['all', 'valid', 'test'],
                        help='which split to evaluate')
    parser.add_argument('--batch_size', type=int, default=10, help='batch size')
    own = "default: the run's own, see below"
    parser.add_argument('--tgt_len', type=int, default=None, help=f'number of tokens to predict ({own})')
    parser.add_argument('--ext_len', type=int, default=None, help=f'length of the extended context ({own})')
    parser.add_argument('--mem_len', type=int, default=None, help=f'length of the retained previous heads ({own})')
    parser.add_argument('--clamp_len', type=int, default=None,
                        help="max positional embedding index (default: the model's own; -1 for none)")
    parser.add_argument('--cuda', action='store_true', help='use CUDA')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic kernels only (as train.py --deterministic): on a GPU the figures repeat '
                             'bitwise on the same machine')
    parser.add_argument('--work_dir', type=str, required=True, help='path to the work_dir')
    parser.add_argument('--no_log', action='store_true',
                        help='do not log the eval result (nothing is written to work_dir)')
    parser.add_argument('--same_length', action='store_true',
                        help="set same length attention with masking (default: the model's own)")
    parser.epilog = ("Lengths not given are the run's own, the ones its validations and end-of-training test used: "
                     "--eval_tgt_len segments, with the context a shorter segment loses moved to the memory (to the "
                     "extended context without one), so eval.py reproduces the run's test figure on the whole "
                     "split; a model without its run's flags (a converted checkpoint) uses its training lengths. "
                     "The run scripts' eval mode passes the original's evaluation lengths, e.g. a long memory.")
    return parser


def check_args(args):
    for name in ('batch_size', 'tgt_len'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f'--{name} {getattr(args, name)} must be at least 1')
    for name in ('ext_len', 'mem_len'):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f'--{name} {getattr(args, name)} must be non-negative')
    if os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} is a file: give the run directory (it holds model.pt)')
    if not os.path.isdir(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} does not exist')
    if not args.no_log:  # log.txt and eval.json go there
        files.check_writable_dir(args.work_dir, '--work_dir (add --no_log to write nothing)')


def with_lengths(args, model, saved):
    """The flags with each length not given filled in: the run's own evaluation lengths (run_eval_lengths),
    the model's clamp_len and same_length."""
    tgt_len, ext_len, mem_len = run_eval_lengths(model, saved.get('args'))
    own = dict(tgt_len=tgt_len, ext_len=ext_len, mem_len=mem_len, clamp_len=model.clamp_len)
    filled = {name: value if getattr(args, name) is None else getattr(args, name) for name, value in own.items()}
    return argparse.Namespace(**{**vars(args), **filled, 'same_length': bool(args.same_length or model.same_length)})


def main(argv=None):
    args = build_parser().parse_args(argv)
    dist = Dist()
    try:
        check_args(args)
        dist = Dist.from_env(args.cuda)
        dist.check_eval_batch(args.batch_size, '--batch_size')
        device = dist.device(pick_device(args.cuda, print))
        set_deterministic(args.deterministic)  # before the first product on a GPU
        model, saved = load_model(args.work_dir, device)
        args = with_lengths(args, model, saved)
        set_eval_lengths(model, args.tgt_len, args.mem_len, args.ext_len, args.clamp_len, args.same_length)
        corpus, dataset, data_dir = open_corpus(saved, os.path.join(args.work_dir, 'model.pt'), model.n_token,
                                                args.data, args.dataset, log=print if dist.is_main else SilentLog())
        splits = ['test', 'valid'] if args.split == 'all' else [args.split]
        iters = {split: corpus.get_iterator(split, args.batch_size, args.tgt_len, device=device,
                                            ext_len=args.ext_len) for split in splits}
        for split in splits:
            try:
                corpus.check_batches(split, iters[split])
            except data_utils.DataError as e:
                raise data_utils.DataError(f'{data_dir}: {e}: pass a smaller --batch_size') from None
    except (UserError, OSError) as e:  # bad input, or the file system's refusal
        if dist.is_main:
            print(f'eval.py: error: {e}', file=sys.stderr)
        return dist.leave(2)
    code = None
    try:
        code = evaluate_splits(args, model, saved, dataset, data_dir, splits, iters, dist)
    except files.WriteError as e:  # eval.json: a full disk, or a run directory taken away
        print(f'eval.py: error: {e}', file=sys.stderr)
        code = 2
    finally:
        if code is None:  # an exception on its way out (a bug's traceback)
            dist.close()
    return dist.leave(code)   # here, while this frame still holds the model (see Dist.leave)


PROGRESS_LINE_S = 60  # off a terminal, a long evaluation says how far it is at most once a minute


def segment_count(split_iter):
    """The segments an evaluation reads: known for the ordered splits (enwik8, text8, wt103, PTB), None for
    lm1b's streams."""
    if not isinstance(split_iter, data_utils.LMOrderedIterator) or split_iter.varlen:
        return None
    return len(range(0, split_iter.data.size(0) - 1, split_iter.bptt))


def progress_reporter(log, split, total, bar):
    """evaluate()'s progress callback: the bar on a terminal, else a line every PROGRESS_LINE_S seconds (with
    the time left where the split's size is known)."""
    start = time.time()
    next_line = start + PROGRESS_LINE_S

    def report(n_segments):
        nonlocal next_line
        if bar is not None:
            bar.update(1)
            return
        now = time.time()
        if now >= next_line:
            next_line = now + PROGRESS_LINE_S
            elapsed = now - start
            left = f' | about {(total - n_segments) * elapsed / n_segments:.0f}s left' if total else ''
            log(f'| {split} segment {n_segments}{f"/{total}" if total else ""} | {elapsed:.0f}s{left}')
    return report


def evaluate_splits(args, model, saved, dataset, data_dir, splits, iters, dist):
    """Evaluate, print and (rank 0) write eval.json; returns the exit code."""
    log = Logger(None if args.no_log else os.path.join(args.work_dir, 'log.txt')) if dist.is_main else SilentLog()
    log(f'Evaluating with bsz {args.batch_size} tgt_len {args.tgt_len} ext_len {args.ext_len} '
        f'mem_len {args.mem_len} clamp_len {args.clamp_len}')
    results = {}
    for split in splits:
        start = time.time()
        total = segment_count(iters[split])
        bar = progress_bar(total, 'segment', desc=split) if dist.is_main else None
        log.bar = bar
        try:  # main() checked that every split has a batch
            loss, n_segments = evaluate(model, iters[split], dist=dist,
                                        progress=progress_reporter(log, split, total, bar))
        finally:
            if bar is not None:
                bar.close()
            log.bar = None
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
        with atomic_write(path) as f:
            json.dump(report, f, indent=2)
        log(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    exit_process(main())
