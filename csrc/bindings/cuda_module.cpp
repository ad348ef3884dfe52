// numformer._cuda — the CUDA kernels on a real device.
//
// Data lives in device memory as `DeviceArray`s (float32, or uint8 for key
// masks), created from NumPy arrays with `to_device(a)` and copied back with
// `arr.numpy()`: copies are explicit, so a model's weights and activations
// can stay on the device across calls. The operations (matmul, softmax,
// attention; see cuda_ops.h) take and return DeviceArrays.
//
// The CUDA runtime is linked statically: importing this module needs no
// driver. Every function first checks for a device and raises
// RuntimeError("numformer._cuda: no CUDA device ...") when there is none;
// failed launches and kernel faults raise RuntimeError with CUDA's message.
// Each operation synchronises before returning, so an error is reported by
// the call that caused it.
#include <cuda_runtime.h>

#include <memory>

#include "bindings/cuda_ops.h"

namespace py = pybind11;
namespace ops = numformer::bindings::cudaops;
using ops::Shape;
using numformer::cuda::index_t;

#ifndef NUMFORMER_CUDA_ARCHS
#define NUMFORMER_CUDA_ARCHS "?"
#endif
#ifndef NUMFORMER_CUDA_VERSION
#define NUMFORMER_CUDA_VERSION "?"
#endif

namespace {

void check(cudaError_t err, const std::string& what) {
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear a sticky non-fatal error so the next call starts clean
        throw std::runtime_error("numformer._cuda: " + what + ": " + cudaGetErrorName(err) + ": " +
                                 cudaGetErrorString(err));
    }
}

int device_count_or_zero(std::string* why = nullptr) {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cudaGetLastError();
        if (why) *why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
        return 0;
    }
    if (n == 0 && why) *why = "cudaGetDeviceCount reported 0 devices";
    return n;
}

void require_device() {
    std::string why;
    if (device_count_or_zero(&why) == 0)
        throw std::runtime_error("numformer._cuda: no CUDA device (" + why + ")");
}

// When false (benchmarks), operations return right after their launches;
// errors inside kernels then surface at the next synchronize().
bool g_synchronous = true;

enum class DType { f32, u8 };

// A dense row-major array in device memory. Copies share the allocation.
struct DeviceArray {
    std::shared_ptr<void> mem;
    Shape shape;
    DType dtype = DType::f32;
    std::int64_t count = 0;  // elements, checked by the constructor

    static std::size_t itemsize_of(DType dt) { return dt == DType::f32 ? 4 : 1; }

    DeviceArray() = default;
    // The element count is checked (dimensions >= 0, at most 2**63 - 1 bytes)
    // before anything is allocated: a wrapped byte count would allocate a small
    // block that the kernels then index as the large array it claims to be.
    DeviceArray(const Shape& s, DType dt)
        : shape(s), dtype(dt), count(numformer::bindings::checked_numel(s, "DeviceArray", itemsize_of(dt))) {
        require_device();
        const std::size_t n = nbytes();
        void* p = nullptr;
        if (n) check(cudaMalloc(&p, n), "cudaMalloc(" + std::to_string(n) + " bytes)");
        mem = std::shared_ptr<void>(p, [](void* q) {
            if (q) cudaFree(q);
        });
    }
    std::size_t itemsize() const { return itemsize_of(dtype); }
    std::size_t size() const { return std::size_t(count); }
    std::size_t nbytes() const { return size() * itemsize(); }
    void* ptr() const { return mem.get(); }
    explicit operator bool() const { return mem != nullptr || !shape.empty(); }
};

DeviceArray to_device(const py::array& a_in) {
    const char kind = a_in.dtype().kind();
    DType dt;
    py::array a;
    if (kind == 'f' && a_in.itemsize() == 4) {
        dt = DType::f32;
        a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(a_in);
    } else if (kind == 'b' || (kind == 'u' && a_in.itemsize() == 1)) {
        dt = DType::u8;
        a = py::module_::import("numpy").attr("ascontiguousarray")(a_in, "uint8");
    } else {
        throw py::type_error("to_device: dtype " + py::str(a_in.dtype()).cast<std::string>() +
                             " is not supported; use float32 (or bool/uint8 for masks)");
    }
    DeviceArray d(Shape(a.shape(), a.shape() + a.ndim()), dt);
    if (d.nbytes()) check(cudaMemcpy(d.ptr(), a.data(), d.nbytes(), cudaMemcpyHostToDevice), "to_device");
    return d;
}

py::array to_numpy(const DeviceArray& d) {
    std::vector<py::ssize_t> s(d.shape.begin(), d.shape.end());
    py::array out = d.dtype == DType::f32 ? py::array(py::array_t<float>(s)) : py::array(py::array_t<std::uint8_t>(s));
    if (d.nbytes()) {
        py::gil_scoped_release nogil;
        check(cudaMemcpy(out.mutable_data(), d.ptr(), d.nbytes(), cudaMemcpyDeviceToHost), "DeviceArray.numpy");
    }
    return out;
}

