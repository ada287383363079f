"""Peak memory of loading a real-size safetensors checkpoint, as a multiple of the file size.

    python -m benchmarks.load_memory [--preset gpt2-medium] [--dir TMP] [--json OUT] [--keep]

Writes random ``--preset``-shaped float32 weights with ``mapper.save_checkpoint`` (gpt2-medium: ~1.4 GB),
then, for each loader, starts a fresh Python process that imports it, notes its resident set size (RSS),
loads the file and reports the peak RSS (``VmHWM``) above that baseline. The goal for
``mapper.load_checkpoint`` is <= 1.3x the file size (the weights themselves are 1.0x). Linux only
(``/proc/self/status``). Exits 1 when the goal is missed.
"""

from __future__ import annotations

import argparse
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
        [sys.executable, "-m", "benchmarks.load_memory", "--child", loader, str(path)],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_in_this_process(*args.child)))
        return 0

    directory = Path(tempfile.mkdtemp(prefix="load_memory_", dir=args.dir))
    try:
        start = time.perf_counter()
        file = write_checkpoint(args.preset, directory)
        file_size = file.stat().st_size
        elapsed = time.perf_counter() - start
        print(f"wrote {file} ({file_size / 2**20:,.0f} MiB, {args.preset}, float32) in {elapsed:.1f} s")
        rows = []
        for loader in LOADERS:
            r = run_child(loader, directory)
            r.update(loader=loader, file_bytes=file_size, ratio=(r["peak_rss"] - r["baseline_rss"]) / file_size)
            rows.append(r)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    mib = 2**20
    print(f"\n{'loader':<30} {'file MiB':>9} {'peak - base MiB':>16} {'x file':>7} {'seconds':>8}")
    for r in rows:
        peak_above = (r["peak_rss"] - r["baseline_rss"]) / mib
        file_mib = r["file_bytes"] / mib
        print(f"{r['loader']:<30} {file_mib:>9,.0f} {peak_above:>16,.0f} {r['ratio']:>7.2f} {r['seconds']:>8.2f}")
    ours = rows[0]["ratio"]
    verdict = "met" if ours <= GOAL else "MISSED"
    print(f"\nmapper.load_checkpoint peak = {ours:.2f}x the file size (goal <= {GOAL}x): {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "goal": GOAL, "rows": rows}, indent=2) + "\n")
    return 0 if ours <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
