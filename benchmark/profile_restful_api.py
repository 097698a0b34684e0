"""Online serving benchmark over HTTP (BENCHMARKS.md B4): Poisson arrivals against any
OpenAI-compatible server; TTFT, TPOT, ITL and end-to-end latency p50/p99, and req/s.

    python -m lmdeploy.serve.openai.api_server ./workspace &   # or --dummy llama2-7b, or any server
    python benchmark/profile_restful_api.py synthetic --base_url http://127.0.0.1:23333 \\
        --request_rate 4 8 16 --num_prompts 3000 --tokenizer ./workspace [--out b4.json]
    python benchmark/profile_restful_api.py ShareGPT_V3_unfiltered_cleaned_split.json \\
        --tokenizer ./workspace --request_rate 4

Requests are the B3 set (`profile_throughput.py`'s sampling: ShareGPT pairs, or the seeded
synthetic lengths). Each request is a streamed POST /v1/completions with the prompt (text for
ShareGPT, token ids for the synthetic set), `max_tokens` = the pair's completion length,
`ignore_eos` (an extension this server and vLLM accept), temperature 1.0, top_p 1.0 and a seed.
Arrivals follow a Poisson process of `--request_rate` req/s (`inf`: all at once), seeded.

Metrics per rate: TTFT (arrival to first streamed token), TPOT ((last - first) / (tokens - 1)
per request), ITL (gap between consecutive streamed chunks, divided among the tokens a chunk
carries), E2E, each p50/p99; completed req/s and output tok/s over the whole run. The token
count of a request comes from the usage the server reports (stream_options.include_usage), else
from the number of chunks.

The client's own HTTP cost is inside every TTFT: `--client aiohttp` (the default when installed)
costs about half of httpx's per streamed line. Only the transport differs between the two; the
parsing and the metrics are the same code.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import urllib.request
from collections import namedtuple
from contextlib import asynccontextmanager
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_throughput import percentile, sample_sharegpt, sample_synthetic  # noqa: E402


def load_tokenizer(path: Optional[str]):
    if path is None:
        return None
    from lmdeploy.turbomind.tokenizer import Tokenizer
    tok_dir = os.path.join(path, 'triton_models', 'tokenizer')
    return Tokenizer(tok_dir if os.path.isdir(tok_dir) else path)


def auth_headers(args) -> dict:
    return {'Authorization': f'Bearer {args.api_key}'} if args.api_key else {}


def first_model(base_url: str, headers: dict) -> str:
    """The first model id of GET /v1/models (stdlib HTTP: this one call needs no client)."""
    req = urllib.request.Request(base_url.rstrip('/') + '/v1/models', headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)['data'][0]['id']


class StatusError(Exception):
    """A reply other than 200; its text is '<status>: <the body's first 200 characters>'."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f'{status}: {body.decode(errors="replace")[:200]}')


# Transports: a session (an async context manager) and a streamed POST of JSON (an async context
# manager giving the reply's lines without their line ends, or raising StatusError). All parsing,
# timing and error handling is one_request's, whichever client carries the bytes.
@asynccontextmanager
async def aiohttp_session():
    import aiohttp
    # limit=0: no cap on connections (like httpx's Limits(None)); no timeouts at all. No
    # trust_env: aiohttp would look up proxies and .netrc on every request (+1 ms of TTFT
    # p50 on a CPU); through a proxy, use --client httpx.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@asynccontextmanager
async def aiohttp_stream(session, url, headers, body):
    async with session.post(url, json=body, headers=headers) as r:
        if r.status != 200:
            raise StatusError(r.status, await r.read())
        yield (raw.decode(errors='replace').rstrip('\r\n') async for raw in r.content)


@asynccontextmanager
async def httpx_session():
    import httpx
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        yield client


