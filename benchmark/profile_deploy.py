"""Profile the checkpoint converter (`python -m lmdeploy.serve.turbomind.deploy`).

Builds a random Llama checkpoint of the requested size (fp16, sharded safetensors with
`model.safetensors.index.json`, plus the project's sentencepiece `tokenizer.model`), converts
it in a child process and measures the child's wall time and peak resident memory.

Goals: checkpoint bytes / wall time >= 200 MB/s, and peak RSS <= 1.5 x largest shard + 1 GiB
(the converter streams one shard at a time instead of loading the whole checkpoint).

    python benchmark/profile_deploy.py --size_gb 2 --out result.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import os.path as osp
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOKENIZER_MODEL = osp.join(ROOT, 'assets', 'tokenizer', 'tokenizer.model')
# What a generated checkpoint was made from (not *.json: deploy copies those into workspaces).
MARKER = '.profile_deploy'

MB = 1000**2
GB = 1000**3
GiB = 1024**3
GOAL_MB_S = 200.0

# Llama shape: head_dim 128 (16 heads), FFN 5504, vocab 32000; layers chosen to reach size_gb.
HIDDEN, HEADS, INTER, VOCAB = 2048, 16, 5504, 32000
CHUNK_ELEMS = 16 * 1024 * 1024  # random numbers are made and written 32 MB at a time


def llama_tensors(num_layers: int) -> List[Tuple[str, Tuple[int, ...]]]:
    """HF Llama parameter names and shapes, in checkpoint order."""
    h, i = HIDDEN, INTER
    out = [('model.embed_tokens.weight', (VOCAB, h))]
    for n in range(num_layers):
        p = f'model.layers.{n}.'
        out += [
            (p + 'self_attn.q_proj.weight', (h, h)),
            (p + 'self_attn.k_proj.weight', (h, h)),
            (p + 'self_attn.v_proj.weight', (h, h)),
            (p + 'self_attn.o_proj.weight', (h, h)),
            (p + 'mlp.gate_proj.weight', (i, h)),
            (p + 'mlp.up_proj.weight', (i, h)),
            (p + 'mlp.down_proj.weight', (h, i)),
            (p + 'input_layernorm.weight', (h, )),
            (p + 'post_attention_layernorm.weight', (h, )),
        ]
    out += [('model.norm.weight', (h, )), ('lm_head.weight', (VOCAB, h))]
    return out


def nbytes(shape) -> int:
    return 2 * math.prod(shape)


def layers_for(size_gb: float) -> int:
    fixed = nbytes((VOCAB, HIDDEN)) * 2 + nbytes((HIDDEN, ))
    per_layer = sum(nbytes(s) for _, s in llama_tensors(1)) - fixed
    return max(1, math.ceil((size_gb * GB - fixed) / per_layer))


def plan_shards(tensors, shard_bytes: int) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    shards, cur, cur_bytes = [], [], 0
    for name, shape in tensors:
        if cur and cur_bytes + nbytes(shape) > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nbytes(shape)
    if cur:
        shards.append(cur)
    return shards


def write_safetensors(path: str, entries, generator, progress) -> None:
    """Write fp16 tensors in the safetensors layout (u64 header size, JSON header, raw data),
    generating each tensor in chunks so memory stays at one chunk."""
    import torch

    header: Dict[str, dict] = {'__metadata__': {'format': 'pt'}}
    offset = 0
    for name, shape in entries:
        header[name] = {'dtype': 'F16', 'shape': list(shape),
                        'data_offsets': [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(raw)))
        f.write(raw)
        for name, shape in entries:
            left = math.prod(shape)
            is_norm = len(shape) == 1
            while left:
                n = min(left, CHUNK_ELEMS)
                if is_norm:
                    chunk = torch.ones(n, dtype=torch.float16)
                else:
                    chunk = torch.randn(n, dtype=torch.float16, generator=generator).mul_(0.02)
                f.write(chunk.numpy().tobytes())
                progress.update(2 * n)
                left -= n
        f.flush()
        os.fsync(f.fileno())


def generate_checkpoint(dst: str, size_gb: float, shard_mb: int, seed: int) -> None:
    """Write a random Llama checkpoint into `dst` (built in `<dst>.partial`, then renamed)."""
    import torch
    from tqdm import tqdm

    num_layers = layers_for(size_gb)
    shards = plan_shards(llama_tensors(num_layers), shard_mb * MB)
    total = sum(nbytes(s) for shard in shards for _, s in shard)
    work = dst.rstrip('/') + '.partial'
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    desc = f'generating {total / GB:.2f} GB Llama ({num_layers} layers, {len(shards)} shards)'
    with tqdm(total=total, unit='B', unit_scale=True, desc=desc, mininterval=1.0) as progress:
        for k, entries in enumerate(shards):
            fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
            write_safetensors(osp.join(work, fname), entries, generator, progress)
            weight_map.update({name: fname for name, _ in entries})
    with open(osp.join(work, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    config = {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'torch_dtype': 'float16',
        'hidden_size': HIDDEN, 'intermediate_size': INTER, 'num_attention_heads': HEADS,
        'num_key_value_heads': HEADS, 'num_hidden_layers': num_layers, 'vocab_size': VOCAB,
        'rms_norm_eps': 1e-6, 'max_position_embeddings': 4096, 'rope_theta': 10000.0,
        'hidden_act': 'silu', 'bos_token_id': 1, 'eos_token_id': 2, 'tie_word_embeddings': False,
    }
    with open(osp.join(work, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    shutil.copy(TOKENIZER_MODEL, osp.join(work, 'tokenizer.model'))
    with open(osp.join(work, MARKER), 'w') as f:
        json.dump({'size_gb': size_gb, 'shard_mb': shard_mb, 'seed': seed,
                   'num_layers': num_layers}, f)
    if osp.isdir(dst):
        os.rmdir(dst)  # only ever an empty directory here
    os.rename(work, dst)


def weight_files(ckpt: str) -> List[str]:
    exts = ('.safetensors', '.bin', '.pth', '.pt')
    return sorted(osp.join(ckpt, f) for f in os.listdir(ckpt)
                  if f.endswith(exts) and f not in ('training_args.bin', ))


def evict_page_cache(paths) -> None:
    """Ask the kernel to drop the files' cached pages, so the converter reads from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f'/proc/{p}/task/{p}/children') as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def run_deploy(model_name: str, ckpt: str, dst: str, tp: int, log_path: str) -> dict:
    """Run the converter in a child process; wall time and peak RSS of its process tree.

    Peak RSS is the kernel's high-water mark (VmHWM) of the child, sampled every 20 ms, or
    the largest sampled sum of RSS over the child and its descendants if that is higher.
    """
    import resource

    cmd = [sys.executable, '-m', 'lmdeploy.serve.turbomind.deploy', model_name, ckpt,
           '--dst_path', dst, '--tp', str(tp)]
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    peak_kb = 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, 'w') as log:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while child.poll() is None:
            tree = [child.pid] + _descendants(child.pid)
            peak_kb = max(peak_kb, _status_kb(child.pid, 'VmHWM'),
                          sum(_status_kb(p, 'VmRSS') for p in tree))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
    # ru_maxrss also counts the parent's memory the child inherited before exec; an upper bound.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rusage_kb = after.ru_maxrss
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {'cmd': cmd, 'returncode': child.returncode, 'seconds': seconds, 'cpu_seconds': cpu,
            'peak_rss_bytes': peak_kb * 1024, 'ru_maxrss_bytes': rusage_kb * 1024}


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = osp.join(dirpath, f)
            if not osp.islink(p):
                total += osp.getsize(p)
    return total


