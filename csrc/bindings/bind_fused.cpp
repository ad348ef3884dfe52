// bind_fused.cpp — Python face of the fused kernels (cpu/fused.h).
//
// float32 only: the float64 paths stay on the NumPy references. Every
// argument is checked while holding the GIL (type, dtype, shape, layout,
// writability, overlap, id / target range) and a TypeError/ValueError names
// what is wrong; only then is the GIL released and the kernel called.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "bindings/checks.h"
#include "bindings/output_cache.h"
#include "cpu/fused.h"

namespace py = pybind11;
namespace nc = numformer::cpu;
using nc::index_t;

namespace {

using namespace numformer::bindings;

// A C-contiguous, aligned float32 array (TypeError for another dtype).
py::array f32(const py::object& obj, const char* fn, const char* name, bool writeable = false) {
    py::array a = require_array(obj, fn, name);
    if (!py::isinstance<py::array_t<float>>(a)) {
        throw py::type_error(std::string(fn) + ": " + name + " has dtype " + dtype_str(a) +
                             "; expected float32 (float64 runs on the NumPy reference)");
    }
    require_layout(a, fn, name, writeable);
    return a;
}

// A C-contiguous int64 array.
py::array i64(const py::object& obj, const char* fn, const char* name) {
    py::array a = require_array(obj, fn, name);
    if (!py::isinstance<py::array_t<std::int64_t>>(a)) {
        throw py::type_error(std::string(fn) + ": " + name + " has dtype " + dtype_str(a) +
                             "; expected int64");
    }
    require_layout(a, fn, name);
    return a;
}

bool same_shape(const py::array& a, const py::array& b) {
    if (a.ndim() != b.ndim()) return false;
    for (py::ssize_t i = 0; i < a.ndim(); ++i)
        if (a.shape(i) != b.shape(i)) return false;
    return true;
}

void require_same_shape(const py::array& a, const py::array& b, const char* fn, const char* an,
                        const char* bn) {
    if (!same_shape(a, b)) {
        throw py::value_error(std::string(fn) + ": shapes differ: " + an + " is " + shape_str(a) +
                              ", " + bn + " is " + shape_str(b));
    }
}

void require_vector(const py::array& a, index_t n, const char* fn, const char* name) {
    if (a.ndim() != 1 || a.shape(0) != n) {
        throw py::value_error(std::string(fn) + ": " + name + " must have shape (" +
                              std::to_string(n) + ",), got " + shape_str(a));
    }
}

std::vector<py::ssize_t> shape_of(const py::array& a) {
    return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

const float* cf(const py::array& a) { return static_cast<const float*>(a.data()); }
float* mf(py::array& a) { return static_cast<float*>(a.mutable_data()); }
const std::int64_t* ci(const py::array& a) { return static_cast<const std::int64_t*>(a.data()); }

// ---------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------

py::tuple layernorm_forward(const py::object& x_o, const py::object& g_o, const py::object& b_o,
                            double eps) {
    const char* fn = "layernorm_forward";
    py::array x = f32(x_o, fn, "x"), gamma = f32(g_o, fn, "gamma"), beta = f32(b_o, fn, "beta");
    if (x.ndim() < 1) throw py::value_error(std::string(fn) + ": x must have at least 1 dimension");
    const index_t C = x.shape(x.ndim() - 1);
    require_vector(gamma, C, fn, "gamma");
    require_vector(beta, C, fn, "beta");
    const index_t rows = C == 0 ? 0 : x.size() / C;
    py::array_t<float> out = new_output<float>(shape_of(x));
    std::vector<py::ssize_t> stat_shape(x.shape(), x.shape() + x.ndim() - 1);
    py::array_t<float> mean(stat_shape), rstd(stat_shape);
    {
        const float *xp = cf(x), *gp = cf(gamma), *bp = cf(beta);
        float *op = out.mutable_data(), *mp = mean.mutable_data(), *rp = rstd.mutable_data();
        py::gil_scoped_release release;
        nc::layernorm_forward(xp, gp, bp, op, mp, rp, rows, C, float(eps));
    }
    return py::make_tuple(out, mean, rstd);
}

py::tuple layernorm_backward(const py::object& d_o, const py::object& x_o, const py::object& m_o,
                             const py::object& r_o, const py::object& g_o) {
    const char* fn = "layernorm_backward";
    py::array dout = f32(d_o, fn, "dout"), x = f32(x_o, fn, "x"), mean = f32(m_o, fn, "mean"),
              rstd = f32(r_o, fn, "rstd"), gamma = f32(g_o, fn, "gamma");
    require_same_shape(dout, x, fn, "dout", "x");
    if (x.ndim() < 1) throw py::value_error(std::string(fn) + ": x must have at least 1 dimension");
    const index_t C = x.shape(x.ndim() - 1);
    const index_t rows = C == 0 ? 0 : x.size() / C;
    require_vector(gamma, C, fn, "gamma");
    if (mean.size() != rows || rstd.size() != rows) {
        throw py::value_error(std::string(fn) + ": mean and rstd need one value per row (" +
                              std::to_string(rows) + "), got " + shape_str(mean) + " and " +
                              shape_str(rstd));
    }
    py::array_t<float> dx = new_output<float>(shape_of(x)), dgamma(C), dbeta(C);
    {
        const float *dp = cf(dout), *xp = cf(x), *mp = cf(mean), *rp = cf(rstd), *gp = cf(gamma);
        float *dxp = dx.mutable_data(), *dgp = dgamma.mutable_data(), *dbp = dbeta.mutable_data();
        py::gil_scoped_release release;
        nc::layernorm_backward(dp, xp, mp, rp, gp, dxp, dgp, dbp, rows, C);
    }
    return py::make_tuple(dx, dgamma, dbeta);
}

// ---------------------------------------------------------------------------
// GELU (tanh form)
// ---------------------------------------------------------------------------

py::array gelu_forward(const py::object& x_o) {
    py::array x = f32(x_o, "gelu_tanh_forward", "x");
    py::array_t<float> out = new_output<float>(shape_of(x));
    const float* xp = cf(x);
    float* op = out.mutable_data();
    const index_t n = x.size();
    py::gil_scoped_release release;
    nc::gelu_tanh_forward(xp, op, n);
    return std::move(out);
}

py::array gelu_backward(const py::object& d_o, const py::object& x_o) {
    const char* fn = "gelu_tanh_backward";
    py::array dout = f32(d_o, fn, "dout"), x = f32(x_o, fn, "x");
    require_same_shape(dout, x, fn, "dout", "x");
    py::array_t<float> dx = new_output<float>(shape_of(x));
    const float *dp = cf(dout), *xp = cf(x);
    float* gp = dx.mutable_data();
    const index_t n = x.size();
    py::gil_scoped_release release;
    nc::gelu_tanh_backward(dp, xp, gp, n);
    return std::move(dx);
}

// ---------------------------------------------------------------------------
// cross-entropy
// ---------------------------------------------------------------------------

// logits (N, V) and targets (N,); every target is ignore_index or in [0, V).
void check_xent(const py::array& z, const py::array& y, std::int64_t ignore, const char* fn) {
    if (z.ndim() != 2) throw py::value_error(std::string(fn) + ": logits must be 2-D (N, V), got " + shape_str(z));
    if (z.shape(1) < 1) throw py::value_error(std::string(fn) + ": logits need V >= 1 classes, got " + shape_str(z));
    if (y.ndim() != 1 || y.shape(0) != z.shape(0)) {
        throw py::value_error(std::string(fn) + ": targets must have shape (" +
                              std::to_string(z.shape(0)) + ",) for logits " + shape_str(z) +
                              ", got " + shape_str(y));
    }
    const std::int64_t V = z.shape(1);
    const std::int64_t* yp = ci(y);
    for (py::ssize_t n = 0; n < y.shape(0); ++n) {
        if (yp[n] != ignore && (yp[n] < 0 || yp[n] >= V)) {
            throw py::value_error(std::string(fn) + ": target " + std::to_string(yp[n]) +
                                  " at position " + std::to_string(n) + " is outside [0, " +
                                  std::to_string(V) + ") and is not ignore_index (" +
                                  std::to_string(ignore) + ")");
        }
    }
}

py::tuple xent_forward(const py::object& z_o, const py::object& y_o, std::int64_t ignore) {
    const char* fn = "cross_entropy_forward";
    py::array z = f32(z_o, fn, "logits");
    py::array y = i64(y_o, fn, "targets");
    check_xent(z, y, ignore, fn);
    const index_t N = z.shape(0), V = z.shape(1);
    py::array_t<float> lse(N);
    double total;
    {
        const float* zp = cf(z);
        const std::int64_t* yp = ci(y);
        float* lp = lse.mutable_data();
        py::gil_scoped_release release;
        total = nc::cross_entropy_forward(zp, yp, lp, N, V, ignore);
    }
    return py::make_tuple(total, lse);
}

py::array xent_backward(const py::object& z_o, const py::object& y_o, const py::object& l_o,
                        double scale, std::int64_t ignore, const py::object& out_o) {
    const char* fn = "cross_entropy_backward";
    py::array z = f32(z_o, fn, "logits");
    py::array y = i64(y_o, fn, "targets");
    check_xent(z, y, ignore, fn);
    py::array lse = f32(l_o, fn, "lse");
    const index_t N = z.shape(0), V = z.shape(1);
    require_vector(lse, N, fn, "lse");
    py::array dz;
    if (out_o.is_none()) {
        dz = py::array_t<float>(shape_of(z));
    } else {
        // out may be the logits themselves (in-place: each element is read
        // before it is written, by the same thread); any other overlap is refused.
        dz = f32(out_o, fn, "out", /*writeable=*/true);
        require_same_shape(dz, z, fn, "out", "logits");
        if (dz.data() != z.data() && overlaps(dz, z))
            throw py::value_error(std::string(fn) + ": out partially overlaps logits");
        if (overlaps(dz, lse) || overlaps(dz, y))
            throw py::value_error(std::string(fn) + ": out must not share memory with lse or targets");
    }
    {
        const float *zp = cf(z), *lp = cf(lse);
        const std::int64_t* yp = ci(y);
        float* dp = mf(dz);
        py::gil_scoped_release release;
        nc::cross_entropy_backward(zp, yp, lp, dp, N, V, ignore, float(scale));
    }
    return dz;
}

// ---------------------------------------------------------------------------
// embedding backward
// ---------------------------------------------------------------------------

void embedding_backward(const py::object& d_o, const py::object& ids_o, const py::object& wte_o,
                        const py::object& wpe_o, index_t pos0) {
    const char* fn = "embedding_backward";
    py::array dout = f32(d_o, fn, "dout");
    py::array ids = i64(ids_o, fn, "ids");
    py::array dwte = f32(wte_o, fn, "dwte", /*writeable=*/true);
    if (ids.ndim() != 2) throw py::value_error(std::string(fn) + ": ids must be 2-D (B, T), got " + shape_str(ids));
    if (dwte.ndim() != 2) throw py::value_error(std::string(fn) + ": dwte must be 2-D (V, C), got " + shape_str(dwte));
    const index_t B = ids.shape(0), T = ids.shape(1), V = dwte.shape(0), C = dwte.shape(1);
    if (dout.ndim() != 3 || dout.shape(0) != B || dout.shape(1) != T || dout.shape(2) != C) {
        throw py::value_error(std::string(fn) + ": dout must have shape (" + std::to_string(B) +
                              ", " + std::to_string(T) + ", " + std::to_string(C) +
                              ") for ids " + shape_str(ids) + " and dwte " + shape_str(dwte) +
                              ", got " + shape_str(dout));
    }
    const std::int64_t* ip = ci(ids);
    for (index_t n = 0; n < ids.size(); ++n) {
        if (ip[n] < 0 || ip[n] >= V) {
            throw py::value_error(std::string(fn) + ": id " + std::to_string(ip[n]) +
                                  " at position " + std::to_string(n) + " is outside [0, " +
                                  std::to_string(V) + ")");
        }
    }
    if (overlaps(dwte, dout) || overlaps(dwte, ids))
        throw py::value_error(std::string(fn) + ": dwte must not share memory with dout or ids");
    float* wpe_p = nullptr;
    py::array dwpe;
    if (!wpe_o.is_none()) {
        dwpe = f32(wpe_o, fn, "dwpe", /*writeable=*/true);
        if (dwpe.ndim() != 2 || dwpe.shape(1) != C)
            throw py::value_error(std::string(fn) + ": dwpe must be 2-D (P, " + std::to_string(C) + "), got " + shape_str(dwpe));
        // Not `pos0 + T > P`: that sum wraps for a huge pos0 and the check would pass.
        require_range(pos0, T, dwpe.shape(0), fn, "pos0", "dwpe " + shape_str(dwpe));
        if (overlaps(dwpe, dwte) || overlaps(dwpe, dout) || overlaps(dwpe, ids))
            throw py::value_error(std::string(fn) + ": dwpe must not share memory with dwte, dout or ids");
        wpe_p = mf(dwpe);
    }
    const float* dp = cf(dout);
    float* wp = mf(dwte);
    py::gil_scoped_release release;
    nc::embedding_backward(dp, ip, wp, wpe_p, B, T, C, V, pos0);
}

// ---------------------------------------------------------------------------
// optimizers
// ---------------------------------------------------------------------------

// p (writable), g and the optional state buffers: all float32 (n,) and disjoint.
void check_flat(const std::vector<std::pair<const char*, py::array>>& arrays, const char* fn) {
    const py::array& p = arrays[0].second;
    if (p.ndim() != 1) throw py::value_error(std::string(fn) + ": params must be 1-D, got " + shape_str(p));
    for (size_t i = 1; i < arrays.size(); ++i) {
        require_vector(arrays[i].second, p.shape(0), fn, arrays[i].first);
        for (size_t j = 0; j < i; ++j)
            if (overlaps(arrays[i].second, arrays[j].second))
                throw py::value_error(std::string(fn) + ": " + arrays[i].first + " and " +
                                      arrays[j].first + " share memory");
    }
}

void adamw_step(const py::object& p_o, const py::object& g_o, const py::object& m_o,
                const py::object& v_o, const py::object& mask_o, double lr, double beta1,
                double beta2, double eps, double weight_decay, std::int64_t step) {
    const char* fn = "adamw_step";
    if (step < 1) throw py::value_error(std::string(fn) + ": step must be >= 1, got " + std::to_string(step));
    py::array p = f32(p_o, fn, "params", true), g = f32(g_o, fn, "grads"),
              m = f32(m_o, fn, "m", true), v = f32(v_o, fn, "v", true);
    std::vector<std::pair<const char*, py::array>> arrays = {{"params", p}, {"grads", g}, {"m", m}, {"v", v}};
    const float* maskp = nullptr;
    if (!mask_o.is_none()) {
        arrays.emplace_back("decay_mask", f32(mask_o, fn, "decay_mask"));
        maskp = cf(arrays.back().second);
    }
    check_flat(arrays, fn);
    // Scalars as optim.AdamW forms them: in double, then rounded to float32.
    nc::AdamWScalars s;
    s.decay_on = weight_decay != 0.0 && lr != 0.0;
    s.decay = float(lr * weight_decay);
    s.keep = float(1.0 - lr * weight_decay);
    s.one_m_b1 = float(1.0 - beta1);
    s.b2 = float(beta2);
    s.one_m_b2 = float(1.0 - beta2);
    s.bc2_sqrt = float(std::sqrt(1.0 - std::pow(beta2, double(step))));
    s.eps = float(eps);
    s.neg_step = float(-lr / (1.0 - std::pow(beta1, double(step))));
    float *pp = mf(p), *mp = mf(m), *vp = mf(v);
    const float* gp = cf(g);
    const index_t n = p.shape(0);
    py::gil_scoped_release release;
    nc::adamw_step(pp, gp, mp, vp, maskp, n, s);
}

void sgd_step(const py::object& p_o, const py::object& g_o, const py::object& buf_o,
              const py::object& mask_o, double lr, double momentum, bool nesterov,
              double weight_decay) {
    const char* fn = "sgd_step";
    py::array p = f32(p_o, fn, "params", true), g = f32(g_o, fn, "grads");
    std::vector<std::pair<const char*, py::array>> arrays = {{"params", p}, {"grads", g}};
    float* bufp = nullptr;
    const float* maskp = nullptr;
    if (!buf_o.is_none()) {
        arrays.emplace_back("momentum_buffer", f32(buf_o, fn, "momentum_buffer", true));
        bufp = mf(arrays.back().second);
    }
    if (!mask_o.is_none()) {
        arrays.emplace_back("decay_mask", f32(mask_o, fn, "decay_mask"));
        maskp = cf(arrays.back().second);
    }
    check_flat(arrays, fn);
    if (nesterov && bufp == nullptr)
        throw py::value_error(std::string(fn) + ": nesterov needs a momentum_buffer");
    nc::SgdScalars s;
    s.wd = float(weight_decay);
    s.momentum = float(momentum);
    s.nesterov = nesterov;
    s.neg_lr = float(-lr);
    s.neg_lr_mu = float(-lr * momentum);
    float* pp = mf(p);
    const float* gp = cf(g);
    const index_t n = p.shape(0);
    py::gil_scoped_release release;
    nc::sgd_step(pp, gp, bufp, maskp, n, s);
}

}  // namespace

void register_fused(py::module_& m) {
    m.def("layernorm_forward", &layernorm_forward, py::arg("x"), py::arg("gamma"), py::arg("beta"),
          py::arg("eps") = 1e-5,
          "LayerNorm over the last axis (float32). Returns (out, mean, rstd); mean and rstd\n"
          "have x's shape without its last axis.");
    m.def("layernorm_backward", &layernorm_backward, py::arg("dout"), py::arg("x"), py::arg("mean"),
          py::arg("rstd"), py::arg("gamma"),
          "Backward of layernorm_forward: returns (dx, dgamma, dbeta); x̂ is recomputed from\n"
          "x, mean and rstd.");
    m.def("gelu_tanh_forward", &gelu_forward, py::arg("x"),
          "GELU, tanh form: 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))), float32, any shape.");
    m.def("gelu_tanh_backward", &gelu_backward, py::arg("dout"), py::arg("x"),
          "dout · gelu'(x) (tanh form), recomputed from the forward's input x.");
    m.def("cross_entropy_forward", &xent_forward, py::arg("logits"), py::arg("targets"),
          py::arg("ignore_index") = -100,
          "logits (N, V) float32, targets (N,) int64 -> (sum over counted rows of\n"
          "lse − logit[target] as a float, lse (N,) float32). Targets equal to ignore_index\n"
          "add nothing; any other target outside [0, V) raises ValueError.");
    m.def("cross_entropy_backward", &xent_backward, py::arg("logits"), py::arg("targets"),
          py::arg("lse"), py::arg("scale"), py::arg("ignore_index") = -100, py::kw_only(),
          py::arg("out") = py::none(),
          "(softmax(logits) − onehot(targets)) · scale, rows with target == ignore_index\n"
          "zero; softmax from the forward's lse. out= may be logits itself (in place).");
    m.def("embedding_backward", &embedding_backward, py::arg("dout"), py::arg("ids"),
          py::arg("dwte"), py::arg("dwpe") = py::none(), py::arg("pos0") = 0,
          "In place: dwte[ids[b,t]] += dout[b,t] (repeated ids accumulate, deterministic)\n"
          "and, if dwpe is given, dwpe[pos0+t] += Σ_b dout[b,t].");
    m.def("adamw_step", &adamw_step, py::arg("params"), py::arg("grads"), py::arg("m"), py::arg("v"),
          py::arg("decay_mask"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
          py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
          "One AdamW update in place on flat float32 buffers (step counts from 1);\n"
          "bitwise equal to numformer.optim.AdamW's NumPy update.");
    m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffer"),
          py::arg("decay_mask"), py::kw_only(), py::arg("lr"), py::arg("momentum"),
          py::arg("nesterov"), py::arg("weight_decay"),
          "One SGD update in place on flat float32 buffers; bitwise equal to optim.SGD.");
}
