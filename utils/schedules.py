"""Learning-rate schedules of the original train.py, in closed form.

The original drove torch's schedulers from its loop (CosineAnnealingLR.step(step), a LambdaLR for inv_sqrt,
ReduceLROnPlateau on the validation loss) and overwrote the learning rate by hand during warmup. Here the rate is
a plain function of the number of finished optimizer steps, so a resumed run only needs the step count (plus the
plateau scale for dev_perf) to continue on exactly the same curve.

Two quirks of the original are not kept (see docs/differences.md):
  * the very first update used the full rate even with warmup (the loop only overwrote it after that update);
    here warmup is linear from step 0 for every scheduler;
  * with `dev_perf` or `constant` and warmup, the rate stayed at lr * (warmup - 1) / warmup forever because
    nothing set it back after warmup; here it reaches lr.
"""
import math

SCHEDULERS = ('cosine', 'inv_sqrt', 'dev_perf', 'constant')


def learning_rate(step, base_lr, scheduler, warmup_step=0, max_step=1, eta_min=0.0, plateau_scale=1.0,
                  lr_min=0.0, anchor=(0, 0.0)):
    """The rate of the update that follows `step` finished updates (step = 0 for the first one). `anchor`
    (step, progress): where the cosine stands at that step; (0, 0.0) unless a resume changed max_step
    (see stretched_anchor)."""
    if scheduler == 'inv_sqrt':
        # Attention-is-all-you-need shape: linear up to warmup, then 1/sqrt(step), as a multiplier of base_lr.
        if step == 0 and warmup_step == 0:
            return base_lr
        if step > warmup_step:
            return base_lr / math.sqrt(step)
        return base_lr * step / warmup_step ** 1.5
    if step < warmup_step:
        return base_lr * step / warmup_step
    if scheduler == 'cosine':
        # CosineAnnealingLR's closed form, counted from step 0 as the original (not from the end of warmup).
        progress = cosine_progress(step, max_step, anchor)
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2
    if scheduler == 'dev_perf':
        return max(base_lr * plateau_scale, lr_min)
    if scheduler == 'constant':
        return base_lr
    raise ValueError(f'unknown scheduler {scheduler!r}; known: {", ".join(SCHEDULERS)}')


def cosine_progress(step, max_step, anchor=(0, 0.0)):
    """How far the cosine has gone at `step`, 0 at its start (rate base_lr) to 1 at max_step (rate eta_min):
    linear from the anchor (step, progress) to (max_step, 1). The anchor (0, 0.0) is the original's step/max_step."""
    anchor_step, anchor_progress = anchor
    if step >= max_step or max_step <= anchor_step:
        return 1.0
    return anchor_progress + (1 - anchor_progress) * (step - anchor_step) / (max_step - anchor_step)


def stretched_anchor(step, old_max_step, new_max_step, warmup_step=0, anchor=(0, 0.0)):
    """The cosine's anchor after a resume at `step` changes max_step: the schedule goes on from the rate it has
    reached (its progress at this step, or at the end of warmup if that is still ahead) and is stretched, or
    squeezed, to reach eta_min at the new max_step instead of jumping to where a new max_step's curve is."""
    if new_max_step == old_max_step:
        return anchor
    start = max(step, warmup_step)
    return start, cosine_progress(start, old_max_step, anchor)


class PlateauDecay:
    """Reduce-on-plateau for `--scheduler dev_perf`, with ReduceLROnPlateau's rules (mode 'min', relative
    threshold 1e-4, no cooldown): after more than `patience` evaluations without improvement the scale is
    multiplied by `decay_rate`. Only the scale is tracked; learning_rate() applies it and the floor lr_min."""

    threshold = 1e-4

    def __init__(self, decay_rate=0.5, patience=0):
        self.decay_rate = decay_rate
        self.patience = patience
        self.scale = 1.0
        self.best = math.inf
        self.num_bad = 0

    def update(self, val_loss):
        if val_loss < self.best * (1 - self.threshold):
            self.best = val_loss
            self.num_bad = 0
            return
        self.num_bad += 1
        if self.num_bad > self.patience:
            self.scale *= self.decay_rate
            self.num_bad = 0

    def state_dict(self):
        return {'scale': self.scale, 'best': self.best, 'num_bad': self.num_bad}

    def load_state_dict(self, state):
        self.scale = float(state['scale'])
        self.best = float(state['best'])
        self.num_bad = int(state['num_bad'])