def print_table(r: dict) -> None:
    rows = [
        ('checkpoint', f"{r['ckpt_bytes'] / GB:.2f} GB in {r['num_shards']} shards", '', ''),
        ('largest shard', f"{r['largest_shard_bytes'] / GB:.2f} GB", '', ''),
        ('workspace weights', f"{r['workspace_bytes'] / GB:.2f} GB", '', ''),
        ('wall time' + (' (median)' if len(r['seconds_all']) > 1 else ''),
         f"{r['seconds']:.1f} s", '', ''),
        ('CPU time (user+sys)', f"{statistics.median(r['cpu_seconds_all']):.1f} s", '', ''),
        ('throughput', f"{r['mb_per_s']:.0f} MB/s", f'>= {GOAL_MB_S:.0f} MB/s',
         'PASS' if r['pass_throughput'] else 'FAIL'),
        ('peak RSS', f"{r['peak_rss_bytes'] / GB:.2f} GB",
         f"<= {r['rss_goal_bytes'] / GB:.2f} GB (1.5 x shard + 1 GiB)",
         'PASS' if r['pass_rss'] else 'FAIL'),
    ]
    widths = [max(len(row[c]) for row in rows + [('metric', 'value', 'goal', 'result')])
              for c in range(4)]
    line = '| ' + ' | '.join('{:%d}' % w for w in widths) + ' |'
    print(line.format('metric', 'value', 'goal', 'result'))
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in rows:
        print(line.format(*row))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Measure the wall time and peak memory of converting a random Llama '
        'checkpoint with `python -m lmdeploy.serve.turbomind.deploy`.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt_dir', default=None,
                   help='checkpoint folder. If it exists and holds a checkpoint (one this '
                   'script made, or any HF Llama folder with config.json and tokenizer.model) '
                   'it is reused as is; if it is missing or empty a random checkpoint is '
                   'generated there and kept. Default: a temporary folder, deleted at the end '
                   'unless --keep')
    p.add_argument('--dst_path', default=None,
                   help='workspace the converter writes (must not exist yet). Default: a '
                   'temporary folder. Deleted at the end unless --keep')
    p.add_argument('--size_gb', type=float, default=2.0,
                   help='size of the generated checkpoint in GB (10^9 bytes); the layer count '
                   'is the smallest that reaches it (hidden 2048, FFN 5504, vocab 32000)')
    p.add_argument('--shard_mb', type=int, default=700,
                   help='maximum size of one generated safetensors shard in MB (10^6 bytes)')
    p.add_argument('--tp', type=int, default=1, help='tensor-parallel degree passed to deploy')
    p.add_argument('--keep', action='store_true',
                   help='keep the workspace (and a temporary checkpoint) after the run')
    p.add_argument('--out', default=None, help='write the results as JSON to this file')
    p.add_argument('--repeat', type=int, default=1,
                   help='convert this many times (fresh workspace each time); the table shows '
                   'the median time and the largest peak RSS')
    p.add_argument('--model_name', default='llama2',
                   help='chat-template name passed to deploy')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights')
    p.add_argument('--cold', action='store_true',
                   help='drop the checkpoint from the page cache before converting, so the '
                   'converter reads from disk; without it the pages just written stay cached')
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.repeat < 1 or args.tp < 1 or args.size_gb <= 0 or args.shard_mb <= 0:
        print('error: --repeat, --tp, --size_gb and --shard_mb must be positive', file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix='profile_deploy_')
    made_dst = None
    try:
        if args.ckpt_dir:
            ckpt = osp.abspath(args.ckpt_dir)
            if osp.isdir(ckpt) and os.listdir(ckpt):
                if not osp.isfile(osp.join(ckpt, 'config.json')):
                    print(f'error: {ckpt} is not empty and holds no config.json', file=sys.stderr)
                    return 2
                made = 'not generated by this script'
                if osp.isfile(osp.join(ckpt, MARKER)):
                    with open(osp.join(ckpt, MARKER)) as f:
                        made = f.read().strip()
                print(f'reusing checkpoint {ckpt} ({made})')
            else:
                generate_checkpoint(ckpt, args.size_gb, args.shard_mb, args.seed)
        else:
            ckpt = osp.join(scratch, 'checkpoint')
            generate_checkpoint(ckpt, args.size_gb, args.shard_mb, args.seed)
        dst = osp.abspath(args.dst_path) if args.dst_path else osp.join(scratch, 'workspace')
        if osp.exists(dst):
            print(f'error: workspace {dst} already exists; pick another --dst_path',
                  file=sys.stderr)
            return 2

        files = weight_files(ckpt)
        sizes = [osp.getsize(f) for f in files]
        load_before = os.getloadavg()[0]
        log_path = osp.join(scratch, 'deploy.log')
        made_dst = dst
        print(f'converting: python -m lmdeploy.serve.turbomind.deploy {args.model_name} {ckpt} '
              f'--dst_path {dst} --tp {args.tp}')
        runs = []
        for k in range(args.repeat):
            if k and osp.isdir(dst):
                shutil.rmtree(dst)  # made by the previous repetition
            if args.cold:
                evict_page_cache(files)
            run = run_deploy(args.model_name, ckpt, dst, args.tp, log_path)
            with open(log_path, errors='replace') as f:
                log_lines = f.read().splitlines()
            if run['returncode'] != 0:
                print(f"deploy failed with exit code {run['returncode']}; last lines:",
                      file=sys.stderr)
                for line in log_lines[-20:]:
                    print('  ' + line, file=sys.stderr)
                return 1
            runs.append(run)
            if args.repeat > 1:
                print(f"run {k + 1}/{args.repeat}: {run['seconds']:.1f} s "
                      f"({run['cpu_seconds']:.1f} s CPU), "
                      f"peak RSS {run['peak_rss_bytes'] / GB:.2f} GB")
        seconds = statistics.median(r['seconds'] for r in runs)
        peak_rss = max(r['peak_rss_bytes'] for r in runs)

        ckpt_bytes, largest = sum(sizes), max(sizes)
        rss_goal = 1.5 * largest + GiB
        mb_per_s = ckpt_bytes / MB / seconds
        result = {
            'model_name': args.model_name, 'checkpoint': ckpt, 'workspace': dst, 'tp': args.tp,
            'cold_cache': args.cold, 'ckpt_bytes': ckpt_bytes, 'num_shards': len(files),
            'largest_shard_bytes': largest,
            'workspace_bytes': dir_bytes(osp.join(dst, 'triton_models', 'weights')),
            'seconds': seconds, 'seconds_all': [r['seconds'] for r in runs],
            'cpu_seconds_all': [r['cpu_seconds'] for r in runs],
            'mb_per_s': mb_per_s, 'peak_rss_bytes': peak_rss,
            'ru_maxrss_bytes': max(r['ru_maxrss_bytes'] for r in runs),
            'load_avg_1min_before': load_before, 'cpu_count': os.cpu_count(),
            'goal_mb_per_s': GOAL_MB_S, 'rss_goal_bytes': rss_goal,
            'pass_throughput': mb_per_s >= GOAL_MB_S,
            'pass_rss': peak_rss <= rss_goal,
            'command': run['cmd'], 'deploy_log_lines': len(log_lines),
        }
        print(f'machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.2f} before '
              f"the run; page cache {'dropped' if args.cold else 'warm'}")
        print_table(result)
        if args.out:
            with open(args.out, 'w') as f:
                json.dump(result, f, indent=2)
            print(f'results written to {args.out}')
        if args.keep:
            print(f'kept workspace {dst}' + ('' if args.ckpt_dir else f' and checkpoint {ckpt}'))
        return 0
    finally:
        # The workspace (made by this run only) and the scratch folder (temporary checkpoint,
        # log, default workspace) go unless --keep; a --ckpt_dir checkpoint always stays.
        if not args.keep:
            if made_dst and osp.isdir(made_dst):
                shutil.rmtree(made_dst, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
