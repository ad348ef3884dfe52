// bind_attention.cpp — Python face of the flash-attention kernels.
//
// attention_forward(q, k, v, *, causal=False, key_mask=None, scale=None) -> (out, lse)
// attention_backward(dout, q, k, v, out, lse, *, causal=False, key_mask=None, scale=None)
//     -> (dq, dk, dv)
//
// q, k, v, dout, out may be strided views (a head split of a fused qkv
// projection, a slice of a KV cache) as long as their last axis is
// contiguous: the kernel reads rows through the strides, so the common
// callers need no copy. Everything is validated here, with the GIL held;
// the kernels run with it released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "bindings/checks.h"
#include "bindings/output_cache.h"
#include "cpu/attention.h"

namespace py = pybind11;
namespace nc = numformer::cpu;
using nc::index_t;

namespace {

using namespace numformer::bindings;

// A 4-D float array whose last axis is unit-stride, with element-multiple
// strides and an aligned base; anything else is a ValueError.
void require_rows(const py::array& a, const char* fn, const char* name) {
    if (a.ndim() != 4) {
        throw py::value_error(std::string(fn) + ": " + name + " must be 4-D (B, H, T, D), got shape " +
                              shape_str(a));
    }
    if (a.size() == 0) return;  // nothing is read; NumPy may give empty arrays any strides
    const py::ssize_t item = a.itemsize();
    for (py::ssize_t i = 0; i < 4; ++i) {
        if (a.strides(i) % item != 0) {
            throw py::value_error(std::string(fn) + ": " + name + " has strides that are not a multiple of its item size");
        }
    }
    if (a.shape(3) > 1 && a.strides(3) != item) {
        throw py::value_error(std::string(fn) + ": " + name + " with shape " + shape_str(a) +
                              " must be contiguous along its last axis (D); use np.ascontiguousarray");
    }
    if (reinterpret_cast<std::uintptr_t>(a.data()) % static_cast<std::uintptr_t>(item) != 0) {
        throw py::value_error(std::string(fn) + ": " + name + " is not aligned to its dtype");
    }
}

template <typename T>
nc::Tensor4<T> view4(const py::array& a) {
    nc::Tensor4<T> t;
    t.data = static_cast<const T*>(a.data());
    const py::ssize_t item = a.itemsize();
    t.sb = a.strides(0) / item;
    t.sh = a.strides(1) / item;
    t.st = a.strides(2) / item;
    return t;
}

std::string dims(std::initializer_list<index_t> d) {
    std::string s = "(";
    size_t i = 0;
    for (index_t x : d) s += (i++ ? ", " : "") + std::to_string(x);
    return s + ")";
}

void require_shape(const py::array& a, std::initializer_list<index_t> want, const char* fn,
                   const char* name, const std::string& why) {
    bool same = a.ndim() == static_cast<py::ssize_t>(want.size());
    py::ssize_t i = 0;
    for (index_t w : want) {
        if (!same) break;
        same = a.shape(i++) == w;
    }
    if (!same) {
        throw py::value_error(std::string(fn) + ": " + name + " has shape " + shape_str(a) +
                              ", expected " + dims(want) + " " + why);
    }
}

struct Parsed {
    DType dt;
    index_t B, H, Tq, Tk, D;
    double scale;
    py::object mask;  // None or a C-contiguous bool (B, Tk) array
};

Parsed parse_common(const char* fn, const py::array& q, const py::array& k, const py::array& v,
                    const py::object& key_mask, const py::object& scale) {
    Parsed r;
    r.dt = require_float(q, fn, "q");
    require_same_dtype(q, r.dt, k, require_float(k, fn, "k"), fn, "q", "k");
    require_same_dtype(q, r.dt, v, require_float(v, fn, "v"), fn, "q", "v");
    require_rows(q, fn, "q");
    require_rows(k, fn, "k");
    require_rows(v, fn, "v");
    r.B = q.shape(0), r.H = q.shape(1), r.Tq = q.shape(2), r.D = q.shape(3);
    r.Tk = k.shape(2);
    require_shape(k, {r.B, r.H, r.Tk, r.D}, fn, "k", "to match q " + shape_str(q) + " (B, H, Tk, D)");
    require_shape(v, {r.B, r.H, r.Tk, r.D}, fn, "v", "to match k " + shape_str(k));
    if (r.D < 1) throw py::value_error(std::string(fn) + ": head dimension D must be >= 1, got q " + shape_str(q));
    // The kernels hold one head's queries (and keys) in scratch and index in 64 bits.
    checked_mul(checked_mul(checked_mul(r.B, r.H, fn), std::max(r.Tq, r.Tk), fn), r.D + 64, fn);
    if (r.Tq > (index_t(1) << 31) || r.Tk > (index_t(1) << 31) || r.D > (index_t(1) << 20)) {
        throw py::value_error(std::string(fn) + ": sequence or head size is too large: q " + shape_str(q) +
                              ", k " + shape_str(k));
    }
    if (scale.is_none()) {
        r.scale = 1.0 / std::sqrt(static_cast<double>(r.D));
    } else {
        r.scale = scale.cast<double>();
        if (!std::isfinite(r.scale)) throw py::value_error(std::string(fn) + ": scale must be finite");
    }
    r.mask = py::none();
    if (!key_mask.is_none()) {
        py::array km = require_array(key_mask, fn, "key_mask");
        if (km.dtype().kind() != 'b') {
            throw py::type_error(std::string(fn) + ": key_mask has dtype " + dtype_str(km) +
                                 "; expected bool (True = visible)");
        }
        require_shape(km, {r.B, r.Tk}, fn, "key_mask", "(B, Tk) for q " + shape_str(q) + ", k " + shape_str(k));
        require_layout(km, fn, "key_mask");
        r.mask = km;
    }
    return r;
}

template <typename T>
nc::AttentionProblem<T> make_problem(const Parsed& r, const py::array& q, const py::array& k,
                                     const py::array& v, bool causal) {
    nc::AttentionProblem<T> p;
    p.batch = r.B, p.heads = r.H, p.tq = r.Tq, p.tk = r.Tk, p.dim = r.D;
    p.scale = static_cast<T>(r.scale);
    p.causal = causal;
    p.key_mask = r.mask.is_none()
                     ? nullptr
                     : static_cast<const std::uint8_t*>(py::reinterpret_borrow<py::array>(r.mask).data());
    p.q = view4<T>(q), p.k = view4<T>(k), p.v = view4<T>(v);
    return p;
}

template <typename T>
py::tuple forward_t(const Parsed& r, const py::array& q, const py::array& k, const py::array& v, bool causal) {
    const auto p = make_problem<T>(r, q, k, v, causal);
    py::array_t<T> out = new_output<T>({r.B, r.H, r.Tq, r.D});
    py::array_t<T> lse({r.B, r.H, r.Tq});
    T* op = out.mutable_data();
    T* lp = lse.mutable_data();
    {
        py::gil_scoped_release release;
        nc::attention_forward<T>(p, op, lp);
    }
    return py::make_tuple(out, lse);
}

py::tuple attention_forward(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                            bool causal, const py::object& key_mask, const py::object& scale) {
    const char* fn = "attention_forward";
    py::array q = require_array(q_obj, fn, "q");
    py::array k = require_array(k_obj, fn, "k");
    py::array v = require_array(v_obj, fn, "v");
    const Parsed r = parse_common(fn, q, k, v, key_mask, scale);
    if (r.dt == DType::f32) return forward_t<float>(r, q, k, v, causal);
    return forward_t<double>(r, q, k, v, causal);
}

template <typename T>
py::tuple backward_t(const Parsed& r, const py::array& dout, const py::array& q, const py::array& k,
                     const py::array& v, const py::array& out, const py::array& lse, bool causal) {
    const auto p = make_problem<T>(r, q, k, v, causal);
    const nc::Tensor4<T> o = view4<T>(out), dO = view4<T>(dout);
    const T* lp = static_cast<const T*>(lse.data());
    py::array_t<T> dq = new_output<T>({r.B, r.H, r.Tq, r.D});
    py::array_t<T> dk = new_output<T>({r.B, r.H, r.Tk, r.D});
    py::array_t<T> dv = new_output<T>({r.B, r.H, r.Tk, r.D});
    T* dqp = dq.mutable_data();
    T* dkp = dk.mutable_data();
    T* dvp = dv.mutable_data();
    {
        py::gil_scoped_release release;
        nc::attention_backward<T>(p, o, dO, lp, dqp, dkp, dvp);
    }
    return py::make_tuple(dq, dk, dv);
}

py::tuple attention_backward(const py::object& dout_obj, const py::object& q_obj, const py::object& k_obj,
                             const py::object& v_obj, const py::object& out_obj, const py::object& lse_obj,
                             bool causal, const py::object& key_mask, const py::object& scale) {
    const char* fn = "attention_backward";
    py::array dout = require_array(dout_obj, fn, "dout");
    py::array q = require_array(q_obj, fn, "q");
    py::array k = require_array(k_obj, fn, "k");
    py::array v = require_array(v_obj, fn, "v");
    py::array out = require_array(out_obj, fn, "out");
    py::array lse = require_array(lse_obj, fn, "lse");
    const Parsed r = parse_common(fn, q, k, v, key_mask, scale);
    require_same_dtype(q, r.dt, dout, require_float(dout, fn, "dout"), fn, "q", "dout");
    require_same_dtype(q, r.dt, out, require_float(out, fn, "out"), fn, "q", "out");
    require_same_dtype(q, r.dt, lse, require_float(lse, fn, "lse"), fn, "q", "lse");
    require_rows(dout, fn, "dout");
    require_rows(out, fn, "out");
    require_shape(dout, {r.B, r.H, r.Tq, r.D}, fn, "dout", "to match q " + shape_str(q));
    require_shape(out, {r.B, r.H, r.Tq, r.D}, fn, "out", "to match q " + shape_str(q));
    require_shape(lse, {r.B, r.H, r.Tq}, fn, "lse", "(B, H, Tq) to match q " + shape_str(q));
    require_layout(lse, fn, "lse");
    if (r.dt == DType::f32) return backward_t<float>(r, dout, q, k, v, out, lse, causal);
    return backward_t<double>(r, dout, q, k, v, out, lse, causal);
}

}  // namespace

