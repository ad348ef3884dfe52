// bpe.h — the byte-pair merge loop of numformer's GPT-2 tokenizer.
//
// Pure C++ (no Python): numformer/tokenizers/gpt2.py holds the specification
// (bpe_scan / bpe_heap) and the tests check that this gives the same ids.
//
// A chunk's bytes start as one part each (byte -> id); then, repeatedly, the
// adjacent pair of parts with the lowest priority in the pair table is merged
// (leftmost on ties) until no adjacent pair is in the table.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace numformer::cpu {

class BpeMerger {
public:
    // byte_ids: id of each single byte; merges: (left, right, priority, merged id);
    // whole: tokens emitted whole when a chunk equals one (tiktoken's rule), may be empty.
    struct Merge {
        std::uint32_t left, right, priority, merged;
    };
    BpeMerger(const std::array<std::uint32_t, 256>& byte_ids, const std::vector<Merge>& merges,
              std::unordered_map<std::string, std::uint32_t> whole, bool use_whole);

    // Append the ids of one chunk to `out`.
    void encode_chunk(std::string_view chunk, std::vector<std::uint32_t>& out) const;

    // Cut `text` (n code points) with GPT-2's pattern
    //   '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    // and append the ids of every chunk. `classes[cp]` has kLetter / kNumber /
    // kSpace bits (built from the same `regex` module the Python path uses).
    template <typename Char>
    void encode_text(const Char* text, std::size_t n, const std::vector<std::uint8_t>& classes,
                     std::vector<std::uint32_t>& out) const;
    static constexpr std::uint8_t kLetter = 1, kNumber = 2, kSpace = 4;

    // Character classes by code point, for encode_text (empty: not set).
    std::vector<std::uint8_t> classes;

    // Chunks longer than this use the heap; shorter ones the quadratic scan.
    std::size_t long_chunk = 128;

private:
    static constexpr std::uint32_t kNone = 0xFFFFFFFFu;
    static std::uint64_t key(std::uint32_t a, std::uint32_t b) {
        return (static_cast<std::uint64_t>(a) << 32) | b;
    }
    // (priority << 32 | merged id), or ~0 when the pair never merges
    std::uint64_t lookup(std::uint32_t a, std::uint32_t b) const {
        auto it = pairs_.find(key(a, b));
        return it == pairs_.end() ? ~std::uint64_t{0} : it->second;
    }
    void scan(std::string_view chunk, std::vector<std::uint32_t>& out) const;
    void heap(std::string_view chunk, std::vector<std::uint32_t>& out) const;

    std::array<std::uint32_t, 256> byte_ids_;
    std::unordered_map<std::uint64_t, std::uint64_t> pairs_;
    std::unordered_map<std::string, std::uint32_t> whole_;
    bool use_whole_;
};

}  // namespace numformer::cpu

// ---------------------------------------------------------------------------
// GPT-2 pre-tokenization, by hand (template: Python str storage is 1, 2 or 4
// bytes per code point). Each branch names the alternative of the pattern it
// implements; they are tried in the pattern's order.
// ---------------------------------------------------------------------------
namespace numformer::cpu {

namespace detail {
inline void append_utf8(std::string& s, std::uint32_t cp) {
    if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        s.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        s.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        s.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        s.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}
}  // namespace detail

template <typename Char>
void BpeMerger::encode_text(const Char* text, std::size_t n, const std::vector<std::uint8_t>& classes,
                            std::vector<std::uint32_t>& out) const {
    auto cls = [&](std::size_t k) -> std::uint8_t {
        const std::uint32_t cp = static_cast<std::uint32_t>(text[k]);
        return cp < classes.size() ? classes[cp] : 0;
    };
    auto is_other = [&](std::size_t k) { return (cls(k) & (kLetter | kNumber | kSpace)) == 0; };
    std::string piece;
    std::size_t i = 0;
    while (i < n) {
        const std::uint32_t c = static_cast<std::uint32_t>(text[i]);
        std::size_t end = i;
        // '(?:[sdmt]|ll|ve|re)
        if (c == '\'' && i + 1 < n) {
            const std::uint32_t c1 = static_cast<std::uint32_t>(text[i + 1]);
            const std::uint32_t c2 = i + 2 < n ? static_cast<std::uint32_t>(text[i + 2]) : 0;
            if (c1 == 's' || c1 == 'd' || c1 == 'm' || c1 == 't')
                end = i + 2;
            else if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e'))
                end = i + 3;
        }
        if (end == i) {
            // " ?" then a class run: the optional space binds to a following letter/number/other
            const std::size_t start = (c == ' ' && i + 1 < n && !(cls(i + 1) & kSpace)) ? i + 1 : i;
            const std::uint8_t k = cls(start);
            if (k & kLetter) {                                    //  ?\p{L}+
                end = start + 1;
                while (end < n && (cls(end) & kLetter)) ++end;
            } else if (k & kNumber) {                             //  ?\p{N}+
                end = start + 1;
                while (end < n && (cls(end) & kNumber)) ++end;
            } else if (!(k & kSpace)) {                           //  ?[^\s\p{L}\p{N}]+
                end = start + 1;
                while (end < n && is_other(end)) ++end;
            } else {                                              // \s+(?!\S) | \s+
                std::size_t j = i + 1;
                while (j < n && (cls(j) & kSpace)) ++j;
                end = (j == n || j - 1 == i) ? j : j - 1;         // leave the last space to the next word
            }
        }
        piece.clear();
        for (std::size_t k = i; k < end; ++k) detail::append_utf8(piece, static_cast<std::uint32_t>(text[k]));
        encode_chunk(piece, out);
        i = end;
    }
}

}  // namespace numformer::cpu
