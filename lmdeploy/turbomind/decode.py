"""Next-token predictions of a workspace for every position of some texts (v0.0.2's
`turbomind.decode`, behaviour reference 1.3).

    python -m lmdeploy.turbomind.decode ./workspace INPUT_FILE [--strip_newline] [--tp 1]

Each line of INPUT_FILE is one input. It is encoded with the workspace's tokenizer exactly as
the chat encodes text (no BOS unless the line contains the `<BOS>` marker), the engine runs a
context-only forward pass over all lines (`TurboMindInstance.decode`) and the command prints
`torch.argmax(logits, -1)`: an int tensor [lines, longest line in tokens] whose entry [i, j] is
the token the model predicts after the first j+1 tokens of line i.

Lines are read like v0.0.2's `readlines()`: a line keeps its trailing newline, which is
encoded too (with a sentencepiece tokenizer one byte token, `<0x0A>`); the last line of a file
without a final newline has none. The newline changes no prediction before it (attention is
causal); it only adds the last column of its row, the prediction after the newline.
`--strip_newline` drops the line endings before encoding (\\r\\n reads as \\n, as in v0.0.2).

Differences from v0.0.2 on purpose: the whole tensor is printed (torch would elide the middle
of a large one); positions past the end of a shorter line are -1 (v0.0.2 printed whatever the
padding predicted); engine logs stay quiet; a missing workspace or input file is a one-line
error with exit code 2.
"""
import os.path as osp

from lmdeploy.console import EXIT_ERROR, UsageError, fail, one_line, run_fire
from lmdeploy.turbomind.chat import LOG_LEVELS, check_workspace, setup_logging

# Lines per engine call: bounds the [rows, len, vocab] fp32 logits held at once.
CHUNK_LINES = 16


def read_lines(inputs: str, strip_newline: bool = False):
    """The file's lines, with their newlines unless `strip_newline`; UsageError if unreadable."""
    if not isinstance(inputs, str) or not inputs:
        raise UsageError(f'INPUTS must be the path of a text file, got {inputs!r}')
    if not osp.isfile(inputs):
        raise UsageError(f'input file {inputs} does not exist' if not osp.exists(inputs)
                         else f'{inputs} is not a file')
    try:
        with open(inputs, encoding='utf-8') as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f'cannot read {inputs}: {one_line(e)}') from None
    if strip_newline:
        lines = [line.rstrip('\n') for line in lines]
    if not lines:
        raise UsageError(f'{inputs} is empty: nothing to decode')
    return lines


def predict(tm, lines, chunk: int = CHUNK_LINES):
    """argmax next-token predictions [len(lines), max tokens] (int64; -1 past a line's end)
    and the token ids of each line."""
    import torch
    ids = [tm.tokenizer.encode(line) for line in lines]
    empty = [i + 1 for i, row in enumerate(ids) if not row]
    if empty:
        raise UsageError(f'line {empty[0]} encodes to no tokens; remove empty lines '
                         f'(or drop --strip_newline)')
    width = max(len(row) for row in ids)
    out = torch.full((len(ids), width), -1, dtype=torch.long)
    instance = tm.create_instance()
    for start in range(0, len(ids), chunk):
        rows = ids[start:start + chunk]
        logits = instance.decode(rows)
        pred = torch.argmax(logits, -1)
        for j, row in enumerate(rows):
            out[start + j, :len(row)] = pred[j, :len(row)]
    return out, ids


def main(model_path: str, inputs: str, strip_newline: bool = False, tp: int = 1,
         log_level: str = 'ERROR'):
    """Print the argmax next-token prediction at every token of every line of a text file.

    Usage: python -m lmdeploy.turbomind.decode MODEL_PATH INPUTS

    Prints torch.argmax(logits, -1): row i is line i, column j the predicted token after the
    line's first j+1 tokens; -1 past the end of a shorter line. Lines keep their newline (as
    v0.0.2's readlines), which is encoded as a token of its own.

    Args:
        model_path: the workspace written by `python -m lmdeploy.serve.turbomind.deploy`.
        inputs: a UTF-8 text file, one input per line (`<BOS>` in a line adds a BOS token).
        strip_newline: drop each line's trailing newline before encoding.
        tp: tensor-parallel degree (ranks: one process per GPU, or CPU processes).
        log_level: engine log level: ERROR (default), WARNING, INFO, DEBUG or TRACE.
    """
    try:
        check_workspace(model_path)
        lines = read_lines(inputs, bool(strip_newline))
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise UsageError(f'--tp must be an integer >= 1, got {tp!r}')
        if str(log_level).upper() not in LOG_LEVELS:
            raise UsageError(f'--log_level must be one of {", ".join(LOG_LEVELS)}, got {log_level!r}')
    except UsageError as e:
        fail(str(e), e.code)
    setup_logging(str(log_level).upper())
    try:
        import torch
        from lmdeploy.turbomind import TurboMind
        tm = TurboMind(model_path, tp=tp)
        if tm.tokenizer is None:
            raise FileNotFoundError(f'{model_path} has no tokenizer')
    except Exception as e:  # noqa: BLE001 - any load failure is a one-line error
        fail(f'cannot load {model_path}: {one_line(e)}', EXIT_ERROR)
    try:
        preds, _ = predict(tm, lines)
    except UsageError as e:
        fail(str(e), e.code)
    except Exception as e:  # noqa: BLE001
        fail(one_line(e), EXIT_ERROR)
    finally:
        tm.close()
    torch.set_printoptions(profile='full', linewidth=120)
    print(preds)


def cli(argv=None) -> None:
    """Entry point: check the command line (before the engine loads), then run fire."""
    run_fire(main, argv, name='lmdeploy.turbomind.decode')


if __name__ == '__main__':
    cli()
