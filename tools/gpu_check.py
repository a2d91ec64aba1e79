#!/usr/bin/env python3
"""`make gpu-check`: everything that needs a GPU, in one command, into one report.

On a CUDA machine: build the extension against the installed torch (`pip install --no-build-isolation
-e .`), run the GPU tests (everything marked ``cuda``, and the Triton tests, whose kernels then run on the
GPU; the CPU tests are CI's job), a small GPU test under compute-sanitizer when it is installed, and
the benchmarks; write `reports/gpu-check-<time>.md` (machine, versions, pass/fail per test, benchmark tables).
Without a GPU it says so and exits 1.

Made for the lent GPU machines (10 minutes a command, 30 device-minutes a session, a machine that starts
bare): the steps share a time budget (``GPU_CHECK_BUDGET`` seconds, default 560) and a step that would
not fit is skipped and listed as such; the report is rewritten after every step, and copied to ``$OUT``
when that is set, so a run cut off still leaves what it finished. The test step compiles one Triton
config per kernel variant (``FASTATTN_TRITON_TUNE=first``; tuning is the benchmarks' business).

Environment: GPU_CHECK_STEPS (comma list of build, info, tests, sanitizer, bench; default all),
GPU_CHECK_BUDGET, GPU_CHECK_QUICK=1 (benchmarks with --quick), GPU_CHECK_SKIP_BUILD=1 (= drop "build"),
FASTATTN_CUDA_ARCHS (default: this GPU's arch).

A first session with a GPU: `make gpu-check PYTHON=python3` (one call, about 10 minutes), then, if device
time is left, `GPU_CHECK_STEPS=build,bench make gpu-check ...` for fuller benchmarks (a lent machine is
given back seconds after a call, so the next one starts bare and rebuilds).
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


STEPS = ("build", "info", "tests", "sanitizer", "bench")


class Report:
    """The report's sections, rewritten to disk (and to $OUT) after every step."""

    def __init__(self, path: str, log: str):
        self.path, self.log, self.sections = path, log, []

    def add(self, text: str) -> None:
        self.sections.append(text)
        _write(self.path, self.sections)
        out = os.environ.get("OUT")
        if out and os.path.isdir(out):
            shutil.copy(self.path, os.path.join(out, os.path.basename(self.path)))
            if os.path.exists(self.log):  # the log's tail (the device returns files up to 16 MiB)
                with open(self.log, "rb") as f:
                    f.seek(max(0, os.path.getsize(self.log) - 8_000_000))
                    tail = f.read()
                with open(os.path.join(out, os.path.basename(self.log)), "wb") as f:
                    f.write(tail)


