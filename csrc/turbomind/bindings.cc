// Python bindings: the extension module lmdeploy.turbomind._turbomind.
//
// BlockManager: block ids cross as Python lists of int (any sequence of ints is accepted, numpy
// int arrays included); ref_counts() returns a numpy int32 array. C++ exceptions become Python
// ones: std::invalid_argument -> ValueError, OutOfBlocks -> OutOfBlocksError (a RuntimeError),
// std::runtime_error / std::logic_error -> RuntimeError, std::overflow_error -> OverflowError.
//
// SequenceManager: sessions over a Python-owned BlockManager (tests and tools).
// Scheduler: submit / cancel / schedule -> Plan / update(tokens) -> Events. Plan arrays are
// zero-copy numpy views of the scheduler's two fixed plan buffers, used in turn (valid until the
// second schedule() after); Events arrays are views of buffers the Events object owns.
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"
#include "scheduler.h"
#include "sequence_manager.h"

namespace py = pybind11;
using namespace py::literals;

namespace turbomind {
namespace {

// Python ints arrive as int64 so that any out-of-range id is a ValueError, not a TypeError.
std::vector<BlockId> to_block_ids(const BlockManager& bm, const std::vector<int64_t>& ids, const char* op)
{
    std::vector<BlockId> out(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= bm.num_blocks()) {
            throw std::invalid_argument(std::string("BlockManager.") + op + ": block id " + std::to_string(ids[i])
                                        + " is out of range [0, " + std::to_string(bm.num_blocks()) + ")");
        }
        out[i] = static_cast<BlockId>(ids[i]);
    }
    return out;
}

void bind_block_manager(py::module_& m)
{
    py::register_exception<OutOfBlocks>(m, "OutOfBlocksError", PyExc_RuntimeError);

    py::class_<BlockManager>(m,
                             "BlockManager",
                             "A fixed pool of paged-KV-cache blocks, each holding `block_size` tokens.\n\n"
                             "Blocks are named by ids 0..num_blocks-1 and carry a reference count: 0 means\n"
                             "free, >= 1 means in use (> 1 when shared between sequences). Every method\n"
                             "either succeeds or raises and leaves the pool unchanged. Not thread-safe.")
        .def(py::init<int, int>(),
             "num_blocks"_a,
             "block_size"_a,
             "Create a pool of `num_blocks` free blocks of `block_size` tokens.\n"
             "Raises ValueError if num_blocks < 0 or block_size <= 0.")
        .def("allocate",
             &BlockManager::allocate,
             "n"_a,
             "Take `n` free blocks, set their reference counts to 1 and return their ids as a list.\n"
             "All or nothing: raises OutOfBlocksError (a RuntimeError) and changes nothing if fewer\n"
             "than `n` blocks are free; raises ValueError if n < 0.")
        .def(
            "free",
            [](BlockManager& self, const std::vector<int64_t>& ids) { self.free(to_block_ids(self, ids, "free")); },
            "ids"_a,
            "Drop one reference from each block in `ids` (an id listed twice drops two); blocks\n"
            "that reach 0 return to the free pool. Raises ValueError and changes nothing on an\n"
            "out-of-range id or a double free.")
        .def(
            "incref",
            [](BlockManager& self, const std::vector<int64_t>& ids) { self.incref(to_block_ids(self, ids, "incref")); },
            "ids"_a,
            "Add one reference to each block in `ids` (an id listed twice gains two). The blocks\n"
            "must be in use; raises ValueError and changes nothing otherwise.")
        .def(
            "share",
            [](BlockManager& self, const std::vector<int64_t>& ids) {
                auto block_ids = to_block_ids(self, ids, "share");
                self.incref(block_ids);
                return block_ids;
            },
            "ids"_a,
            "Share blocks with another sequence: incref(ids), then return a new list of the same\n"
            "ids, to be used as that sequence's block table. The new owner frees them as usual.")
        .def(
            "ref_count",
            [](const BlockManager& self, int64_t id) { return self.ref_count(to_block_ids(self, {id}, "ref_count")[0]); },
            "block_id"_a,
            "Reference count of one block (0 = free). Raises ValueError for an out-of-range id.")
        .def(
            "ref_counts",
            [](const BlockManager& self) {
                const auto& rc = self.ref_counts();
                return py::array_t<int32_t>(static_cast<py::ssize_t>(rc.size()), rc.data());
            },
            "Reference counts of all blocks, as a new numpy int32 array of length num_blocks.")
        .def("num_free", &BlockManager::num_free, "Number of free blocks.")
        .def("num_used", &BlockManager::num_used, "Number of blocks in use (num_blocks - num_free).")
        .def("num_blocks", &BlockManager::num_blocks, "Total number of blocks in the pool.")
        .def("block_size", &BlockManager::block_size, "Tokens per block.")
        .def("can_allocate",
             &BlockManager::can_allocate,
             "n"_a,
             "True if allocate(n) would succeed now (n >= 0 and at least n blocks free).")
        .def("blocks_for_tokens",
             &BlockManager::blocks_for_tokens,
             "num_tokens"_a,
             "Blocks needed to hold `num_tokens` tokens: ceil(num_tokens / block_size).\n"
             "Raises ValueError if num_tokens < 0.")
        .def("check_invariants",
             &BlockManager::check_invariants,
             "Verify the pool's bookkeeping in O(num_blocks): every block is either free with\n"
             "reference count 0 or in use with count >= 1, the free list has no duplicates or\n"
             "stray ids, and free + used == num_blocks. Raises RuntimeError describing the first\n"
             "violation; returns None when all hold.")
        .def("__repr__", [](const BlockManager& self) {
            return "BlockManager(num_blocks=" + std::to_string(self.num_blocks())
                   + ", block_size=" + std::to_string(self.block_size())
                   + ", num_free=" + std::to_string(self.num_free()) + ")";
        });
}


// ---------------------------------------------------------------------------------------------
// SequenceManager (standalone, over a Python-owned BlockManager) and Scheduler.

template<class T>
py::array_t<T> view(const T* data, py::ssize_t n, py::handle base)
{
    return py::array_t<T>({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, base);
}

py::dict session_dict(const std::vector<int32_t>& tokens,
                      int64_t num_cached,
                      const std::vector<BlockId>& blocks,
                      bool active,
                      uint64_t last_use,
                      bool has_seed,
                      uint64_t seed)
{
    py::dict d;
    d["tokens"]     = tokens;
    d["num_cached"] = num_cached;
    d["blocks"]     = blocks;
    d["status"]     = active ? "active" : "idle";
    d["last_use"]   = last_use;
    d["seed"]       = has_seed ? py::object(py::int_(seed)) : py::object(py::none());
    return d;
}

Session* need_session(const SequenceManager& sm, uint64_t id)
{
    Session* s = sm.find(id);
    if (!s) {
        throw std::invalid_argument("SequenceManager: unknown session " + std::to_string(id));
    }
    return s;
}

void bind_sequence_manager(py::module_& m)
{
    py::class_<SequenceManager>(m,
                                "SequenceManager",
                                "Sessions keyed by session_id over a BlockManager (which it must be the only\n"
                                "user of): token ids, num_cached (tokens whose K/V is in blocks), block list,\n"
                                "status idle/active and a last-use logical clock. Idle sessions holding blocks\n"
                                "are evicted least-recently-used first when blocks run short. The Scheduler owns\n"
                                "its own; this binding is for tests and tools.")
        .def(py::init<BlockManager&>(), "block_manager"_a, py::keep_alive<1, 2>())
        .def(
            "create",
            [](SequenceManager& sm, uint64_t id) {
                bool replaced = false;
                sm.create(id, &replaced);
                return replaced;
            },
            "session_id"_a,
            "New empty idle session; an existing one is erased first. Returns True if one was replaced.")
        .def("erase", &SequenceManager::erase, "session_id"_a, "Erase a session, freeing its blocks. False if unknown.")
        .def(
            "contains", [](const SequenceManager& sm, uint64_t id) { return sm.find(id) != nullptr; }, "session_id"_a)
        .def(
            "append",
            [](SequenceManager& sm, uint64_t id, const std::vector<int32_t>& tokens) {
                Session* s = need_session(sm, id);
                s->tokens.insert(s->tokens.end(), tokens.begin(), tokens.end());
            },
            "session_id"_a,
            "tokens"_a,
            "Append token ids (without K/V) to a session.")
        .def(
            "truncate",
            [](SequenceManager& sm, uint64_t id, int64_t step) { return sm.truncate(need_session(sm, id), step); },
            "session_id"_a,
            "step"_a,
            "v0.0.2 `step`: if 0 <= step <= tokens keep `step` tokens, num_cached = min(num_cached, step),\n"
            "free blocks past it and return True; else change nothing and return False.")
        .def(
            "cache",
            [](SequenceManager& sm, uint64_t id, int64_t n) {
                Session* s = need_session(sm, id);
                if (n < 0 || s->num_cached + n > static_cast<int64_t>(s->tokens.size())) {
                    throw std::invalid_argument("SequenceManager.cache: cannot cache " + std::to_string(n)
                                                + " more tokens");
                }
                if (!sm.grow(s, s->num_cached + n)) {
                    return false;
                }
                s->num_cached += n;
                return true;
            },
            "session_id"_a,
            "n"_a,
            "Mark the next n tokens as having K/V: allocate the blocks (evicting idle sessions LRU-first\n"
            "if short). Returns False, with only evictions done, if the pool cannot supply them.")
        .def(
            "uncache",
            [](SequenceManager& sm, uint64_t id, int64_t n) { sm.uncache(need_session(sm, id), n); },
            "session_id"_a,
            "num_cached"_a,
            "Drop cached K/V down to num_cached tokens, freeing blocks past it.")
        .def(
            "activate", [](SequenceManager& sm, uint64_t id) { sm.activate(need_session(sm, id)); }, "session_id"_a)
        .def(
            "park",
            [](SequenceManager& sm, uint64_t id) { sm.park(need_session(sm, id)); },
            "session_id"_a,
            "Make a session idle (evictable) and the most recently used.")
        .def(
            "release",
            [](SequenceManager& sm, uint64_t id) { sm.release(need_session(sm, id)); },
            "session_id"_a,
            "Free all of a session's blocks (num_cached = 0, tokens kept).")
        .def("evict_lru", &SequenceManager::evict_lru, "Evict the LRU idle session holding blocks; False if none.")
        .def(
            "session_info",
            [](const SequenceManager& sm, uint64_t id) -> py::object {
                const Session* s = sm.find(id);
                if (!s) {
                    return py::none();
                }
                return session_dict(s->tokens, s->num_cached, s->blocks, s->status == Session::kActive, s->last_use,
                                    s->has_seed, s->seed);
            },
            "session_id"_a,
            "dict(tokens, num_cached, blocks, status='idle'|'active', last_use, seed) or None.")
        .def("session_ids", &SequenceManager::session_ids)
        .def("num_sessions", &SequenceManager::num_sessions)
        .def("num_evictable", &SequenceManager::num_evictable)
        .def("num_evictions", &SequenceManager::num_evictions)
        .def("check_invariants", &SequenceManager::check_invariants);
}

const char* const kPlanDoc =
    "One step's plan, as flat int32/int64 numpy arrays that ALIAS the scheduler's buffers:\n"
    "valid until the second schedule() after this one (copy what you keep).\n"
    "  input_ids [T], positions [T], slot_mapping [T] (block*block_size + offset; int32);\n"
    "    input_ids -(j+1): entry j of the previous plan's sampled tokens (schedule(ahead=True))\n"
    "  cu_seqlens [B+1], kv_lens [B] (KV length after this step), row_handles [B] (int64)\n"
    "  block_table [B, width] (-1 padded; width = ceil(session_len / block_size))\n"
    "  sample_idx [S] (indices into T), sample_handles [S] (int64): rows that sample\n"
    "  logits_idx [L], logits_handles [L]: positions whose logits logits_all requests want\n"
    "Decode rows (q_len 1, sampling) come first: num_decode of them.";

void bind_scheduler(py::module_& m)
{
    for (int c = kOk; c <= kNoCapacity; ++c) {
        std::string name = std::string("ERR_") + error_code_name(c);
        for (auto& ch : name) {
            ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
        }
        m.attr(name.c_str()) = c;
    }
    m.attr("FINISH_REASONS") = py::make_tuple("", "stop", "length", "cancel", "error");
    m.def("error_code_name", [](int c) { return std::string(error_code_name(c)); });

    using PlanCls = py::class_<Plan>;
    PlanCls plan(m, "Plan", kPlanDoc);
#define TM_PLAN_ARRAY(NAME, LEN)                                                                                       \
    plan.def_property_readonly(#NAME, [](py::object self) {                                                            \
        const Plan& p = self.cast<const Plan&>();                                                                      \
        return view(p.NAME.data(), static_cast<py::ssize_t>(LEN), self);                                               \
    })
    TM_PLAN_ARRAY(input_ids, p.num_tokens);
    TM_PLAN_ARRAY(positions, p.num_tokens);
    TM_PLAN_ARRAY(slot_mapping, p.num_tokens);
    TM_PLAN_ARRAY(cu_seqlens, p.batch_size + 1);
    TM_PLAN_ARRAY(kv_lens, p.batch_size);
    TM_PLAN_ARRAY(row_handles, p.batch_size);
    TM_PLAN_ARRAY(sample_idx, p.num_samples);
    TM_PLAN_ARRAY(sample_handles, p.num_samples);
    TM_PLAN_ARRAY(logits_idx, p.num_logits);
    TM_PLAN_ARRAY(logits_handles, p.num_logits);
#undef TM_PLAN_ARRAY
    plan.def_property_readonly("block_table", [](py::object self) {
        const Plan& p = self.cast<const Plan&>();
        return py::array_t<int32_t>({static_cast<py::ssize_t>(p.batch_size), static_cast<py::ssize_t>(p.width)},
                                    {static_cast<py::ssize_t>(p.width * sizeof(int32_t)),
                                     static_cast<py::ssize_t>(sizeof(int32_t))},
                                    p.block_table.data(),
                                    self);
    });
    plan.def_readonly("num_tokens", &Plan::num_tokens)
        .def_readonly("batch_size", &Plan::batch_size)
        .def_readonly("num_samples", &Plan::num_samples)
        .def_readonly("num_logits", &Plan::num_logits)
        .def_readonly("num_decode", &Plan::num_decode)
        .def_readonly("max_q_len", &Plan::max_q_len)
        .def_readonly("max_kv_len", &Plan::max_kv_len)
        .def_readonly("block_size", &Plan::block_size)
        .def_readonly("width", &Plan::width)
        .def_readonly("step", &Plan::step)
        .def_property_readonly("num_prefill_tokens", [](const Plan& p) { return p.num_tokens - p.num_decode; })
        .def("__len__", [](const Plan& p) { return p.batch_size; })
        .def("__repr__", [](const Plan& p) {
            return "Plan(step=" + std::to_string(p.step) + ", rows=" + std::to_string(p.batch_size) + ", tokens="
                   + std::to_string(p.num_tokens) + ", decode=" + std::to_string(p.num_decode)
                   + ", samples=" + std::to_string(p.num_samples) + ")";
        });

    py::class_<Events, std::shared_ptr<Events>> ev(
        m,
        "Events",
        "What happened to requests since the previous update(), one entry per request that got\n"
        "tokens, finished or was rejected: handles [E] int64, session_ids [E] uint64,\n"
        "offsets [E+1] and tokens [N] int32 (entry i's new tokens: tokens[offsets[i]:offsets[i+1]]),\n"
        "finished [E] bool, reasons [E] int8 (index into FINISH_REASONS: 0 running, 1 stop,\n"
        "2 length, 3 cancel, 4 error), codes [E] int32 (ERR_*), num_generated [E] int32,\n"
        "messages (list of str, '' except for errors). The arrays are owned by this object.");
#define TM_EV_ARRAY(NAME, LEN)                                                                                         \
    ev.def_property_readonly(#NAME, [](py::object self) {                                                              \
        const Events& e = self.cast<const Events&>();                                                                  \
        return view(e.NAME.data(), static_cast<py::ssize_t>(LEN), self);                                               \
    })
    TM_EV_ARRAY(handles, e.size());
    TM_EV_ARRAY(session_ids, e.size());
    TM_EV_ARRAY(offsets, e.size() + 1);
    TM_EV_ARRAY(tokens, e.tokens.size());
    TM_EV_ARRAY(reasons, e.size());
    TM_EV_ARRAY(codes, e.size());
    TM_EV_ARRAY(num_generated, e.size());
#undef TM_EV_ARRAY
    ev.def_property_readonly("finished",
                             [](py::object self) {
                                 const Events& e = self.cast<const Events&>();
                                 return py::array(py::dtype("bool"),
                                                  {static_cast<py::ssize_t>(e.size())},
                                                  {static_cast<py::ssize_t>(1)},
                                                  e.finished.data(),
                                                  self);
                             })
        .def_property_readonly("messages",
                               [](const Events& e) {
                                   std::vector<std::string> out(e.size());
                                   for (auto& kv : e.messages) {
                                       out[kv.first] = kv.second;
                                   }
                                   return out;
                               })
        .def("__len__", &Events::size)
        .def(
            "to_list",
            [](const Events& e) {
                std::vector<std::string> msgs(e.size());
                for (auto& kv : e.messages) {
                    msgs[kv.first] = kv.second;
                }
                py::list out;
                for (size_t i = 0; i < e.size(); ++i) {
                    std::vector<int32_t> toks(e.tokens.begin() + e.offsets[i], e.tokens.begin() + e.offsets[i + 1]);
                    out.append(py::make_tuple(e.handles[i],
                                              toks,
                                              static_cast<bool>(e.finished[i]),
                                              finish_reason_name(e.reasons[i]),
                                              e.codes[i],
                                              msgs[i]));
                }
                return out;
            },
            "The events as a list of (handle, tokens, finished, reason, code, message) tuples, with\n"
            "reason one of '', 'stop', 'length', 'cancel', 'error'. Convenient, not fast.");

