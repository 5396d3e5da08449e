"""`bench layers`: one baseline against one flattened layer, forward and backward, per image size (Figure 7),
and with --memory their extra memory (Figure 6)."""
import json
import statistics
import tracemalloc

import numpy as np

import engine
from engine import Conv2d, Flattened, Lateral, Sequential

from .timing import backends_to_time, environment, per_layer_times, print_environment, print_per_layer, stats_ms, timeit


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
    import os

    from engine import Flatten, Linear, Vertical
    from engine.lowering import CONV_ENV, conv_tile
    from engine.trainstep import CompiledStep
    rng = np.random.default_rng(1)
    chosen = os.environ.get(CONV_ENV)
    for size in args.sizes:
        x = rng.standard_normal((args.batch, args.channels, size, size)).astype(np.float32)
        y = np.zeros(args.batch, np.int64)
        for name, layer in layers.items():
            # the baseline layer as the lowering chooses it (Winograd where it applies), and by direct convolution
            variants = [("cpu compiled", chosen)]
            if isinstance(layer, Conv2d) and conv_tile(layer, x.shape[1:]):
                variants.append(("cpu compiled direct", "direct"))
            for label, conv in variants:
                if conv:
                    os.environ[CONV_ENV] = conv
                try:
                    n_out = int(np.prod(layer.output_shape(x.shape)[1:]))
                    net = Sequential(Vertical(args.channels, 1, "valid"), layer, Flatten(), Linear(n_out, 1))
                    step = CompiledStep(net, x.shape[1:], args.batch)
                finally:
                    os.environ.pop(CONV_ENV, None)
                    if chosen is not None:
                        os.environ[CONV_ENV] = chosen
                mine = [(f, b) for op, f, b in step.profile(x, y, args.repeat) if op.startswith("1")]
                flops = layer_flops(layer, x.shape)  # direct convolution's count: Winograd's rate is "effective"
                for pas, ms, fl in (("forward", sum(f for f, _ in mine), flops),
                                    ("backward", sum(b for _, b in mine), 2 * flops)):
                    records.append(dict(layer=name, size=size, batch=args.batch, pass_=pas, backend=label,
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
    for size in sorted({r["size"] for r in records if r["backend"] == "cpu compiled"}):
        line = f"#   {size:>3}x{size:<3} baseline compiled"
        for pas in ("forward", "backward"):
            mine, direct = med("baseline", size, pas, "cpu compiled"), med("baseline", size, pas, "cpu compiled direct")
            torch = [t for t in (med("baseline", size, pas, "torch-nchw"), med("baseline", size, pas,
                                                                               "torch-channels-last")) if t]
            if direct:
                line += f"; {pas} direct/chosen {direct / mine:4.2f}x"
            if torch:
                line += f"; {pas} torch-best/engine {min(torch) / mine:4.2f}x"
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
                chunk = layer.column_chunk(args.batch, p)
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
