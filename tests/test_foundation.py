"""The foundation: the extension loads, info() tells the truth, backend choice follows its policy."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastattn
from fastattn import _ext, backend
from fastattn.ops import attention as attn_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_loads():
    assert _ext.available(), f"fastattn._C failed to load: {_ext.LOAD_ERROR}"
    assert _ext._C.version() == fastattn.__version__
    assert _ext._C.torch_version().split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.skipif(os.environ.get("FASTATTN_EXPECT_CUDA_BUILD") != "1",
                    reason="only where the build was asked to compile the CUDA sources")
def test_cuda_sources_were_compiled():
    assert _ext._C.compiled_with_cuda()
    assert _ext._C.cuda_archs()
    assert _ext.has_kernel("attention_fwd", "CUDA")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_info_is_truthful():
    d = fastattn.info()
    assert d["torch"] == torch.__version__
    assert d["extension_loaded"] is True
    assert d["gpu_present"] == torch.cuda.is_available()
    assert d["cuda_kernels_compiled"] == _ext._C.compiled_with_cuda()
    flags = _cpu_flags()
    if flags:
        has512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= flags
        has2 = {"avx2", "fma", "bmi2"} <= flags
        expected = "avx512" if has512 else "avx2" if has2 else "baseline"
        assert d["cpu_isa"].startswith(expected), (d["cpu_isa"], expected)
    row = d["ops"]["attention"]
    assert row["cpu_kernel"] == _ext.has_kernel("attention_fwd", "CPU")
    assert row["cuda_kernel"] == _ext.has_kernel("attention_fwd", "CUDA")
    assert row["auto_backend_cpu_tensors"] == ("cpu" if row["cpu_kernel"] else "reference")
    if row["cuda_kernel"]:
        assert row["auto_backend_cuda_tensors"] == "cuda"


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "fastattn", "info", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    d = json.loads(out)
    assert d["fastattn"] == fastattn.__version__ and "ops" in d
    text = subprocess.run([sys.executable, "-m", "fastattn", "info"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert "cpu_isa" in text and "attention" in text


def test_set_backend_validates_and_env_default():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.set_backend("gpu")
    old = fastattn.get_backend()
    try:
        fastattn.set_backend("reference")
        assert fastattn.get_backend() == "reference"
    finally:
        fastattn.set_backend(old)
    code = "import fastattn; print(fastattn.get_backend())"
    env = dict(os.environ, FASTATTN_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match=r"(?s)backend='cuda' cannot run this input.*CUDA tensors"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.scaled_dot_product_attention(q, q, q, backend="nope")


def test_auto_falls_back_with_one_warning(monkeypatch):
    # Make the cpu backend refuse this op, as a kernel that cannot take an input would.
    reasons = {"cpu": lambda: ["a test says no"], "reference": lambda: []}
    backend._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            name = backend.select("attention", "auto", torch.device("cpu"), reasons, native_op="attention_fwd")
    assert name == "reference"
    msgs = [str(x.message) for x in w if "falling back" in str(x.message)]
    assert len(msgs) == 1, msgs
    assert "a test says no" in msgs[0] or "has no CPU kernel" in msgs[0]


def _mix32_scalar(x):
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_dropout_hash_matches_its_spec():
    seed, B, H, L, S, p = 1234567, 2, 3, 5, 7, 0.3
    keep = attn_ops.dropout_keep_mask(seed, B, H, L, S, p)
    thr = attn_ops.dropout_threshold(p)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 6), (0, 1, 3, 2), (1, 0, 2, 5)]:
        row = (b * H + h) * L + i
        hsh = _mix32_scalar(_mix32_scalar(_mix32_scalar(seed) ^ row) ^ j)
        assert bool(keep[b, h, i, j]) == (hsh >= thr)
    big = attn_ops.dropout_keep_mask(7, 4, 4, 64, 64, p)
    assert abs(big.float().mean().item() - (1 - p)) < 0.02


@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_matches_torch(causal):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_bench_cli(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "fastattn", "bench", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no benchmark 'nope'" in bad.stderr and "attention" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "fastattn", "bench", "optim", "--quick", "--out", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    table = (tmp_path / "optim.md").read_text()
    assert "torch fused" in table and "fastattn" in table
    assert (tmp_path / "optim.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# tools/gpu_check.py: its plumbing (steps, time budget, the report in $OUT), with torch told a GPU is
# there; the GPU work itself needs a real one.
# --------------------------------------------------------------------------------------------
_FAKE_GPU = """
import runpy, sys, torch
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda i=0: (9, 0)
torch.cuda.get_device_name = lambda i=0: "fake GPU"
sys.argv = [{script!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def _gpu_check(tmp_path, **env):
    script = os.path.join(ROOT, "tools", "gpu_check.py")
    out = tmp_path / "out"
    out.mkdir()
    full_env = dict(os.environ, OUT=str(out), PYTHONPATH=ROOT, **env)
    p = subprocess.run([sys.executable, "-c", _FAKE_GPU.format(script=script)], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=300)
    reports = sorted(out.glob("gpu-check-*.md"))
    for f in out.glob("gpu-check-*"):  # the same files under reports/ in the checkout
        local = os.path.join(ROOT, "reports", f.name)
        if os.path.exists(local):
            os.remove(local)
    return p, reports


def test_gpu_check_without_gpu_says_so():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 1 and "NO GPU PRESENT" in p.stdout


def test_gpu_check_writes_report_to_out_and_lists_skipped_steps(tmp_path):
    # a budget too small for anything but info: the tests and benchmarks are listed as not run
    p, reports = _gpu_check(tmp_path, GPU_CHECK_STEPS="info,tests,bench", GPU_CHECK_BUDGET="100")
    assert p.returncode == 1, p.stdout + p.stderr  # skipped steps make the check fail, never pass silently
    assert len(reports) == 1, p.stdout + p.stderr
    text = reports[0].read_text()
    assert "GPU: " in text and "steps: info, tests, bench; budget 100s" in text
    assert "## fastattn info" in text and "cpu_gemm" in text
    assert "## Not run (time budget)" in text and "CUDA tests (-m cuda)" in text and "bench_attention.py" in text
    assert "Overall: FAIL" in text


def test_gpu_check_rejects_unknown_steps(tmp_path):
    p, reports = _gpu_check(tmp_path, GPU_CHECK_STEPS="info,benchmark")
    assert p.returncode == 2 and "unknown GPU_CHECK_STEPS ['benchmark']" in p.stdout
