"""Train MiniChat, the embedded demo model (assets/minichat), on dialogues this project generates.

A small Llama (GQA: 8 query heads, 4 key/value heads) learns the checkable tasks of
tools/minichat_data.py. Every step draws fresh dialogues from the generator (string seeds
'train-SEED-STEP-CHUNK'; the evaluation uses a separate integer seed). Sequences are built the way
the engine sees a conversation: encode(first-turn prompt) + sp.encode(reply + '<|end|>') +
encode(next-turn prompt) + ...; the loss covers only reply tokens (with their `<|end|>`).
Dialogues are packed into rows of --seq_len tokens, each with its own position ids starting at 0,
so attention never crosses from one dialogue into another.

The result is saved in Hugging Face format in float16 (config.json, generation_config.json,
model.safetensors), with a copy of assets/tokenizer/tokenizer.model and a README.md.

    python tools/train_minichat.py --device cuda --steps 4000      # on a GPU, a few minutes
    python tools/train_minichat.py --steps 30 --out /tmp/minichat  # a quick check on CPU
    python tools/eval_minichat.py --model assets/minichat --write_readme
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import time
from functools import lru_cache
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import minichat_data as data  # noqa: E402
from eval_minichat import (END_TEXT, EVAL_SEED, engine_encode, evaluate, format_stats,  # noqa: E402
                           min_task_accuracy, prompt_text, reply_ids)

TOKENIZER = os.path.join(ROOT, 'assets', 'tokenizer', 'tokenizer.model')
IGNORE = -100
CHUNK = 64  # dialogues drawn per generator seed


class Encoder:
    """Per-segment encodings (cached: questions and answers repeat a lot)."""

    def __init__(self, tokenizer_path: str = TOKENIZER):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
        self.prompt = lru_cache(maxsize=200_000)(self._prompt)
        self.reply = lru_cache(maxsize=200_000)(self._reply)

    def _prompt(self, question: str, first: bool) -> Tuple[int, ...]:
        return tuple(engine_encode(self.sp, prompt_text(question, first)))

    def _reply(self, answer: str) -> Tuple[int, ...]:
        return tuple(reply_ids(self.sp, answer))

    def dialogue(self, turns) -> Tuple[List[int], List[int]]:
        """(token ids, labels) of one dialogue; labels are IGNORE outside the replies."""
        ids: List[int] = []
        labels: List[int] = []
        for i, (question, answer) in enumerate(turns):
            p = self.prompt(question, i == 0)
            r = self.reply(answer)
            ids += p
            labels += [IGNORE] * len(p)
            ids += r
            labels += r
        return ids, labels


def pack_batch(encoder: Encoder, seed: int, step: int, batch_size: int, seq_len: int, pad_id: int = 0):
    """A (batch_size, seq_len) batch of packed dialogues for `step`: input ids, labels, position ids."""
    import torch
    ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((batch_size, seq_len), dtype=torch.long)
    row, col, chunk, pending = 0, 0, 0, []
    n_dialogues = 0
    while row < batch_size:
        if not pending:
            pending = data.dialogues(CHUNK, seed=f'train-{seed}-{step}-{chunk}')[::-1]
            chunk += 1
        d_ids, d_labels = encoder.dialogue(pending.pop())
        if len(d_ids) > seq_len:  # never with the default lengths; keep whole turns only
            continue
        if col + len(d_ids) > seq_len:
            if col < seq_len:  # padding: its own segment, positions from 0
                pos[row, col:] = torch.arange(seq_len - col)
            row, col = row + 1, 0
            if row == batch_size:
                break
        n = len(d_ids)
        ids[row, col:col + n] = torch.tensor(d_ids)
        labels[row, col:col + n] = torch.tensor(d_labels)
        pos[row, col:col + n] = torch.arange(n)
        col += n
        n_dialogues += 1
    return ids, labels, pos, n_dialogues


class StepBatches:
    """Map-style dataset: item i is the batch of step i (deterministic, any number of workers)."""

    def __init__(self, seed: int, steps: int, batch_size: int, seq_len: int):
        self.seed, self.steps, self.batch_size, self.seq_len = seed, steps, batch_size, seq_len
        self.encoder = None

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        if self.encoder is None:
            self.encoder = Encoder()
        return pack_batch(self.encoder, self.seed, step, self.batch_size, self.seq_len)


def build_config(args):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=2000,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act='silu',
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        use_cache=True,
    )


def check_packing(model, device) -> None:
    """Packed rows must behave like separate sequences (position ids restart -> block-diagonal mask)."""
    import torch
    g = torch.Generator().manual_seed(0)
    a = torch.randint(3, 2000, (1, 7), generator=g)
    b = torch.randint(3, 2000, (1, 5), generator=g)
    packed = torch.cat([a, b], 1).to(device)
    pos = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
    with torch.no_grad():
        lp = model(input_ids=packed, position_ids=pos, use_cache=False).logits.float()
        lb = model(input_ids=b.to(device), use_cache=False).logits.float()
    err = (lp[:, 7:] - lb).abs().max().item()
    if err > 1e-3:
        raise RuntimeError(f'this transformers version does not isolate packed sequences (max diff {err})')


def add_rope_theta(out: str) -> None:
    """transformers 5 writes rope_theta under rope_parameters; keep the top-level key that older
    readers (and converters written for them) look for."""
    import json
    path = os.path.join(out, 'config.json')
    with open(path) as f:
        cfg = json.load(f)
    if 'rope_theta' not in cfg:
        cfg['rope_theta'] = (cfg.get('rope_parameters') or {}).get('rope_theta', 10000.0)
        with open(path, 'w') as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write('\n')


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor * peak + (1 - floor) * peak * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def write_readme(out: str, info: dict) -> None:
    text = f"""# MiniChat

