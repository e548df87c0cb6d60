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

import data_utils
from utils import files
from run.corpus import open_corpus
from run.distributed import Dist, SilentLog, exit_process
from run.evaluation import evaluate, set_eval_lengths
from utils.exp_utils import Logger, OneLineArgumentParser, format_loss, loss_fields, pick_device, set_deterministic
from utils.errors import ConfigError, UserError
from utils.files import atomic_write
from run.generation import load_trained_model


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
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic kernels only (as train.py --deterministic): on a GPU the figures repeat '
                             'bitwise on the same machine')
    parser.add_argument('--work_dir', type=str, required=True, help='path to the work_dir')
    parser.add_argument('--no_log', action='store_true',
                        help='do not log the eval result (nothing is written to work_dir)')
    parser.add_argument('--same_length', action='store_true', help='set same length attention with masking')
    return parser


def load_model(work_dir, device):
    """The model in WORK_DIR/model.pt (plain data: config + weights) and the checkpoint dict."""
    model, saved, _ = load_trained_model(os.path.join(work_dir, 'model.pt'), device)
    return model, saved


def check_args(args):
    for name in ('batch_size', 'tgt_len'):
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name} {getattr(args, name)} must be at least 1')
    for name in ('ext_len', 'mem_len'):
        if getattr(args, name) < 0:
            raise ConfigError(f'--{name} {getattr(args, name)} must be non-negative')
    if os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} is a file: give the run directory (it holds model.pt)')
    if not os.path.isdir(args.work_dir):
        raise ConfigError(f'--work_dir {args.work_dir} does not exist')
    if not args.no_log:  # log.txt and eval.json go there
        files.check_writable_dir(args.work_dir, '--work_dir (add --no_log to write nothing)')


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
    results = {}
    for split in splits:
        start = time.time()
        loss, n_segments = evaluate(model, iters[split], dist=dist)  # main() checked that every split has a batch
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
        try:
            with atomic_write(path) as f:
                json.dump(report, f, indent=2)
        except files.WriteError as e:
            print(f'eval.py: error: {e}', file=sys.stderr)
            return 2
        log(f'Wrote {path}')
    return 0


if __name__ == '__main__':
    exit_process(main())
