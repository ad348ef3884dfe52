// output_cache.h — where the kernels' large result arrays come from.
//
// Why: glibc serves an allocation of 32 MiB or more with a fresh mmap and
// unmaps it again on free (its adaptive mmap threshold stops growing at
// 32 MiB on 64-bit). The next call of the same size then takes a page fault
// per 4 KiB page and the kernel zeroes each page before our kernel writes it:
// an extra write pass over the whole output. For a softmax backward over
// 98304×512 floats (200 MB out) that is ~8 ms of ~33 ms on two threads.
// Smaller arrays do not need this: glibc's heap already reuses them.
//
// What: results of at least kCacheMinBytes are carved from blocks that we
// allocate ourselves; when the NumPy array (and every view of it) dies, its
// block goes into a small cache instead of back to the OS, and the next
// result that fits takes it. A caching allocator, as PyTorch uses on GPUs.
//
// Bound: the cache holds at most NUMFORMER_OUTPUT_CACHE_MB (read once,
// default 1024; 0 turns caching off) of idle blocks, evicting the oldest.
// `_cpu.output_cache_info()` reports it and `_cpu.clear_output_cache()`
// frees the idle blocks. The contents of a reused block are stale: every
// kernel writes all of its output (as with np.empty).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "bindings/int_checks.h"

namespace numformer::bindings {

namespace py = pybind11;

constexpr std::size_t kCacheMinBytes = std::size_t(32) << 20;

// A block of at least `bytes` bytes (64-byte aligned) and a capsule that
// returns it to the cache when the last array referring to it dies.
struct CachedBlock {
    void* data;
    py::capsule owner;
};
CachedBlock acquire_block(std::size_t bytes);
bool output_cache_enabled();  // false when NUMFORMER_OUTPUT_CACHE_MB=0

// An uninitialised C-contiguous array of `shape`, from the cache when large.
// The byte count is checked before anything is allocated: a product that wrapped
// (e.g. (2**22, 2**39 + 1) float64 from a matmul of two empty arrays) would carve a
// small block that the kernel then fills as the huge array the shape describes.
template <typename T>
py::array_t<T> new_output(const std::vector<py::ssize_t>& shape) {
    const std::size_t bytes = static_cast<std::size_t>(checked_numel(shape, "result array", sizeof(T))) * sizeof(T);
    if (bytes < kCacheMinBytes || !output_cache_enabled()) return py::array_t<T>(shape);
    CachedBlock block = acquire_block(bytes);
    return py::array_t<T>(shape, static_cast<T*>(block.data), block.owner);
}

void register_output_cache(py::module_& m);

}  // namespace numformer::bindings
