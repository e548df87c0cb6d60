"""A training run as train.py runs it and study.py calls it for each of its runs (`main`): the flags, the data,
the run directory, resume, training, and the test of the best model. The flags are in run/options.py, the
Trainer in run/trainer.py, the run directory's checks in run/work_dir.py.
"""
import os
import random
import signal
import sys

import numpy as np
import torch

import data_utils
from run.distributed import Dist, SilentLog, is_peer_failure
from run.distributed import fail as fail_distributed
from run.options import build_model, build_parser, check_args
from run.trainer import NonFiniteLoss, StopRequest, Trainer
from run.work_dir import check_work_dir, claim_work_dir
from utils import checkpoint as ckpt
from utils import files
from utils import malloc
from utils.exp_utils import Logger, MetricsWriter, pick_device, set_deterministic, use_tf32


def seed_everything(seed, device):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == 'cuda':
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------- a run, as train.py runs it
# Flags that must not change on --restart: they fix the data order, the tensor shapes or the optimizer state.
RESUME_KEYS = ('dataset', 'batch_size', 'batch_chunk', 'tgt_len', 'ext_len', 'mem_len', 'varlen', 'optim', 'amp')
# Batch size of the validation and test iterators during training (the original's).
EVAL_BATCH_SIZE = 10

def restart_dir_optimizer_state(restart_dir, saved):
    """The optimizer state in --restart_dir's optimizer.pt (None if there is none), checked to come from the
    same step as its model.pt (`saved`): they are two writes, and a run killed between them leaves a pair from
    two steps."""
    path = os.path.join(restart_dir, 'optimizer.pt')
    if not os.path.exists(path):
        return None
    optimizer = ckpt.load_run_file(path, 'optimizer')
    if optimizer.get('step') != saved.get('step'):
        raise ckpt.CheckpointError(f'{path} is from step {optimizer.get("step")} but {restart_dir}/model.pt from '
                                   f'step {saved.get("step")} (the run stopped between the two writes): delete '
                                   f'{path} to start from the weights with a fresh optimizer')
    return optimizer['optimizer_state']

