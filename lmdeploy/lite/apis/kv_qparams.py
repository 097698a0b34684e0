"""Calibrate the int8 KV cache of a TurboMind workspace (LMDeploy v0.0.2's `kv_qparams`).

    python -m lmdeploy.lite.apis.kv_qparams --model HF_MODEL --output_dir WORKSPACE/triton_models/weights
        [--symmetry True] [--granularity per_tensor|per_head] [--num_tp 1] [--offload False]
        [--calib_dataset builtin|c4|ptb|wikitext2|pileval|PATH] [--calib_samples 128]
        [--max_seq_len 2048] [--device auto] [--dtype auto] [--set_quant_policy False]

Runs the HF model over calibration windows, observes every layer's K (after rotary embedding)
and V, and writes `layers.{i}.past_kv_scale.{tp}.weight` per layer and TP rank: symmetric
`[k_scale, v_scale]` (v0.0.2's format) or asymmetric `[k_scale, k_zp, v_scale, v_zp]` (v0.0.4's).
File formats and formulas: lmdeploy/lite/quantization/{qparams,scale_files}.py, docs/en/kv_int8.md.

Deliberate differences from v0.0.2 (behaviour reference 1.4, 8, 13):

* the default calibration text is the corpus shipped with lmdeploy (`builtin`), so it works
  offline; `--calib_dataset c4` (or ptb, wikitext2, pileval) needs the `datasets` library and
  the network, and fails with a one-line error naming the offline options without them;
  `--calib_dataset PATH` reads a .txt or .jsonl file;
* `--granularity per_head` also writes per-head scales (`...past_kv_scale.{tp}.per_head.weight`),
  keeping the v0.0.2 files valid beside them;
* `--offload` works: decoder layers stay in host memory and visit the device one at a time;
* CPU or GPU (`--device`), fp32 on CPU and fp16 (or the checkpoint's bf16) on GPU (`--dtype`);
* the asymmetric zero point is v0.0.4's (max + min) / 2, and its lines read
  `Layer {l} TP {t} KV scales&zeros done.`;
* `--num_tp` is checked against the workspace's tensor_para_size (and the layer and KV-head
  counts against the model) before anything runs; `--set_quant_policy` turns int8 KV on in
  config.ini;
* text is tokenized with lmdeploy's Tokenizer (sentencepiece, or the HF fast tokenizer when the
  model has a tokenizer_config.json), without special tokens;
* bad input is a one-line error; the files are written as one set (temporary files renamed
  when all are complete), so a failed run leaves no partial set behind.
"""
import functools
import os.path as osp
import sys
from typing import Dict, List, Optional

from lmdeploy.console import EXIT_ERROR, EXIT_INTERRUPTED, CliError, UsageError, one_line, run_fire

GRANULARITIES = ('per_tensor', 'per_head')


def main(model: str, bits: int = 8, granularity: str = 'per_tensor', symmetry: bool = True,
         offload: bool = False, max_seq_len: int = 2048, num_tp: int = 1,
         calib_dataset: str = 'builtin', calib_samples: int = 128, output_dir: str = './kv_scales',
         device: str = 'auto', dtype: str = 'auto', set_quant_policy: bool = False):
    """Calibrate int8 KV-cache scales and write them into a workspace's weight dir.

    Usage: python -m lmdeploy.lite.apis.kv_qparams --model HF_MODEL --output_dir WORKSPACE/triton_models/weights

    Args:
        model: the Hugging Face model folder (or hub id) the workspace was deployed from.
        bits: quantization bits; only 8 (int8 KV cache).
        granularity: 'per_tensor' writes the v0.0.2 files (one K and one V scale per layer and
            TP rank); 'per_head' writes them and also per-KV-head scales
            (layers.{i}.past_kv_scale.{tp}.per_head.weight), used by the engine with
            kv_int8_scales = per_head.
        symmetry: True: scale = absmax / 127 (v0.0.2 format, 2 floats); False: min/max scale and
            zero point (v0.0.4 format, 4 floats).
        offload: keep the decoder layers in host memory and move each to the device only for
            its forward (for models larger than the GPU).
        max_seq_len: tokens per calibration sample.
        num_tp: tensor-parallel ranks; must equal the workspace's tensor_para_size (deploy --tp).
        calib_dataset: the calibration text. 'builtin' is the corpus shipped with lmdeploy
            and works offline; a path reads a .txt file, or a .jsonl file with a "text" field
            on each line; c4, ptb, wikitext2 and pileval need the `datasets` library and
            network access.
        calib_samples: number of calibration samples (windows of max_seq_len tokens, seed 0).
        output_dir: where the scale files go: the workspace's triton_models/weights (created if
            missing when it is not a workspace).
        device: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.
        dtype: 'auto' (fp32 on CPU; the checkpoint's fp16/bf16, else fp16, on GPU), 'fp16',
            'bf16' or 'fp32'.
        set_quant_policy: also set quant_policy = 4 and kv_int8_scales (per_tensor or per_head,
            after --granularity) in OUTPUT_DIR/config.ini, which must exist.
    """
    kv_qparams(**locals())


