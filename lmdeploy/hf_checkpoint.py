"""Loading a Hugging Face checkpoint for the tools that run it with transformers (the PyTorch
chat, kv_qparams calibration): path or hub id checks, device and dtype choice, the tokenizer
wrapper and the model, each failure a one-line `CliError`."""
import json
import os.path as osp
import sys

from lmdeploy.console import EXIT_ERROR, CliError, one_line

DTYPES = {'fp16': 'float16', 'float16': 'float16', 'half': 'float16', 'bf16': 'bfloat16',
          'bfloat16': 'bfloat16', 'fp32': 'float32', 'float32': 'float32', 'float': 'float32'}


def looks_like_hub_id(path: str) -> bool:
    parts = path.split('/')
    return (len(parts) == 2 and all(parts) and not path.startswith(('.', '~'))
            and not any(p in ('.', '..') for p in parts))


def check_model_path(model_path: str) -> str:
    if not isinstance(model_path, str) or not model_path:
        raise CliError(f'MODEL_PATH must be a path, got {model_path!r}')
    path = osp.expanduser(model_path)
    if osp.isdir(path):
        if not osp.isfile(osp.join(path, 'config.json')):
            raise CliError(f'{model_path} is not a Hugging Face model folder (no config.json)')
        return path
    if osp.exists(path):
        raise CliError(f'{model_path} is a file; MODEL_PATH must be a Hugging Face model folder')
    if not looks_like_hub_id(model_path):
        raise CliError(f'model path not found: {model_path}')
    # A hub id ('org/name'): fetch (or find in the local cache) a snapshot, so that the model
    # and the tokenizer wrapper both read one local folder.
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model_path)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...: one line
        raise CliError(f'model path not found: {model_path} (not a local folder, and the Hugging Face Hub '
                       f'gave {one_line(e, with_type=True)})', code=EXIT_ERROR) from None


def pick_device(device: str):
    import torch
    name = str(device).strip().lower()
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise CliError(f'--device {device}: CUDA is not available on this machine (try --device cpu)')
    elif name != 'cpu':
        raise CliError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f'--device: bad device {device!r}') from None


def pick_dtype(dtype: str, device, model_dtype):
    import torch
    name = str(dtype).strip().lower()
    if name == 'auto':
        if device.type == 'cpu':
            return torch.float32
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    if name not in DTYPES:
        raise CliError(f"--dtype must be one of auto, fp16, bf16, fp32, got {dtype!r}")
    return getattr(torch, DTYPES[name])


def config_dtype(model_path: str):
    import torch
    try:
        with open(osp.join(model_path, 'config.json'), encoding='utf-8') as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    name = cfg.get('dtype') or cfg.get('torch_dtype')
    return getattr(torch, name, None) if isinstance(name, str) else None


def tokenizer_class():
    """`lmdeploy.turbomind.tokenizer.Tokenizer`, also where the TurboMind extension is missing.

    Importing the module runs `lmdeploy/turbomind/__init__.py`, which loads the engine and its
    compiled extension. The tokenizer module itself needs only the standard library,
    sentencepiece and transformers (it is copied into workspaces as it is), so without a built
    engine it is loaded from its file.
    """
    try:
        from lmdeploy.turbomind.tokenizer import Tokenizer
        return Tokenizer
    except ImportError:
        import importlib.util
        name = 'lmdeploy_pytorch_tokenizer'
        module = sys.modules.get(name)
        if module is None:
            path = osp.join(osp.dirname(osp.abspath(__file__)), 'turbomind', 'tokenizer.py')
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return module.Tokenizer


def load_tokenizer(path: str, use_fast: bool):
    Tokenizer = tokenizer_class()
    try:
        tokenizer = Tokenizer(path)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported in one line
        raise CliError(f'cannot load the tokenizer from {path}: {one_line(e, with_type=True)}',
                       code=EXIT_ERROR) from None
    if not use_fast and tokenizer.backend == 'hf':
        # The wrapper asks transformers for its default (fast) tokenizer; swap in the slow one.
        try:
            from transformers import AutoTokenizer
            slow = AutoTokenizer.from_pretrained(tokenizer.model.model_dir, use_fast=False,
                                                 trust_remote_code=True)
            tokenizer.model.model = slow
            tokenizer.model._detok_options = None
        except Exception as e:  # noqa: BLE001
            print(f'note: no slow tokenizer ({one_line(e, with_type=True)}); using the fast one', file=sys.stderr)
    return tokenizer


def load_model(model_path: str, torch_dtype, trust_remote_code: bool):
    import logging
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger('transformers').setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                     trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        raise CliError(f'cannot load the model from {model_path}: {one_line(e, with_type=True)}',
                       code=EXIT_ERROR) from None
    return model.eval()