MiniChat is the tiny chat model embedded in this repository as the default demo model. It is a
Llama-architecture model ({info['params'] / 1e6:.2f}M parameters: {info['layers']} layers, hidden {info['hidden']}, \
{info['heads']} attention heads of dim {info['head_dim']}
sharing {info['kv_heads']} key/value heads (GQA), MLP {info['intermediate']}, vocabulary 2000) stored in Hugging Face
format in float16. Its tokenizer is the project's sentencepiece model (assets/tokenizer/tokenizer.model,
copied here; `<|user|>`, `<|bot|>` and `<|end|>` are single tokens). There is no
tokenizer_config.json, so tokenizers are loaded with the sentencepiece backend.

Chat template `minichat` (lmdeploy/model.py): first turn `<BOS><|user|>{{prompt}}<|end|><|bot|>`,
later turns `<|user|>{{prompt}}<|end|><|bot|>`; each reply ends with the stop token `<|end|>`.

It can add and subtract numbers below 100 ("What is 12 + 5?", "Subtract 8 from 40.", "23 加 9 等于几？"),
continue from the previous result ("Add 7 to that."), reverse a word from its training list
("Reverse the word apple."), count a short range ("Count from 3 to 9."), greet and say who it is.
It was trained on nothing else: other questions get unpredictable replies.

## Training

- data: dialogues generated by tools/minichat_data.py (1-4 turns, fresh ones every step),
  tokenized exactly as the engine sees a conversation; loss on reply tokens only
- command: `{info['command']}`
- steps: {info['steps']}{info['steps_note']} (batch {info['batch_size']} rows x {info['seq_len']} tokens, packed,
  about {info['dialogues_per_step']:.0f} dialogues per step, {info['dialogues'] / 1e6:.2f}M dialogues in all)
- optimizer: AdamW (lr {info['lr']}, betas 0.9/0.95, weight decay {info['weight_decay']}), {info['warmup']} warmup
  steps, cosine decay to {info['lr_floor']} x lr; {info['precision']}; seed {info['seed']}
- final training loss (mean over the last {info['loss_window']} steps, per reply token): {info['final_loss']:.3g}
- device: {info['device_name']}; training time {info['train_seconds']:.0f} s; date {info['date']}
- software: torch {info['torch']}, transformers {info['transformers']}

