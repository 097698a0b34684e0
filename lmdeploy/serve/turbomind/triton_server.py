"""Serve a workspace with Triton Inference Server, without docker:

    python -m lmdeploy.serve.turbomind.triton_server ./workspace [--grpc_port 33337]
        [--http_port PORT] [--metrics_port PORT] [--host 0.0.0.0] [--tp 1]
        [--max_batch_size N] [--verbose]

(or `bash ./workspace/service_up.sh [flags]`). It starts the Triton Inference Server that
nvidia-pytriton ships (a real `tritonserver` with its python backend) on the workspace's own
model repository:

* `preprocessing` and `postprocessing`: the workspace's python models, as they are;
* `turbomind`: the workspace's `interactive/config.pbtxt` (v0.0.2's tensors, decoupled, its
  `model_name` parameter) served by the python backend with one instance that runs the TurboMind
  engine (`turbomind_model.py`); all requests share its persistent batch.

The launcher prints where it listens and when the models are ready; Ctrl-C or SIGTERM stops the
server (requests in flight end, the engine closes) and it exits 0. gRPC is on (v0.0.2's port
33337), HTTP and metrics only when their ports are given. Triton's own log goes to a file
(printed at start; `--verbose` echoes it); its error lines are echoed always.

Why not pytriton's `Triton.bind`: its proxy model does not tell the bound function that a client
left (no cancellation), it cannot express v0.0.2's `reshape`s nor extra config parameters
(`model_name`), so the launcher uses pytriton's server binaries with the workspace's model
repository instead.
"""
from __future__ import annotations

import json
import os
import os.path as osp
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import List, Optional

from lmdeploy.console import EXIT_ERROR, UsageError, run_fire

MODELS = ('turbomind', 'preprocessing', 'postprocessing')
LOADER = '''# Written by lmdeploy.serve.turbomind.triton_server: the turbomind model runs the TurboMind
# engine in this python-backend process (see lmdeploy/serve/turbomind/turbomind_model.py).
import sys
if {root!r} not in sys.path:
    sys.path.insert(0, {root!r})
from lmdeploy.serve.turbomind.turbomind_model import TritonPythonModel  # noqa: E402,F401
'''
_LMDEPLOY_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def _say(text: str) -> None:
    print(f'[lmdeploy] {text}', flush=True)


def pytriton_paths():
    """(tritonserver binary, its libraries folder, the python backend folder, the stub for
    this python) from the installed nvidia-pytriton, or UsageError."""
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError:
        raise UsageError('nvidia-pytriton is not installed: pip install -r requirements/serve.txt '
                         '(or use workspace/service_docker_up.sh on a host with docker)') from None
    dist = get_root_module_path() / 'tritonserver'
    version = f'{sys.version_info[0]}.{sys.version_info[1]}'
    stub = get_stub_path(version)
    binary = dist / 'bin' / 'tritonserver'
    for path in (binary, dist / 'backends' / 'python', stub):
        if not path.exists():
            raise UsageError(f'nvidia-pytriton has no {path} (python {version} unsupported?)')
    return str(binary), str(get_libs_path()), str(dist / 'backends' / 'python'), str(stub)


def check_workspace(workspace) -> str:
    if not isinstance(workspace, str) or not workspace:
        raise UsageError(f'WORKSPACE must be a workspace directory, got {workspace!r}')
    if not osp.isdir(workspace):
        raise UsageError(f'workspace {workspace} does not exist; create one with '
                         'python -m lmdeploy.serve.turbomind.deploy')
    repo = osp.join(workspace, 'model_repository')
    for name in MODELS:
        if not osp.isfile(osp.join(repo, name, 'config.pbtxt')):
            raise UsageError(f'{workspace} is not a workspace: {repo}/{name}/config.pbtxt is '
                             'missing; create one with python -m lmdeploy.serve.turbomind.deploy')
    if not osp.isfile(osp.join(workspace, 'triton_models', 'weights', 'config.ini')):
        raise UsageError(f'{workspace} has no triton_models/weights/config.ini')
    return osp.realpath(workspace)


def _pbtxt_param(key: str, value) -> str:
    return (f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: '
            f'{json.dumps(str(value))}\n  }}\n}}\n')


def turbomind_config(text: str, workspace: str, tp: int, engine_config: dict,
                     stop_words: Optional[List[int]] = None) -> str:
    """The workspace's interactive config.pbtxt for the python backend: same tensors, reshapes
    and parameters; `backend: "python"`, one instance, plus where the workspace is."""
    text = re.sub(r'backend:\s*"turbomind"', 'backend: "python"', text)
    text = re.sub(r'^\s*default_model_filename:.*$\n?', '', text, flags=re.M)
    group = 'instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]'
    text, n = re.subn(r'instance_group\s*\[.*?\]', group, text, count=1, flags=re.S)
    if not n:
        text += group + '\n'
    # Only our keys are replaced; everything deploy wrote (model_name, ...) stays.
    for key in ('workspace', 'tp', 'engine_config', 'stop_words'):
        text = re.sub(r'parameters\s*\{\s*key:\s*"%s"\s*value:\s*\{[^}]*\}\s*\}\s*' % key, '', text)
    text += _pbtxt_param('workspace', workspace) + _pbtxt_param('tp', tp)
    text += _pbtxt_param('engine_config', json.dumps(engine_config))
    if stop_words is not None:
        text += _pbtxt_param('stop_words', json.dumps(stop_words))
    return text


