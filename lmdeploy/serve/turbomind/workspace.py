"""The workspace around the weights: the Triton model tree copied from the templates, the
tokenizer files, `weights/config.ini`, the config.pbtxt parameters, the relative symlinks,
`service_docker_up.sh` and the atomic build (a temporary folder moved into place on success).
"""
import configparser
import os
import os.path as osp
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, Tuple

from lmdeploy.serve.turbomind.checkpoint import one_line
from lmdeploy.serve.turbomind.common import DEFAULT_ROPE_THETA, DeployError, ModelInfo

_HERE = osp.dirname(osp.abspath(__file__))
TEMPLATE_DIR = osp.join(_HERE, 'triton_models')
DOCKER_SCRIPT = osp.join(_HERE, 'service_docker_up.sh')
SERVICE_SCRIPT = osp.join(_HERE, 'service_up.sh')  # the docker-free launcher's wrapper
TOKENIZER_PY = osp.normpath(osp.join(osp.dirname(_HERE), '..', 'turbomind', 'tokenizer.py'))

# Engine parameters v0.0.2 writes into config.ini, in its order (after the model keys).
ENGINE_DEFAULTS = (
    ('max_batch_size', 32),
    ('max_context_token_num', 4),
    ('session_len', None),  # template.session_len + 8
    ('step_length', 1),
    ('cache_max_entry_count', 48),
    ('cache_chunk_size', 1),
    ('use_context_fmha', 1),
    ('quant_policy', 0),
)

SYMLINKS = (  # (link, target) relative to the workspace
    ('triton_models/preprocessing/1/tokenizer', '../../tokenizer'),
    ('triton_models/postprocessing/1/tokenizer', '../../tokenizer'),
    ('triton_models/interactive/1/weights', '../../weights'),
    ('model_repository/turbomind', '../triton_models/interactive'),
    ('model_repository/preprocessing', '../triton_models/preprocessing'),
    ('model_repository/postprocessing', '../triton_models/postprocessing'),
)


def tokenizer_info(path: str) -> Tuple[int, int, int]:
    """(vocab size, bos id, eos id) of a sentencepiece model."""
    from sentencepiece import SentencePieceProcessor
    try:
        sp = SentencePieceProcessor(model_file=path)
    except Exception as e:
        raise DeployError(f'cannot load tokenizer model {path}: {one_line(e)}') from None
    return sp.vocab_size(), sp.bos_id(), sp.eos_id()


def config_ini(model_name: str, info: ModelInfo, tp: int, session_len: int, bos: int,
               eos: int) -> configparser.ConfigParser:
    keys = [('model_name', model_name), ('head_num', info.head_num),
            ('kv_head_num', info.kv_head_num), ('size_per_head', info.size_per_head),
            ('vocab_size', info.vocab_size), ('num_layer', info.num_layer),
            ('rotary_embedding', info.size_per_head)]
    if info.rope_theta != DEFAULT_ROPE_THETA:
        keys.append(('rope_theta', info.rope_theta))
    keys += [('inter_size', info.inter_size), ('norm_eps', info.norm_eps),
             ('attn_bias', int(info.attn_bias)), ('start_id', bos), ('end_id', eos),
             ('weight_type', 'fp16')]
    keys += [(k, session_len if k == 'session_len' else v) for k, v in ENGINE_DEFAULTS]
    keys.append(('tensor_para_size', tp))
    cfg = configparser.ConfigParser()
    cfg['llama'] = {k: str(v) for k, v in keys}
    return cfg


def write_config_ini(weights_dir: str, cfg: configparser.ConfigParser):
    with open(osp.join(weights_dir, 'config.ini'), 'w') as f:
        cfg.write(f)


def pbtxt_parameters(tp: int, model_name: str) -> str:
    """The two `parameters` blocks v0.0.2 appends to interactive/config.pbtxt."""
    out = ''
    for key, value in (('tensor_para_size', tp), ('model_name', model_name)):
        out += (f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n'
                f'  }}\n}}\n')
    return out


