#include "scheduler.h"

#include <algorithm>
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
    need(cfg.session_len >= 2, "session_len must be >= 2");
    need(cfg.vocab_size >= 1, "vocab_size must be >= 1");
    need(cfg.start_id >= 0 && cfg.start_id < cfg.vocab_size, "start_id must be in [0, vocab_size)");
    need(cfg.end_id < cfg.vocab_size, "end_id must be < vocab_size (negative: none)");

    const int B = cfg.max_batch_size;
    const int T = B + std::max(cfg.max_prefill_tokens, cfg.session_len);
    plan_.width      = static_cast<int>(blocks_.blocks_for_tokens(cfg.session_len));
    plan_.block_size = cfg.block_size;
    plan_.input_ids.assign(T, 0);
    plan_.positions.assign(T, 0);
    plan_.slot_mapping.assign(T, 0);
    plan_.cu_seqlens.assign(B + 1, 0);
    plan_.kv_lens.assign(B, 0);
    plan_.block_table.assign(static_cast<size_t>(B) * plan_.width, -1);
    plan_.row_handles.assign(B, 0);
    plan_.sample_idx.assign(B, 0);
    plan_.sample_handles.assign(B, 0);
    plan_.logits_idx.assign(T, 0);
    plan_.logits_handles.assign(T, 0);
    owner_uid_.assign(B, 0);
    owner_version_.assign(B, 0);
    owner_len_.assign(B, plan_.width);  // the whole row is "dirty" until first written
    running_.reserve(B);
    decode_rows_.reserve(B);
    prefill_rows_.reserve(B);
    sample_reqs_.assign(B, nullptr);
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
    else if (plan_outstanding_ && r->plan_step == plan_.step) {
        r->cancel_pending = true;  // its KV is being written: finish it in update()
        r->cancel_end     = r->cancel_end || end;
        return kOk;
    }
    else {
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

const Plan& Scheduler::schedule()
{
    if (plan_outstanding_) {
        throw std::logic_error("Scheduler.schedule: the previous plan was neither committed with update() "
                               "nor dropped with discard_plan()");
    }
    const uint64_t step = ++plan_.step;

    // 1. Admission, FIFO, up to max_batch_size running.
    while (running_.size() < static_cast<size_t>(cfg_.max_batch_size) && !waiting_.empty()) {
        Request* r = waiting_.front();
        waiting_.pop_front();
        if (!r->admitted && !admit(r)) {
            continue;
        }
        r->state = Request::kRunning;
        insert_running(r);
    }
    reap();

    // 2. Decode rows, oldest first. A victim (the newest running request) is never in the plan
    // yet: the rows planned so far are all older than the current one.
    decode_rows_.clear();
    prefill_rows_.clear();
    for (size_t i = 0; i < running_.size(); ++i) {
        Request*      r       = running_[i];
        Session*      s       = r->seq;
        const int64_t pending = static_cast<int64_t>(s->tokens.size()) - s->num_cached;
        if (pending != 1 || r->output_len == 0 || (r->logits_all && s->num_cached < r->context_len)) {
            continue;
        }
        bool ok = true;
        while (!seqs_.grow(s, s->num_cached + 1)) {
            Request* victim = running_.back();
            preempt(running_.size() - 1);
            if (victim == r) {
                ok = false;
                break;
            }
        }
        if (!ok) {
            break;  // r was the last one
        }
        r->plan_step = step;
        r->chunk     = 1;
        r->samples   = true;
        decode_rows_.push_back(r);
    }

    // 3. Prefill rows, oldest first, within the token budget.
    int64_t budget = cfg_.max_prefill_tokens;
    int64_t used   = 0;
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
        Request* r = running_[i];
        if (r->plan_step == step) {
            continue;
        }
        Session*      s       = r->seq;
        const int64_t size    = static_cast<int64_t>(s->tokens.size());
        const int64_t pending = size - s->num_cached;
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
        while (!seqs_.grow(s, s->num_cached + chunk)) {
            if (cfg_.chunked_prefill) {
                const int64_t avail =
                    (static_cast<int64_t>(s->blocks.size()) + blocks_.num_free()) * cfg_.block_size - s->num_cached;
                if (avail >= 1 && avail < chunk) {
                    chunk = avail;
                    continue;
                }
            }
            // Preempt the newest running request that is newer than r and not in the plan.
            size_t j = running_.size();
            while (j > i + 1 && running_[j - 1]->plan_step == step) {
                --j;
            }
            if (j <= i + 1) {
                ok = false;
                break;
            }
            preempt(j - 1);
        }
        if (!ok) {
            continue;  // waits for blocks
        }
        r->plan_step = step;
        r->chunk     = static_cast<int32_t>(chunk);
        r->samples   = s->num_cached + chunk == size && r->output_len > 0;
        prefill_rows_.push_back(r);
        budget -= chunk;
        used += chunk;
    }

    // 4. The flat arrays.
    plan_.num_tokens = plan_.batch_size = plan_.num_samples = plan_.num_logits = 0;
    plan_.max_q_len = plan_.max_kv_len = 0;
    plan_.num_decode                   = static_cast<int>(decode_rows_.size());
    int b                              = 0;
    for (Request* r : decode_rows_) {
        emit_row(r, b++);
    }
    for (Request* r : prefill_rows_) {
        emit_row(r, b++);
    }
    plan_.batch_size            = b;
    plan_.cu_seqlens[b]         = plan_.num_tokens;
    plan_outstanding_           = b > 0;
    return plan_;
}

