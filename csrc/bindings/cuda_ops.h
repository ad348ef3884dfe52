// cuda_ops.h — the Python functions of numformer._cuda and numformer._cuda_emu.
//
// Both modules expose the same operations with the same validation; they
// differ in where arrays live:
//   * _cuda:     numformer._cuda.DeviceArray (device memory; see cuda_module.cpp)
//   * _cuda_emu: numpy.ndarray (host memory; the kernels run in the CPU emulator)
// A `Policy` class supplies the array type and its handful of primitives;
// `register_ops<Policy>(m)` defines the functions. Every check happens while
// the GIL is held and raises TypeError/ValueError naming the shape; only then
// are the kernels called (GIL released).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "bindings/int_checks.h"
#include "cuda/kernels.h"

namespace numformer::bindings::cudaops {

namespace py = pybind11;
namespace nc = numformer::cuda;
using nc::index_t;
using Shape = std::vector<index_t>;

inline std::string shape_str(const Shape& s) {
    std::ostringstream o;
    o << "(";
    for (std::size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
    if (s.size() == 1) o << ",";
    o << ")";
    return o.str();
}

// Elements of a shape, refusing negative dimensions and sizes past 2**63 - 1
// bytes of float32 (a DeviceArray's shape is not checked by NumPy).
inline index_t numel(const Shape& s, const std::string& fn = "numformer._cuda") {
    return checked_numel(s, fn, sizeof(float));
}

[[noreturn]] inline void value_error(const std::string& fn, const std::string& what) {
    throw py::value_error(fn + ": " + what);
}

// The kernels take int sizes (CUDA launch parameters): refuse what does not fit.
inline int to_int(index_t v, const std::string& fn, const char* what) { return to_int32(v, fn, what); }

// "positions 3..4" for an error message, without forming pos0 + T - 1 when it would wrap.
inline std::string positions_str(index_t pos0, index_t T) {
    if (T < 1) return "position " + std::to_string(pos0) + " (no tokens)";
    if (pos0 > kInt64Max - (T - 1)) return "positions from " + std::to_string(pos0) + " (" + std::to_string(T) + " of them)";
    return "positions " + std::to_string(pos0) + ".." + std::to_string(pos0 + T - 1);
}

// The additive-mask row mapping for softmax (see SoftmaxMask in kernels.h):
// mask must broadcast against x with an equal last axis.
inline nc::SoftmaxMask softmax_mask(const Shape& x, const Shape& mk, const float* data, const std::string& fn) {
    nc::SoftmaxMask r;
    if (!data) return r;
    if (mk.empty() || mk.size() > x.size() || mk.back() != x.back())
        value_error(fn, "mask " + shape_str(mk) + " must broadcast against x " + shape_str(x) +
                            " with an equal last axis");
    const std::size_t L = x.size() - 1, off = x.size() - mk.size();
    if (L > 8) value_error(fn, "x has more than 9 axes");
    r.data = data;
    r.ndim = int(L);
    // Dense row-major strides of the mask, then 0 for broadcast axes.
    std::vector<index_t> mstride(mk.size(), 1);
    for (std::size_t a = mk.size(); a-- > 1;) mstride[a - 1] = mstride[a] * mk[a];
    for (std::size_t a = 0; a < L; ++a) {
        r.lead_size[a] = x[a];
        if (a < off) { r.mask_stride[a] = 0; continue; }
        const index_t ms = mk[a - off];
        if (ms != 1 && ms != x[a])
            value_error(fn, "mask " + shape_str(mk) + " does not broadcast against x " + shape_str(x));
        r.mask_stride[a] = ms == 1 ? 0 : mstride[a - off];
    }
    return r;
}

// Token ids (B, T) from a host integer array, as int32, each checked against
// [0, vocab) here on the host: an id out of range would make the embedding
// kernel read outside wte. The error names the first bad position.
inline py::array_t<std::int32_t> checked_ids(const py::object& obj, const std::string& fn, index_t vocab) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(fn + ": ids must be a numpy integer array (B, T), got " +
                             py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    const py::array a = py::reinterpret_borrow<py::array>(obj);
    const char kind = a.dtype().kind();
    if (kind != 'i' && kind != 'u')
        throw py::type_error(fn + ": ids has dtype " + py::str(a.dtype()).cast<std::string>() + "; expected integers");
    if (a.ndim() != 2) value_error(fn, "ids must be (B, T), got " + std::to_string(a.ndim()) + "-D");
    // uint64 ids above 2^63 wrap to negative int64 here and fail the range check.
    const auto wide = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    py::array_t<std::int32_t> ids({a.shape(0), a.shape(1)});
    const std::int64_t* src = wide.data();
    std::int32_t* dst = ids.mutable_data();
    // The kernels take int32 ids: a vocabulary past 2**31 - 1 rows (an empty (V, 0) wte)
    // must not let an id through that the narrowing below would change.
    const index_t limit = vocab < kInt32Max ? vocab : kInt32Max;
    for (py::ssize_t i = 0; i < wide.size(); ++i) {
        if (src[i] < 0 || src[i] >= limit)
            value_error(fn, "token id " + std::to_string(src[i]) + " at position (" + std::to_string(i / a.shape(1)) +
                                ", " + std::to_string(i % a.shape(1)) + ") is outside [0, " + std::to_string(limit) + ")");
        dst[i] = std::int32_t(src[i]);
    }
    return ids;
}

template <class Policy>
void register_ops(py::module_& m) {
    using Array = typename Policy::Array;

    // ---- matmul ------------------------------------------------------------
    m.def(
        "matmul",
        [](const py::object& a_obj, const py::object& b_obj, bool trans_a, bool trans_b, const py::object& bias_obj,
           const py::object& out_obj, bool accumulate) {
            const std::string fn = "matmul";
            Array a = Policy::f32(a_obj, fn, "a"), b = Policy::f32(b_obj, fn, "b");
            const Shape sa = Policy::shape(a), sb = Policy::shape(b);
            if (sa.size() < 2 || sa.size() > 3 || sb.size() != sa.size())
                value_error(fn, "a and b must both be 2-D or both 3-D (batched), got a " + shape_str(sa) + ", b " +
                                    shape_str(sb));
            const bool batched = sa.size() == 3;
            if (batched && sa[0] != sb[0])
                value_error(fn, "batch sizes differ: a is " + shape_str(sa) + ", b is " + shape_str(sb));
            const std::size_t r = sa.size() - 2;
            const index_t M = trans_a ? sa[r + 1] : sa[r], Ka = trans_a ? sa[r] : sa[r + 1];
            const index_t Kb = trans_b ? sb[r + 1] : sb[r], N = trans_b ? sb[r] : sb[r + 1];
            if (Ka != Kb)
                value_error(fn, "inner dimensions differ: a is " + shape_str(sa) + (trans_a ? " (transposed)" : "") +
                                    ", b is " + shape_str(sb) + (trans_b ? " (transposed)" : ""));
            nc::GemmArgs g;
            g.m = to_int(M, fn, "M");
            g.n = to_int(N, fn, "N");
            g.k = to_int(Ka, fn, "K");
            g.batch = batched ? to_int(sa[0], fn, "batch") : 1;
            g.trans_a = trans_a;
            g.trans_b = trans_b;
            g.accumulate = accumulate;
            g.stride_a = batched ? sa[1] * sa[2] : 0;
            g.stride_b = batched ? sb[1] * sb[2] : 0;
            g.stride_c = M * N;
            Shape sc = batched ? Shape{sa[0], M, N} : Shape{M, N};
            Array bias;
            if (!bias_obj.is_none()) {
                bias = Policy::f32(bias_obj, fn, "bias");
                if (Policy::shape(bias) != Shape{N})
                    value_error(fn, "bias is " + shape_str(Policy::shape(bias)) + "; expected (" + std::to_string(N) +
                                        ",) for a result " + shape_str(sc));
                g.bias = Policy::cdata(bias);
            }
            Array out;
            if (out_obj.is_none()) {
                if (accumulate) value_error(fn, "accumulate=True needs an out array");
                out = Policy::empty(sc);
            } else {
                out = Policy::f32(out_obj, fn, "out", /*writeable=*/true);
                if (Policy::shape(out) != sc)
                    value_error(fn, "out is " + shape_str(Policy::shape(out)) + "; expected " + shape_str(sc));
                if (Policy::overlaps(out, a) || Policy::overlaps(out, b))
                    value_error(fn, "out must not overlap a or b");
            }
            g.a = Policy::cdata(a);
            g.b = Policy::cdata(b);
            g.c = Policy::data(out);
            {
                py::gil_scoped_release nogil;
                nc::gemm(g);
                Policy::sync(fn);
            }
            return Policy::to_py(out);
        },
        py::arg("a"), py::arg("b"), py::arg("trans_a") = false, py::arg("trans_b") = false, py::kw_only(),
        py::arg("bias") = py::none(), py::arg("out") = py::none(), py::arg("accumulate") = false,
        "op(a) @ op(b) (+ bias) (+ out if accumulate), float32, 2-D or 3-D (batched).");

    // ---- softmax -----------------------------------------------------------
    m.def(
        "softmax_forward",
        [](const py::object& x_obj, double scale, const py::object& mask_obj, bool causal) {
            const std::string fn = "softmax_forward";
            Array x = Policy::f32(x_obj, fn, "x");
            const Shape sx = Policy::shape(x);
            if (sx.empty()) value_error(fn, "x must have at least one axis");
            if (causal && sx.size() < 2) value_error(fn, "causal needs x of shape (..., Tq, Tk)");
            if (!std::isfinite(scale)) value_error(fn, "scale must be finite");
            Array mask;
            nc::SoftmaxMask mk;
            if (!mask_obj.is_none()) {
                mask = Policy::f32(mask_obj, fn, "mask");
                mk = softmax_mask(sx, Policy::shape(mask), Policy::cdata(mask), fn);
            }
            const index_t n = sx.back(), rows = n ? numel(sx) / n : 0;
            const index_t tq = sx.size() >= 2 ? sx[sx.size() - 2] : 1;
            Array y = Policy::empty(sx);
            {
                py::gil_scoped_release nogil;
                nc::softmax_forward(Policy::cdata(x), Policy::data(y), rows, n, float(scale), mk, causal, tq);
                Policy::sync(fn);
            }
            return Policy::to_py(y);
        },
        py::arg("x"), py::kw_only(), py::arg("scale") = 1.0, py::arg("mask") = py::none(),
        py::arg("causal") = false, "softmax(scale * x + mask) over the last axis (float32).");

    m.def(
        "softmax_backward",
        [](const py::object& dy_obj, const py::object& y_obj, double scale) {
            const std::string fn = "softmax_backward";
            Array dy = Policy::f32(dy_obj, fn, "dy"), y = Policy::f32(y_obj, fn, "y");
            const Shape s = Policy::shape(y);
            if (Policy::shape(dy) != s)
                value_error(fn, "dy is " + shape_str(Policy::shape(dy)) + " but y is " + shape_str(s));
            if (s.empty()) value_error(fn, "y must have at least one axis");
            const index_t n = s.back(), rows = n ? numel(s) / n : 0;
            Array dx = Policy::empty(s);
            {
                py::gil_scoped_release nogil;
                nc::softmax_backward(Policy::cdata(dy), Policy::cdata(y), Policy::data(dx), rows, n, float(scale));
                Policy::sync(fn);
            }
            return Policy::to_py(dx);
        },
        py::arg("dy"), py::arg("y"), py::kw_only(), py::arg("scale") = 1.0,
        "scale * y * (dy - sum(dy * y, -1)): the gradient of softmax(scale * x + mask).");

    // ---- attention ---------------------------------------------------------
    struct Parsed {
        nc::AttentionArgs p;
        Array q, k, v;
        typename Policy::Bytes key_mask;
    };
    auto parse = [](const std::string& fn, const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                    bool causal, const py::object& key_mask, const py::object& scale) {
        Parsed r;
        r.q = Policy::f32(q_obj, fn, "q");
        r.k = Policy::f32(k_obj, fn, "k");
        r.v = Policy::f32(v_obj, fn, "v");
        const Shape sq = Policy::shape(r.q), sk = Policy::shape(r.k), sv = Policy::shape(r.v);
        if (sq.size() != 4 || sk.size() != 4 || sv.size() != 4)
            value_error(fn, "q, k, v must be 4-D (B, H, T, D), got q " + shape_str(sq) + ", k " + shape_str(sk) +
                                ", v " + shape_str(sv));
        if (sk != sv) value_error(fn, "k " + shape_str(sk) + " and v " + shape_str(sv) + " differ");
        if (sq[0] != sk[0] || sq[1] != sk[1] || sq[3] != sk[3])
            value_error(fn, "q " + shape_str(sq) + " and k " + shape_str(sk) + " must agree in B, H and D");
        if (sq[3] < 1 || sq[3] > nc::kAttentionMaxDim)
            value_error(fn, "head dimension D = " + std::to_string(sq[3]) + " is outside 1..128");
        r.p.batch = to_int(sq[0], fn, "B");
        r.p.heads = to_int(sq[1], fn, "H");
        r.p.tq = to_int(sq[2], fn, "Tq");
        r.p.tk = to_int(sk[2], fn, "Tk");
        r.p.dim = int(sq[3]);
        if (index_t(r.p.batch) * r.p.heads > 65535) value_error(fn, "B*H > 65535");
        r.p.causal = causal;
        if (scale.is_none()) {
            r.p.scale = float(1.0 / std::sqrt(double(r.p.dim)));
        } else {
            const double s = scale.cast<double>();
            if (!std::isfinite(s)) value_error(fn, "scale must be finite");
            r.p.scale = float(s);
        }
        if (!key_mask.is_none()) {
            r.key_mask = Policy::bytes(key_mask, fn, Shape{sq[0], sk[2]});
            r.p.key_mask = r.key_mask.data;
        }
        r.p.q = Policy::cdata(r.q);
        r.p.k = Policy::cdata(r.k);
        r.p.v = Policy::cdata(r.v);
        return r;
    };

    m.def(
        "attention_forward",
        [parse](const py::object& q, const py::object& k, const py::object& v, bool causal, const py::object& key_mask,
                const py::object& scale) {
            const std::string fn = "attention_forward";
            Parsed r = parse(fn, q, k, v, causal, key_mask, scale);
            Shape sq = Policy::shape(r.q);
            Array out = Policy::empty(sq), lse = Policy::empty(Shape{sq[0], sq[1], sq[2]});
            {
                py::gil_scoped_release nogil;
                nc::attention_forward(r.p, Policy::data(out), Policy::data(lse));
                Policy::sync(fn);
            }
            return py::make_tuple(Policy::to_py(out), Policy::to_py(lse));
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::kw_only(), py::arg("causal") = false,
        py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
        R"doc(Flash attention forward: returns (out, lse).

q: (B, H, Tq, D), k, v: (B, H, Tk, D) float32, 1 <= D <= 128. causal: query i
sees key j iff j <= i + Tk - Tq. key_mask: (B, Tk) bool, False hides a key.
scale defaults to 1/sqrt(D). A query that sees no key gets out = 0 and
lse = -inf.)doc");

    m.def(
        "attention_forward_cached",
        [parse](const py::object& q, const py::object& k_cache, const py::object& v_cache, index_t length, bool causal,
                const py::object& scale) {
            const std::string fn = "attention_forward_cached";
            Parsed r = parse(fn, q, k_cache, v_cache, causal, py::none(), scale);
            const Shape sq = Policy::shape(r.q), sk = Policy::shape(r.k);
            if (length < 1 || length > sk[2])
                value_error(fn, "length = " + std::to_string(length) + " is outside 1.." + std::to_string(sk[2]) +
                                    " (the cache's positions)");
            r.p.tk = int(length);
            r.p.kv_head_stride = sk[2] * sk[3];
            Array out = Policy::empty(sq), lse = Policy::empty(Shape{sq[0], sq[1], sq[2]});
            {
                py::gil_scoped_release nogil;
                nc::attention_forward(r.p, Policy::data(out), Policy::data(lse));
                Policy::sync(fn);
            }
            return py::make_tuple(Policy::to_py(out), Policy::to_py(lse));
        },
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("length"), py::kw_only(),
        py::arg("causal") = true, py::arg("scale") = py::none(),
        R"doc(Attention forward over the first `length` positions of a KV cache: (out, lse).

q: (B, H, Tq, D); k_cache, v_cache: (B, H, Tmax, D), read in place (no
copy of the prefix). causal: query i sees key j iff j <= i + length - Tq.)doc");

    m.def(
        "attention_backward",
        [parse](const py::object& dout_obj, const py::object& q, const py::object& k, const py::object& v,
                const py::object& out_obj, const py::object& lse_obj, bool causal, const py::object& key_mask,
                const py::object& scale) {
            const std::string fn = "attention_backward";
            Parsed r = parse(fn, q, k, v, causal, key_mask, scale);
            Array dout = Policy::f32(dout_obj, fn, "dout"), out = Policy::f32(out_obj, fn, "out"),
                  lse = Policy::f32(lse_obj, fn, "lse");
            const Shape sq = Policy::shape(r.q), sk = Policy::shape(r.k);
            if (Policy::shape(dout) != sq) value_error(fn, "dout is " + shape_str(Policy::shape(dout)) + "; expected " + shape_str(sq));
            if (Policy::shape(out) != sq) value_error(fn, "out is " + shape_str(Policy::shape(out)) + "; expected " + shape_str(sq));
            const Shape sl{sq[0], sq[1], sq[2]};
            if (Policy::shape(lse) != sl) value_error(fn, "lse is " + shape_str(Policy::shape(lse)) + "; expected " + shape_str(sl));
            Array dq = Policy::empty(sq), dk = Policy::empty(sk), dv = Policy::empty(sk), scratch = Policy::empty(sl);
            {
                py::gil_scoped_release nogil;
                nc::attention_backward(r.p, Policy::cdata(out), Policy::cdata(dout), Policy::cdata(lse),
                                       Policy::data(dq), Policy::data(dk), Policy::data(dv), Policy::data(scratch));
                Policy::sync(fn);
            }
            return py::make_tuple(Policy::to_py(dq), Policy::to_py(dk), Policy::to_py(dv));
        },
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::kw_only(),
        py::arg("causal") = false, py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
        "Flash attention backward: returns (dq, dk, dv).");

    // ---- the other layers of a GPT-2 forward (layers.cu) ---------------------
    m.def(
        "embedding_forward",
        [](const py::object& ids_obj, const py::object& wte_obj, const py::object& wpe_obj, index_t pos0) {
            const std::string fn = "embedding_forward";
            Array wte = Policy::f32(wte_obj, fn, "wte"), wpe = Policy::f32(wpe_obj, fn, "wpe");
            const Shape se = Policy::shape(wte), sp = Policy::shape(wpe);
            if (se.size() != 2 || sp.size() != 2 || se[1] != sp[1])
                value_error(fn, "wte (V, C) and wpe (P, C) must be 2-D with equal C, got wte " + shape_str(se) +
                                    ", wpe " + shape_str(sp));
            const py::array_t<std::int32_t> host_ids = checked_ids(ids_obj, fn, se[0]);
            const index_t B = host_ids.shape(0), T = host_ids.shape(1);
            // Not `pos0 + T > P`: the sum wraps for a huge pos0 and the check would pass.
            if (!range_fits(pos0, T, sp[0]))
                value_error(fn, positions_str(pos0, T) + " are outside the " + std::to_string(sp[0]) + " rows of wpe");
            to_int(pos0 + T, fn, "pos0 + T");  // the kernel forms pos0 + t in int; pos0 + T <= P cannot wrap
            const int t32 = to_int(T, fn, "T"), c32 = to_int(se[1], fn, "C"), p32 = int(pos0);
            auto ids = Policy::ids(host_ids);
            Array x = Policy::empty(Shape{B * T, se[1]});
            {
                py::gil_scoped_release nogil;
                nc::embedding_forward(ids.data, Policy::cdata(wte), Policy::cdata(wpe), Policy::data(x), B * T, t32,
                                      c32, p32);
                Policy::sync(fn);
            }
            return Policy::to_py(x);
        },
        py::arg("ids"), py::arg("wte"), py::arg("wpe"), py::arg("pos0") = 0,
        "ids (B, T) host integers -> x (B*T, C) = wte[ids] + wpe[pos0 + t].");

    m.def(
        "layernorm_forward",
        [](const py::object& x_obj, const py::object& g_obj, const py::object& b_obj, double eps) {
            const std::string fn = "layernorm_forward";
            Array x = Policy::f32(x_obj, fn, "x"), g = Policy::f32(g_obj, fn, "gamma"), b = Policy::f32(b_obj, fn, "beta");
            const Shape sx = Policy::shape(x);
            if (sx.empty()) value_error(fn, "x must have at least one axis");
            const Shape sc{sx.back()};
            if (Policy::shape(g) != sc || Policy::shape(b) != sc)
                value_error(fn, "gamma " + shape_str(Policy::shape(g)) + " and beta " + shape_str(Policy::shape(b)) +
                                    " must be " + shape_str(sc) + " for x " + shape_str(sx));
            if (!(eps > 0.0) || !std::isfinite(eps)) value_error(fn, "eps must be a positive finite number");
            const index_t C = sx.back(), rows = C ? numel(sx) / C : 0;
            const int c32 = to_int(C, fn, "C");
            Array y = Policy::empty(sx);
            {
                py::gil_scoped_release nogil;
                nc::layernorm_forward(Policy::cdata(x), Policy::cdata(g), Policy::cdata(b), Policy::data(y), rows,
                                      c32, float(eps));
                Policy::sync(fn);
            }
            return Policy::to_py(y);
        },
        py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("eps") = 1e-5,
        "LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * gamma + beta.");

    m.def(
        "gelu_tanh_forward",
        [](const py::object& x_obj) {
            const std::string fn = "gelu_tanh_forward";
            Array x = Policy::f32(x_obj, fn, "x");
            const Shape sx = Policy::shape(x);
            Array y = Policy::empty(sx);
            {
                py::gil_scoped_release nogil;
                nc::gelu_tanh_forward(Policy::cdata(x), Policy::data(y), numel(sx));
                Policy::sync(fn);
            }
            return Policy::to_py(y);
        },
        py::arg("x"), "GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).");

    m.def(
        "split_heads",
        [](const py::object& qkv_obj, index_t batch, index_t heads) {
            const std::string fn = "split_heads";
            Array qkv = Policy::f32(qkv_obj, fn, "qkv");
            const Shape s = Policy::shape(qkv);
            if (s.size() != 2) value_error(fn, "qkv must be 2-D (B*T, 3C), got " + shape_str(s));
            if (batch < 1 || s[0] % batch != 0)
                value_error(fn, "batch = " + std::to_string(batch) + " does not divide the " + std::to_string(s[0]) +
                                    " rows of qkv");
            // Not `s[1] % (3 * heads)`: 3 * heads wraps for a huge heads.
            if (heads < 1 || s[1] % 3 != 0 || (s[1] / 3) % heads != 0)
                value_error(fn, "qkv has " + std::to_string(s[1]) + " columns; expected 3 * heads * D with heads = " +
                                    std::to_string(heads));
            to_int(s[1], fn, "3C");
            const index_t T = s[0] / batch, D = s[1] / 3 / heads;
            const int b32 = to_int(batch, fn, "B"), t32 = to_int(T, fn, "T"), h32 = to_int(heads, fn, "H");
            const Shape sh{batch, heads, T, D};
            Array q = Policy::empty(sh), k = Policy::empty(sh), v = Policy::empty(sh);
            {
                py::gil_scoped_release nogil;
                nc::split_heads(Policy::cdata(qkv), Policy::data(q), Policy::data(k), Policy::data(v), b32, t32, h32,
                                int(D));
                Policy::sync(fn);
            }
            return py::make_tuple(Policy::to_py(q), Policy::to_py(k), Policy::to_py(v));
        },
        py::arg("qkv"), py::arg("batch"), py::arg("heads"),
        "qkv (B*T, 3*H*D) -> q, k, v (B, H, T, D).");

    m.def(
        "split_heads_to_cache",
        [](const py::object& qkv_obj, index_t batch, const py::object& k_obj, const py::object& v_obj, index_t pos0) {
            const std::string fn = "split_heads_to_cache";
            Array qkv = Policy::f32(qkv_obj, fn, "qkv");
            Array kc = Policy::f32(k_obj, fn, "k_cache", true), vc = Policy::f32(v_obj, fn, "v_cache", true);
            const Shape s = Policy::shape(qkv), sc = Policy::shape(kc);
            if (s.size() != 2) value_error(fn, "qkv must be 2-D (B*T, 3C), got " + shape_str(s));
            if (sc.size() != 4 || Policy::shape(vc) != sc)
                value_error(fn, "k_cache and v_cache must be equal 4-D (B, H, Tmax, D), got " + shape_str(sc) + " and " +
                                    shape_str(Policy::shape(vc)));
            if (Policy::overlaps(kc, vc) || Policy::overlaps(kc, qkv) || Policy::overlaps(vc, qkv))
                value_error(fn, "k_cache, v_cache and qkv must not overlap");
            const index_t H = sc[1], D = sc[3];
            if (batch != sc[0] || batch < 1 || s[0] % batch != 0 || s[1] != checked_mul(3, checked_mul(H, D, fn), fn))
                value_error(fn, "qkv " + shape_str(s) + " does not fit caches " + shape_str(sc) + " with batch = " +
                                    std::to_string(batch) + " (expected (batch*T, 3*H*D))");
            const index_t T = s[0] / batch;
            // Not `pos0 + T > Tmax`: the sum wraps for a huge pos0 and the check would pass.
            if (!range_fits(pos0, T, sc[2]))
                value_error(fn, positions_str(pos0, T) + " are outside the cache's " + std::to_string(sc[2]));
            to_int(s[1], fn, "3C");
            const int b32 = to_int(batch, fn, "B"), t32 = to_int(T, fn, "T"), h32 = to_int(H, fn, "H"),
                      d32 = to_int(D, fn, "D"), tmax32 = to_int(sc[2], fn, "Tmax");
            Array q = Policy::empty(Shape{batch, H, T, D});
            {
                py::gil_scoped_release nogil;
                nc::split_heads_to_cache(Policy::cdata(qkv), Policy::data(q), Policy::data(kc), Policy::data(vc), b32,
                                         t32, h32, d32, tmax32, int(pos0));  // 0 <= pos0 <= Tmax - T: an int
                Policy::sync(fn);
            }
            return Policy::to_py(q);
        },
        py::arg("qkv"), py::arg("batch"), py::arg("k_cache"), py::arg("v_cache"), py::arg("pos0"),
        "qkv (B*T, 3*H*D) -> q (B, H, T, D); k and v are written into the caches (B, H, Tmax, D) at pos0.");

    m.def(
        "merge_heads",
        [](const py::object& o_obj) {
            const std::string fn = "merge_heads";
            Array o = Policy::f32(o_obj, fn, "o");
            const Shape s = Policy::shape(o);
            if (s.size() != 4) value_error(fn, "o must be 4-D (B, H, T, D), got " + shape_str(s));
            to_int(checked_mul(s[1], s[3], fn), fn, "C");
            const int b32 = to_int(s[0], fn, "B"), t32 = to_int(s[2], fn, "T"), h32 = to_int(s[1], fn, "H"),
                      d32 = to_int(s[3], fn, "D");
            Array y = Policy::empty(Shape{checked_mul(s[0], s[2], fn), s[1] * s[3]});
            {
                py::gil_scoped_release nogil;
                nc::merge_heads(Policy::cdata(o), Policy::data(y), b32, t32, h32, d32);
                Policy::sync(fn);
            }
            return Policy::to_py(y);
        },
        py::arg("o"), "o (B, H, T, D) -> (B*T, H*D).");
}

}  // namespace numformer::bindings::cudaops
