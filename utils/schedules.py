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
                  lr_min=0.0):
    """The rate of the update that follows `step` finished updates (step = 0 for the first one)."""
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
        progress = min(step, max_step) / max_step
        return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2
    if scheduler == 'dev_perf':
        return max(base_lr * plateau_scale, lr_min)
    if scheduler == 'constant':
        return base_lr
    raise ValueError(f'unknown scheduler {scheduler!r}; known: {", ".join(SCHEDULERS)}')


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