def template_stop_words(workspace: str) -> Optional[List[int]]:
    """The chat template's stop-word ids for this workspace's tokenizer (published to clients
    as the turbomind parameter `stop_words`)."""
    import configparser
    from lmdeploy.model import MODELS as TEMPLATES
    cfg = configparser.ConfigParser()
    cfg.read(osp.join(workspace, 'triton_models', 'weights', 'config.ini'))
    section = cfg['llama'] if cfg.has_section('llama') else (cfg['turbomind'] if cfg.has_section('turbomind') else {})
    cls = TEMPLATES.get(section.get('model_name', ''))
    if cls is None:
        return None
    template = cls()
    if template.stop_word_ids is not None:
        return list(template.stop_word_ids)
    try:
        from lmdeploy.turbomind.tokenizer import Tokenizer
        tokenizer = Tokenizer(osp.join(workspace, 'triton_models', 'tokenizer'))
    except Exception:  # noqa: BLE001 - no tokenizer: no text stop words
        return None
    return template.stop_words_for(tokenizer) or []


def build_runtime(workspace: str, root: str, tp: int, engine_config: dict) -> str:
    """The model repository and backend folder Triton runs on, under `root`; returns the repo."""
    _, _, backend_dir, stub = pytriton_paths()
    backends = osp.join(root, 'backends', 'python')
    os.makedirs(backends)
    for name in os.listdir(backend_dir):
        if name.endswith(('.so', '.py')):
            os.symlink(osp.join(backend_dir, name), osp.join(backends, name))
    os.symlink(stub, osp.join(backends, 'triton_python_backend_stub'))
    repo = osp.join(root, 'model_repository')
    os.makedirs(osp.join(repo, 'turbomind', '1'))
    for name in ('preprocessing', 'postprocessing'):
        os.symlink(osp.realpath(osp.join(workspace, 'model_repository', name)), osp.join(repo, name))
    with open(osp.join(workspace, 'model_repository', 'turbomind', 'config.pbtxt')) as f:
        text = f.read()
    with open(osp.join(repo, 'turbomind', 'config.pbtxt'), 'w') as f:
        f.write(turbomind_config(text, workspace, tp, engine_config, template_stop_words(workspace)))
    with open(osp.join(repo, 'turbomind', '1', 'model.py'), 'w') as f:
        f.write(LOADER.format(root=_LMDEPLOY_ROOT))
    return repo


def server_env() -> dict:
    """tritonserver's environment: its own libraries and Python's (the python-backend stub
    links libpython), this Python's bin first on PATH, lmdeploy importable."""
    _, libs, _, _ = pytriton_paths()
    env = dict(os.environ)
    paths = [libs, sysconfig.get_config_var('LIBDIR') or '']
    if env.get('LD_LIBRARY_PATH'):
        paths.append(env['LD_LIBRARY_PATH'])
    env['LD_LIBRARY_PATH'] = ':'.join(p for p in paths if p)
    env['PATH'] = osp.join(sys.exec_prefix, 'bin') + os.pathsep + env.get('PATH', '')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_LMDEPLOY_ROOT, env.get('PYTHONPATH')) if p)
    env.setdefault('TM_LOG_LEVEL', 'WARNING')
    return env


def _check_port(host: str, port, name: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError(f'--{name} must be a port number, got {port!r}')
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f'cannot listen on {host}:{port} (--{name}): {e.strerror}') from None
    return port


def _set_pdeathsig():
    """In the child: die with the launcher even if it is killed with SIGKILL."""
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6', use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


