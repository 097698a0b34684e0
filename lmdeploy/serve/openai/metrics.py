"""Prometheus metrics of the OpenAI-compatible server (GET /metrics).

Each server owns its own `CollectorRegistry`, so several apps can live in one process (tests).
Gauges that belong to the engine (requests running and waiting in the scheduler, KV blocks) are
read at scrape time through `Engine.call`, because the scheduler belongs to the engine thread.
"""
from __future__ import annotations

from typing import Dict, Optional

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

PREFIX = 'lmdeploy'

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                    0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.012, 0.015, 0.02, 0.025,
                  0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The server's counters, gauges and histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ['model']
        self._model = model_name

        def gauge(name, doc):
            return Gauge(f'{PREFIX}_{name}', doc, labels, registry=r).labels(model_name)

        # HTTP side
        self.http_requests_active = gauge(
            'http_requests_active', 'Admitted generation requests (engine requests) in flight')
        self.requests_rejected = Counter(f'{PREFIX}_requests_rejected', 'Requests refused with 503 '
                                         '(waiting queue full)', labels, registry=r).labels(model_name)
        self.requests_finished = Counter(f'{PREFIX}_requests_finished', 'Finished engine requests '
                                         'by finish reason', labels + ['finish_reason'], registry=r)
        self.http_errors = Counter(f'{PREFIX}_http_errors', 'Error responses by status code',
                                   labels + ['status'], registry=r)
        self.prompt_tokens = Counter(f'{PREFIX}_prompt_tokens', 'Prompt tokens processed',
                                     labels, registry=r).labels(model_name)
        self.generated_tokens = Counter(f'{PREFIX}_generation_tokens', 'Generated tokens',
                                        labels, registry=r).labels(model_name)
        self.ttft = Histogram(f'{PREFIX}_time_to_first_token_seconds',
                              'Time from request arrival to its first generated token', labels,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(f'{PREFIX}_inter_token_latency_seconds',
                             'Time between consecutive generated tokens', labels,
                             buckets=_TOKEN_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(f'{PREFIX}_e2e_request_latency_seconds',
                             'Time from request arrival to its last token', labels,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        # Engine side, refreshed at scrape time
        self.running = gauge('num_requests_running', 'Requests in the engine batch')
        self.waiting = gauge('num_requests_waiting', 'Requests queued in the engine, not running')
        self.sessions = gauge('num_sessions', 'Sessions the engine holds (running, parked or '
                              'interactive)')
        self.blocks_total = gauge('kv_blocks_total', 'KV-cache blocks in the pool')
        self.blocks_used = gauge('kv_blocks_used', 'KV-cache blocks in use')
        self.block_usage = gauge('kv_cache_usage_ratio', 'Fraction of KV-cache blocks in use')

    def finished(self, reason: str):
        self.requests_finished.labels(self._model, reason).inc()

    def error(self, status: int):
        self.http_errors.labels(self._model, str(status)).inc()

    def set_engine(self, stats: Optional[Dict[str, int]]):
        if not stats:
            return
        self.running.set(stats['running'])
        self.waiting.set(stats['waiting'])
        self.sessions.set(stats['sessions'])
        self.blocks_total.set(stats['blocks_total'])
        self.blocks_used.set(stats['blocks_used'])
        self.block_usage.set(stats['blocks_used'] / max(1, stats['blocks_total']))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def engine_stats(engine) -> Dict[str, int]:
    """Scheduler counts, read on the engine thread (blocks the caller until the step ends)."""
    s = engine.scheduler

    def read():
        total = s.num_blocks
        return {'running': s.num_running(), 'waiting': s.num_waiting(),
                'sessions': s.num_sessions(), 'blocks_total': total,
                'blocks_used': total - s.num_free_blocks()}

    return engine.call(read)


def parse_metrics(text: str) -> Dict[str, float]:
    """{'name{labels}': value} from Prometheus text (for tests, the soak and the benchmarks)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        name, _, value = line.rpartition(' ')
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def metric(values: Dict[str, float], name: str, default: float = 0.0) -> float:
    """The value of `name` whatever its labels (the first series whose name matches)."""
    for key, value in values.items():
        if key == name or key.startswith(name + '{'):
            return value
    return default


