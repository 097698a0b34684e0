"""Model forwards over the flat batch. Every workspace deploy writes is a Llama-family model
(InternLM, Llama 1/2/3, Vicuna, Baichuan, ...), so there is one: `LlamaModel`."""
from .llama import LlamaModel


def build_model(cfg, weights, kernels, comm=None):
    return LlamaModel(cfg, weights, kernels, comm=comm)


__all__ = ['LlamaModel', 'build_model']
