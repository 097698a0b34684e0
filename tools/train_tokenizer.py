"""Train the project's sentencepiece tokenizer (assets/tokenizer/tokenizer.model) offline.

The corpus is text this project generates: MiniChat dialogues (tools/minichat_data.py) plus a
few English and Chinese paragraphs written for this file. BPE with byte fallback, so any text
(rare Chinese characters, emoji) round-trips through byte tokens; digits are split one per token;
MiniChat's role markers are single user-defined tokens. Ids follow Llama: unk 0, bos 1, eos 2.

    python tools/train_tokenizer.py [--vocab_size 2000] [--out assets/tokenizer]
"""
from __future__ import annotations

import argparse
import io
import os
import sys

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minichat_data import dialogues  # noqa: E402

ROLE_TOKENS = ('<|user|>', '<|bot|>', '<|end|>')

PROSE = """\
The quick brown fox jumps over the lazy dog. A deployment toolkit turns a trained model into a
service that answers requests quickly and cheaply. The engine keeps the attention keys and values
of every conversation in blocks of memory, so that a later turn does not recompute the history.
Batching many requests together keeps the accelerator busy; streaming sends each token as soon as
it is ready. Tests compare the engine with a reference implementation on the same weights.
Numbers such as 3.14, 2048 and 65536 appear in configuration files and benchmark tables.
Questions, answers, prompts and replies: this is what a chat model reads and writes every day.
今天天气很好，我们去公园散步吧。模型部署工具把训练好的模型变成可以快速回答问题的服务。
推理引擎把每个会话的键和值保存在显存块里，下一轮对话不必重新计算历史。
你好，世界！这是一个测试句子，用来检查中文的编码和解码是否正确。
我会做加法和减法，也会倒写单词。请问你想让我做什么？谢谢你的耐心。
"""


def corpus_lines(n_dialogues: int) -> list[str]:
    lines = [line for line in PROSE.splitlines() if line]
    for dialogue in dialogues(n_dialogues, seed=1234):
        text = ''.join(f'<|user|>{q}<|end|><|bot|>{a}<|end|>' for q, a in dialogue)
        lines.append(text)
    return lines


def train(out_dir: str, vocab_size: int, n_dialogues: int) -> str:
    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(n_dialogues)),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=list(ROLE_TOKENS),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        num_threads=2,
        minloglevel=2,
    )
    path = os.path.join(out_dir, 'tokenizer.model')
    with open(path, 'wb') as f:
        f.write(model.getvalue())
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vocab_size', type=int, default=2000, help='number of pieces (default 2000)')
    parser.add_argument('--dialogues', type=int, default=20000,
                        help='generated MiniChat dialogues in the corpus (default 20000)')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'assets', 'tokenizer'),
                        help='output directory (default assets/tokenizer)')
    args = parser.parse_args()
    path = train(args.out, args.vocab_size, args.dialogues)
    sp = spm.SentencePieceProcessor(model_file=path)
    print(f'wrote {os.path.normpath(path)}: {sp.vocab_size()} pieces, bos={sp.bos_id()} eos={sp.eos_id()}')


if __name__ == '__main__':
    main()
