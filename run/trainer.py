"""The Trainer: it takes the optimizer steps, validates and writes the checkpoints that resume it exactly; with
the optimizer it builds, the window of sums behind each log line, and the stop request of a signal."""
import math
import os
import signal
import time

import torch

import mem_transformer
from run.distributed import Dist
from run.evaluation import evaluate, validation_lengths
from run.model_file import read_model_file, save_model
from run.old_checkpoints import data_state
from utils import checkpoint as ckpt
from utils.exp_utils import format_loss, loss_fields, metric_text, peak_memory_mb
from utils.files import progress_bar
from utils.schedules import PlateauDecay, learning_rate, stretched_anchor

# The run stops when the loss itself (not just the scaled gradients) is non-finite this many steps in a row.
NONFINITE_LIMIT = 10


OPTIMIZERS = {'adam': torch.optim.Adam, 'sgd': torch.optim.SGD, 'adagrad': torch.optim.Adagrad}
_FUSED_PROBES = {}


def fused_available(optimizer_class, device):
    """Whether torch has a fused kernel of this optimizer for this device type (probed once: Adagrad's
    fused kernel is CPU-only, and torch only finds that out in the first step)."""
    key = (optimizer_class, torch.device(device).type)
    if key not in _FUSED_PROBES:
        try:
            p = torch.nn.Parameter(torch.zeros(2, device=device))
            p.grad = torch.ones_like(p)
            optimizer_class([p], lr=0.1, fused=True).step()
            _FUSED_PROBES[key] = True
        except (RuntimeError, ValueError, TypeError):
            _FUSED_PROBES[key] = False
    return _FUSED_PROBES[key]


def build_optimizer(args, model):
    """--optim's optimizer in the fastest implementation torch has for the parameters' device: one fused
    kernel over every tensor where it exists (on a CPU far faster than the per-parameter loop for Adam:
    bench/README.md), else the multi-tensor foreach one. Same update up to rounding, same state_dict."""
    # The original gave the sampled softmax's embedding a sparse optimizer; this model's embedding gradients
    # are dense, so one optimizer covers every parameter.
    params = list(model.parameters())
    optimizer_class = OPTIMIZERS[args.optim]
    kwargs = dict(lr=args.lr, momentum=args.mom) if args.optim == 'sgd' else dict(lr=args.lr)
    fused = fused_available(optimizer_class, params[0].device)
    implementation = dict(fused=True, foreach=False) if fused else dict(fused=False, foreach=True)
    optimizer = optimizer_class(params, **kwargs, **implementation)

    def keep_implementation(optimizer, state_dict):
        # A saved state_dict carries its writer's implementation flags (None in checkpoints written before
        # this choice, fused=True from a device that has the kernel); loading keeps this device's choice.
        return dict(state_dict, param_groups=[dict(group, **implementation) for group in state_dict['param_groups']])
    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def skips_on_device(optimizer):
    """Whether optimizer.step() skips a non-finite step by itself, given the device flag `found_inf` that
    GradScaler hands to optimizers marked `_step_supports_amp_scaling` (torch's fused kernels): the update and
    the step count stay as they were, and the host never reads whether the step was finite. Not the first step
    of fused SGD with momentum: it allocates its momentum buffers then and leaves them uninitialised when it
    skips (tests/test_train.py shows it)."""
    if not getattr(optimizer, '_step_supports_amp_scaling', False):
        return False
    return all(not group.get('momentum') or
               all('momentum_buffer' in optimizer.state.get(p, {}) for p in group['params'])
               for group in optimizer.param_groups)


def clips_in_step(optimizer, clip_params):
    """Whether the gradient clipping can ride in the optimizer's own kernel: torch's fused optimizers divide each
    gradient by `grad_scale` (GradScaler's contract, as found_inf) as they read it, which spares clipping's own pass
    over every gradient (the largest part of a 64-expert model's clipping: bench/README.md). Only where every
    parameter the optimizer updates is one that is clipped (not with --clip_nonemb's unclipped embeddings)."""
    if not getattr(optimizer, '_step_supports_amp_scaling', False):
        return False
    if not all(group.get('fused') for group in optimizer.param_groups):
        return False
    clipped = {id(p) for p in clip_params}
    return all(id(p) in clipped for group in optimizer.param_groups for p in group['params'])


