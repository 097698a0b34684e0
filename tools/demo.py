"""One scripted chat turn on a workspace through the TurboMind engine: prints reply and speed.

    python tools/demo.py ./workspace [--prompt "What is 37 + 58?"]
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def engine_available() -> bool:
    try:
        from lmdeploy.turbomind import TurboMind  # noqa: F401
    except ImportError:
        return False
    return True


def chat_turn(workspace: str, prompt: str, max_new_tokens: int) -> None:
    from lmdeploy.model import get_template
    from lmdeploy.turbomind import TurboMind
    from lmdeploy.turbomind.tokenizer import Tokenizer

    tokenizer = Tokenizer(os.path.join(workspace, 'triton_models', 'tokenizer'))
    engine = TurboMind(workspace, eos_id=tokenizer.eos_token_id)
    template = get_template(engine.model_name)
    input_ids = tokenizer.encode(template.get_prompt(prompt, sequence_start=True))
    instance = engine.create_instance()
    print(f'user: {prompt}')
    start = time.perf_counter()
    first = None
    output_ids = []
    for outputs in instance.stream_infer(session_id=1, input_ids=input_ids,
                                         request_output_len=max_new_tokens, sequence_start=True,
                                         sequence_end=True, top_k=1, stream_output=True):
        if first is None:
            first = time.perf_counter()
        output_ids = outputs[0][0].tolist()
    end = time.perf_counter()
    stop_ids = set(template.stop_words_for(tokenizer) or []) | {tokenizer.eos_token_id}
    reply_ids = [t for t in output_ids if t not in stop_ids]
    print(f'{engine.model_name}: {tokenizer.decode(reply_ids)}')
    n = len(output_ids)
    decode_s = end - (first or end)
    speed = f'{(n - 1) / decode_s:.1f} tok/s' if n > 1 and decode_s > 0 else 'n/a'
    print(f'[{len(input_ids)} prompt tokens, {n} generated; first token {1e3 * ((first or end) - start):.1f} ms, '
          f'decode {speed}]')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('workspace', help='workspace written by lmdeploy.serve.turbomind.deploy')
    parser.add_argument('--prompt', default='What is 37 + 58?', help='the user turn to send')
    parser.add_argument('--max_new_tokens', type=int, default=64, help='generation limit')
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.workspace, 'triton_models', 'weights', 'config.ini')):
        print(f'error: {args.workspace} is not a workspace (no triton_models/weights/config.ini)', file=sys.stderr)
        return 2
    print(f'workspace ready: {os.path.abspath(args.workspace)}')
    if not engine_available():
        print('The TurboMind engine is not in this build yet, so the demo stops after conversion.')
        return 0
    chat_turn(args.workspace, args.prompt, args.max_new_tokens)
    return 0


if __name__ == '__main__':
    sys.exit(main())