@asynccontextmanager
async def httpx_stream(client, url, headers, body):
    async with client.stream('POST', url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise StatusError(r.status_code, await r.aread())
        yield r.aiter_lines()


Transport = namedtuple('Transport', 'session stream')
CLIENTS = {'aiohttp': Transport(aiohttp_session, aiohttp_stream),
           'httpx': Transport(httpx_session, httpx_stream)}


def default_client() -> str:
    """aiohttp when it imports (about half httpx's overhead per streamed line), else httpx."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return 'httpx'
    return 'aiohttp'


def sse_chunk(line: str) -> Optional[dict]:
    """The JSON of an SSE 'data: ' line; None for any other line and for 'data: [DONE]'."""
    if not line.startswith('data: ') or line == 'data: [DONE]':
        return None
    return json.loads(line[6:])


def chunk_text(chunk: dict) -> str:
    choices = chunk.get('choices') or []
    return choices[0].get('text') if choices else ''


def failed(error: str):
    return None, [], None, 0, error


def spread_gaps(gaps: List[float], n_tokens: int, n_chunks: int) -> List[float]:
    """Each gap spread over the tokens its chunk carried (usage gives the true count)."""
    if n_tokens > n_chunks and gaps:
        scale = (n_tokens - 1) / len(gaps)
        gaps = [g / scale for g in gaps for _ in range(max(1, round(scale)))]
    return gaps


async def one_request(transport, session, url, headers, body, arrival):
    """(ttft, gaps, e2e, n_tokens, error) of one streamed completion."""
    first = last = None
    gaps = []
    n_chunks = 0
    usage_tokens = None
    try:
        async with transport.stream(session, url, headers, body) as lines:
            async for line in lines:
                chunk = sse_chunk(line)
                if chunk is None:
                    continue
                if 'error' in chunk:
                    return failed(str(chunk['error'])[:200])
                if chunk.get('usage'):
                    usage_tokens = chunk['usage'].get('completion_tokens')
                if not chunk_text(chunk):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                n_chunks += 1
    except StatusError as e:
        return failed(str(e))
    except Exception as e:  # noqa: BLE001
        return failed(f'{type(e).__name__}: {e}')
    if first is None:
        return failed('no tokens streamed')
    n = usage_tokens if usage_tokens is not None else n_chunks
    return first - arrival, spread_gaps(gaps, n, n_chunks), last - arrival, n, None


async def run_rate(args, requests, rate: float, model: str):
    transport = CLIENTS[args.client]
    rng = random.Random(args.seed)
    url = args.base_url.rstrip('/') + '/v1/completions'
    headers = auth_headers(args)
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc=f'rate {rate}', unit='req', dynamic_ncols=True)
        except ImportError:
            pass
    results = []
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async with transport.session() as session:

        async def fire(i, prompt, n_out):
            body = {'model': model, 'prompt': prompt, 'max_tokens': n_out, 'stream': True,
                    'temperature': 1.0, 'top_p': 1.0, 'ignore_eos': True, 'seed': args.seed + i,
                    'stream_options': {'include_usage': True}}
            arrival = time.perf_counter()
            if sem:
                async with sem:
                    res = await one_request(transport, session, url, headers, body, arrival)
            else:
                res = await one_request(transport, session, url, headers, body, arrival)
            results.append(res)
            if bar is not None:
                bar.update(1)

        tasks = []
        start = time.perf_counter()
        for i, (prompt, n_out) in enumerate(requests):
            tasks.append(asyncio.create_task(fire(i, prompt, n_out)))
            if math.isfinite(rate) and rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return summarize(results, elapsed, rate)


def summarize(results, elapsed, rate):
    ok = [r for r in results if r[4] is None]
    errors = [r[4] for r in results if r[4] is not None]
    ttft = [r[0] for r in ok]
    e2e = [r[2] for r in ok]
    itl = [g for r in ok for g in r[1]]
    tpot = [(r[2] - r[0]) / (r[3] - 1) for r in ok if r[3] > 1]
    out_tokens = sum(r[3] for r in ok)
    ms = 1000.0
    return {
        'request_rate': rate, 'requests': len(results), 'completed': len(ok),
        'errors': len(errors), 'error_samples': errors[:10], 'elapsed_s': elapsed,
        'throughput_req_s': len(ok) / elapsed, 'throughput_out_tok_s': out_tokens / elapsed,
        'ttft_ms_p50': percentile(ttft, 50) * ms, 'ttft_ms_p99': percentile(ttft, 99) * ms,
        'tpot_ms_p50': percentile(tpot, 50) * ms, 'tpot_ms_p99': percentile(tpot, 99) * ms,
        'itl_ms_p50': percentile(itl, 50) * ms, 'itl_ms_p99': percentile(itl, 99) * ms,
        'e2e_s_p50': percentile(e2e, 50), 'e2e_s_p99': percentile(e2e, 99),
    }


def print_table(rows):
    cols = [('rate', 'request_rate', '{:g}'), ('ok', 'completed', '{}'), ('err', 'errors', '{}'),
            ('req/s', 'throughput_req_s', '{:.2f}'), ('out tok/s', 'throughput_out_tok_s', '{:.1f}'),
            ('TTFT p50', 'ttft_ms_p50', '{:.1f}'), ('TTFT p99', 'ttft_ms_p99', '{:.1f}'),
            ('TPOT p50', 'tpot_ms_p50', '{:.2f}'), ('TPOT p99', 'tpot_ms_p99', '{:.2f}'),
            ('ITL p50', 'itl_ms_p50', '{:.2f}'), ('ITL p99', 'itl_ms_p99', '{:.2f}'),
            ('E2E p50 s', 'e2e_s_p50', '{:.2f}'), ('E2E p99 s', 'e2e_s_p99', '{:.2f}')]
    cells = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(name), *(len(c[i]) for c in cells)) for i, (name, _, _) in enumerate(cols)]
    print('\n(latencies in ms unless marked s)')
    print('| ' + ' | '.join(n.rjust(w) for (n, _, _), w in zip(cols, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for c in cells:
        print('| ' + ' | '.join(v.rjust(w) for v, w in zip(c, widths)) + ' |')
    for r in rows:
        for e in r['error_samples'][:3]:
            print(f'  rate {r["request_rate"]:g} error: {e}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('dataset', help="ShareGPT JSON file, or 'synthetic'")
    p.add_argument('--base_url', default='http://127.0.0.1:23333', help='server root URL')
    p.add_argument('--model', default=None, help='model name (default: the first of /v1/models)')
    p.add_argument('--api_key', default=os.environ.get('OPENAI_API_KEY'), help='bearer key')
    p.add_argument('--tokenizer', default=None,
                   help='workspace or tokenizer path: needed for ShareGPT (length filter); for '
                        'synthetic it gives the vocabulary size')
    p.add_argument('--vocab_size', type=int, default=None,
                   help='vocabulary of synthetic prompt ids (default: the tokenizer\'s, else 32000)')
    p.add_argument('--request_rate', type=float, nargs='+', default=[4.0],
                   help='Poisson rates in req/s, each run in turn (inf: all at once)')
    p.add_argument('--num_prompts', type=int, default=3000, help='requests per rate')
    p.add_argument('--max_seq_len', type=int, default=2048, help='prompt + output limit')
    p.add_argument('--max_concurrency', type=int, default=None, help='cap in-flight requests')
    p.add_argument('--seed', type=int, default=0, help='dataset, arrival and sampling seed')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.add_argument('--client', choices=sorted(CLIENTS), default=default_client(),
                   help='HTTP client of the streamed requests; its overhead is inside every TTFT '
                        'and ITL measured (on a CPU: httpx about 1.2 ms to the first line, '
                        'aiohttp 0.6). Default: aiohttp when installed, else httpx '
                        '(here: %(default)s)')
    p.add_argument('--out', default=None, help='write the results as JSON')
    args = p.parse_args(argv)
    if args.dataset != 'synthetic' and not args.tokenizer:
        p.error('a ShareGPT dataset needs --tokenizer (the workspace) for its length filter')
    try:
        __import__(args.client)
    except ImportError:
        p.error(f'--client {args.client}: {args.client} is not installed')
    return args


def main(argv=None):
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    model = args.model or first_model(args.base_url, auth_headers(args))
    if args.dataset == 'synthetic':
        vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer else 32000)
        pairs = sample_synthetic(args.num_prompts, vocab, args.seed, args.max_seq_len)
        requests: List = [(ids, n) for ids, n in pairs]
    else:
        pairs = sample_sharegpt(args.dataset, tokenizer, args.num_prompts, args.seed,
                                args.max_seq_len)
        requests = [(tokenizer.decode(ids), n) for ids, n in pairs]
    header = (f'model {model} at {args.base_url}, {len(requests)} prompts ({args.dataset}), '
              f'client {args.client}')
    print(header, flush=True)
    rows = []
    for rate in args.request_rate:
        rows.append(asyncio.run(run_rate(args, requests, rate, model)))
    print('\n' + header)
    print_table(rows)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'args': vars(args), 'model': model, 'client': args.client,
                       'results': rows}, f, indent=1)
    return 1 if any(r['errors'] for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
