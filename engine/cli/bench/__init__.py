"""Benchmarks: per-layer forward/backward times (the paper's Figure 7), memory (Figure 6), whole models.

    python -m engine.bench layers [--sizes 16,32,48,64,80] [--compare torch] [--json F] [--plot F.png]
    python -m engine.bench layers --memory --json F   # + memory records ("kind": "memory") for engine.figures
    python -m engine.bench model --model flattened --dataset cifar10 [--compare torch]
    python -m engine.bench latency           # inference of both CIFAR-10 models, engine vs onnxruntime
    python -m engine.bench threads           # the compiled paths on 1 thread and on --threads, alternating
    mpirun -np 2 --bind-to none python -m engine.bench distributed --threads 1   # MPI: Allreduce, N x T vs 1 x N*T
    python -m engine.bench winograd --data-dir ../shared/data   # Winograd's float32 error on the trained baseline

`layers` and `model` time every usable backend (the CPU, and CuPy where a GPU passes the
smoke test; --backend picks one). GPU times are taken after a device synchronization.

Every figure is a median over --repeat timed runs after warm-up (min and max beside it);
ratios are only meaningful between rows of the same run. The header states threads,
BLAS library and kernel, and allocator settings, because they change the numbers.
"""
import argparse

import engine
from engine.npzfile import check_writable_file

from ..common import Parser
from .distributed import bench_distributed
from .latency import bench_latency
from .layers import bench_layers
from .model import bench_model, bench_threads
from .timing import int_list, positive_int
from .winograd import bench_winograd


def main(argv=None):
    p = Parser(prog="python -m engine.bench", description=__doc__,
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
    win = sub.add_parser("winograd", help="the float32 rounding error of Winograd's F(m x m, 5 x 5) for each tile "
                                          "size m, on the trained baseline's 5x5 layers (forward and input "
                                          "gradient), against float64 direct convolution")
    win.add_argument("--model-file", default=None,
                     help="a baseline model file or pretrained name (default: the shipped baseline-cifar10)")
    win.add_argument("--data-dir", default=None,
                     help="folder holding cifar-10-batches-py/: whitened test images as inputs (default: standard "
                          "normal images)")
    win.add_argument("--tiles", type=int_list, default=[2, 3, 4], help="output tile sizes m")
    win.add_argument("--batch", type=positive_int, default=32, help="images")
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
    elif args.what == "winograd":
        bench_winograd(args)
    else:
        bench_latency(args)
    return 0
