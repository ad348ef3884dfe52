// bpe.cpp — see bpe.h. Two merge loops with identical results:
//   scan: O(n²), arrays only; fastest for the short chunks of natural text.
//   heap: O(n log n) with a linked list of parts, for long chunks (a run of
//         10⁶ letters must not take 10¹² steps).
#include "cpu/bpe.h"

#include <functional>
#include <queue>
#include <tuple>
#include <utility>

namespace numformer::cpu {

BpeMerger::BpeMerger(const std::array<std::uint32_t, 256>& byte_ids, const std::vector<Merge>& merges,
                     std::unordered_map<std::string, std::uint32_t> whole, bool use_whole)
    : byte_ids_(byte_ids), whole_(std::move(whole)), use_whole_(use_whole) {
    pairs_.reserve(merges.size() * 2);
    for (const Merge& m : merges) {
        // the first rule for a pair wins (the Python side never passes repeats)
        pairs_.emplace(key(m.left, m.right), (static_cast<std::uint64_t>(m.priority) << 32) | m.merged);
    }
}

void BpeMerger::encode_chunk(std::string_view chunk, std::vector<std::uint32_t>& out) const {
    if (chunk.empty()) return;
    if (chunk.size() == 1) {
        out.push_back(byte_ids_[static_cast<unsigned char>(chunk[0])]);
        return;
    }
    if (use_whole_) {
        thread_local std::string key;   // reused: no allocation per chunk
        key.assign(chunk.data(), chunk.size());
        auto it = whole_.find(key);
        if (it != whole_.end()) {
            out.push_back(it->second);
            return;
        }
    }
    if (chunk.size() > long_chunk)
        heap(chunk, out);
    else
        scan(chunk, out);
}

void BpeMerger::scan(std::string_view chunk, std::vector<std::uint32_t>& out) const {
    const std::size_t n = chunk.size();
    thread_local std::vector<std::uint32_t> ids;   // scratch, reused across chunks
    thread_local std::vector<std::uint64_t> rank;  // rank[i]: merge of ids[i] and ids[i+1]; ~0 = none
    ids.resize(n);
    rank.resize(n);
    for (std::size_t i = 0; i < n; ++i) ids[i] = byte_ids_[static_cast<unsigned char>(chunk[i])];
    for (std::size_t i = 0; i + 1 < n; ++i) rank[i] = lookup(ids[i], ids[i + 1]);
    rank[n - 1] = ~std::uint64_t{0};
    std::size_t m = n;  // live parts
    for (;;) {
        // leftmost lowest priority: compare the high 32 bits only
        std::size_t at = m;
        std::uint64_t best = ~std::uint64_t{0};
        for (std::size_t i = 0; i + 1 < m; ++i) {
            if ((rank[i] >> 32) < (best >> 32)) {
                best = rank[i];
                at = i;
            }
        }
        if (at == m) break;
        ids[at] = static_cast<std::uint32_t>(best & 0xFFFFFFFFu);
        for (std::size_t i = at + 1; i + 1 < m; ++i) {  // drop part at + 1
            ids[i] = ids[i + 1];
            rank[i] = rank[i + 1];
        }
        --m;
        rank[m - 1] = ~std::uint64_t{0};
        if (at + 1 < m) rank[at] = lookup(ids[at], ids[at + 1]);
        if (at > 0) rank[at - 1] = lookup(ids[at - 1], ids[at]);
    }
    out.insert(out.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(m));
}

void BpeMerger::heap(std::string_view chunk, std::vector<std::uint32_t>& out) const {
    const std::size_t n = chunk.size();
    std::vector<std::uint32_t> ids(n), ver(n, 0);
    std::vector<std::size_t> nxt(n), prv(n);
    std::vector<bool> dead(n, false);
    for (std::size_t i = 0; i < n; ++i) {
        ids[i] = byte_ids_[static_cast<unsigned char>(chunk[i])];
        nxt[i] = i + 1;
        prv[i] = i - 1;  // wraps for i = 0; never read there
    }
    // (priority, position, version, merged id); smallest priority, then position, first
    using Entry = std::tuple<std::uint32_t, std::size_t, std::uint32_t, std::uint32_t>;
    std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> q;
    auto push = [&](std::size_t i) {
        const std::uint64_t r = lookup(ids[i], ids[nxt[i]]);
        if (r != ~std::uint64_t{0})
            q.emplace(static_cast<std::uint32_t>(r >> 32), i, ver[i], static_cast<std::uint32_t>(r & 0xFFFFFFFFu));
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(i);
    while (!q.empty()) {
        const auto [prio, i, v, merged] = q.top();
        (void)prio;
        q.pop();
        if (dead[i] || ver[i] != v) continue;  // stale: part i changed or was absorbed
        const std::size_t j = nxt[i];
        ids[i] = merged;                        // part i absorbs part j
        dead[j] = true;
        nxt[i] = nxt[j];
        if (nxt[j] < n) prv[nxt[j]] = i;
        ++ver[i];
        if (nxt[i] < n) push(i);
        if (i > 0) {
            const std::size_t p = prv[i];
            ++ver[p];
            push(p);
        }
    }
    for (std::size_t i = 0; i < n; i = nxt[i]) out.push_back(ids[i]);
}

}  // namespace numformer::cpu
