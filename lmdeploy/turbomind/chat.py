"""Multi-turn chat in the terminal on the local TurboMind engine (v0.0.2's `turbomind.chat`).

    python -m lmdeploy.turbomind.chat ./workspace [--session_id 1] [--repetition_penalty 1.0]
        [--tp 1] [--top_k 40] [--top_p 0.8] [--temperature 0.8] [--request_output_len 512]
        [--seed S] [--session_len N] [--log_level ERROR] [--verbose]

Type a prompt, then press Enter on an empty line ("double enter"). `end` ends the session (the
next prompt starts a new conversation), `exit` ends it and quits. Ctrl-C while a reply streams
stops that reply and keeps the session; Ctrl-C or Ctrl-D at the prompt ends the session and
quits.

The conversation protocol is v0.0.2's (behaviour reference 1.2, 6.3): the first turn is sent
with the template's first-turn form and `sequence_start`, later turns send only the new turn's
text with `step` = the session's token count so far (every turn's input and reply tokens,
including the reply's stop token, which stays in the history). Deliberate differences from
v0.0.2 (its bugs, reference section 13, fixed):

* `end` frees the session on the engine at once (no throw-away generation); `exit`, Ctrl-C and
  Ctrl-D at the prompt end the session too;
* the length check counts the new input: the engine refuses a turn that does not fit
  `session_len` and the chat says so on one line, keeping the session as it was;
* the reply streams through the tokenizer's incremental detokenizer: a character made of
  several tokens is shown once it is complete, never broken, dropped or as U+FFFD (only bytes
  that form no character at all, which v0.0.2 silently dropped, show as U+FFFD mid-reply),
  and the stop token's text (e.g. `<|end|>`) is not shown;
* the templated prompt is not echoed (`--verbose` shows it, with the token counts);
* the sampling parameters are flags (v0.0.2 hard-coded them), unknown flags are errors, and
  a bad workspace is a one-line error;
* engine logs are quiet: the `lmdeploy.turbomind` logger is set to `--log_level` (ERROR);
  TM_LOG_LEVEL is set to the same value, as v0.0.2 did.
"""
import logging
import math
import os
import os.path as osp
import random
import signal
import sys
import threading
from typing import List, Optional

from lmdeploy.console import (EXIT_ERROR, EXIT_INTERRUPTED, UsageError, enable_line_editing, fail,
                              log_to_stderr, one_line, read_prompt, run_fire)

LOG_LEVELS = ('TRACE', 'DEBUG', 'INFO', 'WARNING', 'ERROR')


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_workspace(model_path) -> str:
    """The workspace root, or UsageError naming what is missing."""
    if not isinstance(model_path, str) or not model_path:
        raise UsageError(f'MODEL_PATH must be a workspace directory, got {model_path!r}')
    config = osp.join(model_path, 'triton_models', 'weights', 'config.ini')
    if not osp.isdir(model_path):
        raise UsageError(f'workspace {model_path} does not exist; create one with '
                         f'python -m lmdeploy.serve.turbomind.deploy')
    if not osp.isfile(config):
        raise UsageError(f'{model_path} is not a workspace (no triton_models/weights/config.ini); '
                         f'create one with python -m lmdeploy.serve.turbomind.deploy')
    if not osp.isdir(osp.join(model_path, 'triton_models', 'tokenizer')):
        raise UsageError(f'{model_path} has no tokenizer (triton_models/tokenizer is missing)')
    return model_path


def setup_logging(log_level: str) -> None:
    """Quiet engine logs, as v0.0.2's TM_LOG_LEVEL=ERROR did."""
    os.environ['TM_LOG_LEVEL'] = log_level
    level = {'TRACE': logging.DEBUG}.get(log_level, getattr(logging, log_level))
    log_to_stderr(logging.getLogger('lmdeploy.turbomind'), level, '[TM][%(levelname)s] %(message)s')