    py::class_<Scheduler>(m,
                          "Scheduler",
                          "The persistent batch: sessions, requests, KV blocks and the per-step plan.\n\n"
                          "    plan = sched.schedule()                 # Plan (arrays alias scheduler buffers)\n"
                          "    tokens = sample(forward(plan))          # int32 [plan.num_samples]\n"
                          "    events = sched.update(tokens)           # Events\n\n"
                          "Pipelined: schedule(ahead=True) plans the next step while one plan is outstanding\n"
                          "(its pending tokens are placeholders -(j+1) in input_ids); update() commits the\n"
                          "oldest outstanding plan. See scheduler.h.\n\n"
                          "Requests are validated by submit(); a rejected one gets an error event in the next\n"
                          "update(). Not thread-safe: drive it from the engine thread only.")
        .def(py::init([](int num_blocks,
                         int block_size,
                         int max_batch_size,
                         int max_prefill_tokens,
                         int session_len,
                         int vocab_size,
                         int start_id,
                         int end_id,
                         bool chunked_prefill,
                         int admit_horizon,
                         int max_mixed_prefill_tokens) {
                 SchedulerConfig c;
                 c.num_blocks         = num_blocks;
                 c.block_size         = block_size;
                 c.max_batch_size     = max_batch_size;
                 c.max_prefill_tokens = max_prefill_tokens;
                 c.session_len        = session_len;
                 c.vocab_size         = vocab_size;
                 c.start_id           = start_id;
                 c.end_id             = end_id;
                 c.chunked_prefill    = chunked_prefill;
                 c.admit_horizon      = admit_horizon;
                 c.max_mixed_prefill_tokens = max_mixed_prefill_tokens;
                 return std::make_unique<Scheduler>(c);
             }),
             "num_blocks"_a,
             "block_size"_a,
             "max_batch_size"_a,
             "max_prefill_tokens"_a,
             "session_len"_a,
             "vocab_size"_a,
             "start_id"_a        = 1,
             "end_id"_a          = 2,
             "chunked_prefill"_a = true,
             "admit_horizon"_a   = 32,
             "max_mixed_prefill_tokens"_a = 0)
        .def(
            "submit",
            [](Scheduler& self,
               uint64_t session_id,
               const std::vector<int64_t>& input_ids,
               int64_t request_output_len,
               bool sequence_start,
               bool sequence_end,
               int64_t step,
               bool stop,
               int64_t end_id,
               const std::vector<int64_t>& stop_words,
               bool ignore_eos,
               bool logits_all,
               std::optional<uint64_t> random_seed) {
                RequestArgs a;
                a.session_id         = session_id;
                a.input_ids          = input_ids;
                a.request_output_len = request_output_len;
                a.sequence_start     = sequence_start;
                a.sequence_end       = sequence_end;
                a.step               = step;
                a.stop               = stop;
                a.end_id             = end_id;
                a.stop_words         = stop_words;
                a.ignore_eos         = ignore_eos;
                a.logits_all         = logits_all;
                a.has_seed           = random_seed.has_value();
                a.random_seed        = random_seed.value_or(0);
                return self.submit(a);
            },
            "session_id"_a,
            "input_ids"_a           = std::vector<int64_t>{},
            "request_output_len"_a  = 512,
            "sequence_start"_a      = true,
            "sequence_end"_a        = false,
            "step"_a                = -1,
            "stop"_a                = false,
            "end_id"_a              = -1,
            "stop_words"_a          = std::vector<int64_t>{},
            "ignore_eos"_a          = false,
            "logits_all"_a          = false,
            "random_seed"_a         = py::none(),
            "Validate and queue a request; returns its handle (int > 0). If rejected, last_code /\n"
            "last_message say why and the next update() carries an error event for the handle.\n"
            "input_ids: only this turn's new tokens. request_output_len 0: prefill only.\n"
            "step: history length to keep (v0.0.2; < 0 keeps everything). end_id < 0: the\n"
            "scheduler's. stop=True: a stop request for session_id (see cancel).\n"
            "logits_all: ask for the logits of every new input position (plan.logits_idx).")
        .def_property_readonly("last_code", &Scheduler::last_code, "ERR_* code of the last submit (0 = accepted).")
        .def_property_readonly("last_message", &Scheduler::last_message)
        .def("cancel",
             &Scheduler::cancel,
             "session_id"_a,
             "end"_a = false,
             "STOP: a running request finishes with reason 'cancel' (cache kept unless end); a queued\n"
             "one is removed. Returns 0, or ERR_INACTIVE when nothing runs for the id and end is False.")
        .def("schedule",
             &Scheduler::schedule,
             "ahead"_a = false,
             py::return_value_policy::reference_internal,
             "Admit, allocate, and return this step's Plan (arrays valid until the second schedule()\n"
             "after). ahead=True: one plan may be outstanding; rows of requests with a token pending\n"
             "in it feed the placeholder -(j+1) (j: the request's index in its sample list).")
        .def(
            "update",
            [](Scheduler& self, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
                if (tokens.ndim() != 1) {
                    throw std::invalid_argument("Scheduler.update: tokens must be 1-D");
                }
                return self.update(tokens.data(), static_cast<size_t>(tokens.shape(0)));
            },
            "tokens"_a = py::array_t<int32_t>(0),
            "Commit the oldest outstanding plan with one sampled token per plan.sample_idx entry and\n"
            "return the Events since the previous update() (no tokens when no plan is out).")
        .def("discard_plan",
             &Scheduler::discard_plan,
             "Drop the newest outstanding plan; nothing of it is committed.")
        .def_property_readonly("plan_outstanding", &Scheduler::plan_outstanding)
        .def_property_readonly("num_outstanding", &Scheduler::num_outstanding, "Plans not yet committed (0..2).")
        .def_property_readonly("plan",
                               &Scheduler::plan,
                               py::return_value_policy::reference_internal,
                               "The last Plan schedule() returned (outstanding or not).")
        .def(
            "session_info",
            [](const Scheduler& self, uint64_t id) -> py::object {
                SessionInfo s = self.session_info(id);
                if (!s.found) {
                    return py::none();
                }
                return session_dict(s.tokens, s.num_cached, s.blocks, s.active, s.last_use, s.has_seed, s.seed);
            },
            "session_id"_a,
            "dict(tokens, num_cached, blocks, status='idle'|'active', last_use, seed) or None.")
        .def("request_state", &Scheduler::request_state, "handle"_a, "'waiting' (queued, not admitted), 'running', 'preempted' (admitted, re-queued),\n'finished' or 'unknown'.")
        .def("session_ids", &Scheduler::session_ids)
        .def("num_running", &Scheduler::num_running)
        .def("num_waiting", &Scheduler::num_waiting)
        .def("num_free_blocks", &Scheduler::num_free_blocks)
        .def("num_sessions", &Scheduler::num_sessions)
        .def("num_preemptions", &Scheduler::num_preemptions)
        .def("num_evictions", &Scheduler::num_evictions)
        .def(
            "block_ref_counts",
            [](const Scheduler& self) {
                const auto& rc = self.block_manager().ref_counts();
                return py::array_t<int32_t>(static_cast<py::ssize_t>(rc.size()), rc.data());
            })
        .def("take_warnings", &Scheduler::take_warnings, "Warnings logged since the last call (and clears them).")
        .def("check_invariants",
             &Scheduler::check_invariants,
             "Raise RuntimeError on any broken invariant: pool bookkeeping, every block's ref count ==\n"
             "its uses by sessions, blocks cover exactly num_cached (+ in-flight) tokens, LRU order,\n"
             "request/session states consistent.")
        .def_property_readonly("block_size", [](const Scheduler& s) { return s.config().block_size; })
        .def_property_readonly("num_blocks", [](const Scheduler& s) { return s.config().num_blocks; })
        .def_property_readonly("max_batch_size", [](const Scheduler& s) { return s.config().max_batch_size; })
        .def_property_readonly("max_prefill_tokens", [](const Scheduler& s) { return s.config().max_prefill_tokens; })
        .def_property_readonly("max_mixed_prefill_tokens",
                               [](const Scheduler& s) { return s.config().max_mixed_prefill_tokens; })
        .def_property_readonly("session_len", [](const Scheduler& s) { return s.config().session_len; })
        .def_property_readonly("vocab_size", [](const Scheduler& s) { return s.config().vocab_size; })
        .def_property_readonly("max_step_tokens", [](const Scheduler& s) {
            const auto& c = s.config();
            return c.max_batch_size + std::max(c.max_prefill_tokens, c.session_len);
        });
}

}  // namespace
}  // namespace turbomind

PYBIND11_MODULE(_turbomind, m)
{
    m.doc() = "TurboMind engine core (C++ control plane): KV block pool, sessions and the scheduler.";
    turbomind::bind_block_manager(m);
    turbomind::bind_sequence_manager(m);
    turbomind::bind_scheduler(m);
}
