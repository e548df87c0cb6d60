"""A training run as train.py runs it and study.py calls it for each of its runs (`main`): the flags, the data,
the run directory, resume, training, and the test of the best model. The flags are in run/options.py, the
Trainer in run/trainer.py, the run directory's checks in run/work_dir.py.
"""
import os
import random
import signal
import sys
from typing import NamedTuple, Optional

import numpy as np
import torch

import data_utils
from run.distributed import Dist, SilentLog, is_peer_failure
from run.distributed import fail as fail_distributed
from run.model_file import read_model_file, saved_config
from run.options import build_model, build_parser, check_model, moe_flags_without_moe, run_config
from run.trainer import NonFiniteLoss, StopRequest, Trainer
from run.work_dir import check_work_dir, claim_work_dir
from utils import checkpoint as ckpt
from utils import files
from utils import malloc
from utils.errors import ConfigError, UserError
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

class Iterators(NamedTuple):
    train: object
    valid: object
    test: object


class Prepared(NamedTuple):
    """What prepare finds and builds for a run, once every check has passed."""
    device: torch.device
    iters: Iterators
    model: torch.nn.Module
    n_params: tuple            # all parameters, those of the layers (the original's "non emb")
    state: Optional[dict]      # checkpoint.pt's, with --restart
    optimizer_state: Optional[dict]  # --restart_dir's optimizer.pt, if it has one
    vocab: Optional[list]      # the symbols of an imported model's own vocabulary (None: the corpus's)
    corpus_symbols: list       # the corpus's vocabulary
    lock: object               # the run directory's lock (None in debug mode)


