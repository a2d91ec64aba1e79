"""The Triton kernels compile for a GPU (sm_90 and sm_80) here, without one (fastattn/triton/aot.py).

The interpreter tests check the kernels' arithmetic; this checks what the interpreter never sees: that Triton's
real compiler takes every kernel our ops launch (one autotune config each here; `python -m fastattn.triton.aot
--arch 90` compiles them all). It runs in a subprocess because the kernels must be defined without
TRITON_INTERPRET=1.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _named_signatures() -> bool:
    import inspect
    from triton.compiler import ASTSource
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


pytestmark = pytest.mark.skipif(not _named_signatures(), reason="Triton < 3.3: no named-signature ASTSource")


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    ops = "attention,conv2d,lstm,optim,linear" if arch == 90 else "attention"
    r = subprocess.run([sys.executable, "-m", "fastattn.triton.aot", "--arch", str(arch), "--first-config",
                        "--ops", ops], env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = r.stdout.strip().splitlines()
    assert any(line.startswith(f"sm_{arch}:") and line.endswith(" 0 failures") for line in summary), r.stdout[-2000:]
    compiled = [line for line in summary if line.startswith("ok ")]
    kernels = {line.split()[1] for line in compiled}
    expected = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_bwd_delta", "_attn_fwd_decode",
                "_attn_decode_reduce"}
    if arch == 90:
        expected |= {"_conv2d_fwd_kernel", "_conv2d_bwd_data_kernel", "_conv2d_bwd_weight_kernel",
                     "_gates_fwd_kernel", "_gates_bwd_kernel", "_sgd_kernel", "_adam_kernel",
                     "_linear_gemm_kernel", "_linear_colsum_kernel"}
    assert expected <= kernels, f"not compiled: {sorted(expected - kernels)}"


def test_a_broken_kernel_is_reported(tmp_path):
    """The check can fail: a kernel the compiler rejects (a tl.dot on 8-row blocks) comes back as a failure."""
    code = r'''
import torch, triton, triton.language as tl
from fastattn.triton import aot
from fastattn.triton._compat import launcher

@triton.jit
def bad(X, BLOCK: tl.constexpr):
    a = tl.load(X + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :])
    tl.store(X + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], tl.dot(a, a))

log = []
with aot.compiling_for(90, log):
    launcher(bad)[(1,)](torch.empty(64, dtype=torch.float16), BLOCK=8)
print("FAILURES", len(aot.failures(log)))
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "broken_kernel.py"  # Triton reads a kernel's source from its file
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert "FAILURES 1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real tests run the kernels")
def test_refuses_the_interpreter(monkeypatch):
    from fastattn.triton import aot
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_all(90, ops=["lstm"])