def _link(ws: str, link: str, target: str):
    path = osp.join(ws, link)
    if osp.islink(path) or osp.isfile(path):
        os.unlink(path)
    elif osp.isdir(path):
        shutil.rmtree(path)
    os.makedirs(osp.dirname(path), exist_ok=True)
    os.symlink(target, path)


def copy_templates(ws: str) -> str:
    """The Triton model templates and the service script into `ws`; returns triton_models/."""
    if not osp.isdir(TEMPLATE_DIR):
        raise DeployError(f'triton model templates not found: {TEMPLATE_DIR} '
                          '(broken installation)')
    if not osp.isfile(DOCKER_SCRIPT):
        raise DeployError(f'service script not found: {DOCKER_SCRIPT} (broken installation)')
    tm = osp.join(ws, 'triton_models')
    shutil.copytree(TEMPLATE_DIR, tm, symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for sub in ('weights', 'tokenizer'):
        os.makedirs(osp.join(tm, sub), exist_ok=True)
    shutil.copy(DOCKER_SCRIPT, ws)
    if osp.isfile(SERVICE_SCRIPT):
        shutil.copy(SERVICE_SCRIPT, ws)
    return tm


def copy_tokenizer(tm: str, model_format: str, model_path: str, tokenizer_path: str):
    tok_dir = osp.join(tm, 'tokenizer')
    shutil.copy(tokenizer_path, osp.join(tok_dir, 'tokenizer.model'))
    if model_format == 'hf':
        for fname in sorted(os.listdir(model_path)):
            src = osp.join(model_path, fname)
            if fname.endswith(('.json', '.py')) and osp.isfile(src):
                shutil.copy(src, osp.join(tok_dir, fname))
    if osp.isfile(TOKENIZER_PY):
        shutil.copy(TOKENIZER_PY, osp.join(tok_dir, 'tokenizer.py'))
    else:
        print(f'warning: {TOKENIZER_PY} not found; the workspace has no tokenizer.py',
              file=sys.stderr)


def finish_workspace(ws: str, tp: int, model_name: str):
    """The config.pbtxt parameters, the symlinks and the script's TP, once the rest is there."""
    with open(osp.join(ws, 'triton_models', 'interactive', 'config.pbtxt'), 'a') as f:
        f.write(pbtxt_parameters(tp, model_name))
    for link, target in SYMLINKS:
        _link(ws, link, target)
    for src in (DOCKER_SCRIPT, SERVICE_SCRIPT):
        script = osp.join(ws, osp.basename(src))
        if not osp.isfile(script):
            continue
        with open(script) as f:
            text = f.read()
        with open(script, 'w') as f:
            f.write(re.sub(r'(?<![\w])TP=1(?![0-9])', f'TP={tp}', text))
        shutil.copymode(src, script)


def inside(path: str, root: str) -> bool:
    path, root = osp.realpath(path), osp.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@contextmanager
def atomic_dir(dst_path: str) -> Iterator[str]:
    """Yield a temporary folder beside `dst_path` to build in; on success it replaces
    `dst_path` (an existing one only now), on any error it is removed together with the parent
    folders this run created, and an existing `dst_path` is left untouched."""
    dst_abs = osp.abspath(dst_path)
    parent = osp.dirname(dst_abs)
    created = None  # the top-most parent directory this run created
    probe = parent
    while not osp.exists(probe):
        created, probe = probe, osp.dirname(probe)
    ok = False
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(dst_abs)}.deploy-', dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        backup = None
        if osp.lexists(dst_abs):
            backup = tempfile.mkdtemp(prefix=f'.{osp.basename(dst_abs)}.old-', dir=parent)
            os.rename(dst_abs, osp.join(backup, 'ws'))
        try:
            os.rename(tmp, dst_abs)
        except OSError:
            if backup:  # put the old workspace back
                os.rename(osp.join(backup, 'ws'), dst_abs)
                os.rmdir(backup)
            raise
        ok = True
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if not ok:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            if created:
                shutil.rmtree(created, ignore_errors=True)
