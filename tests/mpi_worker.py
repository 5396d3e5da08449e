"""One rank of a data-parallel job for tests/test_distributed.py: a Trainer on tiny in-memory data.

    mpirun -np 2 python tests/mpi_worker.py OUT [--epochs N] [--no-dropout] [--resume] [--fail raise|kill|nan]
                                                [--signal-at EPOCH,STEP] [--send RANK,SIGNAL,EPOCH,STEP ...]
                                                [--pause SECONDS] [--bucket-mib MIB] [--no-overlap]
    python tests/mpi_worker.py OUT --plain ...       # the same run in one process, without MPI

Every rank writes into OUT/rank<r> (so a test sees which ranks wrote anything); with --plain,
into OUT/rank0. The data are drawn from a fixed seed, the same on every rank.
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine import Dropout  # noqa: E402
from engine.lowering import leaves  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from models.paper import build  # noqa: E402

BATCH = 16


def tiny_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return dict(train_x=rng.standard_normal((n, 1, 28, 28)).astype(np.float32), train_y=rng.integers(0, 10, n),
                test_x=rng.standard_normal((32, 1, 28, 28)).astype(np.float32), test_y=rng.integers(0, 10, 32))


def make_trainer(out, epochs, dropout=True, lr=0.05, step="auto", dist=None, n_train=64, augment="none"):
    model = build("flattened", (1, 28, 28), 10, seed=1)
    if not dropout:
        for _, layer in leaves(model):
            if isinstance(layer, Dropout):
                layer.p = 0.0
    cfg = dict(epochs=epochs, batch_size=BATCH, lr=lr, momentum=0.9, weight_decay=1e-4, lr_drop_epochs=[1], seed=1,
               step=step, augment=augment)
    return Trainer(model, tiny_data(n_train), cfg, out, log=print, progress=False, dist=dist)


def main(args, dist):
    rank = dist.rank if dist is not None else 0
    if dist is not None:
        dist.overlap = not args.no_overlap
        if args.bucket_mib is not None:
            dist.bucket_mib = args.bucket_mib
    out = Path(args.out) / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    t = make_trainer(out, args.epochs, dropout=not args.no_dropout, lr=1e12 if args.fail == "nan" else 0.05,
                     step=args.step, dist=dist, n_train=args.n_train, augment=args.augment)

    def fail(t):
        if args.pause:  # a slower step, for tests that act on a job while it runs (tests/multihost.py)
            time.sleep(args.pause)
        if rank == 0 and args.signal_at and [t.epoch, t.step_in_epoch] == args.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # this rank only: the others learn it at the next reduction
        for to, signum, epoch, step in args.send:
            if to == rank and [t.epoch, t.step_in_epoch] == [epoch, step]:
                os.kill(os.getpid(), signum)
        if rank == 1 and t.epoch == 1 and t.step_in_epoch == 2:
            if args.fail == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            if args.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
    early = []

    def on_step(t):
        if dist is not None:
            early.append(t.step.early_buckets)
        fail(t)
    t.on_step = on_step
    seen = []
    if args.record_inputs:  # the images this rank trains on, step by step
        inner = t.step.inner if dist is not None else t.step
        loss = inner.loss

        def recording(x, y):
            seen.append(np.array(x))
            return loss(x, y)
        inner.loss = recording
    if args.resume:
        t.resume()
    status = t.run()
    if args.record_inputs:
        np.savez(out / "inputs.npz", *seen)
    by = f" by {signal.Signals(t.stop_signal).name}" if t.stop_signal else ""
    print(f"rank {rank} of {dist.size if dist else 1}: {status}{by}, step {t.step.name}, history {len(t.history)}")
    if dist is not None and early:
        print(f"rank {rank}: {len(dist.buckets)} buckets, started during the backward: {min(early)}-{max(early)}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-train", type=int, default=64, help="training images (batches of 16)")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--step", default="auto")
    p.add_argument("--bucket-mib", type=float, default=None,
                   help="MiB per bucket of the gradient reduction (default: the engine's)")
    p.add_argument("--no-overlap", action="store_true", help="reduce the buckets after the whole backward")
    p.add_argument("--augment", default="none", help="engine.augment spec")
    p.add_argument("--record-inputs", action="store_true", help="write the images of each step to OUT/rankR/inputs.npz")
    p.add_argument("--fail", choices=["raise", "kill", "nan"], default=None)
    p.add_argument("--pause", type=float, default=0.0, help="seconds every rank sleeps after each step")
    p.add_argument("--plain", action="store_true", help="one process, no MPI")
    p.add_argument("--signal-at", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="EPOCH,STEP (0-based epoch): rank 0 sends itself SIGUSR1 after that step")
    p.add_argument("--send", action="append", default=[],
                   type=lambda s: [int(v) if i != 1 else signal.Signals[v] for i, v in enumerate(s.split(","))],
                   help="RANK,SIGNAL,EPOCH,STEP: that rank sends itself SIGNAL (e.g. SIGTERM) after that step")
    a = p.parse_args()
    if a.plain:
        sys.exit(main(a, None))
    from engine.distributed import init
    d = init()
    sys.exit(d.guard(main, a, d))
