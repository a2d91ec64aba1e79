"""Summarise `nvcc --resource-usage` output (stdin): one line per kernel with registers, spills, static smem."""
import re
import subprocess
import sys

rows, cur = [], None
for line in sys.stdin:
    m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2), "spill": "?", "regs": "?", "smem": "0"}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["spill"] = "%s/%s" % m.groups()
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = m.group(1)
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = s.group(1) if s else "0"
names = subprocess.run(["c++filt"], input="\n".join(r["name"] for r in rows), capture_output=True,
                       text=True).stdout.splitlines() if rows else []
for r, n in zip(rows, names):
    n = re.sub(r"^(void )?fastattn::\w+::", "", n).replace("fastattn::cuda_attn::", "")
    print("%-6s regs=%-4s spill(st/ld)=%-8s static_smem=%-6s %s" % (r["arch"], r["regs"], r["spill"], r["smem"], n))
