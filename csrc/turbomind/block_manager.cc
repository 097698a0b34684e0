#include "block_manager.h"

#include <limits>

namespace turbomind {

namespace {

std::string pool_state(int num_free, int num_blocks)
{
    return std::to_string(num_free) + " of " + std::to_string(num_blocks) + " blocks are free";
}

}  // namespace

BlockManager::BlockManager(int num_blocks, int block_size): num_blocks_(num_blocks), block_size_(block_size)
{
    if (num_blocks < 0) {
        throw std::invalid_argument("BlockManager: num_blocks must be >= 0, got " + std::to_string(num_blocks));
    }
    if (block_size <= 0) {
        throw std::invalid_argument("BlockManager: block_size must be > 0, got " + std::to_string(block_size));
    }
    ref_count_.assign(num_blocks, 0);
    free_list_.reserve(num_blocks);
    // Pushed in reverse so that a fresh pool hands out 0, 1, 2, ...
    for (BlockId id = num_blocks - 1; id >= 0; --id) {
        free_list_.push_back(id);
    }
}

void BlockManager::check_id(BlockId id, const char* op) const
{
    if (id < 0 || id >= num_blocks_) {
        throw std::invalid_argument(std::string("BlockManager.") + op + ": block id " + std::to_string(id)
                                    + " is out of range [0, " + std::to_string(num_blocks_) + ")");
    }
}

bool BlockManager::try_allocate(int n, std::vector<BlockId>& out)
{
    if (n < 0) {
        throw std::invalid_argument("BlockManager.allocate: n must be >= 0, got " + std::to_string(n));
    }
    if (n > num_free()) {
        return false;
    }
    out.reserve(out.size() + n);
    for (int i = 0; i < n; ++i) {
        const BlockId id = free_list_.back();
        free_list_.pop_back();
        ref_count_[id] = 1;
        out.push_back(id);
    }
    return true;
}

std::vector<BlockId> BlockManager::allocate(int n)
{
    std::vector<BlockId> ids;
    if (!try_allocate(n, ids)) {
        throw OutOfBlocks("BlockManager.allocate: out of KV blocks: requested " + std::to_string(n) + " but only "
                          + pool_state(num_free(), num_blocks_));
    }
    return ids;
}

void BlockManager::free(const BlockId* ids, size_t count)
{
    for (size_t i = 0; i < count; ++i) {
        check_id(ids[i], "free");
    }
    // Apply the decrements in order; stop at the first block with nothing left to drop.
    size_t i = 0;
    for (; i < count; ++i) {
        int32_t& rc = ref_count_[ids[i]];
        if (rc == 0) {
            break;
        }
        if (--rc == 0) {
            free_list_.push_back(ids[i]);
        }
    }
    if (i == count) {
        return;
    }
    // Roll back in reverse. A block at 0 now was pushed by its last decrement, which is the first
    // one met walking backwards, and everything pushed after it has been popped already.
    const BlockId bad = ids[i];
    while (i-- > 0) {
        int32_t& rc = ref_count_[ids[i]];
        if (rc == 0) {
            free_list_.pop_back();
        }
        ++rc;
    }
    const int32_t refs = ref_count_[bad];
    if (refs == 0) {
        throw std::invalid_argument("BlockManager.free: double free of block " + std::to_string(bad)
                                    + " (it is already free)");
    }
    throw std::invalid_argument("BlockManager.free: block " + std::to_string(bad)
                                + " is listed more times than its reference count (" + std::to_string(refs) + ")");
}

void BlockManager::incref(const BlockId* ids, size_t count)
{
    for (size_t i = 0; i < count; ++i) {
        const BlockId id = ids[i];
        check_id(id, "incref");
        if (ref_count_[id] == 0) {
            throw std::invalid_argument("BlockManager.incref: block " + std::to_string(id)
                                        + " is free; only blocks in use can be shared");
        }
        // Duplicates in `ids` are bounded by count, so this also rules out overflow below.
        if (ref_count_[id] > std::numeric_limits<int32_t>::max() - static_cast<int64_t>(count)) {
            throw std::overflow_error("BlockManager.incref: reference count of block " + std::to_string(id)
                                      + " would overflow");
        }
    }
    for (size_t i = 0; i < count; ++i) {
        ++ref_count_[ids[i]];
    }
}

int BlockManager::ref_count(BlockId id) const
{
    check_id(id, "ref_count");
    return ref_count_[id];
}

int64_t BlockManager::blocks_for_tokens(int64_t num_tokens) const
{
    if (num_tokens < 0) {
        throw std::invalid_argument("BlockManager.blocks_for_tokens: num_tokens must be >= 0, got "
                                    + std::to_string(num_tokens));
    }
    return (num_tokens + block_size_ - 1) / block_size_;
}

void BlockManager::check_invariants() const
{
    auto fail = [](const std::string& what) { throw std::runtime_error("BlockManager invariant violated: " + what); };

    if (ref_count_.size() != static_cast<size_t>(num_blocks_)) {
        fail("ref-count table has " + std::to_string(ref_count_.size()) + " entries for "
             + std::to_string(num_blocks_) + " blocks");
    }
    if (free_list_.size() > static_cast<size_t>(num_blocks_)) {
        fail("free list holds " + std::to_string(free_list_.size()) + " ids for " + std::to_string(num_blocks_)
             + " blocks");
    }
    std::vector<char> on_free_list(num_blocks_, 0);
    for (const BlockId id : free_list_) {
        if (id < 0 || id >= num_blocks_) {
            fail("free list holds out-of-range id " + std::to_string(id));
        }
        if (on_free_list[id]) {
            fail("block " + std::to_string(id) + " is on the free list twice");
        }
        on_free_list[id] = 1;
        if (ref_count_[id] != 0) {
            fail("block " + std::to_string(id) + " is on the free list with reference count "
                 + std::to_string(ref_count_[id]));
        }
    }
    int used = 0;
    for (int id = 0; id < num_blocks_; ++id) {
        const int32_t rc = ref_count_[id];
        if (rc < 0) {
            fail("block " + std::to_string(id) + " has negative reference count " + std::to_string(rc));
        }
        if (rc == 0 && !on_free_list[id]) {
            fail("block " + std::to_string(id) + " has reference count 0 but is not on the free list (leaked)");
        }
        used += rc > 0;
    }
    if (used + num_free() != num_blocks_) {
        fail(std::to_string(used) + " used + " + std::to_string(num_free()) + " free != " + std::to_string(num_blocks_)
             + " blocks");
    }
}

}  // namespace turbomind
