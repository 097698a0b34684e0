"""Convert an HF or Meta LLaMA-family checkpoint into a TurboMind workspace (LMDeploy v0.0.2's).

    python -m lmdeploy.serve.turbomind.deploy MODEL_NAME MODEL_PATH [MODEL_FORMAT]
        [--tokenizer_path P] [--dst_path ./workspace] [--tp N] [--verbose]

The workspace layout, file names, tensor layouts and config.ini keys are v0.0.2's (see the
behaviour reference, section 3). Deliberate differences from v0.0.2:

* `vocab_size` in config.ini is the number of embedding rows (v0.0.2 wrote the sentencepiece
  vocabulary size, which can be smaller and then not divisible by tp);
* `size_per_head`/`rotary_embedding` come from the checkpoint (v0.0.2 hard-coded 128, also in
  the q/k permutation), so any even head size converts;
* `rope_theta` is written (after `rotary_embedding`) when the checkpoint's base is not 10000;
* safetensors (sharded via index or not) is read as well as `.bin`; bf16/fp32 become fp16;
* memory stays bounded: HF shards are streamed one at a time and each output file is written
  as soon as its inputs have been read; Meta shards are memory-mapped;
* q/k/v/o biases that are partly absent (e.g. q/k/v biases without an o bias) are written
  as zeros, so `attn_bias=1` always comes with every bias file;
* a tied LM head (`tie_word_embeddings` with no `lm_head.weight`) is taken from the embedding;
* every bad input fails before anything is written, with a one-line error and exit code 255;
  the workspace is built in a temporary directory beside `dst_path` and moved into place only
  on success, so a failed run leaves no partial workspace and never touches an existing one;
* progress bar instead of per-tensor prints (`--verbose` brings those back) and a summary.
"""
import configparser
import json
import os
import os.path as osp
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from lmdeploy.serve.turbomind.checkpoint import (CheckpointError, find_hf_shards, find_meta_shards,
                                                 iter_shards, one_line)

if TYPE_CHECKING:  # torch is imported on first use: `--help` and early errors stay fast
    import torch

SUPPORTED_FORMATS = ['llama', 'hf']
DEFAULT_ROPE_THETA = 10000.0

_HERE = osp.dirname(osp.abspath(__file__))
TEMPLATE_DIR = osp.join(_HERE, 'triton_models')
DOCKER_SCRIPT = osp.join(_HERE, 'service_docker_up.sh')
TOKENIZER_PY = osp.join(osp.dirname(_HERE), '..', 'turbomind', 'tokenizer.py')
TOKENIZER_PY = osp.normpath(TOKENIZER_PY)

# Engine parameters v0.0.2 writes into config.ini, in its order (after the model keys).
ENGINE_DEFAULTS = (
    ('max_batch_size', 32),
    ('max_context_token_num', 4),
    ('session_len', None),  # template.session_len + 8
    ('step_length', 1),
    ('cache_max_entry_count', 48),
    ('cache_chunk_size', 1),
    ('use_context_fmha', 1),
    ('quant_policy', 0),
)


class DeployError(Exception):
    """Bad input; the message is one line and is printed as `error: <message>`."""


# --------------------------------------------------------------------------------------------
# What we know about the model


@dataclass
class ModelInfo:
    num_layer: int
    hidden: int
    head_num: int
    kv_head_num: int
    size_per_head: int
    inter_size: int
    vocab_size: int  # embedding rows
    norm_eps: float
    rope_theta: float = DEFAULT_ROPE_THETA
    attn_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.head_num * self.size_per_head

    @property
    def kv_dim(self) -> int:
        return self.kv_head_num * self.size_per_head


def _layer_of(name: str, prefix: str) -> Optional[int]:
    m = re.match(re.escape(prefix) + r'(\d+)\.', name)
    return int(m.group(1)) if m else None


def _num_layers_in(names, prefix: str) -> int:
    layers = [_layer_of(n, prefix) for n in names]
    layers = [i for i in layers if i is not None]
    return max(layers) + 1 if layers else 0


def _shape_str(shape) -> str:
    return '(' + ', '.join(str(int(s)) for s in shape) + ')'


def _missing_error(missing: Sequence[str]) -> DeployError:
    shown = ', '.join(missing[:4])
    more = f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''
    return DeployError(f'the checkpoint is missing {len(missing)} tensor(s): {shown}{more}')


# --------------------------------------------------------------------------------------------
# Tensor transforms. Canonical tensors use Meta's names and torch's [out, in] layout, with q/k
# rows in interleaved rotary-pair order.


