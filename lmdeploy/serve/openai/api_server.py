"""OpenAI-compatible HTTP server over the TurboMind engine.

    python -m lmdeploy.serve.openai.api_server ./workspace --server_port 23333 \\
        [--api_keys KEY ...] [--max_waiting 1024] [--max_batch_size 32] [--session_len N]
    python -m lmdeploy.serve.openai.api_server --dummy llama2-7b     # random weights, benchmarks

Routes: GET /v1/models; POST /v1/chat/completions and /v1/completions (streamed as server-sent
events ending with `data: [DONE]`, or not); GET /health; GET /metrics (Prometheus);
GET /v1/sessions/{id} and POST /v1/sessions/{id}/end for interactive sessions (v0.0.6's
`session_id` + `interactive_mode`). See docs/en/restful_api.md.

The modules: `app.py` (routes), `server.py` (the generation routes), `validation.py`,
`sessions.py` (prompts and sessions), `generation.py` (engine requests to text, the one consume
loop), `responses.py`, `engine_client.py` (admission, waking the event loop from the engine),
`errors.py`, `metrics.py`, `stop_strings.py`, `dummy_tokenizer.py` (for `--dummy`).
"""
from __future__ import annotations

import argparse
import sys

from .app import create_app  # noqa: F401 - the public entry of the package
from .engine_client import DEFAULT_MAX_WAITING

ENGINE_KEYS = ('max_batch_size', 'session_len', 'cache_max_entry_count', 'num_blocks',
               'block_size', 'max_prefill_tokens', 'max_mixed_prefill_tokens', 'quant_policy',
               'dtype', 'device', 'jit_schedule')
# What the server sets unless the workspace's config.ini (or the command line) does: a prompt
# arriving while others decode is prefilled 512 tokens per step, so their next token waits for
# at most that much prefill (~15 ms for a 7B model on the H100) instead of the whole prompt's
# (a 2,048-token prompt alone takes ~45 ms). B4 on the H100 (benchmark/NOTES.md, session 11):
# the longest step 22 -> 15 ms, inter-token p99 within the run-to-run spread, first-token p99
# +2-4 ms (prompts over 512 tokens take two steps).
SERVER_DEFAULTS = {'max_mixed_prefill_tokens': 512}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='python -m lmdeploy.serve.openai.api_server',
        description='Serve a TurboMind workspace over an OpenAI-compatible HTTP API.')
    p.add_argument('model_path', nargs='?', default=None,
                   help='workspace written by lmdeploy.serve.turbomind.deploy (or --dummy)')
    p.add_argument('--dummy', default=None, metavar='SHAPE',
                   help='serve random weights of a model shape instead of a workspace '
                        '(llama2-7b, llama3-8b, llama2-13b; tiny on CPU), for benchmarks. There '
                        'is no tokenizer: text is byte-level (ids 3..258 are UTF-8 bytes, other '
                        'ids read "<id>"), and prompts may be token ids')
    p.add_argument('--server_name', default='127.0.0.1',
                   help='address to listen on (default: %(default)s; 0.0.0.0 for all)')
    p.add_argument('--server_port', type=int, default=23333, help='port (default: %(default)s)')
    p.add_argument('--tp', type=int, default=1, help='tensor-parallel degree (default: 1)')
    p.add_argument('--api_keys', nargs='+', default=None, metavar='KEY',
                   help='accepted API keys (Authorization: Bearer KEY); default: no auth. '
                        '/health stays open')
    p.add_argument('--max_waiting', type=int, default=DEFAULT_MAX_WAITING,
                   help='engine requests that may wait beyond max_batch_size; more get 503 with '
                        'Retry-After (default: %(default)s)')
    p.add_argument('--model_name', default=None,
                   help="model name clients send (default: the workspace's model_name)")
    p.add_argument('--instance_num', type=int, default=None,
                   help="v0.0.6's flag: accepted for compatibility, same as --max_batch_size")
    g = p.add_argument_group('engine overrides (config.ini keys)')
    g.add_argument('--max_batch_size', type=int, default=None, help='persistent batch size')
    g.add_argument('--session_len', type=int, default=None, help='context length per session')
    g.add_argument('--cache_max_entry_count', type=float, default=None,
                   help='KV pool: <= 1 fraction of free memory, > 1 number of sessions')
    g.add_argument('--num_blocks', type=int, default=None, help='KV pool size in blocks')
    g.add_argument('--block_size', type=int, default=None, help='tokens per KV block')
    g.add_argument('--max_prefill_tokens', type=int, default=None,
                   help='token budget of one step\'s prefill chunks')
    g.add_argument('--max_mixed_prefill_tokens', type=int, default=None,
                   help='prefill budget of a step that also decodes, bounding how much a new '
                        'prompt delays the running requests\' next token (default: '
                        f'{SERVER_DEFAULTS["max_mixed_prefill_tokens"]} unless config.ini sets '
                        'it; 0: max_prefill_tokens)')
    g.add_argument('--quant_policy', type=int, default=None, choices=(0, 4),
                   help='4: int8 KV cache')
    g.add_argument('--dtype', default=None, choices=('fp16', 'bf16', 'fp32'),
                   help='compute dtype (default: fp16 on GPU, fp32 on CPU)')
    g.add_argument('--device', default=None, help="'cpu', 'cuda' or 'cuda:N'")
    g.add_argument('--jit_schedule', action=argparse.BooleanOptionalAction, default=None,
                   help='plan each step just before the previous one ends, so that a prompt '
                        'arriving meanwhile joins the next step (lower TTFT at light load; '
                        'on by default: --no-jit_schedule plans each step as soon as the '
                        'previous one is launched)')
    p.add_argument('--engine_timing', action='store_true',
                   help="time the engine loop's steps by phase (host time, decode-only vs mixed "
                        'steps) and where first tokens spend their time (ttft_server_in: '
                        'request -> engine; ttft_queue: -> first step queued; ttft_step: -> '
                        'tokens; ttft_server_out: -> server), and print the report as one JSON '
                        'line when the server stops')
    p.add_argument('--log_level', default='info',
                   choices=('critical', 'error', 'warning', 'info', 'debug'),
                   help='uvicorn log level (default: %(default)s)')
    args = p.parse_args(argv)
    if (args.model_path is None) == (args.dummy is None):
        p.error('give a workspace path or --dummy SHAPE (one of them)')
    if args.max_waiting < 0:
        p.error('--max_waiting must be >= 0')
    if not 0 < args.server_port < 65536:
        p.error('--server_port must be in 1..65535')
    return args


