"""Peak memory of loading a real-size safetensors checkpoint, as a multiple of the file size
(``gpt2 bench --workloads load``).

Writes random preset-shaped float32 weights with ``mapper.save_checkpoint`` (gpt2-medium: ~1.4 GB), then, for
each loader, starts a fresh Python process (``python -m benchmarks.load_memory LOADER PATH``) that imports it,
notes its resident set size (RSS), loads the file and reports the peak RSS (``VmHWM``) above that baseline.
The goal for ``mapper.load_checkpoint`` is <= 1.3x the file size (the weights themselves are 1.0x). Linux
only (``/proc/self/status``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.3

# Each loader runs in its own process: an import line, then a call that returns the arrays.
LOADERS = {
    "mapper.load_checkpoint": ("from mapper.checkpoint import load_checkpoint", "load_checkpoint(path)[1]"),
    "safetensors.numpy.load_file": (
        "from safetensors.numpy import load_file",
        "load_file(os.path.join(path, 'model.safetensors'))",
    ),
}


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: ``VmRSS`` (now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_in_this_process(loader: str, path: str) -> dict[str, float]:
    """Run one loader here (call this in a fresh process); RSS figures in bytes."""
    import_line, call = LOADERS[loader]
    scope: dict[str, object] = {"os": os, "path": path}
    exec(import_line, scope)  # the loader's imports belong to the baseline, not to the load
    baseline = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    params = eval(call, scope)
    seconds = time.perf_counter() - start
    return {
        "baseline_rss": baseline,
        "peak_rss": proc_status_bytes("VmHWM"),
        # ru_maxrss is kept for reference only: Linux carries the parent's peak into a child started by
        # vfork + exec (as subprocess does), so here it reads as this script's own ~1.1x-the-file peak.
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "after_rss": proc_status_bytes("VmRSS"),
        "params_bytes": sum(a.nbytes for a in params.values()),
        "seconds": seconds,
    }


def run_child(loader: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.load_memory", loader, str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_checkpoint(preset: str, directory: Path) -> Path:
    from mapper.checkpoint import save_checkpoint
    from mapper.config import GPT2Config
    from mapper.schema import init_params

    config = GPT2Config.from_preset(preset)
    save_checkpoint(init_params(config, seed=0, dtype="float32"), config, directory)
    return directory / "model.safetensors"


def measure(preset: str, directory: Path | None = None) -> list[dict[str, object]]:
    """One row per loader: peak RSS above the baseline as a multiple of the file size, and the seconds."""
    workdir = Path(tempfile.mkdtemp(prefix="load_memory_", dir=directory))
    try:
        file = write_checkpoint(preset, workdir)
        file_size = file.stat().st_size
        rows = []
        for loader in LOADERS:
            r = run_child(loader, workdir)
            rows.append({**r, "size": preset, "workload": "load", "backend": loader, "file_bytes": file_size,
                         "times_file_size": (r["peak_rss"] - r["baseline_rss"]) / file_size, "goal": GOAL})
        return rows
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":  # the child: one loader in a fresh process
    print(json.dumps(measure_in_this_process(sys.argv[1], sys.argv[2])))