void Scheduler::emit_row(Request* r, int b)
{
    Session*       s   = r->seq;
    const int64_t  k   = s->num_cached;
    const int      c   = r->chunk;
    const int      bs  = cfg_.block_size;
    int            t   = plan_.num_tokens;
    const int32_t* tok = s->tokens.data();
    const BlockId* blk = s->blocks.data();

    plan_.cu_seqlens[b] = t;
    for (int i = 0; i < c; ++i, ++t) {
        const int64_t p       = k + i;
        plan_.input_ids[t]    = tok[p];
        plan_.positions[t]    = static_cast<int32_t>(p);
        plan_.slot_mapping[t] = blk[p / bs] * bs + static_cast<int32_t>(p % bs);
    }
    const int kv          = static_cast<int>(k + c);
    plan_.kv_lens[b]      = kv;
    plan_.row_handles[b]  = r->handle;
    plan_.max_q_len       = std::max(plan_.max_q_len, c);
    plan_.max_kv_len      = std::max(plan_.max_kv_len, kv);
    s->inflight           = c;

    // Block table row b: append what is new if it still holds this session's blocks.
    int32_t*  row = plan_.block_table.data() + static_cast<size_t>(b) * plan_.width;
    const int nb  = static_cast<int>(s->blocks.size());
    int       old = owner_len_[b];
    if (owner_uid_[b] == s->uid && owner_version_[b] == s->blocks_version && old <= nb) {
        std::copy(blk + old, blk + nb, row + old);
    }
    else {
        std::copy(blk, blk + nb, row);
        if (old > nb) {
            std::fill(row + nb, row + old, -1);
        }
        owner_uid_[b]     = s->uid;
        owner_version_[b] = s->blocks_version;
    }
    owner_len_[b] = nb;

    if (r->samples) {
        const int j               = plan_.num_samples++;
        plan_.sample_idx[j]       = t - 1;
        plan_.sample_handles[j]   = r->handle;
        sample_reqs_[j]           = r;
    }
    if (r->logits_all) {
        const int64_t from = std::max(k, r->logits_from);
        const int64_t to   = std::min<int64_t>(k + c, r->context_len);
        for (int64_t p = from; p < to; ++p) {
            const int j               = plan_.num_logits++;
            plan_.logits_idx[j]       = plan_.cu_seqlens[b] + static_cast<int32_t>(p - k);
            plan_.logits_handles[j]   = r->handle;
        }
    }
    plan_.num_tokens = t;
}

