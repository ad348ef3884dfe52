// output_cache.cpp — the cache of large result blocks (why: output_cache.h).
#include "bindings/output_cache.h"

#include <cerrno>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace numformer::bindings {
namespace {

// Blocks start and end on 2 MiB boundaries so that the kernel can back them
// with transparent huge pages (asked for with madvise, as NumPy does for its
// own large arrays): one fault per 2 MiB instead of per 4 KiB, and fewer TLB
// misses. Without the advice a first use of 200 MB costs ~3x more.
constexpr std::size_t kAlign = std::size_t(2) << 20;
constexpr std::size_t kDefaultLimitMb = 1024;

struct Block {
    void* data;
    std::size_t bytes;  // capacity, a multiple of kAlign
};

// Idle blocks, oldest first. Reached from capsule destructors, which may run
// on any thread that drops the last reference, so every access holds `lock`.
struct Cache {
    std::mutex lock;
    std::deque<Block> idle;
    std::size_t idle_bytes = 0;
    std::size_t limit_bytes = kDefaultLimitMb << 20;
    std::size_t hits = 0, misses = 0;
    std::string warning;  // set when NUMFORMER_OUTPUT_CACHE_MB cannot be parsed

    Cache() {
        const char* env = std::getenv("NUMFORMER_OUTPUT_CACHE_MB");
        if (env == nullptr || *env == '\0') return;
        char* end = nullptr;
        errno = 0;
        const long long mb = std::strtoll(env, &end, 10);
        if (errno != 0 || *end != '\0' || mb < 0 || mb > (1LL << 30)) {
            warning = std::string("ignoring NUMFORMER_OUTPUT_CACHE_MB='") + env +
                      "': expected a whole number of MiB >= 0; caching up to " +
                      std::to_string(kDefaultLimitMb) + " MiB. ";
            return;
        }
        limit_bytes = static_cast<std::size_t>(mb) << 20;
    }

    // Drop the oldest idle blocks until `incoming` more bytes fit the limit.
    void evict_for(std::size_t incoming) {
        while (!idle.empty() && idle_bytes + incoming > limit_bytes) {
            std::free(idle.front().data);
            idle_bytes -= idle.front().bytes;
            idle.pop_front();
        }
    }
};

// Never destroyed: capsules may be freed during interpreter shutdown, after
// static destructors would have run.
Cache& cache() {
    static Cache* c = new Cache;
    return *c;
}

// The idle block to reuse for `bytes`: the smallest that fits and wastes at
// most a quarter of itself (so a 1 GiB block does not serve a 40 MiB array).
bool take_idle(Cache& c, std::size_t bytes, Block* out) {
    auto best = c.idle.end();
    for (auto it = c.idle.begin(); it != c.idle.end(); ++it) {
        const bool fits = it->bytes >= bytes && it->bytes - bytes <= it->bytes / 4;
        if (fits && (best == c.idle.end() || it->bytes < best->bytes)) best = it;
    }
    if (best == c.idle.end()) return false;
    *out = *best;
    c.idle_bytes -= best->bytes;
    c.idle.erase(best);
    return true;
}

void give_back(Block b) {
    Cache& c = cache();
    std::lock_guard<std::mutex> guard(c.lock);
    if (b.bytes > c.limit_bytes) {
        std::free(b.data);
        return;
    }
    c.evict_for(b.bytes);
    c.idle.push_back(b);
    c.idle_bytes += b.bytes;
}

}  // namespace

bool output_cache_enabled() { return cache().limit_bytes > 0; }

CachedBlock acquire_block(std::size_t bytes) {
    Cache& c = cache();
    Block b{nullptr, (bytes + kAlign - 1) / kAlign * kAlign};
    {
        std::lock_guard<std::mutex> guard(c.lock);
        if (take_idle(c, b.bytes, &b))  // leaves b as it is when nothing fits
            ++c.hits;
        else
            ++c.misses;
    }
    if (b.data == nullptr) {
        b.data = std::aligned_alloc(kAlign, b.bytes);
        if (b.data == nullptr) throw std::bad_alloc();  // pybind11 turns it into MemoryError
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        madvise(b.data, b.bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
    }
    // The capsule's context carries the capacity; its pointer is the block.
    py::capsule owner(b.data, [](PyObject* capsule) {
        void* data = PyCapsule_GetPointer(capsule, nullptr);
        const auto bytes = reinterpret_cast<std::size_t>(PyCapsule_GetContext(capsule));
        give_back(Block{data, bytes});
    });
    if (PyCapsule_SetContext(owner.ptr(), reinterpret_cast<void*>(b.bytes)) != 0)
        throw py::error_already_set();
    return {b.data, std::move(owner)};
}

void register_output_cache(py::module_& m) {
    m.def("output_cache_info", [] {
        Cache& c = cache();
        std::lock_guard<std::mutex> guard(c.lock);
        py::dict info;
        info["idle_blocks"] = c.idle.size();
        info["idle_bytes"] = c.idle_bytes;
        info["limit_bytes"] = c.limit_bytes;
        info["hits"] = c.hits;
        info["misses"] = c.misses;
        info["min_bytes"] = kCacheMinBytes;
        return info;
    }, "Results of at least min_bytes reuse freed blocks kept here (up to limit_bytes,\n"
       "NUMFORMER_OUTPUT_CACHE_MB) instead of fresh pages the OS must zero first.");
    m.def("clear_output_cache", [] {
        Cache& c = cache();
        std::lock_guard<std::mutex> guard(c.lock);
        c.evict_for(c.limit_bytes + 1);
    }, "Free every idle block of the output cache (arrays still alive are unaffected).");
    if (!cache().warning.empty()) {
        if (PyErr_WarnEx(PyExc_RuntimeWarning, ("numformer._cpu: " + cache().warning).c_str(), 1) < 0)
            throw py::error_already_set();
    }
}

}  // namespace numformer::bindings
