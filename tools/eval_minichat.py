"""Evaluate MiniChat (assets/minichat) on held-out generated dialogues, exactly as the engine chats.

Each dialogue is played turn by turn with greedy decoding. The token history is what the engine
keeps: encode(first-turn prompt) + the model's own reply ids (up to and including `<|end|>`) +
encode(next-turn prompt) + ... ; a reply is the decoded ids before `<|end|>` and must equal
`minichat_data.answer_for(question, previous)` exactly. Prints the accuracy per task.

    python tools/eval_minichat.py [--model assets/minichat] [--dialogues 400] [--seed 20240]
    python tools/eval_minichat.py --write_readme    # also record the result in the model's README

The helpers here (`engine_encode`, `GreedyChat`, `task_of`, `evaluate`) are shared with
tools/train_minichat.py and tests/test_minichat.py.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import minichat_data as data  # noqa: E402

DEFAULT_MODEL = os.path.join(ROOT, 'assets', 'minichat')
EVAL_SEED = 20240  # held out: training draws its dialogues from string seeds ('train-...')
BOS_MARK = '<BOS>'
END_TEXT = '<|end|>'
TASKS = ('add', 'sub', 'add_zh', 'follow_add', 'follow_sub', 'reverse', 'count', 'greeting',
         'who', 'greeting_zh')


def prompt_text(question: str, first: bool) -> str:
    """The `minichat` chat template (lmdeploy/model.py) applied to one user turn."""
    try:
        from lmdeploy.model import get_template
        return get_template('minichat').get_prompt(question, first)
    except ImportError:  # the template's definition, for use outside the repo
        turn = f'<|user|>{question}<|end|><|bot|>'
        return f'{BOS_MARK}{turn}' if first else turn


def engine_encode(sp, text: str) -> List[int]:
    """What the engine's Tokenizer.encode gives: `<BOS>` -> a leading bos id, the rest through
    sentencepiece (dummy prefix on, no other special handling)."""
    if BOS_MARK in text:
        return [sp.bos_id()] + sp.encode(text.replace(BOS_MARK, ''))
    return sp.encode(text)


def reply_ids(sp, answer: str) -> List[int]:
    """The ids of a trained reply: the answer and its stop token encoded as one segment."""
    return sp.encode(answer + END_TEXT)


def end_id(sp) -> int:
    ids = sp.encode(END_TEXT)
    ids = [i for i in ids if sp.id_to_piece(i) == END_TEXT]
    assert len(ids) == 1, 'tokenizer has no single <|end|> token'
    return ids[0]


def task_of(question: str, previous: Optional[int] = None) -> str:
    """The task a generated question belongs to (one of TASKS)."""
    q = question.strip()
    if data._ADD.match(q):
        return 'add'
    if data._SUB.match(q) or data._SUB_FROM.match(q):
        return 'sub'
    if data._ZH_ADD.match(q):
        return 'add_zh'
    if data._FOLLOW_ADD.match(q):
        return 'follow_add'
    if data._FOLLOW_SUB.match(q):
        return 'follow_sub'
    if data._REV.match(q):
        return 'reverse'
    if data._COUNT.match(q):
        return 'count'
    if q in data.GREETINGS_EN:
        return 'greeting'
    if q in data.WHO_EN:
        return 'who'
    if q in data.GREETINGS_ZH:
        return 'greeting_zh'
    raise ValueError(f'unknown task for {question!r}')


def load_tokenizer(model_dir: str = DEFAULT_MODEL):
    import sentencepiece as spm
    path = os.path.join(model_dir, 'tokenizer.model')
    if not os.path.exists(path):
        path = os.path.join(ROOT, 'assets', 'tokenizer', 'tokenizer.model')
    return spm.SentencePieceProcessor(model_file=path)


def load_model(model_dir: str = DEFAULT_MODEL, device: str = 'cpu'):
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


def _cache_arg(model) -> str:
    """transformers renamed forward's `past_key_values` to `cache` (5.2x); take what this one has."""
    import inspect
    params = inspect.signature(type(model).forward).parameters
    return 'cache' if 'cache' in params else 'past_key_values'


class GreedyChat:
    """One conversation with greedy decoding, keeping the KV cache between turns like the engine."""

    def __init__(self, model, sp, max_new_tokens: int = 64):
        self.model, self.sp = model, sp
        self.end = end_id(sp)
        self.max_new_tokens = max_new_tokens
        self.ids: List[int] = []  # the whole token history
        self.cached = 0  # how many of self.ids are in the KV cache
        self.cache = None
        self.first = True

    def _step(self):
        import torch
        device = next(self.model.parameters()).device
        new = torch.tensor([self.ids[self.cached:]], dtype=torch.long, device=device)
        out = self.model(input_ids=new, use_cache=True, **{_cache_arg(self.model): self.cache})
        self.cache = out.cache if hasattr(out, 'cache') else out.past_key_values
        self.cached = len(self.ids)
        return int(out.logits[0, -1].argmax())

    def ask(self, question: str) -> str:
        """Send one user turn; returns the decoded reply (without `<|end|>`)."""
        import torch
        with torch.no_grad():
            self.ids += engine_encode(self.sp, prompt_text(question, self.first))
            self.first = False
            generated = []
            for _ in range(self.max_new_tokens):
                token = self._step()
                self.ids.append(token)
                generated.append(token)
                if token == self.end:
                    break
        if generated and generated[-1] == self.end:
            generated = generated[:-1]
        return self.sp.decode(generated)


