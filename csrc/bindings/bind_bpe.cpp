// bind_bpe.cpp — numformer._cpu.BPE: the GPT-2 tokenizer's merge loop.
//
// The Python side (numformer/tokenizers/gpt2.py) cuts text into chunks with
// the GPT-2 pattern and hands the whole list over in one call; here each
// chunk's UTF-8 bytes are read while holding the GIL, then the GIL is
// released for the merging, and one list of ids comes back.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cpu/bpe.h"

namespace py = pybind11;
using numformer::cpu::BpeMerger;

namespace {

// An id: a Python or NumPy integer (a float such as 1.5 is refused, not
// truncated) in [0, 2**32 - 1); values past 64 bits are refused, not wrapped.
std::uint32_t as_id(const py::handle& h, const char* what) {
    const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(h.ptr()));
    if (!index) {
        PyErr_Clear();
        throw py::type_error(std::string("BPE: ") + what + " must be an integer, got " +
                             py::str(py::type::of(h).attr("__name__")).cast<std::string>());
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow != 0 || v < 0 || v > 0xFFFFFFFELL)
        throw py::value_error(std::string("BPE: ") + what + " " + py::repr(index).cast<std::string>() +
                              " is outside [0, 2**32 - 1)");
    return static_cast<std::uint32_t>(v);
}

BpeMerger make(const py::sequence& byte_ids, const py::sequence& merges, const py::object& whole) {
    if (py::len(byte_ids) != 256)
        throw py::value_error("BPE: byte_ids must have 256 entries, got " + std::to_string(py::len(byte_ids)));
    std::array<std::uint32_t, 256> bytes{};
    for (std::size_t i = 0; i < 256; ++i) bytes[i] = as_id(byte_ids[i], "byte id");
    std::vector<BpeMerger::Merge> table;
    table.reserve(py::len(merges));
    for (const py::handle m : merges) {
        const auto t = py::reinterpret_borrow<py::sequence>(m);
        if (py::len(t) != 4) throw py::value_error("BPE: each merge must be (left, right, priority, merged)");
        table.push_back({as_id(t[0], "left id"), as_id(t[1], "right id"), as_id(t[2], "priority"),
                         as_id(t[3], "merged id")});
    }
    std::unordered_map<std::string, std::uint32_t> whole_map;
    const bool use_whole = !whole.is_none();
    if (use_whole) {
        const auto d = py::reinterpret_borrow<py::dict>(whole);
        whole_map.reserve(d.size());
        for (const auto& kv : d) {
            if (!PyBytes_Check(kv.first.ptr())) throw py::type_error("BPE: whole-token keys must be bytes");
            whole_map.emplace(kv.first.cast<std::string>(), as_id(kv.second, "token id"));
        }
    }
    return BpeMerger(bytes, table, std::move(whole_map), use_whole);
}

py::list to_list(const std::vector<std::uint32_t>& ids) {
    py::list out(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
        PyObject* v = PyLong_FromUnsignedLong(ids[i]);
        if (!v) throw py::error_already_set();
        PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);  // steals the reference
    }
    return out;
}

py::list encode(const BpeMerger& self, const py::list& pieces) {
    // UTF-8 views stay valid while `pieces` holds the str objects (CPython caches them).
    std::vector<std::string_view> views;
    views.reserve(pieces.size());
    std::size_t total = 0;
    for (const py::handle p : pieces) {
        if (!PyUnicode_Check(p.ptr())) throw py::type_error("BPE.encode: pieces must be str");
        Py_ssize_t n = 0;
        const char* s = PyUnicode_AsUTF8AndSize(p.ptr(), &n);
        if (!s) {
            PyErr_Clear();
            throw py::value_error("BPE.encode: a piece is not valid Unicode (lone surrogate)");
        }
        views.emplace_back(s, static_cast<std::size_t>(n));
        total += static_cast<std::size_t>(n);
    }
    std::vector<std::uint32_t> ids;
    ids.reserve(total / 3 + 16);
    {
        py::gil_scoped_release release;
        for (const auto& v : views) self.encode_chunk(v, ids);
    }
    return to_list(ids);
}

py::list encode_chunk(const BpeMerger& self, const py::bytes& chunk) {
    const std::string_view v(PyBytes_AS_STRING(chunk.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(chunk.ptr())));
    std::vector<std::uint32_t> ids;
    self.encode_chunk(v, ids);
    return to_list(ids);
}

void set_classes(BpeMerger& self, const py::bytes& table) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(table.ptr()));
    self.classes.assign(p, p + PyBytes_GET_SIZE(table.ptr()));
}

py::list encode_text(const BpeMerger& self, const py::str& text) {
    if (self.classes.empty()) throw py::value_error("BPE.encode_text: call set_classes first");
    PyObject* t = text.ptr();
    const std::size_t n = static_cast<std::size_t>(PyUnicode_GET_LENGTH(t));
    const int kind = PyUnicode_KIND(t);
    const void* data = PyUnicode_DATA(t);
    std::vector<std::uint32_t> ids;
    ids.reserve(n / 3 + 16);
    {
        py::gil_scoped_release release;   // `text` is immutable and referenced by the caller
        if (kind == PyUnicode_1BYTE_KIND)
            self.encode_text(static_cast<const Py_UCS1*>(data), n, self.classes, ids);
        else if (kind == PyUnicode_2BYTE_KIND)
            self.encode_text(static_cast<const Py_UCS2*>(data), n, self.classes, ids);
        else
            self.encode_text(static_cast<const Py_UCS4*>(data), n, self.classes, ids);
    }
    return to_list(ids);
}

}  // namespace

void register_bpe(py::module_& m) {
    py::class_<BpeMerger>(m, "BPE", R"doc(Byte-pair merge loop of the GPT-2 tokenizer (see numformer.tokenizers.gpt2).

BPE(byte_ids, merges, whole): byte_ids -- 256 ids of the single bytes; merges --
(left id, right id, priority, merged id) tuples; whole -- dict bytes -> id of
tokens emitted whole when a chunk equals one (tiktoken's rule), or None.)doc")
        .def(py::init(&make), py::arg("byte_ids"), py::arg("merges"), py::arg("whole") = py::none())
        .def("encode", &encode, py::arg("pieces"), "ids of a list of str chunks (GIL released while merging)")
        .def("set_classes", &set_classes, py::arg("table"),
             "character classes by code point (bit 1 letter, 2 number, 4 space) for encode_text")
        .def("encode_text", &encode_text, py::arg("text"),
             "GPT-2 pre-tokenization + merging of a whole str (valid Unicode; GIL released)")
        .def("encode_chunk", &encode_chunk, py::arg("chunk"), "ids of one chunk of bytes")
        .def_readwrite("long_chunk", &BpeMerger::long_chunk,
                       "chunks longer than this merge with the O(n log n) heap (tests lower it)");
}