def verbose_summary(out: str):
    """(rows, counts) from pytest -v lines ("path::test PASSED [ 3%]"), for a run cut off before its junit file."""
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            status = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error"}[parts[1]]
            counts[status] += 1
            rows.append((parts[0], status, 0.0))
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

    t_start = time.time()
    budget = float(os.environ.get("GPU_CHECK_BUDGET", "560"))
    steps = [x.strip() for x in os.environ.get("GPU_CHECK_STEPS", ",".join(STEPS)).split(",") if x.strip()]
    unknown = [x for x in steps if x not in STEPS]
    if unknown:
        print(f"gpu-check: unknown GPU_CHECK_STEPS {unknown}; known: {', '.join(STEPS)}")
        return 2
    if os.environ.get("GPU_CHECK_SKIP_BUILD") == "1" and "build" in steps:
        steps.remove("build")

    def left() -> float:
        return budget - (time.time() - t_start)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(ROOT, "reports")
    os.makedirs(outdir, exist_ok=True)
    log = os.path.join(outdir, f"gpu-check-{stamp}.log")
    report = Report(os.path.join(outdir, f"gpu-check-{stamp}.md"), log)
    env = dict(os.environ)
    major, minor = torch.cuda.get_device_capability(0)
    env.setdefault("FASTATTN_CUDA_ARCHS", f"{major}{minor}")
    env.setdefault("FASTATTN_FORCE_CUDA", "1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    env.pop("TRITON_INTERPRET", None)

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    smi = shutil.which("nvidia-smi")
    machine = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() if smi else torch.cuda.get_device_name(0)
    report.add(f"# fastattn gpu-check {stamp}\n\n- GPU: {machine} (sm_{major}{minor})\n"
               f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
               f"python {sys.version.split()[0]}\n- archs built: {env['FASTATTN_CUDA_ARCHS']}\n"
               f"- steps: {', '.join(steps)}; budget {budget:.0f}s\n")

    ok, skipped = True, []
    if "build" in steps:
        t0 = time.time()
        rc, _ = run([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], log, env,
                    timeout=max(60, left() - 60))
        report.add(f"## Build\n\n`pip install --no-build-isolation -e .`: {'OK' if rc == 0 else 'FAILED'} "
                   f"({time.time() - t0:.0f}s)\n")
        if rc != 0:
            report.add("\nOverall: FAIL (build)\n")
            return 1
    if "info" in steps:
        rc, out = run([PY, "-m", "fastattn", "info"], log, env, timeout=120)
        report.add("## fastattn info\n\n```\n" + out.strip() + "\n```\n")

    if "tests" in steps:
        # the GPU tests: every test marked cuda, then the Triton ones (their kernels run on the GPU here;
        # the AOT compile test is CI's)
        tenv = dict(env, FASTATTN_TRITON_TUNE="first")
        for name, args, cap in (("CUDA tests (-m cuda)", ["tests", "-m", "cuda"], 0.55),
                                ("Triton tests on the GPU (-k triton)",
                                 ["tests", "-m", "not cuda", "-k", "triton and not aot"], 1.0)):
            t_left = left() - 120  # keep time for the sanitizer and a quick benchmark
            if t_left < 60:
                skipped.append(name)
                continue
            junit = os.path.join(outdir, f"junit-{stamp}-{len(report.sections)}.xml")
            rc, out = run([PY, "-m", "pytest", *args, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                          log, tenv, timeout=t_left * cap)
            ok &= rc == 0
            rows, counts = junit_summary(junit)
            if not rows:  # killed by the budget before pytest wrote its junit file: read the -v lines so far
                rows, counts = verbose_summary(out)
            lines = [f"## {name} (exit {rc}{', timed out' if rc == 124 else ''})\n",
                     ", ".join(f"{v} {k}" for k, v in counts.items()) + "\n", "| test | result | s |", "|---|---|---|"]
            lines += [f"| {n} | {st} | {t:.2f} |" for n, st, t in rows if st != "skipped"]
            if rc not in (0, 5):
                lines.append("\n```\n" + "\n".join(out.strip().splitlines()[-40:]) + "\n```\n")
            report.add("\n".join(lines))

    if "sanitizer" in steps:
        san = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                "bin", "compute-sanitizer")
        if not os.path.exists(san):
            report.add("## compute-sanitizer\n\nnot installed on this machine: not run\n")
        elif left() < 90:
            skipped.append("compute-sanitizer")
        else:
            rc, out = run([san, "--tool", "memcheck", "--error-exitcode", "1", PY, "-m", "pytest", "tests", "-q",
                           "-p", "no:cacheprovider", "-k", "cuda_smoke"], log, env, timeout=min(300, left() - 60))
            ok &= rc == 0
            report.add(f"## compute-sanitizer memcheck (tests -k cuda_smoke)\n\nexit {rc}\n\n```\n"
                       + "\n".join(out.strip().splitlines()[-15:]) + "\n```\n")

    if "bench" in steps:
        bench_out = os.path.join(outdir, f"bench-{stamp}")
        for bench in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py"))):
            name = os.path.basename(bench)
            if left() < 45:
                skipped.append(name)
                continue
            cmd = [PY, bench, "--device", "cuda", "--out", bench_out]
            if os.environ.get("GPU_CHECK_QUICK") == "1" or left() < 400:
                cmd.append("--quick")  # a full run does not fit what is left of the budget
            rc, out = run(cmd, log, env, timeout=left() - 20)
            ok &= rc == 0
            tables = [open(md).read() for md in sorted(glob.glob(os.path.join(bench_out, "*.md")))
                      if os.path.getmtime(md) >= time.time() - 1200 and name[6:-3] in os.path.basename(md)]
            report.add(f"## {name} (exit {rc}{', --quick' if '--quick' in cmd else ''})\n\n" + "\n".join(tables))

    if skipped:
        report.add("## Not run (time budget)\n\n" + "\n".join(f"- {x}" for x in skipped) + "\n")
        ok = False
    report.add(f"\nOverall: {'PASS' if ok else 'FAIL'} ({time.time() - t_start:.0f}s)\n")
    print(f"gpu-check: report written to {report.path}; overall {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _write(path, sections):
    with open(path, "w") as f:
        f.write("\n".join(sections))
    print("report:", path)


if __name__ == "__main__":
    sys.exit(main())
