"""The compiled kernels, in the build for the best CPU target this machine runs (run-time dispatch).

setup.py compiles the same kernel source (engine/_kernels.pyx) once per CPU target into
the extensions ``engine._kernels_<target>``:

    baseline   x86-64 with SSE2 (on other machines: the compiler's default, e.g. NEON on aarch64)
    avx2       x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
    avx512     x86-64-v4: the above and AVX-512 F, CD, BW, DQ, VL

At import, this module asks the baseline build what the CPU can do (``__builtin_cpu_supports``,
which also checks that the OS saves the AVX/AVX-512 registers; /proc/cpuinfo's flags where the
build cannot ask), picks the highest target that was built and that the CPU runs, and re-exports
that extension's names, so ``from ._kernels import gemm`` means the chosen build everywhere.
Everything that depends on the instruction set, the micro-kernel layout (``infer_layout()``: NR
and VL) included, is then read from the one extension in use.

``FLATNET_CPU_TARGET=baseline|avx2|avx512`` forces a target (tests, comparisons); a target that
is unknown, was not built, or needs features this CPU lacks is refused with a one-line error: the import
raises CpuTargetError, and where nothing catches it (a command such as ``python train.py`` or ``python -m
engine.bench``) the process ends with ``error: <reason>`` on stderr, not a traceback.
"""
import importlib
import importlib.machinery
import os
import sys

ENV = "FLATNET_CPU_TARGET"
TARGETS = ("baseline", "avx2", "avx512")  # lowest first
_V3 = ("avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe")
REQUIRES = {  # the CPU features each target's compiler flags allow it to use (setup.py's TARGETS)
    "baseline": (),
    "avx2": _V3,
    "avx512": _V3 + ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
}
_CPUINFO_NAMES = {"bmi": "bmi1", "lzcnt": "abm", "sse2": "sse2"}  # /proc/cpuinfo's spelling where it differs


class CpuTargetError(RuntimeError):
    """FLATNET_CPU_TARGET names a target that is unknown, not built, or that this CPU cannot run."""


def built_targets():
    """The targets whose extension lies beside this file, lowest first (only there: an editable install's
    finder could otherwise offer another checkout's build)."""
    here = [os.path.dirname(os.path.abspath(__file__))]
    return tuple(t for t in TARGETS
                 if importlib.machinery.PathFinder.find_spec(f"{__package__}._kernels_{t}", here) is not None)


def cpuinfo_features(path="/proc/cpuinfo"):
    """The features of REQUIRES that /proc/cpuinfo's first 'flags' line lists (empty set where unreadable)."""
    try:
        with open(path) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return frozenset()
    names = {n for needs in REQUIRES.values() for n in needs} | {"sse2"}
    return frozenset(n for n in names if _CPUINFO_NAMES.get(n, n) in flags)


def runnable(built, features):
    """The targets of `built` whose every required feature is in `features`, lowest first."""
    return tuple(t for t in built if all(f in features for f in REQUIRES[t]))


def select(requested, built, features):
    """The target to use: `requested` (FLATNET_CPU_TARGET's value, '' for the best) checked against the
    targets `built` and the CPU's `features`; raises CpuTargetError with a one-line reason."""
    ok = runnable(built, features)
    if not ok:
        raise CpuTargetError(f"flatnet: no compiled kernels found (built targets: {', '.join(built) or 'none'}); "
                             "reinstall flatnet")
    requested = (requested or "").strip()
    if not requested:
        return ok[-1]
    if requested not in TARGETS:
        raise CpuTargetError(f"{ENV}={requested!r} is not a CPU target: choose one of {', '.join(ok)}")
    if requested not in built:
        raise CpuTargetError(f"{ENV}={requested}: this installation has no '{requested}' build "
                             f"(built: {', '.join(built)}); choose one of {', '.join(ok)}")
    if requested not in ok:
        missing = [f for f in REQUIRES[requested] if f not in features]
        raise CpuTargetError(f"{ENV}={requested}: this CPU cannot run it (no {', '.join(missing)}); "
                             f"choose one of {', '.join(ok)}")
    return requested


def _load():
    built = built_targets()
    if "baseline" not in built:
        raise CpuTargetError("flatnet: the compiled kernels are missing (no engine._kernels_baseline); "
                             "build them with `pip install -e .` or `python setup.py build_ext --inplace`")
    baseline = importlib.import_module(f"{__package__}._kernels_baseline")
    features = baseline.cpu_features()
    if features is None:  # not x86, or a compiler without __builtin_cpu_supports
        features = cpuinfo_features()
    target = select(os.environ.get(ENV, ""), built, features)
    return target, importlib.import_module(f"{__package__}._kernels_{target}"), built, features


def _one_line_hook(previous):
    """An excepthook that ends the process with 'error: <reason>' for an uncaught CpuTargetError (the user's setting
    or installation is at fault, not the code: a traceback would only hide the reason) and leaves the rest to
    `previous`."""
    def hook(kind, value, tb):
        if isinstance(value, CpuTargetError):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)
    return hook


try:
    TARGET, module, BUILT, CPU_FEATURES = _load()
except CpuTargetError:
    sys.excepthook = _one_line_hook(sys.excepthook)
    raise
RUNNABLE = runnable(BUILT, CPU_FEATURES)

_exported = {k: v for k, v in vars(module).items() if not k.startswith("__")}
assert not _exported.keys() & globals().keys(), sorted(_exported.keys() & globals().keys())
globals().update(_exported)
del _exported


def cpu_target():
    """The CPU target whose compiled kernels run: 'baseline', 'avx2' or 'avx512' (FLATNET_CPU_TARGET forces one)."""
    return TARGET