std::shared_ptr<Events> Scheduler::update(const int32_t* tokens, size_t n)
{
    if (!plan_outstanding_) {
        if (n != 0) {
            throw std::invalid_argument("Scheduler.update: got " + std::to_string(n)
                                        + " tokens but no plan is outstanding");
        }
        return take_events();
    }
    if (n != static_cast<size_t>(plan_.num_samples)) {
        throw std::invalid_argument("Scheduler.update: expected " + std::to_string(plan_.num_samples)
                                    + " sampled tokens (one per sample_idx entry), got " + std::to_string(n));
    }
    for (size_t j = 0; j < n; ++j) {
        if (tokens[j] < 0 || tokens[j] >= cfg_.vocab_size) {
            throw std::invalid_argument("Scheduler.update: token " + std::to_string(tokens[j]) + " at " + std::to_string(j)
                                        + " is outside the vocabulary");
        }
    }
    plan_outstanding_ = false;

    // The forward wrote the planned K/V.
    const int B = plan_.batch_size;
    for (size_t i = 0; i < decode_rows_.size(); ++i) {
        Session* s = decode_rows_[i]->seq;
        s->num_cached += 1;
        s->inflight = 0;
    }
    for (Request* r : prefill_rows_) {
        Session* s = r->seq;
        s->num_cached += s->inflight;
        s->inflight = 0;
        if (r->logits_all) {
            r->logits_from = std::max(r->logits_from, std::min(s->num_cached, r->context_len));
        }
    }

    // Sampled tokens: append, then stop checks.
    for (size_t j = 0; j < n; ++j) {
        Request* r = sample_reqs_[j];
        if (r->cancel_pending) {
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
            finish(r, static_cast<FinishReason>(reason), &tok, 1);
        }
        else {
            push_event(r, &tok, 1, false, kNotFinished);
        }
    }
    // Prefill-only requests whose prompt is complete, and cancellations that waited for us.
    for (int b = 0; b < B; ++b) {
        Request* r = b < plan_.num_decode ? decode_rows_[b] : prefill_rows_[b - plan_.num_decode];
        if (r->state == Request::kFinished) {
            continue;
        }
        if (r->cancel_pending) {
            r->end = r->end || r->cancel_end;
            finish(r, kCancel, nullptr, 0);
        }
        else if (r->output_len == 0 && r->seq->num_cached == static_cast<int64_t>(r->seq->tokens.size())) {
            finish(r, kLength, nullptr, 0);
        }
    }
    reap();
    return take_events();
}

void Scheduler::discard_plan()
{
    if (!plan_outstanding_) {
        return;
    }
    plan_outstanding_ = false;
    for (Request* r : decode_rows_) {
        r->seq->inflight = 0;
        seqs_.uncache(r->seq, r->seq->num_cached);  // frees the blocks taken for the step
    }
    for (Request* r : prefill_rows_) {
        r->seq->inflight = 0;
        seqs_.uncache(r->seq, r->seq->num_cached);
    }
    for (int b = 0; b < plan_.batch_size; ++b) {
        Request* r = b < plan_.num_decode ? decode_rows_[b] : prefill_rows_[b - plan_.num_decode];
        if (r->cancel_pending) {
            r->end = r->end || r->cancel_end;
            finish(r, kCancel, nullptr, 0);
        }
    }
    reap();
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
        if (s->inflight && !(plan_outstanding_ && r->plan_step == plan_.step)) {
            fail("session " + id_str(r->session_id) + " has in-flight tokens outside the plan");
        }
        if (r->state == Request::kWaiting && !s->blocks.empty()) {
            fail("preempted request " + std::to_string(r->handle) + " still holds blocks");
        }
    }
    size_t active_sessions = 0;
    for (uint64_t id : seqs_.session_ids()) {
        active_sessions += seqs_.find(id)->status == Session::kActive;
    }
    if (active_sessions != num_active_sessions) {
        fail(std::to_string(active_sessions) + " active sessions but " + std::to_string(num_active_sessions)
             + " admitted requests");
    }
}

}  // namespace turbomind
