// int_checks.h — overflow-safe size and range checks for every binding
// (_cpu through checks.h, _cuda and _cuda_emu through cuda_ops.h).
//
// Why a header of its own: a bounds check written the obvious way,
// `pos0 + T > n`, is signed 64-bit arithmetic that wraps for a huge pos0 (and
// is undefined behaviour), so the check passes and the kernel writes outside
// the array. The rules, in one place:
//   * compare without adding: `start <= n - count` (n and count are sizes, >= 0);
//   * multiply only after checking that the product fits (checked_mul);
//   * narrow to int (CUDA launch parameters) only after checking the range;
//   * a negative size or start is an error, never a huge unsigned value.
// Each helper raises ValueError naming the function, the value and the limit.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>

namespace numformer::bindings {

namespace py = pybind11;

constexpr std::int64_t kInt64Max = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

// True when [start, start + count) lies inside [0, n); never forms start + count.
inline bool range_fits(std::int64_t start, std::int64_t count, std::int64_t n) noexcept {
    return start >= 0 && count >= 0 && count <= n && start <= n - count;
}

// ValueError unless [start, start + count) lies inside [0, n), e.g.
// "embedding_backward: pos0 = 9223372036854775807 and 2 positions do not fit dwpe (8, 4)
//  (8 rows; pos0 must be in [0, 6])".
inline void require_range(std::int64_t start, std::int64_t count, std::int64_t n, const std::string& fn,
                          const std::string& start_name, const std::string& what) {
    if (range_fits(start, count, n)) return;
    std::string msg = fn + ": " + start_name + " = " + std::to_string(start) + " and " + std::to_string(count) +
                      " positions do not fit " + what + " (" + std::to_string(n) + " rows; ";
    msg += count <= n ? start_name + " must be in [0, " + std::to_string(n - count) + "])"
                      : "more positions than rows)";
    throw py::value_error(msg);
}

// a·b for sizes a, b >= 0, or ValueError when the product would exceed `limit`.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const std::string& fn,
                                std::int64_t limit = kInt64Max) {
    if (a < 0 || b < 0)
        throw py::value_error(fn + ": negative size (" + std::to_string(a) + " x " + std::to_string(b) + ")");
    if (a != 0 && b > limit / a)
        throw py::value_error(fn + ": size " + std::to_string(a) + " x " + std::to_string(b) + " exceeds " +
                              std::to_string(limit));
    return a * b;
}

// Elements of `shape`, checked as NumPy checks its own arrays: every dimension
// >= 0, and the product of the non-zero dimensions times `itemsize` fits in
// 63 bits — so the product of any subset of the dimensions (a row stride, a
// byte count) fits too, even when a zero dimension makes the array empty.
// `shape`: any sequence of integer dimensions (a Shape, NumPy's py::ssize_t vector).
template <class Dims>
std::int64_t checked_numel(const Dims& shape, const std::string& fn, std::int64_t itemsize = 1) {
    std::int64_t bytes = itemsize;
    bool empty = false;
    for (std::int64_t d : shape) {
        if (d < 0) throw py::value_error(fn + ": negative dimension " + std::to_string(d));
        if (d == 0) {
            empty = true;
            continue;
        }
        if (d > kInt64Max / bytes)
            throw py::value_error(fn + ": an array with dimension " + std::to_string(d) + " is too large (" +
                                  std::to_string(itemsize) + "-byte items; at most 2**63 - 1 bytes)");
        bytes *= d;
    }
    return empty ? 0 : bytes / itemsize;
}

// v as a non-negative int (CUDA launch parameters, kernel arguments), or ValueError.
inline int to_int32(std::int64_t v, const std::string& fn, const std::string& what) {
    if (v < 0 || v > kInt32Max)
        throw py::value_error(fn + ": " + what + " = " + std::to_string(v) + " is outside [0, 2**31 - 1]");
    return static_cast<int>(v);
}

}  // namespace numformer::bindings
