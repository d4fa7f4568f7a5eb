"""Every kernel specialization the interpreter tests run also compiles to sm_90 cubin (forward,
backward and decode, one test each)."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU suite compiles these for real")
@pytest.mark.parametrize("kind", ["forward", "backward", "decode"])
def test_specializations_compile_for_sm90(kind):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SM90_ONLY"] = kind
    script = os.path.join(os.path.dirname(__file__), "sm90_matrix.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=3000)
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-4000:]
    assert "specializations compiled for sm_90" in res.stdout