def prepare(args, parser, notes, dist):
    """Everything that can fail on bad input, before anything is written: flags, data, model, checkpoint."""
    check_args(args, parser)
    check_work_dir(args)
    dist.check_batch(args.batch_size, args.batch_chunk)
    dist.check_eval_batch(EVAL_BATCH_SIZE, 'the evaluation batch of train.py')
    if args.moe:
        dist.check_experts(args.moe_num_expert)
    device = dist.device(pick_device(args.cuda, notes.append))
    if dist.active:
        notes.append(f'{dist.world_size} processes, {args.batch_size // dist.world_size} batch columns each'
                     + (', experts split over the processes' if dist.expert_parallel else ''))
    elif args.multi_gpu:
        notes.append('NOTE: --multi_gpu: one process trains on one device with the whole batch; torchrun '
                     '--nproc_per_node N train.py ... trains on N (the run scripts launch one per visible GPU)')
    if args.gpu0_bsz >= 0:  # nn.DataParallel's uneven split; DDP gives every process an equal share
        notes.append(f'NOTE: --gpu0_bsz {args.gpu0_bsz} is ignored: every process takes an equal share of '
                     '--batch_size')
    if args.expert_parallel and not dist.active:
        notes.append('NOTE: --expert-parallel needs several processes (torchrun); this process holds every expert')
    if args.amp != 'fp16' and (args.dynamic_loss_scale or args.static_loss_scale is not None):
        # The original accepted them and ignored them without --fp16; bf16 and fp32 need no scaling.
        notes.append('NOTE: --static-loss-scale/--dynamic-loss-scale are ignored without --fp16 (or --amp fp16)')
    if args.deterministic:  # before the first product on a GPU: cuBLAS reads its workspace setting then
        set_deterministic(True)
    if use_tf32(device, not args.no_tf32):
        notes.append('NOTE: fp32 matrix products in TF32 on this GPU (--no-tf32 for full fp32, as the original)')
    if args.fp16 and not args.dynamic_loss_scale and args.static_loss_scale == 1:
        notes.append("WARNING: --fp16 keeps the original's static loss scale 1, under which small gradients "
                     'vanish in fp16; --dynamic-loss-scale (or --amp fp16) is safer')
    if args.amp == 'fp16' and device.type == 'cpu':
        notes.append('NOTE: fp16 autocast on the CPU works but is slow; --amp bf16 is the CPU fast path')
    seed_everything(args.seed, device)
    state = start = None
    if args.restart and not args.restart_dir:
        state = ckpt.load_run_file(os.path.join(args.work_dir, 'checkpoint.pt'), 'checkpoint')
    elif args.restart_dir:
        start = ckpt.load_run_file(os.path.join(args.restart_dir, 'model.pt'), 'model')
    # A model imported with its own vocabulary (convert_checkpoint.py) keeps those ids through fine-tuning.
    symbols = (state or start or {}).get('vocab')
    corpus = data_utils.get_lm_corpus(args.data, args.dataset, symbols, log=notes.append)  # logged with the notes
    # Every rank reads the same global batches and trains on its own columns of them.
    iters = [corpus.get_iterator('train', args.batch_size, args.tgt_len, device=device, ext_len=args.ext_len,
                                 varlen=args.varlen, seed=args.seed)]
    iters += [corpus.get_iterator(split, EVAL_BATCH_SIZE, args.eval_tgt_len, device=device, ext_len=args.ext_len)
              for split in ('valid', 'test')]
    for split, it in zip(('train', 'valid', 'test'), iters):
        try:
            corpus.check_batches(split, it, varlen=args.varlen and split == 'train')
        except data_utils.DataError as e:
            what = '--batch_size' if split == 'train' else f'the evaluation batch of train.py ({EVAL_BATCH_SIZE})'
            raise data_utils.DataError(f'--data {args.data}: {e} ({what}); use a smaller batch or more data') \
                from None
    optimizer_state = None
    if start is not None:
        ckpt.check_vocab(start, corpus.vocab.idx2sym, f'{args.restart_dir}/model.pt', f'--data {args.data}')
        optimizer_state = restart_dir_optimizer_state(args.restart_dir, start)
    model = build_model(args, len(corpus.vocab), start)
    dist.seed_rank(args.seed)  # identical weights everywhere, then each rank its own dropout stream
    if state is not None:
        path = os.path.join(args.work_dir, 'checkpoint.pt')
        hint = ' (resume with the flags of that run, or start a new run in another --work_dir)'
        ckpt.check_config(model.full_config(state['config']), model.config, path, hint=hint)
        ckpt.check_vocab(state, corpus.vocab.idx2sym, path, f'--data {args.data}')
        ckpt.check_config(state['args'], vars(args), path, keys=RESUME_KEYS, hint=hint)
        others = [k for k in vars(args) if k not in RESUME_KEYS and k != 'restart']
        changed = ckpt.config_diff(state['args'], vars(args), keys=others)
        if changed:  # allowed (e.g. a longer --max_step), but said
            notes.append('NOTE: flags changed since the checkpoint: ' + '; '.join(changed))
    lock = claim_work_dir(args, dist, notes)
    return device, iters, model, state, (symbols, corpus.vocab.idx2sym), optimizer_state, lock


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = list(filter(None, [malloc.tune()]))   # before the first large tensor; logged with the notes
    dist, lock = Dist(), None
    try:
        check_args(args, parser)
        dist = Dist.from_env(args.cuda, args.expert_parallel, args.dist_timeout)
        device, iters, model, state, vocabs, optimizer_state, lock = prepare(args, parser, notes, dist)
        symbols, corpus_symbols = vocabs  # an imported model's own vocabulary (or None), the corpus's
        n_params = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.layers.parameters()))
        trainer = Trainer(args, model, device, None, None, dist, vocab=symbols, tr_iter=iters[0])
        trainer.symbols = corpus_symbols
        if state is not None:
            trainer.load_state_dict(state)
        elif optimizer_state is not None:  # --restart_dir's
            trainer.optimizer.load_state_dict(dist.local_optimizer_state(optimizer_state, trainer.optimizer))
            if args.scheduler in ('constant', 'dev_perf'):
                # As the original: loading optimizer.pt restored the rate, and these schedules never reset it.
                trainer.base_lr = float(optimizer_state['param_groups'][0]['lr'])
                notes.append(f'NOTE: --scheduler {args.scheduler} continues at the rate saved in '
                             f'{args.restart_dir}/optimizer.pt: {trainer.base_lr:.3g} (as the original)')
    except (ValueError, OSError) as e:  # DataError and CheckpointError are ValueErrors
        if dist.is_main:  # every rank finds the same fault; one line is enough
            print(f'train.py: error: {e}', file=sys.stderr)
        if lock is not None:
            lock.release()
        dist.close()
        return 2
    try:
        return run(args, trainer, iters, state, notes, n_params)
    except OSError as e:  # a full disk, or the run directory taken away: one line, the checkpoint is kept
        message = str(e) if isinstance(e, files.WriteError) else files.write_error(e, e.filename or args.work_dir)
        print(f'train.py: error: {message}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (dist.active and is_peer_failure(e)):
            raise
        kept = f'; the last complete checkpoint is {args.work_dir}/checkpoint.pt (relaunch with --restart)' \
            if not args.debug else ''
        fail_distributed('train.py', f'rank {dist.rank} lost contact with the other processes at step '
                                     f'{trainer.step} ({str(e).strip().splitlines()[0][:200]}){kept}')
    finally:
        if trainer.metrics is not None:
            trainer.metrics.close()
        if lock is not None:
            lock.release()
        dist.close()


def kept_checkpoint(trainer, run_dir):
    """Which checkpoint a stopped run leaves, for its last message."""
    if run_dir is None:
        return 'debug mode: no checkpoint'
    if trainer.saved_step is None:
        return 'no checkpoint was kept (no state before the failure was known good): start a new run'
    return f'the last good checkpoint is {run_dir}/checkpoint.pt (step {trainer.saved_step}): resume with --restart'


def run(args, trainer, iters, state, notes, n_params):
    """Log the setup, train, evaluate the last and test the best model; returns the exit code."""
    tr_iter, va_iter, te_iter = iters
    main_rank = trainer.dist.is_main
    run_dir = None if args.debug else args.work_dir
    if run_dir and main_rank:
        os.makedirs(run_dir, exist_ok=True)
    writing = run_dir if main_rank else None  # only rank 0 logs and writes metrics
    log = trainer.log = Logger(os.path.join(run_dir, 'log.txt') if writing else None) if main_rank else SilentLog()
    trainer.metrics = MetricsWriter(os.path.join(run_dir, 'metrics.jsonl') if writing else None, args.tensorboard)
    if run_dir:
        log(f'Run directory : {os.path.abspath(run_dir)} (log.txt, metrics.jsonl, model.pt = best model, '
            f'checkpoint.pt = last state every {args.save_interval} steps)')
    else:
        log('Debug mode: nothing is written')
    for note in notes:
        log(note)
    trainer.metrics.truncate_after(trainer.step)  # a fresh run (step 0) does not add to a killed run's lines
    if state is not None:
        log(f'Resuming from {run_dir}/checkpoint.pt at step {trainer.step} (epoch {trainer.epoch}, '
            f'batch {trainer.batch})')
    elif args.restart_dir:
        log(f'Starting from the weights of {args.restart_dir}/model.pt')
    log('=' * 100)
    for k, v in vars(args).items():
        log(f'    - {k} : {v}')
    log('=' * 100)
    log(f'#params = {n_params[0]}')
    log(f'#non emb params = {n_params[1]}')

    stop = StopRequest()
    stop.install()
    try:
        trainer.train(va_iter, run_dir, stop)
    except NonFiniteLoss as e:
        log(f'Stopping: {e}; {kept_checkpoint(trainer, run_dir)}. Lower --lr, use --amp bf16 or a loss scale, '
            'or check the data.')
        return 1
    finally:
        stop.uninstall()
    log('-' * 100)
    if stop.agreed == signal.SIGTERM:
        log(f'Exiting from training early (SIGTERM) at step {trainer.step}: {kept_checkpoint(trainer, run_dir)}')
        return 128 + signal.SIGTERM
    log('Exiting from training early' if stop.agreed is not None else 'End of training')
    if trainer.best_val_loss is None:
        # No validation yet (a run shorter than --eval-interval: the original crashed on the missing model.pt), so
        # validate once to have a best model. Otherwise, as the original, the best periodic validation is tested.
        trainer.validate(va_iter, run_dir)
        trainer.save_checkpoint(run_dir, confirmed=True)  # with this evaluation: a resumed finished run only tests
    trainer.test(te_iter, run_dir)
    return 0
