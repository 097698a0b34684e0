// Scheduler: the persistent batch. Owns the BlockManager, the SequenceManager and every request.
//
// One engine step (one thread):
//     const Plan& plan = sched.schedule();   // admit, allocate blocks, emit the flat plan
//     ... forward(plan) + sampler -> one token per plan.sample_idx entry ...
//     auto events = sched.update(tokens, S);  // append, stop checks, finish / park
//
// Pipelined ("async scheduling"): schedule(/*ahead=*/true) may be called while ONE plan (A) is
// outstanding, so that the engine launches the next step (B) before A's tokens reach the host:
//     A = schedule(); launch(A);
//     loop: B = schedule(true); launch(B, prev_tokens = A's device tokens);
//           update(A's tokens);  A = B;
// A request that samples in A has one pending token (position len = its committed length). B
// may give it a decode row at position len whose input id is the placeholder -(j+1), j = its
// index in A's sample list (step_input.py resolves it on the device); positions, kv_lens,
// slot_mapping and blocks count the pending token. No row is given when the pending token would
// reach a count-based limit (request_output_len, session_len), nor to a request being cancelled.
// A prefill chunk that does not sample may be followed by the next chunk in B as well.
// update() always commits the OLDEST outstanding plan. When that commit finishes a request
// (EOS, stop word) that also has a row in B, the row is detached from B: its in-flight
// tokens are dropped from the session (num_cached stays at what A wrote, so the next turn
// re-feeds the last token exactly as in the synchronous protocol), the blocks only it needed
// are freed, and its token is ignored when B is committed. B may still write into those blocks
// on the device; only a later plan can reuse them, and stream order puts its writes after B's.
// cancel() detaches a request from every outstanding plan the same way and finishes it at once.
// A request with a row in any outstanding plan is never preempted. discard_plan() drops the
// NEWEST outstanding plan (drop B before A: B's placeholders refer to A).
//
// schedule():
//   1. admits waiting requests in FIFO order while fewer than max_batch_size are running
//      (preempted requests are re-queued at the head and keep their original priority) and
//      while the pool can take them: the head is admitted only if the free blocks (idle
//      sessions' included, they can be evicted) cover its whole context plus `admit_horizon`
//      tokens of growth, on top of the same for every running request (prompt still to
//      prefill + the next admit_horizon tokens). Nobody overtakes a head that does not fit;
//      with nothing running the head is always admitted. Without this check a full pool
//      thrashes: a new prompt takes the last blocks, the next decode step preempts it, it is
//      re-admitted at once, and its prefill is computed again and again;
//      admission applies START (create, replacing an existing session) or fetch + `step`
//      truncation, appends the input, inserts start_id when history and input are both empty;
//   2. decode rows first: every running request with exactly one token (committed or pending)
//      without KV that samples (oldest first), one token each;
//   3. then prefill rows, oldest first, within `max_prefill_tokens` tokens per step (within
//      `max_mixed_prefill_tokens` when the step has decode rows and that is set: a prompt that
//      arrives while others decode then lengthens their next token by at most that many
//      tokens' work); with chunked prefill a prompt is split over steps and its row samples
//      only in the step that completes it;
//   blocks: when the pool is short, idle sessions are evicted LRU-first; then the most recently
//   admitted running request that is in no plan (this one or an outstanding one) is preempted
//   (its blocks freed, its tokens kept, re-queued at the head to re-prefill later); a prefill
//   chunk rather shrinks to the blocks it can get before preempting anyone.
//
// The plan's arrays are fixed-capacity buffers owned by the scheduler; there are two, used in
// turn: a plan's arrays stay valid until the second schedule() after it.
// The block table is updated incrementally per row.
//
// Not thread-safe. Never aborts on bad input: requests are rejected with an error event; misuse
// of the step protocol (schedule with a plan outstanding without `ahead`, or with two; wrong
// token count) throws std::logic_error / std::invalid_argument before changing anything.
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
    int  max_mixed_prefill_tokens = 0;  // ... of a step with decode rows (0: max_prefill_tokens)
    int  session_len        = 2048;
    int  vocab_size         = 32000;
    int  start_id           = 1;
    int  end_id             = 2;
    bool chunked_prefill    = true;  // false: a prompt is prefilled whole in one step
    int  admit_horizon      = 32;    // tokens of growth reserved per request at admission (< 0: no check)
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

    // STOP for `session_id`: a running request finishes at once with reason cancel, its cache
    // kept (erased when end); its rows in outstanding plans are dropped, so the session is as if
    // it had been cancelled before those steps. A queued one is removed. Not active: end erases
    // the session, else kInactive. The event comes with the next update().
    int32_t cancel(uint64_t session_id, bool end);

    // `ahead`: one plan may be outstanding (pipelined); without it none may.
    const Plan& schedule(bool ahead = false);
    // Commits the oldest outstanding plan with one sampled token per plan.sample_idx entry
    // (nothing when no plan is outstanding) and returns the events since the previous update().
    std::shared_ptr<Events> update(const int32_t* tokens, size_t n);
    // Drops the newest outstanding plan (e.g. its forward failed): nothing of it is committed.
    void discard_plan();
    bool plan_outstanding() const { return num_out_ > 0; }
    int  num_outstanding() const { return num_out_; }

    // Introspection.
    const SchedulerConfig& config() const { return cfg_; }
    const Plan&            plan() const { return bufs_[cur_].plan; }
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
    // One row of a plan; r == nullptr once detached (its request finished before the commit).
    struct Row {
        Request* r;
        int32_t  chunk;
        bool     samples;
    };
    // A plan and what the scheduler needs to commit it. Two, used in turn (see the top).
    struct PlanBuffer {
        Plan                  plan;
        std::vector<Row>      rows;         // [B]: decode rows first, as in the plan
        std::vector<int32_t>  sample_rows;  // [S]: the row of each sample
        std::vector<uint64_t> owner_uid, owner_version;  // per block-table row: what it holds
        std::vector<int32_t>  owner_len;
    };

    int64_t reject(int64_t handle, uint64_t session_id, int32_t code, const std::string& msg);
    int32_t stop_request(uint64_t session_id, bool end, std::string& msg);
    bool    admit(Request* r);
    bool    pool_can_admit(const Request* r, int64_t& reserved, int64_t& available) const;
    int64_t blocks_wanted(const Request* r) const;
    void    insert_running(Request* r);
    void    preempt(size_t index);
    size_t  victim_from(size_t from, uint64_t step) const;
    bool    wants_decode_row(const Request* r) const;
    bool    grow_for(size_t& i, Request* r, int64_t tokens, uint64_t step, bool decode);
    void    finish(Request* r, FinishReason reason, const int32_t* toks, int n);
    void    finish_committed(Request* r, FinishReason reason, const int32_t* toks, int n);
    void    detach(Request* r);
    void    drop_row(Row& row, int buf);
    void    reap();
    void    push_event(const Request* r, const int32_t* toks, int n, bool finished, int8_t reason);
    void    emit_row(PlanBuffer& pb, int buf, Request* r, int b, int32_t chunk, bool samples);
    void    warn(std::string msg);
    std::shared_ptr<Events> take_events();

    SchedulerConfig cfg_;
    BlockManager    blocks_;
    SequenceManager seqs_;

    std::unordered_map<uint64_t, std::unique_ptr<Request>> active_;  // session id -> its request
    std::deque<Request*>  waiting_;
    std::vector<Request*> running_;   // sorted by admit_seq (oldest first)
    std::vector<Request*> finished_;  // to reap
    std::vector<Request*> decode_rows_, prefill_rows_;  // of the plan being built
    std::vector<int32_t>  prefill_chunks_;
    std::vector<uint8_t>  prefill_samples_;

    PlanBuffer bufs_[2];
    int        cur_    = 1;           // buffer of the latest schedule()
    int        out_[2] = {-1, -1};    // buffers of the outstanding plans, oldest first
    int        num_out_ = 0;
    uint64_t   step_counter_ = 0;

    Events                   events_;
    std::vector<std::string> warnings_;
    int64_t                  next_handle_  = 1;
    uint64_t                 admit_counter_ = 0;
    uint64_t                 num_preemptions_ = 0;
    int32_t                  last_code_ = 0;
    std::string              last_message_;
};

}  // namespace turbomind
