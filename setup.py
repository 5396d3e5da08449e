"""Build script: compiles the kernels once per CPU target, with OpenMP when the compiler has it.

CPU targets (run-time dispatch, as numpy and PyTorch ship one wheel for every CPU): the same
kernel source, engine/_kernels.pyx, is compiled into one extension per target,
engine._kernels_<target>, from a generated .pyx (build/flatnet-targets/) that only includes it:

    baseline   x86-64 (SSE2), or the compiler's default on other machines (aarch64: NEON)
    avx2       x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE          (x86 only)
    avx512     x86-64-v4: the above and AVX-512 F, CD, BW, DQ, VL       (x86 only)

engine/_kernels.py picks the highest target this CPU runs at import (FLATNET_CPU_TARGET forces a
lower one). No build uses -march=native, so a wheel built here runs on any x86-64 CPU. A target
the compiler cannot build is left out with a warning; FLATNET_BUILD_TARGETS=baseline,avx2 (a
comma-separated list) builds only those, e.g. for a quicker development build.

The OpenMP flag is chosen per compiler and test-compiled first (the approach of
scikit-learn's old ``_build_utils/openmp_helpers.py``). When the test fails
(Apple clang, a compiler built without libgomp) or ``FLATNET_DISABLE_OPENMP=1``
is set, the extensions are built serially and a warning says so; the kernels
then run on one thread and ``engine.openmp_enabled()`` returns False.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d", n > 0);
        return 0;
    }
    """
)


