"""Perplexity of MiniChat (assets/minichat) in the TurboMind engine with int8 KV vs fp32 KV.

Held-out text: dialogues from tools/minichat_data.py drawn with a seed that neither training
(string seeds 'train-...') nor eval_minichat.py (20240) uses, encoded exactly as the engine
sees a conversation (`<BOS><|user|>Q<|end|><|bot|>A<|end|><|user|>...`), one session each.
Every dialogue is prefilled in chunks of --chunk tokens through the engine's data plane (CPU,
fp32 compute), so each chunk's attention reads the earlier chunks' K/V back from the (int8)
pool; the logits of every position give the next token's log-likelihood. Perplexity is
reported over the reply tokens (what the model was trained to predict) and over all tokens.

KV modes: fp32 (the reference; transformers on the same weights is checked against it), int8
with scales calibrated by `python -m lmdeploy.lite.apis.kv_qparams` (symmetric and asymmetric,
per-tensor and per-head files) on other generated dialogues, and int8 online (no calibration).

    python tools/eval_kv_int8.py [--dialogues 400] [--seed 31337] [--out kv_int8_ppl.json]

Prints a table and writes JSON; exits 1 when an int8 mode's perplexity is more than
--max_increase (default 1%) above fp32's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import minichat_data as data  # noqa: E402
from eval_minichat import (DEFAULT_MODEL, engine_encode, load_tokenizer,  # noqa: E402
                           prompt_text, reply_ids)

HELD_OUT_SEED = 31337
CALIB_SEED = 4242
BLOCK = 16
# (name, engine config overrides, calibration: None | 'sym' | 'asym')
MODES = [
    ('fp32 KV', dict(quant_policy=0), None),
    ('int8 per_tensor sym (v0.0.2 files)', dict(quant_policy=4, kv_int8_scales='per_tensor'),
     'sym'),
    ('int8 per_head sym', dict(quant_policy=4, kv_int8_scales='per_head'), 'sym'),
    ('int8 per_tensor asym (v0.0.4 files)', dict(quant_policy=4, kv_int8_scales='per_tensor'),
     'asym'),
    ('int8 per_head asym', dict(quant_policy=4, kv_int8_scales='per_head'), 'asym'),
    ('int8 online', dict(quant_policy=4, kv_int8_scales='online'), None),
]


def encode_dialogue(sp, turns) -> Tuple[List[int], List[bool]]:
    """Token ids of a whole dialogue and, per id, whether it is a reply token."""
    ids, is_reply = [], []
    for i, (question, answer) in enumerate(turns):
        p, r = engine_encode(sp, prompt_text(question, i == 0)), reply_ids(sp, answer)
        ids += p + r
        is_reply += [False] * len(p) + [True] * len(r)
    return ids, is_reply


def dialogue_text(turns) -> str:
    """The dialogue as template text (no BOS): calibration input for kv_qparams."""
    return ''.join(prompt_text(q, False) + a + '<|end|>' for q, a in turns)


def calibrate(model: str, weight_dir: str, text_file: str, symmetric: bool, samples: int,
              seqlen: int) -> None:
    cmd = [sys.executable, '-m', 'lmdeploy.lite.apis.kv_qparams', '--model', model,
           '--output_dir', weight_dir, '--granularity', 'per_head', '--symmetry', str(symmetric),
           '--calib_dataset', text_file, '--calib_samples', str(samples), '--max_seq_len',
           str(seqlen), '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f'calibration failed ({" ".join(cmd)}):\n{proc.stderr.strip()}')


def engine_logp(ws: str, overrides: dict, seqs: List[List[int]], batch: int, chunk: int,
                desc: str) -> list:
    """Per dialogue, the engine's log-probabilities of every position: [n, vocab] fp32."""
    import torch

    from lmdeploy.turbomind.config import EngineConfig
    from lmdeploy.turbomind.model_runner import ModelRunner
    from lmdeploy.turbomind.step_input import RowPlan, build_step_input
    from tqdm import tqdm
    per_seq = -(-max(len(s) for s in seqs) // BLOCK)
    cfg = EngineConfig.from_workspace(ws, device='cpu', dtype='fp32', block_size=BLOCK,
                                      num_blocks=batch * per_seq, **overrides)
    runner = ModelRunner(cfg)
    out: list = [[] for _ in seqs]
    bar = tqdm(total=sum(len(s) for s in seqs), desc=desc, unit='tok', file=sys.stderr)
    for first in range(0, len(seqs), batch):
        group = list(range(first, min(first + batch, len(seqs))))
        blocks = {b: list(range(j * per_seq, (j + 1) * per_seq)) for j, b in enumerate(group)}
        done = {b: 0 for b in group}
        while True:
            live = [b for b in group if done[b] < len(seqs[b])]
            if not live:
                break
            rows = [RowPlan(seqs[b][done[b]:done[b] + chunk], done[b], blocks[b], 'all')
                    for b in live]
            with torch.inference_mode():
                logp = torch.log_softmax(runner.run(build_step_input(rows, BLOCK)), dim=-1)
            at = 0
            for b, row in zip(live, rows):
                n = len(row.tokens)
                out[b].append(logp[at:at + n])
                at += n
                done[b] += n
                bar.update(n)
    bar.close()
    return [torch.cat(parts) for parts in out]


def nll_of(logp: list, seqs: List[List[int]]) -> List[List[float]]:
    """-log p(token t+1 | tokens <= t), t = 0..n-2, per dialogue."""
    import torch
    return [(-lp[:-1].gather(1, torch.tensor(s[1:])[:, None])[:, 0]).tolist()
            for lp, s in zip(logp, seqs)]


def divergence(logp: list, ref: list) -> Tuple[float, float]:
    """(mean KL(ref || logp) in nats, top-1 agreement) over every position."""
    import torch
    lp, rf = torch.cat(logp), torch.cat(ref)
    kl = (rf.exp() * (rf - lp)).sum(-1).mean()
    return float(kl), float((lp.argmax(-1) == rf.argmax(-1)).float().mean())


def hf_logp(model_dir: str, seqs: List[List[int]]) -> list:
    import torch
    from eval_minichat import load_model
    model = load_model(model_dir)
    with torch.inference_mode():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0].float(), dim=-1)
                for s in seqs]


