"""Benchmarks: per-layer forward/backward times (the paper's Figure 7), memory (Figure 6), whole models.

    python -m engine.bench layers [--sizes 16,32,48,64,80] [--compare torch] [--json F] [--plot F.png]
    python -m engine.bench layers --memory --json F   # + memory records ("kind": "memory") for engine.figures
    python -m engine.bench model --model flattened --dataset cifar10 [--compare torch]
    python -m engine.bench latency           # inference of both CIFAR-10 models, engine vs onnxruntime
    mpirun -np 2 --bind-to none python -m engine.bench distributed --threads 1   # MPI: Allreduce, N x T vs 1 x N*T

`layers` and `model` time every usable backend (the CPU, and CuPy where a GPU passes the
smoke test; --backend picks one). GPU times are taken after a device synchronization.

Every figure is a median over --repeat timed runs after warm-up (min and max beside it);
ratios are only meaningful between rows of the same run. The header states threads,
BLAS library and kernel, and allocator settings, because they change the numbers.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

import engine
from engine import Conv2d, Flattened, Lateral, Sequential
from engine.npzfile import check_writable_file

# ----------------------------------------------------------------------------- helpers


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
            sys.exit(f"error: {e}")
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
    """What the numbers depend on: threads, BLAS (threadpoolctl), allocator settings, CPU."""
    info = dict(python=platform.python_version(), numpy=np.__version__, kernel_threads=threads,
                openmp=engine.openmp_enabled(), machine=platform.machine(), cpus=os.cpu_count())
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE",
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


def layer_flops(layer, in_shape):
    """Forward multiply-adds x 2 of a Conv2d, Lateral, Vertical/Horizontal, or a composite of them."""
    if isinstance(layer, Sequential):
        total, shape = 0, in_shape
        for child in layer.layers:
            total += layer_flops(child, shape)
            shape = child.output_shape(shape)
        return total
    out = layer.output_shape(in_shape)
    n_out = int(np.prod(out))
    if isinstance(layer, Conv2d):
        return 2 * n_out * layer.c_in * layer.k * layer.k
    if isinstance(layer, Lateral):
        return 2 * n_out * layer.c_in
    if hasattr(layer, "k"):  # Vertical / Horizontal
        return 2 * n_out * layer.k
    return 0


def make_layers(channels, k, stages=2):
    return {"baseline": Conv2d(channels, channels, k, padding=k // 2),
            "flattened": Flattened(channels, channels, k, stages=stages)}


# ----------------------------------------------------------------------------- torch comparison

def torch_layers(torch, channels, k, stages=2):
    """The same two layers in torch.nn: Conv2d, and V/H as grouped (k,1)/(1,k) convolutions with full padding."""
    nn = torch.nn
    base = nn.Conv2d(channels, channels, k, padding=k // 2)
    mods = []
    for s in range(stages):
        pad = k - 1 if s < stages - 1 else 0  # full mode, then valid: the engine's Flattened for odd k, 2 stages
        mods += [nn.Conv2d(channels, channels, (k, 1), padding=(pad, 0), groups=channels),
                 nn.Conv2d(channels, channels, (1, k), padding=(0, pad), groups=channels),
                 nn.Conv2d(channels, channels, 1)]
    return {"baseline": base, "flattened": nn.Sequential(*mods)}


def bench_torch_layers(args, records):
    try:
        import torch
    except ImportError:
        print("# --compare torch: PyTorch is not installed; skipped")
        return
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    for fmt, mf in (("torch-nchw", torch.contiguous_format), ("torch-channels-last", torch.channels_last)):
        layers = {k: v.to(memory_format=mf) for k, v in torch_layers(torch, args.channels, args.k).items()}
        for size in args.sizes:
            x0 = torch.randn(args.batch, args.channels, size, size).to(memory_format=mf)
            for name, layer in layers.items():
                x = x0.clone().requires_grad_(True)
                with torch.no_grad():
                    fwd = timeit(lambda: layer(x0), args.repeat)
                y = layer(x)
                g = torch.ones_like(y)

                def backward():
                    layer.zero_grad(set_to_none=False)
                    x.grad = None
                    yy = layer(x)
                    yy.backward(g)

                # backward timed as (forward + backward) - forward, like the engine's split
                both = timeit(backward, args.repeat)
                bwd = [max(b - f, 1e-9) for b, f in zip(sorted(both), sorted(fwd))]
                flops = layer_flops(make_layers(args.channels, args.k)[name], (args.batch, args.channels, size, size))
                for pas, times, fl in (("forward", fwd, flops), ("backward", bwd, 2 * flops)):
                    records.append(dict(layer=name, size=size, batch=args.batch, pass_=pas, backend=fmt,
                                        **stats_ms(times), gflops=fl / statistics.median(times) / 1e9))
                    print_record(records[-1])


# ----------------------------------------------------------------------------- layers

def print_record(r):
    print(f"{r['layer']:<10} {r['size']:>4} {r['pass_']:<9} {r['backend']:<20} {r['median_ms']:>9.1f} "
          f"{r['min_ms']:>9.1f} {r['max_ms']:>9.1f} {r['gflops']:>8.1f}")


def bench_layers(args):
    backends = backends_to_time(args.backend)
    engine.set_num_threads(args.threads)
    info = environment(args.threads)
    print_environment(info)
    print(f"# {args.channels}->{args.channels} channels, {args.k}x{args.k}, batch {args.batch}, "
          f"median of {args.repeat} runs after warm-up")
    print(f"{'layer':<10} {'size':>4} {'pass':<9} {'backend':<20} {'median_ms':>9} {'min_ms':>9} {'max_ms':>9} "
          f"{'GFLOP/s':>8}")
    records = []
    rng = np.random.default_rng(0)
    layers = make_layers(args.channels, args.k)
    for backend in backends:
        ops = engine.runtime.ops_for(backend)
        for layer in layers.values():
            layer.to(backend)
        for size in args.sizes:
            x = ops.asarray(rng.standard_normal((args.batch, args.channels, size, size)).astype(np.float32))
            for name, layer in layers.items():
                y = layer.forward(x)
                dy = ops.xp.ones_like(y)
                fwd = timeit(lambda: layer.forward(x), args.repeat, sync=ops.synchronize)
                layer.forward(x)
                bwd = timeit(lambda: layer.backward(dy), args.repeat, sync=ops.synchronize)
                flops = layer_flops(layer, x.shape)
                for pas, times, fl in (("forward", fwd, flops), ("backward", bwd, 2 * flops)):
                    records.append(dict(layer=name, size=size, batch=args.batch, pass_=pas, backend=backend,
                                        **stats_ms(times), gflops=fl / statistics.median(times) / 1e9))
                    print_record(records[-1])
    for layer in layers.values():
        layer.to("cpu")
    if "cpu" in backends:
        bench_compiled_layers(args, layers, records)
    if "torch" in args.compare:
        bench_torch_layers(args, records)
    print_ratios(records)
    if args.per_layer:
        for size in args.sizes:
            x = rng.standard_normal((args.batch, args.channels, size, size)).astype(np.float32)
            print_per_layer(per_layer_times(layers["flattened"], x, args.repeat), f"flattened {size}x{size} sub-layers")
    memory = bench_memory(args) if args.memory else []
    out = [dict({k if k != "pass_" else "pass": v for k, v in r.items()}) for r in records]
    if args.json:  # memory records (with "kind": "memory") follow the timing records, which have no "kind"
        with open(args.json, "w") as f:
            json.dump(dict(environment=info, records=out + memory) if args.json_env else out + memory, f, indent=1)
        print(f"# wrote {args.json}")
    if args.plot:
        plot_layers(out, args.plot)
        print(f"# wrote {args.plot}")
    return out


def bench_compiled_layers(args, layers, records):
    """Each layer as the compiled training step runs it inside a network: the per-op medians of its ops
    (channels-last in and out: the layout changes at the network's ends are not counted), forward and
    backward (input and weight gradients: a 1-tap vertical filter before the layer makes it compute
    its input's gradient, which the step skips for a network's first layer)."""
    from engine import Flatten, Linear, Vertical
    from engine.trainstep import CompiledStep
    rng = np.random.default_rng(1)
    for size in args.sizes:
        x = rng.standard_normal((args.batch, args.channels, size, size)).astype(np.float32)
        y = np.zeros(args.batch, np.int64)
        for name, layer in layers.items():
            n_out = int(np.prod(layer.output_shape(x.shape)[1:]))
            net = Sequential(Vertical(args.channels, 1, "valid"), layer, Flatten(), Linear(n_out, 1))
            step = CompiledStep(net, x.shape[1:], args.batch)
            mine = [(f, b) for op, f, b in step.profile(x, y, args.repeat) if op.startswith("1")]
            flops = layer_flops(layer, x.shape)
            for pas, ms, fl in (("forward", sum(f for f, _ in mine), flops),
                                ("backward", sum(b for _, b in mine), 2 * flops)):
                records.append(dict(layer=name, size=size, batch=args.batch, pass_=pas, backend="cpu compiled",
                                    median_ms=ms, min_ms=ms, max_ms=ms, gflops=fl / ms / 1e6))
                print_record(records[-1])


def print_ratios(records):
    """Side-by-side ratios from this run: flattened vs baseline, and the engine vs torch's best."""
    def med(layer, size, pas, backend):
        for r in records:
            if (r["layer"], r["size"], r["pass_"], r["backend"]) == (layer, size, pas, backend):
                return r["median_ms"]
        return None

    print("# ratios (medians of this run)")
    for size, backend in sorted({(r["size"], r["backend"]) for r in records if r["backend"] in ("cpu", "cupy")}):
        f, b = med("flattened", size, "forward", backend), med("baseline", size, "forward", backend)
        fb = (med("flattened", size, "backward", backend) or 0) + (f or 0)
        label = "" if backend == "cpu" else f"{backend} "
        line = f"#   {size:>3}x{size:<3} {label}baseline/flattened forward {b / f:5.2f}x"
        tf = [med("flattened", size, "forward", t) for t in ("torch-nchw", "torch-channels-last")]
        tf = [t for t in tf if t]
        if tf and backend == "cpu":
            tfb = min(med("flattened", size, "forward", t) + med("flattened", size, "backward", t)
                      for t in ("torch-nchw", "torch-channels-last"))
            tb = min(t for t in (med("baseline", size, "forward", "torch-nchw"),
                                 med("baseline", size, "forward", "torch-channels-last")) if t)
            line += (f"; flattened fwd engine/torch-best {f / min(tf):4.2f}; fwd+bwd {fb / tfb:4.2f}; "
                     f"baseline fwd engine/torch-best {b / tb:4.2f}")
        print(line)


def plot_layers(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, pas in zip(axes, ("forward", "backward")):
        for backend in sorted({r["backend"] for r in records}):
            for layer, style in (("baseline", "--"), ("flattened", "-")):
                rows = sorted((r for r in records if r["pass"] == pas and r["backend"] == backend
                               and r["layer"] == layer), key=lambda r: r["size"])
                if rows:
                    ax.plot([r["size"] for r in rows], [r["median_ms"] for r in rows], style, marker="o",
                            label=f"{layer} ({backend})")
        ax.set_title(f"{pas} pass")
        ax.set_xlabel("image size (pixels per side)")
        ax.set_ylabel("median time (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- memory

def peak_extra_bytes(fn):
    """Peak bytes numpy allocates during fn() beyond what was allocated before (tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def bench_memory(args):
    """Figure 6: extra memory of each layer's forward and backward, measured and in theory.

    Measured on fresh layers (their reusable buffers are created during the call).
    Theory (float32): baseline forward = output + im2col columns (one chunk, kept for
    backward); backward = input gradient + column gradient. Flattened forward = the six
    intermediate outputs (kept for backward); backward = the six sub-layers' input gradients.

    Returns the figures as records for --json: kind "memory", layer, size, batch, channels, k,
    pass, measured_bytes and theory_bytes (the timing records have no "kind").
    """
    print("# memory (MiB): measured peak extra allocation during the call (tracemalloc) | theory")
    rng = np.random.default_rng(0)
    mib = 2.0 ** 20
    records = []
    for size in args.sizes:
        x = rng.standard_normal((args.batch, args.channels, size, size)).astype(np.float32)
        for name, layer in make_layers(args.channels, args.k).items():
            fwd = peak_extra_bytes(lambda: layer.forward(x))
            dy = np.ones_like(layer.forward(x))
            bwd = peak_extra_bytes(lambda: layer.backward(dy))
            if name == "baseline":
                p = dy.shape[2] * dy.shape[3]
                chunk = layer._chunk(args.batch, p)
                cols = chunk * layer.c_in * layer.k ** 2 * p * 4
                t_fwd, t_bwd = dy.nbytes + cols, x.nbytes + cols
            else:
                shapes, shape = [], x.shape
                for child in layer.layers:
                    shape = child.output_shape(shape)
                    shapes.append(shape)
                t_fwd = sum(4 * int(np.prod(s)) for s in shapes)
                t_bwd = sum(4 * int(np.prod(s)) for s in [x.shape] + shapes[:-1])
            print(f"#   {name:<10} {size:>3}x{size:<3} forward {fwd / mib:8.1f} | {t_fwd / mib:8.1f}   "
                  f"backward {bwd / mib:8.1f} | {t_bwd / mib:8.1f}")
            for pas, measured, theory in (("forward", fwd, t_fwd), ("backward", bwd, t_bwd)):
                records.append(dict(kind="memory", layer=name, size=size, batch=args.batch, channels=args.channels,
                                    k=args.k, measured_bytes=int(measured), theory_bytes=int(theory), **{"pass": pas}))
    return records


def peak_rss_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- whole model

def bench_model(args):
    """Training steps and inference of a whole paper model: the engine's layer and compiled paths and, with
    --compare torch, PyTorch (NCHW and channels-last). All cases take turns in --rounds rounds of --repeat
    timed runs, so that a noisy minute hits every case; each row is the median over all its rounds, and
    the ratios are given per round (their spread shows the noise)."""
    from engine.losses import SoftmaxCrossEntropy
    from engine.optim import sgd_momentum
    from engine.trainstep import CompiledStep
    from models.paper import build
    backends = backends_to_time(args.backend)
    engine.set_num_threads(args.threads)
    print_environment(environment(args.threads))
    shape = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "mnist": (1, 28, 28)}[args.dataset]
    n_classes = {"cifar10": 10, "cifar100": 100, "mnist": 10}[args.dataset]
    cases = []  # (what, batch, label, fn, runs per round, sync)
    compiled = None
    for backend in backends:
        ops = engine.runtime.ops_for(backend)
        net = build(args.model, shape, n_classes).to(backend)
        rng = np.random.default_rng(0)
        x = ops.asarray(rng.standard_normal((args.batch, *shape)).astype(np.float32))
        y = ops.asarray(rng.integers(0, n_classes, args.batch))
        loss_fn, velocity = SoftmaxCrossEntropy(), {}
        evalnet = build(args.model, shape, n_classes).to(backend).eval()

        def step(net=net, x=x, y=y, loss_fn=loss_fn, velocity=velocity):
            loss_fn(net.forward(x), y)
            net.backward(loss_fn.backward())
            sgd_momentum(net.params, net.grads, velocity, 0.01, 0.9, 1e-4)

        cases.append(("train step", args.batch, backend, step, args.repeat, ops.synchronize))
        if backend == "cpu":  # the compiled step train.py uses on the CPU (engine/trainstep.py)
            compiled = CompiledStep(net, shape, args.batch)
            cases.append(("train step", args.batch, "cpu compiled",
                          lambda c=compiled, x=x, y=y, v=velocity: c.step(x, y, 0.01, 0.9, 1e-4, None, v),
                          args.repeat, None))
        cases.append(("inference", args.batch, backend, lambda n=evalnet, x=x: n.forward(x), args.repeat,
                      ops.synchronize))
        cases.append(("inference", 1, backend, lambda n=evalnet, x=x: n.forward(x[:1]), max(args.repeat, 20),
                      ops.synchronize))
        if backend == "cpu":  # the compiled path engine.load(...).predict uses (engine/plan.py)
            from engine.plan import compile_network
            plan = compile_network(evalnet)
            cases.append(("inference", args.batch, "cpu compiled", lambda x=x: plan(x), args.repeat, None))
            cases.append(("inference", 1, "cpu compiled", lambda x=x: plan(x[:1]), max(args.repeat, 20), None))
        if args.per_layer and backend == "cpu":
            print_per_layer(per_layer_times(net, x, args.repeat), f"{args.model} layers (training mode)")
            print_step_profile(compiled, x, y, args)
    if "torch" in args.compare:
        cases += torch_model_cases(args, shape, n_classes)
    times = {i: [] for i in range(len(cases))}
    rounds = []
    for r in range(args.rounds):
        this = {}
        for i, (what, b, label, fn, runs, sync) in enumerate(cases):
            t = timeit(fn, runs, warmup=2 if r == 0 else 1, sync=sync)
            times[i] += t
            this[(what, b, label)] = statistics.median(t)
        rounds.append(this)
    print(f"# {args.model} on {args.dataset} inputs {shape}: medians over {args.rounds} rounds of {args.repeat} runs")
    print(f"{'what':<12} {'batch':>5} {'backend':<20} {'median_ms':>9} {'images/s':>10}")
    for i, (what, b, label, *_) in enumerate(cases):
        t = statistics.median(times[i])
        print(f"{what:<12} {b:>5} {label:<20} {1e3 * t:>9.2f} {b / t:>10.0f}")
    for what, b in (("train step", args.batch), ("inference", args.batch), ("inference", 1)):
        labels = [lab for (w, bb, lab) in rounds[0] if (w, bb) == (what, b)]
        theirs = [lab for lab in labels if lab.startswith("torch")]
        if "cpu compiled" in labels and theirs:
            ratios = [min(rd[(what, b, t)] for t in theirs) / rd[(what, b, "cpu compiled")] for rd in rounds]
            print(f"# {what}, batch {b}: torch's best / engine compiled = {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in ratios)})")
    print(f"# peak resident memory of this process: {peak_rss_mib():.0f} MiB")


def bench_threads(args):
    """The flattened CIFAR-10 model's compiled training step and compiled inference (batch --batch and
    1), each on 1 thread, on --threads and on the default count (which gives way to other processes,
    engine.runtime.threads.run_threads), in --rounds alternating rounds (medians over the rounds)."""
    from engine.plan import compile_network
    from engine.trainstep import CompiledStep
    from models.paper import build
    print_environment(environment(args.threads))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    step, velocity = CompiledStep(build("flattened"), batch_size=args.batch), {}
    plan = compile_network(build("flattened").eval())
    cases = [("compiled train step", step, lambda: step.step(x, y, 0.01, 0.9, 1e-4, None, velocity), args.repeat),
             (f"inference batch {args.batch}", plan, lambda: plan(x), args.repeat),
             ("inference batch 1", plan, lambda: plan(x[:1]), max(args.repeat, 20))]
    counts = (1, args.threads, None)  # None: the default, as a user who sets nothing gets it
    res, used = {}, {}
    for _ in range(args.rounds):
        for threads in counts:
            engine.set_num_threads(threads)
            for name, runner, fn, runs in cases:
                res.setdefault((name, threads), []).append(statistics.median(timeit(fn, runs)))
                used.setdefault((name, threads), []).append(runner.last_threads)
    engine.set_num_threads(args.threads)
    if engine.runtime.threads.threads_chosen():
        print("# OMP_NUM_THREADS is set: the default column is that count, not the adaptive default")
    print(f"{'what':<22} {'1 thread ms':>12} {f'{args.threads} threads ms':>14} {'default ms':>11} "
          f"{f'{args.threads}/1':>6} {'default/1':>10}  (default/1 per round; threads the default used)")
    for name, *_ in cases:
        one, many, auto = (statistics.median(res[(name, t)]) for t in counts)
        rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(res[(name, 1)], res[(name, None)]))
        print(f"{name:<22} {1e3 * one:>12.2f} {1e3 * many:>14.2f} {1e3 * auto:>11.2f} {many / one:>6.2f} "
              f"{auto / one:>10.2f}  ({rounds}; {sorted(set(used[(name, None)]))})")


def print_step_profile(step, x, y, args):
    """The compiled training step's per-op medians with the GFLOP/s each achieves, against the
    float32 peak measured here on the same threads (engine._kernels.fma_peak)."""
    peak = engine._kernels.fma_peak(args.threads)
    prof, flops = step.profile(x, y, args.repeat), step.flops(len(x))
    print(f"# compiled training step, per op (median ms of {args.repeat}; GFLOP/s of the GEMM and 1D ops; "
          f"measured peak {peak:.1f} GFLOP/s on {args.threads} thread(s))")
    print(f"#   {'op':<44} {'fwd_ms':>8} {'GFLOP/s':>8} {'bwd_ms':>8} {'GFLOP/s':>8}")
    tf = tb = ff = fb = 0.0
    for (name, f_ms, b_ms), (f_fl, b_fl) in zip(prof, flops):
        rate = [f"{fl / ms / 1e6:8.1f}" if fl else f"{'':>8}" for fl, ms in ((f_fl, f_ms), (b_fl, b_ms))]
        print(f"#   {name:<44} {f_ms:8.1f} {rate[0]} {b_ms:8.1f} {rate[1]}")
        tf, tb, ff, fb = tf + f_ms, tb + b_ms, ff + f_fl, fb + b_fl
    total = (ff + fb) / (tf + tb) / 1e6
    print(f"#   {'total':<44} {tf:8.1f} {ff / tf / 1e6:8.1f} {tb:8.1f} {fb / tb / 1e6:8.1f}   "
          f"(forward + backward {total:.1f} GFLOP/s = {100 * total / peak:.0f}% of the peak)")


def torch_model_cases(args, shape, n_classes):
    """The same model in torch.nn (NCHW and channels-last): timing cases for bench_model."""
    try:
        import torch
    except ImportError:
        print("# --compare torch: PyTorch is not installed; skipped")
        return []
    torch.set_num_threads(args.threads)
    nn = torch.nn
    from models.paper import build
    ref = build(args.model, shape, n_classes)
    mods = []
    for name, layer in ref.children:
        kind = type(layer).__name__
        if kind == "Conv2d":
            mods.append(nn.Conv2d(layer.c_in, layer.c_out, layer.k, padding=layer.padding))
        elif kind == "Flattened":
            for sub, child in layer.children:
                if sub.endswith("lateral"):
                    mods.append(nn.Conv2d(child.c_in, child.c_out, 1))
                else:
                    c, k, pad = child.channels, child.k, child.before
                    ks, pd = ((k, 1), (pad, 0)) if sub.endswith("vertical") else ((1, k), (0, pad))
                    mods.append(nn.Conv2d(c, c, ks, padding=pd, groups=c))
        elif kind == "MaxPool2d":
            mods.append(nn.MaxPool2d(layer.k, layer.stride, ceil_mode=layer.ceil_mode))
        elif kind == "ReLU":
            mods.append(nn.ReLU())
        elif kind == "Dropout":
            mods.append(nn.Dropout(layer.p))
        elif kind == "Flatten":
            mods.append(nn.Flatten())
        elif kind == "Linear":
            mods.append(nn.Linear(layer.n_in, layer.n_out))
    cases = []
    for fmt, mf in (("torch-nchw", torch.contiguous_format), ("torch-channels-last", torch.channels_last)):
        net = nn.Sequential(*mods).to(memory_format=mf)
        evalnet = copy.deepcopy(net).eval()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        x = torch.randn(args.batch, *shape).to(memory_format=mf)
        y = torch.randint(0, n_classes, (args.batch,))

        def step(net=net, opt=opt, x=x, y=y):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        def infer(n, net=evalnet, x=x):
            with torch.no_grad():
                net(x[:n])

        net.train()
        cases += [("train step", args.batch, fmt, step, args.repeat, None),
                  ("inference", args.batch, fmt, lambda f=infer: f(args.batch), args.repeat, None),
                  ("inference", 1, fmt, lambda f=infer: f(1), max(args.repeat, 20), None)]
    return cases


# ----------------------------------------------------------------------------- inference latency

def bench_latency(args):
    """Single-image and batch inference of both CIFAR-10 models via engine.load, beside onnxruntime.

    engine: Model.predict on the compiled path; engine-layers: the same model run layer by
    layer (load(..., compiled=False)). The runtimes take turns in blocks (5 rounds), so a
    noisy minute affects all of them; each row is the median over all its rounds.
    """
    import tempfile

    from engine import load, save_model
    from models.paper import build
    engine.set_num_threads(args.threads)
    print_environment(environment(args.threads))
    rng = np.random.default_rng(0)
    rows, profiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "flattened"):
            path = save_model(f"{tmp}/{name}.npz", build(name, (3, 32, 32), 10), (3, 32, 32),
                              [str(i) for i in range(10)], {})
            model, layered = load(path), load(path, compiled=False)
            runners = [("engine", lambda x: model.predict(x, preprocessed=True)),
                       ("engine-layers", lambda x: layered.predict(x, preprocessed=True))]
            try:
                import onnxruntime as ort

                from engine.onnx_export import to_onnx
                import onnx
                onnx.save(to_onnx(model), f"{tmp}/{name}.onnx")
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = args.threads
                sess = ort.InferenceSession(f"{tmp}/{name}.onnx", opts, providers=["CPUExecutionProvider"])
                runners.append(("onnxruntime", lambda x: sess.run(None, {"input": x})[0]))
            except ImportError:
                print("# onnx/onnxruntime not installed: engine only")
            for batch in (1, args.batch):
                x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
                n = max(args.repeat, 20) if batch == 1 else args.repeat
                times = {runtime: [] for runtime, _ in runners}
                for _ in range(5):
                    for runtime, run in runners:
                        time.sleep(0.1)  # let the previous runtime's spinning threads go idle
                        times[runtime] += timeit(lambda: run(x), n, warmup=3 if batch == 1 else 1)
                rows += [(name, batch, runtime, statistics.median(t)) for runtime, t in times.items()]
            if args.per_layer:
                profiles.append((name, model.plan.profile(rng.standard_normal((1, 3, 32, 32)), max(args.repeat, 50))))
    print(f"{'model':<10} {'batch':>5} {'runtime':<14} {'median_ms':>9} {'images/s':>10}")
    for name, batch, runtime, m in rows:
        print(f"{name:<10} {batch:>5} {runtime:<14} {1e3 * m:>9.3f} {batch / m:>10.0f}")
    for name, prof in profiles:
        print(f"# {name}: compiled ops, batch 1 (median ms)")
        for op, ms in prof:
            print(f"#   {op:<44} {ms:8.4f}")


# ----------------------------------------------------------------------------- CLI

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


def bench_distributed(args):
    """Under `mpirun -np N`: the time of one Allreduce of the model's gradient buffer, then training images/s
    of N ranks x T threads (data-parallel, engine/distributed.py) and of rank 0 alone on N*T threads while
    the others sleep, in the same run. Global batch --batch, split over the ranks."""
    from engine.distributed import DistributedError, init
    try:
        dist = init()
    except DistributedError as e:
        sys.exit(f"error: {e}")
    return dist.guard(_bench_distributed, args, dist)


def _bench_distributed(args, dist):
    from engine.trainstep import make_step
    from models.paper import build
    n, threads, batch = dist.size, args.threads, args.batch
    if batch % n:
        sys.exit(f"error: --batch {batch} is not a multiple of the {n} ranks")
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
    together = timeit(distributed_step, args.repeat, warmup=2)
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
    print(f"{'what':<32} {'median_ms':>9} {'images/s':>10}")
    for what, times in ((f"{n} rank(s) x {threads} thread(s)", together),
                        (f"1 rank x {n * threads} thread(s)", alone)):
        print(f"{what:<32} {1e3 * statistics.median(times):>9.2f} {batch / statistics.median(times):>10.0f}")
    print(f"# {n} x {threads} against 1 x {n * threads}: {statistics.median(alone) / statistics.median(together):.2f}x")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m engine.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=positive_int, default=engine.get_num_threads(),
                        help="threads for the kernels (and torch.set_num_threads with --compare torch)")
    common.add_argument("--repeat", type=positive_int, default=5, help="timed runs per measurement (after warm-up)")
    common.add_argument("--rounds", type=positive_int, default=3,
                        help="model: rounds in which every case takes its turn (rows are medians over all)")
    common.add_argument("--batch", type=positive_int, default=128, help="batch size")
    common.add_argument("--per-layer", action="store_true",
                        help="also print each layer's (or the flattened layer's sub-layers') forward/backward time")
    common.add_argument("--compare", choices=["none", "torch"], default="none",
                        help="also time the same layers/network in PyTorch, in the same run")
    backends = argparse.ArgumentParser(add_help=False)
    backends.add_argument("--backend", choices=["all", "cpu", "cupy"], default="all",
                          help="engine backend(s) to time: all usable ones (the CPU, and CuPy when a GPU passes the "
                               "smoke test), or only one")
    lay = sub.add_parser("layers", parents=[common, backends], help="one baseline vs one flattened layer (Figure 7)")
    lay.add_argument("--sizes", type=int_list, default=[16, 32, 48, 64, 80], help="image sizes, e.g. 80 or 16,48")
    lay.add_argument("--channels", type=positive_int, default=128, help="input and output channels")
    lay.add_argument("--k", type=positive_int, default=5, help="filter size")
    lay.add_argument("--memory", action="store_true",
                     help="also measure per-layer extra memory (Figure 6); with --json, its records are added there "
                          "with \"kind\": \"memory\"")
    lay.add_argument("--json", default=None, help="write the records to this JSON file")
    lay.add_argument("--json-env", action="store_true", help="wrap the JSON records with the environment")
    lay.add_argument("--plot", default=None, help="draw the figure to this PNG")
    mod = sub.add_parser("model", parents=[common, backends], help="a whole training step and inference, in images/s")
    mod.add_argument("--model", choices=["baseline", "flattened"], default="flattened")
    mod.add_argument("--dataset", choices=["cifar10", "cifar100", "mnist"], default="cifar10")
    sub.add_parser("latency", parents=[common], help="inference latency of both CIFAR-10 models (engine, onnxruntime)")
    sub.add_parser("threads", parents=[common],
                   help="the compiled paths (training step, inference at batch --batch and 1) on one thread and on "
                        "--threads, in alternating rounds: run it beside a competing load to see how they degrade")
    dis = sub.add_parser("distributed", parents=[common],
                         help="under mpirun -np N: one Allreduce of the gradients, and training images/s of N ranks "
                              "x --threads against 1 rank x N*threads")
    dis.add_argument("--model", choices=["baseline", "flattened"], default="flattened")
    dis.add_argument("--dataset", choices=["cifar10", "cifar100", "mnist"], default="cifar10")
    args = p.parse_args(argv)
    for flag in ("json", "plot"):  # checked before the benchmark runs, whose results would be lost
        path = getattr(args, flag, None)
        try:
            if path:
                check_writable_file(path)
            if flag == "plot" and path:
                import matplotlib  # noqa: F401
        except (OSError, ImportError) as e:
            p.error(f"--{flag} {path}: {e}")
    if args.what == "layers":
        bench_layers(args)
    elif args.what == "model":
        bench_model(args)
    elif args.what == "distributed":
        return bench_distributed(args)
    elif args.what == "threads":
        bench_threads(args)
    else:
        bench_latency(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
