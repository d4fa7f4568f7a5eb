"""The README's first command on a CPU machine: `python -m inductor_flex.demo` must pass in a fresh
process where nothing has set TRITON_INTERPRET (the package imports triton before the demo runs)."""
import os
import subprocess
import sys

import pytest


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_demo_runs_in_a_fresh_process():
    res = subprocess.run([sys.executable, "-m", "inductor_flex.demo"], env=_env_without_interpreter(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "PASS: every error is within tolerance" in res.stdout


@pytest.mark.parametrize("late", [True, False], ids=["set_after_import", "set_before_import"])
def test_interpreter_set_after_triton_import_gets_a_clear_error(late):
    code = (
        "import os\n"
        + ("" if late else "os.environ['TRITON_INTERPRET'] = '1'\n")
        + "import triton\n"
        + ("os.environ['TRITON_INTERPRET'] = '1'\n" if late else "")
        + "from inductor_flex.kernel import interpreter_enabled\n"
        + "try:\n    print('enabled', interpreter_enabled())\nexcept RuntimeError as e:\n    print('error', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env_without_interpreter(), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if late:
        assert "error TRITON_INTERPRET=1 was set after triton had been imported" in res.stdout
    else:
        assert "enabled True" in res.stdout
