# OpenMP: whether it is compiled in, its default team size, and a probe for the tests.
# Included by engine/_kernels.pyx (its directives, cimports and helpers apply here).

def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(FLATNET_OPENMP)


def omp_max_threads():
    """OpenMP's default team size (honours OMP_NUM_THREADS); 1 without OpenMP."""
    return omp_get_max_threads()


def testing_threads_seen(int num_threads):
    """Run a parallel region with `num_threads` and return how many threads took part."""
    cdef int seen[1024]
    cdef int i, total = 0
    for i in range(1024):
        seen[i] = 0
    with nogil, parallel(num_threads=num_threads):
        i = omp_get_thread_num()
        if i < 1024:
            seen[i] = 1
    for i in range(1024):
        total += seen[i]
    return total
