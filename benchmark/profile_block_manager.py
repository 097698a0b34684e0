"""Cost of BlockManager calls from Python (C++ work plus the pybind11 crossing).

    python benchmark/profile_block_manager.py [--num_blocks 65536] [--iters 20000]

Per-step engine work goes through C++ callers, so the Python-side numbers are an upper bound.
"""
import argparse
import random
import time

from lmdeploy.turbomind import _turbomind


def timeit(fn, iters):
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num_blocks', type=int, default=65536)
    parser.add_argument('--block_size', type=int, default=64)
    parser.add_argument('--iters', type=int, default=20000)
    args = parser.parse_args()

    bm = _turbomind.BlockManager(args.num_blocks, args.block_size)
    # fragment the free list so the numbers are not for a pristine pool
    held = bm.allocate(args.num_blocks // 2)
    random.Random(0).shuffle(held)
    bm.free(held[:len(held) // 2])

    print(f'pool: {bm!r}')
    print(f'{"op":<28}{"us/call":>10}{"ns/block":>10}')
    for n in (1, 16, 256):
        us = timeit(lambda: bm.free(bm.allocate(n)), args.iters)
        print(f'{f"allocate({n}) + free":<28}{us:>10.2f}{us * 1e3 / n:>10.1f}')
    ids = bm.allocate(256)
    us = timeit(lambda: bm.free(bm.share(ids)), args.iters)
    print(f'{"share(256) + free":<28}{us:>10.2f}{us * 1e3 / 256:>10.1f}')
    us = timeit(bm.num_free, args.iters)
    print(f'{"num_free()":<28}{us:>10.2f}')
    iters = max(1, args.iters // 100)
    us = timeit(bm.check_invariants, iters)
    print(f'{"check_invariants()":<28}{us:>10.2f}{us * 1e3 / args.num_blocks:>10.1f}')


if __name__ == '__main__':
    main()
