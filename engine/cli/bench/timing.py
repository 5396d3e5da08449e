"""What every benchmark shares: timing with warm-up and medians, the environment header, argument types."""
import argparse
import os
import platform
import statistics
import time

import numpy as np

import engine

from ..common import fail


def timeit(fn, repeat, warmup=1, sync=None):
    """Seconds per call of fn() over `repeat` runs, after `warmup` untimed calls (sync() ends each run)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def backends_to_time(choice):
    """The backends to time: 'cpu', 'cupy' (an error if unusable), or 'all' = the CPU and CuPy if usable."""
    from engine.runtime.select import BackendUnavailable, select_backend
    if choice == "cpu":
        return ["cpu"]
    if choice == "cupy":
        try:
            select_backend("cupy")
        except BackendUnavailable as e:
            fail(f"{e}")
        return ["cupy"]
    name, why = select_backend("auto")
    if why:
        print(f"# cupy not timed: {why}")
    return ["cpu", "cupy"] if name == "cupy" else ["cpu"]


def stats_ms(times):
    ms = [1e3 * t for t in times]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms))


def per_layer_times(seq, x, repeat):
    """Median forward and backward ms of each child of a Sequential, in order: [(name, fwd, bwd)]."""
    fwd, bwd = {}, {}
    seq.forward(x)
    for _ in range(repeat):
        h = x
        for name, layer in seq.children:
            t0 = time.perf_counter()
            h = layer.forward(h)
            fwd.setdefault(name, []).append(time.perf_counter() - t0)
        d = np.ones_like(h)
        for name, layer in reversed(seq.children):
            t0 = time.perf_counter()
            d = layer.backward(d)
            bwd.setdefault(name, []).append(time.perf_counter() - t0)
    return [(name, 1e3 * statistics.median(fwd[name]), 1e3 * statistics.median(bwd[name])) for name, _ in seq.children]


def print_per_layer(rows, title):
    print(f"# {title} (median ms)")
    print(f"#   {'layer':<40} {'forward':>9} {'backward':>9}")
    for name, f, b in rows:
        print(f"#   {name:<40} {f:9.1f} {b:9.1f}")


def environment(threads):
    """What the numbers depend on: threads, the kernels' CPU target, BLAS (threadpoolctl), allocator settings, CPU."""
    info = dict(python=platform.python_version(), numpy=np.__version__, kernel_threads=threads,
                openmp=engine.openmp_enabled(), cpu_target=engine.cpu_target(), machine=platform.machine(),
                cpus=os.cpu_count())
    for var in ("FLATNET_CPU_TARGET", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        info[var] = os.environ.get(var, "(unset)")
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [dict(api=p.get("internal_api"), version=p.get("version"), kernel=p.get("architecture"),
                             threads=p.get("num_threads"), lib=os.path.basename(p.get("filepath", "")))
                        for p in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor()
    return info


def print_environment(info):
    print("# environment")
    for k, v in info.items():
        if k == "blas" and isinstance(v, list):
            for p in v:
                print(f"#   blas: {p['lib']} {p['api']} {p['version']} kernel={p['kernel']} threads={p['threads']}")
        else:
            print(f"#   {k}: {v}")


def peak_rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def positive_int(s):
    v = int_list(s)
    if len(v) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {s!r}")
    return v[0]
