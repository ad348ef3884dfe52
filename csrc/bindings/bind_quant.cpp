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
    if (q.ndim() != 2) throw py::value_error(std::string(kFn) + ": q must be 2-D (K, N), got shape " + shape_str(q));
    const index_t M = x.shape(0), K = x.shape(1), N = q.shape(1);
    if (q.shape(0) != K) {
        throw py::value_error(std::string(kFn) + ": inner dimensions differ: x is " + shape_str(x) +
                              ", q is " + shape_str(q));
    }
    if (s.ndim() != 1 || s.shape(0) != N) {
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
    py::array_t<float> y({static_cast<py::ssize_t>(M), static_cast<py::ssize_t>(N)});
    const float* xp = static_cast<const float*>(x.data());
    const auto* qp = static_cast<const std::int8_t*>(q.data());
    const float* sp = static_cast<const float*>(s.data());
    float* yp = y.mutable_data();
    {
        py::gil_scoped_release release;
        nc::matmul_int8(xp, qp, sp, bias, yp, M, K, N);
    }
    return y;
}

}  // namespace

void register_quant(py::module_& m) {
    m.def("matmul_int8", &matmul_int8, py::arg("x"), py::arg("q"), py::arg("scale"), py::kw_only(),
          py::arg("bias") = py::none(),
          R"doc((x @ q.astype(float32)) * scale + bias: a linear layer with int8 weights.

x: (M, K) float32; q: (K, N) int8 (one output channel per column); scale: (N,)
float32, the per-column dequantization scale; bias: (N,) float32 or None. All
C-contiguous. Returns a new (M, N) float32 array. Up to 8 rows stream q once,
converting to float in registers; more rows run the blocked float GEMM on an
exact float copy of q.)doc");
    m.attr("int8_stream_rows") = nc::kInt8StreamRows;
}
