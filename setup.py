"""Build script: compiles engine/_kernels.pyx with OpenMP when the compiler has it.

The OpenMP flag is chosen per compiler and test-compiled first (the approach of
scikit-learn's old ``_build_utils/openmp_helpers.py``). When the test fails
(Apple clang, a compiler built without libgomp) or ``FLATNET_DISABLE_OPENMP=1``
is set, the extension is built serially and a warning says so; the kernels
then run on one thread and ``engine.openmp_enabled()`` returns False.
"""
import glob
import os
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


class BuildExt(build_ext):
    """build_ext that adds OpenMP flags when they work, else builds serially with a warning."""

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
        for ext in self.extensions:
            if use_openmp:
                ext.extra_compile_args += cflags
                ext.extra_link_args += ldflags
            if self.compiler.compiler_type != "msvc":
                ext.extra_compile_args += ["-O3"]
                native = ["-march=native"]
                if os.environ.get("FLATNET_PORTABLE", "0") in ("", "0") and builds_and_runs(
                    self.compiler, 'int main(void){return 0;}', native, [], expect=""
                ):
                    # Vectorize for this machine's SIMD width (AVX2/AVX-512); set
                    # FLATNET_PORTABLE=1 to build a binary that runs on any x86-64.
                    ext.extra_compile_args += native
        print(f"flatnet: building kernels with OpenMP {'ON' if use_openmp else 'OFF'}")
        super().build_extensions()


extensions = [
    Extension(
        "engine._kernels",
        ["engine/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "engine"],
        depends=["engine/_ops.h", "engine/_infer.h", "engine/_train.h", "engine/dropout_hash.h",
                 *glob.glob("engine/kernels/*.pxi")],
        libraries=[] if sys.platform == "win32" else ["m"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
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
