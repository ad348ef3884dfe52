// cpu_module.cpp — the Python face of numformer._cpu.
//
// Thin on purpose: check everything about the arrays (type, dtype, ndim,
// shapes, contiguity, alignment, writability, overlap) while holding the GIL,
// raise TypeError/ValueError naming the offending shapes, then release the
// GIL and call the kernel with raw pointers. Nothing reaches a kernel that
// could make it read or write out of bounds.
//
// Arrays are taken as plain Python objects and checked by hand rather than
// through py::array_t<T> conversion, which would silently copy/convert a
// wrong dtype or a non-contiguous view; here those are errors, and the caller
// (numformer.backend) decides when a copy is worth making.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "bindings/checks.h"
#include "bindings/output_cache.h"
#include "cpu/gemm.h"
#include "cpu/runtime.h"
#include "cpu/softmax.h"

namespace py = pybind11;

void register_attention(py::module_& m);  // bind_attention.cpp

namespace nc = numformer::cpu;

void register_bpe(py::module_& m);  // bind_bpe.cpp: the GPT-2 tokenizer's merge loop
using nc::index_t;

// Fused non-GEMM kernels (LayerNorm, GELU, cross-entropy, embedding, optimizers).
void register_fused(py::module_& m);  // bind_fused.cpp
void register_quant(py::module_& m);  // bind_quant.cpp: int8-weight matmul

