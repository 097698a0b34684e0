"""Helpers of the Triton clients (behaviour reference 9.3): tensors, the `preprocessing` and
`postprocessing` models as callables, and the `service.ft` logger."""
from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np

from lmdeploy.console import log_to_stderr

LOGGER_NAME = 'service.ft'


def get_logger(name: str = LOGGER_NAME, log_level: Union[int, str] = logging.INFO) -> logging.Logger:
    """A logger writing `[name] LEVEL: message` lines to stderr."""
    logger = logging.getLogger(name)
    if isinstance(log_level, str):
        log_level = logging.getLevelName(log_level.upper())
        if not isinstance(log_level, int):
            log_level = logging.WARNING
    return log_to_stderr(logger, log_level, '[%(name)s] %(levelname)s: %(message)s')


def prepare_tensor(name: str, value) -> 'object':
    """A tritonclient gRPC InferInput named `name` holding the numpy array `value`."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype
    value = np.asarray(value)
    tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    tensor.set_data_from_numpy(value)
    return tensor


def _client(addr_or_client):
    if isinstance(addr_or_client, str):
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(addr_or_client), True
    return addr_or_client, False


class Preprocessor:
    """`Preprocessor(addr)(prompts) -> (INPUT_ID [B, L] uint32, REQUEST_INPUT_LEN [B, 1])`
    through the server's `preprocessing` model (the workspace tokenizer; `<BOS>`/`<EOS>`
    markers work)."""

    def __init__(self, tritonserver_addr: str, model_name: str = 'preprocessing'):
        self.tritonserver_addr = tritonserver_addr
        self.model_name = model_name
        self.client, _ = _client(tritonserver_addr)

    def __call__(self, prompts: Union[str, Sequence[str]]):
        if isinstance(prompts, str):
            prompts = [prompts]
        query = np.array([[p.encode('utf-8')] for p in prompts], dtype=object)
        out_len = np.ones((len(prompts), 1), dtype=np.uint32)
        result = self.client.infer(self.model_name, [prepare_tensor('QUERY', query),
                                                     prepare_tensor('REQUEST_OUTPUT_LEN', out_len)])
        return result.as_numpy('INPUT_ID'), result.as_numpy('REQUEST_INPUT_LEN')

    def close(self):
        self.client.close()


class Postprocessor:
    """`Postprocessor(addr)(ids [B, beams, L], lengths [B, beams]) -> OUTPUT` (an array of
    UTF-8 bytes) through the server's `postprocessing` model; `decode(ids)` gives one str."""

    def __init__(self, tritonserver_addr: str, model_name: str = 'postprocessing'):
        self.tritonserver_addr = tritonserver_addr
        self.model_name = model_name
        self.client, _ = _client(tritonserver_addr)

    def __call__(self, output_ids, seqlen):
        ids = np.asarray(output_ids, dtype=np.uint32)
        lengths = np.asarray(seqlen, dtype=np.uint32)
        result = self.client.infer(self.model_name, [prepare_tensor('TOKENS_BATCH', ids),
                                                     prepare_tensor('sequence_length', lengths)])
        return result.as_numpy('OUTPUT')

    def decode(self, ids) -> str:
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, 'tolist') else ids)]
        if not ids:
            return ''
        out = self(np.array([[ids]], dtype=np.uint32), np.array([[len(ids)]], dtype=np.uint32))
        return out.reshape(-1)[0].decode('utf-8')

    def close(self):
        self.client.close()
