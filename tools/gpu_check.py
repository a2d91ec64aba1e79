#!/usr/bin/env python3
"""`make gpu-check`: everything that needs a GPU, in one command, into one report.

On a CUDA machine: build the extension against the installed torch (`pip install
--no-build-isolation -e .`), run the whole test suite there (GPU tests included, Triton on the GPU),
run a small GPU test under compute-sanitizer when it is installed, run every benchmark, and write
`reports/gpu-check-<time>.md` (machine, versions, pass/fail per test, benchmark tables).
Without a GPU it says so and exits 1.

Environment: GPU_CHECK_QUICK=1 runs the benchmarks with --quick; GPU_CHECK_SKIP_BUILD=1 reuses a build;
FASTATTN_CUDA_ARCHS (default: this GPU's arch).
"""
from __future__ import annotations

import datetime
import glob
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def run(cmd, log, env=None, timeout=None):
    """Run a command, tee its output to `log`, return (exit code, output)."""
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        out, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), 124
        out += f"\n[timed out after {timeout}s]"
    print(out[-4000:], flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}  (exit {rc}, {time.time() - t0:.0f}s)\n{out}")
    return rc, out


def junit_summary(path):
    if not os.path.exists(path):
        return [], {}
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            status = "failed"
        elif case.find("error") is not None:
            status = "error"
        elif case.find("skipped") is not None:
            status = "skipped"
        else:
            status = "passed"
        counts[status] += 1
        rows.append((name, status, float(case.get("time", 0))))
    return rows, counts


def main() -> int:
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed for", PY)
        return 1
    if not torch.cuda.is_available():
        print("gpu-check: NO GPU PRESENT (torch.cuda.is_available() is False). "
              "This target needs a CUDA machine; nothing was run.")
        return 1

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(ROOT, "reports")
    os.makedirs(outdir, exist_ok=True)
    log = os.path.join(outdir, f"gpu-check-{stamp}.log")
    report = os.path.join(outdir, f"gpu-check-{stamp}.md")
    env = dict(os.environ)
    major, minor = torch.cuda.get_device_capability(0)
    env.setdefault("FASTATTN_CUDA_ARCHS", f"{major}{minor}")
    env.setdefault("FASTATTN_FORCE_CUDA", "1")
    env.pop("TRITON_INTERPRET", None)
    sections = []

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    smi = shutil.which("nvidia-smi")
    machine = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() if smi else torch.cuda.get_device_name(0)
    sections.append(f"# fastattn gpu-check {stamp}\n\n- GPU: {machine} (sm_{major}{minor})\n"
                    f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
                    f"python {sys.version.split()[0]}\n- archs built: {env['FASTATTN_CUDA_ARCHS']}\n")

    ok = True
    if os.environ.get("GPU_CHECK_SKIP_BUILD") != "1":
        t0 = time.time()
        rc, _ = run([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], log, env)
        sections.append(f"## Build\n\n`pip install --no-build-isolation -e .`: {'OK' if rc == 0 else 'FAILED'} "
                        f"({time.time() - t0:.0f}s)\n")
        if rc != 0:
            ok = False
            _write(report, sections)
            return 1
    rc, out = run([PY, "-m", "fastattn", "info"], log, env)
    sections.append("## fastattn info\n\n```\n" + out.strip() + "\n```\n")

    junit = os.path.join(outdir, f"junit-{stamp}.xml")
    rc, out = run([PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"], log, env,
                  timeout=3600)
    ok &= rc == 0
    rows, counts = junit_summary(junit)
    lines = [f"## Tests (exit {rc})\n", ", ".join(f"{v} {k}" for k, v in counts.items()) + "\n",
             "| test | result | s |", "|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.2f} |" for n, s, t in rows if s != "passed" or "cuda" in n.lower() or "triton" in n.lower()]
    lines.append("\n(passed CPU-only tests omitted from the table; see the log)\n")
    sections.append("\n".join(lines))

    san = shutil.which("compute-sanitizer") or (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                             "compute-sanitizer"))
    if os.path.exists(san):
        rc, out = run([san, "--tool", "memcheck", "--error-exitcode", "1", PY, "-m", "pytest", "tests", "-q",
                       "-p", "no:cacheprovider", "-k", "cuda_smoke"], log, env, timeout=1200)
        ok &= rc == 0
        sections.append(f"## compute-sanitizer memcheck (tests -k cuda_smoke)\n\nexit {rc}\n\n```\n"
                        + "\n".join(out.strip().splitlines()[-15:]) + "\n```\n")
    else:
        sections.append("## compute-sanitizer\n\nnot installed on this machine: not run\n")

    bench_out = os.path.join(outdir, f"bench-{stamp}")
    for bench in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))):
        cmd = [PY, bench, "--device", "cuda", "--out", bench_out]
        if os.environ.get("GPU_CHECK_QUICK") == "1":
            cmd.append("--quick")
        rc, out = run(cmd, log, env, timeout=1800)
        ok &= rc == 0
        sections.append(f"## {os.path.basename(bench)} (exit {rc})\n")
    for md in sorted(glob.glob(os.path.join(bench_out, "*.md"))):
        with open(md) as f:
            sections.append(f.read())

    sections.append(f"\nOverall: {'PASS' if ok else 'FAIL'}\n")
    _write(report, sections)
    print(f"gpu-check: report written to {report}; overall {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _write(path, sections):
    with open(path, "w") as f:
        f.write("\n".join(sections))
    print("report:", path)


if __name__ == "__main__":
    sys.exit(main())