<!-- eval:start -->
Quick evaluation at the end of training ({info['eval_dialogues']} held-out dialogues, seed
{EVAL_SEED}, greedy, on the training device). Re-run on CPU with
`python tools/eval_minichat.py --write_readme`.

```
{info['eval_report']}
```
<!-- eval:end -->

## License

The weights were trained from scratch by this project on data generated by this project
(tools/minichat_data.py); they are distributed under the same license as the repository.
No third-party data or weights were used.
"""
    with open(os.path.join(out, 'README.md'), 'w', encoding='utf-8') as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=4000, help='optimizer steps (default 4000)')
    parser.add_argument('--batch_size', type=int, default=128,
                        help='rows per step, each --seq_len tokens of packed dialogues (default 128)')
    parser.add_argument('--seq_len', type=int, default=256, help='tokens per row (default 256)')
    parser.add_argument('--lr', type=float, default=2e-3, help='peak learning rate (default 2e-3)')
    parser.add_argument('--warmup', type=int, default=200, help='linear warmup steps (default 200)')
    parser.add_argument('--lr_floor', type=float, default=0.05,
                        help='final learning rate as a fraction of --lr (default 0.05)')
    parser.add_argument('--weight_decay', type=float, default=0.05, help='AdamW weight decay (default 0.05)')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cuda or cpu (default cpu)')
    parser.add_argument('--out', default=os.path.join(ROOT, 'assets', 'minichat'),
                        help='output directory (default assets/minichat)')
    parser.add_argument('--seed', type=int, default=0, help='seed of weights and training data (default 0)')
    parser.add_argument('--hidden', type=int, default=256, help='hidden size (default 256)')
    parser.add_argument('--layers', type=int, default=6, help='decoder layers (default 6)')
    parser.add_argument('--heads', type=int, default=8, help='attention heads (default 8)')
    parser.add_argument('--kv_heads', type=int, default=4, help='key/value heads, GQA (default 4)')
    parser.add_argument('--intermediate', type=int, default=688, help='MLP size (default 688)')
    parser.add_argument('--workers', type=int, default=None,
                        help='data-loader processes (default: 0 on cpu, up to 12 on a GPU)')
    parser.add_argument('--max_minutes', type=float, default=None,
                        help='time limit for the training loop: after 30 timed steps, --steps is lowered '
                             'to what fits (the LR schedule follows) (default: none)')
    parser.add_argument('--eval_dialogues', type=int, default=100,
                        help='held-out dialogues evaluated after training (default 100; 0: skip)')
    parser.add_argument('--log_every', type=int, default=50, help='print the loss every N steps (default 50)')
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = build_config(args)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'model: {n_params / 1e6:.2f}M parameters ({2 * n_params / 1e6:.1f} MB in fp16), '
          f'transformers {transformers.__version__}, torch {torch.__version__}, device {device}', flush=True)
    model.eval()
    check_packing(model, device)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and 'embed' not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and 'embed' not in n)]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({'fused': True} if cuda else {}))

    workers = args.workers if args.workers is not None else (min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0)
    dataset = StepBatches(args.seed, args.steps, args.batch_size, args.seq_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=cuda, prefetch_factor=8 if workers else None,
                                         persistent_workers=False)

    total = args.steps
    losses: List[float] = []
    dialogues_seen = 0
    t_start = time.time()
    t_timed = None
    step = 0
    for step, (ids, labels, pos, n_dialogues) in enumerate(loader):
        if step >= total:
            break
        if step == 10:
            if cuda:
                torch.cuda.synchronize()
            t_timed = time.time()
        if step == 40 and args.max_minutes and t_timed is not None:
            if cuda:
                torch.cuda.synchronize()
            per_step = (time.time() - t_timed) / 30
            fit = int((args.max_minutes * 60 - (time.time() - t_start)) / per_step) + step
            if fit < total:
                print(f'--max_minutes {args.max_minutes}: {per_step * 1000:.1f} ms/step, '
                      f'training {fit} steps instead of {total}', flush=True)
                total = fit
        ids = ids.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        pos = pos.to(device, non_blocking=True)
        lr = lr_at(step, total, args.lr, args.warmup, args.lr_floor)
        for group in opt.param_groups:
            group['lr'] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dialogues_seen += int(n_dialogues)
        if step % args.log_every == 0 or step == total - 1:
            losses.append(loss.item())
            elapsed = time.time() - t_start
            print(f'step {step:>6}/{total}  loss {losses[-1]:.4f}  lr {lr:.2e}  '
                  f'{elapsed:7.1f}s  {(step + 1) / elapsed:6.2f} steps/s  dialogues/step {n_dialogues}',
                  flush=True)
        else:
            # keep a tail of exact losses for the final-loss figure without syncing every step
            if step >= total - 50:
                losses.append(loss.item())
    steps_done = min(step + 1, total)
    if cuda:
        torch.cuda.synchronize()
    train_seconds = time.time() - t_start
    tail = losses[-50:]
    final_loss = sum(tail) / len(tail)
    print(f'trained {steps_done} steps in {train_seconds:.1f}s; final loss {final_loss:.3g}', flush=True)

    model.eval()
    # the same evaluation as tools/eval_minichat.py, on the fp16-rounded weights that get saved
    report, eval_dialogues = '(not evaluated)', 0
    if args.eval_dialogues:
        encoder = Encoder()
        eval_model = LlamaForCausalLM(config).to(device).eval()
        eval_model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        t0 = time.time()
        stats = evaluate(eval_model, encoder.sp, data.dialogues(args.eval_dialogues, seed=EVAL_SEED), verbose=10)
        report = format_stats(stats)
        eval_dialogues = args.eval_dialogues
        print(report)
        print(f'eval: {time.time() - t0:.1f}s, lowest task accuracy {min_task_accuracy(stats):.4f}', flush=True)
        del eval_model

    os.makedirs(args.out, exist_ok=True)
    model.half()
    model.save_pretrained(args.out, safe_serialization=True)
    sp = Encoder().sp
    end = [i for i in sp.encode(END_TEXT) if sp.id_to_piece(i) == END_TEXT][0]
    GenerationConfig(bos_token_id=1, eos_token_id=[2, end], pad_token_id=2, do_sample=False,
                     max_new_tokens=64).save_pretrained(args.out)
    add_rope_theta(args.out)
    shutil.copyfile(TOKENIZER, os.path.join(args.out, 'tokenizer.model'))
    for extra in ('tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.json'):
        if os.path.exists(os.path.join(args.out, extra)):
            os.remove(os.path.join(args.out, extra))
    argv = sys.argv[1:]
    for flag in ('--out',):  # the output directory is where this copy was written, not part of the recipe
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith('--out=')]
    command = 'python tools/train_minichat.py ' + ' '.join(argv)
    write_readme(args.out, dict(
        params=n_params, layers=args.layers, hidden=args.hidden, heads=args.heads,
        head_dim=args.hidden // args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
        command=command.strip(), steps=steps_done,
        steps_note=(f' (--max_minutes lowered --steps {args.steps} to what fit)' if steps_done < args.steps else ''),
        batch_size=args.batch_size, seq_len=args.seq_len,
        dialogues_per_step=dialogues_seen / max(1, steps_done), dialogues=dialogues_seen, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, lr_floor=args.lr_floor,
        precision='bf16 autocast, fp32 weights' if cuda else 'fp32', seed=args.seed,
        loss_window=len(tail), final_loss=final_loss,
        device_name=torch.cuda.get_device_name(device) if cuda else f'CPU ({os.cpu_count()} cores)',
        train_seconds=train_seconds, date=time.strftime('%Y-%m-%d'), torch=torch.__version__,
        transformers=transformers.__version__, eval_dialogues=eval_dialogues, eval_report=report))
    size = os.path.getsize(os.path.join(args.out, 'model.safetensors'))
    print(f'saved {args.out}: model.safetensors {size / 1e6:.2f} MB; files {sorted(os.listdir(args.out))}',
          flush=True)


if __name__ == '__main__':
    main()
