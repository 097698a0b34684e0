"""Convert an HF or Meta LLaMA-family checkpoint into a TurboMind workspace (LMDeploy v0.0.2's).

    python -m lmdeploy.serve.turbomind.deploy MODEL_NAME MODEL_PATH [MODEL_FORMAT]
        [--tokenizer_path P] [--dst_path ./workspace] [--tp N] [--verbose]

The workspace layout, file names, tensor layouts and config.ini keys are v0.0.2's (see the
behaviour reference, section 3). Deliberate differences from v0.0.2:

* `vocab_size` in config.ini is the number of embedding rows (v0.0.2 wrote the sentencepiece
  vocabulary size, which can be smaller and then not divisible by tp);
* `size_per_head`/`rotary_embedding` come from the checkpoint (v0.0.2 hard-coded 128, also in
  the q/k permutation), so any even head size converts;
* `rope_theta` is written (after `rotary_embedding`) when the checkpoint's base is not 10000;
* safetensors (sharded via index or not) is read as well as `.bin`; bf16/fp32 become fp16;
* memory stays bounded: HF shards are streamed one at a time and each output file is written
  as soon as its inputs have been read; Meta shards are memory-mapped;
* q/k/v/o biases that are partly absent (e.g. q/k/v biases without an o bias) are written
  as zeros, so `attn_bias=1` always comes with every bias file;
* a tied LM head (`tie_word_embeddings` with no `lm_head.weight`) is taken from the embedding;
* every bad input fails before anything is written, with a one-line error and exit code 255;
  the workspace is built in a temporary directory beside `dst_path` and moved into place only
  on success, so a failed run leaves no partial workspace and never touches an existing one;
* progress bar instead of per-tensor prints (`--verbose` brings those back) and a summary.

Modules: this one is the command line and the order of the steps; `sources` reads and checks
the checkpoint (HF or Meta) through `checkpoint`; `export` holds the tensor layout transforms and
the `Writer` of the weight files; `workspace` builds everything around the weights; `common`
has what they share (DeployError, ModelInfo, the canonical tensor names and shapes).
"""
import os.path as osp
import sys
import time
from dataclasses import dataclass
from typing import Optional

from lmdeploy.serve.turbomind.checkpoint import one_line
from lmdeploy.serve.turbomind.common import DeployError, ModelInfo
from lmdeploy.serve.turbomind.export import Fused, Job, Writer, build_jobs, merge_qkv_rank
from lmdeploy.serve.turbomind.sources import HFSource, MetaSource
from lmdeploy.serve.turbomind.workspace import (atomic_dir, config_ini, copy_templates,
                                                copy_tokenizer, finish_workspace, inside,
                                                tokenizer_info, write_config_ini)

__all__ = ['deploy', 'main', 'DeployError', 'Summary', 'ModelInfo', 'HFSource', 'MetaSource',
           'Writer', 'Job', 'Fused', 'build_jobs', 'merge_qkv_rank', 'SUPPORTED_FORMATS']

SUPPORTED_FORMATS = ['llama', 'hf']


@dataclass
class Summary:
    dst_path: str
    model_name: str
    model_format: str
    info: ModelInfo
    tp: int
    nbytes: int
    nfiles: int
    seconds: float

    def __str__(self):
        i = self.info
        return (f'workspace {self.dst_path} is ready: model {self.model_name} '
                f'({self.model_format}), {i.num_layer} layers, {i.head_num} heads x '
                f'{i.size_per_head} ({i.kv_head_num} kv), vocab {i.vocab_size}, tp={self.tp}, '
                f'{self.nfiles} weight files, {self.nbytes / 2**20:.1f} MiB, '
                f'{self.seconds:.1f} s')


