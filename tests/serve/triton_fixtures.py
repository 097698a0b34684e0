"""Shared helpers of the Triton service tests: the MiniChat workspace and a real
`lmdeploy.serve.turbomind.triton_server` on loopback (one per test module)."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT = 120


def require_serving():
    pytest.importorskip('tritonclient.grpc')
    pytest.importorskip('pytriton')
    pytest.importorskip('sentencepiece')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def deploy_minichat(tmp_path_factory, name='triton') -> str:
    from lmdeploy.serve.turbomind.deploy import deploy
    dst = tmp_path_factory.mktemp(name) / 'workspace'
    deploy('minichat', os.path.join(ROOT, 'assets', 'minichat'), 'hf', dst_path=str(dst))
    return str(dst)


class Server:
    """A running launcher; `addr` is its gRPC HOST:PORT, `output` what it printed."""

    def __init__(self, argv, port):
        self.port = port
        self.addr = f'127.0.0.1:{port}'
        self.lines = []
        env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHON=sys.executable)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return ''.join(self.lines)

    def wait_ready(self, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '] ready in ' in self.output:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f'the server did not get ready:\n{self.output}')

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def start_server(ws, *args, via_script=False) -> Server:
    port = free_port()
    if via_script:
        argv = ['bash', os.path.join(ws, 'service_up.sh')]
    else:
        argv = [sys.executable, '-m', 'lmdeploy.serve.turbomind.triton_server', ws]
    server = Server(argv + ['--grpc_port', str(port), '--host', '127.0.0.1', *args], port)
    server.wait_ready()
    return server


def preprocess(addr, text):
    from lmdeploy.serve.turbomind.utils import Preprocessor
    ids, n = Preprocessor(addr)(text)
    return [int(x) for x in ids[0][:int(n[0][0])]]
