"""Per-step cost of the C++ Scheduler as the Python engine loop sees it.

    python benchmark/profile_scheduler.py [--steps 2000] [--batch 1 32 128 256 512]

For each batch size, that many sessions are submitted and prefilled, then steady-state decode
steps are timed: `schedule()` (plus reading the plan's arrays, as the data plane does), and
`update(tokens)` (plus reading the events' arrays). The sampled tokens never stop a request,
and steps cross block boundaries (blocks are allocated on the fly). Goal (issue): schedule +
update <= 100 us per step at 256 running decode sequences.
"""
import argparse
import time

import numpy as np

from lmdeploy.turbomind import _turbomind

PLAN_FIELDS = ('input_ids', 'positions', 'cu_seqlens', 'kv_lens', 'block_table', 'slot_mapping', 'sample_idx',
               'sample_handles', 'row_handles')
EVENT_FIELDS = ('handles', 'offsets', 'tokens', 'finished', 'reasons')


def run(batch, steps, prompt_len, block_size, session_len):
    per_seq = -(-session_len // block_size)
    sched = _turbomind.Scheduler(num_blocks=batch * per_seq, block_size=block_size, max_batch_size=batch,
                                 max_prefill_tokens=8192, session_len=session_len, vocab_size=32000)
    rng = np.random.default_rng(0)
    for sid in range(batch):
        sched.submit(sid, rng.integers(3, 32000, prompt_len).tolist(), request_output_len=session_len,
                     ignore_eos=True)
    # prefill until everyone decodes
    for _ in range(10000):
        plan = sched.schedule()
        sched.update(np.full(plan.num_samples, 7, np.int32))
        if plan.num_decode == batch:
            break
    tokens = np.full(batch, 7, np.int32)
    t_sched = t_update = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        plan = sched.schedule()
        for name in PLAN_FIELDS:
            getattr(plan, name)
        t1 = time.perf_counter()
        events = sched.update(tokens)
        for name in EVENT_FIELDS:
            getattr(events, name)
        t2 = time.perf_counter()
        t_sched += t1 - t0
        t_update += t2 - t1
        assert plan.num_decode == batch and len(events) == batch
    sched.check_invariants()
    # the bare calls, no array views
    t0 = time.perf_counter()
    for _ in range(steps):
        sched.schedule()
        sched.update(tokens)
    t_bare = time.perf_counter() - t0
    return t_sched / steps * 1e6, t_update / steps * 1e6, t_bare / steps * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=2000)
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 32, 128, 256, 512])
    parser.add_argument('--prompt_len', type=int, default=128)
    parser.add_argument('--block_size', type=int, default=64)
    parser.add_argument('--session_len', type=int, default=4096)
    parser.add_argument('--repeat', type=int, default=3, help='best of N runs')
    args = parser.parse_args()
    # each run times `steps` decode steps twice; leave room for the prefill steps too
    steps = min(args.steps, (args.session_len - args.prompt_len) // 2 - 32)

    print(f'decode steps: {steps}, prompt {args.prompt_len}, block_size {args.block_size}, '
          f'session_len {args.session_len} (best of {args.repeat})')
    print(f'{"batch":>6}{"schedule us":>14}{"update us":>12}{"total us":>11}{"bare us":>10}{"ns/row":>9}')
    at256 = None
    for batch in args.batch:
        best = min((run(batch, steps, args.prompt_len, args.block_size, args.session_len)
                    for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
        s, u, bare = best
        total = s + u
        if batch == 256:
            at256 = total
        print(f'{batch:>6}{s:>14.1f}{u:>12.1f}{total:>11.1f}{bare:>10.1f}{total * 1e3 / batch:>9.0f}')
    if at256 is not None:
        verdict = 'PASS' if at256 <= 100 else 'FAIL'
        print(f'goal: schedule()+update() <= 100 us at 256 running decode sequences: {at256:.1f} us  {verdict}')


if __name__ == '__main__':
    main()