class Launcher:
    """tritonserver as a child process: start, wait until ready, stop."""

    def __init__(self, workspace: str, host: str, grpc_port: int, http_port: Optional[int],
                 metrics_port: Optional[int], tp: int, engine_config: dict, verbose: bool):
        self.workspace = workspace
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.tp = tp
        self.engine_config = engine_config
        self.verbose = verbose
        self.root = tempfile.mkdtemp(prefix='lmdeploy-triton-')
        self.log_path = osp.join(self.root, 'tritonserver.log')
        self.proc: Optional[subprocess.Popen] = None
        self._log_thread = None

    def command(self, repo: str) -> List[str]:
        binary, _, _, _ = pytriton_paths()
        args = [binary, f'--model-repository={repo}',
                f'--backend-directory={osp.join(self.root, "backends")}',
                '--allow-grpc=1', f'--grpc-address={self.host}', f'--grpc-port={self.grpc_port}',
                '--log-verbose=0', '--exit-timeout-secs=15', '--strict-readiness=1',
                f'--backend-config=python,shm-region-prefix-name=lmdeploy{os.getpid()}_']
        if self.http_port:
            args += ['--allow-http=1', f'--http-address={self.host}', f'--http-port={self.http_port}']
        else:
            args += ['--allow-http=0']
        if self.metrics_port:
            args += ['--allow-metrics=1', f'--metrics-address={self.host}',
                     f'--metrics-port={self.metrics_port}']
        else:
            args += ['--allow-metrics=0']
        return args

    def start(self):
        repo = build_runtime(self.workspace, self.root, self.tp, self.engine_config)
        self.proc = subprocess.Popen(self.command(repo), env=server_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_set_pdeathsig)
        self._log_thread = threading.Thread(target=self._pump_log, daemon=True)
        self._log_thread.start()

    def _pump_log(self):
        with open(self.log_path, 'ab') as log:
            for line in iter(self.proc.stdout.readline, b''):
                log.write(line)
                log.flush()
                text = line.decode('utf-8', 'replace')
                noise = 'CudaDriverHelper has not been initialized' in text
                if self.verbose or (re.match(r'^E\d{4} ', text) and not noise) \
                        or text.startswith('[lmdeploy]'):
                    sys.stderr.write(text)
                    sys.stderr.flush()

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, encoding='utf-8', errors='replace') as f:
                return ''.join(f.readlines()[-n:])
        except OSError:
            return ''

    def wait_ready(self, timeout: float, stopping) -> bool:
        import tritonclient.grpc as grpcclient
        addr = f'{"127.0.0.1" if self.host in ("0.0.0.0", "") else self.host}:{self.grpc_port}'
        client = grpcclient.InferenceServerClient(addr)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and not stopping():
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in MODELS):
                        return True
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        return False

    def stop(self, timeout: float = 30):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


def main(workspace: str, grpc_port: int = 33337, http_port: Optional[int] = None,
         metrics_port: Optional[int] = None, host: str = '0.0.0.0', tp: int = 1,
         max_batch_size: Optional[int] = None, ready_timeout: float = 600, verbose: bool = False):
    """Serve WORKSPACE (made by lmdeploy.serve.turbomind.deploy) with Triton Inference Server.

    Args:
        workspace: the workspace folder.
        grpc_port: gRPC port (v0.0.2: 33337).
        http_port: also serve Triton's HTTP API on this port (off by default, as in v0.0.2).
        metrics_port: also serve Prometheus metrics on this port (off by default).
        host: address to listen on.
        tp: tensor-parallel degree.
        max_batch_size: the engine's persistent batch size (default: config.ini's).
        ready_timeout: seconds to wait for the models to load.
        verbose: echo Triton's whole log.
    """
    ws = check_workspace(workspace)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UsageError(f'--tp must be a positive integer, got {tp!r}')
    engine_config = {}
    if max_batch_size is not None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise UsageError(f'--max_batch_size must be a positive integer, got {max_batch_size!r}')
        engine_config['max_batch_size'] = max_batch_size
    if not isinstance(host, str) or not host:
        raise UsageError(f'--host must be an address, got {host!r}')
    ports = {'grpc_port': grpc_port, 'http_port': http_port, 'metrics_port': metrics_port}
    for name, port in ports.items():
        if port is not None:
            _check_port(host, port, name)
    given = [p for p in ports.values() if p is not None]
    if len(set(given)) != len(given):
        raise UsageError('--grpc_port, --http_port and --metrics_port must differ')
    pytriton_paths()

    launcher = Launcher(ws, host, grpc_port, http_port, metrics_port, tp, engine_config, verbose)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        _say(f'starting Triton Inference Server on workspace {ws} (tp {tp})')
        _say(f'gRPC {host}:{grpc_port}' + (f', HTTP {host}:{http_port}' if http_port else '')
             + (f', metrics {host}:{metrics_port}' if metrics_port else ''))
        _say(f'server log: {launcher.log_path}')
        t0 = time.monotonic()
        launcher.start()
        if launcher.wait_ready(ready_timeout, stop.is_set):
            client_host = '127.0.0.1' if host in ('0.0.0.0', '') else host
            _say(f'ready in {time.monotonic() - t0:.1f} s: models {", ".join(MODELS)} on gRPC '
                 f'{host}:{grpc_port}; chat with: python -m lmdeploy.serve.client '
                 f'{client_host}:{grpc_port}  (Ctrl-C stops the server)')
            while not stop.is_set() and launcher.proc.poll() is None:
                stop.wait(0.5)
        if stop.is_set():
            _say('stopping')
        elif launcher.proc.poll() is not None:
            status = EXIT_ERROR
            sys.stderr.write(launcher.log_tail())
            print(f'error: tritonserver exited with status {launcher.proc.returncode} '
                  f'(log above; the whole log was {launcher.log_path})', file=sys.stderr, flush=True)
        else:
            status = EXIT_ERROR
            print(f'error: the models were not ready after {ready_timeout} s', file=sys.stderr)
    finally:
        launcher.stop()
        launcher.cleanup()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if status == 0:
        _say('stopped')
    sys.exit(status)


def cli(argv=None):
    run_fire(main, argv, name='lmdeploy.serve.turbomind.triton_server',
             usage='python -m lmdeploy.serve.turbomind.triton_server WORKSPACE '
                   '[--grpc_port 33337] [--http_port P] [--tp 1]')


if __name__ == '__main__':
    cli()