class Chat:
    """One terminal conversation over a TurboMind engine (the loop's state and its turns).

    Output goes to `out` (stdout): `session <id>`, then the streamed reply, then notes in
    brackets (cut replies, a full session, a cancelled reply).
    """

    def __init__(self, tm, session_id: int = 1, top_k: int = 40, top_p: float = 0.8,
                 temperature: float = 0.8, repetition_penalty: float = 1.0,
                 request_output_len: int = 512, seed: Optional[int] = None,
                 verbose: bool = False, out=None):
        self.tm = tm
        self.instance = tm.create_instance()
        self.tokenizer = tm.tokenizer
        self.template = tm.template
        self.session_id = session_id
        self.sampling = dict(top_k=top_k, top_p=top_p, temperature=temperature,
                             repetition_penalty=repetition_penalty)
        self.request_output_len = request_output_len
        self.fixed_seed = seed
        self.verbose = verbose
        self.out = out or sys.stdout
        # Ids that end a reply: not shown (v0.0.2 showed e.g. `<eoa>`), but kept in the history.
        self.stop_ids = set(tm.stop_words or []) | {tm.eos_id}
        self._cancelling = False
        self._new_session()

    # -- session state ------------------------------------------------------------------------

    def _new_session(self):
        self.nth_round = 1
        self.step = 0  # tokens the engine holds for the session
        self.seed = self.fixed_seed if self.fixed_seed is not None else random.getrandbits(64)

    @property
    def started(self) -> bool:
        return self.nth_round > 1

    def end(self) -> None:
        """Free the session on the engine (nothing is generated) and start over."""
        from lmdeploy.turbomind.errors import RequestError
        try:
            # Also before a first reply finished (an interrupted first turn): a no-op when the
            # engine holds nothing for the session.
            self.instance.end(self.session_id)
        except RequestError:
            pass
        self._new_session()

    # -- output -------------------------------------------------------------------------------

    def _print(self, text: str = '', end: str = '\n') -> None:
        self.out.write(text + end)
        self.out.flush()

    def note(self, text: str) -> None:
        self._print(f'[{text}]')

    # -- one turn -----------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        """Send one user turn and stream the reply."""
        from lmdeploy.turbomind.errors import RequestError, SessionTooLong

        self._print(f'session {self.session_id}')
        first = not self.started
        prompt = self.template.get_prompt(text, first)
        input_ids = self.tokenizer.encode(prompt)
        if self.verbose:
            self.note(f'prompt {prompt!r}: {len(input_ids)} tokens after {self.step} in the '
                      f'session (session_len {self.tm.session_len})')
        detok = self.tokenizer.detokenizer()
        output_ids: List[int] = []
        shown = 0  # output ids fed to the detokenizer
        self._cancelling = False
        try:
            with self._cancel_on_sigint():
                for outputs in self.instance.stream_infer(
                        self.session_id, input_ids, request_output_len=self.request_output_len,
                        sequence_start=first, sequence_end=False, step=self.step, stop=False,
                        ignore_eos=False, random_seed=self.seed if first else None,
                        stream_output=True, **self.sampling):
                    output_ids = outputs[0][0].tolist()
                    visible = len(output_ids)
                    if visible and output_ids[-1] in self.stop_ids:
                        visible -= 1  # a stop token is always the last one
                    if visible > shown:
                        self._print(detok.step(output_ids[shown:visible]), end='')
                        shown = visible
        except SessionTooLong as e:
            if first:
                self.note(f'the input is too long for this model: {one_line(e)}; '
                          f'shorten it')
            else:
                self.note(f'the session is too long: {one_line(e)}; type `end` to end the '
                          f'session and start a new one (or send a shorter input)')
            return
        except RequestError as e:
            self.note(f'request refused: {one_line(e)}')
            return
        self._print(detok.flush().replace('\ufffd', ''))
        self.step += len(input_ids) + len(output_ids)
        self.nth_round += 1
        self._report_end(output_ids)

    def _report_end(self, output_ids: List[int]) -> None:
        n = len(output_ids)
        stopped = bool(n) and output_ids[-1] in self.stop_ids
        session_len = self.tm.session_len
        if self._cancelling and not stopped:
            self.note(f'reply stopped by Ctrl-C after {n} tokens; the session is kept')
        elif not stopped and n >= self.request_output_len:
            self.note(f'reply cut at --request_output_len {self.request_output_len} tokens')
        elif not stopped or self.step >= session_len - 1:
            self.note(f'the session is full ({self.step} of session_len {session_len} tokens); '
                      f'type `end` to start a new one')
        if self.verbose:
            self.note(f'{n} tokens generated; the session holds {self.step} tokens')

    def _cancel_on_sigint(self):
        """While a reply streams, the first Ctrl-C cancels it (the engine finishes the request
        with what it has and keeps the session); a second one raises KeyboardInterrupt."""
        chat = self

        class _Guard:
            def __enter__(self):
                self.previous = None
                if threading.current_thread() is threading.main_thread():
                    self.previous = signal.signal(signal.SIGINT, self.handler)
                return self

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGINT, self.previous)

            @staticmethod
            def handler(signum, frame):
                if chat._cancelling:
                    raise KeyboardInterrupt
                chat._cancelling = True
                threading.Thread(target=chat._cancel, daemon=True).start()

        return _Guard()

    def _cancel(self):
        from lmdeploy.turbomind.errors import EngineError, RequestError
        try:
            self.instance.cancel(self.session_id)
        except (RequestError, EngineError):
            pass  # the reply had just finished


