"""Peak resident memory of a command: `python -m bench.peak OUT.json module [args...]`.

Runs `python -m module args...` in this process and writes {"peak_rss_gb": ...} to OUT.json.
The peak is VmHWM from /proc/self/status: unlike ru_maxrss, it is not inherited
from the parent process across fork and exec, so it measures this program alone.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 3)
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


if __name__ == "__main__":
    out, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code or 0
    Path(out).write_text(json.dumps({"peak_rss_gb": peak_rss_gb()}))
    sys.exit(code)