struct CudaPolicy {
    using Array = DeviceArray;
    struct Bytes {
        DeviceArray hold;
        const std::uint8_t* data = nullptr;
    };
    static Array f32(const py::object& obj, const std::string& fn, const char* name, bool /*writeable*/ = false) {
        require_device();
        if (!py::isinstance<DeviceArray>(obj))
            throw py::type_error(fn + ": " + name + " must be a numformer._cuda.DeviceArray (use to_device), got " +
                                 py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
        DeviceArray a = obj.cast<DeviceArray>();
        if (a.dtype != DType::f32) throw py::type_error(fn + ": " + name + " has dtype uint8; expected float32");
        return a;
    }
    static Shape shape(const Array& a) { return a.shape; }
    static const float* cdata(const Array& a) { return static_cast<const float*>(a.ptr()); }
    static float* data(Array& a) { return static_cast<float*>(a.ptr()); }
    static Array empty(const Shape& s) { return DeviceArray(s, DType::f32); }
    // DeviceArrays never alias except as copies of one handle (same allocation).
    static bool overlaps(const Array& a, const Array& b) { return a.mem && a.mem == b.mem; }
    static Bytes bytes(const py::object& obj, const std::string& fn, const Shape& expect) {
        Bytes r;
        if (py::isinstance<DeviceArray>(obj)) r.hold = obj.cast<DeviceArray>();
        else if (py::isinstance<py::array>(obj)) {
            const py::array a = py::reinterpret_borrow<py::array>(obj);
            const char kind = a.dtype().kind();
            if (kind != 'b' && !(kind == 'u' && a.itemsize() == 1))
                throw py::type_error(fn + ": key_mask has dtype " + py::str(a.dtype()).cast<std::string>() +
                                     "; expected bool");
            r.hold = to_device(a);
        } else {
            throw py::type_error(fn + ": key_mask must be a bool numpy array or a uint8 DeviceArray");
        }
        if (r.hold.dtype != DType::u8) throw py::type_error(fn + ": key_mask must be bool/uint8");
        if (r.hold.shape != expect)
            ops::value_error(fn, "key_mask is " + ops::shape_str(r.hold.shape) + "; expected (B, Tk) = " +
                                     ops::shape_str(expect));
        r.data = static_cast<const std::uint8_t*>(r.hold.ptr());
        return r;
    }
    // Token ids, checked on the host (cudaops::checked_ids), copied to the
    // device; the int32 values travel in a uint8 allocation of 4 bytes each.
    struct Ids {
        DeviceArray hold;
        const std::int32_t* data = nullptr;
    };
    static Ids ids(const py::array_t<std::int32_t>& host) {
        Ids r;
        const std::size_t n = std::size_t(host.size()) * sizeof(std::int32_t);
        r.hold = DeviceArray(Shape{index_t(n)}, DType::u8);
        if (n) check(cudaMemcpy(r.hold.ptr(), host.data(), n, cudaMemcpyHostToDevice), "ids to device");
        r.data = static_cast<const std::int32_t*>(r.hold.ptr());
        return r;
    }
    // Wait for the kernels and report any error they raised.
    static void sync(const std::string& fn) {
        check(g_synchronous ? cudaDeviceSynchronize() : cudaGetLastError(), fn);
    }
    static py::object to_py(const Array& a) { return py::cast(a); }
};

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "numformer's CUDA kernels: matmul, softmax, flash attention on DeviceArrays.";

    // numformer.cuda errors (CudaError) derive from std::runtime_error → RuntimeError.
    py::class_<DeviceArray>(m, "DeviceArray", "A dense float32 (or uint8) array in GPU memory.")
        .def_property_readonly("shape", [](const DeviceArray& d) { return py::tuple(py::cast(d.shape)); })
        .def_property_readonly("dtype", [](const DeviceArray& d) {
            return py::module_::import("numpy").attr("dtype")(d.dtype == DType::f32 ? "float32" : "uint8");
        })
        .def_property_readonly("nbytes", &DeviceArray::nbytes)
        .def_property_readonly("ndim", [](const DeviceArray& d) { return d.shape.size(); })
        .def("numpy", &to_numpy, "Copy to a new NumPy array (device → host).")
        .def("__array__", [](const DeviceArray& d, py::args, py::kwargs) { return to_numpy(d); })
        .def("__repr__", [](const DeviceArray& d) {
            return "DeviceArray(shape=" + ops::shape_str(d.shape) + ", dtype=" +
                   (d.dtype == DType::f32 ? "float32" : "uint8") + ")";
        });

