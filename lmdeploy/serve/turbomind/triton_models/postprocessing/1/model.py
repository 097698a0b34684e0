"""Triton python-backend model ``postprocessing``: token ids -> text.

Served as ``model_repository/postprocessing``. For every request it reads

- ``TOKENS_BATCH`` (UINT32 ``[batch, beams, max_len]``): the ``output_ids`` the turbomind
  model streamed back (or any slice of them);
- ``sequence_length`` (UINT32 ``[batch, beams]``): how many ids of each row are valid,

and answers ``OUTPUT``: the UTF-8 bytes of ``decode(ids[:length])``, one item per beam, in
batch-major order (``[batch * beams]``; for the usual one request with one beam that is a
single-element array, so clients read ``OUTPUT[0].decode()`` as with LMDeploy v0.0.2).
The HF tokenizer backend skips special tokens while decoding.

Decoding uses the workspace tokenizer (``1/tokenizer`` -> ``triton_models/tokenizer``, made by
deploy). ``triton_python_backend_utils`` exists only inside a Triton server, so it is imported
lazily; the decoding itself lives in plain functions (``load_tokenizer``, ``decode_tokens``)
that run without Triton.
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
    """The ``Tokenizer`` class of ``<folder>/tokenizer.py`` (the workspace copy), loaded by
    file path; falls back to the installed ``lmdeploy`` when the folder has none."""
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
    """Build the workspace Tokenizer from the ``tokenizer_path`` parameter (a
    ``tokenizer.model`` file or a folder, relative to ``model_dir`` unless absolute)."""
    path = tokenizer_path if osp.isabs(tokenizer_path) else osp.join(model_dir, tokenizer_path)
    folder = path if osp.isdir(path) else osp.dirname(path)
    if not osp.isdir(folder):
        raise FileNotFoundError(f'tokenizer folder {folder} does not exist')
    return _tokenizer_class(folder)(path)


def decode_tokens(tokenizer, tokens_batch, sequence_length):
    """Decode every beam of every batch row.

    ``tokens_batch``: ``[batch, beams, max_len]`` (``[batch, max_len]`` is taken as one beam);
    ``sequence_length``: ``[batch, beams]`` (or ``[batch]``). Returns an object array of
    UTF-8 ``bytes``, shape ``[batch * beams]``.
    """
    tokens = np.asarray(tokens_batch)
    lengths = np.asarray(sequence_length)
    if tokens.ndim == 2:
        tokens = tokens[:, None, :]
    if tokens.ndim != 3:
        raise ValueError('TOKENS_BATCH must be [batch, beams, len], '
                         f'got shape {list(tokens.shape)}')
    lengths = lengths.reshape(tokens.shape[0], -1)
    if lengths.shape[1] != tokens.shape[1]:
        raise ValueError(f'sequence_length shape {list(np.shape(sequence_length))} does not '
                         f'match TOKENS_BATCH shape {list(tokens.shape)}')
    outputs = []
    for beam_tokens, beam_lengths in zip(tokens, lengths):
        for ids, n in zip(beam_tokens, beam_lengths):
            n = max(0, min(int(n), ids.shape[0]))
            text = tokenizer.decode([int(t) for t in ids[:n]])
            outputs.append(text.encode('utf-8'))
    result = np.empty(len(outputs), dtype=object)
    result[:] = outputs
    return result


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
                tokens = pb_utils.get_input_tensor_by_name(request, 'TOKENS_BATCH').as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request,
                                                            'sequence_length').as_numpy()
                text = decode_tokens(self.tokenizer, tokens, lengths)
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor('OUTPUT', text)]))
            except Exception as e:  # noqa: BLE001 - reported to the client
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[],
                        error=pb_utils.TritonError(f'postprocessing failed: {e}')))
        return responses

    def finalize(self):
        self.tokenizer = None