def hf_to_interleaved(x: 'torch.Tensor', n_heads: int, head_dim: int) -> 'torch.Tensor':
    """Permute q/k rows (weight [out, in] or bias [out]) from HF's rotate-half order to the
    interleaved-pair order: within a head, HF row j < d/2 goes to 2j and row d/2 + j to 2j+1."""
    rest = x.shape[1:]
    y = x.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2)
    return y.reshape(n_heads * head_dim, *rest)


def merge_qkv_rank(q: 'torch.Tensor', k: 'torch.Tensor', v: 'torch.Tensor', tp: int, rank: int):
    """Rank `rank`'s fused [in, q_r | k_r | v_r] slice from [out, in] q/k/v (or [out] biases)."""
    import torch
    parts = []
    for x in (q, k, v):
        n = x.shape[0] // tp
        parts.append(x[rank * n:(rank + 1) * n])
    fused = torch.cat(parts, dim=0)
    return fused.t() if fused.dim() == 2 else fused


class Writer:
    """Writes raw fp16 tensor files (numpy tofile, no header) into the weights directory."""

    def __init__(self, out_dir: str, verbose: bool = False):
        self.out_dir = out_dir
        self.verbose = verbose
        self.nbytes = 0
        self.nfiles = 0

    def save(self, name: str, x: 'torch.Tensor'):
        import torch
        x = x.detach().to(torch.float16).contiguous()
        if self.verbose:
            print(name, _shape_str(x.shape))
        arr = x.numpy()
        arr.tofile(osp.join(self.out_dir, name))
        self.nbytes += arr.nbytes
        self.nfiles += 1

    def split(self, name: str, x: 'torch.Tensor', dim: int, tp: int):
        """`<prefix>.<rank>.<ext>` files: x split evenly along `dim`."""
        import torch
        prefix, ext = osp.splitext(name)
        for r, part in enumerate(torch.chunk(x, tp, dim=dim)):
            self.save(f'{prefix}.{r}{ext}', part)

    def replicate(self, name: str, x: 'torch.Tensor', tp: int):
        prefix, ext = osp.splitext(name)
        for r in range(tp):
            self.save(f'{prefix}.{r}{ext}', x)


@dataclass
class Job:
    """One group of output files, written once all its canonical inputs are available."""
    inputs: List[str]
    run: Callable[[Dict[str, 'torch.Tensor']], None]


def build_jobs(info: ModelInfo, tp: int, w: Writer, extra: Sequence[str] = ()) -> List[Job]:
    jobs: List[Job] = []

    def whole(cname):
        jobs.append(Job([cname], lambda t, c=cname: w.save(c, t[c])))

    for i in range(info.num_layer):
        p = f'layers.{i}.attention'
        qkv = [f'{p}.w{c}.weight' for c in 'qkv']
        qkv_b = [f'{p}.w{c}.bias' for c in 'qkv']

        def run_qkv(t, p=p, qkv=qkv, qkv_b=qkv_b):
            for r in range(tp):
                w.save(f'{p}.w_qkv.{r}.weight', merge_qkv_rank(*(t[c] for c in qkv), tp, r))
            if info.attn_bias:
                for r in range(tp):
                    w.save(f'{p}.w_qkv.{r}.bias', merge_qkv_rank(*(t[c] for c in qkv_b), tp, r))

        jobs.append(Job(qkv + (qkv_b if info.attn_bias else []), run_qkv))

        def run_wo(t, p=p):
            w.split(f'{p}.wo.weight', t[f'{p}.wo.weight'].t(), 0, tp)
            if info.attn_bias:
                w.replicate(f'{p}.wo.bias', t[f'{p}.wo.bias'], tp)

        jobs.append(Job([f'{p}.wo.weight'] + ([f'{p}.wo.bias'] if info.attn_bias else []), run_wo))

        f = f'layers.{i}.feed_forward'
        for key, dim in (('w1', -1), ('w3', -1), ('w2', 0)):
            name = f'{f}.{key}.weight'
            jobs.append(Job([name], lambda t, n=name, d=dim: w.split(n, t[n].t(), d, tp)))
        whole(f'layers.{i}.attention_norm.weight')
        whole(f'layers.{i}.ffn_norm.weight')
    for name in ('tok_embeddings.weight', 'norm.weight', 'output.weight', *extra):
        whole(name)
    return jobs


# --------------------------------------------------------------------------------------------
# Sources: how canonical tensors are made from a checkpoint's own tensors