    m.def("to_device", &to_device, py::arg("a"),
          "Copy a NumPy array (float32, or bool/uint8 for masks) to a new DeviceArray (host → device).");
    m.def("empty", [](const Shape& shape) {
        for (index_t d : shape)
            if (d < 0) throw py::value_error("empty: negative dimension in " + ops::shape_str(shape));
        return DeviceArray(shape, DType::f32);
    }, py::arg("shape"), "An uninitialised float32 DeviceArray.");
    m.def("device_count", [] { return device_count_or_zero(); },
          "Number of CUDA devices (0 without a GPU or driver; never raises).");
    m.def("device_name", [] {
        require_device();
        cudaDeviceProp prop;
        int dev = 0;
        check(cudaGetDevice(&dev), "cudaGetDevice");
        check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
        return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
    });
    m.def("synchronize", [] {
        require_device();
        py::gil_scoped_release nogil;
        check(cudaDeviceSynchronize(), "synchronize");
    });
    m.def("set_synchronous", [](bool on) {
        const bool old = g_synchronous;
        g_synchronous = on;
        return old;
    }, py::arg("on"),
          "True (default): every operation waits for its kernels, so errors are raised by the call that "
          "caused them. False: operations return after launching (for timing); call synchronize(). "
          "Returns the previous setting.");
    m.def("measure_copy_bandwidth", [](std::size_t nbytes, int repeat) {
        // Device-to-device copies timed with events: bytes read + written per
        // second, the ceiling a memory-bound kernel (softmax) is measured against.
        if (nbytes == 0 || repeat < 1 || repeat > 10000)
            throw py::value_error("measure_copy_bandwidth: nbytes must be > 0 and repeat in [1, 10000], got " +
                                  std::to_string(nbytes) + " and " + std::to_string(repeat));
        require_device();
        void *a = nullptr, *b = nullptr;
        check(cudaMalloc(&a, nbytes), "cudaMalloc");
        std::unique_ptr<void, void (*)(void*)> ga(a, [](void* p) { cudaFree(p); });
        check(cudaMalloc(&b, nbytes), "cudaMalloc");
        std::unique_ptr<void, void (*)(void*)> gb(b, [](void* p) { cudaFree(p); });
        check(cudaMemset(a, 1, nbytes), "cudaMemset");
        cudaEvent_t t0, t1;
        check(cudaEventCreate(&t0), "cudaEventCreate");
        check(cudaEventCreate(&t1), "cudaEventCreate");
        check(cudaMemcpy(b, a, nbytes, cudaMemcpyDeviceToDevice), "warm-up copy");
        check(cudaEventRecord(t0), "cudaEventRecord");
        for (int i = 0; i < repeat; ++i) check(cudaMemcpyAsync(b, a, nbytes, cudaMemcpyDeviceToDevice), "copy");
        check(cudaEventRecord(t1), "cudaEventRecord");
        check(cudaEventSynchronize(t1), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
        cudaEventDestroy(t0);
        cudaEventDestroy(t1);
        return 2.0 * double(nbytes) * repeat / (double(ms) * 1e-3) / 1e9;  // GB/s
    }, py::arg("nbytes") = std::size_t(1) << 30, py::arg("repeat") = 20,
          "GB/s of device-to-device copies (bytes read + written).");
    m.def("measure_fma_peak", [](int iters) {
        // TFLOP/s of a kernel doing only FMAs on 8 chains per thread, with
        // 16 blocks per SM: the compute ceiling for FP32 CUDA-core kernels.
        // Bounded so that a typo cannot keep the GPU busy for minutes (2**24 is a few seconds on an H100).
        if (iters < 1 || iters > (1 << 24))
            throw py::value_error("measure_fma_peak: iters must be in [1, 2**24], got " + std::to_string(iters));
        require_device();
        int dev = 0, sms = 0;
        check(cudaGetDevice(&dev), "cudaGetDevice");
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
        const int blocks = 16 * sms;
        DeviceArray out(Shape{index_t(blocks) * 256}, DType::f32);
        numformer::cuda::fma_loop(static_cast<float*>(out.ptr()), blocks, 16);  // warm-up
        cudaEvent_t t0, t1;
        check(cudaEventCreate(&t0), "cudaEventCreate");
        check(cudaEventCreate(&t1), "cudaEventCreate");
        check(cudaEventRecord(t0), "cudaEventRecord");
        const double flops = numformer::cuda::fma_loop(static_cast<float*>(out.ptr()), blocks, iters);
        check(cudaEventRecord(t1), "cudaEventRecord");
        check(cudaEventSynchronize(t1), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, t0, t1), "cudaEventElapsedTime");
        cudaEventDestroy(t0);
        cudaEventDestroy(t1);
        return flops / (double(ms) * 1e-3) / 1e12;
    }, py::arg("iters") = 1 << 16, "TFLOP/s of an FMA-only kernel (FP32 CUDA cores).");
    ops::register_ops<CudaPolicy>(m);
    const std::string info = std::string("CUDA ") + NUMFORMER_CUDA_VERSION + ", architectures " + NUMFORMER_CUDA_ARCHS;
    m.def("build_info", [info] { return info; });
    m.attr("__build_info__") = info;
}
