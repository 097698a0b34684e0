// Scheduler: the persistent batch. Owns the BlockManager, the SequenceManager and every request.
//
// One engine step (one thread):
//     const Plan& plan = sched.schedule();   // admit, allocate blocks, emit the flat plan
//     ... forward(plan) + sampler -> one token per plan.sample_idx entry ...
//     auto events = sched.update(tokens, S);  // append, stop checks, finish / park
//
// schedule():
//   1. admits waiting requests in FIFO order while fewer than max_batch_size are running
//      (preempted requests are re-queued at the head and keep their original priority);
//      admission applies START (create, replacing an existing session) or fetch + `step`
//      truncation, appends the input, inserts start_id when history and input are both empty;
//   2. decode rows first: every running request with exactly one token without KV that samples
//      (oldest first), one token each;
//   3. then prefill rows, oldest first, within `max_prefill_tokens` tokens per step; with
//      chunked prefill a prompt is split over steps and its row samples only in the step that
//      completes it;
//   blocks: when the pool is short, idle sessions are evicted LRU-first; then the most recently
//   admitted running request that is not already in the plan is preempted (its blocks freed,
//   its tokens kept, re-queued at the head to re-prefill later); a prefill chunk rather shrinks
//   to the blocks it can get before preempting anyone.
//
// The plan's arrays are fixed-capacity buffers owned by the scheduler: they stay valid (and are
// overwritten) until the next schedule(). The block table is updated incrementally per row.
//
// Not thread-safe. Never aborts on bad input: requests are rejected with an error event; misuse
// of the step protocol (schedule twice, wrong token count) throws std::logic_error /
// std::invalid_argument before changing anything.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "block_manager.h"
#include "request.h"
#include "sequence_manager.h"

namespace turbomind {

struct SchedulerConfig {
    int  num_blocks         = 0;
    int  block_size         = 64;
    int  max_batch_size     = 64;
    int  max_prefill_tokens = 8192;  // prefill tokens per step (decode rows come on top)
    int  session_len        = 2048;
    int  vocab_size         = 32000;
    int  start_id           = 1;
    int  end_id             = 2;
    bool chunked_prefill    = true;  // false: a prompt is prefilled whole in one step
};

struct Plan {
    // Capacities: rows <= max_batch_size, tokens <= max_batch_size + max(max_prefill_tokens,
    // session_len). block_table is [max_batch_size, width], width = blocks_for(session_len).
    std::vector<int32_t> input_ids, positions, slot_mapping;  // [T]
    std::vector<int32_t> cu_seqlens;                          // [B + 1]
    std::vector<int32_t> kv_lens;                             // [B]
    std::vector<int32_t> block_table;                         // [B, width], padded with -1
    std::vector<int64_t> row_handles;                         // [B]
    std::vector<int32_t> sample_idx;                          // [S] indices into T
    std::vector<int64_t> sample_handles;                      // [S]
    std::vector<int32_t> logits_idx;                          // [L] indices into T (logits_all)
    std::vector<int64_t> logits_handles;                      // [L]

    int      width = 0, block_size = 0;
    int      num_tokens = 0, batch_size = 0, num_samples = 0, num_logits = 0;
    int      num_decode = 0, max_q_len = 0, max_kv_len = 0;
    uint64_t step       = 0;
};

// Everything that happened to requests since the previous update(): one entry per request that
// got tokens, finished, or was rejected. Tokens of entry i: tokens[offsets[i]:offsets[i+1]].
struct Events {
    std::vector<int64_t>                       handles;
    std::vector<uint64_t>                      session_ids;
    std::vector<int32_t>                       offsets{0};
    std::vector<int32_t>                       tokens;
    std::vector<uint8_t>                       finished;
    std::vector<int8_t>                        reasons;  // FinishReason
    std::vector<int32_t>                       codes;    // ErrorCode (non-zero with kError)
    std::vector<int32_t>                       num_generated;
    std::vector<std::pair<int32_t, std::string>> messages;  // (entry index, text), errors only

