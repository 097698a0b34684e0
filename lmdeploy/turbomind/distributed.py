"""The collectives one tensor-parallel rank needs, over a process group of its own.

    comm = SingleRank()                                   # tp=1: every collective is the identity
    comm = ProcessGroupComm.connect(rank, tp, port, device)   # rank 0 hosts the store on `port`

`all_reduce` sums in place (after `wo` and `w2`), `all_gather` concatenates along the last dim
in rank order (the vocab-parallel LM head), `min_int` agrees on one number (the KV pool size).

The group is made directly from a TCPStore (NCCL on CUDA, gloo on CPU), never as torch's global
default group, so a process may hold several engines and a user's own process group is left
alone.
"""
import datetime

import torch
import torch.distributed as dist

# Startup (store rendezvous) and per-collective limits. A rank that dies is noticed at once
# (its sockets close); the timeout only bounds a rank that hangs.
STORE_TIMEOUT = datetime.timedelta(seconds=120)
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class SingleRank:
    rank = 0
    tp = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def min_int(self, value: int) -> int:
        return int(value)


class ProcessGroupComm:

    def __init__(self, pg, rank: int, tp: int, device: torch.device):
        self.pg, self.rank, self.tp, self.device = pg, rank, tp, device

    @classmethod
    def connect(cls, rank: int, tp: int, port: int, device, store=None) -> 'ProcessGroupComm':
        """Join the group of `tp` ranks whose store rank 0 serves on 127.0.0.1:`port` (rank 0
        passes the store it made). Returns once every rank has joined."""
        device = torch.device(device)
        if store is None:
            store = dist.TCPStore('127.0.0.1', port, tp, False, timeout=STORE_TIMEOUT)
        if device.type == 'cuda':
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            pg = dist.ProcessGroupNCCL(store, rank, tp, options)
        else:
            pg = dist.ProcessGroupGloo(store, rank, tp, COLLECTIVE_TIMEOUT)
        return cls(pg, rank, tp, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.tp)]
        self.pg.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], options).wait()
        return int(t.item())
