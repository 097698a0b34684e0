"""Soak test of the OpenAI-compatible server: random traffic with random client disconnects for
N minutes; the server's memory (RSS) and KV blocks in use must stay flat, and nothing may fail.

    python benchmark/soak_openai.py --minutes 10 [--workspace WS] [--concurrency 8] [--out soak.json]

Without --workspace it deploys the embedded MiniChat demo (runs on CPU). The script starts
`python -m lmdeploy.serve.openai.api_server` itself on a free loopback port, and every
`--sample_s` seconds records the server's RSS and the KV blocks / sessions from /metrics.
Traffic mixes chat and completions, streamed and not, n = 1..2, stop strings, interactive
sessions (ended at the end, or by a later non-interactive turn) and disconnects: a streamed
response dropped after a random number of chunks, or a non-streamed one abandoned by a client
timeout. Expected answers are 200s, plus 409 for an interactive turn racing its own session's
disconnected predecessor; anything else counts as an error.

Verdict (PASS/FAIL): no errors; once the server is idle at the end, 0 KV blocks in use and 0
sessions; RSS growth from the first sample after warm-up to the end <= --rss_slack_mb.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lmdeploy.serve.openai.metrics import metric, parse_metrics  # noqa: E402

QUESTIONS = ['What is 23 + 45?', 'Reverse the word garden.', 'Subtract 8 from 50.',
             'Count from 3 to 9.', 'hi', 'Who are you?', '12 + 7 = ?', 'Spell tiger backwards.']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


class Stats:

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {'requests': 0, 'ok': 0, 'disconnects': 0, 'busy_409': 0, 'errors': 0,
                       'tokens': 0}
        self.error_samples = []

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def error(self, what):
        with self.lock:
            self.counts['errors'] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(what)


def worker(url, model, stats: Stats, stop: threading.Event, seed: int, session_base: int):
    rng = random.Random(seed)
    client = httpx.Client(timeout=120)
    session_id = None
    turn = 0
    opened = set()  # sessions this worker started: ended (or found gone) at the end
    while not stop.is_set():
        stats.add('requests')
        kind = rng.random()
        body = {'model': model, 'temperature': rng.choice([0, 0.8]), 'seed': rng.randrange(1000),
                'max_tokens': rng.choice([8, 32, 64, 200])}
        if rng.random() < 0.2:
            body['stop'] = rng.choice([', 5', ' is', '.', ['ab', '= ']])
        if rng.random() < 0.15:
            body['ignore_eos'] = True
        chat = kind < 0.7
        if chat:
            body['messages'] = [{'role': 'user', 'content': rng.choice(QUESTIONS)}]
            if session_id is None and rng.random() < 0.2:
                session_id, turn = session_base + rng.randrange(10**6), 0
                opened.add(session_id)
            if session_id is not None:
                body['session_id'] = session_id
                turn += 1
                body['interactive_mode'] = turn < 3
                if turn >= 3:
                    session_id = None
            elif rng.random() < 0.2:
                body['n'] = 2
            path = '/v1/chat/completions'
        else:
            body['prompt'] = f'<BOS><|user|>{rng.choice(QUESTIONS)}<|end|><|bot|>'
            path = '/v1/completions'
        disconnect = rng.random() < 0.25
        stream = rng.random() < 0.5
        try:
            if stream:
                body['stream'] = True
                cut = rng.randrange(1, 12) if disconnect else None
                with client.stream('POST', url + path, json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        _status(stats, r, body)
                        continue
                    chunks = 0
                    for line in r.iter_lines():
                        if line.startswith('data: {"error"'):
                            stats.error(line[:200])
                            break
                        if line.startswith('data: '):
                            chunks += 1
                        if cut is not None and chunks >= cut:
                            stats.add('disconnects')
                            break  # closing the response drops the connection
                    else:
                        stats.add('ok')
                        stats.add('tokens', chunks)
            elif disconnect:
                try:
                    client.post(url + path, json={**body, 'max_tokens': 400, 'ignore_eos': True},
                                timeout=rng.uniform(0.05, 0.5))
                    stats.add('ok')
                except httpx.TimeoutException:
                    stats.add('disconnects')
                    client.close()  # the abandoned connection must not be reused
                    client = httpx.Client(timeout=120)
            else:
                r = client.post(url + path, json=body)
                if r.status_code == 200:
                    stats.add('ok')
                    stats.add('tokens', r.json()['usage']['completion_tokens'])
                else:
                    _status(stats, r, body)
        except httpx.HTTPError as e:
            stats.error(f'{type(e).__name__}: {e}')
    for sid in opened:  # a session whose last turn failed (409) or never came is still open
        r = client.post(f'{url}/v1/sessions/{sid}/end')
        if r.status_code not in (200, 404):
            stats.error(f'ending session {sid}: {r.status_code} {r.text[:200]}')
    client.close()


def _status(stats, r, body):
    if r.status_code == 409 and 'session_id' in body:
        stats.add('busy_409')  # the previous turn of this session was dropped mid-generation
        return
    stats.error(f'{r.status_code}: {r.text[:200]}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--minutes', type=float, default=10.0, help='how long to run (default 10)')
    p.add_argument('--workspace', default=None, help='a deployed workspace (default: MiniChat)')
    p.add_argument('--concurrency', type=int, default=8, help='client threads (default 8)')
    p.add_argument('--sample_s', type=float, default=30.0, help='seconds between samples')
    p.add_argument('--warmup_s', type=float, default=60.0,
                   help='RSS growth is measured from the first sample after this (default 60)')
    p.add_argument('--rss_slack_mb', type=float, default=64.0,
                   help='largest RSS growth that passes (default 64 MiB)')
    p.add_argument('--server_args', default='--max_batch_size 8',
                   help='extra api_server flags (default: "%(default)s")')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='write the samples and verdict as JSON')
    args = p.parse_args(argv)

    tmp = None
    ws = args.workspace
    if ws is None:
        from lmdeploy.serve.turbomind.deploy import deploy
        tmp = tempfile.TemporaryDirectory()
        ws = os.path.join(tmp.name, 'workspace')
        deploy('minichat', os.path.join(ROOT, 'assets', 'minichat'), 'hf', dst_path=ws)
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    log = open(os.path.join(tempfile.gettempdir(), f'soak_openai_{port}.log'), 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'lmdeploy.serve.openai.api_server', ws,
                             '--server_port', str(port), '--log_level', 'warning',
                             *args.server_args.split()], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + '/health', timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                sys.exit(f'server exited; see {log.name}')
            time.sleep(0.2)
        model = httpx.get(url + '/v1/models').json()['data'][0]['id']
        stats, stop = Stats(), threading.Event()
        threads = [threading.Thread(target=worker, daemon=True,
                                    args=(url, model, stats, stop, args.seed * 1000 + i,
                                          (i + 1) * 10**7))
                   for i in range(args.concurrency)]
        t0 = time.time()
        for t in threads:
            t.start()
        samples = []
        header = (f'| {"t (s)":>6} | {"requests":>8} | {"ok":>6} | {"disconn.":>8} | '
                  f'{"errors":>6} | {"RSS MiB":>8} | {"blocks used":>11} | {"sessions":>8} |')
        print(header)
        print('|' + '|'.join('-' * (len(c)) for c in header.split('|')[1:-1]) + '|', flush=True)

        def sample():
            m = parse_metrics(httpx.get(url + '/metrics', timeout=30).text)
            with stats.lock:
                row = dict(t=round(time.time() - t0, 1), **stats.counts,
                           rss_mb=round(rss_mb(proc.pid), 1),
                           blocks_used=int(metric(m, 'lmdeploy_kv_blocks_used')),
                           blocks_total=int(metric(m, 'lmdeploy_kv_blocks_total')),
                           sessions=int(metric(m, 'lmdeploy_num_sessions')))
            samples.append(row)
            print(f'| {row["t"]:>6} | {row["requests"]:>8} | {row["ok"]:>6} | '
                  f'{row["disconnects"]:>8} | {row["errors"]:>6} | {row["rss_mb"]:>8} | '
                  f'{row["blocks_used"]:>11} | {row["sessions"]:>8} |', flush=True)

        end = t0 + args.minutes * 60
        next_sample = t0
        while time.time() < end:
            if time.time() >= next_sample:
                sample()
                next_sample += args.sample_s
            time.sleep(min(1.0, max(0.0, end - time.time())))
        stop.set()
        for t in threads:
            t.join(180)
        # idle: every request done; what is left must be freed
        deadline = time.time() + 30
        while True:
            m = parse_metrics(httpx.get(url + '/metrics').text)
            idle = (metric(m, 'lmdeploy_kv_blocks_used') == 0
                    and metric(m, 'lmdeploy_num_sessions') == 0)
            if idle or time.time() > deadline:
                break
            time.sleep(0.5)
        sample()
        base = next((s for s in samples if s['t'] >= args.warmup_s), samples[0])
        growth = samples[-1]['rss_mb'] - base['rss_mb']
        final = samples[-1]
        checks = {
            'no errors': stats.counts['errors'] == 0,
            'server alive': proc.poll() is None,
            'blocks free at the end': final['blocks_used'] == 0,
            'no sessions left': final['sessions'] == 0,
            f'RSS growth {growth:+.1f} MiB <= {args.rss_slack_mb}': growth <= args.rss_slack_mb,
        }
        print()
        print(f'{stats.counts["requests"]} requests in {final["t"]:.0f} s: {stats.counts["ok"]} '
              f'ok, {stats.counts["disconnects"]} disconnects, {stats.counts["busy_409"]} 409 '
              f'(session busy after a disconnect), {stats.counts["errors"]} errors')
        print(f'peak blocks in use {max(s["blocks_used"] for s in samples)} of '
              f'{final["blocks_total"]}; RSS {base["rss_mb"]} MiB at {base["t"]} s -> '
              f'{final["rss_mb"]} MiB at the end')
        for e in stats.error_samples:
            print('  error:', e)
        for name, ok in checks.items():
            print(f'{"PASS" if ok else "FAIL"}: {name}')
        verdict = all(checks.values())
        if args.out:
            with open(args.out, 'w') as f:
                json.dump({'args': vars(args), 'samples': samples, 'counts': stats.counts,
                           'errors': stats.error_samples, 'checks': checks, 'pass': verdict},
                          f, indent=1)
        return 0 if verdict else 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if tmp is not None:
            tmp.cleanup()


if __name__ == '__main__':
    sys.exit(main())