def main(argv=None):
    args = parse_args(argv)
    import uvicorn

    from lmdeploy.turbomind import TurboMind
    overrides = {k: getattr(args, k) for k in ENGINE_KEYS if getattr(args, k) is not None}
    if args.instance_num is not None:
        overrides.setdefault('max_batch_size', args.instance_num)
    try:
        tm = TurboMind(args.model_path, tp=args.tp, dummy=args.dummy,
                       config_defaults=SERVER_DEFAULTS, **overrides)
    except Exception as e:  # noqa: BLE001 - a one-line error for the user
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        sys.exit(1)
    if tm.tokenizer is None and args.dummy is None:
        tm.close()
        print(f'error: {args.model_path} has no tokenizer (triton_models/tokenizer)',
              file=sys.stderr)
        sys.exit(1)
    try:
        app = create_app(tm, args.api_keys, args.max_waiting, args.model_name,
                         engine_timing=args.engine_timing)
    except Exception as e:  # noqa: BLE001 - e.g. a dummy vocabulary too small for bytes
        tm.close()
        print(f'error: {" ".join(str(e).split()) or type(e).__name__}', file=sys.stderr)
        sys.exit(1)
    budget = tm.engine.scheduler.max_prefill_tokens  # the scheduler's, as it applies them
    mixed = min(tm.engine.scheduler.max_mixed_prefill_tokens or budget, budget)
    print(f'serving {app.state.server.model_name!r} on http://{args.server_name}:'
          f'{args.server_port} (max_batch_size {tm.config.max_batch_size}, max_waiting '
          f'{args.max_waiting}, session_len {tm.session_len}, prefill tokens per step '
          f'{budget} ({mixed} beside decoding), auth {"on" if args.api_keys else "off"}'
          f'{", dummy weights" if args.dummy else ""})', flush=True)
    uvicorn.run(app, host=args.server_name, port=args.server_port, log_level=args.log_level,
                timeout_keep_alive=30)


if __name__ == '__main__':
    main()
