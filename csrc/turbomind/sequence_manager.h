// SequenceManager: interactive sessions keyed by session_id, and their KV blocks.
//
// A session holds its whole token history; the first `num_cached` tokens have their K/V in the
// session's blocks (blocks.size() == blocks_for(num_cached + inflight), where `inflight` is what
// outstanding step plans are writing, possibly including one token still being sampled). A session is *active* while a request uses it and
// *idle* otherwise. Idle sessions that hold blocks sit on an LRU list (ordered by last-use
// time, a logical clock bumped whenever a session is parked); when blocks run short, grow()
// evicts them least-recently-used first: their blocks go back to the pool and num_cached
// drops to 0, their tokens stay, and their next turn re-prefills the history.
//
// The SequenceManager assumes it is the only user of its BlockManager, which
// check_invariants() relies on (every block's ref count == its uses by sessions).
// Not thread-safe; never aborts: misuse throws std::invalid_argument.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_manager.h"

namespace turbomind {

struct Session {
    enum Status : int8_t { kIdle, kActive };

    uint64_t             id  = 0;
    uint64_t             uid = 0;  // unique over the manager's lifetime (never reused)
    std::vector<int32_t> tokens;
    int64_t              num_cached = 0;
    int64_t              inflight   = 0;  // tokens an outstanding plan writes after num_cached
    std::vector<BlockId> blocks;
    uint64_t             blocks_version = 0;  // bumped whenever blocks are removed (not appended)
    uint64_t             last_use       = 0;
    Status               status         = kIdle;
    bool                 has_seed       = false;
    uint64_t             seed           = 0;

    // LRU bookkeeping (idle sessions holding blocks only).
    bool                          in_lru = false;
    std::list<Session*>::iterator lru_it;
};

class SequenceManager {
public:
    explicit SequenceManager(BlockManager& blocks);
    ~SequenceManager();
    SequenceManager(const SequenceManager&) = delete;
    SequenceManager& operator=(const SequenceManager&) = delete;

    // START: a new, empty, idle session. An existing one with that id is erased first
    // (`replaced` tells); its blocks go back to the pool.
    Session* create(uint64_t id, bool* replaced = nullptr);
    // nullptr when unknown.
    Session* find(uint64_t id) const;
    // END: erase the session and free its blocks. False when unknown.
    bool erase(uint64_t id);

    // v0.0.2 `step`: if 0 <= step <= tokens, keep the first `step` tokens, num_cached =
    // min(num_cached, step) and free the blocks past it; returns true. Otherwise returns false
    // and changes nothing (the caller warns when step > tokens).
    bool truncate(Session* s, int64_t step);
    // Drop cached KV down to `n` tokens (n <= num_cached), freeing blocks past it.
    void uncache(Session* s, int64_t n);
    // Drop `n` in-flight tokens (their plan was dropped), freeing the blocks only they needed.
    void retract(Session* s, int64_t n);

    // A request takes the session (not evictable) / gives it back (idle, last-use = now).
    void activate(Session* s);
    void park(Session* s);

    // Make s hold blocks for `num_tokens` tokens, evicting idle sessions LRU-first if the pool
    // is short. All or nothing: false (with only evictions done) when it cannot.
    bool grow(Session* s, int64_t num_tokens);
    // Free all of a session's blocks (preemption or eviction): num_cached = 0, tokens stay.
    void release(Session* s);
    // Evict the least-recently-used idle session holding blocks; false if there is none.
    bool evict_lru();

    int64_t blocks_for(int64_t num_tokens) const { return blocks_.blocks_for_tokens(num_tokens); }
    BlockManager&       block_manager() { return blocks_; }
    const BlockManager& block_manager() const { return blocks_; }

    size_t   num_sessions() const { return sessions_.size(); }
    size_t   num_evictable() const { return lru_.size(); }
    int64_t  evictable_blocks() const;  // blocks held by idle sessions (O(idle sessions))
    uint64_t num_evictions() const { return num_evictions_; }
    uint64_t clock() const { return clock_; }
    std::vector<uint64_t> session_ids() const;

    // Throws std::runtime_error describing the first inconsistency: per-session bounds,
    // blocks covering exactly num_cached + inflight, the LRU list (idle sessions with blocks,
    // oldest first), and the union of all sessions' blocks with multiplicity == ref counts.
    void check_invariants() const;

private:
    void lru_unlink(Session* s);
    void lru_relink(Session* s);
    void shrink_blocks(Session* s, int64_t num_tokens);

    BlockManager&                                          blocks_;
    std::unordered_map<uint64_t, std::unique_ptr<Session>> sessions_;
    std::list<Session*>                                    lru_;  // front = least recently used
    uint64_t                                               clock_         = 0;
    uint64_t                                               next_uid_      = 1;
    uint64_t                                               num_evictions_ = 0;
};

}  // namespace turbomind
