// Request: one inference (or stop) request as the Scheduler holds it, plus the codes and finish
// reasons that cross to Python.
//
// Codes follow LMDeploy v0.0.2's Request.h (kInvalid=1 .. kFail=5) and add two of ours:
// kTooLong (history + input does not fit session_len) and kNoCapacity (the request could never
// fit in the whole KV pool, so waiting would not help).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace turbomind {

struct Session;

enum ErrorCode : int32_t {
    kOk         = 0,
    kInvalid    = 1,  // malformed request, START=0 with an unknown id, START together with STOP
    kConflict   = 2,  // the same session id is already queued (waiting, not yet admitted)
    kBusy       = 3,  // the session id is currently generating (admitted)
    kInactive   = 4,  // stop with END=0 for an id that is neither running nor queued
    kFail       = 5,  // internal failure (never expected)
    kTooLong    = 6,  // history (after `step`) + input does not fit session_len
    kNoCapacity = 7,  // needs more KV blocks than the whole pool holds
};

enum FinishReason : int8_t {
    kNotFinished = 0,
    kStop        = 1,  // end_id (unless ignore_eos) or a stop word; the token is part of the output
    kLength      = 2,  // request_output_len or session_len - 1 reached; also prefill-only requests
    kCancel      = 3,  // cancelled by a stop request
    kError       = 4,  // rejected; see the event's code and message
};

inline const char* error_code_name(int32_t code)
{
    switch (code) {
        case kOk: return "ok";
        case kInvalid: return "invalid";
        case kConflict: return "conflict";
        case kBusy: return "busy";
        case kInactive: return "inactive";
        case kFail: return "fail";
        case kTooLong: return "too_long";
        case kNoCapacity: return "no_capacity";
        default: return "unknown";
    }
}

inline const char* finish_reason_name(int32_t reason)
{
    switch (reason) {
        case kNotFinished: return "";
        case kStop: return "stop";
        case kLength: return "length";
        case kCancel: return "cancel";
        case kError: return "error";
        default: return "unknown";
    }
}

// What a caller submits (the tensors of v0.0.2's stream_infer, one row).
struct RequestArgs {
    uint64_t             session_id         = 0;
    std::vector<int64_t> input_ids;                 // only the new tokens of this turn
    int64_t              request_output_len = 512;  // 0 = prefill only, then finish ('length')
    bool                 sequence_start     = true;
    bool                 sequence_end       = false;
    int64_t              step               = -1;   // history length to keep; < 0 keeps all
    bool                 stop               = false;
    int64_t              end_id             = -1;   // < 0: the scheduler's end_id
    std::vector<int64_t> stop_words;                // single-token stop words
    bool                 ignore_eos         = false;
    bool                 logits_all         = false;  // return logits for every prompt position
    bool                 has_seed           = false;
    uint64_t             random_seed        = 0;
};

struct Request {
    enum State : int8_t {
        kWaiting,   // queued (never admitted, or preempted and re-queued at the head)
        kRunning,   // in the persistent batch
        kFinished,  // done; reaped at the end of the call that finished it
    };

    int64_t              handle     = 0;
    uint64_t             session_id = 0;
    std::vector<int32_t> input_ids;
    int64_t              output_len = 0;
    bool                 start      = true;
    bool                 end        = false;
    int64_t              step       = -1;
    int32_t              end_id     = -1;
    std::vector<int32_t> stop_words;
    bool                 ignore_eos = false;
    bool                 logits_all = false;
    bool                 has_seed   = false;
    uint64_t             seed       = 0;

    // Runtime state.
    State    state       = kWaiting;
    bool     admitted    = false;  // its session edits (create / truncate / append) are done
    Session* seq         = nullptr;
    int64_t  context_len = 0;  // tokens after admission: history + input (+ start_id)
    int64_t  limit       = 0;  // the session may grow up to this many tokens
    int64_t  generated   = 0;
    uint64_t admit_seq   = 0;  // admission order; kept across preemption (its priority)
    int64_t  logits_from = 0;  // first prompt position whose logits are not yet returned
    uint64_t plan_step      = 0;  // the newest plan it has a row in (0 = none)
    int8_t   rows_out       = 0;  // outstanding plans it has a row in (0..2)
    int8_t   pending        = 0;  // outstanding plans it samples in: tokens not yet committed
    int32_t  row_in[2]      = {-1, -1};  // its row index in each plan buffer (by buffer)
    int32_t  sample_in[2]   = {-1, -1};  // its sample index in each plan buffer (by buffer)
};

}  // namespace turbomind