def run(chat: Chat, read=read_prompt) -> None:
    """The read-eval loop; returns on `exit`, EOF or Ctrl-C at the prompt (session ended)."""
    while True:
        try:
            text = read()
        except KeyboardInterrupt:
            text = None
        if text is None:  # end of input or Ctrl-C at the prompt
            chat._print()
            chat.end()
            return
        command = text.strip()
        if not command:
            continue
        if command == 'exit':
            chat.end()
            return
        if command == 'end':
            chat.end()
            chat.note(f'session {chat.session_id} ended; the next prompt starts a new one')
            continue
        try:
            chat.turn(text)
        except KeyboardInterrupt:  # a second Ctrl-C while a reply was being cancelled
            chat._print()
            chat.note('interrupted; the session is ended')
            chat.end()


def _validate(session_id, repetition_penalty, tp, top_k, top_p, temperature,
              request_output_len, seed, session_len, log_level, verbose) -> str:
    from lmdeploy.turbomind.sampling import SamplingParams
    if not _is_int(session_id) or session_id < 0:
        raise UsageError(f'--session_id must be an integer >= 0, got {session_id!r}')
    if not _is_int(tp) or tp < 1:
        raise UsageError(f'--tp must be an integer >= 1, got {tp!r}')
    if not _is_int(request_output_len) or request_output_len < 1:
        raise UsageError(f'--request_output_len must be an integer >= 1, got {request_output_len!r}')
    if session_len is not None and (not _is_int(session_len) or session_len < 2):
        raise UsageError(f'--session_len must be an integer >= 2, got {session_len!r}')
    if not isinstance(verbose, bool):
        raise UsageError(f'--verbose takes no value (or True/False), got {verbose!r}')
    level = str(log_level).upper()
    if level not in LOG_LEVELS:
        raise UsageError(f'--log_level must be one of {", ".join(LOG_LEVELS)}, got {log_level!r}')
    for name, value in (('top_p', top_p), ('temperature', temperature),
                        ('repetition_penalty', repetition_penalty)):
        if not _is_real(value):
            raise UsageError(f'--{name} must be a number, got {value!r}')
    try:
        SamplingParams(top_k=top_k, top_p=float(top_p), temperature=float(temperature),
                       repetition_penalty=float(repetition_penalty),
                       random_seed=seed).validate()
    except ValueError as e:
        name = str(e).split()[0]
        raise UsageError(f'--{"seed" if name == "random_seed" else name}'
                         f'{str(e)[len(name):]}') from None
    return level


