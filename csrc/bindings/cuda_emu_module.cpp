// numformer._cuda_emu — the CUDA kernels of csrc/cuda/ executed by the CPU
// emulator (csrc/cuda/emu/), on NumPy arrays. For tests: slow (one OS thread
// per CUDA thread), but it runs the very kernel source that nvcc compiles.
#include <cstring>

#include "bindings/cuda_ops.h"
#include "cuda/common.cuh"

namespace py = pybind11;
namespace ops = numformer::bindings::cudaops;
using ops::Shape;

namespace {

struct EmuPolicy {
    using Array = py::array;
    struct Bytes {
        py::array hold;
        const std::uint8_t* data = nullptr;
    };

    static Array f32(const py::object& obj, const std::string& fn, const char* name, bool writeable = false) {
        if (!py::isinstance<py::array>(obj))
            throw py::type_error(fn + ": " + name + " must be a numpy.ndarray, got " +
                                 py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
        py::array a = py::reinterpret_borrow<py::array>(obj);
        if (!py::isinstance<py::array_t<float>>(a))
            throw py::type_error(fn + ": " + name + " has dtype " + py::str(a.dtype()).cast<std::string>() +
                                 "; expected float32");
        const bool contiguous = (a.flags() & py::array::c_style) != 0;
        if (!contiguous || reinterpret_cast<std::uintptr_t>(a.data()) % alignof(float) != 0)
            throw py::value_error(fn + ": " + name + " must be C-contiguous and aligned");
        if (writeable && !a.writeable()) throw py::value_error(fn + ": " + name + " is read-only");
        return a;
    }
    static Shape shape(const Array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }
    static const float* cdata(const Array& a) { return a ? static_cast<const float*>(a.data()) : nullptr; }
    static float* data(Array& a) { return static_cast<float*>(a.mutable_data()); }
    static Array empty(const Shape& s) {
        // Filled with NaN so that an element the kernel forgets to write shows up.
        py::array_t<float> a(std::vector<py::ssize_t>(s.begin(), s.end()));
        float* p = a.mutable_data();
        for (py::ssize_t i = 0; i < a.size(); ++i) p[i] = std::nanf("");
        return std::move(a);
    }
    static bool overlaps(const Array& a, const Array& b) {
        const char* a0 = static_cast<const char*>(a.data());
        const char* b0 = static_cast<const char*>(b.data());
        return a.nbytes() && b.nbytes() && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
    }
    static Bytes bytes(const py::object& obj, const std::string& fn, const Shape& expect) {
        if (!py::isinstance<py::array>(obj))
            throw py::type_error(fn + ": key_mask must be a numpy.ndarray of bool");
        py::array a = py::reinterpret_borrow<py::array>(obj);
        const char kind = a.dtype().kind();
        if (kind != 'b' && !(kind == 'u' && a.itemsize() == 1))
            throw py::type_error(fn + ": key_mask has dtype " + py::str(a.dtype()).cast<std::string>() +
                                 "; expected bool");
        if (shape(a) != expect)
            ops::value_error(fn, "key_mask is " + ops::shape_str(shape(a)) + "; expected (B, Tk) = " +
                                     ops::shape_str(expect));
        Bytes r;
        r.hold = py::module_::import("numpy").attr("ascontiguousarray")(a, "uint8");
        r.data = static_cast<const std::uint8_t*>(r.hold.data());
        return r;
    }
    struct Ids {
        py::array_t<std::int32_t> hold;
        const std::int32_t* data = nullptr;
    };
    static Ids ids(const py::array_t<std::int32_t>& host) { return {host, host.data()}; }
    static void sync(const std::string&) {}
    static py::object to_py(const Array& a) { return a; }
};

// ---- harness self-tests: tiny kernels that exercise each emulated feature ----

// Block-wide sum through shared memory: a tree with a __syncthreads per level.
__global__ void tree_sum_kernel(const float* x, float* out, int n) {
    NF_DYNAMIC_SHARED(float, s);
    const int t = threadIdx.x;
    s[t] = t < n ? x[blockIdx.x * n + t] : 0.0f;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Every warp primitive once; out[op][thread].
__global__ void warp_ops_kernel(const int* x, int* out, int n_threads, int delta) {
    const int t = threadIdx.x;
    const int v = x[t];
    out[0 * n_threads + t] = __shfl_xor_sync(0xffffffffu, v, delta);
    out[1 * n_threads + t] = __shfl_down_sync(0xffffffffu, v, unsigned(delta));
    out[2 * n_threads + t] = __shfl_up_sync(0xffffffffu, v, unsigned(delta));
    out[3 * n_threads + t] = __shfl_sync(0xffffffffu, v, delta);
    out[4 * n_threads + t] = int(__ballot_sync(0xffffffffu, v > 0));
    out[5 * n_threads + t] = __any_sync(0xffffffffu, v > 0);
    out[6 * n_threads + t] = __all_sync(0xffffffffu, v > 0);
    atomicAdd(out + 7 * n_threads, v);
}

// Bugs the emulator must report rather than hide.
__global__ void divergent_barrier_kernel(float*) {
    if (threadIdx.x % 2 == 0) __syncthreads();  // only half the block arrives
}
__global__ void divergent_shuffle_kernel(float* out) {
    float v = float(threadIdx.x);
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half a warp
    out[threadIdx.x] = v;
}
__global__ void partial_mask_kernel(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1);
}
// Every thread writes its slot and reads its neighbour's — with the barrier
// in between (`sync`), or without it (a race that the serialized schedules
// expose deterministically: the neighbour has not written yet).
__global__ void neighbour_kernel(float* out, bool sync) {
    NF_DYNAMIC_SHARED(float, s);
    s[threadIdx.x] = float(threadIdx.x);
    if (sync) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
__global__ void uninitialised_shared_kernel(float* out) {
    NF_DYNAMIC_SHARED(float, s);
    if (threadIdx.x > 0) s[threadIdx.x] = 1.0f;  // s[0] is never written
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

}  // namespace

PYBIND11_MODULE(_cuda_emu, m) {
    m.doc() = "numformer's CUDA kernels run on the CPU by the emulator in csrc/cuda/emu (for tests).";
    ops::register_ops<EmuPolicy>(m);
    // The emulator's "device" is host memory: to_device is a copy, as in
    // numformer._cuda (float32, or uint8 for masks), so code written against
    // one module runs against the other (numformer.cuda_model).
    m.def("to_device", [](const py::array& a) -> py::object {
        const char kind = a.dtype().kind();
        const py::module_ np = py::module_::import("numpy");
        if (kind == 'f' && a.itemsize() == 4) return np.attr("array")(a, "float32", py::arg("order") = "C");
        if (kind == 'b' || (kind == 'u' && a.itemsize() == 1)) return np.attr("array")(a, "uint8", py::arg("order") = "C");
        throw py::type_error("to_device: dtype " + py::str(a.dtype()).cast<std::string>() +
                             " is not supported; use float32 (or bool/uint8 for masks)");
    }, py::arg("a"), "A C-contiguous copy (float32, or uint8 for bool/uint8 masks).");

    m.def("_selftest_tree_sum", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, int threads) {
        if (x.ndim() != 2 || x.shape(1) > threads) throw py::value_error("x must be (blocks, n <= threads)");
        py::array_t<float> out(x.shape(0));
        const float* xp = x.data();
        float* op = out.mutable_data();
        const int n = int(x.shape(1));
        py::gil_scoped_release nogil;
        numformer::cuda::launch("tree_sum", tree_sum_kernel, dim3(unsigned(x.shape(0))), dim3(unsigned(threads)),
                                sizeof(float) * threads, nullptr, xp, op, n);
        return out;
    });
    m.def("_selftest_warp_ops", [](py::array_t<int, py::array::c_style | py::array::forcecast> x, int delta) {
        const int n = int(x.size());
        py::array_t<int> out({8, n});
        std::memset(out.mutable_data(), 0, sizeof(int) * 8 * n);
        const int* xp = x.data();
        int* op = out.mutable_data();
        py::gil_scoped_release nogil;
        numformer::cuda::launch("warp_ops", warp_ops_kernel, dim3(1), dim3(unsigned(n)), 0, nullptr, xp, op, n,
                                delta);
        return out;
    });
    m.def("_selftest_bug", [](const std::string& which) {
        std::vector<float> buf(64, 0.0f);
        float* p = buf.data();
        {
            py::gil_scoped_release nogil;
            if (which == "divergent_barrier")
                numformer::cuda::launch(which.c_str(), divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, p);
            else if (which == "divergent_shuffle")
                numformer::cuda::launch(which.c_str(), divergent_shuffle_kernel, dim3(1), dim3(64), 0, nullptr, p);
            else if (which == "partial_mask")
                numformer::cuda::launch(which.c_str(), partial_mask_kernel, dim3(1), dim3(64), 0, nullptr, p);
            else if (which == "uninitialised_shared")
                numformer::cuda::launch(which.c_str(), uninitialised_shared_kernel, dim3(1), dim3(64),
                                        sizeof(float) * 64, nullptr, p);
            else if (which == "missing_barrier" || which == "with_barrier")
                numformer::cuda::launch(which.c_str(), neighbour_kernel, dim3(1), dim3(64), sizeof(float) * 64,
                                        nullptr, p, which == "with_barrier");
            else if (which == "too_many_threads")
                numformer::cuda::launch(which.c_str(), partial_mask_kernel, dim3(1), dim3(2048), 0, nullptr, p);
            else
                throw std::invalid_argument("unknown self-test " + which);
        }
        return py::array_t<float>(py::ssize_t(buf.size()), buf.data());
    });
    m.def("set_schedule", &nf_emu::set_schedule, py::arg("name"),
          "How the emulator runs a block's threads: 'threads' (all at once, OS-interleaved; the default, "
          "or NUMFORMER_EMU_SCHEDULE), 'forward' / 'reverse' (one at a time in thread order, switching at "
          "barriers: missing barriers fail deterministically). Returns the previous schedule.");
    m.attr("__emulated__") = true;
}
