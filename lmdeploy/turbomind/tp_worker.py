"""Rank r (> 0) of a tensor-parallel engine: `python -m lmdeploy.turbomind.tp_worker FD`.

Started by `tensor_parallel.TensorParallelRunner`; FD is this process's end of a socket pair
with rank 0. The conversation on it:

    rank 0 -> init dict (rank, tp, store port, this rank's config, weights_init, ...)
    worker -> ('joining', None)   then joins the process group
    worker -> ('ready', None)     once its ModelRunner is built (weights, memory plan, graphs)
    rank 0 -> one step message per engine step (tensor_parallel.step_message), None to stop
    worker -> ('error', text)     on any failure, then exits 1

End of file on the socket means rank 0 is gone: the worker exits.
"""
import sys
from multiprocessing.connection import Connection


def serve(conn: Connection) -> int:
    import torch

    from ..console import one_line
    from .distributed import ProcessGroupComm
    from .model_runner import ModelRunner
    from .tensor_parallel import step_from_message

    init = conn.recv()
    torch.set_num_threads(init['threads'])
    rank, tp, cfg = init['rank'], init['tp'], init['cfg']
    try:
        conn.send(('joining', None))
        comm = ProcessGroupComm.connect(rank, tp, init['port'], cfg.device)
        runner = ModelRunner(cfg, rank=rank, tp=tp, comm=comm, kernels=init['kernels'],
                             weights_init=init['weights_init'], cuda_graph=init['cuda_graph'])
        conn.send(('ready', None))
        while True:
            msg = conn.recv()
            if msg is None:
                return 0
            runner.run(step_from_message(msg))
    except EOFError:  # rank 0 is gone
        return 0
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which stops the engine
        try:
            conn.send(('error', one_line(e)))
        except OSError:
            pass
        return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print('usage: python -m lmdeploy.turbomind.tp_worker FD  (started by the engine)',
              file=sys.stderr)
        return 2
    return serve(Connection(int(argv[0])))


if __name__ == '__main__':
    sys.exit(main())