    size_t size() const { return handles.size(); }
};

struct SessionInfo {
    bool                 found = false;
    std::vector<int32_t> tokens;
    int64_t              num_cached = 0;
    std::vector<BlockId> blocks;
    bool                 active   = false;
    uint64_t             last_use = 0;
    bool                 has_seed = false;
    uint64_t             seed     = 0;
};

class Scheduler {
public:
    explicit Scheduler(const SchedulerConfig& cfg);
    ~Scheduler();

    // Validates and queues a request; returns its handle (> 0, unique). A rejected request
    // (code != 0, see last_code()/last_message()) gets an error event in the next update().
    // `stop=true` is a stop request (see cancel); its own event reports the outcome.
    int64_t submit(const RequestArgs& args);
    int32_t            last_code() const { return last_code_; }
    const std::string& last_message() const { return last_message_; }

    // STOP for `session_id`: a running request finishes with reason cancel (at once, or in the
    // next update() if it is in the outstanding plan), its cache kept (erased when end); a
    // queued one is removed. Not active: end erases the session, else kInactive.
    int32_t cancel(uint64_t session_id, bool end);

    const Plan& schedule();
    // Commits the outstanding plan with one sampled token per plan.sample_idx entry (nothing
    // when no plan is outstanding) and returns the events since the previous update().
    std::shared_ptr<Events> update(const int32_t* tokens, size_t n);
    // Drops the outstanding plan (e.g. the forward failed): nothing of it is committed.
    void discard_plan();
    bool plan_outstanding() const { return plan_outstanding_; }

    // Introspection.
    const SchedulerConfig& config() const { return cfg_; }
    const Plan&            plan() const { return plan_; }
    SessionInfo            session_info(uint64_t id) const;
    std::string            request_state(int64_t handle) const;  // waiting|running|preempted|finished|unknown
    size_t                 num_running() const { return running_.size(); }
    size_t                 num_waiting() const { return waiting_.size(); }
    int                    num_free_blocks() const { return blocks_.num_free(); }
    size_t                 num_sessions() const { return seqs_.num_sessions(); }
    uint64_t               num_preemptions() const { return num_preemptions_; }
    uint64_t               num_evictions() const { return seqs_.num_evictions(); }
    std::vector<uint64_t>  session_ids() const { return seqs_.session_ids(); }
    std::vector<std::string> take_warnings();
    const BlockManager&    block_manager() const { return blocks_; }
    void                   check_invariants() const;

private:
    int64_t reject(int64_t handle, uint64_t session_id, int32_t code, const std::string& msg);
    int32_t stop_request(uint64_t session_id, bool end, std::string& msg);
    bool    admit(Request* r);
    void    insert_running(Request* r);
    void    preempt(size_t index);
    void    finish(Request* r, FinishReason reason, const int32_t* toks, int n);
    void    reap();
    void    push_event(const Request* r, const int32_t* toks, int n, bool finished, int8_t reason);
    void    emit_row(Request* r, int b);
    void    warn(std::string msg);
    std::shared_ptr<Events> take_events();

    SchedulerConfig cfg_;
    BlockManager    blocks_;
    SequenceManager seqs_;

    std::unordered_map<uint64_t, std::unique_ptr<Request>> active_;  // session id -> its request
    std::deque<Request*>  waiting_;
    std::vector<Request*> running_;   // sorted by admit_seq (oldest first)
    std::vector<Request*> finished_;  // to reap
    std::vector<Request*> decode_rows_, prefill_rows_, sample_reqs_;

    Plan                  plan_;
    std::vector<uint64_t> owner_uid_, owner_version_;  // per block-table row: what it holds
    std::vector<int32_t>  owner_len_;
    bool                  plan_outstanding_ = false;

    Events                   events_;
    std::vector<std::string> warnings_;
    int64_t                  next_handle_  = 1;
    uint64_t                 admit_counter_ = 0;
    uint64_t                 num_preemptions_ = 0;
    int32_t                  last_code_ = 0;
    std::string              last_message_;
};

}  // namespace turbomind
