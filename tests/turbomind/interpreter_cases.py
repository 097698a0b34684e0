"""The harness of the Triton-interpreter test files: each file's cases run in one subprocess
with TRITON_INTERPRET=1 (the interpreter must be on before triton is imported), one JSON line
per case, and pytest reads the lines back.

    interp_results, test_my_kernels = case_tests(__file__, CASES)   # the pytest side

    if __name__ == '__main__':             # inside the subprocess
        run_cases(run_case, sys.argv[1:] or list(CASES))
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cases(run_case, names):
    """Run each case (run_case(name) -> (ok, message)) and print its JSON line; an exception
    fails that case only."""
    assert os.environ.get('TRITON_INTERPRET') == '1', 'run with TRITON_INTERPRET=1'
    for name in names:
        t0 = time.time()
        try:
            ok, msg = run_case(name)
        except Exception as e:  # report, keep going
            import traceback
            ok, msg = False, f'{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}'
        print(json.dumps({'case': name, 'ok': ok, 'msg': msg,
                          'seconds': round(time.time() - t0, 2)}), flush=True)


def interpreter_results(test_file: str) -> dict:
    """case -> {'ok', 'msg', 'seconds'} from running `test_file` in the interpreter."""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1', PYTHONPATH=ROOT + os.pathsep
               + os.environ.get('PYTHONPATH', ''))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{'):
            r = json.loads(line)
            results[r['case']] = r
    if not results:
        pytest.fail(f'interpreter subprocess produced nothing (rc {proc.returncode}):\n'
                    f'{proc.stderr[-4000:]}')
    return results


def case_tests(test_file: str, cases):
    """(fixture, test) for a test file's module namespace: the fixture runs the file's cases
    in the interpreter once per module; the test is parametrized by case name."""
    @pytest.fixture(scope='module')
    def interp_results():
        return interpreter_results(test_file)

    @pytest.mark.parametrize('case', list(cases))
    def test_case(interp_results, case):
        r = interp_results.get(case)
        assert r is not None, f'{case}: no result (subprocess died?)'
        assert r['ok'], f"{case}: {r['msg']}"
    return interp_results, test_case
