// checks.h — argument validation shared by every binding file.
//
// Check everything about the arrays (type, dtype, ndim, shapes, contiguity,
// alignment, writability, overlap) while holding the GIL and raise
// TypeError/ValueError naming the offending shapes; only then release the GIL
// and hand raw pointers to a kernel.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <string>

#include "bindings/int_checks.h"
#include "cpu/runtime.h"

namespace numformer::bindings {

namespace py = pybind11;
using numformer::cpu::index_t;


enum class DType { f32, f64 };

// "(3, 4)" — the shape as Python prints a tuple.
inline std::string shape_str(const py::array& a) {
    std::ostringstream s;
    s << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
    if (a.ndim() == 1) s << ",";
    s << ")";
    return s.str();
}

inline std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

inline py::array require_array(const py::handle& obj, const char* fn, const char* name) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(fn) + ": " + name + " must be a numpy.ndarray, got " +
                             py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
    }
    return py::reinterpret_borrow<py::array>(obj);
}

inline DType require_float(const py::array& a, const char* fn, const char* name) {
    // EquivTypes: native-endian float32/float64 only; '>f4' and friends fail.
    if (py::isinstance<py::array_t<float>>(a)) return DType::f32;
    if (py::isinstance<py::array_t<double>>(a)) return DType::f64;
    throw py::type_error(std::string(fn) + ": " + name + " has dtype " + dtype_str(a) +
                         "; expected float32 or float64");
}

inline void require_same_dtype(const py::array& a, DType da, const py::array& b, DType db,
                        const char* fn, const char* an, const char* bn) {
    if (da != db) {
        throw py::type_error(std::string(fn) + ": dtypes differ: " + an + " is " + dtype_str(a) +
                             ", " + bn + " is " + dtype_str(b) + " (no implicit casts)");
    }
}

// The kernels index memory as dense row-major, so the array must be exactly that.
inline void require_layout(const py::array& a, const char* fn, const char* name, bool writeable = false) {
    const auto flags = a.flags();
    if (!(flags & py::array::c_style)) {
        throw py::value_error(std::string(fn) + ": " + name + " with shape " + shape_str(a) +
                              " is not C-contiguous (use numformer.backend, which copies or "
                              "flips the transpose flag, or np.ascontiguousarray)");
    }
    if (!(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
        throw py::value_error(std::string(fn) + ": " + name + " is not aligned to its dtype");
    }
    if (writeable && !a.writeable()) {
        throw py::value_error(std::string(fn) + ": " + name + " is read-only");
    }
}

// True when the byte ranges of two (contiguous) arrays intersect.
inline bool overlaps(const py::array& a, const py::array& b) {
    if (a.size() == 0 || b.size() == 0) return false;
    const auto a0 = reinterpret_cast<std::uintptr_t>(a.data());
    const auto b0 = reinterpret_cast<std::uintptr_t>(b.data());
    return a0 < b0 + static_cast<std::uintptr_t>(b.nbytes()) &&
           b0 < a0 + static_cast<std::uintptr_t>(a.nbytes());
}

}  // namespace numformer::bindings
