"""Engine configuration: read once from a workspace's config.ini, overridden, validated once.

    cfg = EngineConfig.from_workspace('./workspace', max_batch_size=8, dtype='fp16')

Where the file is looked for (first hit wins): ``<path>/triton_models/weights/config.ini``,
``<path>/weights/config.ini``, ``<path>/config.ini``; ``path`` may also be the config.ini itself.
The section read is ``[turbomind]`` when present, else ``[llama]`` (the v0.0.2 Python wrapper's
rule, behaviour reference section 3.5). Keys of the file that this engine does not know are
kept in ``extra`` and otherwise ignored (a v0.0.2 workspace may carry vestigial ones); an
unknown *override* keyword is an error, because it is a typo in the caller's code.

Model keys absent from the file get v0.0.2's engine defaults where it had one (kv_head_num =
head_num, max_batch_size 32, session_len 2160, ...) and are an error where it required them.
Engine keys that v0.0.2 did not have:

* ``block_size``: tokens per KV block of the paged pool (default 64; any positive value works);
* ``max_prefill_tokens``: the token budget of one step's prefill chunks (chunked prefill).
  Absent, it is derived from ``max_context_token_num`` as v0.0.2 did: a value <=
  ``max_batch_size`` is multiplied by ``session_len`` (4 -> 4 x 2056 = 8224 tokens);
* ``num_blocks``: the KV pool size in blocks; 0 (default) lets the runner's memory plan decide
  from ``cache_max_entry_count`` (see ``model_runner.plan_num_blocks``);
* ``dtype``: compute/KV dtype, 'fp32' | 'fp16' | 'bf16'; default fp16 on CUDA, fp32 on CPU;
* ``device``: 'cpu', 'cuda' or 'cuda:N'; default cuda when available, else cpu;
* ``rope_theta``: rotary base (deploy writes it only when it is not 10000);
* ``chunked_prefill``: split long prompts over steps within ``max_prefill_tokens`` (default on).
* ``max_mixed_prefill_tokens``: the prefill budget of a step that also decodes (0, the
  default: ``max_prefill_tokens``). A prompt that arrives while others decode lengthens their
  next token by its prefill; this bounds that (inter-token latency p99) at the cost of more
  steps for a long prompt that arrives meanwhile. api_server sets 512 unless the file has it.
* ``cuda_graph``: replay steps from CUDA graphs (cuda_graph.py): decode-only steps per
  batch-size bucket, lone prompts per token bucket up to 512, and mixed steps (prompts joining
  decoding rows, and lone prompts of 513..1024 tokens) per token bucket up to 1024, and the
  sampler of steps up to 64 rows (sampler_graphs.py) (default on; it only takes effect on
  CUDA, the CPU path never captures).
* ``async_schedule``: plan and launch step n+1 while step n still runs on the device, so the
  host's commit / schedule / launch work hides behind the device (default on; see engine.py).
  The engine falls back to synchronous steps while a request wants logits (``decode()``) and
  always with tensor parallelism.
* ``jit_schedule``: with async_schedule, plan step n+1 only shortly before step n ends (admitting
  arrivals meanwhile) instead of as soon as n is launched, so a prompt that arrives during n
  joins n+1 (lower TTFT at light load; default on, 0 plans n+1 as soon as n is launched).
* ``admit_horizon``: tokens of growth reserved per request when the scheduler admits one
  (default 32): a waiting request joins the batch only when the pool holds its whole context
  plus that growth for it and for every running request, so a full pool makes requests wait
  instead of admitting, preempting and re-prefilling them; < 0 admits greedily (v0.0.2-like)
  and relies on preemption alone.
* ``kv_int8_scales``: where int8 KV (``quant_policy = 4``) takes its scales: 'per_tensor'
  (default; v0.0.2's ``layers.{i}.past_kv_scale.{tp}.weight`` files, 2 floats symmetric or 4
  asymmetric), 'per_head' (the ``....per_head.weight`` files) or 'online' (no files: a scale
  per token and head computed when the KV is written and kept beside the blocks).
  ``use_context_fmha`` is accepted with int8 and changes nothing: attention always reads the
  (dequantised) pool.
"""
import configparser
import dataclasses
import math
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

DTYPES = ('fp32', 'fp16', 'bf16')
KV_INT8_SCALES = ('per_tensor', 'per_head', 'online')
WEIGHT_TYPES = ('fp16', 'fp32')  # what the loader reads; v0.0.2 also named int8/int4
DEFAULT_ROPE_THETA = 10000.0


class ConfigError(ValueError):
    """A bad config.ini or a bad override; the message names the key and the value."""


