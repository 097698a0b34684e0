#include "scheduler.h"

#include <algorithm>
#include <array>
#include <stdexcept>

namespace turbomind {

namespace {

std::string id_str(uint64_t id)
{
    return std::to_string(id);
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& cfg): cfg_(cfg), blocks_(cfg.num_blocks, cfg.block_size), seqs_(blocks_)
{
    auto need = [](bool ok, const std::string& what) {
        if (!ok) {
            throw std::invalid_argument("Scheduler: " + what);
        }
    };
    need(cfg.max_batch_size >= 1, "max_batch_size must be >= 1");
    need(cfg.max_prefill_tokens >= 1, "max_prefill_tokens must be >= 1");
    need(cfg.max_mixed_prefill_tokens >= 0, "max_mixed_prefill_tokens must be >= 0");
    need(cfg.session_len >= 2, "session_len must be >= 2");
    need(cfg.vocab_size >= 1, "vocab_size must be >= 1");
    need(cfg.start_id >= 0 && cfg.start_id < cfg.vocab_size, "start_id must be in [0, vocab_size)");
    need(cfg.end_id < cfg.vocab_size, "end_id must be < vocab_size (negative: none)");

    const int B = cfg.max_batch_size;
    const int T = B + std::max(cfg.max_prefill_tokens, cfg.session_len);
    for (PlanBuffer& pb : bufs_) {
        Plan& plan      = pb.plan;
        plan.width      = static_cast<int>(blocks_.blocks_for_tokens(cfg.session_len));
        plan.block_size = cfg.block_size;
        plan.input_ids.assign(T, 0);
        plan.positions.assign(T, 0);
        plan.slot_mapping.assign(T, 0);
        plan.cu_seqlens.assign(B + 1, 0);
        plan.kv_lens.assign(B, 0);
        plan.block_table.assign(static_cast<size_t>(B) * plan.width, -1);
        plan.row_handles.assign(B, 0);
        plan.sample_idx.assign(B, 0);
        plan.sample_handles.assign(B, 0);
        plan.logits_idx.assign(T, 0);
        plan.logits_handles.assign(T, 0);
        pb.rows.reserve(B);
        pb.sample_rows.reserve(B);
        pb.owner_uid.assign(B, 0);
        pb.owner_version.assign(B, 0);
        pb.owner_len.assign(B, plan.width);  // the whole row is "dirty" until first written
    }
    running_.reserve(B);
    decode_rows_.reserve(B);
    prefill_rows_.reserve(B);
    prefill_chunks_.reserve(B);
    prefill_samples_.reserve(B);
}

Scheduler::~Scheduler() = default;

void Scheduler::warn(std::string msg)
{
    if (warnings_.size() < 10000) {
        warnings_.push_back(std::move(msg));
    }
}

std::vector<std::string> Scheduler::take_warnings()
{
    std::vector<std::string> out;
    out.swap(warnings_);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Events

void Scheduler::push_event(const Request* r, const int32_t* toks, int n, bool finished, int8_t reason)
{
    events_.handles.push_back(r->handle);
    events_.session_ids.push_back(r->session_id);
    events_.tokens.insert(events_.tokens.end(), toks, toks + n);
    events_.offsets.push_back(static_cast<int32_t>(events_.tokens.size()));
    events_.finished.push_back(finished);
    events_.reasons.push_back(reason);
    events_.codes.push_back(0);
    events_.num_generated.push_back(static_cast<int32_t>(r->generated));
}

int64_t Scheduler::reject(int64_t handle, uint64_t session_id, int32_t code, const std::string& msg)
{
    last_code_    = code;
    last_message_ = msg;
    events_.handles.push_back(handle);
    events_.session_ids.push_back(session_id);
    events_.offsets.push_back(static_cast<int32_t>(events_.tokens.size()));
    events_.finished.push_back(1);
    events_.reasons.push_back(kError);
    events_.codes.push_back(code);
    events_.num_generated.push_back(0);
    events_.messages.emplace_back(static_cast<int32_t>(events_.handles.size() - 1), msg);
    warn("Skipping invalid request for id " + id_str(session_id) + ", code = " + std::to_string(code) + " ("
         + error_code_name(code) + "): " + msg);
    return handle;
}

std::shared_ptr<Events> Scheduler::take_events()
{
    auto out = std::make_shared<Events>();
    std::swap(*out, events_);
    // Start the next batch with room for a full decode step, so steps do not re-grow buffers.
    const size_t n = std::max(out->handles.size(), static_cast<size_t>(16));
    events_.handles.reserve(n);
    events_.session_ids.reserve(n);
    events_.offsets.reserve(n + 1);
    events_.tokens.reserve(n);
    events_.finished.reserve(n);
    events_.reasons.reserve(n);
    events_.codes.reserve(n);
    events_.num_generated.reserve(n);
    return out;
}

// ---------------------------------------------------------------------------------------------
// Requests

int64_t Scheduler::submit(const RequestArgs& a)
{
    const int64_t  handle = next_handle_++;
    const uint64_t sid    = a.session_id;
    last_code_            = kOk;
    last_message_.clear();

    if (a.stop) {
        if (a.sequence_start) {
            return reject(handle, sid, kInvalid, "START together with STOP");
        }
        std::string msg;
        const int32_t code = stop_request(sid, a.sequence_end, msg);
        if (code != kOk) {
            return reject(handle, sid, code, msg);
        }
        Request tmp;
        tmp.handle     = handle;
        tmp.session_id = sid;
        push_event(&tmp, nullptr, 0, true, kCancel);
        return handle;
    }

    const int64_t V = cfg_.vocab_size;
    if (a.request_output_len < 0) {
        return reject(handle, sid, kInvalid, "request_output_len must be >= 0, got " + std::to_string(a.request_output_len));
    }
    for (size_t i = 0; i < a.input_ids.size(); ++i) {
        if (a.input_ids[i] < 0 || a.input_ids[i] >= V) {
            return reject(handle, sid, kInvalid, "input_ids[" + std::to_string(i) + "] = " + std::to_string(a.input_ids[i])
                                                     + " is outside the vocabulary [0, " + std::to_string(V) + ")");
        }
    }
    for (int64_t w : a.stop_words) {
        if (w < 0 || w >= V) {
            return reject(handle, sid, kInvalid, "stop word " + std::to_string(w) + " is outside the vocabulary");
        }
    }
    if (a.end_id >= V) {
        return reject(handle, sid, kInvalid, "end_id " + std::to_string(a.end_id) + " is outside the vocabulary");
    }
    auto it = active_.find(sid);
    if (it != active_.end()) {
        if (it->second->admitted) {
            return reject(handle, sid, kBusy, "session " + id_str(sid) + " is generating");
        }
        return reject(handle, sid, kConflict, "session " + id_str(sid) + " already has a queued request");
    }
    const Session* s = seqs_.find(sid);
    if (!a.sequence_start && !s) {
        return reject(handle, sid, kInvalid, "START=0 for unknown session " + id_str(sid));
    }
    if (a.sequence_start && a.input_ids.empty()) {
        return reject(handle, sid, kInvalid, "empty input_ids for a new session");
    }
    int64_t history = 0;
    if (!a.sequence_start) {
        history = static_cast<int64_t>(s->tokens.size());
        if (a.step >= 0 && a.step <= history) {
            history = a.step;
        }
    }
    const int64_t out     = a.request_output_len;
    const int64_t context = std::max<int64_t>(1, history + static_cast<int64_t>(a.input_ids.size()));
    const int64_t max_ctx = cfg_.session_len - 1 - (out > 0 ? 1 : 0);
    if (context > max_ctx) {
        return reject(handle, sid, kTooLong,
                      "history " + std::to_string(history) + " + input " + std::to_string(a.input_ids.size())
                          + " tokens exceed session_len " + std::to_string(cfg_.session_len)
                          + (out > 0 ? " (leaving room for one generated token)" : ""));
    }
    const int64_t limit  = out > 0 ? std::min<int64_t>(context + out, cfg_.session_len - 1) : context;
    const int64_t kv_max = out > 0 ? limit - 1 : context;
    if (seqs_.blocks_for(kv_max) > cfg_.num_blocks) {
        return reject(handle, sid, kNoCapacity,
                      "needs " + std::to_string(seqs_.blocks_for(kv_max)) + " KV blocks but the pool holds only "
                          + std::to_string(cfg_.num_blocks));
    }

    auto r        = std::make_unique<Request>();
    r->handle     = handle;
    r->session_id = sid;
    r->input_ids.assign(a.input_ids.begin(), a.input_ids.end());  // validated: fits int32
    r->output_len = out;
    r->start      = a.sequence_start;
    r->end        = a.sequence_end;
    r->step       = a.step;
    r->end_id     = static_cast<int32_t>(a.end_id >= 0 ? a.end_id : cfg_.end_id);
    r->stop_words.assign(a.stop_words.begin(), a.stop_words.end());
    r->ignore_eos = a.ignore_eos;
    r->logits_all = a.logits_all;
    r->has_seed   = a.has_seed;
    r->seed       = a.random_seed;
    waiting_.push_back(r.get());
    active_.emplace(sid, std::move(r));
    return handle;
}

int32_t Scheduler::stop_request(uint64_t sid, bool end, std::string& msg)
{
    auto it = active_.find(sid);
    if (it == active_.end()) {
        if (!end) {
            msg = "stop for session " + id_str(sid) + ", which is not in the batch";
            return kInactive;
        }
        seqs_.erase(sid);
        return kOk;
    }
    Request* r = it->second.get();
    if (r->state == Request::kWaiting) {
        waiting_.erase(std::find(waiting_.begin(), waiting_.end(), r));
        if (r->admitted) {  // preempted: it has a session of its own and maybe tokens
            r->end = r->end || end;
            finish(r, kCancel, nullptr, 0);
        }
        else {
            r->state = Request::kFinished;
            push_event(r, nullptr, 0, true, kCancel);
            finished_.push_back(r);
            if (end) {
                seqs_.erase(sid);
            }
        }
    }
    else {
        // Rows in outstanding plans are dropped: the session is left as if it had been cancelled
        // before those steps (their K/V and tokens are not committed).
        detach(r);
        r->end = r->end || end;
        finish(r, kCancel, nullptr, 0);
    }
    reap();
    return kOk;
}

int32_t Scheduler::cancel(uint64_t session_id, bool end)
{
    std::string msg;
    const int32_t code = stop_request(session_id, end, msg);
    if (code != kOk) {
        warn("cancel: " + msg);
    }
    return code;
}

bool Scheduler::admit(Request* r)
{
    Session* s = nullptr;
    if (r->start) {
        bool replaced = false;
        s             = seqs_.create(r->session_id, &replaced);
        if (replaced) {
            warn("Removing conflicting id " + id_str(r->session_id));
        }
    }
    else {
        s = seqs_.find(r->session_id);
        if (!s) {  // cannot happen: validated at submit and nothing else touches the id since
            r->state = Request::kFinished;
            events_.messages.emplace_back(static_cast<int32_t>(events_.handles.size()), "session vanished");
            push_event(r, nullptr, 0, true, kError);
            events_.codes.back() = kFail;
            finished_.push_back(r);
            return false;
        }
        if (r->step >= 0 && !seqs_.truncate(s, r->step)) {
            warn("Skipping invalid step (" + std::to_string(r->step) + ") setting for id " + id_str(r->session_id)
                 + ": it exceeds the " + std::to_string(s->tokens.size()) + " stored tokens");
        }
    }
    seqs_.activate(s);
    r->seq = s;
    const int64_t history = static_cast<int64_t>(s->tokens.size());
    s->tokens.insert(s->tokens.end(), r->input_ids.begin(), r->input_ids.end());
    if (s->tokens.empty()) {
        s->tokens.push_back(cfg_.start_id);
    }
    r->input_ids.clear();
    r->input_ids.shrink_to_fit();
    if (r->has_seed) {
        s->has_seed = true;
        s->seed     = r->seed;
    }
    const int64_t size = static_cast<int64_t>(s->tokens.size());
    r->context_len     = size;
    r->limit           = r->output_len > 0 ? std::min<int64_t>(size + r->output_len, cfg_.session_len - 1) : size;
    r->logits_from     = history;  // logits_all: the positions of this turn's input (or start_id)
    r->admitted        = true;
    r->admit_seq       = ++admit_counter_;
    if (s->num_cached >= size) {
        if (r->output_len == 0) {  // nothing to compute
            finish(r, kLength, nullptr, 0);
            return false;
        }
        seqs_.uncache(s, size - 1);  // re-feed the last token to get its logits
    }
    s->tokens.reserve(static_cast<size_t>(r->limit));
    return true;
}

// The blocks `r` holds once its whole context has K/V and it has grown by admit_horizon more
// tokens (capped at its limit), less the blocks it holds now if it runs. A request not yet
// admitted is estimated from its arguments (its session's history, truncated at `step`).
int64_t Scheduler::blocks_wanted(const Request* r) const
{
    const int64_t horizon = cfg_.admit_horizon;
    if (r->admitted) {
        const Session* s    = r->seq;
        const int64_t  size = static_cast<int64_t>(s->tokens.size()) + r->pending;
        const int64_t  want = seqs_.blocks_for(std::min(size + horizon, std::max(r->limit, size)));
        return std::max<int64_t>(0, want - static_cast<int64_t>(s->blocks.size()));
    }
    int64_t history = 0;
    if (!r->start) {
        if (const Session* s = seqs_.find(r->session_id)) {
            history = static_cast<int64_t>(s->tokens.size());
            if (r->step >= 0 && r->step < history) {
                history = r->step;
            }
        }
    }
    const int64_t context = std::max<int64_t>(1, history + static_cast<int64_t>(r->input_ids.size()));
    const int64_t limit   = r->output_len > 0 ? std::min<int64_t>(context + r->output_len, cfg_.session_len - 1) : context;
    // Blocks its own idle session holds count in `available` (evictable) and go to it.
    return seqs_.blocks_for(std::min(context + horizon, std::max(limit, context)));
}

// Whether the pool covers the head `r` on top of what the running requests still want;
// `reserved` < 0 on the first call of a schedule() (then computed), updated as r is taken.
bool Scheduler::pool_can_admit(const Request* r, int64_t& reserved, int64_t& available) const
{
    if (cfg_.admit_horizon < 0) {
        return true;
    }
    if (reserved < 0) {
        reserved = 0;
        for (const Request* q : running_) {
            if (q->state == Request::kRunning) {  // finished ones are not reaped yet
                reserved += blocks_wanted(q);
            }
        }
        available = blocks_.num_free() + seqs_.evictable_blocks();
    }
    const int64_t want = blocks_wanted(r);
    if (available - reserved < want) {
        return false;
    }
    reserved += want;
    return true;
}

void Scheduler::insert_running(Request* r)
{
    auto pos = std::upper_bound(running_.begin(), running_.end(), r, [](const Request* a, const Request* b) {
        return a->admit_seq < b->admit_seq;
    });
    running_.insert(pos, r);
}

void Scheduler::preempt(size_t index)
{
    Request* v = running_[index];
    seqs_.release(v->seq);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(index));
    v->state = Request::kWaiting;
    waiting_.push_front(v);
    ++num_preemptions_;
}

void Scheduler::finish(Request* r, FinishReason reason, const int32_t* toks, int n)
{
    r->state = Request::kFinished;
    push_event(r, toks, n, true, reason);
    if (r->seq) {
        if (r->end) {
            seqs_.erase(r->session_id);
        }
        else {
            seqs_.park(r->seq);
        }
        r->seq = nullptr;
    }
    finished_.push_back(r);
}

// A request the commit of the oldest plan finishes may still have a row in the newer one.
void Scheduler::finish_committed(Request* r, FinishReason reason, const int32_t* toks, int n)
{
    detach(r);
    finish(r, reason, toks, n);
}

// Drops the request's rows from every outstanding plan.
void Scheduler::detach(Request* r)
{
    for (int k = 0; k < num_out_ && r->rows_out > 0; ++k) {
        const int   buf = out_[k];
        PlanBuffer& pb  = bufs_[buf];
        const int   b   = r->row_in[buf];
        if (b < 0) {
            continue;
        }
        if (b >= static_cast<int>(pb.rows.size()) || pb.rows[b].r != r) {
            throw std::logic_error("Scheduler: request " + std::to_string(r->handle) + " lost track of its row");
        }
        drop_row(pb.rows[b], buf);
    }
    if (r->rows_out != 0) {
        throw std::logic_error("Scheduler: request " + std::to_string(r->handle) + " has rows in no outstanding plan");
    }
}

// The row's tokens will not be committed: the session forgets them (the device may still write
// their K/V; only a later plan can reuse the blocks freed here).
void Scheduler::drop_row(Row& row, int buf)
{
    Request* r = row.r;
    seqs_.retract(r->seq, row.chunk);
    --r->rows_out;
    if (row.samples) {
        --r->pending;
        r->sample_in[buf] = -1;
    }
    r->row_in[buf] = -1;
    row.r          = nullptr;
}

void Scheduler::reap()
{
    if (finished_.empty()) {
        return;
    }
    running_.erase(std::remove_if(running_.begin(),
                                  running_.end(),
                                  [](const Request* r) { return r->state == Request::kFinished; }),
                   running_.end());
    for (Request* r : finished_) {
        active_.erase(r->session_id);  // destroys r
    }
    finished_.clear();
}

// ---------------------------------------------------------------------------------------------
// The step

// The newest running request at index >= `from` that has no row in the plan being built nor in
// an outstanding one (its blocks may go); running_.size() when there is none.
size_t Scheduler::victim_from(size_t from, uint64_t step) const
{
    for (size_t j = running_.size(); j > from; --j) {
        const Request* v = running_[j - 1];
        if (v->plan_step != step && v->rows_out == 0) {
            return j - 1;
        }
    }
    return running_.size();
}

// Exactly one token (committed, or pending in the outstanding plan) lacks K/V and it samples.
bool Scheduler::wants_decode_row(const Request* r) const
{
    if (r->output_len == 0) {
        return false;
    }
    const Session* s     = r->seq;
    const int64_t  start = s->num_cached + s->inflight;
    const int64_t  size  = static_cast<int64_t>(s->tokens.size()) + r->pending;
    if (size - start != 1 || (r->logits_all && start < r->context_len)) {
        return false;
    }
    return r->pending == 0 || size < r->limit;  // a pending token at the limit finishes it
}

const Plan& Scheduler::schedule(bool ahead)
{
    if (num_out_ > (ahead ? 1 : 0)) {
        throw std::logic_error(ahead ? "Scheduler.schedule: two plans are outstanding; commit the oldest with "
                                       "update() first"
                                     : "Scheduler.schedule: the previous plan was neither committed with update() "
                                       "nor dropped with discard_plan() (ahead=True plans the next step while it runs)");
    }
    const int buf = num_out_ ? 1 - out_[0] : 1 - cur_;
    cur_          = buf;
    PlanBuffer& pb = bufs_[buf];
    Plan&       plan = pb.plan;
    const uint64_t step = ++step_counter_;
    plan.step           = step;

    // 1. Admission, FIFO, up to max_batch_size running, while the pool can take the head.
    int64_t reserved = -1, available = 0;  // computed when first needed
    while (running_.size() < static_cast<size_t>(cfg_.max_batch_size) && !waiting_.empty()) {
        Request* r = waiting_.front();
        if (!running_.empty() && !pool_can_admit(r, reserved, available)) {
            break;
        }
        waiting_.pop_front();
        if (!r->admitted && !admit(r)) {
            continue;
        }
        r->state = Request::kRunning;
        insert_running(r);
    }
    reap();

    // 2. Decode rows, oldest first. A victim is newer than the current request (or is it) and
    // in no plan: the rows planned so far are all older.
    decode_rows_.clear();
    prefill_rows_.clear();
    prefill_chunks_.clear();
    prefill_samples_.clear();
    for (size_t i = 0; i < running_.size();) {
        Request* r = running_[i];
        if (!wants_decode_row(r)) {
            ++i;
            continue;
        }
        Session*      s    = r->seq;
        const int64_t need = s->num_cached + s->inflight + 1;
        bool          ok = true, gone = false;
        while (!seqs_.grow(s, need)) {
            const size_t v = victim_from(i, step);
            if (v == running_.size()) {
                ok = false;  // everyone newer is in a plan: r waits for blocks
                break;
            }
            gone = running_[v] == r;
            preempt(v);
            if (gone) {
                ok = false;
                break;
            }
        }
        if (!gone) {
            ++i;  // else running_[i] is already the next one
        }
        if (ok) {
            r->plan_step = step;
            decode_rows_.push_back(r);
        }
    }

    // 3. Prefill rows, oldest first, within the token budget (a smaller one beside decode
    // rows, when set). A request with a pending token only ever gets a decode row.
    int64_t budget = cfg_.max_prefill_tokens;
    if (!decode_rows_.empty() && cfg_.max_mixed_prefill_tokens > 0) {
        budget = std::min<int64_t>(budget, cfg_.max_mixed_prefill_tokens);
    }
    int64_t used   = 0;
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
        Request* r = running_[i];
        if (r->plan_step == step || r->pending) {
            continue;
        }
        Session*      s       = r->seq;
        const int64_t size    = static_cast<int64_t>(s->tokens.size());
        const int64_t start   = s->num_cached + s->inflight;
        const int64_t pending = size - start;
        if (pending <= 0) {
            continue;
        }
        int64_t chunk = pending;
        if (cfg_.chunked_prefill) {
            chunk = std::min(pending, budget);
        }
        else if (used > 0 && pending > budget) {
            break;  // whole prompts only; the first one of a step may exceed the budget
        }
        bool ok = true;
        while (!seqs_.grow(s, start + chunk)) {
            if (cfg_.chunked_prefill) {
                const int64_t avail =
                    (static_cast<int64_t>(s->blocks.size()) + blocks_.num_free()) * cfg_.block_size - start;
                if (avail >= 1 && avail < chunk) {
                    chunk = avail;
                    continue;
                }
            }
            const size_t j = victim_from(i + 1, step);  // newer than r and in no plan
            if (j == running_.size()) {
                ok = false;
                break;
            }
            preempt(j);
        }
        if (!ok) {
            continue;  // waits for blocks
        }
        r->plan_step = step;
        prefill_rows_.push_back(r);
        prefill_chunks_.push_back(static_cast<int32_t>(chunk));
        prefill_samples_.push_back(start + chunk == size && r->output_len > 0);
        budget -= chunk;
        used += chunk;
    }