def clip_coefficient(total_norm, max_norm):
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def record_skip(scaler, optimizer, finite):
    """Make the loss scaler's overflow record of this step the step's skip decision `finite` (a device bool).

    GradScaler.unscale_ records whether this process's own gradients overflowed, and update() halves the scale
    by that record. Under expert parallelism each process holds other experts, so an overflow in one process's
    expert gradient would halve its scale alone, while the skip decision (the global gradient norm) is taken by
    all: from then on DDP would average dense gradients scaled differently and the processes' weights drift
    apart. With this, every process halves or grows its scale together, exactly when the step is skipped.
    The record is GradScaler's private state (one tensor per device, which update() sums), as torch's FSDP
    scaler rewrites it too (it all-reduces it); tests/test_train.py checks that update() still reads it."""
    if scaler.is_enabled():
        for found_inf in scaler._found_inf_per_device(optimizer).values():
            found_inf.copy_(~finite)


def non_embedding_parameters(model):
    embedding = {id(p) for name in ('word_emb', 'crit', 'out_layer') if hasattr(model, name)
                 for p in getattr(model, name).parameters()}
    return [p for p in model.parameters() if id(p) not in embedding]


class NonFiniteLoss(RuntimeError):
    pass


class Window:
    """Sums since the last log line. What a step adds is added where the step computed it, so that on a GPU nothing
    is read back to the host until the log line; checkpoints hold the sums as plain numbers, so that a resumed run
    logs the same averages."""

    counted = ('loss_sum', 'n_losses', 'n_nonfinite', 'n_skipped')  # in `sums`, one float64 tensor
    kept = ('n_steps', 'aux_sum', 'moe_load', 'moe_balance')

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums = None  # float64 on the losses' device: their sum rounds as the Python floats it replaced
        self.aux_sum, self.n_steps = 0., 0
        self.moe_load = self.moe_balance = None
        self.restart_clock()

    def add_step(self, loss, applied):
        """A step's mean loss (a 0-dim tensor) and whether its update was applied (a device bool, or a bool the
        host has read). Returns whether the loss is finite, as a device bool."""
        finite = torch.isfinite(loss)
        skipped = ~applied if torch.is_tensor(applied) else torch.full_like(finite, not applied)  # no host copy
        step = torch.stack([torch.where(finite, loss.double(), 0.), finite.double(), (~finite).double(),
                            skipped.double()])
        self.sums = step if self.sums is None else self.sums + step
        self.n_steps += 1
        return finite

    def totals(self):
        """The sums as plain numbers: the one read of the window from the device."""
        loss_sum, *counts = [0.] * len(self.counted) if self.sums is None else self.sums.tolist()
        return dict(loss_sum=loss_sum, **{k: int(n) for k, n in zip(self.counted[1:], counts)})

    def restart_clock(self):
        # Speed is measured over the steps this process ran, so a resumed window still reports true figures.
        self.start, self.timed_steps, self.timed_tokens = time.time(), 0, 0
        self.eval_s = 0.  # seconds of validation inside this window

    def train_seconds(self):
        return max(time.time() - self.start - self.eval_s, 1e-9)

    def add_moe(self, load, balance, weight):
        if load is None:
            return
        self.moe_load = load.detach().clone() if self.moe_load is None else self.moe_load + load.detach()
        balance = balance.detach().float() * weight
        self.moe_balance = balance if self.moe_balance is None else self.moe_balance + balance

    def state_dict(self):
        kept = {k: (v.cpu() if torch.is_tensor(v) else v) for k in self.kept for v in [getattr(self, k)]}
        return dict(self.totals(), **kept)

    def load_state_dict(self, state, device):
        self.sums = torch.tensor([state[k] for k in self.counted], dtype=torch.float64, device=device)
        for k in self.kept:
            v = state[k]
            setattr(self, k, v.to(device) if torch.is_tensor(v) else v)
        self.restart_clock()


