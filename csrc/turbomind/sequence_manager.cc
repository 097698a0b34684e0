#include "sequence_manager.h"

#include <algorithm>
#include <stdexcept>

namespace turbomind {

SequenceManager::SequenceManager(BlockManager& blocks): blocks_(blocks) {}

SequenceManager::~SequenceManager()
{
    // Give the blocks back, so that a BlockManager outliving us is left consistent.
    for (auto& kv : sessions_) {
        if (!kv.second->blocks.empty()) {
            blocks_.free(kv.second->blocks);
        }
    }
}

Session* SequenceManager::create(uint64_t id, bool* replaced)
{
    const bool existed = erase(id);
    if (replaced) {
        *replaced = existed;
    }
    auto s      = std::make_unique<Session>();
    s->id       = id;
    s->uid      = next_uid_++;
    s->last_use = ++clock_;
    Session* p  = s.get();
    sessions_.emplace(id, std::move(s));
    return p;
}

Session* SequenceManager::find(uint64_t id) const
{
    auto it = sessions_.find(id);
    return it == sessions_.end() ? nullptr : it->second.get();
}

bool SequenceManager::erase(uint64_t id)
{
    auto it = sessions_.find(id);
    if (it == sessions_.end()) {
        return false;
    }
    Session* s = it->second.get();
    lru_unlink(s);
    if (!s->blocks.empty()) {
        blocks_.free(s->blocks);
    }
    sessions_.erase(it);
    return true;
}

void SequenceManager::lru_unlink(Session* s)
{
    if (s->in_lru) {
        lru_.erase(s->lru_it);
        s->in_lru = false;
    }
}

// Idle sessions with blocks are on the list; appended at the back (most recently used).
void SequenceManager::lru_relink(Session* s)
{
    const bool want = s->status == Session::kIdle && !s->blocks.empty();
    if (want && !s->in_lru) {
        s->lru_it = lru_.insert(lru_.end(), s);
        s->in_lru = true;
    }
    else if (!want) {
        lru_unlink(s);
    }
}

void SequenceManager::shrink_blocks(Session* s, int64_t num_tokens)
{
    const size_t keep = static_cast<size_t>(blocks_for(num_tokens));
    if (s->blocks.size() > keep) {
        blocks_.free(s->blocks.data() + keep, s->blocks.size() - keep);
        s->blocks.resize(keep);
        ++s->blocks_version;
    }
}

bool SequenceManager::truncate(Session* s, int64_t step)
{
    if (step < 0 || step > static_cast<int64_t>(s->tokens.size())) {
        return false;
    }
    if (s->inflight) {
        throw std::invalid_argument("SequenceManager.truncate: session " + std::to_string(s->id)
                                    + " is in an outstanding step");
    }
    s->tokens.resize(step);
    s->num_cached = std::min(s->num_cached, step);
    shrink_blocks(s, s->num_cached);
    lru_relink(s);
    return true;
}

void SequenceManager::uncache(Session* s, int64_t n)
{
    if (n < 0 || n > s->num_cached || s->inflight) {
        throw std::invalid_argument("SequenceManager.uncache: bad length " + std::to_string(n) + " for session "
                                    + std::to_string(s->id));
    }
    s->num_cached = n;
    shrink_blocks(s, n);
    lru_relink(s);
}

void SequenceManager::retract(Session* s, int64_t n)
{
    if (n < 0 || n > s->inflight) {
        throw std::invalid_argument("SequenceManager.retract: " + std::to_string(n) + " of "
                                    + std::to_string(s->inflight) + " in-flight tokens for session "
                                    + std::to_string(s->id));
    }
    s->inflight -= n;
    shrink_blocks(s, s->num_cached + s->inflight);
    lru_relink(s);
}

void SequenceManager::activate(Session* s)
{
    s->status = Session::kActive;
    lru_unlink(s);
}

void SequenceManager::park(Session* s)
{
    s->status   = Session::kIdle;
    s->last_use = ++clock_;
    lru_unlink(s);  // re-append: it is now the most recently used
    lru_relink(s);
}

void SequenceManager::release(Session* s)
{
    if (!s->blocks.empty()) {
        blocks_.free(s->blocks);
        s->blocks.clear();
        ++s->blocks_version;
    }
    s->num_cached = 0;
    s->inflight   = 0;
    lru_unlink(s);
}

bool SequenceManager::evict_lru()
{
    if (lru_.empty()) {
        return false;
    }
    Session* s = lru_.front();
    release(s);
    ++num_evictions_;
    return true;
}

bool SequenceManager::grow(Session* s, int64_t num_tokens)
{
    const int64_t have = static_cast<int64_t>(s->blocks.size());
    const int64_t need = blocks_for(num_tokens) - have;
    if (need <= 0) {
        return true;
    }
    // Never evict the session being grown (it may be idle when driven directly): take it off
    // the LRU list meanwhile; using it makes it the most recently used.
    lru_unlink(s);
    if (s->status == Session::kIdle) {
        s->last_use = ++clock_;
    }
    while (blocks_.num_free() < need) {
        if (!evict_lru()) {
            lru_relink(s);
            return false;
        }
    }
    blocks_.try_allocate(static_cast<int>(need), s->blocks);
    lru_relink(s);
    return true;
}

int64_t SequenceManager::evictable_blocks() const
{
    int64_t n = 0;
    for (const Session* s : lru_) {
        n += static_cast<int64_t>(s->blocks.size());
    }
    return n;
}

std::vector<uint64_t> SequenceManager::session_ids() const
{
    std::vector<uint64_t> ids;
    ids.reserve(sessions_.size());
    for (auto& kv : sessions_) {
        ids.push_back(kv.first);
    }
    std::sort(ids.begin(), ids.end());
    return ids;
}

void SequenceManager::check_invariants() const
{
    auto fail = [](const std::string& what) {
        throw std::runtime_error("SequenceManager invariant violated: " + what);
    };
    blocks_.check_invariants();
    std::vector<int32_t> uses(blocks_.num_blocks(), 0);
    size_t               expect_lru = 0;
    for (auto& kv : sessions_) {
        const Session& s  = *kv.second;
        const auto     id = std::to_string(s.id);
        if (s.id != kv.first) {
            fail("session keyed " + std::to_string(kv.first) + " has id " + id);
        }
        // A pipelined plan may write the K/V of one token that is still being sampled.
        if (s.num_cached < 0 || s.inflight < 0
            || s.num_cached + s.inflight > static_cast<int64_t>(s.tokens.size()) + 1) {
            fail("session " + id + ": num_cached " + std::to_string(s.num_cached) + " + inflight "
                 + std::to_string(s.inflight) + " exceeds its " + std::to_string(s.tokens.size()) + " tokens");
        }
        if (static_cast<int64_t>(s.blocks.size()) != blocks_for(s.num_cached + s.inflight)) {
            fail("session " + id + " holds " + std::to_string(s.blocks.size()) + " blocks for "
                 + std::to_string(s.num_cached + s.inflight) + " cached tokens");
        }
        for (BlockId b : s.blocks) {
            if (b < 0 || b >= blocks_.num_blocks()) {
                fail("session " + id + " holds out-of-range block " + std::to_string(b));
            }
            ++uses[b];
        }
        const bool want_lru = s.status == Session::kIdle && !s.blocks.empty();
        if (want_lru != s.in_lru) {
            fail("session " + id + (want_lru ? " is idle with blocks but not evictable" : " is wrongly on the LRU list"));
        }
        expect_lru += want_lru;
        if (s.last_use > clock_) {
            fail("session " + id + " last-use time is in the future");
        }
    }
    if (expect_lru != lru_.size()) {
        fail("LRU list holds " + std::to_string(lru_.size()) + " sessions, expected " + std::to_string(expect_lru));
    }
    uint64_t prev = 0;
    for (const Session* s : lru_) {
        if (s->last_use < prev) {
            fail("LRU list is not ordered by last-use time");
        }
        prev = s->last_use;
    }
    const auto& rc = blocks_.ref_counts();
    for (int b = 0; b < blocks_.num_blocks(); ++b) {
        if (rc[b] != uses[b]) {
            fail("block " + std::to_string(b) + " has ref count " + std::to_string(rc[b]) + " but "
                 + std::to_string(uses[b]) + " session uses");
        }
    }
}

}  // namespace turbomind
