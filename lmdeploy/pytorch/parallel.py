"""Several processes, one model: DeepSpeed AutoTP tensor parallelism for the PyTorch chat.

Launched by `deepspeed --module --num_gpus N lmdeploy.pytorch.chat ...` or `torchrun
--nproc_per_node N -m lmdeploy.pytorch.chat ...`, every process runs the same chat loop; rank 0
reads the console and broadcasts each input, every rank runs the model on its shard, and only
rank 0 prints. The process group uses NCCL on GPUs and gloo on CPU.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Optional


@dataclass
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False  # a process group is up (world_size > 1 and DeepSpeed present)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(environ=os.environ) -> Ranks:
    """LOCAL_RANK / RANK / WORLD_SIZE as set by the deepspeed launcher or torchrun."""
    def get(name, default):
        value = environ.get(name, '')
        return int(value) if value.strip().isdigit() else default

    local_rank = get('LOCAL_RANK', 0)
    return Ranks(rank=get('RANK', local_rank), local_rank=local_rank, world_size=max(1, get('WORLD_SIZE', 1)))


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def disable_cpu_shm_allreduce() -> None:
    """DeepSpeed's shared-memory all-reduce op for CPU crashes with two ranks on some hosts;
    make DeepSpeed's torch backend skip building it so that gloo does the all-reduce."""
    # `deepspeed.comm.torch` as an attribute is the torch module that deepspeed.comm imports,
    # so the submodule is taken from the import system.
    backend = importlib.import_module('deepspeed.comm.torch')
    if hasattr(backend, 'build_shm_op'):
        backend.build_shm_op = lambda: None


def init_process_group(ranks: Ranks, device_type: str) -> None:
    """Start DeepSpeed's process group (gloo on CPU, NCCL on GPUs)."""
    import deepspeed
    import torch
    if device_type == 'cuda':
        torch.cuda.set_device(ranks.local_rank)
        backend = 'nccl'
    else:
        disable_cpu_shm_allreduce()
        backend = 'gloo'
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    ranks.distributed = True


def shard_model(model, ranks: Ranks, dtype):
    """Split `model` over the ranks with DeepSpeed AutoTP; returns the (sharded) HF module."""
    import contextlib

    import deepspeed

    # DeepSpeed prints its AutoTP plan to stdout on every rank; the chat's stdout is rank 0's
    # conversation, so the plan goes to rank 0's stderr and nowhere on the other ranks.
    sink = sys.stderr if ranks.is_main else open(os.devnull, 'w')
    try:
        with contextlib.redirect_stdout(sink):
            engine = deepspeed.init_inference(model, tensor_parallel={'tp_size': ranks.world_size},
                                              dtype=dtype, replace_with_kernel_inject=False)
    finally:
        if sink is not sys.stderr:
            sink.close()
    return engine.module


def broadcast_text(text: Optional[str], ranks: Ranks) -> Optional[str]:
    """Rank 0's `text` on every rank (None stands for end of input)."""
    if not ranks.distributed:
        return text
    import torch.distributed as dist
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def token_syncer(ranks: Ranks, device):
    """A function that returns rank 0's token on every rank (keeps sampling in lockstep)."""
    if not ranks.distributed:
        return None
    import torch
    import torch.distributed as dist
    buf = torch.zeros(1, dtype=torch.long, device=device)

    def sync(token: int) -> int:
        buf.fill_(token)
        dist.broadcast(buf, src=0)
        return int(buf.item())

    return sync


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.barrier()  # no rank tears the group down while another still uses it
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
