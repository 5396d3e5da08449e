"""`bench model` and `bench threads`: a whole training step and inference in images/s, beside PyTorch with
--compare torch; the compiled paths on one thread against --threads."""
import copy
import statistics

import numpy as np

import engine

from .timing import (
    backends_to_time,
    environment,
    peak_rss_mib,
    per_layer_times,
    print_environment,
    print_per_layer,
    timeit,
)


def bench_model(args):
    """Training steps and inference of a whole paper model: the engine's layer and compiled paths and, with
    --compare torch, PyTorch (NCHW and channels-last). All cases take turns in --rounds rounds of --repeat
    timed runs, so that a noisy minute hits every case; each row is the median over all its rounds, and
    the ratios are given per round (their spread shows the noise)."""
    from engine.losses import SoftmaxCrossEntropy
    from engine.optim import sgd_momentum
    from engine.trainstep import CompiledStep
    from engine.models.paper import build
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
        if backend == "cupy":  # the GPU's compiled step and plan, from the same lowering (engine/runtime/cuda_step.py)
            from engine.runtime.cuda_step import GpuPlan, GpuStep
            gpu_step, gpu_velocity = GpuStep(net, shape, args.batch), {}

            def compiled_step(g=gpu_step, x=x, y=y, v=gpu_velocity):
                g.loss(x, y)
                g.apply(v, 0.01, 0.9, 1e-4)

            gpu_plan = GpuPlan(evalnet, shape)
            cases += [("train step", args.batch, "cupy compiled", compiled_step, args.repeat, ops.synchronize),
                      ("inference", args.batch, "cupy compiled", lambda x=x: gpu_plan(x), args.repeat, ops.synchronize),
                      ("inference", 1, "cupy compiled", lambda x=x: gpu_plan(x[:1]), max(args.repeat, 20),
                       ops.synchronize)]
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
        if "cupy compiled" in labels and "cupy" in labels:
            ratios = [rd[(what, b, "cupy")] / rd[(what, b, "cupy compiled")] for rd in rounds]
            print(f"# {what}, batch {b}: GPU layer by layer / GPU compiled = {statistics.median(ratios):.2f}x "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in ratios)})")
    if "cupy" in backends:
        from engine.runtime.cuda_step import device_peak
        i = next(i for i, case in enumerate(cases) if case[:3] == ("train step", args.batch, "cupy compiled"))
        flops = sum(f + b for f, b in gpu_step.flops(args.batch))
        rate, peak = flops / statistics.median(times[i]) / 1e9, device_peak()
        graphs = (f"{gpu_step.captures} graphs captured" if gpu_step.capture_failed is None
                  else f"graphs not captured ({gpu_step.capture_failed})")
        print(f"# GPU compiled train step: {rate:.0f} GFLOP/s = {100 * rate / peak:.1f}% of the device's measured "
              f"fp32 peak ({peak:.0f} GFLOP/s); {graphs}")
    print(f"# peak resident memory of this process: {peak_rss_mib():.0f} MiB")


def bench_threads(args):
    """The flattened CIFAR-10 model's compiled training step and compiled inference (batch --batch and
    1), each on 1 thread, on --threads and on the default count (which gives way to other processes,
    engine.runtime.threads.run_threads), in --rounds alternating rounds (medians over the rounds)."""
    from engine.plan import compile_network
    from engine.trainstep import CompiledStep
    from engine.models.paper import build
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
    from engine.models.paper import build
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