    // 4. The flat arrays.
    plan.num_tokens = plan.batch_size = plan.num_samples = plan.num_logits = 0;
    plan.max_q_len = plan.max_kv_len = 0;
    plan.num_decode                  = static_cast<int>(decode_rows_.size());
    pb.rows.clear();
    pb.sample_rows.clear();
    int b = 0;
    for (Request* r : decode_rows_) {
        emit_row(pb, buf, r, b++, 1, true);
    }
    for (size_t k = 0; k < prefill_rows_.size(); ++k) {
        emit_row(pb, buf, prefill_rows_[k], b++, prefill_chunks_[k], prefill_samples_[k] != 0);
    }
    plan.batch_size     = b;
    plan.cu_seqlens[b]  = plan.num_tokens;
    if (b > 0) {
        out_[num_out_++] = buf;
    }
    return plan;
}

void Scheduler::emit_row(PlanBuffer& pb, int buf, Request* r, int b, int32_t c, bool samples)
{
    Plan&          plan = pb.plan;
    Session*       s    = r->seq;
    const int64_t  k    = s->num_cached + s->inflight;
    const int64_t  size = static_cast<int64_t>(s->tokens.size());
    const int      bs   = cfg_.block_size;
    int            t    = plan.num_tokens;
    const int32_t* tok  = s->tokens.data();
    const BlockId* blk  = s->blocks.data();

    plan.cu_seqlens[b] = t;
    for (int i = 0; i < c; ++i, ++t) {
        const int64_t p = k + i;
        if (p < size) {
            plan.input_ids[t] = tok[p];
        }
        else if (r->pending == 1 && p == size && num_out_ == 1) {
            plan.input_ids[t] = -(r->sample_in[out_[0]] + 1);  // its token pending in the outstanding plan
        }
        else {
            throw std::logic_error("Scheduler: row of request " + std::to_string(r->handle) + " runs past its tokens");
        }
        plan.positions[t]    = static_cast<int32_t>(p);
        plan.slot_mapping[t] = blk[p / bs] * bs + static_cast<int32_t>(p % bs);
    }
    const int kv       = static_cast<int>(k + c);
    plan.kv_lens[b]     = kv;
    plan.row_handles[b] = r->handle;
    plan.max_q_len      = std::max(plan.max_q_len, c);
    plan.max_kv_len     = std::max(plan.max_kv_len, kv);
    s->inflight += c;

    // Block table row b: append what is new if it still holds this session's blocks.
    int32_t*  row = plan.block_table.data() + static_cast<size_t>(b) * plan.width;
    const int nb  = static_cast<int>(s->blocks.size());
    int       old = pb.owner_len[b];
    if (pb.owner_uid[b] == s->uid && pb.owner_version[b] == s->blocks_version && old <= nb) {
        std::copy(blk + old, blk + nb, row + old);
    }
    else {
        std::copy(blk, blk + nb, row);
        if (old > nb) {
            std::fill(row + nb, row + old, -1);
        }
        pb.owner_uid[b]     = s->uid;
        pb.owner_version[b] = s->blocks_version;
    }
    pb.owner_len[b] = nb;

    if (samples) {
        const int j            = plan.num_samples++;
        plan.sample_idx[j]     = t - 1;
        plan.sample_handles[j] = r->handle;
        pb.sample_rows.push_back(b);
        r->sample_in[buf] = j;
        ++r->pending;
    }
    r->row_in[buf] = b;
    ++r->rows_out;
    pb.rows.push_back(Row{r, c, samples});
    if (r->logits_all) {
        const int64_t from = std::max(k, r->logits_from);
        const int64_t to   = std::min<int64_t>(k + c, r->context_len);
        for (int64_t p = from; p < to; ++p) {
            const int j            = plan.num_logits++;
            plan.logits_idx[j]     = plan.cu_seqlens[b] + static_cast<int32_t>(p - k);
            plan.logits_handles[j] = r->handle;
        }
    }
    plan.num_tokens = t;
}

std::shared_ptr<Events> Scheduler::update(const int32_t* tokens, size_t n)
{
    if (num_out_ == 0) {
        if (n != 0) {
            throw std::invalid_argument("Scheduler.update: got " + std::to_string(n)
                                        + " tokens but no plan is outstanding");
        }
        return take_events();
    }
    const int   buf = out_[0];
    PlanBuffer& pb  = bufs_[buf];
    if (n != static_cast<size_t>(pb.plan.num_samples)) {
        throw std::invalid_argument("Scheduler.update: expected " + std::to_string(pb.plan.num_samples)
                                    + " sampled tokens (one per sample_idx entry), got " + std::to_string(n));
    }
    for (size_t j = 0; j < n; ++j) {
        if (tokens[j] < 0 || tokens[j] >= cfg_.vocab_size) {
            throw std::invalid_argument("Scheduler.update: token " + std::to_string(tokens[j]) + " at " + std::to_string(j)
                                        + " is outside the vocabulary");
        }
    }
    out_[0] = out_[1];
    out_[1] = -1;
    --num_out_;

    // The forward wrote the planned K/V.
    for (Row& row : pb.rows) {
        Request* r = row.r;
        if (!r) {
            continue;
        }
        Session* s = r->seq;
        s->num_cached += row.chunk;
        s->inflight -= row.chunk;
        --r->rows_out;
        r->row_in[buf] = -1;
        if (row.samples) {
            --r->pending;
            r->sample_in[buf] = -1;
        }
        if (r->logits_all) {
            r->logits_from = std::max(r->logits_from, std::min(s->num_cached, r->context_len));
        }
    }

    // Sampled tokens: append, then stop checks.
    for (size_t j = 0; j < n; ++j) {
        Request* r = pb.rows[pb.sample_rows[j]].r;
        if (!r) {
            continue;
        }
        const int32_t tok = tokens[j];
        Session*      s   = r->seq;
        s->tokens.push_back(tok);
        ++r->generated;
        int8_t reason = kNotFinished;
        if ((!r->ignore_eos && tok == r->end_id)
            || std::find(r->stop_words.begin(), r->stop_words.end(), tok) != r->stop_words.end()) {
            reason = kStop;
        }
        else if (static_cast<int64_t>(s->tokens.size()) >= r->limit) {
            reason = kLength;
        }
        if (reason != kNotFinished) {
            finish_committed(r, static_cast<FinishReason>(reason), &tok, 1);
        }
        else {
            push_event(r, &tok, 1, false, kNotFinished);
        }
    }
    // Prefill-only requests whose prompt is complete.
    for (Row& row : pb.rows) {
        Request* r = row.r;
        if (r && r->state != Request::kFinished && r->output_len == 0
            && r->seq->num_cached == static_cast<int64_t>(r->seq->tokens.size())) {
            finish_committed(r, kLength, nullptr, 0);
        }
    }
    reap();
    return take_events();
}

void Scheduler::discard_plan()
{
    if (num_out_ == 0) {
        return;
    }
    const int buf   = out_[--num_out_];
    out_[num_out_]  = -1;
    PlanBuffer& pb  = bufs_[buf];
    for (Row& row : pb.rows) {
        if (row.r) {
            drop_row(row, buf);  // frees the blocks taken for the step
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Introspection

SessionInfo Scheduler::session_info(uint64_t id) const
{
    SessionInfo info;
    const Session* s = seqs_.find(id);
    if (!s) {
        return info;
    }
    info.found      = true;
    info.tokens     = s->tokens;
    info.num_cached = s->num_cached;
    info.blocks     = s->blocks;
    info.active     = s->status == Session::kActive;
    info.last_use   = s->last_use;
    info.has_seed   = s->has_seed;
    info.seed       = s->seed;
    return info;
}

std::string Scheduler::request_state(int64_t handle) const
{
    for (auto& kv : active_) {
        if (kv.second->handle == handle) {
            const Request& r = *kv.second;
            return r.state == Request::kRunning ? "running" : r.admitted ? "preempted" : "waiting";
        }
    }
    return handle > 0 && handle < next_handle_ ? "finished" : "unknown";
}

void Scheduler::check_invariants() const
{
    auto fail = [](const std::string& what) { throw std::runtime_error("Scheduler invariant violated: " + what); };
    seqs_.check_invariants();
    if (running_.size() > static_cast<size_t>(cfg_.max_batch_size)) {
        fail(std::to_string(running_.size()) + " running requests exceed max_batch_size");
    }
    if (running_.size() + waiting_.size() != active_.size()) {
        fail(std::to_string(running_.size()) + " running + " + std::to_string(waiting_.size()) + " waiting != "
             + std::to_string(active_.size()) + " active requests");
    }
    for (size_t i = 0; i < running_.size(); ++i) {
        const Request* r = running_[i];
        if (r->state != Request::kRunning || !r->admitted) {
            fail("request " + std::to_string(r->handle) + " in the batch is not running");
        }
        if (i && running_[i - 1]->admit_seq >= r->admit_seq) {
            fail("running requests are not in admission order");
        }
    }
    for (const Request* r : waiting_) {
        if (r->state != Request::kWaiting) {
            fail("request " + std::to_string(r->handle) + " in the queue is not waiting");
        }
    }
    // What the outstanding plans hold per request: rows, sampling rows, in-flight tokens.
    std::unordered_map<const Request*, std::array<int64_t, 3>> outstanding;
    for (int k = 0; k < num_out_; ++k) {
        for (const Row& row : bufs_[out_[k]].rows) {
            if (!row.r) {
                continue;
            }
            if (row.r->state != Request::kRunning) {
                fail("request " + std::to_string(row.r->handle) + " has a row in an outstanding plan but is not running");
            }
            auto& c = outstanding[row.r];
            c[0] += 1;
            c[1] += row.samples;
            c[2] += row.chunk;
        }
    }
    size_t num_active_sessions = 0;
    for (auto& kv : active_) {
        const Request* r = kv.second.get();
        if (r->session_id != kv.first) {
            fail("request keyed by the wrong session id");
        }
        if (!r->admitted) {
            continue;
        }
        ++num_active_sessions;
        const Session* s = seqs_.find(r->session_id);
        if (!s || s != r->seq || s->status != Session::kActive) {
            fail("admitted request " + std::to_string(r->handle) + " does not hold its session " + id_str(r->session_id));
        }
        if (static_cast<int64_t>(s->tokens.size()) > r->limit || r->limit > cfg_.session_len - 1 + (r->output_len == 0)) {
            fail("session " + id_str(r->session_id) + " exceeds its length limit");
        }
        const auto it = outstanding.find(r);
        const std::array<int64_t, 3> want = it == outstanding.end() ? std::array<int64_t, 3>{0, 0, 0} : it->second;
        if (r->rows_out != want[0] || r->pending != want[1] || s->inflight != want[2]) {
            fail("request " + std::to_string(r->handle) + " counts " + std::to_string(r->rows_out) + " rows, "
                 + std::to_string(r->pending) + " pending tokens and " + std::to_string(s->inflight)
                 + " in-flight tokens; the outstanding plans hold " + std::to_string(want[0]) + ", "
                 + std::to_string(want[1]) + " and " + std::to_string(want[2]));
        }
        if (s->num_cached + s->inflight > static_cast<int64_t>(s->tokens.size()) + r->pending) {
            fail("session " + id_str(r->session_id) + " has K/V planned for tokens it does not have");
        }
        if (static_cast<int64_t>(s->tokens.size()) + r->pending > r->limit) {
            fail("session " + id_str(r->session_id) + " would exceed its length limit with its pending tokens");
        }
        if (r->state == Request::kWaiting && !s->blocks.empty()) {
            fail("preempted request " + std::to_string(r->handle) + " still holds blocks");
        }
    }
    size_t active_sessions = 0;
    for (uint64_t id : seqs_.session_ids()) {
        const Session* s = seqs_.find(id);
        active_sessions += s->status == Session::kActive;
        if (s->status != Session::kActive && s->inflight) {
            fail("idle session " + id_str(id) + " has in-flight tokens");
        }
    }
    if (active_sessions != num_active_sessions) {
        fail(std::to_string(active_sessions) + " active sessions but " + std::to_string(num_active_sessions)
             + " admitted requests");
    }
}

}  // namespace turbomind
