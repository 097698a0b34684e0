"""Chat in the terminal with a Hugging Face checkpoint on plain PyTorch (transformers).

    python -m lmdeploy.pytorch.chat MODEL_PATH [--tokenizer_path PATH] [--model_name NAME]
        [--max_new_tokens 64] [--temperature 0.8] [--top_p 0.95] [--top_k 0] [--seed 0]
        [--repetition_penalty 1.0] [--device auto|cpu|cuda] [--dtype auto|fp16|bf16|fp32]
        [--use_fast_tokenizer True] [--trust_remote_code True]

    deepspeed --module --num_gpus 2 lmdeploy.pytorch.chat MODEL_PATH ...   # tensor parallel
    torchrun --nproc_per_node 2 -m lmdeploy.pytorch.chat MODEL_PATH ...     # the same

At the prompt (`double enter to end input >>>`) type lines and an empty line to send them.
`exit` quits, `end` starts a new conversation, `config set key=value ...` changes a sampling
setting (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed), `config` shows them.
"""

import os
import os.path as osp
import sys
from typing import List, Optional, Sequence

from lmdeploy.console import EXIT_INTERRUPTED, CliError, fail, read_prompt, run_fire
from lmdeploy.hf_checkpoint import (DTYPES, check_model_path, config_dtype, load_model,
                                    load_tokenizer, pick_device, pick_dtype)

from .parallel import Ranks

USAGE = 'python -m lmdeploy.pytorch.chat MODEL_PATH [--flags]'

# Templates meant for chat fine-tunes only: a name match needs 'chat' or 'instruct' too.
_CHAT_ONLY = ('llama2', 'llama3')