namespace {

using namespace numformer::bindings;

// ---------------------------------------------------------------------------
// matmul
// ---------------------------------------------------------------------------

template <typename T>
void run_gemm(const py::array& a, const py::array& b, const py::object& bias, py::array& out,
              index_t batch, index_t m, index_t n, index_t k, bool ta, bool tb, bool accumulate) {
    nc::GemmProblem<T> p;
    p.batch = batch;
    p.m = m;
    p.n = n;
    p.k = k;
    p.trans_a = ta;
    p.trans_b = tb;
    p.a = static_cast<const T*>(a.data());
    p.b = static_cast<const T*>(b.data());
    p.c = static_cast<T*>(out.mutable_data());
    p.bias = bias.is_none() ? nullptr : static_cast<const T*>(py::reinterpret_borrow<py::array>(bias).data());
    p.accumulate = accumulate;
    py::gil_scoped_release release;
    nc::gemm(p);
}

py::array matmul(const py::object& a_obj, const py::object& b_obj, bool trans_a, bool trans_b,
                 const py::object& bias_obj, const py::object& out_obj, bool accumulate) {
    const char* fn = "matmul";
    py::array a = require_array(a_obj, fn, "a");
    py::array b = require_array(b_obj, fn, "b");
    const DType da = require_float(a, fn, "a");
    const DType db = require_float(b, fn, "b");
    require_same_dtype(a, da, b, db, fn, "a", "b");

    const py::ssize_t nd = a.ndim();
    if (nd != 2 && nd != 3) {
        throw py::value_error(std::string(fn) + ": a must be 2-D or 3-D (batched), got shape " +
                              shape_str(a));
    }
    if (b.ndim() != nd) {
        throw py::value_error(std::string(fn) + ": a and b must have the same number of dimensions: a is " +
                              shape_str(a) + ", b is " + shape_str(b));
    }
    const std::string flags =
        (trans_a || trans_b) ? std::string(" (trans_a=") + (trans_a ? "True" : "False") +
                                   ", trans_b=" + (trans_b ? "True" : "False") + ")"
                             : std::string();
    const index_t batch = nd == 3 ? a.shape(0) : 1;
    if (nd == 3 && b.shape(0) != batch) {
        throw py::value_error(std::string(fn) + ": batch dimensions differ: a is " + shape_str(a) +
                              ", b is " + shape_str(b));
    }
    // a is (M, K), or (K, M) when trans_a; b is (K, N), or (N, K) when trans_b.
    const index_t m = trans_a ? a.shape(nd - 1) : a.shape(nd - 2);
    const index_t k = trans_a ? a.shape(nd - 2) : a.shape(nd - 1);
    const index_t kb = trans_b ? b.shape(nd - 1) : b.shape(nd - 2);
    const index_t n = trans_b ? b.shape(nd - 2) : b.shape(nd - 1);
    if (k != kb) {
        throw py::value_error(std::string(fn) + ": inner dimensions differ: a is " + shape_str(a) +
                              ", b is " + shape_str(b) + flags);
    }
    require_layout(a, fn, "a");
    require_layout(b, fn, "b");
    checked_mul(checked_mul(batch, m, fn), n, fn);

    std::vector<py::ssize_t> out_shape;
    if (nd == 3) out_shape.push_back(batch);
    out_shape.push_back(m);
    out_shape.push_back(n);

    if (!bias_obj.is_none()) {
        py::array bias = require_array(bias_obj, fn, "bias");
        require_same_dtype(a, da, bias, require_float(bias, fn, "bias"), fn, "a", "bias");
        if (bias.ndim() != 1 || bias.shape(0) != n) {
            throw py::value_error(std::string(fn) + ": bias must have shape (" + std::to_string(n) +
                                  ",) to match the result's last dimension, got " + shape_str(bias));
        }
        require_layout(bias, fn, "bias");
    }

    py::array out;
    if (out_obj.is_none()) {
        if (accumulate) throw py::value_error(std::string(fn) + ": accumulate=True needs out=");
        if (da == DType::f32)
            out = new_output<float>(out_shape);
        else
            out = new_output<double>(out_shape);
    } else {
        out = require_array(out_obj, fn, "out");
        require_same_dtype(a, da, out, require_float(out, fn, "out"), fn, "a", "out");
        bool same = out.ndim() == nd;
        for (py::ssize_t i = 0; same && i < nd; ++i) same = out.shape(i) == out_shape[size_t(i)];
        if (!same) {
            std::ostringstream want;
            want << "(";
            for (size_t i = 0; i < out_shape.size(); ++i) want << (i ? ", " : "") << out_shape[i];
            want << ")";
            throw py::value_error(std::string(fn) + ": out has shape " + shape_str(out) +
                                  ", expected " + want.str() + " for a " + shape_str(a) + " and b " +
                                  shape_str(b) + flags);
        }
        require_layout(out, fn, "out", /*writeable=*/true);
        if (overlaps(out, a) || overlaps(out, b) ||
            (!bias_obj.is_none() && overlaps(out, py::reinterpret_borrow<py::array>(bias_obj)))) {
            throw py::value_error(std::string(fn) + ": out must not share memory with a, b or bias");
        }
    }

    if (da == DType::f32)
        run_gemm<float>(a, b, bias_obj, out, batch, m, n, k, trans_a, trans_b, accumulate);
    else
        run_gemm<double>(a, b, bias_obj, out, batch, m, n, k, trans_a, trans_b, accumulate);
    return out;
}

// ---------------------------------------------------------------------------
// softmax
// ---------------------------------------------------------------------------

// The mask broadcasts against x's leading axes (numpy rules, aligned from
// the right); its last axis must be x's last axis (a mask constant along the
// keys would cancel out).
template <typename T>
nc::SoftmaxMask<T> softmax_mask(const py::array& x, const py::object& mask_obj, bool causal,
                                const char* fn) {
    nc::SoftmaxMask<T> mk;
    const py::ssize_t nd = x.ndim();
    if (causal) {
        if (nd < 2) {
            throw py::value_error(std::string(fn) + ": causal=True needs x with at least 2 dimensions "
                                  "(..., Tq, Tk), got shape " + shape_str(x));
        }
        mk.causal_tq = x.shape(nd - 2);
    }
    if (mask_obj.is_none()) return mk;
    py::array mask = require_array(mask_obj, fn, "mask");
    const DType dm = require_float(mask, fn, "mask");
    require_same_dtype(x, std::is_same<T, float>::value ? DType::f32 : DType::f64, mask, dm, fn,
                       "x", "mask");
    require_layout(mask, fn, "mask");
    const py::ssize_t md = mask.ndim();
    bool ok = md >= 1 && md <= nd && mask.shape(md - 1) == x.shape(nd - 1);
    for (py::ssize_t d = 1; ok && d < md; ++d) {
        const py::ssize_t ms = mask.shape(md - 1 - d), xs = x.shape(nd - 1 - d);
        ok = ms == xs || ms == 1;
    }
    if (!ok) {
        throw py::value_error(std::string(fn) + ": mask of shape " + shape_str(mask) +
                              " does not broadcast to x of shape " + shape_str(x) +
                              " (its last axis must equal x's)");
    }
    if (nd - 1 > nc::kSoftmaxMaxLead) {
        throw py::value_error(std::string(fn) + ": with a mask, x may have at most " +
                              std::to_string(nc::kSoftmaxMaxLead + 1) + " dimensions, got " +
                              shape_str(x));
    }
    mk.add = static_cast<const T*>(mask.data());
    mk.lead_ndim = int(nd - 1);
    // Row strides of the mask, in rows, for each leading axis of x.
    index_t stride = 1;
    for (py::ssize_t d = nd - 2; d >= 0; --d) {
        mk.lead_shape[d] = x.shape(d);
        const py::ssize_t md_axis = d - (nd - md);  // the mask's axis aligned with x's axis d
        const index_t size = md_axis >= 0 ? mask.shape(md_axis) : 1;
        mk.row_stride[d] = size == 1 ? 0 : stride;
        stride *= size;
    }
    return mk;
}

py::array softmax_forward(const py::object& x_obj, double scale, const py::object& mask_obj,
                          bool causal) {
    const char* fn = "softmax_forward";
    py::array x = require_array(x_obj, fn, "x");
    const DType dt = require_float(x, fn, "x");
    if (x.ndim() < 1) throw py::value_error(std::string(fn) + ": x must have at least 1 dimension, got a 0-d array");
    require_layout(x, fn, "x");
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    const index_t n = x.shape(x.ndim() - 1);
    const index_t rows = n == 0 ? 0 : x.size() / n;
    if (dt == DType::f32) {
        const nc::SoftmaxMask<float> mk = softmax_mask<float>(x, mask_obj, causal, fn);
        py::array_t<float> y = new_output<float>(shape);
        const float* xp = static_cast<const float*>(x.data());
        float* yp = y.mutable_data();
        py::gil_scoped_release release;
        nc::softmax_forward<float>(xp, yp, rows, n, static_cast<float>(scale), mk);
        return std::move(y);
    }
    const nc::SoftmaxMask<double> mk = softmax_mask<double>(x, mask_obj, causal, fn);
    py::array_t<double> y = new_output<double>(shape);
    const double* xp = static_cast<const double*>(x.data());
    double* yp = y.mutable_data();
    py::gil_scoped_release release;
    nc::softmax_forward<double>(xp, yp, rows, n, scale, mk);
    return std::move(y);
}

py::array softmax_backward(const py::object& dy_obj, const py::object& y_obj, double scale) {
    const char* fn = "softmax_backward";
    py::array dy = require_array(dy_obj, fn, "dy");
    py::array y = require_array(y_obj, fn, "y");
    const DType dt = require_float(dy, fn, "dy");
    require_same_dtype(dy, dt, y, require_float(y, fn, "y"), fn, "dy", "y");
    bool same = dy.ndim() == y.ndim();
    for (py::ssize_t i = 0; same && i < dy.ndim(); ++i) same = dy.shape(i) == y.shape(i);
    if (!same) {
        throw py::value_error(std::string(fn) + ": shapes differ: dy is " + shape_str(dy) +
                              ", y is " + shape_str(y));
    }
    if (y.ndim() < 1) throw py::value_error(std::string(fn) + ": y must have at least 1 dimension, got a 0-d array");
    require_layout(dy, fn, "dy");
    require_layout(y, fn, "y");
    std::vector<py::ssize_t> shape(y.shape(), y.shape() + y.ndim());
    const index_t n = y.shape(y.ndim() - 1);
    const index_t rows = n == 0 ? 0 : y.size() / n;
    if (dt == DType::f32) {
        py::array_t<float> dx = new_output<float>(shape);
        const float* dyp = static_cast<const float*>(dy.data());
        const float* yp = static_cast<const float*>(y.data());
        float* dxp = dx.mutable_data();
        py::gil_scoped_release release;
        nc::softmax_backward<float>(dyp, yp, dxp, rows, n, static_cast<float>(scale));
        return std::move(dx);
    }
    py::array_t<double> dx = new_output<double>(shape);
    const double* dyp = static_cast<const double*>(dy.data());
    const double* yp = static_cast<const double*>(y.data());
    double* dxp = dx.mutable_data();
    py::gil_scoped_release release;
    nc::softmax_backward<double>(dyp, yp, dxp, rows, n, scale);
    return std::move(dx);
}

// ---------------------------------------------------------------------------
// runtime
// ---------------------------------------------------------------------------

void set_num_threads(int n) {
    if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
    nc::set_num_threads(n);
}

std::string set_isa(const std::string& name) {
    nc::Isa isa;
    if (!nc::isa_from_name(name, &isa)) {
        throw py::value_error("set_isa: unknown instruction set '" + name +
                              "'; choose generic, avx2 or avx512");
    }
    const std::string previous = nc::isa_name(nc::active_isa());
    if (!nc::set_active_isa(isa)) {
        throw py::value_error("set_isa: this CPU (or build) cannot run '" + name + "'");
    }
    return previous;
}

py::list available_isas() {
    py::list names;
    for (nc::Isa isa : nc::supported_isas()) names.append(nc::isa_name(isa));
    return names;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() =
        "numformer's compiled CPU kernels: matmul (GEMM) and softmax forward/backward.\n"
        "Inputs must be C-contiguous float32/float64 numpy arrays of one dtype; wrong\n"
        "dtypes raise TypeError, bad shapes or layouts raise ValueError. The GIL is\n"
        "released while a kernel runs. See docs/kernels.md.";

    m.attr("gemm_stream_rows") = nc::kGemmStreamRows;  // products of <= this many rows stream B
    m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("trans_a") = false,
          py::arg("trans_b") = false, py::kw_only(), py::arg("bias") = py::none(),
          py::arg("out") = py::none(), py::arg("accumulate") = false,
          R"doc(op(a) @ op(b) (+ bias), op = transpose of the last two axes when asked.

a: (M, K), or (K, M) with trans_a; b: (K, N), or (N, K) with trans_b; or both
3-D with the same leading batch size. Returns a new C-contiguous (…, M, N) array,
or writes into ``out``: out = op(a)·op(b) + bias, or with accumulate=True
out += op(a)·op(b) + bias. bias: 1-D of length N, added to every row.)doc");

