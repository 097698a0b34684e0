"""Shared helpers of the PyTorch chat tests: a tiny checkpoint, its transformers reference, and a
pexpect driver for `python -m lmdeploy.pytorch.chat`."""
import os
import os.path as osp
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MINICHAT = osp.join(ROOT, 'assets', 'minichat')
PROMPT = 'double enter to end input >>> '


@pytest.fixture(scope='session')
def chat_ckpt(make_ckpt):
    """A tiny GQA Llama (fp32, one safetensors file, the project's sentencepiece tokenizer)."""
    return str(make_ckpt('gqa', 'safetensors', shards=1))


class Reference:
    """Greedy replies of transformers' `generate` on a whole templated token history."""

    def __init__(self, path, template_name):
        import torch
        from transformers import AutoModelForCausalLM

        from lmdeploy.model import get_template
        from lmdeploy.hf_checkpoint import tokenizer_class
        Tokenizer = tokenizer_class()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = Tokenizer(path)
        self.template = get_template(template_name)
        stops = set(self.template.stop_words_for(self.tokenizer) or [])
        stops.add(self.tokenizer.eos_token_id)
        self.stop_ids = sorted(stops)
        # The fixtures' embeddings have 2048 rows, the tokenizer 2000 pieces: like the chat,
        # never pick an id the tokenizer cannot decode.
        rows = self.model.config.vocab_size
        self.suppress = list(range(self.tokenizer.vocab_size, rows)) or None
        self.history = []

    def reset(self):
        self.history = []

    def ask(self, prompt, max_new_tokens):
        """Render the turn engine-style, generate greedily on the whole history, keep the reply
        ids (stop token included) in the history; returns the reply text."""
        ids = self.history + self.tokenizer.encode(self.template.get_prompt(prompt, not self.history))
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.eos_token_id,
                                      suppress_tokens=self.suppress)
        reply = out[0, len(ids):].tolist()
        self.history = ids + reply
        text_ids = reply[:-1] if reply and reply[-1] in self.stop_ids else reply
        return self.tokenizer.decode(text_ids)


@pytest.fixture(scope='session')
def reference():
    cache = {}

    def get(path, template_name):
        key = (path, template_name)
        if key not in cache:
            cache[key] = Reference(path, template_name)
        cache[key].reset()
        return cache[key]

    return get


def chat_env(extra=None):
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra or {})
    return env


class Chat:
    """Drive the chat CLI through a terminal; stderr goes to a file so stdout is the transcript."""

    def __init__(self, argv, stderr_path, env=None, timeout=60, launcher=None):
        import shlex

        import pexpect
        cmd = launcher or [sys.executable, '-m', 'lmdeploy.pytorch.chat']
        # Exactness is checked against fp32 on CPU: pin the chat there even where a GPU exists.
        argv = list(argv) + ['--device', 'cpu']
        line = ' '.join(shlex.quote(a) for a in list(cmd) + argv)
        self.stderr_path = stderr_path
        self.child = pexpect.spawn('/bin/bash', ['-c', f'exec {line} 2>{shlex.quote(str(stderr_path))}'],
                                   cwd=ROOT, env=chat_env(env), encoding='utf-8', timeout=timeout,
                                   echo=False, dimensions=(200, 1000))
        self.transcript = ''
        self.banner = self._until_prompt()

    def _until_prompt(self):
        self.child.expect_exact(PROMPT)
        text = self.child.before.replace('\r\n', '\n')
        self.transcript += text + PROMPT
        return text

    def send(self, text):
        """Type `text` and the empty line; returns what was printed before the next prompt."""
        for line in text.split('\n'):
            self.child.sendline(line)
        self.child.sendline('')
        out = self._until_prompt()
        assert out.endswith('\n\n'), repr(out)
        return out[:-2]

    def exit(self, word='exit'):
        import pexpect
        self.child.sendline(word)
        self.child.sendline('')
        self.child.expect(pexpect.EOF)
        self.transcript += self.child.before.replace('\r\n', '\n')
        self.child.close()
        return self.child.exitstatus

    def stderr(self):
        with open(self.stderr_path, encoding='utf-8', errors='replace') as f:
            return f.read()

    def close(self):
        if self.child.isalive():
            self.child.terminate(force=True)
