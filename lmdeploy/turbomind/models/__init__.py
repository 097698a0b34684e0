"""Model forwards over the flat batch. Every workspace deploy writes is a Llama-family model
(InternLM, Llama 1/2/3, Vicuna, Baichuan, ...), so there is one: `LlamaModel`."""
from .llama import LlamaModel


def build_model(cfg, weights, kernels, all_reduce=None, all_gather=None):
    return LlamaModel(cfg, weights, kernels, all_reduce=all_reduce, all_gather=all_gather)


__all__ = ['LlamaModel', 'build_model']