def prepare(config, notes, dist):
    """Everything that can fail on bad input, before anything is written: data, model, checkpoint."""
    check_work_dir(config)
    dist.check_batch(config.batch_size, config.batch_chunk)
    dist.check_eval_batch(EVAL_BATCH_SIZE, 'the evaluation batch of train.py')
    if config.flags.moe:
        dist.check_experts(config.flags.moe_num_expert)
    device = dist.device(pick_device(config.cuda, notes.append))
    if dist.active:
        notes.append(f'{dist.world_size} processes, {config.batch_size // dist.world_size} batch columns each'
                     + (', experts split over the processes' if dist.expert_parallel else ''))
    elif config.multi_gpu:
        notes.append('NOTE: --multi_gpu: one process trains on one device with the whole batch; torchrun '
                     '--nproc_per_node N train.py ... trains on N (the run scripts launch one per visible GPU)')
    if config.gpu0_bsz >= 0:  # nn.DataParallel's uneven split; DDP gives every process an equal share
        notes.append(f'NOTE: --gpu0_bsz {config.gpu0_bsz} is ignored: every process takes an equal share of '
                     '--batch_size')
    ignored = moe_flags_without_moe(config.flags)
    if ignored:
        notes.append(f'NOTE: {", ".join(ignored)}: MoE options, ignored without --moe (this model is dense)')
    if config.expert_parallel and not dist.active:
        notes.append('NOTE: --expert-parallel needs several processes (torchrun); this process holds every expert')
    if config.amp != 'fp16' and (config.dynamic_loss_scale or config.static_loss_scale is not None):
        # The original accepted them and ignored them without --fp16; bf16 and fp32 need no scaling.
        notes.append('NOTE: --static-loss-scale/--dynamic-loss-scale are ignored without --fp16 (or --amp fp16)')
    if config.deterministic:  # before the first product on a GPU: cuBLAS reads its workspace setting then
        set_deterministic(True)
    if use_tf32(device, not config.no_tf32):
        notes.append('NOTE: fp32 matrix products in TF32 on this GPU (--no-tf32 for full fp32, as the original)')
    if config.fp16 and not config.dynamic_loss_scale and config.static_loss_scale == 1:
        notes.append("WARNING: --fp16 keeps the original's static loss scale 1, under which small gradients "
                     'vanish in fp16; --dynamic-loss-scale (or --amp fp16) is safer')
    if config.amp == 'fp16' and device.type == 'cpu':
        notes.append('NOTE: fp16 autocast on the CPU works but is slow; --amp bf16 is the CPU fast path')
    seed_everything(config.seed, device)
    state = start = None
    if config.restart and not config.restart_dir:
        state = ckpt.load_run_file(os.path.join(config.work_dir, 'checkpoint.pt'), 'checkpoint')
    elif config.restart_dir:
        start = read_model_file(os.path.join(config.restart_dir, 'model.pt'))   # (config, the file's dict)
    # A model imported with its own vocabulary (convert_checkpoint.py) keeps those ids through fine-tuning.
    symbols = (state or (start or (None, {}))[1]).get('vocab')
    corpus = data_utils.get_lm_corpus(config.data, config.dataset, symbols, log=notes.append)  # logged with the notes
    # Every rank reads the same global batches and trains on its own columns of them.
    iters = [corpus.get_iterator('train', config.batch_size, config.tgt_len, device=device, ext_len=config.ext_len,
                                 varlen=config.varlen, seed=config.seed)]
    iters += [corpus.get_iterator(split, EVAL_BATCH_SIZE, config.eval_tgt_len, device=device, ext_len=config.ext_len)
              for split in ('valid', 'test')]
    for split, it in zip(('train', 'valid', 'test'), iters):
        try:
            corpus.check_batches(split, it, varlen=config.varlen and split == 'train')
        except data_utils.DataError as e:
            what = '--batch_size' if split == 'train' else f'the evaluation batch of train.py ({EVAL_BATCH_SIZE})'
            raise data_utils.DataError(f'--data {config.data}: {e} ({what}); use a smaller batch or more data') \
                from None
    optimizer_state = None
    if start is not None:
        ckpt.check_vocab(start[1], corpus.vocab.idx2sym, f'{config.restart_dir}/model.pt', f'--data {config.data}')
        optimizer_state = restart_dir_optimizer_state(config.restart_dir, start[1])
    check_model(config.flags, len(corpus.vocab))
    model = build_model(config.flags, len(corpus.vocab), start)
    dist.seed_rank(config.seed)  # identical weights everywhere, then each rank its own dropout stream
    if state is not None:
        path = os.path.join(config.work_dir, 'checkpoint.pt')
        hint = ' (resume with the flags of that run, or start a new run in another --work_dir)'
        ckpt.check_config(saved_config(state, path), model.config, path, hint=hint)
        ckpt.check_vocab(state, corpus.vocab.idx2sym, path, f'--data {config.data}')
        ckpt.check_config(state['args'], config.flags, path, keys=RESUME_KEYS, hint=hint)
        others = [k for k in config.flags if k not in RESUME_KEYS and k != 'restart']
        changed = ckpt.config_diff(state['args'], config.flags, keys=others)
        if changed:  # allowed (e.g. a longer --max_step), but said
            notes.append('NOTE: flags changed since the checkpoint: ' + '; '.join(changed))
        if config.scheduler == 'cosine' and state['args']['max_step'] != config.max_step:
            notes.append(resumed_cosine(state, config, path))
    lock = claim_work_dir(config, dist, notes)
    counts = model.parameter_counts()
    n_params = counts['total'], counts['layers']
    return Prepared(device, Iterators(*iters), model, n_params, state, optimizer_state, symbols, corpus.vocab.idx2sym,
                    lock)


def resumed_cosine(state, config, path):
    """What a resume with another --max_step does to the cosine (Trainer.load_state_dict stretches it): a note;
    a ConfigError where the schedule had already ended at a rate of 0, so that more steps would change nothing."""
    step, old = state['step'], state['args']['max_step']
    if step >= old and config.eta_min == 0:
        raise ConfigError(f'--max_step {config.max_step}: {path} is a run that finished its cosine schedule at step '
                          f'{old}, where the rate is --eta_min 0: more steps would not change the model; start a '
                          f'new schedule from its weights with --restart_dir {config.work_dir} --work_dir NEW_DIR')
    if step >= config.max_step:
        return f'NOTE: --max_step {config.max_step}: the run is at step {step} already; it is validated and tested'
    return (f'NOTE: --max_step {old} -> {config.max_step}: the cosine schedule goes on from the rate reached at '
            f'step {max(step, config.warmup_step)} and is stretched to reach --eta_min at step {config.max_step} '
            '(docs/training.md)')


