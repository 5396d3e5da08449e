/* The dropout hash, one definition for every kernel that draws a mask: the Cython kernel
 * (_kernels.dropout_mask), the compiled training step (_train.h) and the CUDA kernel
 * (cuda_kernels.cu, compiled by nvcc or NVRTC with this folder on the include path).
 *
 * fl_splitmix64(seed, i) is the i-th output (from 0) of Vigna's splitmix64 generator started
 * at `seed`: a counter-based hash, so a mask depends only on (seed, element index), never on
 * the thread count or the launch shape. An element is kept when the top 32 bits are at least
 * p * 2^32 (engine/runtime/dropout.py). tests/reference.py holds an independent Python copy.
 */
#ifndef FLATNET_DROPOUT_HASH_H
#define FLATNET_DROPOUT_HASH_H

#ifdef __CUDACC__
#define FL_HASH_FN static inline __host__ __device__
#else
#define FL_HASH_FN static inline
#endif

FL_HASH_FN unsigned long long fl_splitmix64(unsigned long long seed, unsigned long long i) {
    unsigned long long z = seed + (i + 1ULL) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#endif