class HFSource:
    """HF LLaMA-family names -> canonical tensors; streamed one shard at a time."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.config = _read_json(osp.join(model_path, 'config.json'), 'config.json')
        try:
            self.shards = find_hf_shards(model_path)
            self.shapes: Dict[str, Tuple[int, ...]] = {}
            for shard in iter_shards(self.shards):
                for name in shard.names():
                    self.shapes[name] = shard.shape(name)
        except CheckpointError as e:
            raise DeployError(str(e)) from None
        self.w_pack = 'model.layers.0.self_attn.W_pack.weight' in self.shapes
        self.info = self._model_info()
        self.recipes = self._recipes()

    def _model_info(self) -> ModelInfo:
        cfg, shapes = self.config, self.shapes
        for key in ('num_hidden_layers', 'rms_norm_eps', 'num_attention_heads'):
            if key not in cfg:
                raise DeployError(f'{osp.join(self.model_path, "config.json")} has no "{key}"')
        num_layer = int(cfg['num_hidden_layers'])
        found = _num_layers_in(shapes, 'model.layers.')
        if found != num_layer:
            raise DeployError(f'layer count mismatch: config.json says num_hidden_layers='
                              f'{num_layer} but the checkpoint has {found} layers')
        need = ['model.embed_tokens.weight', 'model.layers.0.mlp.gate_proj.weight']
        missing = [n for n in need if n not in shapes]
        if missing:
            raise _missing_error(missing)
        vocab, emb_dim = shapes['model.embed_tokens.weight']
        hidden = int(cfg.get('hidden_size', emb_dim))
        heads = int(cfg['num_attention_heads'])
        kv_heads = int(cfg.get('num_key_value_heads') or heads)
        head_dim = cfg.get('head_dim') or (hidden // heads if heads else 0)
        rope = cfg.get('rope_theta')
        if rope is None and isinstance(cfg.get('rope_parameters'), dict):
            rope = cfg['rope_parameters'].get('rope_theta')
        layer0 = 'model.layers.0.self_attn.'
        attn_bias = any(f'{layer0}{n}.bias' in shapes
                        for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'W_pack'))
        return ModelInfo(num_layer=num_layer, hidden=hidden, head_num=heads,
                         kv_head_num=kv_heads, size_per_head=int(head_dim),
                         inter_size=int(shapes['model.layers.0.mlp.gate_proj.weight'][0]),
                         vocab_size=int(vocab), norm_eps=cfg['rms_norm_eps'],
                         rope_theta=float(rope if rope is not None else DEFAULT_ROPE_THETA),
                         attn_bias=attn_bias)

    def _recipes(self):
        """canonical name -> (raw input names, expected raw shapes, fn(raw tensors) -> tensor)."""
        import torch
        info, shapes = self.info, self.shapes
        H, I, V, d = info.hidden, info.inter_size, info.vocab_size, info.size_per_head
        qd, kvd = info.q_dim, info.kv_dim
        rec = {}

        def add(cname, raw, shape, fn=lambda x: x):
            rec[cname] = ([raw], {raw: shape}, lambda t: fn(t[raw]))

        for i in range(info.num_layer):
            hf = f'model.layers.{i}.'
            a = f'layers.{i}.attention.'
            perm = {'q': (info.head_num, qd), 'k': (info.kv_head_num, kvd), 'v': (None, kvd)}
            offsets = {'q': (0, qd), 'k': (qd, qd + kvd), 'v': (qd + kvd, qd + 2 * kvd)}
            for c, (nh, out) in perm.items():
                fix = (lambda x, nh=nh: hf_to_interleaved(x, nh, d)) if nh else (lambda x: x)
                for ext, shape in (('weight', (out, H)), ('bias', (out,))):
                    if ext == 'bias' and not info.attn_bias:
                        continue
                    if self.w_pack:
                        raw = f'{hf}self_attn.W_pack.{ext}'
                        lo, hi = offsets[c]
                        full = (qd + 2 * kvd, H) if ext == 'weight' else (qd + 2 * kvd,)
                        fn = (lambda x, lo=lo, hi=hi, fix=fix: fix(x[lo:hi]))
                        if ext == 'bias' and raw not in shapes:
                            rec[f'{a}w{c}.bias'] = ([], {}, lambda t, o=out: torch.zeros(o))
                        else:
                            add(f'{a}w{c}.{ext}', raw, full, fn)
                        continue
                    raw = f'{hf}self_attn.{c}_proj.{ext}'
                    if ext == 'bias' and raw not in shapes:
                        rec[f'{a}w{c}.bias'] = ([], {}, lambda t, o=out: torch.zeros(o))
                    else:
                        add(f'{a}w{c}.{ext}', raw, shape, fix)
            add(f'{a}wo.weight', f'{hf}self_attn.o_proj.weight', (H, qd))
            if info.attn_bias:
                raw = f'{hf}self_attn.o_proj.bias'
                if raw in shapes:
                    add(f'{a}wo.bias', raw, (H,))
                else:
                    rec[f'{a}wo.bias'] = ([], {}, lambda t: torch.zeros(H))
            f = f'layers.{i}.feed_forward.'
            add(f'{f}w1.weight', f'{hf}mlp.gate_proj.weight', (I, H))
            add(f'{f}w3.weight', f'{hf}mlp.up_proj.weight', (I, H))
            add(f'{f}w2.weight', f'{hf}mlp.down_proj.weight', (H, I))
            add(f'layers.{i}.attention_norm.weight', f'{hf}input_layernorm.weight', (H,))
            add(f'layers.{i}.ffn_norm.weight', f'{hf}post_attention_layernorm.weight', (H,))
        add('tok_embeddings.weight', 'model.embed_tokens.weight', (V, H))
        add('norm.weight', 'model.norm.weight', (H,))
        if 'lm_head.weight' not in shapes and self.config.get('tie_word_embeddings'):
            add('output.weight', 'model.embed_tokens.weight', (V, H))
        else:
            add('output.weight', 'lm_head.weight', (V, H))
        return rec

    def validate(self):
        expected: Dict[str, Tuple[int, ...]] = {}
        for raws, shapes, _ in self.recipes.values():
            expected.update(shapes)
        missing = [n for n in expected if n not in self.shapes]
        if missing:
            raise _missing_error(missing)
        for name, shape in expected.items():
            if tuple(self.shapes[name]) != tuple(shape):
                raise DeployError(f'tensor {name} has shape {_shape_str(self.shapes[name])}, '
                                  f'expected {_shape_str(shape)}')

    def run(self, jobs: List[Job], progress):
        """Stream shards; run each job as soon as every raw tensor it needs has been read."""
        raw_of = {}  # job index -> set of raw names still missing
        waiting: Dict[str, List[int]] = {}  # raw name -> jobs needing it
        refs: Dict[str, int] = {}
        for j, job in enumerate(jobs):
            raws = {r for c in job.inputs for r in self.recipes[c][0]}
            raw_of[j] = set(raws)
            for r in raws:
                waiting.setdefault(r, []).append(j)
                refs[r] = refs.get(r, 0) + 1
        pending: Dict[str, 'torch.Tensor'] = {}
        done = set()

        def finish(j):
            job = jobs[j]
            t = {c: self.recipes[c][2](pending) for c in job.inputs}
            job.run(t)
            done.add(j)
            for r in {r for c in job.inputs for r in self.recipes[c][0]}:
                refs[r] -= 1
                if refs[r] == 0:
                    del pending[r]

        for j in range(len(jobs)):  # jobs with no raw inputs at all
            if not raw_of[j]:
                finish(j)
        try:
            for shard in iter_shards(self.shards):
                for name in shard.names():
                    if name not in waiting or name in pending:
                        continue
                    pending[name] = shard.get(name)
                    progress.update(1)
                    for j in waiting[name]:
                        raw_of[j].discard(name)
                        if not raw_of[j] and j not in done:
                            finish(j)
        except CheckpointError as e:
            raise DeployError(str(e)) from None
        left = sorted({r for j in range(len(jobs)) if j not in done for r in raw_of[j]})
        if left:  # index/header promised tensors that the shards did not hold
            raise _missing_error(left)

    def num_inputs(self) -> int:
        return len({r for raws, _, _ in self.recipes.values() for r in raws})


class MetaSource:
    """Meta `consolidated.XX.pth` model-parallel shards (memory-mapped, merged per tensor)."""

    COLUMN = ('w1', 'w3', 'wq', 'wk', 'wv', 'output')  # concatenated on dim 0
    ROW = ('w2', 'wo', 'tok_embeddings')  # concatenated on the last dim

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.params = _read_json(osp.join(model_path, 'params.json'), 'params.json')
        try:
            self.shards = [s.open() for s in find_meta_shards(model_path)]
            self.names = self.shards[0].names()
            self.part_shapes = [{n: s.shape(n) for n in s.names()} for s in self.shards]
        except CheckpointError as e:
            self.close()
            raise DeployError(str(e)) from None
        for s, shapes in zip(self.shards[1:], self.part_shapes[1:]):
            if set(shapes) != set(self.names):
                diff = sorted(set(shapes) ^ set(self.names))
                raise DeployError(f'Meta shards disagree: {osp.basename(s.path)} and '
                                  f'{osp.basename(self.shards[0].path)} differ in {diff[0]}')
        self.shapes = {n: self._merged_shape(n) for n in self.names}
        self.info = self._model_info()
        self.extra = ['rope.freqs'] if 'rope.freqs' in self.shapes else []

    def _kind(self, name: str) -> str:
        parts = name.split('.')
        key = parts[-2] if len(parts) >= 2 else name
        ext = parts[-1]
        if key in self.COLUMN:
            return 'column'
        if key in self.ROW and ext == 'weight':
            return 'row'
        return 'whole'

    def _merged_shape(self, name: str) -> Tuple[int, ...]:
        parts = [shapes[name] for shapes in self.part_shapes]
        kind = self._kind(name)
        if kind == 'whole' or not parts[0]:
            return tuple(parts[0])
        dim = 0 if kind == 'column' else len(parts[0]) - 1
        for p in parts[1:]:
            if len(p) != len(parts[0]) or any(a != b for k, (a, b) in enumerate(zip(p, parts[0]))
                                              if k != dim):
                raise DeployError(f'tensor {name} has inconsistent shapes across Meta shards: '
                                  f'{_shape_str(parts[0])} vs {_shape_str(p)}')
        merged = list(parts[0])
        merged[dim] = sum(p[dim] for p in parts)
        return tuple(merged)

    def _model_info(self) -> ModelInfo:
        p, shapes = self.params, self.shapes
        for key in ('n_layers', 'norm_eps'):
            if key not in p:
                raise DeployError(f'{osp.join(self.model_path, "params.json")} has no "{key}"')
        num_layer = int(p['n_layers'])
        found = _num_layers_in(shapes, 'layers.')
        if found != num_layer:
            raise DeployError(f'layer count mismatch: params.json says n_layers={num_layer} '
                              f'but the checkpoint has {found} layers')
        need = ['tok_embeddings.weight', 'layers.0.feed_forward.w1.weight']
        missing = [n for n in need if n not in shapes]
        if missing:
            raise _missing_error(missing)
        vocab, emb_dim = shapes['tok_embeddings.weight']
        hidden = int(p.get('dim', emb_dim))
        heads = int(p.get('n_heads', 32))
        kv_heads = int(p.get('n_kv_heads') or heads)
        attn_bias = any(f'layers.0.attention.{k}.bias' in shapes for k in ('wq', 'wk', 'wv', 'wo'))
        return ModelInfo(num_layer=num_layer, hidden=hidden, head_num=heads,
                         kv_head_num=kv_heads, size_per_head=hidden // heads if heads else 0,
                         inter_size=int(shapes['layers.0.feed_forward.w1.weight'][0]),
                         vocab_size=int(vocab), norm_eps=p['norm_eps'],
                         rope_theta=float(p.get('rope_theta') or DEFAULT_ROPE_THETA),
                         attn_bias=attn_bias)

    def _expected(self) -> Dict[str, Tuple[int, ...]]:
        info = self.info
        H, I, V, qd, kvd = (info.hidden, info.inter_size, info.vocab_size, info.q_dim,
                            info.kv_dim)
        exp = {'tok_embeddings.weight': (V, H), 'norm.weight': (H,), 'output.weight': (V, H)}
        for i in range(info.num_layer):
            a = f'layers.{i}.attention.'
            for key, shape in (('wq', (qd, H)), ('wk', (kvd, H)), ('wv', (kvd, H)),
                               ('wo', (H, qd))):
                exp[f'{a}{key}.weight'] = shape
                if info.attn_bias:
                    exp[f'{a}{key}.bias'] = (shape[0],)
            f = f'layers.{i}.feed_forward.'
            exp.update({f'{f}w1.weight': (I, H), f'{f}w3.weight': (I, H), f'{f}w2.weight': (H, I),
                        f'layers.{i}.attention_norm.weight': (H,),
                        f'layers.{i}.ffn_norm.weight': (H,)})
        return exp

    def validate(self):
        expected = self._expected()
        missing = [n for n in expected if n not in self.shapes]
        if missing:
            raise _missing_error(missing)
        for name, shape in expected.items():
            if tuple(self.shapes[name]) != tuple(shape):
                raise DeployError(f'tensor {name} has shape {_shape_str(self.shapes[name])}, '
                                  f'expected {_shape_str(shape)}')

    def get(self, name: str) -> 'torch.Tensor':
        import torch
        try:
            parts = [s.get(name) for s in self.shards]
        except CheckpointError as e:
            raise DeployError(str(e)) from None
        kind = self._kind(name)
        if kind == 'whole' or parts[0].dim() == 0:
            return parts[0]
        # Cast each piece first, as v0.0.2 did when it copied the pieces into an fp16 buffer.
        parts = [x.to(torch.float16) for x in parts]
        return torch.cat(parts, dim=0 if kind == 'column' else -1)

    def run(self, jobs: List[Job], progress):
        # Every tensor needs a piece of every shard, so all shards are mapped at once. They are
        # re-mapped per layer so that the pages already read are given back as we go.
        group = None
        for job in jobs:
            layer = _layer_of(job.inputs[0], 'layers.')
            if layer != group:
                self.close()
                group = layer
            t = {c: self.get(c) for c in job.inputs}
            job.run(t)
            del t
            progress.update(len(job.inputs))
        self.close()

    def num_inputs(self) -> int:
        return len(self._expected()) + len(self.extra)

    def close(self):
        for s in getattr(self, 'shards', ()):
            s.close()


def _read_json(path: str, what: str) -> dict:
    if not osp.isfile(path):
        raise DeployError(f'{what} not found: {path}')
    try:
        with open(path) as f:
            data = json.load(f)
    except Exception as e:
        raise DeployError(f'cannot read {path}: {one_line(e)}') from None
    if not isinstance(data, dict):
        raise DeployError(f'cannot read {path}: not a JSON object')
    return data


# --------------------------------------------------------------------------------------------
# Workspace


def tokenizer_info(path: str) -> Tuple[int, int, int]:
    """(vocab size, bos id, eos id) of a sentencepiece model."""
    from sentencepiece import SentencePieceProcessor
    try:
        sp = SentencePieceProcessor(model_file=path)
    except Exception as e:
        raise DeployError(f'cannot load tokenizer model {path}: {one_line(e)}') from None
    return sp.vocab_size(), sp.bos_id(), sp.eos_id()


def config_ini(model_name: str, info: ModelInfo, tp: int, session_len: int, bos: int,
               eos: int) -> configparser.ConfigParser:
    keys = [('model_name', model_name), ('head_num', info.head_num),
            ('kv_head_num', info.kv_head_num), ('size_per_head', info.size_per_head),
            ('vocab_size', info.vocab_size), ('num_layer', info.num_layer),
            ('rotary_embedding', info.size_per_head)]
    if info.rope_theta != DEFAULT_ROPE_THETA:
        keys.append(('rope_theta', info.rope_theta))
    keys += [('inter_size', info.inter_size), ('norm_eps', info.norm_eps),
             ('attn_bias', int(info.attn_bias)), ('start_id', bos), ('end_id', eos),
             ('weight_type', 'fp16')]
    keys += [(k, session_len if k == 'session_len' else v) for k, v in ENGINE_DEFAULTS]
    keys.append(('tensor_para_size', tp))
    cfg = configparser.ConfigParser()
    cfg['llama'] = {k: str(v) for k, v in keys}
    return cfg


def pbtxt_parameters(tp: int, model_name: str) -> str:
    """The two `parameters` blocks v0.0.2 appends to interactive/config.pbtxt."""
    out = ''
    for key, value in (('tensor_para_size', tp), ('model_name', model_name)):
        out += (f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n'
                f'  }}\n}}\n')
    return out


SYMLINKS = (  # (link, target) relative to the workspace
    ('triton_models/preprocessing/1/tokenizer', '../../tokenizer'),
    ('triton_models/postprocessing/1/tokenizer', '../../tokenizer'),
    ('triton_models/interactive/1/weights', '../../weights'),
    ('model_repository/turbomind', '../triton_models/interactive'),
    ('model_repository/preprocessing', '../triton_models/preprocessing'),
    ('model_repository/postprocessing', '../triton_models/postprocessing'),
)


def _link(ws: str, link: str, target: str):
    path = osp.join(ws, link)
    if osp.islink(path) or osp.isfile(path):
        os.unlink(path)
    elif osp.isdir(path):
        shutil.rmtree(path)
    os.makedirs(osp.dirname(path), exist_ok=True)
    os.symlink(target, path)


def copy_templates(ws: str, tp: int, model_name: str):
    if not osp.isdir(TEMPLATE_DIR):
        raise DeployError(f'triton model templates not found: {TEMPLATE_DIR} '
                          '(broken installation)')
    if not osp.isfile(DOCKER_SCRIPT):
        raise DeployError(f'service script not found: {DOCKER_SCRIPT} (broken installation)')
    tm = osp.join(ws, 'triton_models')
    shutil.copytree(TEMPLATE_DIR, tm, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for sub in ('weights', 'tokenizer'):
        os.makedirs(osp.join(tm, sub), exist_ok=True)
    shutil.copy(DOCKER_SCRIPT, ws)
    return tm


def finish_workspace(ws: str, tp: int, model_name: str):
    with open(osp.join(ws, 'triton_models', 'interactive', 'config.pbtxt'), 'a') as f:
        f.write(pbtxt_parameters(tp, model_name))
    for link, target in SYMLINKS:
        _link(ws, link, target)
    script = osp.join(ws, 'service_docker_up.sh')
    with open(script) as f:
        text = f.read()
    with open(script, 'w') as f:
        f.write(re.sub(r'(?<![\w])TP=1(?![0-9])', f'TP={tp}', text))
    shutil.copymode(DOCKER_SCRIPT, script)


def copy_tokenizer(tm: str, model_format: str, model_path: str, tokenizer_path: str):
    tok_dir = osp.join(tm, 'tokenizer')
    shutil.copy(tokenizer_path, osp.join(tok_dir, 'tokenizer.model'))
    if model_format == 'hf':
        for fname in sorted(os.listdir(model_path)):
            src = osp.join(model_path, fname)
            if fname.endswith(('.json', '.py')) and osp.isfile(src):
                shutil.copy(src, osp.join(tok_dir, fname))
    if osp.isfile(TOKENIZER_PY):
        shutil.copy(TOKENIZER_PY, osp.join(tok_dir, 'tokenizer.py'))
    else:
        print(f'warning: {TOKENIZER_PY} not found; the workspace has no tokenizer.py',
              file=sys.stderr)


def _inside(path: str, root: str) -> bool:
    path, root = osp.realpath(path), osp.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------------------
# Entry


@dataclass
class Summary:
    dst_path: str
    model_name: str
    model_format: str
    info: ModelInfo
    tp: int
    nbytes: int
    nfiles: int
    seconds: float

    def __str__(self):
        i = self.info
        return (f'workspace {self.dst_path} is ready: model {self.model_name} '
                f'({self.model_format}), {i.num_layer} layers, {i.head_num} heads x '
                f'{i.size_per_head} ({i.kv_head_num} kv), vocab {i.vocab_size}, tp={self.tp}, '
                f'{self.nfiles} weight files, {self.nbytes / 2**20:.1f} MiB, '
                f'{self.seconds:.1f} s')


def deploy(model_name: str, model_path: str, model_format: str = 'hf',
           tokenizer_path: Optional[str] = None, dst_path: str = './workspace', tp: int = 1,
           verbose: bool = False) -> Summary:
    """Convert; raises DeployError (one line) on bad input. See `main` for the arguments."""
    start = time.time()
    from lmdeploy.model import UnknownModelError, get_template
    try:
        template = get_template(str(model_name))
    except UnknownModelError as e:
        raise DeployError(str(e)) from None
    if model_format not in SUPPORTED_FORMATS:
        raise DeployError(f'the model format "{model_format}" is not supported. '
                          f'The supported format are: {SUPPORTED_FORMATS}')
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise DeployError(f'--tp must be a positive integer, got {tp!r}')
    model_path = str(model_path)
    if not osp.isdir(model_path):
        raise DeployError(f'model path {model_path} does not exist or is not a directory')
    if model_format == 'llama' and tokenizer_path is None:
        raise DeployError('the model is llama (Meta format): its tokenizer model path should be '
                          'specified with --tokenizer_path')
    if tokenizer_path is None:
        tokenizer_path = osp.join(model_path, 'tokenizer.model')
    tokenizer_path = str(tokenizer_path)
    if not osp.isfile(tokenizer_path):
        raise DeployError(f'tokenizer model {tokenizer_path} does not exist')
    dst_path = str(dst_path)
    if osp.lexists(dst_path) and not osp.isdir(dst_path):
        raise DeployError(f'dst_path {dst_path} exists and is not a directory')
    for src in (model_path, tokenizer_path):
        if _inside(src, dst_path):
            raise DeployError(f'dst_path {dst_path} would replace the source {src}')

    source = HFSource(model_path) if model_format == 'hf' else MetaSource(model_path)
    try:
        return _convert(source, template, model_name, model_format, model_path,
                        tokenizer_path, dst_path, tp, verbose, start)
    finally:
        if isinstance(source, MetaSource):
            source.close()


def _convert(source, template, model_name, model_format, model_path, tokenizer_path, dst_path,
             tp, verbose, start) -> Summary:
    info: ModelInfo = source.info
    if info.head_num <= 0 or info.size_per_head <= 0 or info.size_per_head % 2:
        raise DeployError(f'unsupported attention shape: hidden {info.hidden}, '
                          f'{info.head_num} heads, head size {info.size_per_head}')
    if info.kv_head_num <= 0 or info.head_num % info.kv_head_num:
        raise DeployError(f'{info.head_num} heads is not a multiple of {info.kv_head_num} kv heads')
    source.validate()
    for what, n in (('attention heads', info.head_num), ('kv heads', info.kv_head_num),
                    ('inter_size', info.inter_size), ('vocab size (embedding rows)',
                                                      info.vocab_size)):
        if n % tp:
            raise DeployError(f'tp={tp} does not divide the {what} ({n})')
    sp_vocab, bos, eos = tokenizer_info(tokenizer_path)
    if sp_vocab > info.vocab_size:
        raise DeployError(f'the tokenizer has {sp_vocab} tokens but the embedding only '
                          f'{info.vocab_size} rows')

    dst_abs = osp.abspath(dst_path)
    parent = osp.dirname(dst_abs)
    created = None  # the top-most parent directory this run created
    probe = parent
    while not osp.exists(probe):
        created, probe = probe, osp.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(dst_abs)}.deploy-', dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    ok = False
    try:
        tm = copy_templates(tmp, tp, model_name)
        copy_tokenizer(tm, model_format, model_path, tokenizer_path)
        weights = osp.join(tm, 'weights')
        writer = Writer(weights, verbose=verbose)
        jobs = build_jobs(info, tp, writer, getattr(source, 'extra', ()))
        from tqdm import tqdm
        with tqdm(total=source.num_inputs(), unit='tensor', desc='converting', disable=None,
                  leave=False) as bar:
            source.run(jobs, bar)
        cfg = config_ini(model_name, info, tp, template.session_len + 8, bos, eos)
        with open(osp.join(weights, 'config.ini'), 'w') as f:
            cfg.write(f)
        finish_workspace(tmp, tp, model_name)
        # Move into place; an existing workspace is replaced only now (v0.0.2 wiped it first).
        backup = None
        if osp.lexists(dst_abs):
            backup = tempfile.mkdtemp(prefix=f'.{osp.basename(dst_abs)}.old-', dir=parent)
            os.rename(dst_abs, osp.join(backup, 'ws'))
        os.rename(tmp, dst_abs)
        ok = True
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    except OSError as e:
        raise DeployError(f'cannot write the workspace: {one_line(e)}') from None
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
            if created:
                shutil.rmtree(created, ignore_errors=True)
    return Summary(dst_path, model_name, model_format, info, tp, writer.nbytes, writer.nfiles,
                   time.time() - start)


def main(model_name: str, model_path: str, model_format: str = 'hf',
         tokenizer_path: str = None, dst_path: str = './workspace', tp: int = 1,
         verbose: bool = False):
    """Convert a LLaMA-family checkpoint into a TurboMind workspace.

    The workspace holds the Triton model repository, config.ini and the weights as raw fp16
    files split for `tp` GPUs. An existing workspace at dst_path is replaced, but only once the
    conversion has succeeded. Bad input stops with a one-line error and exit code 255.

    Args:
        model_name: chat-template name, stored in config.ini; it selects the prompt template,
            stop words and session_len (e.g. llama, llama2, vicuna, internlm-chat-7b,
            baichuan-7b; an unknown name lists all).
        model_path: directory of the source checkpoint: HF (config.json + *.safetensors or
            *.bin, sharded or not) or Meta (params.json + consolidated.XX.pth).
        model_format: 'hf' (HuggingFace, default) or 'llama' (Meta's original format).
        tokenizer_path: sentencepiece tokenizer.model. Default for hf:
            MODEL_PATH/tokenizer.model; required for llama.
        dst_path: output workspace directory (default ./workspace).
        tp: tensor-parallel degree; must divide the heads, KV heads, FFN size and vocab.
        verbose: print every file written with its shape (v0.0.2 style).
    """
    try:
        summary = deploy(model_name, model_path, model_format, tokenizer_path, dst_path, tp,
                         verbose)
    except DeployError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(255)
    print(summary)


if __name__ == '__main__':
    import fire
    fire.Fire(main)
