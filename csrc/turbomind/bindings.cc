// Python bindings: the extension module lmdeploy.turbomind._turbomind.
//
// Block ids cross as Python lists of int (any sequence of ints is accepted, numpy int arrays
// included); ref_counts() returns a numpy int32 array. C++ exceptions become Python ones:
// std::invalid_argument -> ValueError, OutOfBlocks -> OutOfBlocksError (a RuntimeError),
// std::runtime_error -> RuntimeError, std::overflow_error -> OverflowError.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

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

}  // namespace
}  // namespace turbomind

PYBIND11_MODULE(_turbomind, m)
{
    m.doc() = "TurboMind engine core (C++ control plane): KV block pool; later sequences and scheduler.";
    turbomind::bind_block_manager(m);
}