def evaluate(model, sp, dialogues: Sequence[Sequence[tuple]], max_new_tokens: int = 64,
             verbose: int = 0) -> Dict[str, List[int]]:
    """Play `dialogues`; returns {task: [correct, total]} (plus 'all' and 'dialogue')."""
    stats: Dict[str, List[int]] = OrderedDict((t, [0, 0]) for t in TASKS + ('all', 'dialogue'))
    shown = 0
    for dialogue in dialogues:
        chat, previous, whole = GreedyChat(model, sp, max_new_tokens), None, True
        for question, answer in dialogue:
            expected = data.answer_for(question, previous)
            assert expected == answer, (question, answer, expected)
            got = chat.ask(question)
            ok = got == expected
            whole &= ok
            for key in (task_of(question, previous), 'all'):
                stats[key][0] += ok
                stats[key][1] += 1
            if not ok and shown < verbose:
                shown += 1
                print(f'  MISS {question!r}: got {got!r}, expected {expected!r}')
            previous = data.result_of(expected)
        stats['dialogue'][0] += whole
        stats['dialogue'][1] += 1
    return stats


def format_stats(stats: Dict[str, List[int]]) -> str:
    lines = []
    for task, (ok, n) in stats.items():
        if n:
            lines.append(f'{task:<12} {ok:>5}/{n:<5} {100.0 * ok / n:6.2f}%')
    return '\n'.join(lines)


def min_task_accuracy(stats: Dict[str, List[int]]) -> float:
    return min(ok / n for task, (ok, n) in stats.items() if n and task in TASKS)


README_EVAL_START = '<!-- eval:start -->'
README_EVAL_END = '<!-- eval:end -->'


def write_readme_eval(model_dir: str, text: str) -> None:
    """Replace the evaluation section of `model_dir`/README.md (between the eval markers)."""
    path = os.path.join(model_dir, 'README.md')
    with open(path, encoding='utf-8') as f:
        readme = f.read()
    block = f'{README_EVAL_START}\n{text.rstrip()}\n{README_EVAL_END}'
    pattern = re.compile(re.escape(README_EVAL_START) + '.*?' + re.escape(README_EVAL_END), re.S)
    if pattern.search(readme):
        readme = pattern.sub(lambda _: block, readme)
    else:
        readme = readme.rstrip() + '\n\n' + block + '\n'
    with open(path, 'w', encoding='utf-8') as f:
        f.write(readme)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=DEFAULT_MODEL, help='HF model directory (default assets/minichat)')
    parser.add_argument('--dialogues', type=int, default=400, help='held-out dialogues to play (default 400)')
    parser.add_argument('--seed', type=int, default=EVAL_SEED,
                        help=f'generator seed of the held-out dialogues (default {EVAL_SEED})')
    parser.add_argument('--max_turns', type=int, default=4, help='most turns per dialogue (default 4)')
    parser.add_argument('--device', default='cpu', help='torch device (default cpu; weights in fp32)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: fastest for this tiny model, one token at a time)')
    parser.add_argument('--show', type=int, default=10, help='print up to this many wrong replies (default 10)')
    parser.add_argument('--min_accuracy', type=float, default=0.0,
                        help='exit with status 1 if any task is below this fraction (default 0: never)')
    parser.add_argument('--write_readme', action='store_true',
                        help="record the result in the model directory's README.md")
    args = parser.parse_args()

    import torch
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    sp = load_tokenizer(args.model)
    model = load_model(args.model, args.device)
    dialogues = data.dialogues(args.dialogues, seed=args.seed, max_turns=args.max_turns)
    start = time.time()
    stats = evaluate(model, sp, dialogues, verbose=args.show)
    report = format_stats(stats)
    print(report)
    print(f'({time.time() - start:.1f}s on {args.device})')
    if args.write_readme:
        text = (f'Evaluation (`python tools/eval_minichat.py --dialogues {args.dialogues} --seed {args.seed}`, '
                f'greedy, fp32 on {args.device}, {time.strftime("%Y-%m-%d")}): exact-match replies per task '
                f'on held-out generated dialogues, multi-turn with the model\'s own replies in the history.\n\n'
                '```\n' + report + '\n```')
        write_readme_eval(args.model, text)
        print(f'updated {os.path.join(args.model, "README.md")}')
    if min_task_accuracy(stats) < args.min_accuracy:
        sys.exit(1)


if __name__ == '__main__':
    main()
