"""The training loop: epochs of steps, evaluation, logs, checkpoints and clean stops on signals.

The update rule is engine/optim.py, the step engine/trainstep.py, the checkpoint format
engine/checkpoint.py; a run stopped by a signal writes its checkpoint first, so nothing is lost.
"""
import contextlib
import json
import math
import signal
import time
from pathlib import Path

import numpy as np

from . import augment, npzfile
from .checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from .losses import SoftmaxCrossEntropy
from .optim import Lookahead, WeightAverage, scheduled_lr
from .plan import compiled_or_reason
from .runtime import ops_for
from .trainstep import make_step

READ_EVERY = 20  # steps between reads of the running loss and count from a device (from the CPU: every step)


def duration(seconds):
    """A time a person reads at a glance: '2 h 3 min', '14 min', '40 s'."""
    minutes = round(seconds / 60)
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------- evaluation

def eval_forward(model):
    """What evaluation runs: the model compiled for inference (float32, CPU or GPU), else its layers."""
    return compiled_or_reason(model, gpu=True)[0] or model.forward


def evaluate(model, x, y, batch_size=500, progress=False, forward=None):
    """(mean loss, accuracy) of `model` in eval mode on (x, y); restores the previous mode.

    x and y are host (numpy) arrays; each batch is copied to the model's backend. In float32 the
    network runs compiled for inference (on the CPU engine.plan, a snapshot of the current weights;
    on the GPU the GpuPlan of engine/runtime/cuda_step.py, one graph launch per batch; the same
    outputs up to float32 rounding, several times faster, no layer buffers); otherwise layer by layer. progress=True shows a progress bar with the rate (images/s).
    `forward`: a plan of this model built before (a GpuPlan reads the weights at each call, so the trainer keeps one
    and its captured graphs for the whole run).
    """
    ops = ops_for(model.backend)
    was_training = model.training
    model.eval()
    if forward is None:
        forward = eval_forward(model)
    loss_fn = SoftmaxCrossEntropy()
    total_loss, correct = 0.0, 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(x), desc="evaluating", unit="img", leave=False, dynamic_ncols=True)
    try:
        for i in range(0, len(x), batch_size):
            logits = forward(ops.asarray(x[i:i + batch_size]))
            yb = ops.asarray(y[i:i + batch_size])
            total_loss += loss_fn(logits, yb) * len(logits)
            correct += int((logits.argmax(axis=1) == yb).sum())
            if bar:
                bar.update(len(logits))
    finally:
        model.train(was_training)
        if bar:
            bar.close()
    return total_loss / len(x), correct / len(x)


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Mini-batch SGD on (train_x, train_y), evaluated on (test_x, test_y) after every epoch.

    The data stays in host memory; each batch is copied to the model's backend (model.to(...)).

    config keys: epochs, batch_size, lr, momentum, weight_decay, dampening (None: Torch7's,
    equal to momentum), nesterov (engine.optim.sgd_momentum's Nesterov momentum; default False),
    lr_drop_epochs, lr_drop_factor, seed, eval_batch_size, step ('auto',
    'compiled' or 'layers': see engine.trainstep; default 'auto', the compiled step where it
    runs), augment (a spec of engine.augment for the training images; default 'none'),
    schedule and warmup_epochs (engine.optim.scheduled_lr; default 'step', 0), label_smoothing
    (engine.losses.SoftmaxCrossEntropy; default 0), ema (the decay of an average of the weights,
    engine.optim.WeightAverage, which evaluation and `final_weights()` use; default 0: none), lookahead and
    lookahead_alpha (engine.optim.Lookahead's k and alpha; default 0: none, and 0.5); `out`
    is the run folder (checkpoint.npz, log.jsonl). `settings` (JSON-able) is
    stored in the checkpoint. `trainer.step` is the step in use, `trainer.step_note` why
    'auto' fell back to the layer path (None if it did not).
    Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves a checkpoint and stops:
    `run()` then returns 'interrupted'. The model's dropout Generator, if it has one as
    `model.rng` (models.paper.build sets it), is saved with the checkpoint so a resumed
    run draws the same masks. `on_step(trainer)` is called after each step,
    `on_epoch(trainer)` after each epoch's evaluation and checkpoint.
    `dist` (an engine.distributed.Distributed, all ranks constructing their Trainer together)
    trains data-parallel over MPI ranks: see engine/distributed.py. Only its rank 0 logs,
    shows progress and writes the run folder.
    """

    def __init__(self, model, data, config, out, settings=None, log=print, progress=True, on_step=None,
                 on_epoch=None, dist=None):
        self.model, self.data, self.cfg, self.out = model, data, dict(config), Path(out)
        model.input_grad = False  # nothing uses the gradient of the images: skip it
        self.settings = settings or {}
        self.log, self.progress, self.on_step, self.on_epoch = log, progress, on_step, on_epoch
        self.velocity = {}
        self.data_rng = np.random.default_rng(self.cfg["seed"] + 1)
        self.epoch, self.step_in_epoch, self.perm = 0, 0, None
        self.running = dict(loss=0.0, correct=0, seen=0, seconds=0.0)
        self.history = []
        self._eval_plan = None  # on the GPU, the evaluation's plan (_gpu_plan)
        self.epoch_walls = []  # wall seconds (training and evaluation) of each whole epoch this process ran
        self.estimated = False  # the first whole-run estimate, from the first steps' rate, was given
        self.stop_requested, self.stop_signal = False, None
        self.dist = dist
        if dist is not None:  # same data, rank 0's weights, one gradient buffer (before the step takes its pointers)
            dist.setup(model, data, self.cfg)
            if not dist.is_root:
                self.log, self.progress = (lambda message: None), False
        self.step, self.step_note = make_step(model, self.cfg.get("step", "auto"),
                                              -(-self.cfg["batch_size"] // (dist.size if dist else 1)))
        self.step.loss_fn.smoothing = float(self.cfg.get("label_smoothing", 0.0))
        self.average = WeightAverage(model.params, self.cfg["ema"]) if self.cfg.get("ema") else None
        self.lookahead = self._lookahead() if self.cfg.get("lookahead") else None
        if dist is not None:
            self.step = dist.wrap(self.step, self._requested_signal)

    def _lookahead(self, slow=None):
        return Lookahead(self.model.params, self.cfg["lookahead"], self.cfg.get("lookahead_alpha", 0.5), slow)

    def _gpu_plan(self):
        """On the GPU, the evaluation's GpuPlan, built at the first evaluation and kept (it reads the weights at each
        call, so it follows the training and the swapped-in averages); None elsewhere (the CPU's plan is a snapshot
        of the weights, built at each evaluation)."""
        if self.model.backend != "cupy":
            return None
        if self._eval_plan is None:
            self._eval_plan = eval_forward(self.model)
        return self._eval_plan

    @property
    def checkpoint_path(self):
        return self.out / CHECKPOINT_FILE

    # state ------------------------------------------------------------------------
    def _meta(self):
        model_rng = getattr(self.model, "rng", None)  # the Generator of the model's dropout layers
        return dict(epoch=self.epoch, step_in_epoch=self.step_in_epoch, running=self.running,
                    history=self.history, data_rng=self.data_rng.bit_generator.state,
                    model_rng=model_rng.bit_generator.state if model_rng is not None else None,
                    settings=self.settings, config=self.cfg)

    def save(self):
        meta = self._meta()
        kept = (self.average.average if self.average else None, self.lookahead.slow if self.lookahead else None)
        if self.dist is not None:  # collective; rank 0 alone writes
            meta = self.dist.checkpoint_meta(self.model, self.velocity, meta, *kept)
            if meta is None:
                return
        save_checkpoint(self.checkpoint_path, self.model, self.velocity, meta, self.perm, *kept)

    def final_weights(self):
        """A context in which the model holds the weights that evaluation sees and the model file keeps: the
        average of the weights where the run keeps one (config ema), else Lookahead's slow weights where the run
        keeps them (config lookahead), else the weights the optimizer reached (as checkpoint_weights chooses)."""
        chosen = self.average or self.lookahead
        return chosen.swapped_in(self.model.params) if chosen else contextlib.nullcontext()

    def _requested_signal(self):
        """The signal this process was asked to stop by (SIGINT when stop_requested was set without one), or None."""
        return (self.stop_signal or signal.SIGINT) if self.stop_requested else None

    def _stopping(self):
        """Stop now? This process's Ctrl-C or SIGTERM; distributed, any rank's, as agreed at the last step's reduction."""
        return self.stop_requested if self.dist is None else self.dist.stop_agreed is not None

    def _write_log(self):
        """Rewrite log.jsonl from the history (the checkpoint's), atomically: it never disagrees with the checkpoint."""
        if self.dist is not None and not self.dist.is_root:
            return
        npzfile.write_text_atomic(self.out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))

    def resume(self, path=None):
        """Continue from a checkpoint (this run's by default); CheckpointError when it does not fit this run."""
        path = path or self.checkpoint_path
        def load():
            return load_checkpoint(path, {k: v.shape for k, v in self.model.params.items()}, len(self.data["train_x"]))
        # distributed: rank 0 reads the checkpoint, every rank gets it
        params, velocity, meta, perm, average, slow = load() if self.dist is None else self.dist.share_checkpoint(load)
        steps = math.ceil(len(self.data["train_x"]) / self.cfg["batch_size"])
        if meta["step_in_epoch"] > steps:
            raise CheckpointError(path, f"step {meta['step_in_epoch']} of an epoch of {steps} steps")
        if meta["model_rng"] is not None and getattr(self.model, "rng", None) is None:
            raise CheckpointError(path, "holds a dropout generator state, the model has no generator")
        self.model.load_params(params)
        ops = ops_for(self.model.backend)
        self.velocity = {k: ops.asarray(v.astype(self.model.dtype)) for k, v in velocity.items()}
        if (average is not None) != (self.average is not None):
            raise CheckpointError(path, "holds an average of the weights, the run keeps none" if average is not None
                                  else "holds no average of the weights, the run keeps one (ema)")
        if average is not None:
            self.average = WeightAverage(self.model.params, self.cfg["ema"],
                                         {k: ops.asarray(v) for k, v in average.items()})
        if (slow is not None) != (self.lookahead is not None):
            raise CheckpointError(path, "holds slow weights, the run keeps none" if slow is not None
                                  else "holds no slow weights, the run keeps them (lookahead)")
        if slow is not None:
            self.lookahead = self._lookahead({k: ops.asarray(v) for k, v in slow.items()})
        self.epoch, self.step_in_epoch = meta["epoch"], meta["step_in_epoch"]
        self.running, self.history = meta["running"], meta["history"]
        self.data_rng.bit_generator.state = meta["data_rng"]
        if meta["model_rng"] is not None:
            self.model.rng.bit_generator.state = meta["model_rng"]
        if self.dist is not None:  # ranks > 0: their own dropout streams
            self.dist.restore_rng(self.model, meta, self.cfg["seed"])
        self.perm = perm
        self._write_log()  # the log follows the checkpoint: records of a crash after it was written are dropped
        return meta

    # loop -------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        """Ctrl-C (SIGINT) or SIGTERM (kill, timeout, a batch system's time limit, docker stop): the first
        finishes the step, saves a checkpoint and stops; a second stops at once."""
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested, self.stop_signal = True, signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"\n{name}: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def run(self):
        """Train until cfg['epochs'] epochs are done; returns 'done' or 'interrupted' (then stop_signal says
        which signal stopped the run: this process's, None when stop_requested was set without one, or,
        distributed, the one every rank agreed on, whichever rank received it)."""
        handlers = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not in the main thread: no signal handling
            pass
        try:
            while self.epoch < self.cfg["epochs"]:
                if not self._run_epoch():
                    if self.dist is not None:
                        self.stop_signal = self.dist.stop_agreed
                    self.save()
                    self.log(f"saved {self.checkpoint_path} at epoch {self.epoch + 1}, step {self.step_in_epoch}")
                    return "interrupted"
            return "done"
        finally:
            for signum, handler in handlers.items():
                if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                    signal.signal(signum, handler)

    def seconds_left(self, steps_done=0, seconds_per_step=None):
        """The run's remaining wall time: the median whole epoch this process ran times the epochs left,
        or, before one has finished, `seconds_per_step` times the steps left (evaluation not counted)."""
        epochs_left = self.cfg["epochs"] - self.epoch
        if self.epoch_walls:
            return epochs_left * float(np.median(self.epoch_walls))
        steps = math.ceil(len(self.data["train_x"]) / self.cfg["batch_size"])
        return (epochs_left * steps - steps_done) * (seconds_per_step or 0.0)

    def _run_epoch(self):
        x, y = self.data["train_x"], self.data["train_y"]
        bs, n = self.cfg["batch_size"], len(x)
        steps = math.ceil(n / bs)
        if self._stopping():
            return False
        wall0, whole = time.perf_counter(), self.perm is None and self.step_in_epoch == 0
        if self.perm is None:  # a new epoch (a resumed one keeps its saved order)
            self.perm = self.data_rng.permutation(n)
            self.step_in_epoch = 0
            self.running = dict(loss=0.0, correct=0, seen=0, seconds=0.0)
        def lr_of(step):
            return scheduled_lr(self.cfg["lr"], self.epoch, step, steps, self.cfg["epochs"],
                                self.cfg.get("schedule", "step"), self.cfg["lr_drop_epochs"],
                                self.cfg.get("lr_drop_factor", 0.1), self.cfg.get("warmup_epochs", 0))
        lr = lr_of(self.step_in_epoch)
        draws = augment.epoch_draws(self.cfg.get("augment", "none"), n, self.cfg["seed"], self.epoch, x.shape[2:])
        self.model.train()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg['epochs']}",
                       unit="batch", leave=False, dynamic_ncols=True)
        r = self.running
        seen0, seconds0 = r["seen"], r["seconds"]  # rates count this process's steps only (not a resumed run's past)

        def rate():
            return (r["seen"] - seen0) / max(r["seconds"] - seconds0, 1e-9)

        ops = ops_for(self.model.backend)  # batches are copied there; the losses and counts come back in groups
        read_every = 1 if ops.name == "cpu" else READ_EVERY
        pending = []  # (step, batch size, loss, number correct) not read back yet, the last two on the backend

        def read_back():
            """Add the pending steps to the running sums (one read from a device); stop at a bad loss."""
            if not pending:
                return
            losses, corrects = (ops.asnumpy(ops.xp.stack([ops.xp.asarray(p[i]) for p in pending])) for i in (2, 3))
            for (step, size, _, _), loss, correct in zip(pending, losses, corrects):
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss} at epoch {self.epoch + 1}, step {step} (lr {lr:g}): training stopped. "
                        f"The last good checkpoint is {self.checkpoint_path}; try a smaller --lr or another --init.")
                r["loss"] += float(loss) * size
                r["correct"] += int(correct)
                r["seen"] += size
            pending.clear()

        check_finite = getattr(self.model, "check_finite", False)
        self.model.check_finite = False  # each batch is checked on the host, before it is copied
        last_note = time.perf_counter()
        steps0, timed0 = self.step_in_epoch, None
        try:
            while self.step_in_epoch < steps:
                if self._stopping():
                    read_back()
                    return False
                t0 = time.perf_counter()
                idx = self.perm[self.step_in_epoch * bs:(self.step_in_epoch + 1) * bs]
                mine = idx if self.dist is None else self.step.shard(idx)  # distributed: this rank's shard
                xh, yh = x[mine], y[mine]
                if check_finite and xh.dtype.kind == "f" and not np.isfinite(xh).all():
                    raise ValueError(f"training images hold NaN or infinite values (epoch {self.epoch + 1}, "
                                     f"step {self.step_in_epoch + 1})")
                if draws is not None:  # each image's flip, shift and cutout of this epoch (the same on every rank)
                    xh = augment.apply(xh, *draws.take(mine))
                loss, correct = self.step.loss(ops.asarray(xh), yh)  # the labels are checked on the host too
                pending.append((self.step_in_epoch + 1, len(idx), loss, correct))
                if len(pending) >= read_every or self.step_in_epoch + 1 == steps:
                    read_back()  # on the CPU every step, so a bad loss stops the run before its update
                lr = lr_of(self.step_in_epoch)
                self.step.apply(self.velocity, lr, self.cfg["momentum"], self.cfg["weight_decay"],
                                self.cfg.get("dampening"), bool(self.cfg.get("nesterov", False)))
                if self.lookahead:  # after the update, before the average sees the weights
                    self.lookahead.update(self.model.params, self.epoch * steps + self.step_in_epoch + 1)
                if self.average:
                    self.average.update(self.model.params)
                self.step_in_epoch += 1
                r["seconds"] += time.perf_counter() - t0
                done = self.step_in_epoch - steps0
                if done == 2:  # the first steps allocate and warm up: time from here
                    timed0 = time.perf_counter()
                per_step = (time.perf_counter() - timed0) / (done - 2) if timed0 and done > 2 else None
                if not self.estimated and done == 12 and per_step:
                    self.estimated = True
                    left = self.seconds_left(self.step_in_epoch, per_step)
                    message = (f"estimate: about {duration(left)} for the {self.cfg['epochs'] - self.epoch} "
                               f"epoch(s) left (training at the first steps' rate; each evaluation adds to it)")
                    if bar:
                        with bar.external_write_mode():
                            self.log(message)
                    else:
                        self.log(message)
                if bar:
                    bar.update(1)
                    if not pending:
                        left = self.seconds_left(self.step_in_epoch, per_step) if (per_step or self.epoch_walls) \
                            else None
                        bar.set_postfix(loss=f"{r['loss'] / r['seen']:.3f}", acc=f"{r['correct'] / r['seen']:.3f}",
                                        img_s=f"{rate():.0f}", **({"run_left": duration(left)} if left else {}))
                elif not pending and time.perf_counter() - last_note > 60:  # no bar (--quiet, a log file): each minute
                    last_note = time.perf_counter()
                    self.log(f"  epoch {self.epoch + 1} step {self.step_in_epoch}/{steps}  loss {r['loss'] / r['seen']:.4f} "
                             f"acc {100 * r['correct'] / r['seen']:.2f}%  {rate():.0f} img/s")
                if self.on_step:
                    self.on_step(self)
        finally:
            self.model.check_finite = check_finite
            if bar:
                bar.close()
        t0 = time.perf_counter()
        with self.final_weights():
            test_loss, test_acc = (evaluate if self.dist is None else self.dist.evaluate)(  # distributed: a share each
                self.model, self.data["test_x"], self.data["test_y"], self.cfg.get("eval_batch_size", 500),
                progress=self.progress, forward=self._gpu_plan())
        record = dict(epoch=self.epoch + 1, lr=lr_of(0), train_loss=r["loss"] / r["seen"], train_acc=r["correct"] / r["seen"],
                      test_loss=test_loss, test_acc=test_acc, seconds=r["seconds"],
                      images_per_s=rate(), eval_seconds=time.perf_counter() - t0)
        self.history.append(record)
        self.epoch, self.step_in_epoch, self.perm = self.epoch + 1, 0, None
        if whole:
            self.epoch_walls.append(time.perf_counter() - wall0)
        self.save()
        self._write_log()
        left = f"; about {duration(self.seconds_left())} left" if self.epoch < self.cfg["epochs"] and \
            self.epoch_walls else ""
        split = self.cfg.get("eval_split", "test")
        self.log(f"epoch {record['epoch']:3d}  lr {record['lr']:.4g}  train loss {record['train_loss']:.4f} "
                 f"acc {100 * record['train_acc']:.2f}%  {split} loss {test_loss:.4f} acc {100 * test_acc:.2f}%  "
                 f"{record['seconds']:.0f}s ({record['images_per_s']:.0f} img/s), "
                 f"evaluation {record['eval_seconds']:.0f}s "
                 f"({len(self.data['test_x']) / max(record['eval_seconds'], 1e-9):.0f} img/s){left}")
        if self.on_epoch:
            self.on_epoch(self)
        return True