    m.def("softmax_forward", &softmax_forward, py::arg("x"), py::kw_only(),
          py::arg("scale") = 1.0, py::arg("mask") = py::none(), py::arg("causal") = false,
          R"doc(softmax(scale * x + mask) over the last axis (x: any shape with ndim >= 1).

mask: optional additive mask of x's dtype, C-contiguous, broadcasting against x
(e.g. (Tq, Tk) for every head, (B, 1, 1, Tk) for padding, or x's own shape); its
last axis must equal x's. causal: x is (..., Tq, Tk) and query i sees keys
j <= i + Tk - Tq only (the others count as -inf).
Numerically stable (the row maximum is subtracted). -inf entries give 0; a row
with no finite entry (fully masked) gives all zeros; a row containing NaN or
+inf gives NaN.)doc");

    m.def("softmax_backward", &softmax_backward, py::arg("dy"), py::arg("y"), py::kw_only(),
          py::arg("scale") = 1.0,
          "dx = scale * y * (dy - sum(dy * y, axis=-1, keepdims=True)), y = softmax output\n"
          "(the gradient with respect to x of softmax(scale * x + mask)).");

    register_attention(m);

    m.def("num_threads", &nc::num_threads,
          "Threads a kernel may use (NUMFORMER_NUM_THREADS, else OpenMP's default).");
    m.def("set_num_threads", &set_num_threads, py::arg("n"), "Set the kernel thread count (>= 1).");
    m.def("isa", [] { return std::string(nc::isa_name(nc::active_isa())); },
          "Instruction set the kernels run: 'avx512', 'avx2' or 'generic'.");
    m.def("available_isas", &available_isas, "Instruction sets this CPU and build can run.");
    m.def("set_isa", &set_isa, py::arg("name"),
          "Run the kernels with another (supported) instruction set; returns the previous one.\n"
          "For tests and benchmarks: every variant must give the same results.");
    m.def("build_info", &nc::build_info,
          "Compiler, OpenMP, SIMD and thread settings of this build, as one line.");
    register_fused(m);
    m.attr("__build_info__") = nc::build_info();
    register_bpe(m);
    register_quant(m);
    register_output_cache(m);

    // set_num_threads' cap: OpenMP asked for 2**31 threads aborts the process.
    const auto require_threads = [](const char* fn, int threads) {
        if (threads < 1 || threads > nc::kMaxThreads)
            throw py::value_error(std::string(fn) + ": threads must be in [1, " + std::to_string(nc::kMaxThreads) +
                                  "], got " + std::to_string(threads));
    };
    m.def("measure_fma_peak",
          [require_threads](double seconds, int threads) {
              if (!(seconds > 0) || seconds > 60)
                  throw py::value_error("measure_fma_peak: seconds must be in (0, 60]");
              require_threads("measure_fma_peak", threads);
              py::gil_scoped_release release;
              return nc::measure_fma_peak(seconds, threads);
          },
          py::arg("seconds") = 0.5, py::arg("threads") = 1,
          "GFLOP/s of an FMA-bound loop (widest vectors of the active ISA) on `threads` threads.");
    m.def("measure_copy_bandwidth",
          [require_threads](std::int64_t nbytes, int threads) {
              if (nbytes < 1 || nbytes > (std::int64_t(1) << 36))
                  throw py::value_error("measure_copy_bandwidth: nbytes must be in [1, 2**36]");
              require_threads("measure_copy_bandwidth", threads);
              py::gil_scoped_release release;
              return nc::measure_copy_bandwidth(nbytes, threads);
          },
          py::arg("nbytes") = std::int64_t(256) << 20, py::arg("threads") = 1,
          "GB/s (bytes read + written) of copying nbytes between two buffers on `threads` threads.");

    const std::string warnings = nc::env_warnings();
    if (!warnings.empty()) {
        if (PyErr_WarnEx(PyExc_RuntimeWarning, ("numformer._cpu: " + warnings).c_str(), 1) < 0)
            throw py::error_already_set();
    }
}
