// BlockManager: the pool of paged-KV-cache blocks.
//
// The pool holds `num_blocks` blocks of `block_size` tokens each, named by ids 0..num_blocks-1.
// Every block has a reference count: 0 means the block is on the free list, >= 1 means one or
// more sequences use it (> 1 once a block is shared, e.g. a common prompt prefix).
//
// Cost: allocate(n) is O(n), free / incref are O(len(ids)), everything else O(1) except
// check_invariants() which is O(num_blocks). The free list is a LIFO stack, so a freed block
// is the next one handed out (it is the one most likely to still be warm in cache).
//
// Errors never abort and never leave the pool half-changed:
//   - bad arguments (negative n, id out of range, double free, incref of a free block) throw
//     std::invalid_argument (Python: ValueError);
//   - asking for more blocks than are free throws OutOfBlocks (Python: OutOfBlocksError, a
//     RuntimeError); try_allocate() reports the same condition by returning false instead;
//   - a broken invariant found by check_invariants() throws std::runtime_error (RuntimeError).
//
// Not thread-safe: the engine's step loop owns it from a single thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace turbomind {

using BlockId = int32_t;

// Raised when an allocation asks for more blocks than the pool has free.
class OutOfBlocks: public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class BlockManager {
public:
    BlockManager(int num_blocks, int block_size);

    // All-or-nothing: appends n block ids to `out` and returns true, or returns false with the
    // pool and `out` unchanged when fewer than n blocks are free. Throws only for n < 0.
    bool try_allocate(int n, std::vector<BlockId>& out);

    // As try_allocate, but returns the ids and throws OutOfBlocks when short of blocks.
    std::vector<BlockId> allocate(int n);

    // Drops one reference from each listed block (an id listed twice drops two); a block whose
    // count reaches 0 goes back to the free list. Validates everything before any change sticks.
    void free(const BlockId* ids, size_t count);
    void free(const std::vector<BlockId>& ids) { free(ids.data(), ids.size()); }

    // Adds one reference to each listed block, which must be in use.
    void incref(const BlockId* ids, size_t count);
    void incref(const std::vector<BlockId>& ids) { incref(ids.data(), ids.size()); }

    int ref_count(BlockId id) const;

    int num_blocks() const { return num_blocks_; }
    int block_size() const { return block_size_; }
    int num_free() const { return static_cast<int>(free_list_.size()); }
    int num_used() const { return num_blocks_ - num_free(); }
    bool can_allocate(int n) const { return n >= 0 && n <= num_free(); }

    // Blocks needed to hold `num_tokens` tokens: ceil(num_tokens / block_size).
    int64_t blocks_for_tokens(int64_t num_tokens) const;

    const std::vector<int32_t>& ref_counts() const { return ref_count_; }

    // Throws std::runtime_error describing the first inconsistency found.
    void check_invariants() const;

private:
    void check_id(BlockId id, const char* op) const;

    int                  num_blocks_;
    int                  block_size_;
    std::vector<int32_t> ref_count_;  // per block; 0 <=> on the free list
    std::vector<BlockId> free_list_;  // stack of free ids; back() is handed out next
};

}  // namespace turbomind