@dataclass
class EngineConfig:
    # --- model (config.ini written by deploy) ---
    head_num: int
    size_per_head: int
    vocab_size: int
    num_layer: int
    rotary_embedding: int
    inter_size: int
    norm_eps: float
    start_id: int
    end_id: int
    model_name: str = ''
    kv_head_num: int = 0  # 0 -> head_num
    attn_bias: bool = False
    weight_type: str = 'fp16'
    rope_theta: float = DEFAULT_ROPE_THETA
    # --- engine keys v0.0.2 wrote ---
    max_batch_size: int = 32
    max_context_token_num: int = 0  # 0 -> floor(sqrt(max_batch_size)), v0.0.2's default
    session_len: int = 2160
    step_length: int = 1
    cache_max_entry_count: float = 32
    cache_chunk_size: int = 0  # 0 -> cache_max_entry_count (unused by the paged pool)
    use_context_fmha: int = 1
    quant_policy: int = 0
    tensor_para_size: int = 1
    # --- engine keys of this engine ---
    block_size: int = 64
    max_prefill_tokens: int = 0  # 0 -> derived from max_context_token_num
    max_mixed_prefill_tokens: int = 0  # prefill budget of a step with decode rows; 0: the above
    num_blocks: int = 0  # 0 -> memory plan
    dtype: str = ''  # '' -> fp16 on cuda, fp32 on cpu
    device: str = ''  # '' -> cuda if available else cpu
    chunked_prefill: bool = True  # False: a prompt is prefilled in one step, whatever its length
    cuda_graph: bool = True  # decode steps from CUDA graphs (CUDA only)
    async_schedule: bool = True  # plan step n+1 while step n runs (engine.py)
    jit_schedule: bool = True  # plan n+1 just before n ends (engine.py)
    admit_horizon: int = 32  # growth (tokens) reserved per request at admission; < 0: greedy
    kv_int8_scales: str = 'per_tensor'  # quant_policy 4: per_tensor | per_head | online
    # --- where it came from ---
    weight_dir: str = ''
    extra: Dict[str, str] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------
    # Derived

    @property
    def hidden_size(self) -> int:
        return self.head_num * self.size_per_head

    @property
    def q_dim(self) -> int:
        return self.head_num * self.size_per_head

    @property
    def kv_dim(self) -> int:
        return self.kv_head_num * self.size_per_head

    @property
    def torch_dtype(self):
        import torch
        return {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}[self.dtype]

    def blocks_per_session(self) -> int:
        return -(-self.session_len // self.block_size)

    # ----------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def from_workspace(cls, path: str, defaults: Optional[Dict[str, Any]] = None,
                       **overrides) -> 'EngineConfig':
        """Read the config.ini of a workspace (see the module docstring), take `defaults` for
        keys it lacks (a caller's own defaults, e.g. the server's), apply `overrides` (config
        keys, e.g. ``max_batch_size=8``) and validate."""
        ini = find_config_ini(path)
        parser = configparser.ConfigParser()
        try:
            with open(ini) as f:
                parser.read_file(f)
        except (OSError, configparser.Error) as e:
            raise ConfigError(f'cannot read {ini}: {" ".join(str(e).split())}') from None
        section = 'turbomind' if parser.has_section('turbomind') else 'llama'
        if not parser.has_section(section):
            raise ConfigError(f'{ini} has no [llama] (or [turbomind]) section')
        values = {**(defaults or {}), **dict(parser.items(section))}
        values.setdefault('weight_dir', osp.dirname(osp.abspath(ini)))
        return cls.from_dict(values, source=f'{ini} [{section}]', **overrides)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = 'config', **overrides
                  ) -> 'EngineConfig':
        """Build from file values (strings are fine) plus overrides, then validate."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != 'extra'}
        unknown = sorted(k for k in overrides if k not in fields)
        if unknown:
            raise ConfigError(f'unknown engine config key(s): {", ".join(unknown)}; known keys: '
                              f'{", ".join(sorted(fields))}')
        kwargs, extra = {}, {}
        for key, value in values.items():
            if key in fields:
                kwargs[key] = _coerce(fields[key], value, f'{source}: {key}')
            else:
                extra[key] = str(value)
        for key, value in overrides.items():
            if value is None:
                continue
            kwargs[key] = _coerce(fields[key], value, f'override {key}')
        required = [f.name for f in fields.values()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise ConfigError(f'{source} lacks required key(s): {", ".join(missing)}')
        cfg = cls(**kwargs, extra=extra)
        cfg._resolve_defaults()
        cfg.validate()
        return cfg

    def _resolve_defaults(self):
        if self.kv_head_num == 0:
            self.kv_head_num = self.head_num
        if self.max_context_token_num == 0:
            self.max_context_token_num = max(1, int(math.isqrt(max(self.max_batch_size, 1))))
        if self.cache_chunk_size == 0:
            self.cache_chunk_size = max(1, int(self.cache_max_entry_count))
        if self.max_prefill_tokens == 0:
            n = self.max_context_token_num
            self.max_prefill_tokens = n * self.session_len if n <= self.max_batch_size else n
        if not self.device:
            self.device = _default_device()
        if not self.dtype:
            self.dtype = 'fp16' if self.device.startswith('cuda') else 'fp32'

    def validate(self):
        """Raise ConfigError on the first inconsistent value."""
        positive = ('head_num', 'kv_head_num', 'size_per_head', 'vocab_size', 'num_layer',
                    'rotary_embedding', 'inter_size', 'max_batch_size', 'max_context_token_num',
                    'session_len', 'step_length', 'tensor_para_size', 'block_size',
                    'max_prefill_tokens')
        for key in positive:
            value = getattr(self, key)
            if value <= 0:
                raise ConfigError(f'{key} must be positive, got {value}')
        if not self.norm_eps > 0:
            raise ConfigError(f'norm_eps must be positive, got {self.norm_eps}')
        if not self.rope_theta > 0:
            raise ConfigError(f'rope_theta must be positive, got {self.rope_theta}')
        if not self.cache_max_entry_count > 0:
            raise ConfigError(f'cache_max_entry_count must be positive, got '
                              f'{self.cache_max_entry_count}')
        if self.num_blocks < 0:
            raise ConfigError(f'num_blocks must be >= 0 (0 = memory plan), got {self.num_blocks}')
        if self.max_mixed_prefill_tokens < 0:
            raise ConfigError(f'max_mixed_prefill_tokens must be >= 0 (0 = max_prefill_tokens), '
                              f'got {self.max_mixed_prefill_tokens}')
        if self.head_num % self.kv_head_num:
            raise ConfigError(f'head_num {self.head_num} is not divisible by kv_head_num '
                              f'{self.kv_head_num}')
        if self.rotary_embedding % 2 or self.rotary_embedding > self.size_per_head:
            raise ConfigError(f'rotary_embedding {self.rotary_embedding} must be even and <= '
                              f'size_per_head {self.size_per_head}')
        tp = self.tensor_para_size
        for key in ('head_num', 'kv_head_num', 'inter_size', 'vocab_size'):
            if getattr(self, key) % tp:
                raise ConfigError(f'tensor_para_size {tp} does not divide {key} '
                                  f'{getattr(self, key)}')
        if self.dtype not in DTYPES:
            raise ConfigError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
        if self.weight_type not in WEIGHT_TYPES:
            raise ConfigError(f'weight_type {self.weight_type!r} is not supported (supported: '
                              f'{", ".join(WEIGHT_TYPES)})')
        if self.quant_policy not in (0, 4):
            raise ConfigError(f'quant_policy must be 0 or 4 (int8 KV), got {self.quant_policy}')
        if self.kv_int8_scales not in KV_INT8_SCALES:
            raise ConfigError(f'kv_int8_scales must be one of {", ".join(KV_INT8_SCALES)}, got '
                              f'{self.kv_int8_scales!r}')
        if not (self.device == 'cpu' or self.device == 'cuda' or
                (self.device.startswith('cuda:') and self.device[5:].isdigit())):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not 0 <= self.start_id < self.vocab_size or not 0 <= self.end_id < self.vocab_size:
            raise ConfigError(f'start_id {self.start_id} / end_id {self.end_id} out of the '
                              f'vocabulary [0, {self.vocab_size})')

    def __str__(self):
        keys = [f.name for f in dataclasses.fields(self) if f.name != 'extra']
        return 'EngineConfig(' + ', '.join(f'{k}={getattr(self, k)!r}' for k in keys) + ')'


def find_config_ini(path: str) -> str:
    path = str(path)
    if osp.isfile(path):
        return path
    for sub in ('triton_models/weights', 'weights', ''):
        ini = osp.join(path, sub, 'config.ini')
        if osp.isfile(ini):
            return ini
    raise ConfigError(f'no config.ini under {path} (looked in triton_models/weights/, weights/ '
                      'and the directory itself); is it a workspace made by '
                      'lmdeploy.serve.turbomind.deploy?')


def _default_device() -> str:
    try:
        import torch
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    except Exception:  # pragma: no cover
        return 'cpu'


_BOOL = {'1': True, 'true': True, 'yes': True, 'on': True,
         '0': False, 'false': False, 'no': False, 'off': False}


def _coerce(f: dataclasses.Field, value: Any, where: str):
    kind = f.type if isinstance(f.type, type) else {'int': int, 'float': float, 'bool': bool,
                                                    'str': str}.get(str(f.type), str)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int):
                if value not in (0, 1):
                    raise ValueError
                return bool(value)
            return _BOOL[str(value).strip().lower()]
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            text = str(value).strip()
            try:
                return int(text)
            except ValueError:
                as_float = float(text)
                if not as_float.is_integer():
                    raise
                return int(as_float)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
            if math.isnan(out):
                raise ValueError
            return out
        return str(value).strip() if not isinstance(value, os.PathLike) else os.fspath(value)
    except (ValueError, KeyError):
        raise ConfigError(f'{where}: expected {kind.__name__}, got {value!r}') from None
