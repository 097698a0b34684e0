"""Serving benchmark of the Triton service (LMDeploy v0.0.2's profile_serving, reference 11.3):

    python benchmark/profile_serving.py HOST:PORT TOKENIZER [DATASET] [--concurrency 8]
        [--samples 1000] [--session_len 2048] [--test_round 1] [--seed 0] [--out serving.json]

TOKENIZER is a `tokenizer.model` file or a tokenizer folder (e.g. the workspace's
`triton_models/tokenizer`). DATASET is a ShareGPT JSON file; without one (or with `synthetic`)
the seeded synthetic set of BENCHMARKS.md is used (prompt 4..1024 tokens, prompt + output <=
session_len - 1, mean about 250 in / 230 out, random ids). Both samplers are
`profile_throughput.py`'s.

`--concurrency` client threads, each with its own gRPC stream and session id, pull requests from
a shared queue and send each as one `turbomind` request with v0.0.2's tensors (START and END
set, EOS banned so that the completion has exactly the dataset's length, greedy). Every streamed
response is timestamped on arrival:

* first-token latency: from sending the request to the first response that carries a new token;
* token latency: the gaps between responses, per generated token;
* throughput: generated tokens / wall time (and requests/s).

Each worker first runs two short warm-up requests. Printed: per-run stats (v0.0.2's
`cocurrency`, `elapsed_time`, `first_token latency(min, max, ave)`, `throughput` lines, plus
percentiles); `--out` writes them as JSON.
"""
from __future__ import annotations

import json
import os
import queue
import random
import statistics
import sys
import threading
import time
from typing import List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_throughput import percentile, sample_sharegpt, sample_synthetic  # noqa: E402


def _tensors(ids: List[int], out_len: int, session_id: int, eos_id: int):
    from lmdeploy.serve.turbomind.utils import prepare_tensor
    one = lambda v, dt: np.array([[v]], dtype=dt)  # noqa: E731
    return [prepare_tensor('input_ids', np.array([ids], dtype=np.uint32)),
            prepare_tensor('input_lengths', one(len(ids), np.uint32)),
            prepare_tensor('request_output_len', one(out_len, np.uint32)),
            prepare_tensor('runtime_top_k', one(1, np.uint32)),
            prepare_tensor('START', one(1, np.int32)), prepare_tensor('END', one(1, np.int32)),
            prepare_tensor('STOP', one(0, np.int32)),
            prepare_tensor('CORRID', one(session_id, np.uint64)),
            prepare_tensor('bad_words_list', np.array([[[eos_id], [1]]], dtype=np.int32))]


class Worker:
    """One client: a gRPC stream; `request` returns (arrival time, sequence_length) per
    response of one request."""

    def __init__(self, addr: str, session_id: int, eos_id: int):
        import tritonclient.grpc as grpcclient
        self.client = grpcclient.InferenceServerClient(addr)
        self.session_id = session_id
        self.eos_id = eos_id
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put(
            (time.perf_counter(), result, error)))

    def request(self, ids: List[int], out_len: int):
        t0 = time.perf_counter()
        self.client.async_stream_infer('turbomind', _tensors(ids, out_len, self.session_id, self.eos_id))
        stamps = []
        while True:
            t, result, error = self.responses.get()
            if error is not None:
                raise RuntimeError(str(error))
            final = result.get_response().parameters['triton_final_response'].bool_param
            seq = result.as_numpy('sequence_length')
            if seq is not None:
                stamps.append((t, int(seq.reshape(-1)[0])))
            if final:
                return t0, stamps

    def close(self):
        self.client.stop_stream()
        self.client.close()


def run(addr: str, requests, concurrency: int, eos_id: int):
    work: queue.Queue = queue.Queue()
    for r in requests:
        work.put(r)
    records, errors = [], []
    lock = threading.Lock()

    def loop(i: int):
        w = Worker(addr, session_id=i + 1, eos_id=eos_id)
        try:
            for _ in range(2):  # warm-up
                w.request([1, 2, 3, 4], 4)
            barrier.wait()
            while True:
                try:
                    ids, n_out = work.get_nowait()
                except queue.Empty:
                    return
                t0, stamps = w.request(ids, n_out)
                prefix = len(ids)
                new = [(t, n - prefix) for t, n in stamps if n > prefix]
                if not new:
                    continue
                first = new[0][0] - t0
                gaps = []
                for (ta, na), (tb, nb) in zip(new, new[1:]):
                    if nb > na:
                        gaps.append((tb - ta) / (nb - na))
                with lock:
                    records.append(dict(session=i + 1, input=len(ids), output=new[-1][1],
                                        first_token=first, gaps=gaps, latency=new[-1][0] - t0))
        except Exception as e:  # noqa: BLE001 - reported at the end
            with lock:
                errors.append(f'worker {i + 1}: {e}')
        finally:
            w.close()

    barrier = threading.Barrier(concurrency + 1)
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return records, errors, time.perf_counter() - start


