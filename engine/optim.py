"""The update rule, the learning-rate schedules and the weight average, below the training loop and both steps."""
import math
from contextlib import contextmanager


def sgd_momentum(params, grads, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
    """One SGD step, in place, as Torch7's optim.sgd (the paper's framework):

        d = g + weight_decay * w;  v = momentum * v + (1 - dampening) * d;  w -= lr * v

    with dampening = momentum by default, as Torch7 does: a step is then lr * d at
    steady state, not lr * d / (1 - momentum) as in PyTorch's SGD (dampening=0).
    With `nesterov`, the step looks ahead along the velocity (Sutskever et al. 2013, in the
    form of Torch7's and PyTorch's SGD, which require dampening 0):

        w -= lr * (d + momentum * v)

    The first step uses v = d. Weight decay applies to '*weight' parameters, not biases.
    `velocity` maps names to buffers; missing ones are created on the first step.
    """
    dampening = momentum if dampening is None else dampening
    check_nesterov(nesterov, momentum, dampening)
    for name, w in params.items():
        d = grads[name]
        if weight_decay and name.endswith("weight"):
            d = d + weight_decay * w
        v = velocity.get(name)
        if v is None:
            v = velocity[name] = d.astype(w.dtype, copy=True)
        else:
            v *= momentum
            v += (1.0 - dampening) * d
        w -= lr * (d + momentum * v) if nesterov else lr * v
    return velocity


def check_nesterov(nesterov, momentum, dampening):
    """Nesterov momentum needs a momentum and no dampening (as in Torch7 and PyTorch): ValueError otherwise."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"Nesterov momentum needs a momentum above 0 and dampening 0 "
                         f"(got momentum {momentum:g}, dampening {dampening:g})")


def lr_at(epoch, base_lr, drop_epochs, factor=0.1):
    """Learning rate of a 0-based epoch: base_lr times `factor` for each drop epoch already reached."""
    return base_lr * factor ** sum(epoch >= d for d in drop_epochs)


SCHEDULES = ("step", "cosine", "linear")
DECAYS = ("cosine", "linear")  # the schedules planned over the whole run: its length sets every rate


def scheduled_lr(base_lr, epoch, step, steps_per_epoch, epochs, schedule="step", drop_epochs=(), factor=0.1,
                 warmup_epochs=0):
    """Learning rate of update `step` (0-based) of 0-based `epoch`, for a run of `epochs` epochs.

    A linear warm-up over the first round(warmup_epochs * steps_per_epoch) updates, update t taking
    base_lr * (t + 1) / W; then `schedule`:
      step    base_lr times `factor` for each of `drop_epochs` already reached (lr_at), the warm-up
              scaling the rate of its updates;
      cosine  base_lr * (1 + cos(pi * u / U)) / 2 for update u after the warm-up of the U after it
              (Loshchilov & Hutter 2017, without restarts): from base_lr down towards 0 at the end;
      linear  base_lr * (U - u) / U: a straight line from base_lr down to base_lr / U at the last update (the
              decay Li, Yumer & Ramanan 2020, "Budgeted training", found best for a fixed budget of updates).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    t = epoch * steps_per_epoch + step
    warm = round(warmup_epochs * steps_per_epoch)
    scale = (t + 1) / warm if t < warm else 1.0
    if schedule == "step":
        return lr_at(epoch, base_lr, drop_epochs, factor) * scale
    if t < warm:
        return base_lr * scale
    after = max(epochs * steps_per_epoch - warm, 1)
    u = min(t - warm, after)
    if schedule == "linear":
        return base_lr * (after - u) / after
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * u / after))


class _Copies:
    """A copy of a model's parameters kept beside them (in their dtype, on their backend), with a scratch copy: the
    swap that evaluation uses."""

    def __init__(self, params, kept=None):
        self._kept = {k: (w.copy() if kept is None else kept[k].astype(w.dtype, copy=True))
                      for k, w in params.items()}
        self._scratch = {k: w.copy() for k, w in params.items()}

    @contextmanager
    def swapped_in(self, params):
        """A context in which the parameters hold the kept copy (copied into the same buffers, so compiled steps
        and plans holding their addresses see it) and after which they hold the weights again."""
        for k, w in params.items():
            self._scratch[k][...] = w
            w[...] = self._kept[k]
        try:
            yield
        finally:
            for k, w in params.items():
                w[...] = self._scratch[k]


class WeightAverage(_Copies):
    """An exponential moving average of a model's parameters (Polyak averaging as in TensorFlow's
    ExponentialMovingAverage): after each update, average = decay * average + (1 - decay) * weights,
    starting from the weights given.

    ``update(params)`` runs in place with no allocation; ``swapped_in(params)`` is a context in which the
    parameters hold the average (copied into the same buffers, so compiled steps and plans holding their
    addresses see it) and after which they hold the weights again."""

    def __init__(self, params, decay, average=None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight average: decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        super().__init__(params, average)
        self.average = self._kept

    def update(self, params):
        for k, w in params.items():
            a, tmp = self.average[k], self._scratch[k]
            a *= self.decay
            tmp[...] = w
            tmp *= 1.0 - self.decay
            a += tmp


class Lookahead(_Copies):
    """Lookahead (Zhang, Lucas, Hinton & Ba 2019): slow weights that, every `k` updates of the optimizer (the
    fast weights), move a fraction `alpha` of the way to the fast weights, which then restart from them:

        every k-th update:  slow += alpha * (weights - slow);  weights = slow

    The optimizer's momentum carries on. ``update(params, count)`` follows update number `count` (1-based, over
    the whole run, so a resumed run syncs where the uninterrupted one does), in place, with no allocation;
    ``swapped_in(params)`` is a context in which the parameters hold the slow weights, which evaluation and the
    model file use."""

    def __init__(self, params, k, alpha, slow=None):
        if type(k) is not int or k < 1:
            raise ValueError(f"lookahead: k must be a whole number of updates >= 1, got {k!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"lookahead: alpha must lie in (0, 1], got {alpha!r}")
        self.k, self.alpha = k, float(alpha)
        super().__init__(params, slow)
        self.slow = self._kept

    def update(self, params, count):
        if count % self.k:
            return
        for name, w in params.items():
            s, tmp = self.slow[name], self._scratch[name]
            tmp[...] = w
            tmp -= s
            tmp *= self.alpha
            s += tmp
            w[...] = s
