// emu.cpp — the launch machinery behind emu.h (see there for what it models).
#include "cuda/emu/emu.h"

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <atomic>
#include <sstream>
#include <system_error>
#include <thread>
#include <vector>

namespace nf_emu {

namespace {

// Thrown in a kernel thread to unwind it: after its own error (`fail`), or
// because another thread of the block failed and broke the barriers.
struct Unwind {};

// How long a barrier waits for its last arrival before calling it a deadlock.
// Generous: 1024 threads on a loaded 2-core machine are slow, not stuck.
std::chrono::seconds deadlock_timeout() {
    if (const char* s = std::getenv("NUMFORMER_EMU_TIMEOUT")) {
        const long v = std::strtol(s, nullptr, 10);
        if (v > 0) return std::chrono::seconds(v);
    }
    return std::chrono::seconds(120);
}

std::atomic<int> g_schedule{-1};  // Schedule; −1: not read from the environment yet

}  // namespace

// Serialized execution of one block (schedules "forward" and "reverse"): one
// thread at a time holds the turn and runs until it reaches a barrier (block
// or warp) or exits; the turn then goes to the first runnable thread in
// `order`. A missing barrier then fails deterministically: in forward order
// thread 0 runs its whole barrier interval before thread 1 starts, so it
// reads what thread 1 has not written yet (poison); reverse order catches
// the mirror case. A state where threads wait and none can run is a
// deadlock, reported at once.
struct Turns {
    std::mutex m;
    std::vector<std::unique_ptr<std::condition_variable>> cv;  // one per thread: wake only the next
    std::vector<unsigned> order;  // rank → thread
    std::vector<char> state;      // 0 runnable, 1 waiting at a barrier, 2 exited
    long running = -1;
    bool broken = false;