def openmp_flags(compiler):
    """Compile and link flags for OpenMP on this compiler, from its type and name."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    cc = " ".join(compiler.compiler) if hasattr(compiler, "compiler") else ""
    if sys.platform == "darwin" and "gcc" not in os.path.basename(cc.split()[0] if cc else ""):
        # Apple clang needs libomp from elsewhere (e.g. Homebrew); the test below decides.
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    if "icc" in cc or "icx" in cc:
        return ["-qopenmp"], ["-qopenmp"]
    return ["-fopenmp"], ["-fopenmp"]


def builds_and_runs(compiler, source, cflags, ldflags, expect="1"):
    """Test-compile, link and run a tiny C program; True when it prints `expect`."""
    tmp = tempfile.mkdtemp(prefix="flatnet-omp-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("omp_test.c", "w") as f:
            f.write(source)
        objs = compiler.compile(["omp_test.c"], extra_postargs=cflags)
        exe = "omp_test" + (".exe" if sys.platform == "win32" else "")
        compiler.link_executable(objs, "omp_test", extra_postargs=ldflags)
        out = subprocess.run([os.path.join(tmp, exe)], capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and out.stdout.strip() == expect
    except Exception:
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


HERE = os.path.dirname(os.path.abspath(__file__))

# Targets, lowest first, with the flags that build them: the -march level when the compiler knows
# it (gcc >= 11, clang >= 12), else the same features one by one. engine/_kernels.py checks the CPU
# for exactly these features (REQUIRES there) before it imports a target.
X86_V3 = ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe"]
X86_V4 = X86_V3 + ["-mavx512f", "-mavx512cd", "-mavx512bw", "-mavx512dq", "-mavx512vl"]
TARGETS = {
    "baseline": [["-march=x86-64", "-mtune=generic"], []],
    "avx2": [["-march=x86-64-v3", "-mtune=generic"], ["-march=x86-64", "-mtune=generic"] + X86_V3],
    "avx512": [["-march=x86-64-v4", "-mtune=generic"], ["-march=x86-64", "-mtune=generic"] + X86_V4],
}


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def compiles(compiler, cflags):
    """True when `compiler` compiles a trivial C file with `cflags` (nothing is run)."""
    tmp = tempfile.mkdtemp(prefix="flatnet-flags-")
    try:
        src = os.path.join(tmp, "flags_test.c")
        with open(src, "w") as f:
            f.write("int flatnet_flags_test(int x) { return x + 1; }\n")
        compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wanted_targets():
    """The targets to build on this machine: FLATNET_BUILD_TARGETS, else all of them (x86), else baseline."""
    names = list(TARGETS) if is_x86() else ["baseline"]
    asked = [t.strip() for t in os.environ.get("FLATNET_BUILD_TARGETS", "").split(",") if t.strip()]
    if asked:
        unknown = sorted(set(asked) - set(names))
        if unknown:
            sys.exit(f"flatnet: FLATNET_BUILD_TARGETS names {', '.join(unknown)}: "
                     f"this machine builds {', '.join(names)}")
        if "baseline" not in asked:
            sys.exit("flatnet: FLATNET_BUILD_TARGETS must include baseline (it runs everywhere and "
                     "tells the dispatcher what the CPU can do)")
        names = [t for t in names if t in asked]
    return names


def target_stub(target):
    """A generated .pyx for `target` that includes the shared source; rewritten only when it changes."""
    folder = os.path.join(HERE, "build", "flatnet-targets")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"_kernels_{target}.pyx")
    text = (f"# Generated by setup.py: the kernels built for the CPU target '{target}'.\n"
            'include "_kernels.pyx"\n')
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return os.path.relpath(path, HERE)


class BuildExt(build_ext):
    """build_ext that adds each target's flags and OpenMP's when they work (else serial, with a warning)."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # one compiler per core: the targets build side by side
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        cflags, ldflags = openmp_flags(self.compiler)
        use_openmp = os.environ.get("FLATNET_DISABLE_OPENMP", "0") in ("", "0")
        if use_openmp and not builds_and_runs(self.compiler, OPENMP_TEST, cflags, ldflags):
            use_openmp = False
            warnings.warn(
                "\n*** flatnet: this compiler has no working OpenMP "
                f"(tried {' '.join(cflags)}). Building the kernels SERIALLY: they will run "
                "on one thread. Install an OpenMP runtime (e.g. `brew install libomp`, or "
                "use gcc) and rebuild for parallel kernels. ***\n"
            )
        elif not use_openmp:
            warnings.warn("\n*** flatnet: FLATNET_DISABLE_OPENMP is set: building the kernels serially. ***\n")
        # A stale single-target build (engine/_kernels.*.so, before the targets) would shadow the
        # dispatcher engine/_kernels.py, in the checkout or in the build folder a wheel is made from: remove it.
        for folder in (os.path.join(HERE, "engine"), os.path.join(os.path.abspath(self.build_lib), "engine")):
            for pattern in ("_kernels.*.so", "_kernels.*.pyd", "_kernels.c"):
                for stale in glob.glob(os.path.join(folder, pattern)):
                    os.remove(stale)
        built = []
        for ext in list(self.extensions):
            target = ext.name.rpartition("_kernels_")[2]
            if use_openmp:
                ext.extra_compile_args += cflags
                ext.extra_link_args += ldflags
            if self.compiler.compiler_type == "msvc":
                if target != "baseline":  # the kernels' vector types are GCC/Clang extensions
                    self.extensions.remove(ext)
                    continue
            else:
                ext.extra_compile_args += ["-O3"]
                if is_x86():
                    flags = next((f for f in TARGETS[target] if compiles(self.compiler, f)), None)
                    if flags is None:
                        warnings.warn(f"\n*** flatnet: this compiler cannot build the '{target}' target "
                                      f"(tried {' / '.join(' '.join(f) for f in TARGETS[target])}); "
                                      "left out. ***\n")
                        self.extensions.remove(ext)
                        continue
                    ext.extra_compile_args += flags
            built.append(target)
        print(f"flatnet: building kernels with OpenMP {'ON' if use_openmp else 'OFF'}, "
              f"CPU targets: {', '.join(built)}")
        super().build_extensions()


extensions = [
    Extension(
        f"engine._kernels_{target}",
        [target_stub(target)],
        include_dirs=[numpy.get_include(), "engine"],
        depends=["engine/_ops.h", "engine/_infer.h", "engine/_train.h", "engine/dropout_hash.h",
                 "engine/_kernels.pyx", *glob.glob("engine/kernels/*.pxi")],
        libraries=[] if sys.platform == "win32" else ["m"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("FLATNET_TARGET", f'"{target}"')],
    )
    for target in wanted_targets()
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["engine"],
        nthreads=os.cpu_count() or 1,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
    ),
    cmdclass={"build_ext": BuildExt},
)
