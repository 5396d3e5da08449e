"""`bench latency`: inference latency of both CIFAR-10 models, the engine against onnxruntime."""
import statistics
import time

import numpy as np

import engine

from .timing import environment, print_environment, timeit


def bench_latency(args):
    """Single-image and batch inference of both CIFAR-10 models via engine.load, beside onnxruntime.

    engine: Model.predict on the compiled path; engine-layers: the same model run layer by
    layer (load(..., compiled=False)). The runtimes take turns in blocks (5 rounds), so a
    noisy minute affects all of them; each row is the median over all its rounds.
    """
    import tempfile

    from engine import load, save_model
    from engine.models.paper import build
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
                import onnx
                import onnxruntime as ort

                from engine.onnx_export import to_onnx
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