def deploy(model_name: str, model_path: str, model_format: str = 'hf',
           tokenizer_path: Optional[str] = None, dst_path: str = './workspace', tp: int = 1,
           verbose: bool = False) -> Summary:
    """Convert; raises DeployError (one line) on bad input. See `main` for the arguments."""
    start = time.time()
    from lmdeploy.model import UnknownModelError, get_template
    try:
        template = get_template(str(model_name))
    except UnknownModelError as e:
        raise DeployError(str(e)) from None
    if model_format not in SUPPORTED_FORMATS:
        raise DeployError(f'the model format "{model_format}" is not supported. '
                          f'The supported format are: {SUPPORTED_FORMATS}')
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise DeployError(f'--tp must be a positive integer, got {tp!r}')
    model_path = str(model_path)
    if not osp.isdir(model_path):
        raise DeployError(f'model path {model_path} does not exist or is not a directory')
    if model_format == 'llama' and tokenizer_path is None:
        raise DeployError('the model is llama (Meta format): its tokenizer model path should be '
                          'specified with --tokenizer_path')
    if tokenizer_path is None:
        tokenizer_path = osp.join(model_path, 'tokenizer.model')
    tokenizer_path = str(tokenizer_path)
    if not osp.isfile(tokenizer_path):
        raise DeployError(f'tokenizer model {tokenizer_path} does not exist')
    dst_path = str(dst_path)
    if osp.lexists(dst_path) and not osp.isdir(dst_path):
        raise DeployError(f'dst_path {dst_path} exists and is not a directory')
    for src in (model_path, tokenizer_path):
        if inside(src, dst_path):
            raise DeployError(f'dst_path {dst_path} would replace the source {src}')

    source = HFSource(model_path) if model_format == 'hf' else MetaSource(model_path)
    try:
        info = check_model(source, tp)
        sp_vocab, bos, eos = tokenizer_info(tokenizer_path)
        if sp_vocab > info.vocab_size:
            raise DeployError(f'the tokenizer has {sp_vocab} tokens but the embedding only '
                              f'{info.vocab_size} rows')
        # Everything is checked: build the workspace in a temporary folder, then move it in.
        try:
            with atomic_dir(dst_path) as tmp:
                tm = copy_templates(tmp)
                copy_tokenizer(tm, model_format, model_path, tokenizer_path)
                weights = osp.join(tm, 'weights')
                with Writer(weights, verbose=verbose) as writer:
                    convert_weights(source, writer, tp)
                write_config_ini(weights, config_ini(model_name, info, tp,
                                                     template.session_len + 8, bos, eos))
                finish_workspace(tmp, tp, model_name)
        except OSError as e:
            raise DeployError(f'cannot write the workspace: {one_line(e)}') from None
    finally:
        source.close()
    return Summary(dst_path, model_name, model_format, info, tp, writer.nbytes, writer.nfiles,
                   time.time() - start)


def check_model(source, tp: int) -> ModelInfo:
    """The model's attention shape, every tensor (name and shape) and the tp split."""
    info: ModelInfo = source.info
    if info.head_num <= 0 or info.size_per_head <= 0 or info.size_per_head % 2:
        raise DeployError(f'unsupported attention shape: hidden {info.hidden}, '
                          f'{info.head_num} heads, head size {info.size_per_head}')
    if info.kv_head_num <= 0 or info.head_num % info.kv_head_num:
        raise DeployError(f'{info.head_num} heads is not a multiple of {info.kv_head_num} kv heads')
    source.validate()
    for what, n in (('attention heads', info.head_num), ('kv heads', info.kv_head_num),
                    ('inter_size', info.inter_size), ('vocab size (embedding rows)',
                                                      info.vocab_size)):
        if n % tp:
            raise DeployError(f'tp={tp} does not divide the {what} ({n})')
    return info


def convert_weights(source, writer: Writer, tp: int):
    """Read the checkpoint and write every weight file, with a progress bar."""
    from tqdm import tqdm
    jobs = build_jobs(source.info, tp, writer, source.extra)
    with tqdm(total=source.num_inputs(), unit='tensor', desc='converting', disable=None,
              leave=False) as bar:
        source.run(jobs, bar)


def main(model_name: str, model_path: str, model_format: str = 'hf',
         tokenizer_path: str = None, dst_path: str = './workspace', tp: int = 1,
         verbose: bool = False):
    """Convert a LLaMA-family checkpoint into a TurboMind workspace.

    The workspace holds the Triton model repository, config.ini and the weights as raw fp16
    files split for `tp` GPUs. An existing workspace at dst_path is replaced, but only once the
    conversion has succeeded. Bad input stops with a one-line error and exit code 255.

    Args:
        model_name: chat-template name, stored in config.ini; it selects the prompt template,
            stop words and session_len (e.g. llama, llama2, vicuna, internlm-chat-7b,
            baichuan-7b; an unknown name lists all).
        model_path: directory of the source checkpoint: HF (config.json + *.safetensors or
            *.bin, sharded or not) or Meta (params.json + consolidated.XX.pth).
        model_format: 'hf' (HuggingFace, default) or 'llama' (Meta's original format).
        tokenizer_path: sentencepiece tokenizer.model. Default for hf:
            MODEL_PATH/tokenizer.model; required for llama.
        dst_path: output workspace directory (default ./workspace).
        tp: tensor-parallel degree; must divide the heads, KV heads, FFN size and vocab.
        verbose: print every file written with its shape (v0.0.2 style).
    """
    try:
        summary = deploy(model_name, model_path, model_format, tokenizer_path, dst_path, tp,
                         verbose)
    except DeployError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(255)
    print(summary)


if __name__ == '__main__':
    import fire
    fire.Fire(main)