def perplexity(nll: List[List[float]], masks: List[List[bool]], replies_only: bool) -> float:
    total, n = 0.0, 0
    for values, mask in zip(nll, masks):
        for v, m in zip(values, mask[1:]):  # value t predicts token t + 1
            if m or not replies_only:
                total += v
                n += 1
    return math.exp(total / n)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=DEFAULT_MODEL,
                   help='HF model directory (default assets/minichat)')
    p.add_argument('--dialogues', type=int, default=400,
                   help='held-out dialogues (default 400)')
    p.add_argument('--max_turns', type=int, default=4, help='most turns per dialogue (default 4)')
    p.add_argument('--seed', type=int, default=HELD_OUT_SEED,
                   help=f'generator seed of the held-out dialogues (default {HELD_OUT_SEED})')
    p.add_argument('--calib_dialogues', type=int, default=2000,
                   help='generated dialogues written as calibration text (default 2000)')
    p.add_argument('--calib_samples', type=int, default=64,
                   help='kv_qparams --calib_samples (default 64)')
    p.add_argument('--calib_seqlen', type=int, default=256,
                   help='kv_qparams --max_seq_len (default 256)')
    p.add_argument('--chunk', type=int, default=16,
                   help='prefill chunk in tokens: later chunks read earlier K/V from the pool '
                        '(default 16)')
    p.add_argument('--batch', type=int, default=32, help='dialogues per engine step (default 32)')
    p.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    p.add_argument('--max_increase', type=float, default=0.01,
                   help='allowed relative perplexity increase of int8 over fp32 (default 0.01)')
    p.add_argument('--workdir', default=None,
                   help='where the workspaces go (default: a temporary directory, removed)')
    p.add_argument('--out', default='kv_int8_ppl.json', help='JSON results (default '
                   'kv_int8_ppl.json)')
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    from lmdeploy.serve.turbomind.deploy import deploy
    sp = load_tokenizer(args.model)
    encoded = [encode_dialogue(sp, d) for d in data.dialogues(args.dialogues, seed=args.seed,
                                                               max_turns=args.max_turns)]
    seqs, masks = [e[0] for e in encoded], [e[1] for e in encoded]
    work = args.workdir or tempfile.mkdtemp(prefix='eval_kv_int8_')
    t0 = time.time()
    try:
        ws = {None: os.path.join(work, 'workspace')}
        deploy('minichat', args.model, 'hf', dst_path=ws[None])
        text_file = os.path.join(work, 'calib.txt')
        with open(text_file, 'w', encoding='utf-8') as f:
            f.write('\n\n'.join(dialogue_text(d) for d in data.dialogues(
                args.calib_dialogues, seed=CALIB_SEED, max_turns=args.max_turns)))
        for kind in ('sym', 'asym'):
            ws[kind] = os.path.join(work, f'workspace-{kind}')
            shutil.copytree(ws[None], ws[kind])
            calibrate(args.model, os.path.join(ws[kind], 'triton_models', 'weights'), text_file,
                      kind == 'sym', args.calib_samples, args.calib_seqlen)
        hf = hf_logp(args.model, seqs)
        rows, ref_logp = [], None
        for name, overrides, kind in MODES:
            logp = engine_logp(ws[kind], overrides, seqs, args.batch, args.chunk, name)
            ref_logp = ref_logp or logp
            nll = nll_of(logp, seqs)
            kl, top1 = divergence(logp, ref_logp)
            rows.append(dict(mode=name, ppl_replies=perplexity(nll, masks, True),
                             ppl_all=perplexity(nll, masks, False), kl_vs_fp32=kl,
                             top1_vs_fp32=top1, **overrides))
        hf_kl, hf_top1 = divergence(hf, ref_logp)
        hf = nll_of(hf, seqs)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    ref = rows[0]
    hf_ppl = dict(ppl_replies=perplexity(hf, masks, True), ppl_all=perplexity(hf, masks, False),
                  kl_vs_engine_fp32=hf_kl, top1_vs_engine_fp32=hf_top1)
    worst = 0.0
    print(f'\nMiniChat, {len(seqs)} held-out dialogues (seed {args.seed}), '
          f'{sum(m.count(True) for m in masks)} reply tokens / {sum(map(len, seqs))} tokens; '
          f'transformers fp32: ppl replies 1 + {hf_ppl["ppl_replies"] - 1:.2e}, all '
          f'{hf_ppl["ppl_all"]:.4f} (KL to the engine\'s fp32 KV {hf_kl:.1e})\n')
    print('| KV | ppl (replies) | vs fp32 | ppl (all tokens) | vs fp32 | KL vs fp32 (nats/tok) '
          '| top-1 = fp32 |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        r['rel_replies'] = r['ppl_replies'] / ref['ppl_replies'] - 1
        r['rel_all'] = r['ppl_all'] / ref['ppl_all'] - 1
        worst = max(worst, r['rel_replies'], r['rel_all'])
        print(f"| {r['mode']} | 1 + {r['ppl_replies'] - 1:.2e} | {100 * r['rel_replies']:+.1e}% | "
              f"{r['ppl_all']:.4f} | {100 * r['rel_all']:+.3f}% | {r['kl_vs_fp32']:.1e} | "
              f"{100 * r['top1_vs_fp32']:.2f}% |")
    result = dict(args=vars(args), dialogues=len(seqs), tokens=sum(map(len, seqs)),
                  reply_tokens=sum(m.count(True) for m in masks), transformers_fp32=hf_ppl,
                  rows=rows, seconds=time.time() - t0)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'\nwrote {args.out} ({time.time() - t0:.0f}s)')
    if worst > args.max_increase:
        print(f'int8 perplexity is {100 * worst:.2f}% above fp32 (allowed '
              f'{100 * args.max_increase:.2f}%)', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
