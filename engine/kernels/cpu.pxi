# Which CPU target this extension was compiled for, and what the CPU it runs on can do: the
# dispatcher (engine/_kernels.py) asks the baseline build, which runs on every CPU.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

cdef extern from *:
    """
    #ifndef FLATNET_TARGET
    #define FLATNET_TARGET "unknown"
    #endif
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #define FLATNET_CPU_PROBE 1
    /* The CPU's features as the compiler's runtime sees them (CPUID, and XGETBV for the register
       state the OS saves, so AVX/AVX-512 count only where the OS enables them). The names are
       __builtin_cpu_supports's, which needs literal strings: hence one case per feature. */
    static int flatnet_cpu_has(int i) {
        __builtin_cpu_init();
        switch (i) {
        case 0: return __builtin_cpu_supports("sse2") != 0;
        case 1: return __builtin_cpu_supports("avx") != 0;
        case 2: return __builtin_cpu_supports("avx2") != 0;
        case 3: return __builtin_cpu_supports("fma") != 0;
        case 4: return __builtin_cpu_supports("f16c") != 0;
        case 5: return __builtin_cpu_supports("bmi") != 0;
        case 6: return __builtin_cpu_supports("bmi2") != 0;
        case 7: return __builtin_cpu_supports("lzcnt") != 0;
        case 8: return __builtin_cpu_supports("movbe") != 0;
        case 9: return __builtin_cpu_supports("avx512f") != 0;
        case 10: return __builtin_cpu_supports("avx512cd") != 0;
        case 11: return __builtin_cpu_supports("avx512bw") != 0;
        case 12: return __builtin_cpu_supports("avx512dq") != 0;
        case 13: return __builtin_cpu_supports("avx512vl") != 0;
        }
        return 0;
    }
    #else
    #define FLATNET_CPU_PROBE 0
    static int flatnet_cpu_has(int i) { (void)i; return 0; }
    #endif
    /* What the compiler was allowed to use for this extension (its -march / -m flags). */
    #ifdef __AVX__
    #define FLATNET_HAS_AVX 1
    #else
    #define FLATNET_HAS_AVX 0
    #endif
    #ifdef __AVX2__
    #define FLATNET_HAS_AVX2 1
    #else
    #define FLATNET_HAS_AVX2 0
    #endif
    #ifdef __FMA__
    #define FLATNET_HAS_FMA 1
    #else
    #define FLATNET_HAS_FMA 0
    #endif
    #ifdef __AVX512F__
    #define FLATNET_HAS_AVX512F 1
    #else
    #define FLATNET_HAS_AVX512F 0
    #endif
    """
    const char *FLATNET_TARGET
    int FLATNET_CPU_PROBE
    int flatnet_cpu_has(int i) nogil
    int FLATNET_HAS_AVX, FLATNET_HAS_AVX2, FLATNET_HAS_FMA, FLATNET_HAS_AVX512F

CPU_FEATURE_NAMES = ("sse2", "avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe",
                     "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def compiled_target():
    """The CPU target this extension was compiled for (setup.py's name: baseline, avx2, avx512)."""
    return FLATNET_TARGET.decode()


def compiled_features():
    """The instruction-set extensions the compiler was allowed to use here (from its predefined macros)."""
    found = {"avx": FLATNET_HAS_AVX, "avx2": FLATNET_HAS_AVX2, "fma": FLATNET_HAS_FMA, "avx512f": FLATNET_HAS_AVX512F}
    return frozenset(name for name, on in found.items() if on)


def cpu_features():
    """The x86 features of the CPU that runs this (names of CPU_FEATURE_NAMES), or None where this
    build cannot ask (not x86, or a compiler without __builtin_cpu_supports)."""
    if not FLATNET_CPU_PROBE:
        return None
    return frozenset(name for i, name in enumerate(CPU_FEATURE_NAMES) if flatnet_cpu_has(i))