def kv_qparams(model: str, bits: int = 8, granularity: str = 'per_tensor', symmetry: bool = True,
               offload: bool = False, max_seq_len: int = 2048, num_tp: int = 1,
               calib_dataset: str = 'builtin', calib_samples: int = 128,
               output_dir: str = './kv_scales', device: str = 'auto', dtype: str = 'auto',
               set_quant_policy: bool = False, progress: bool = True) -> List[str]:
    """`main` as a function: returns the paths written; raises CliError (one-line message)."""
    from lmdeploy.lite.utils.calib_dataloader import check_calib_dataset
    _check_options(bits, granularity, symmetry, offload, max_seq_len, num_tp, calib_samples,
                   set_quant_policy)
    dataset = check_calib_dataset(calib_dataset)
    workspace = _check_output_dir(output_dir, num_tp, set_quant_policy)
    # The PyTorch chat's model-path, device and dtype rules (and their messages), shared.
    from lmdeploy.hf_checkpoint import check_model_path, config_dtype, pick_device, pick_dtype
    model_path = check_model_path(model)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device, config_dtype(model_path))
    _check_model_shape(model_path, workspace, num_tp, max_seq_len)

    print('Loading calibrate dataset ...', flush=True)
    samples = _load_samples(model_path, dataset, calib_samples, max_seq_len)
    observer = _calibrate(model_path, torch_dtype, samples, torch_device, offload, progress)

    written = _write_scales(observer, output_dir, num_tp, symmetry, granularity)
    if set_quant_policy:
        _enable_int8(output_dir, granularity)
    return written


# ------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(bits, granularity, symmetry, offload, max_seq_len, num_tp, calib_samples,
                   set_quant_policy) -> None:
    if bits != 8 or not _is_int(bits):
        raise UsageError(f'--bits must be 8 (int8 KV cache), got {bits!r}')
    if granularity not in GRANULARITIES:
        raise UsageError(f'--granularity must be per_tensor or per_head, got {granularity!r}')
    for name, value in (('symmetry', symmetry), ('offload', offload), ('set_quant_policy', set_quant_policy)):
        if not isinstance(value, bool):
            raise UsageError(f'--{name} must be True or False, got {value!r}')
    for name, value in (('max_seq_len', max_seq_len), ('num_tp', num_tp), ('calib_samples', calib_samples)):
        if not _is_int(value) or value < 1:
            raise UsageError(f'--{name} must be an integer >= 1, got {value!r}')


def _check_output_dir(output_dir, num_tp: int, set_quant_policy: bool) -> Optional[Dict[str, str]]:
    """The config.ini keys of the workspace weight dir `output_dir`, or None if it has none."""
    from lmdeploy.lite.utils.workspace_config import read_config
    if not isinstance(output_dir, str) or not output_dir:
        raise UsageError(f'--output_dir must be a directory, got {output_dir!r}')
    if osp.exists(output_dir) and not osp.isdir(output_dir):
        raise UsageError(f'--output_dir {output_dir} is not a directory')
    if osp.isfile(osp.join(output_dir, 'triton_models', 'weights', 'config.ini')):
        raise UsageError(f'--output_dir {output_dir} is a workspace; the scales go to its weight dir: '
                         f'--output_dir {osp.join(output_dir, "triton_models", "weights")}')
    config = read_config(osp.join(output_dir, 'config.ini'))
    if config is None:
        if set_quant_policy:
            raise UsageError(f'--set_quant_policy needs a workspace weight dir, and {output_dir} has '
                             f'no config.ini')
        return None
    tp = config.get('tensor_para_size', '1').strip()
    if tp != str(num_tp):
        raise UsageError(f'--num_tp {num_tp} does not match the workspace: {output_dir}/config.ini has '
                         f'tensor_para_size = {tp} (deploy --tp); use --num_tp {tp}')
    return config


def _model_config(model_path: str):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is one line
        raise CliError(f'cannot load the model config from {model_path}: {one_line(e, with_type=True)}',
                       EXIT_ERROR) from None
    return getattr(config, 'text_config', None) or config