def main(tritonserver_addr: str, tokenizer_path: str, dataset_path: str = '', concurrency: int = 1,
         session_len: int = 2048, samples: int = 1000, test_round: int = 1, seed: int = 0,
         out: Optional[str] = None):
    """Measure first-token latency, token latency and throughput of a Triton service.

    Args:
        tritonserver_addr: HOST:PORT of the gRPC endpoint.
        tokenizer_path: tokenizer.model file or tokenizer folder of the served model.
        dataset_path: ShareGPT JSON file; '' or 'synthetic' for the seeded synthetic set.
        concurrency: client threads (one session each).
        session_len: longest prompt + completion (v0.0.2: 2048).
        samples: requests per round.
        test_round: rounds (the sample repeated, shuffled).
        seed: sampling seed.
        out: write the results as JSON here.
    """
    from lmdeploy.turbomind.tokenizer import Tokenizer
    tokenizer = Tokenizer(tokenizer_path)
    t0 = time.perf_counter()
    max_len = session_len - 1
    if not dataset_path or dataset_path == 'synthetic':
        requests = sample_synthetic(samples, tokenizer.vocab_size, seed, max_len)
        source = 'synthetic'
    else:
        requests = sample_sharegpt(dataset_path, tokenizer, samples, seed, max_len)
        source = dataset_path
    requests = requests * test_round
    random.Random(seed).shuffle(requests)
    print(f'{len(requests)} requests from {source} in {time.perf_counter() - t0:.2f} s '
          f'(mean {statistics.mean(len(p) for p, _ in requests):.0f} in / '
          f'{statistics.mean(n for _, n in requests):.0f} out tokens)')
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    records, errors, elapsed = run(tritonserver_addr, requests, concurrency, eos_id)
    for e in errors:
        print(f'error: {e}', file=sys.stderr)
    if not records:
        print('error: no request finished', file=sys.stderr)
        sys.exit(1)
    firsts = [r['first_token'] for r in records]
    gaps = [g for r in records for g in r['gaps']]
    tokens = sum(r['output'] for r in records)
    result = dict(
        concurrency=concurrency, requests=len(records), failed=len(errors), elapsed_time=elapsed,
        first_token_latency=dict(min=min(firsts), max=max(firsts), ave=statistics.mean(firsts),
                                 p50=percentile(firsts, 50), p99=percentile(firsts, 99)),
        token_latency=dict(p50=percentile(gaps, 50), p99=percentile(gaps, 99),
                           ave=statistics.mean(gaps) if gaps else float('nan')),
        throughput_tokens_per_s=tokens / elapsed, requests_per_s=len(records) / elapsed,
        generated_tokens=tokens)
    ftl = result['first_token_latency']
    tl = result['token_latency']
    print(f'\n{"-" * 50}\ncocurrency: {concurrency}\nelapsed_time: {elapsed:.2f}s\n'
          f'first_token latency(min, max, ave): {ftl["min"]:.3f}s, {ftl["max"]:.3f}s, '
          f'{ftl["ave"]:.3f}s  (p50 {ftl["p50"]:.3f}s, p99 {ftl["p99"]:.3f}s)\n'
          f'token latency(p50, p99, ave): {tl["p50"] * 1e3:.2f} ms, {tl["p99"] * 1e3:.2f} ms, '
          f'{tl["ave"] * 1e3:.2f} ms\n'
          f'throughput: {result["throughput_tokens_per_s"]:.2f} token/s, '
          f'{result["requests_per_s"]:.3f} req/s\n{"-" * 50}')
    if out:
        with open(out, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    from lmdeploy.console import run_fire
    run_fire(main, name='profile_serving.py',
             usage='python benchmark/profile_serving.py HOST:PORT TOKENIZER [DATASET] [--concurrency N]')
