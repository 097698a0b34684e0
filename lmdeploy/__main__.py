"""`python -m lmdeploy --version` prints the version; otherwise it lists the entry points."""
import sys

from .version import __version__

ENTRY_POINTS = (
    ('lmdeploy.serve.turbomind.deploy', 'convert a HF or Meta checkpoint into a workspace'),
    ('lmdeploy.turbomind.chat', 'chat in the terminal on the TurboMind engine'),
    ('lmdeploy.turbomind.decode', 'print next-token predictions for each line of a file'),
    ('lmdeploy.lite.apis.kv_qparams', 'calibrate int8 KV-cache scales'),
    ('lmdeploy.serve.client', 'chat in the terminal against a Triton server'),
    ('lmdeploy.app', 'web UI against a Triton server'),
    ('lmdeploy.pytorch.chat', 'chat on plain PyTorch (transformers)'),
    ('lmdeploy.model', 'show a chat template'),
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ('--version', '-V', 'version'):
        print(f'lmdeploy {__version__}')
        return 0
    if argv and argv[0] not in ('-h', '--help'):
        print(f'lmdeploy: unknown argument {argv[0]!r}; try --help', file=sys.stderr)
        return 2
    print(f'lmdeploy {__version__}\n\nusage: python -m lmdeploy --version\n\nentry points:')
    width = max(len(m) for m, _ in ENTRY_POINTS)
    for module, what in ENTRY_POINTS:
        print(f'  python -m {module:<{width}}  {what}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