void register_attention(py::module_& m) {
    m.def("attention_forward", &attention_forward, py::arg("q"), py::arg("k"), py::arg("v"),
          py::kw_only(), py::arg("causal") = false, py::arg("key_mask") = py::none(),
          py::arg("scale") = py::none(),
          R"doc(Flash attention forward: returns (out, lse).

q: (B, H, Tq, D), k, v: (B, H, Tk, D), float32 or float64, last axis
contiguous (other axes may be strided views). causal: query i sees key j only
if j <= i + Tk - Tq. key_mask: (B, Tk) bool, False hides a key. scale defaults
to 1/sqrt(D). out: (B, H, Tq, D) = softmax(scale * q k^T + mask) v, lse:
(B, H, Tq) the log-sum-exp of each score row. A query that sees no key gets
out = 0 and lse = -inf.)doc");

    m.def("attention_backward", &attention_backward, py::arg("dout"), py::arg("q"), py::arg("k"),
          py::arg("v"), py::arg("out"), py::arg("lse"), py::kw_only(), py::arg("causal") = false,
          py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
          R"doc(Flash attention backward: returns (dq, dk, dv).

out and lse are what attention_forward returned for the same q, k, v, causal,
key_mask and scale; dout has the shape of out. Probabilities are recomputed
tile by tile from lse; nothing of size Tq x Tk is stored.)doc");
}