def _check_model_shape(model_path: str, workspace: Optional[Dict[str, str]], num_tp: int,
                       max_seq_len: int) -> None:
    """The model against --num_tp and the workspace, as far as its config tells."""
    config = _model_config(model_path)
    heads = getattr(config, 'num_attention_heads', None)
    kv_heads = getattr(config, 'num_key_value_heads', None) or heads
    layers = getattr(config, 'num_hidden_layers', None)
    if kv_heads and kv_heads % num_tp:
        raise UsageError(f'--num_tp {num_tp} does not divide the model\'s {kv_heads} KV heads')
    for key, value in (('num_layer', layers), ('kv_head_num', kv_heads)):
        if workspace and value and key in workspace and workspace[key].strip() != str(value):
            raise UsageError(f'{model_path} does not match the workspace: {value} {key} in the model, '
                             f'{workspace[key].strip()} in its config.ini')
    max_len = getattr(config, 'max_position_embeddings', None)
    if max_len and max_seq_len > max_len:
        print(f'warning: --max_seq_len {max_seq_len} is beyond the model\'s max_position_embeddings '
              f'{max_len}', file=sys.stderr)


def _load_samples(model_path: str, dataset: str, nsamples: int, seqlen: int):
    from lmdeploy.lite.utils.calib_dataloader import get_calib_samples
    from lmdeploy.hf_checkpoint import load_tokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # tokenizing a whole corpus warns about its length
    tokenizer = load_tokenizer(model_path, use_fast=True)
    return get_calib_samples(dataset, tokenizer.encode, nsamples, seqlen, seed=0)


def _calibrate(model_path, torch_dtype, samples, device, offload: bool, progress: bool):
    import torch
    from tqdm import tqdm

    from lmdeploy.lite.quantization.calibration import calibrate
    from lmdeploy.hf_checkpoint import load_model
    hf = load_model(model_path, torch_dtype, trust_remote_code=True)
    bar = functools.partial(tqdm, desc='Calibrating: ', disable=not progress)
    try:
        return calibrate(hf, samples, device, offload=offload, progress=bar)
    except torch.cuda.OutOfMemoryError:
        raise CliError(f'out of memory on {device}; try --offload True or a smaller --max_seq_len',
                       EXIT_ERROR) from None
    except Exception as e:  # noqa: BLE001 - a model that does not run is one line
        raise CliError(f'calibration failed: {one_line(e, with_type=True)}', EXIT_ERROR) from None


def _write_scales(observer, output_dir: str, num_tp: int, symmetry: bool, granularity: str) -> List[str]:
    """The scale files as one set (per-head files of an earlier run dropped), v0.0.2's lines."""
    from lmdeploy.lite.quantization.scale_files import scale_arrays, stale_per_head_files, write_scale_files
    if observer.num_heads % num_tp:
        raise CliError(f'--num_tp {num_tp} does not divide the model\'s {observer.num_heads} KV heads')
    arrays = scale_arrays(observer, num_tp, symmetry, per_head=granularity == 'per_head')
    stale = stale_per_head_files(output_dir, arrays)
    try:
        written = write_scale_files(output_dir, arrays, remove=stale)
    except OSError as e:
        raise CliError(f'cannot write the scale files to {output_dir}: {one_line(e)}', EXIT_ERROR) from None
    what = 'KV scales done.' if symmetry else 'KV scales&zeros done.'
    for layer in range(observer.num_layers):
        for tp in range(num_tp):
            print(f'Layer {layer} TP {tp} {what}')
    if stale:
        print(f'removed {len(stale)} per-head scale files of an earlier calibration')
    kind = 'symmetric' if symmetry else 'asymmetric'
    print(f'wrote {len(written)} {kind} {granularity} scale files ({observer.num_layers} layers x '
          f'TP {num_tp}) to {output_dir}', flush=True)
    return written


def _enable_int8(output_dir: str, granularity: str) -> None:
    from lmdeploy.lite.utils.workspace_config import set_config_keys
    ini = osp.join(output_dir, 'config.ini')
    keys = {'quant_policy': '4', 'kv_int8_scales': granularity}
    try:
        set_config_keys(ini, keys)
    except OSError as e:
        raise CliError(f'cannot update {ini}: {one_line(e)}', EXIT_ERROR) from None
    print(f'{ini}: ' + ', '.join(f'{k} = {v}' for k, v in keys.items()), flush=True)


def cli(argv=None) -> None:
    """Entry point: check the command line, then run fire; Ctrl-C exits with 130."""
    try:
        run_fire(main, argv, name='lmdeploy.lite.apis.kv_qparams',
                 usage='python -m lmdeploy.lite.apis.kv_qparams --model HF_MODEL --output_dir DIR')
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == '__main__':
    cli()