    explicit Turns(unsigned n, bool reverse) : cv(n), order(n), state(n, 0) {
        for (unsigned i = 0; i < n; ++i) {
            cv[i] = std::make_unique<std::condition_variable>();
            order[i] = reverse ? n - 1 - i : i;
        }
    }
    // With m held: give the turn to the first runnable thread; false if none.
    bool pass_locked() {
        for (unsigned t : order)
            if (state[t] == 0) {
                running = long(t);
                cv[t]->notify_one();
                return true;
            }
        running = -1;
        return false;
    }
    bool anyone_waiting() const {
        for (char c : state)
            if (c == 1) return true;
        return false;
    }
    // With m held (via lk): sleep until it is thread t's turn.
    void wait_turn(std::unique_lock<std::mutex>& lk, unsigned t) {
        cv[t]->wait(lk, [&] { return running == long(t) || broken; });
        if (broken) throw Unwind{};
    }
    void breakdown() {
        std::lock_guard<std::mutex> lock(m);
        broken = true;
        for (auto& c : cv) c->notify_all();
    }
};

// A reusable barrier over a set of threads whose size shrinks when a thread
// exits (a thread that returned no longer takes part, as on sm_70+).
class Barrier {
public:
    void reset(int n, Turns* turns) {
        expected_ = n;
        arrived_ = 0;
        generation_ = 0;
        broken_ = false;
        turns_ = turns;
        waiting_.clear();
    }
    void arrive_and_wait(const char* what);
    void leave();   // the calling thread exited
    void breakdown();  // wake everyone, who then unwinds

private:
    void arrive_serialized(const char* what);
    std::mutex m_;
    std::condition_variable cv_;
    int expected_ = 0, arrived_ = 0;
    std::uint64_t generation_ = 0;
    bool broken_ = false;
    Turns* turns_ = nullptr;           // serialized schedules
    std::vector<unsigned> waiting_;    // serialized: threads waiting here
};

struct Warp {
    Barrier barrier;
    unsigned full_mask = 0xffffffffu;  // the lanes that exist (a partial last warp has fewer)
    // Two exchange buffers used alternately: a lane writes buffer (k & 1) for
    // its k-th collective, waits at the barrier, reads. It can only write the
    // same buffer again for collective k + 2 after passing the barrier of k + 1,
    // which every lane reaches only after finishing its read of k.
    std::uint64_t slot[2][32] = {};
    bool vote[2][32] = {};
    std::vector<std::uint64_t> lane_collectives;  // per lane, checked at the end
};

struct Block {
    std::unique_ptr<Turns> turns;  // serialized schedules only
    Barrier barrier;
    std::vector<std::unique_ptr<Warp>> warps;
    std::vector<unsigned char> shared;  // dynamic shared memory
    std::vector<std::uint64_t> thread_syncs;
    std::mutex error_m;
    std::string error;  // first error raised in the block
};

void Barrier::arrive_serialized(const char* what) {
    Turns& T = *turns_;
    std::unique_lock<std::mutex> lk(T.m);
    if (T.broken) throw Unwind{};
    const unsigned me = tls.linear;
    waiting_.push_back(me);
    T.state[me] = 1;
    if (int(waiting_.size()) == expected_) {  // last arrival: everyone here may go on
        for (unsigned t : waiting_) T.state[t] = 0;
        waiting_.clear();
    }
    if (!T.pass_locked()) {
        lk.unlock();
        fail(std::string(what) + ": deadlock: every live thread waits at a barrier that cannot complete");
    }
    T.wait_turn(lk, me);
}

void Barrier::arrive_and_wait(const char* what) {
    if (turns_) return arrive_serialized(what);
    std::unique_lock<std::mutex> lock(m_);
    if (broken_) throw Unwind{};
    const std::uint64_t gen = generation_;
    if (++arrived_ == expected_) {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
        return;
    }
    if (!cv_.wait_for(lock, deadlock_timeout(), [&] { return generation_ != gen || broken_; })) {
        lock.unlock();
        fail(std::string(what) + ": barrier never completed (deadlock: some threads wait "
                                 "at a different barrier or loop forever)");
    }
    if (broken_) throw Unwind{};
}

void Barrier::leave() {
    if (turns_) {  // serialized: the caller holds the turn; Turns::m guards the state
        std::lock_guard<std::mutex> lk(turns_->m);
        --expected_;
        if (!waiting_.empty() && int(waiting_.size()) == expected_) {
            for (unsigned t : waiting_) turns_->state[t] = 0;
            waiting_.clear();
        }
        return;
    }
    std::lock_guard<std::mutex> lock(m_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
    }
}

void Barrier::breakdown() {
    if (turns_) turns_->breakdown();
    std::lock_guard<std::mutex> lock(m_);
    broken_ = true;
    cv_.notify_all();
}

[[noreturn]] void fail(const std::string& what) {
    Block* b = tls.block;
    if (!b) throw std::runtime_error(what);  // outside a launch
    {
        std::lock_guard<std::mutex> lock(b->error_m);
        if (b->error.empty()) {
            std::ostringstream s;
            s << what << " (block (" << tls.block_idx.x << ", " << tls.block_idx.y << ", " << tls.block_idx.z
              << "), thread (" << tls.thread_idx.x << ", " << tls.thread_idx.y << ", " << tls.thread_idx.z << "))";
            b->error = s.str();
        }
    }
    b->barrier.breakdown();
    for (auto& w : b->warps) w->barrier.breakdown();
    throw Unwind{};
}

void syncthreads() {
    ++tls.syncs;
    tls.block->barrier.arrive_and_wait("__syncthreads");
}

static void check_mask(unsigned mask, const char* op) {
    if (mask != tls.warp->full_mask) {
        std::ostringstream s;
        s << op << ": mask 0x" << std::hex << mask << " is not the whole warp (0x" << tls.warp->full_mask
          << "); the emulator (and these kernels) use full-warp collectives only";
        fail(s.str());
    }
}

void syncwarp(unsigned mask) {
    check_mask(mask, "__syncwarp");
    ++tls.collectives;
    tls.warp->barrier.arrive_and_wait("__syncwarp");
}

std::uint64_t exchange(unsigned mask, std::uint64_t mine, unsigned src_lane, const char* op) {
    check_mask(mask, op);
    Warp& w = *tls.warp;
    if (!(w.full_mask >> src_lane & 1u)) fail(std::string(op) + ": source lane does not exist");
    const int buf = int(tls.collectives++ & 1u);
    w.slot[buf][tls.lane] = mine;
    w.barrier.arrive_and_wait(op);
    return w.slot[buf][src_lane];
}

unsigned ballot(unsigned mask, bool pred, const char* op) {
    check_mask(mask, op);
    Warp& w = *tls.warp;
    const int buf = int(tls.collectives++ & 1u);
    w.vote[buf][tls.lane] = pred;
    w.barrier.arrive_and_wait(op);
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((w.full_mask >> l & 1u) && w.vote[buf][l]) bits |= 1u << l;
    return bits;
}

void* dynamic_shared() { return tls.block->shared.data(); }

static const char* const kScheduleNames[] = {"threads", "forward", "reverse"};

int schedule() {
    int s = g_schedule.load();
    if (s < 0) {
        s = 0;
        if (const char* e = std::getenv("NUMFORMER_EMU_SCHEDULE"))
            for (int i = 0; i < 3; ++i)
                if (std::string(e) == kScheduleNames[i]) s = i;
        g_schedule.store(s);
    }
    return s;
}

std::string set_schedule(const std::string& name) {
    const std::string old = kScheduleNames[schedule()];
    for (int i = 0; i < 3; ++i)
        if (name == kScheduleNames[i]) {
            g_schedule.store(i);
            return old;
        }
    throw std::invalid_argument("unknown emulator schedule '" + name + "' (threads, forward, reverse)");
}

std::mutex& atomic_mutex() {
    static std::mutex m;
    return m;
}

void run_launch(const char* name, dim3 grid, dim3 block, std::size_t smem,
                const std::function<void()>& body) {
    const unsigned long long nthreads = 1ull * block.x * block.y * block.z;
    const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
    auto bad = [&](const std::string& why) {
        throw std::runtime_error(std::string(name) + ": invalid launch configuration: " + why);
    };
    if (nthreads == 0 || nthreads > 1024) bad(std::to_string(nthreads) + " threads per block (1..1024)");
    if (block.z > 64) bad("blockDim.z > 64");
    if (grid.y > 65535 || grid.z > 65535) bad("gridDim.y/z > 65535");
    if (smem > 227u * 1024u) bad(std::to_string(smem) + " bytes of shared memory (> 227 KiB)");
    if (nblocks == 0) return;  // CUDA rejects an empty grid; our launchers never make one

    // One launch at a time in the process: static __shared__ variables and the
    // atomic lock are process-wide.
    static std::mutex launch_m;
    std::lock_guard<std::mutex> launch_lock(launch_m);

    const unsigned nwarps = unsigned((nthreads + 31) / 32);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block blk;
                const int sched = schedule();
                if (sched != 0) blk.turns = std::make_unique<Turns>(unsigned(nthreads), sched == 2);
                blk.barrier.reset(int(nthreads), blk.turns.get());
                blk.shared.assign(smem, 0xFF);  // poison: NaN floats, −1 ints (exact size: ASan sees overruns)
                blk.thread_syncs.assign(nthreads, 0);
                for (unsigned w = 0; w < nwarps; ++w) {
                    auto warp = std::make_unique<Warp>();
                    const unsigned lanes = unsigned(std::min<unsigned long long>(32, nthreads - 32ull * w));
                    warp->full_mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
                    warp->barrier.reset(int(lanes), blk.turns.get());
                    warp->lane_collectives.assign(lanes, 0);
                    blk.warps.push_back(std::move(warp));
                }
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                auto run_thread = [&](unsigned long long t) {
                    tls = ThreadCtx{};
                    tls.thread_idx = {unsigned(t % block.x), unsigned(t / block.x % block.y),
                                      unsigned(t / (1ull * block.x * block.y))};
                    tls.block_idx = {bx, by, bz};
                    tls.block_dim = block;
                    tls.grid_dim = grid;
                    tls.block = &blk;
                    tls.warp = blk.warps[t / 32].get();
                    tls.lane = unsigned(t % 32);
                    tls.linear = unsigned(t);
                    try {
                        if (blk.turns) {  // serialized: wait for this thread's first turn
                            std::unique_lock<std::mutex> lk(blk.turns->m);
                            blk.turns->wait_turn(lk, unsigned(t));
                        }
                        body();
                    } catch (const Unwind&) {
                    } catch (const std::exception& e) {
                        try { fail(std::string("exception in kernel: ") + e.what()); } catch (const Unwind&) {}
                    }
                    blk.thread_syncs[t] = tls.syncs;
                    tls.warp->lane_collectives[tls.lane] = tls.collectives;
                    // An exited thread no longer takes part in barriers.
                    tls.warp->barrier.leave();
                    blk.barrier.leave();
                    if (blk.turns) {  // hand the turn on
                        Turns& T = *blk.turns;
                        std::unique_lock<std::mutex> lk(T.m);
                        T.state[t] = 2;
                        if (!T.pass_locked() && T.anyone_waiting() && !T.broken) {
                            lk.unlock();
                            try {
                                fail("deadlock: the last running thread exited while others wait at a barrier");
                            } catch (const Unwind&) {
                            }
                        }
                    }
                    tls = ThreadCtx{};
                };
                if (blk.turns) {
                    std::lock_guard<std::mutex> lk(blk.turns->m);
                    blk.turns->pass_locked();  // the first thread in order starts
                }
                try {
                    for (unsigned long long t = 0; t < nthreads; ++t) threads.emplace_back(run_thread, t);
                } catch (const std::system_error& e) {
                    // Out of OS threads: release the ones started (they unwind at
                    // their next barrier), join them, and report instead of crashing.
                    blk.barrier.breakdown();
                    for (auto& w : blk.warps) w->barrier.breakdown();
                    for (auto& th : threads) th.join();
                    throw std::runtime_error(std::string(name) + ": the emulator could not start " +
                                             std::to_string(nthreads) + " threads: " + e.what());
                }
                for (auto& th : threads) th.join();
                if (!blk.error.empty()) throw std::runtime_error(std::string(name) + ": " + blk.error);
                // Barrier discipline: every thread of the block must have made the
                // same number of __syncthreads() calls, every lane of a warp the
                // same number of collectives; otherwise the kernel relies on
                // behaviour CUDA leaves undefined.
                for (unsigned long long t = 1; t < nthreads; ++t)
                    if (blk.thread_syncs[t] != blk.thread_syncs[0]) {
                        std::ostringstream s;
                        s << name << ": threads 0 and " << t << " of block (" << bx << ", " << by << ", " << bz
                          << ") called __syncthreads() " << blk.thread_syncs[0] << " and " << blk.thread_syncs[t]
                          << " times (divergent barrier)";
                        throw std::runtime_error(s.str());
                    }
                for (unsigned w = 0; w < nwarps; ++w) {
                    const auto& c = blk.warps[w]->lane_collectives;
                    for (std::size_t l = 1; l < c.size(); ++l)
                        if (c[l] != c[0]) {
                            std::ostringstream s;
                            s << name << ": lanes 0 and " << l << " of warp " << w << " in block (" << bx << ", "
                              << by << ", " << bz << ") made " << c[0] << " and " << c[l]
                              << " warp-collective calls (divergent shuffle/vote)";
                            throw std::runtime_error(s.str());
                        }
                }
            }
}

}  // namespace nf_emu