def open_log(config, dist):
    """The log (log.txt, printed too) and metrics.jsonl of the run: only rank 0 logs and writes metrics; debug runs
    print and write nothing. Nothing is written until the first line."""
    run_dir = None if config.debug or not dist.is_main else config.work_dir
    log = Logger(os.path.join(run_dir, 'log.txt') if run_dir else None) if dist.is_main else SilentLog()
    return log, MetricsWriter(os.path.join(run_dir, 'metrics.jsonl') if run_dir else None, config.tensorboard)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = list(filter(None, [malloc.tune()]))   # before the first large tensor; logged with the notes
    dist, lock, metrics = Dist(), None, None
    try:
        config = run_config(args, parser)
        dist = Dist.from_env(config.cuda, config.expert_parallel, config.dist_timeout)
        setup = prepare(config, notes, dist)
        lock = setup.lock
        log, metrics = open_log(config, dist)
        trainer = Trainer(config, setup.model, setup.device, log, metrics, dist, vocab=setup.vocab,
                          symbols=setup.corpus_symbols, tr_iter=setup.iters.train)
        if setup.state is not None:
            trainer.load_state_dict(setup.state)
        elif setup.optimizer_state is not None:  # --restart_dir's
            note = trainer.start_from_optimizer(setup.optimizer_state)
            if note:
                notes.append(note)
    except (UserError, OSError) as e:  # bad input, or the file system's refusal
        if dist.is_main:  # every rank finds the same fault; one line is enough
            print(f'train.py: error: {e}', file=sys.stderr)
        if lock is not None:
            lock.release()
        return dist.leave(2)
    code = None
    try:
        code = run(config, trainer, setup, notes)
    except OSError as e:  # a full disk, or the run directory taken away: one line, the checkpoint is kept
        message = str(e) if isinstance(e, files.WriteError) else files.write_error(e, e.filename or config.work_dir)
        print(f'train.py: error: {message}', file=sys.stderr)
        code = 2
    except RuntimeError as e:
        if not (dist.active and is_peer_failure(e)):
            raise
        kept = f'; the last complete checkpoint is {config.work_dir}/checkpoint.pt (relaunch with --restart)' \
            if not config.debug else ''
        fail_distributed('train.py', f'rank {dist.rank} lost contact with the other processes at step '
                                     f'{trainer.step} ({str(e).strip().splitlines()[0][:200]}){kept}')
    finally:
        if metrics is not None:
            metrics.close()
        if lock is not None:
            lock.release()
        if code is None:  # an exception on its way out (a bug's traceback)
            dist.close()
    return dist.leave(code)   # here, while this frame still holds the model (see Dist.leave)


def kept_checkpoint(trainer, run_dir):
    """Which checkpoint a stopped run leaves, for its last message."""
    if run_dir is None:
        return 'debug mode: no checkpoint'
    if trainer.saved_step is None:
        return 'no checkpoint was kept (no state before the failure was known good): start a new run'
    return f'the last good checkpoint is {run_dir}/checkpoint.pt (step {trainer.saved_step}): resume with --restart'


def run(config, trainer, setup, notes):
    """Log the setup, train, evaluate the last and test the best model; returns the exit code."""
    run_dir = None if config.debug else config.work_dir
    if run_dir and trainer.dist.is_main:
        os.makedirs(run_dir, exist_ok=True)
    log, n_params = trainer.log, setup.n_params
    if run_dir:
        every = f'every {config.save_interval} steps, ' if 0 < config.save_interval < config.max_step else ''
        log(f'Run directory : {os.path.abspath(run_dir)} (log.txt, metrics.jsonl, model.pt = best model by '
            f'validation, checkpoint.pt = last state: {every}at each validation and at the end)')
    else:
        log('Debug mode: nothing is written')
    for note in notes:
        log(note)
    trainer.metrics.truncate_after(trainer.step)  # a fresh run (step 0) does not add to a killed run's lines
    if setup.state is not None:
        log(f'Resuming from {run_dir}/checkpoint.pt at step {trainer.step} (epoch {trainer.epoch}, '
            f'batch {trainer.batch})')
    elif config.restart_dir:
        log(f'Starting from the weights of {config.restart_dir}/model.pt')
    log('=' * 100)
    for k, v in config.flags.items():
        log(f'    - {k} : {v}')
    log('=' * 100)
    log(f'#params = {n_params[0]}')
    log(f'#non emb params = {n_params[1]}')

    stop = StopRequest()
    stop.install()
    try:
        trainer.train(setup.iters.valid, run_dir, stop)
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
    if trainer.last_eval_step != trainer.step:
        # Stopped by a signal, or resumed past a shorter --max_step: the final model is validated (a run that
        # reaches --max_step validates there); the original crashed here on a missing model.pt. As the original,
        # the best model by validation is then tested.
        trainer.validate(setup.iters.valid, run_dir)
        trainer.save_checkpoint(run_dir, confirmed=True)  # with this evaluation: a resumed finished run only tests
    trainer.test(setup.iters.test, run_dir)
    return 0