def main(model_path: str,
         tokenizer_path: Optional[str] = None,
         max_new_tokens: int = 64,
         temperature: float = 0.8,
         top_p: float = 0.95,
         seed: int = 0,
         use_fast_tokenizer: bool = True,
         model_name: Optional[str] = None,
         top_k: int = 0,
         repetition_penalty: float = 1.0,
         device: str = 'auto',
         dtype: str = 'auto',
         trust_remote_code: bool = True,
         temperture: Optional[float] = None):
    """Chat with a Hugging Face causal LM in the terminal.

    Args:
        model_path: Hugging Face model folder (config.json and weights) or hub id.
        tokenizer_path: tokenizer folder or `tokenizer.model` file; default model_path.
        max_new_tokens: the most tokens a reply may have.
        temperature: sampling temperature; 0 is greedy decoding.
        top_p: nucleus sampling threshold in (0, 1].
        seed: random seed of the sampler.
        use_fast_tokenizer: False asks transformers for a slow tokenizer (HF tokenizers only).
        model_name: chat template name from lmdeploy.model; default: the tokenizer config's
            chat_template if any, else a name found in the model path, else 'llama' (no template).
        top_k: sample from the k most likely tokens (0: off, 1: greedy).
        repetition_penalty: > 1 discourages tokens already in the conversation.
        device: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.
        dtype: 'auto' (fp32 on CPU; the checkpoint's fp16/bf16, else fp16, on GPU), 'fp16',
            'bf16' or 'fp32'.
        trust_remote_code: allow custom model code shipped with the checkpoint.
        temperture: alias of temperature (the spelling in LMDeploy v0.0.2's README).
    """
    try:
        code = _run(**locals())
    except CliError as e:
        fail(str(e), e.code)
    except KeyboardInterrupt:
        print('', flush=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


# ------------------------------------------------------------------------------------------


def _resolve_settings(args: dict):
    from .session import ConfigError, GenerationSettings, check_setting
    temperature = args['temperature']
    if args['temperture'] is not None:
        if temperature != 0.8 and temperature != args['temperture']:
            raise CliError('--temperture is an alias of --temperature; give only one of them')
        temperature = args['temperture']
    values = dict(max_new_tokens=args['max_new_tokens'], temperature=temperature, top_p=args['top_p'],
                  top_k=args['top_k'], repetition_penalty=args['repetition_penalty'], seed=args['seed'])
    try:
        return GenerationSettings(**{k: check_setting(k, v) for k, v in values.items()})
    except ConfigError as e:
        raise CliError(f'--{e}') from None


def detect_model_name(model_path: str, config=None) -> Optional[str]:
    """The registered template whose name appears in the model's path or hub name, if any."""
    from lmdeploy.model import MODELS
    texts = [osp.basename(osp.normpath(osp.abspath(model_path))) if osp.exists(model_path) else model_path]
    name_or_path = getattr(config, '_name_or_path', None) or getattr(config, 'name_or_path', None)
    if name_or_path:
        texts.append(str(name_or_path))

    def squash(s: str) -> str:
        return s.lower().replace('-', '').replace('_', '').replace('.', '')

    for text in texts:
        flat = squash(osp.basename(text.rstrip('/')) or text)
        for name in sorted(MODELS.names(), key=len, reverse=True):
            if squash(name) in flat:
                if name in _CHAT_ONLY and 'chat' not in flat and 'instruct' not in flat:
                    continue
                return name
    model_type = getattr(config, 'model_type', None)
    if model_type and model_type != 'llama' and model_type in MODELS:
        return model_type
    return None


def _tokenizer_size(tokenizer) -> Optional[int]:
    """How many ids the tokenizer can decode (HF: with its added tokens)."""
    try:
        if tokenizer.backend == 'hf':
            return len(tokenizer.model.model)
        return int(tokenizer.vocab_size)
    except Exception:  # noqa: BLE001 - no limit rather than no chat
        return None


def _stop_ids(tokenizer, model, conversation) -> List[int]:
    ids = set(conversation.stop_ids())
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, 'generation_config', None)
    eos = getattr(gen_cfg, 'eos_token_id', None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def _conversation(args: dict, tokenizer, config):
    from lmdeploy.model import UnknownModelError, get_template

    from .session import HFTemplateConversation, RegistryConversation
    name = args['model_name']
    if name is not None:
        try:
            return RegistryConversation(get_template(str(name)), tokenizer, str(name)), '--model_name'
        except UnknownModelError as e:
            raise CliError(f'--model_name: {e}') from None
    hf = getattr(tokenizer.model, 'model', None) if tokenizer.backend == 'hf' else None
    if getattr(hf, 'chat_template', None):
        return HFTemplateConversation(hf), 'from the tokenizer config'
    detected = detect_model_name(args['model_path'], config)
    if detected:
        return RegistryConversation(get_template(detected), tokenizer, detected), 'detected from the model'
    return RegistryConversation(get_template('llama'), tokenizer, 'llama'), 'default: no template'


def _setup_ranks(device_type: str) -> Ranks:
    from . import parallel
    ranks = parallel.ranks_from_env()
    if ranks.world_size == 1:
        return ranks
    if not parallel.deepspeed_available():
        if ranks.rank != 0:
            sys.exit(0)  # rank 0 runs the whole model alone
        parallel.notice(f'deepspeed is not installed: running one process on the whole model '
                        f'instead of {ranks.world_size}-way tensor parallelism '
                        f'(pip install -r requirements/deepspeed.txt)')
        return Ranks()
    parallel.init_process_group(ranks, device_type)
    return ranks


def _run(**args) -> int:
    settings = _resolve_settings(args)
    model_path = check_model_path(args['model_path'])
    tokenizer_path = args['tokenizer_path'] if args['tokenizer_path'] is not None else model_path
    tokenizer_path = osp.expanduser(str(tokenizer_path))
    if not osp.exists(tokenizer_path):
        raise CliError(f'tokenizer path not found: {tokenizer_path}')
    if args['model_name'] is not None:
        from lmdeploy.model import MODELS
        if str(args['model_name']) not in MODELS:
            raise CliError(f'--model_name: unknown chat template {args["model_name"]!r}; known: '
                           + ', '.join(MODELS.names()))
    if str(args['dtype']).strip().lower() not in DTYPES and str(args['dtype']).strip().lower() != 'auto':
        raise CliError(f"--dtype must be one of auto, fp16, bf16, fp32, got {args['dtype']!r}")

    import torch
    device = pick_device(args['device'])
    torch_dtype = pick_dtype(args['dtype'], device, config_dtype(model_path) if osp.isdir(model_path) else None)
    ranks = _setup_ranks(device.type)
    if ranks.distributed and device.type == 'cuda':
        device = torch.device('cuda', ranks.local_rank)
    torch.manual_seed(settings.seed)

    from . import parallel
    from .session import ChatSession
    tokenizer = load_tokenizer(tokenizer_path, bool(args['use_fast_tokenizer']))
    model = load_model(model_path, torch_dtype, args['trust_remote_code'])
    conversation, source = _conversation(args, tokenizer, model.config)
    if ranks.distributed:
        # Shard while the weights are still in host memory: no GPU ever holds the whole model.
        model = parallel.shard_model(model, ranks, torch_dtype)
    model = model.to(device)
    max_length = getattr(model.config, 'max_position_embeddings', None)
    session = ChatSession(model, tokenizer, conversation, _stop_ids(tokenizer, model, conversation), settings,
                          max_length=max_length, sync_token=parallel.token_syncer(ranks, device),
                          vocab_limit=_tokenizer_size(tokenizer))
    say = _printer(ranks)
    dtype_name = str(torch_dtype).replace('torch.', '')
    say(f'chat template: {conversation.describe()} ({source}); device {device}, {dtype_name}, '
        f'tensor parallel {ranks.world_size}')
    try:
        return _loop(session, ranks, say)
    finally:
        parallel.shutdown(ranks)


def _printer(ranks: Ranks):
    def say(text: str = '', end: str = '\n') -> None:
        if ranks.is_main:
            print(text, end=end, flush=True)
    return say


def _loop(session, ranks: Ranks, say) -> int:
    from . import parallel
    from .session import ConfigError, ContextFull, parse_config_set
    while True:
        text = read_prompt() if ranks.is_main else None
        if ranks.is_main and text is None:
            say()  # end of input: leave the terminal on a fresh line
            text = 'exit'
        text = parallel.broadcast_text(text, ranks)
        if text is None:
            text = 'exit'
        command = text.strip()
        if command == 'exit':
            return 0
        if command == 'end':
            session.reset()
            say('(new conversation)')
            continue
        if not command:
            continue
        if command in ('config', 'config show'):
            say(session.settings.describe())
            continue
        if command == 'config set' or command.startswith(('config set ', 'config set\t')):
            try:
                lines = session.apply(parse_config_set(command[len('config set'):]))
            except ConfigError as e:
                say(f'error: config set: {e}')
                continue
            for line in lines:
                say(line)
            continue
        try:
            for delta in session.chat(text):
                say(delta, end='')
        except ContextFull as e:
            say(f'error: {e}')
            continue
        say()


def _take_launcher_rank(argv: List[str]) -> List[str]:
    """Drop the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK says the same)."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.replace('-', '_') == '__local_rank' and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.replace('-', '_').startswith('__local_rank='):
            value, i = arg.split('=', 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        os.environ.setdefault('LOCAL_RANK', value)
    return out


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point: check the flags, then hand the command line to fire."""
    argv = _take_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    run_fire(main, argv, name='lmdeploy.pytorch.chat', usage=USAGE)


if __name__ == '__main__':
    cli()
