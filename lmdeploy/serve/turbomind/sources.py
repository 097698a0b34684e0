"""Checkpoint sources: how the canonical tensors (see `common`) are made from an HF or a Meta
checkpoint's own tensors, how the checkpoint is validated (names and shapes, before anything
is written), and the order in which it is read.

Both sources offer: `info` (ModelInfo), `validate()`, `num_inputs()`, `run(jobs, progress)`
(read the checkpoint and run each export job once its inputs are there), `extra` (canonical
names written whole beyond the model's own) and `close()`.
"""
import json
import os.path as osp
from typing import TYPE_CHECKING, Callable, Dict, List

from lmdeploy.serve.turbomind.checkpoint import (CheckpointError, find_hf_shards, find_meta_shards,
                                                 iter_shards, one_line)
from lmdeploy.serve.turbomind.common import (DEFAULT_ROPE_THETA, DeployError, ModelInfo, Shape,
                                             canonical_shapes, check_layer_count, check_shapes,
                                             layer_of, missing_error, require, shape_str)
from lmdeploy.serve.turbomind.export import Job, interleave_rows

if TYPE_CHECKING:  # torch is imported on first use: `--help` and early errors stay fast
    import torch


def read_json(path: str, what: str) -> dict:
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
# HuggingFace

# canonical `layers.N.<key>.<ext>` -> HF `model.layers.N.<name>.<ext>`
HF_LAYER_NAMES = {
    'attention.wq': 'self_attn.q_proj', 'attention.wk': 'self_attn.k_proj',
    'attention.wv': 'self_attn.v_proj', 'attention.wo': 'self_attn.o_proj',
    'feed_forward.w1': 'mlp.gate_proj', 'feed_forward.w3': 'mlp.up_proj',
    'feed_forward.w2': 'mlp.down_proj', 'attention_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
HF_GLOBAL_NAMES = {'tok_embeddings.weight': 'model.embed_tokens.weight',
                   'norm.weight': 'model.norm.weight', 'output.weight': 'lm_head.weight'}


class Recipe:
    """A canonical tensor made from raw checkpoint tensors (no raw input: made from nothing)."""

    def __init__(self, raw: List[str], shapes: Dict[str, Shape],
                 make: Callable[[Dict[str, 'torch.Tensor']], 'torch.Tensor']):
        self.raw, self.shapes, self.make = raw, shapes, make


class HFSource:
    """HF LLaMA-family names -> canonical tensors; streamed one shard at a time."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.config = read_json(osp.join(model_path, 'config.json'), 'config.json')
        self.extra: List[str] = []
        self.shards = []
        try:
            self.shards = find_hf_shards(model_path)
            self.shapes = self._scan()
        except CheckpointError as e:
            self.close()
            raise DeployError(str(e)) from None
        self.w_pack = 'model.layers.0.self_attn.W_pack.weight' in self.shapes
        self.info = self._model_info()
        self.recipes = self._recipes()

    def _scan(self) -> Dict[str, Shape]:
        """Every tensor's shape, from the safetensors headers or the `.bin` pickles. Memory-mapped
        shards stay open for `run` (so a `.bin` is unpickled once); others are closed again."""
        shapes: Dict[str, Shape] = {}
        for shard in self.shards:
            shard.open()
            for name in shard.names():
                shapes[name] = shard.shape(name)
            if not shard.mapped:
                shard.close()
        return shapes

    def _model_info(self) -> ModelInfo:
        cfg, shapes = self.config, self.shapes
        for key in ('num_hidden_layers', 'rms_norm_eps', 'num_attention_heads'):
            if key not in cfg:
                raise DeployError(f'{osp.join(self.model_path, "config.json")} has no "{key}"')
        num_layer = int(cfg['num_hidden_layers'])
        check_layer_count(num_layer, shapes, 'model.layers.', 'config.json says num_hidden_layers')
        require(['model.embed_tokens.weight', 'model.layers.0.mlp.gate_proj.weight'], shapes)
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

    def _recipe(self, cname: str, shape: Shape) -> Recipe:
        info = self.info
        if cname in HF_GLOBAL_NAMES:
            raw = HF_GLOBAL_NAMES[cname]
            if (cname == 'output.weight' and raw not in self.shapes
                    and self.config.get('tie_word_embeddings')):
                raw = HF_GLOBAL_NAMES['tok_embeddings.weight']
            return Recipe([raw], {raw: shape}, lambda t: t[raw])
        _, layer, key = cname.split('.', 2)
        key, ext = key.rsplit('.', 1)
        hf = f'model.layers.{layer}.'
        raw, raw_shape = f'{hf}{HF_LAYER_NAMES[key]}.{ext}', shape
        fix = lambda x: x  # noqa: E731
        if key in ('attention.wq', 'attention.wk', 'attention.wv'):
            c = key[-1]
            heads = {'q': info.head_num, 'k': info.kv_head_num}.get(c)
            if heads:
                fix = lambda x: interleave_rows(x, heads, info.size_per_head)  # noqa: E731
            if self.w_pack:
                qd, kvd = info.q_dim, info.kv_dim
                lo, hi = {'q': (0, qd), 'k': (qd, qd + kvd), 'v': (qd + kvd, qd + 2 * kvd)}[c]
                raw = f'{hf}self_attn.W_pack.{ext}'
                raw_shape = (qd + 2 * kvd, *shape[1:])
                per_head = fix
                fix = lambda x: per_head(x[lo:hi])  # noqa: E731
        if ext == 'bias' and raw not in self.shapes:  # partial biases: zeros
            import torch
            return Recipe([], {}, lambda t: torch.zeros(shape))
        return Recipe([raw], {raw: raw_shape}, lambda t: fix(t[raw]))

    def _recipes(self) -> Dict[str, Recipe]:
        canon = canonical_shapes(self.info)
        # layers first, then the embedding, norm and LM head: the order problems are reported in
        order = sorted(canon, key=lambda n: not n.startswith('layers.'))
        return {c: self._recipe(c, canon[c]) for c in order}

    def validate(self):
        expected: Dict[str, Shape] = {}
        for rec in self.recipes.values():
            expected.update(rec.shapes)
        check_shapes(expected, self.shapes)

    def run(self, jobs: List[Job], progress):
        """Stream shards; run each job as soon as every raw tensor it needs has been read."""
        raw_of: Dict[int, set] = {}  # job index -> raw names still missing
        waiting: Dict[str, List[int]] = {}  # raw name -> jobs needing it
        refs: Dict[str, int] = {}
        for j, job in enumerate(jobs):
            raw_of[j] = {r for c in job.inputs for r in self.recipes[c].raw}
            for r in raw_of[j]:
                waiting.setdefault(r, []).append(j)
                refs[r] = refs.get(r, 0) + 1
        pending: Dict[str, 'torch.Tensor'] = {}
        done = set()

        def finish(j):
            job = jobs[j]
            job.run({c: self.recipes[c].make(pending) for c in job.inputs})
            done.add(j)
            for r in {r for c in job.inputs for r in self.recipes[c].raw}:
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
            raise missing_error(left)

    def num_inputs(self) -> int:
        return len({r for rec in self.recipes.values() for r in rec.raw})

    def close(self):
        for s in self.shards:
            s.close()


# --------------------------------------------------------------------------------------------
# Meta


class MetaSource:
    """Meta `consolidated.XX.pth` model-parallel shards (memory-mapped, merged per tensor)."""

    COLUMN = ('w1', 'w3', 'wq', 'wk', 'wv', 'output')  # concatenated on dim 0
    ROW = ('w2', 'wo', 'tok_embeddings')  # concatenated on the last dim

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.params = read_json(osp.join(model_path, 'params.json'), 'params.json')
        self.shards = []
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

    def _merged_shape(self, name: str) -> Shape:
        parts = [shapes[name] for shapes in self.part_shapes]
        kind = self._kind(name)
        if kind == 'whole' or not parts[0]:
            return tuple(parts[0])
        dim = 0 if kind == 'column' else len(parts[0]) - 1
        for p in parts[1:]:
            if len(p) != len(parts[0]) or any(a != b for k, (a, b) in enumerate(zip(p, parts[0]))
                                              if k != dim):
                raise DeployError(f'tensor {name} has inconsistent shapes across Meta shards: '
                                  f'{shape_str(parts[0])} vs {shape_str(p)}')
        merged = list(parts[0])
        merged[dim] = sum(p[dim] for p in parts)
        return tuple(merged)

    def _model_info(self) -> ModelInfo:
        p, shapes = self.params, self.shapes
        for key in ('n_layers', 'norm_eps'):
            if key not in p:
                raise DeployError(f'{osp.join(self.model_path, "params.json")} has no "{key}"')
        num_layer = int(p['n_layers'])
        check_layer_count(num_layer, shapes, 'layers.', 'params.json says n_layers')
        require(['tok_embeddings.weight', 'layers.0.feed_forward.w1.weight'], shapes)
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

    def validate(self):
        check_shapes(canonical_shapes(self.info), self.shapes)

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
            layer = layer_of(job.inputs[0], 'layers.')
            if layer != group:
                self.close()
                group = layer
            t = {c: self.get(c) for c in job.inputs}
            job.run(t)
            del t
            progress.update(len(job.inputs))
        self.close()

    def num_inputs(self) -> int:
        return len(canonical_shapes(self.info)) + len(self.extra)

    def close(self):
        for s in self.shards:
            s.close()
