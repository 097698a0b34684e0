"""How many concurrent sessions the KV pool holds with fp16 vs int8 KV (quant_policy 4), from
the engine's own memory plan on the GPU (weights, profiled activations, then the pool).

    python benchmark/kv_capacity.py --dummy llama2-7b [--session_tokens 2048] \
        [--max_batch_size 128] [--cache_max_entry_count 0.9] [--out capacity.json]

Each KV mode builds a ModelRunner with random weights of the shape (no CUDA graphs, so the
same memory is left for the pool in every mode; with graphs the engine keeps a few hundred MiB
more back) and reports its blocks, KV bytes and sessions of --session_tokens tokens.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = [('fp16 KV', 0, 'per_tensor'), ('int8 KV, calibrated scales', 4, 'per_tensor'),
         ('int8 KV, online scales', 4, 'online')]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dummy', default='llama2-7b', help='model shape (dummy.SHAPES)')
    p.add_argument('--session_tokens', type=int, default=2048, help='tokens per session')
    p.add_argument('--max_batch_size', type=int, default=128)
    p.add_argument('--max_prefill_tokens', type=int, default=8192)
    p.add_argument('--cache_max_entry_count', type=float, default=0.9,
                   help='fraction of free memory for the KV pool')
    p.add_argument('--block_size', type=int, default=64)
    p.add_argument('--out', default=None, help='JSON results file')
    args = p.parse_args(argv)
    from lmdeploy.turbomind.dummy import dummy_config, dummy_weights
    from lmdeploy.turbomind.model_runner import ModelRunner
    rows = []
    for name, qp, scales in MODES:
        cfg = dummy_config(args.dummy, device='cuda', dtype='fp16', quant_policy=qp,
                           kv_int8_scales=scales, session_len=args.session_tokens,
                           max_batch_size=args.max_batch_size, block_size=args.block_size,
                           max_prefill_tokens=args.max_prefill_tokens,
                           cache_max_entry_count=args.cache_max_entry_count)
        runner = ModelRunner(cfg, weights_init=dummy_weights, cuda_graph=False)
        per_session = cfg.blocks_per_session()
        rows.append(dict(mode=name, num_blocks=runner.num_blocks,
                         kv_gib=runner.kv_cache.nbytes() / 2**30,
                         bytes_per_token=runner.kv_cache.nbytes() / (runner.num_blocks
                                                                     * cfg.block_size),
                         sessions=runner.num_blocks // per_session))
        print(f"{name}: {rows[-1]['num_blocks']} blocks, {rows[-1]['kv_gib']:.2f} GiB, "
              f"{rows[-1]['bytes_per_token'] / 1024:.0f} KiB/token, {rows[-1]['sessions']} "
              f'sessions of {args.session_tokens} tokens', flush=True)
        del runner
        torch.cuda.empty_cache()
    for r in rows[1:]:
        r['vs_fp16'] = r['sessions'] / rows[0]['sessions']
        print(f"{r['mode']}: {r['vs_fp16']:.2f}x the fp16 sessions")
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), gpu=torch.cuda.get_device_name(), rows=rows), f,
                      indent=1)


if __name__ == '__main__':
    main()
