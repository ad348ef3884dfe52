// bind_quant.cpp — Python face of the int8-weight matrix product (cpu/quant.h).
//
// matmul_int8(x, q, scale, *, bias=None) -> y = (x @ float(q)) * scale + bias
//
// x: (M, K) float32, q: (K, N) int8, scale: (N,) float32, bias: (N,) float32
// or None; all C-contiguous and aligned. Everything is checked with the GIL
// held (TypeError for a dtype, ValueError naming the shapes otherwise); the
// kernel runs with the GIL released on numformer's threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/checks.h"
#include "bindings/output_cache.h"
#include "cpu/quant.h"

namespace py = pybind11;
namespace nc = numformer::cpu;
using nc::index_t;

namespace {

using namespace numformer::bindings;

constexpr const char* kFn = "matmul_int8";

py::array typed(const py::object& obj, const char* name, bool is_int8) {
    py::array a = require_array(obj, kFn, name);
    const bool ok = is_int8 ? py::isinstance<py::array_t<std::int8_t>>(a) : py::isinstance<py::array_t<float>>(a);
    if (!ok) {
        throw py::type_error(std::string(kFn) + ": " + name + " has dtype " + dtype_str(a) +
                             (is_int8 ? "; expected int8" : "; expected float32"));
    }
    require_layout(a, kFn, name);
    return a;
}

py::array matmul_int8(const py::object& x_o, const py::object& q_o, const py::object& s_o,
                      const py::object& b_o) {
    py::array x = typed(x_o, "x", false);
    py::array q = typed(q_o, "q", true);
    py::array s = typed(s_o, "scale", false);
    if (x.ndim() != 2) throw py::value_error(std::string(kFn) + ": x must be 2-D (M, K), got shape " + shape_str(x));
    // q: (K, N), or packed (⌈N/64⌉, K, 64) with N = len(scale)
    const bool packed = q.ndim() == 3;
    if (q.ndim() != 2 && !packed) {
        throw py::value_error(std::string(kFn) + ": q must be 2-D (K, N) or packed 3-D (ceil(N/64), K, 64), got shape " +
                              shape_str(q));
    }
    if (s.ndim() != 1) throw py::value_error(std::string(kFn) + ": scale must be 1-D, got shape " + shape_str(s));
    const index_t M = x.shape(0), K = x.shape(1);
    const index_t N = packed ? s.shape(0) : q.shape(1);
    const index_t qk = packed ? q.shape(1) : q.shape(0);
    if (qk != K) {
        throw py::value_error(std::string(kFn) + ": inner dimensions differ: x is " + shape_str(x) +
                              ", q is " + shape_str(q) + (packed ? " (packed)" : ""));
    }
    if (packed && (q.shape(2) != nc::kInt8PackCols || q.shape(0) != (N + nc::kInt8PackCols - 1) / nc::kInt8PackCols)) {
        throw py::value_error(std::string(kFn) + ": packed q must have shape (" +
                              std::to_string((N + nc::kInt8PackCols - 1) / nc::kInt8PackCols) + ", " +
                              std::to_string(K) + ", " + std::to_string(nc::kInt8PackCols) + ") for " +
                              std::to_string(N) + " columns (len(scale)), got " + shape_str(q));
    }
    if (s.shape(0) != N) {
        throw py::value_error(std::string(kFn) + ": scale must have shape (" + std::to_string(N) +
                              ",) (one per column of q " + shape_str(q) + "), got " + shape_str(s));
    }
    const float* bias = nullptr;
    py::array b;
    if (!b_o.is_none()) {
        b = typed(b_o, "bias", false);
        if (b.ndim() != 1 || b.shape(0) != N) {
            throw py::value_error(std::string(kFn) + ": bias must have shape (" + std::to_string(N) +
                                  ",) to match q " + shape_str(q) + ", got " + shape_str(b));
        }
        bias = static_cast<const float*>(b.data());
    }
    checked_mul(M, N, kFn);
    checked_mul(K, N, kFn);
    py::array_t<float> y = new_output<float>({static_cast<py::ssize_t>(M), static_cast<py::ssize_t>(N)});
    const float* xp = static_cast<const float*>(x.data());
    const auto* qp = static_cast<const std::int8_t*>(q.data());
    const float* sp = static_cast<const float*>(s.data());
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        nc::matmul_int8(xp, qp, packed, sp, bias, yp, M, K, N);
    }
    return y;
}

}  // namespace

void register_quant(py::module_& m) {
    m.def("matmul_int8", &matmul_int8, py::arg("x"), py::arg("q"), py::arg("scale"), py::kw_only(),
          py::arg("bias") = py::none(),
          R"doc((x @ q.astype(float32)) * scale + bias: a linear layer with int8 weights.

x: (M, K) float32; q: (K, N) int8 (one output channel per column), or the same
packed as (ceil(N/64), K, 64) (numformer.ops.linear.pack_int8: 64-column blocks,
each K contiguous rows, the last zero-padded), which the few-rows path reads
sequentially; scale: (N,) float32, the per-column dequantization scale; bias:
(N,) float32 or None. All C-contiguous. Returns a new (M, N) float32 array. Up
to 64 rows (int8_stream_rows) stream q, converting to float in registers; more
rows run the blocked float GEMM on an exact float copy of q.)doc");
    m.attr("int8_pack_cols") = nc::kInt8PackCols;
    m.attr("int8_stream_rows") = nc::kInt8StreamRows;
}
