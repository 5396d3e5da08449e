"""Dropout masks' seeds: one definition for every backend and executor.

A mask element is kept when 32 bits of splitmix64(seed + index) are at least p * 2^32
(the hash is engine/dropout_hash.h, shared by the C, Cython and CUDA kernels), so the
masks depend only on the seed, never on the thread count or the device.
"""

def dropout_seed(rng, p):
    """(seed, threshold) of one dropout mask: a seed drawn from the layer's numpy Generator
    (so a checkpoint's generator state fixes every later mask, on every backend) and
    p * 2^32 (the kernels keep an element when 32 hash bits are >= it)."""
    return int(rng.integers(0, 2**63)), dropout_threshold(p)


def dropout_threshold(p):
    """p * 2^32: the kernels keep an element when 32 bits of its hash are >= it."""
    return min(int(round(p * 2.0**32)), 2**32)