class StopRequest:
    """SIGINT/SIGTERM end the run after the current step with a checkpoint; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None  # the signal this process received
        self.agreed = None  # the signal all processes act on (Dist.agree), the same step everywhere
        self.previous = {}

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def uninstall(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """The model, its optimizer and loss scaler, and every counter a checkpoint needs to continue exactly."""

    def __init__(self, config, model, device, log, metrics, dist=None, vocab=None, symbols=None, tr_iter=None):
        """config: the RunConfig (run/options.py); log: a Logger (called with each line); metrics: a
        MetricsWriter; dist: the processes of a torchrun run (Dist(): this one alone); vocab: the symbols of an
        imported model's own vocabulary (None: the corpus's), kept in its checkpoints; symbols: the corpus's
        vocabulary, kept in checkpoints to refuse another one with as many symbols; tr_iter: the training
        iterator, whose state_dict() is the data position a checkpoint holds."""
        self.config, self.device, self.log, self.metrics = config, device, log, metrics
        self.vocab, self.symbols, self.tr_iter = vocab, symbols, tr_iter
        self.dist = dist or Dist()
        self.model = self.dist.shard_experts(model.to(device))
        self.forward_model = self.dist.wrap(self.model)  # DDP under torchrun, else the model itself
        if config.compile:  # after DDP, so that the compiled graph lets the all-reduce overlap the backward
            mem_transformer.maybe_compile(self.forward_model)   # in place: state-dict keys stay the same
        model = self.model
        self.optimizer = build_optimizer(config, model)
        self.amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(config.amp)
        dynamic = config.dynamic_loss_scale or config.static_loss_scale is None
        self.static_scale = None if dynamic else config.static_loss_scale  # apex's dynamic scale started at 2^16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2. ** 16 if dynamic else config.static_loss_scale,
                                           enabled=config.amp == 'fp16')
        self.plateau = PlateauDecay(config.decay_rate, config.patience)
        self.base_lr = config.lr  # --restart_dir's may replace it (start_from_optimizer)
        self.cosine_anchor = (0, 0.0)  # (step, progress) of the cosine; a resume that changes max_step moves it
        self.first_step = 0  # the step this process started training from
        self.clip_params = non_embedding_parameters(model) if config.clip_nonemb else list(model.parameters())
        self.step, self.epoch, self.batch = 0, 1, 0
        self.best_val_loss, self.last_eval_step = None, None
        # Steps in a row with a non-finite loss, and the step at which they reached NONFINITE_LIMIT (0: not yet):
        # device tensors once a step has run, read where the host reads anyway (check_nonfinite).
        self.nonfinite_run = self.limit_step = 0
        self.logged_loss = None  # the last log line's, for the progress bar
        self.eval_start = time.time()  # the eval line's clock, restarted by train() and by each validation
        self.mems = self.fresh_mems()
        self.window = Window()
        self.saved_step = self.pending_step = None  # of checkpoint.pt, and of a state not yet known good

    def fresh_mems(self):
        return [[] for _ in range(self.config.batch_chunk)]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def lr(self):
        a = self.config
        return learning_rate(self.step, self.base_lr, a.scheduler, a.warmup_step, a.max_step, a.eta_min,
                             self.plateau.scale, a.lr_min, self.cosine_anchor)

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, data, target):
        """Forward and backward over the batch chunks (each with its own memory), then one optimizer step.

        Returns the step's mean loss in nats over every process, a 0-dim tensor on the device. A step whose
        gradients are not finite (fp16 overflow, or a non-finite loss) is skipped and counted; a loss non-finite
        NONFINITE_LIMIT times in a row stops the run (check_nonfinite). Nothing is read back to the host (a GPU
        sync) where the optimizer skips a step itself (torch's fused kernels: skips_on_device); the window's
        sums and the counters stay on the device until a log line, a validation or a checkpoint reads them.
        """
        config, model, window, dist = self.config, self.model, self.window, self.dist
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens, weight = target.numel(), dist.loss_weight(target.size(1))  # of the global batch
        data, target = dist.local(data), dist.local(target)  # this rank's columns
        n_chunk = config.batch_chunk
        step_loss, step_load = 0., None
        for i, (data_i, target_i) in enumerate(zip(data.chunk(n_chunk, 1), target.chunk(n_chunk, 1))):
            with dist.sync_context(last_chunk=i == n_chunk - 1):
                with self.autocast():
                    ret, moe_stats = self.forward_model(data_i.contiguous(), target_i.contiguous(), *self.mems[i],
                                                        return_moe_stats=True)
                    loss = ret[0].float().mean() * weight
                    aux = model.aux_loss(moe_stats)
                self.mems[i] = ret[1:]
                self.scaler.scale((loss + aux) / n_chunk).backward()
            step_loss = step_loss + loss.detach() / n_chunk
            window.aux_sum = window.aux_sum + aux.detach().float() / n_chunk
            window.add_moe(model.moe_load(moe_stats), model.moe_balance_loss(moe_stats), 1. / n_chunk)
            if config.flags.moe_gate == 'auxfree' and config.flags.moe:
                step_load = model.moe_load(moe_stats) + (0 if step_load is None else step_load)

        dist.finish_grads(model)
        self.scaler.unscale_(self.optimizer)
        grad_norm, grad_scale = self.clip_gradients()
        finite = torch.isfinite(grad_norm)
        if config.clip_nonemb:  # the unclipped embedding gradients must be finite too
            finite = finite & torch.isfinite(dist.grad_norm(list(model.parameters())))
        record_skip(self.scaler, self.optimizer, finite)
        applied = self.optimizer_step(finite, grad_scale)
        if step_load is not None:  # every rank the same update from the global load; a skipped step's rate is 0
            model.update_expert_bias(dist.sum(step_load), config.flags.moe_bias_update_rate * applied)
        self.scaler.update(self.static_scale)
        self.step += 1

        step_loss = dist.mean(step_loss)  # every rank logs the global mean (an all-reduce; nothing is read)
        window.timed_steps += 1
        window.timed_tokens += n_tokens
        finite_loss = window.add_step(step_loss, applied)
        self.nonfinite_run = torch.where(finite_loss, 0, self.nonfinite_run + 1)
        self.limit_step = torch.where((self.nonfinite_run >= NONFINITE_LIMIT) & (self.limit_step == 0), self.step,
                                      self.limit_step)
        return step_loss

    def clip_gradients(self):
        """The gradients' global norm, and the --clip factor: applied here in a pass of its own over the gradients
        (None returned), or returned as the grad_scale that the optimizer's fused kernel divides each gradient by as
        it reads it (clips_in_step)."""
        if clips_in_step(self.optimizer, self.clip_params):
            grad_norm = self.dist.grad_norm(self.clip_params)
            return grad_norm, 1. / clip_coefficient(grad_norm, self.config.clip)
        return self.dist.clip_grad_norm_(self.clip_params, self.config.clip), None

    def optimizer_step(self, finite, grad_scale=None):
        """The optimizer's update, unless `finite` (a device bool) is False; `grad_scale`, where given, divides every
        gradient inside the fused kernel (clip_gradients). With the scaler of --amp fp16 the gradients are already
        unscaled, and a step with an overflow has a non-finite norm, so `finite` decides as GradScaler.step would.
        Returns whether the update was applied: the device flag itself where the optimizer skips on the device, else
        the bool read from it (one host sync)."""
        optimizer = self.optimizer
        if grad_scale is not None:
            optimizer.grad_scale = grad_scale   # GradScaler's contract with torch's fused optimizers, as found_inf
        try:
            if skips_on_device(optimizer):
                optimizer.found_inf = (~finite).float()  # GradScaler's contract with torch's fused optimizers
                optimizer.step()
                return finite
            if bool(finite):
                optimizer.step()
                return True
            return False
        finally:
            optimizer.__dict__.pop('found_inf', None)
            optimizer.__dict__.pop('grad_scale', None)

    def check_nonfinite(self):
        """Stop the run once the loss has been non-finite NONFINITE_LIMIT steps in a row. Called where the host
        reads from the device anyway (log lines, checkpoints), on every device alike, so the stop can come up to
        --log-interval steps after the step that reached the limit."""
        limit_step = int(self.limit_step)
        if limit_step:
            later = f'; seen at step {self.step}' if self.step > limit_step else ''
            raise NonFiniteLoss(f'the loss was non-finite for {NONFINITE_LIMIT} steps in a row (up to step '
                                f'{limit_step}{later})')

    # ---------------------------------------------------------------- logging and evaluation
    def log_train(self):
        config, w = self.config, self.window
        # As the original's line: the rate of the next update, and the wall time since the last line (any
        # validation included) per step; tokens_per_s counts training time only.
        self.check_nonfinite()
        lr = self.lr()
        elapsed = time.time() - w.start
        sums = w.totals()
        n_skipped, n_nonfinite = sums['n_skipped'], sums['n_nonfinite']
        loss = sums['loss_sum'] / sums['n_losses'] if sums['n_losses'] else math.nan
        self.logged_loss = loss
        line = (f'| epoch {self.epoch:3d} step {self.step:>8d} | {self.batch:>6d} batches | lr {lr:.3g} '
                f'| ms/batch {elapsed * 1000 / max(w.timed_steps, 1):5.2f} | loss {loss:5.2f}')
        line += ' | ' + metric_text(config.dataset, loss)
        record = dict(step=self.step, split='train', epoch=self.epoch, batch=self.batch, loss=loss,
                      **loss_fields(config.dataset, loss), lr=lr, ms_per_batch=elapsed * 1000 / max(w.timed_steps, 1),
                      tokens_per_s=w.timed_tokens / w.train_seconds(), peak_mem_mb=peak_memory_mb(self.device),
                      skipped_steps=n_skipped, nonfinite_losses=n_nonfinite)
        if n_skipped or n_nonfinite:
            line += f' | skipped {n_skipped} steps ({n_nonfinite} non-finite losses)'
        if self.scaler.is_enabled():
            record['loss_scale'] = self.scaler.get_scale()
        if w.moe_load is not None:  # over all ranks: the load adds up, the losses are averaged
            record['moe_aux_loss'] = float(self.dist.mean(w.aux_sum)) / w.n_steps
            record['moe_balance_loss'] = (self.dist.mean(w.moe_balance) / w.n_steps).tolist()
            load = self.dist.sum(w.moe_load)
            record['moe_load'] = load.tolist()
            # max/mean of the experts' copy counts per layer: 1 is an even load, E all on one expert
            load = load.float()
            record['moe_imbalance'] = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
            if record['moe_aux_loss']:  # naive and auxfree gates have no balance loss: no column of zeros
                line += f' | aux loss {record["moe_aux_loss"]:.4f}'
            line += (f' | imbalance {sum(record["moe_imbalance"]) / len(record["moe_imbalance"]):.2f}')
        self.log(line)
        self.metrics.write(**record)
        w.reset()

    def validation_loss(self, eval_iter):
        """The original's evaluation during training: eval_tgt_len segments, the lost context moved to
        the memory (or to the extended context without memory), then back to the training lengths."""
        config, model = self.config, self.model
        model.reset_length(*validation_lengths(config.tgt_len, config.eval_tgt_len, config.ext_len, config.mem_len))
        try:
            loss, _ = evaluate(model, eval_iter, config.max_eval_steps, self.autocast, self.dist)
        finally:
            model.reset_length(config.tgt_len, config.ext_len, config.mem_len)
            model.train()
        return loss

    def validate(self, va_iter, run_dir):
        start = time.time()
        val_loss = self.validation_loss(va_iter)
        config = self.config
        # time: since the previous validation ended (or training started), as the original's line.
        # numbered by the eval interval it ends (the one at the end of a run, off the interval, counts as one too)
        line = (f'| Eval {-(-self.step // config.eval_interval):3d} at step {self.step:>8d} | time: '
                f'{time.time() - self.eval_start:5.2f}s | valid loss {val_loss:5.2f}')
        line += ' | ' + metric_text(config.dataset, val_loss, 'valid')  # 'valid bpc' and 'valid ppl' alike
        self.log('-' * 100)
        self.log(line)
        self.log('-' * 100)
        self.metrics.write(step=self.step, split='valid', loss=val_loss, **loss_fields(config.dataset, val_loss),
                           time_s=time.time() - start)
        if math.isfinite(val_loss) and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss = val_loss
            if run_dir:
                self.save_best(run_dir)
        if config.scheduler == 'dev_perf':
            self.plateau.update(val_loss)
        self.last_eval_step = self.step
        self.window.eval_s += time.time() - start  # evaluation time is not training speed
        self.eval_start = time.time()

    # ---------------------------------------------------------------- checkpoints
    # Under torchrun every rank takes part in gathering the expert shards and memories; rank 0 writes.
    def save_best(self, run_dir):
        dist = self.dist
        model_state = dist.full_model_state(self.model)
        optimizer = {'format': ckpt.FORMAT, 'kind': 'optimizer', 'step': self.step,
                     'optimizer_state': dist.full_optimizer_state(self.optimizer)}
        dist.write(lambda: (save_model(os.path.join(run_dir, 'model.pt'), self.model, model_state,
                                       vocab=self.vocab, args=dict(self.config.flags), step=self.step,
                                       val_loss=self.best_val_loss, vocab_symbols=self.symbols),
                            ckpt.atomic_save(optimizer, os.path.join(run_dir, 'optimizer.pt'))))

    def state_dict(self):
        dist = self.dist
        state = {'format': ckpt.FORMAT, 'kind': 'checkpoint', 'config': self.model.config.to_dict(),
                 'args': dict(self.config.flags),
                 'model_state': dist.full_model_state(self.model),
                 'optimizer_state': dist.full_optimizer_state(self.optimizer),
                 'scaler_state': self.scaler.state_dict(), 'plateau': self.plateau.state_dict(),
                 'step': self.step, 'epoch': self.epoch, 'batch': self.batch, 'data': self.tr_iter.state_dict(),
                 'best_val_loss': self.best_val_loss, 'last_eval_step': self.last_eval_step,
                 'nonfinite_run': int(self.nonfinite_run), 'base_lr': self.base_lr,
                 'cosine_anchor': list(self.cosine_anchor), 'window': self.window.state_dict(),
                 'mems': dist.full_mems(self.mems), 'rng': ckpt.rng_state(), 'vocab_symbols': self.symbols}
        if self.vocab is not None:
            state['vocab'] = self.vocab
        if dist.active:  # each rank's own dropout stream, for an exact resume with the same world size
            state['rng_per_rank'] = dist.gather_objects(state['rng'])
        return state

    def load_state_dict(self, state):
        dist = self.dist
        ckpt.load_weights(self.model, dist.local_model_state(state['model_state'], self.model), 'checkpoint.pt')
        self.optimizer.load_state_dict(dist.local_optimizer_state(state['optimizer_state'], self.optimizer))
        self.scaler.load_state_dict(state['scaler_state'])
        self.plateau.load_state_dict(state['plateau'])
        for key in ('step', 'epoch', 'batch', 'best_val_loss', 'last_eval_step', 'nonfinite_run'):
            setattr(self, key, state[key])
        # The saved rate (constant/dev_perf may have taken it from --restart_dir's optimizer), unless --lr was
        # changed for this resume (as the divergence message advises): then the new --lr.
        if state['args'].get('lr') == self.config.lr:
            self.base_lr = float(state.get('base_lr', self.config.lr))  # checkpoints before base_lr: --lr
        # A changed --max_step stretches the rest of the cosine from the rate reached (docs/training.md).
        self.cosine_anchor = stretched_anchor(self.step, state['args']['max_step'], self.config.max_step,
                                              self.config.warmup_step, tuple(state.get('cosine_anchor', (0, 0.0))))
        self.tr_iter.load_state_dict(data_state(state))
        self.window.load_state_dict(state['window'], self.device)
        self.mems = dist.local_mems(state['mems'], self.device)
        dist.set_rng_state(state, self.config.seed, self.step)
        self.saved_step = self.step

    def start_from_optimizer(self, optimizer_state):
        """Continue with another run's optimizer state (--restart_dir's optimizer.pt). Returns a note for the log,
        or None."""
        self.optimizer.load_state_dict(self.dist.local_optimizer_state(optimizer_state, self.optimizer))
        if self.config.scheduler not in ('constant', 'dev_perf'):
            return None
        # As the original: loading optimizer.pt restored the rate, and these schedules never reset it.
        self.base_lr = float(optimizer_state['param_groups'][0]['lr'])
        return (f'NOTE: --scheduler {self.config.scheduler} continues at the rate saved in '
                f'{self.config.restart_dir}/optimizer.pt: {self.base_lr:.3g} (as the original)')

    # A state is known to be good only once the step after it has a finite loss (weights of 1e30 are finite
    # but poison the next forward): it is written to checkpoint.pt.next, which becomes checkpoint.pt then.
    # At the end of training or on a signal there is no next step, and the state is kept at once.
    def save_checkpoint(self, run_dir, confirmed=False):
        """Write the state unless it follows a non-finite step; returns whether it was written."""
        self.check_nonfinite()
        if not run_dir or int(self.nonfinite_run):
            return False
        state = self.state_dict()
        self.dist.write(lambda: ckpt.atomic_save(state, os.path.join(run_dir, ckpt.PENDING)))
        self.pending_step = self.step
        if confirmed:
            self.settle_checkpoint(run_dir, good=True)
        return True

    def settle_checkpoint(self, run_dir, good):
        """After a step: a pending state becomes checkpoint.pt if the step's loss was finite, else it is dropped."""
        if self.pending_step is None:
            return
        pending, path = os.path.join(run_dir, ckpt.PENDING), os.path.join(run_dir, 'checkpoint.pt')
        self.dist.write(lambda: os.replace(pending, path) if good else os.remove(pending))
        if good:
            self.saved_step = self.pending_step
        self.pending_step = None

    # ---------------------------------------------------------------- the loop
    def next_epoch(self):
        self.epoch += 1
        self.batch = 0
        self.mems = self.fresh_mems()

    def train(self, va_iter, run_dir, stop):
        """Train until max_step or a stop signal; checkpoints every save_interval steps and at each eval."""
        config = self.config
        bar = progress_bar(config.max_step, 'step', initial=self.step)
        self.log.bar = bar
        self.eval_start = time.time()
        self.first_step = self.step  # this process's first (announce_first_line)
        self.model.train()
        try:
            while self.step < config.max_step and stop.agreed is None:
                # The iterator continues from the position a checkpoint restored, else starts an epoch.
                for data, target, seq_len in self.tr_iter:
                    loss = self.train_step(data, target)
                    if self.dist.stop_check_due(self.step):  # all ranks stop after the same step
                        stop.agreed = self.dist.agree(stop.signum)
                    self.batch += 1
                    if run_dir and self.pending_step is not None:  # the loss is read after a save only
                        self.settle_checkpoint(run_dir, good=bool(torch.isfinite(loss)))
                    self.after_step(va_iter, run_dir, stop, bar)
                    if self.step >= config.max_step or stop.agreed is not None:
                        break
                else:
                    self.next_epoch()
        finally:
            if bar is not None:
                bar.close()
            self.log.bar = None

    def after_step(self, va_iter, run_dir, stop, bar):
        config = self.config
        if bar is not None:
            bar.update(1)
            # the loss of the last log line: reading each step's would make the host wait for the GPU every step
            shown = {} if self.logged_loss is None else {'loss': f'{self.logged_loss:.3f}'}
            bar.set_postfix(**shown, tok_s=f'{self.window.timed_tokens / self.window.train_seconds():.0f}')
        end = self.step == config.max_step
        last = stop.agreed is not None or end
        if self.step % config.log_interval == 0 or (end and self.window.n_steps):  # a run shorter than it too
            self.log_train()
        elif self.step == self.first_step + 1:
            self.announce_first_line()
        evaluated = self.step % config.eval_interval == 0 or end  # the final model is validated
        if evaluated:
            self.validate(va_iter, run_dir)
        if last or evaluated or (config.save_interval and self.step % config.save_interval == 0):
            self.save_checkpoint(run_dir, confirmed=last)

    def announce_first_line(self):
        """After this process's first step: when the first training line is far off (a full-size model on a CPU),
        say when it will come, so that a long silence is not taken for a hang."""
        config, took = self.config, time.time() - self.eval_start
        next_line = min(-(-self.step // config.log_interval) * config.log_interval, config.max_step)
        wait = took * (next_line - self.step)
        if wait > 30:
            self.log(f'| step {self.step} took {took:.1f}s: the next line comes at step {next_line} '
                     f'(--log-interval {config.log_interval}), in about {wait / 60:.0f} min')

    def test(self, te_iter, run_dir):
        """The original's end of training: the best model (model.pt) on the test split; the log says which."""
        model_step = self.step
        if run_dir and os.path.exists(os.path.join(run_dir, 'model.pt')):
            best = read_model_file(os.path.join(run_dir, 'model.pt'))[1]
            ckpt.load_weights(self.model, self.dist.local_model_state(best['model_state'], self.model), 'model.pt')
            model_step = best.get('step')
            valid = best.get('val_loss')
            shown = '' if valid is None else ', ' + ' '.join(metric_text(self.config.dataset, valid, 'valid').split())
            self.log(f'Testing {run_dir}/model.pt, the best model by validation: step {model_step}{shown}')
        test_loss = self.validation_loss(te_iter)
        self.log('=' * 100)
        self.log('| End of training ' + format_loss(self.config.dataset, 'test', test_loss))
        self.log('=' * 100)
        self.metrics.write(step=self.step, split='test', loss=test_loss, **loss_fields(self.config.dataset, test_loss),
                           model_step=model_step)
        uniform = math.log(self.model.n_token)  # the loss of knowing nothing
        if not test_loss <= uniform:
            self.log(f'WARNING: the test loss {test_loss:.4g} is worse than a uniform guess over the '
                     f'{self.model.n_token} symbols ({uniform:.2f}): training diverged; try a lower --lr')
        return test_loss
