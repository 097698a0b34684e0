"""What the converter modules share: the error type, the model description, the canonical
tensor names/shapes and the shape checks.

Canonical tensors use Meta's names (`layers.N.attention.wq.weight`, ...) and torch's [out, in]
layout, with q/k rows in the engine's interleaved rotary-pair order.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

DEFAULT_ROPE_THETA = 10000.0

Shape = Tuple[int, ...]


class DeployError(Exception):
    """Bad input; the message is one line and is printed as `error: <message>`."""


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


def canonical_shapes(info: ModelInfo) -> Dict[str, Shape]:
    """Every canonical tensor of the model with its [out, in] shape: the embedding, final norm
    and LM head, then layer by layer (wq, wk, wv, wo with their biases, w1, w3, w2, norms)."""
    H, I, V, qd, kvd = (info.hidden, info.inter_size, info.vocab_size, info.q_dim, info.kv_dim)
    out: Dict[str, Shape] = {'tok_embeddings.weight': (V, H), 'norm.weight': (H, ),
                             'output.weight': (V, H)}
    for i in range(info.num_layer):
        a = f'layers.{i}.attention.'
        for key, shape in (('wq', (qd, H)), ('wk', (kvd, H)), ('wv', (kvd, H)), ('wo', (H, qd))):
            out[f'{a}{key}.weight'] = shape
            if info.attn_bias:
                out[f'{a}{key}.bias'] = (shape[0], )
        f = f'layers.{i}.feed_forward.'
        out.update({f'{f}w1.weight': (I, H), f'{f}w3.weight': (I, H), f'{f}w2.weight': (H, I),
                    f'layers.{i}.attention_norm.weight': (H, ),
                    f'layers.{i}.ffn_norm.weight': (H, )})
    return out


def layer_of(name: str, prefix: str) -> Optional[int]:
    m = re.match(re.escape(prefix) + r'(\d+)\.', name)
    return int(m.group(1)) if m else None


def num_layers_in(names: Iterable[str], prefix: str) -> int:
    layers = [i for i in (layer_of(n, prefix) for n in names) if i is not None]
    return max(layers) + 1 if layers else 0


def check_layer_count(declared: int, names: Iterable[str], prefix: str, what: str):
    """`what` names the setting, e.g. 'config.json says num_hidden_layers'."""
    found = num_layers_in(names, prefix)
    if found != declared:
        raise DeployError(f'layer count mismatch: {what}={declared} but the checkpoint has '
                          f'{found} layers')


def shape_str(shape) -> str:
    return '(' + ', '.join(str(int(s)) for s in shape) + ')'


def missing_error(missing: Sequence[str]) -> DeployError:
    shown = ', '.join(missing[:4])
    more = f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''
    return DeployError(f'the checkpoint is missing {len(missing)} tensor(s): {shown}{more}')


def require(names: Sequence[str], available) -> None:
    missing = [n for n in names if n not in available]
    if missing:
        raise missing_error(missing)


def check_shapes(expected: Dict[str, Shape], actual: Dict[str, Shape]) -> None:
    """Every expected tensor is present (else one error listing the missing) with its shape."""
    require(list(expected), actual)
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise DeployError(f'tensor {name} has shape {shape_str(actual[name])}, '
                              f'expected {shape_str(shape)}')
