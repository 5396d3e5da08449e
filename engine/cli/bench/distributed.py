"""`bench distributed` (under mpirun -np N): one Allreduce of the gradients, and training images/s of
N ranks x --threads (the buckets' reductions overlapped with the backward, and after it) against
1 rank x N*threads."""
import statistics

import numpy as np

import engine

from ..common import fail
from .timing import environment, print_environment, timeit

ROUNDS = 3  # alternating rounds of the overlapped and the after-the-backward reduction


def bench_distributed(args):
    """Under `mpirun -np N`: the time of one Allreduce of the model's gradient buffer, then training images/s
    of N ranks x T threads (data-parallel, engine/distributed.py), with the buckets' reductions overlapped
    with the backward and started after it (in alternating rounds), and of rank 0 alone on N*T threads
    while the others sleep, in the same run. Global batch --batch, split over the ranks."""
    from engine.distributed import DistributedError, init
    try:
        dist = init()
    except DistributedError as e:
        fail(f"{e}")
    return dist.guard(_bench_distributed, args, dist)


def _bench_distributed(args, dist):
    from engine.trainstep import make_step
    from engine.models.paper import build
    n, threads, batch = dist.size, args.threads, args.batch
    if batch % n:
        fail(f"--batch {batch} is not a multiple of the {n} ranks")
    shape = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28)}[args.dataset]
    n_classes = {"cifar10": 10, "cifar100": 100, "mnist": 10}[args.dataset]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, n_classes, batch)
    engine.set_num_threads(threads)
    net = build(args.model, shape, n_classes)
    dist.setup(net, dict(train_x=x, train_y=y, test_x=x[:1], test_y=y[:1]), dict(batch_size=batch, seed=0))
    step = dist.wrap(make_step(net, "auto", batch // n)[0], lambda: False)
    mine = step.shard(np.arange(batch))
    xs, ys, velocity = x[mine], y[mine], {}
    mpi, buf = dist.MPI, dist.buf  # all zeros before the first step: the sums stay zeros
    reduce = timeit(lambda: dist.comm.Allreduce(mpi.IN_PLACE, buf, op=mpi.SUM), max(args.repeat, 10), warmup=2)

    def distributed_step():
        step.loss(xs, ys)
        step.apply(velocity, 1e-3, 0.9, 1e-4)
    dist.comm.Barrier()
    together = {True: [], False: []}  # overlapped, after the backward
    for _ in range(ROUNDS):
        for overlap in together:
            dist.overlap = overlap
            together[overlap] += timeit(distributed_step, args.repeat, warmup=1)
    dist.wait()
    alone = None
    if dist.is_root:
        engine.set_num_threads(n * threads)
        net1 = build(args.model, shape, n_classes)
        step1, v1 = make_step(net1, "auto", batch)[0], {}
        alone = timeit(lambda: step1.step(x, y, 1e-3, 0.9, 1e-4, None, v1), args.repeat, warmup=2)
    dist.wait()
    line, warnings = dist.startup(threads)
    if not dist.is_root:
        return 0
    print_environment(environment(threads))
    print("\n".join([f"# {line}", *(f"# {w}" for w in warnings)]))
    size = 4 * dist.n_grads
    t = statistics.median(reduce)
    print(f"# {args.model} on {args.dataset} inputs {shape}, global batch {batch}, step {step.name}")
    print(f"allreduce of the gradients: {size / 2**20:.2f} MiB in {1e3 * t:.3f} ms median "
          f"(min {1e3 * min(reduce):.3f}, max {1e3 * max(reduce):.3f}); ring bus bandwidth "
          f"2(N-1)/N x size / time = {2 * (n - 1) / n * size / t / 1e9:.2f} GB/s")
    sizes = [4 * (hi - lo) / 2**20 for lo, hi in dist.buckets]
    print(f"# {len(sizes)} bucket(s) of {min(sizes):.2f}-{max(sizes):.2f} MiB (--bucket-mib {dist.bucket_mib:g}); "
          f"{ROUNDS} alternating rounds of {args.repeat} steps each way")
    print(f"{'what':<48} {'median_ms':>9} {'min_ms':>8} {'max_ms':>8} {'images/s':>9}")
    rows = ((f"{n} rank(s) x {threads} thread(s), overlapped", together[True]),
            (f"{n} rank(s) x {threads} thread(s), reduced after the backward", together[False]),
            (f"1 rank x {n * threads} thread(s)", alone))
    for what, times in rows:
        t = statistics.median(times)
        print(f"{what:<48} {1e3 * t:>9.2f} {1e3 * min(times):>8.2f} {1e3 * max(times):>8.2f} {batch / t:>9.0f}")
    over, after = statistics.median(together[True]), statistics.median(together[False])
    print(f"# overlapped against after the backward: {after / over:.2f}x ({1e3 * (after - over):+.2f} ms a step)")
    print(f"# {n} x {threads} (overlapped) against 1 x {n * threads}: {statistics.median(alone) / over:.2f}x")
    return 0
