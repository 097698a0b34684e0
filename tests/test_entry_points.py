"""Top-level entry points: `python -m lmdeploy` and the Quick start demo on the embedded model."""
import os
import subprocess
import sys

import lmdeploy
from tools.minichat_data import answer_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_version_flag_prints_the_package_version():
    out = run('-m', 'lmdeploy', '--version')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'lmdeploy {lmdeploy.__version__}'


def test_help_lists_every_entry_point_and_bad_argument_fails():
    out = run('-m', 'lmdeploy', '--help')
    assert out.returncode == 0
    for module in ('lmdeploy.serve.turbomind.deploy', 'lmdeploy.turbomind.chat', 'lmdeploy.model'):
        assert module in out.stdout
    bad = run('-m', 'lmdeploy', '--bogus')
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_demo_converts_the_embedded_model(tmp_path):
    """The Quick start's steps after install: deploy MiniChat, then a chat turn with a right reply."""
    ws = tmp_path / 'workspace'
    out = run('-m', 'lmdeploy.serve.turbomind.deploy', 'minichat', 'assets/minichat', '--dst_path', str(ws))
    assert out.returncode == 0, out.stderr
    config = (ws / 'triton_models' / 'weights' / 'config.ini').read_text()
    assert 'model_name = minichat' in config
    for prompt in ('What is 37 + 58?', 'Reverse the word guitar.'):
        demo = run('tools/demo.py', str(ws), '--prompt', prompt)
        assert demo.returncode == 0, demo.stderr
        assert f'minichat: {answer_for(prompt)}\n' in demo.stdout, demo.stdout
        assert 'tok/s' in demo.stdout


def test_demo_rejects_a_directory_that_is_not_a_workspace(tmp_path):
    demo = run('tools/demo.py', str(tmp_path))
    assert demo.returncode != 0
    assert 'not a workspace' in demo.stderr
