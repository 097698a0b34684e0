"""Triton python-backend model ``preprocessing``: prompt text -> token ids.

Served as ``model_repository/preprocessing``. For every request it reads

- ``QUERY`` (STRING, shape ``[batch, 1]``): the prompt, already templated by the client;
- ``REQUEST_OUTPUT_LEN`` (UINT32): passed through untouched;
- ``BAD_WORDS_DICT`` / ``STOP_WORDS_DICT`` (optional): accepted and ignored, as in LMDeploy
  v0.0.2,

and answers ``INPUT_ID`` (UINT32 ``[batch, max_len]``, short rows padded with the EOS id),
``REQUEST_INPUT_LEN`` (UINT32 ``[batch, 1]``) and ``REQUEST_OUTPUT_LEN``.

Text is encoded with the workspace tokenizer: ``1/tokenizer`` is a symlink that deploy makes
to ``triton_models/tokenizer``, which holds ``tokenizer.model`` (and, for HF checkpoints, the
HF tokenizer files) plus a copy of ``lmdeploy/turbomind/tokenizer.py``. ``encode`` keeps the
``<BOS>`` / ``<EOS>`` markers of the chat templates working.

``triton_python_backend_utils`` exists only inside a Triton server, so it is imported lazily;
the tokenizing itself lives in plain functions (``load_tokenizer``, ``encode_queries``,
``preprocess``) that run without Triton.
"""
import importlib.util
import json
import os.path as osp
import sys

import numpy as np

HERE = osp.dirname(osp.abspath(__file__))
DEFAULT_TOKENIZER_PATH = 'tokenizer/tokenizer.model'


def _pb_utils():
    import triton_python_backend_utils as pb_utils  # only present inside tritonserver
    return pb_utils


def _tokenizer_class(folder: str):
    """The ``Tokenizer`` class of ``<folder>/tokenizer.py`` (the workspace copy).

    Loaded by file path, so it works whether or not Triton imports this file as part of a
    package. Falls back to the installed ``lmdeploy`` when the folder has no tokenizer.py.
    """
    src = osp.join(folder, 'tokenizer.py')
    if osp.isfile(src):
        name = '_lmdeploy_workspace_tokenizer_' + str(abs(hash(osp.realpath(src))))
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, src)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        return module.Tokenizer
    try:
        from lmdeploy.turbomind.tokenizer import Tokenizer
    except ImportError as e:
        raise FileNotFoundError(
            f'no tokenizer.py in {folder} and lmdeploy is not importable ({e}); '
            'was the workspace made by lmdeploy.serve.turbomind.deploy?') from None
    return Tokenizer


def load_tokenizer(tokenizer_path: str = DEFAULT_TOKENIZER_PATH, model_dir: str = HERE):
    """Build the workspace Tokenizer.

    ``tokenizer_path`` is the ``tokenizer_path`` parameter of config.pbtxt: a
    ``tokenizer.model`` file or a tokenizer folder, relative to ``model_dir`` (this model's
    version directory) unless absolute.
    """
    path = tokenizer_path if osp.isabs(tokenizer_path) else osp.join(model_dir, tokenizer_path)
    folder = path if osp.isdir(path) else osp.dirname(path)
    if not osp.isdir(folder):
        raise FileNotFoundError(f'tokenizer folder {folder} does not exist')
    return _tokenizer_class(folder)(path)


def _as_text(item) -> str:
    if isinstance(item, (bytes, bytearray, np.bytes_)):
        return bytes(item).decode('utf-8')
    if isinstance(item, str):
        return item
    raise TypeError(f'QUERY items must be strings, got {type(item).__name__}')


def encode_queries(tokenizer, queries):
    """Encode a batch of prompts.

    ``queries``: one string (bytes or str) per batch row, shaped ``[batch]`` or
    ``[batch, 1]``. Returns ``(input_ids, input_lengths)``: UINT32 arrays of shape
    ``[batch, max_len]`` (padded with ``tokenizer.eos_token_id``) and ``[batch, 1]``.
    """
    arr = np.asarray(queries, dtype=object)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[1] != 1:
        raise ValueError(f'QUERY must hold one string per batch row, got shape {list(arr.shape)}')
    ids = [list(tokenizer.encode(_as_text(row[0]))) for row in arr]
    lengths = np.array([[len(x)] for x in ids], dtype=np.uint32).reshape(-1, 1)
    width = max((len(x) for x in ids), default=0)
    pad = int(tokenizer.eos_token_id)
    input_ids = np.full((len(ids), width), pad, dtype=np.uint32)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = x
    return input_ids, lengths


def preprocess(tokenizer, queries, request_output_len):
    """All outputs of one request, by Triton tensor name."""
    input_ids, lengths = encode_queries(tokenizer, queries)
    return {
        'INPUT_ID': input_ids,
        'REQUEST_INPUT_LEN': lengths,
        'REQUEST_OUTPUT_LEN': np.asarray(request_output_len, dtype=np.uint32),
    }


def _model_dir(args) -> str:
    repo, version = args.get('model_repository'), args.get('model_version')
    if repo and version:
        candidate = osp.join(repo, str(version))
        if osp.isdir(candidate):
            return candidate
    return HERE


class TritonPythonModel:
    """Entry point the Triton python backend instantiates."""

    def initialize(self, args):
        self.model_config = json.loads(args['model_config'])
        params = self.model_config.get('parameters') or {}
        tokenizer_path = (params.get('tokenizer_path') or {}).get('string_value') \
            or DEFAULT_TOKENIZER_PATH
        self.tokenizer = load_tokenizer(tokenizer_path, _model_dir(args))

    def execute(self, requests):
        pb_utils = _pb_utils()
        responses = []
        for request in requests:
            # A bad request gets an error response of its own; the others still run.
            try:
                query = pb_utils.get_input_tensor_by_name(request, 'QUERY').as_numpy()
                out_len = pb_utils.get_input_tensor_by_name(request,
                                                            'REQUEST_OUTPUT_LEN').as_numpy()
                outputs = preprocess(self.tokenizer, query, out_len)
                tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:  # noqa: BLE001 - reported to the client
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(f'preprocessing failed: {e}')))
        return responses

    def finalize(self):
        self.tokenizer = None