def main(model_path: str, session_id: int = 1, repetition_penalty: float = 1.0, tp: int = 1,
         top_k: int = 40, top_p: float = 0.8, temperature: float = 0.8,
         request_output_len: int = 512, seed: int = None, session_len: int = None,
         log_level: str = 'ERROR', verbose: bool = False):
    """Chat with a TurboMind workspace in the terminal.

    Usage: python -m lmdeploy.turbomind.chat MODEL_PATH [--flag value ...]

    Type a prompt and press Enter on an empty line to send it (lines are joined with newlines).
    `end` ends the session and starts a new one, `exit` quits. Ctrl-C while a reply streams
    stops it (the session is kept); Ctrl-C or Ctrl-D at the prompt quits.

    Args:
        model_path: the workspace written by `python -m lmdeploy.serve.turbomind.deploy`
            (it holds triton_models/weights/config.ini and triton_models/tokenizer).
        session_id: the engine session id of the conversation (integer >= 0).
        repetition_penalty: > 1 discourages tokens already in the conversation; 1 turns it off.
        tp: tensor-parallel degree: ranks (one process per GPU, or CPU processes); any tp
            that divides the heads, KV heads, FFN width and vocab (the workspace is re-sliced
            when it was deployed with another tp).
        top_k: sample from the k most likely tokens; 1 is greedy, 0 turns it off.
        top_p: sample from the smallest set of tokens whose probabilities add up to p, (0, 1].
        temperature: sampling temperature (>= 0; 0 is greedy).
        request_output_len: the most tokens of one reply.
        seed: random seed of every session, an integer in [0, 2**64); default (None): a fresh
            random seed for each session.
        session_len: override config.ini's session_len: the most tokens (every turn's input
            and reply) one session holds.
        log_level: engine log level: ERROR (default), WARNING, INFO, DEBUG or TRACE.
        verbose: show each templated prompt and the token counts of every turn.
    """
    try:
        log_level = _validate(session_id, repetition_penalty, tp, top_k, top_p, temperature,
                              request_output_len, seed, session_len, log_level, verbose)
        check_workspace(model_path)
    except UsageError as e:
        fail(str(e), e.code)
    setup_logging(log_level)
    overrides = {} if session_len is None else {'session_len': session_len}
    try:
        from lmdeploy.turbomind import TurboMind
        tm = TurboMind(model_path, tp=tp, **overrides)
        if tm.tokenizer is None:
            raise FileNotFoundError(f'{model_path} has no tokenizer')
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - any load failure is a one-line error
        fail(f'cannot load {model_path}: {one_line(e)}', EXIT_ERROR)
    try:
        if verbose:
            print(f'[model {tm.model_name}, session_len {tm.session_len}, '
                  f'template {type(tm.template).__name__}]', flush=True)
        enable_line_editing()
        chat = Chat(tm, session_id=session_id, repetition_penalty=float(repetition_penalty),
                    top_k=top_k, top_p=float(top_p), temperature=float(temperature),
                    request_output_len=request_output_len, seed=seed, verbose=verbose)
        run(chat)
    except Exception as e:  # noqa: BLE001 - the engine stopped: one line, not a traceback
        print(file=sys.stderr)  # a reply may have been cut mid-line
        fail(one_line(e), EXIT_ERROR)
    finally:
        tm.close()
    sys.exit(0)


def cli(argv=None) -> None:
    """Entry point: check the command line (before the engine loads), then run fire."""
    run_fire(main, argv, name='lmdeploy.turbomind.chat')


if __name__ == '__main__':
    cli()
