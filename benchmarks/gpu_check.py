"""``scripts/gpu-check OUT [--budget SECONDS]``: everything a GPU has to prove, in one run that fits a short window.

Three stages, each a child process with its own deadline inside the budget (a stage that overruns is stopped,
reported as such, and the next one still runs):

1. **CUDA tests** (``pytest -m gpu parity_tests``): float32/float64 against transformers' references, bf16
   autocast forward and KV-cache decoding, ``torch.compile`` really compiled, deterministic training, nccl;
2. **GPU benchmark** (``benchmarks.suite`` on the 124M shape, :data:`BENCH_BACKENDS` at :data:`BENCH_POINTS`):
   bf16 autocast with and without ``torch.compile`` beside Hugging Face's model in bf16 on the same GPU, the
   train step at B=16 T=1024 set against the bf16 matmul rate measured in the same run (its MFU), forward at
   T=1024, decoding at batch 1 and 32; it starts no new point after its deadline;
3. **nccl**: one process per GPU (2 when there are 2 or more, else 1) through torchrun: ``set_device``,
   ``init_process_group("nccl", device_id=...)``, an all-reduce with a known sum; with 2 GPUs also a 4-step
   ``gpt2 train`` under DistributedDataParallel.

Into OUT (flat, 8 files at most): ``results.json`` (every stage, the benchmark's whole report inside),
``results.md`` (the stages and the benchmark's tables), the benchmark's three plots, and one log per stage.
Progress goes to the terminal as it happens. It installs nothing: it runs with the interpreter that started
it (``scripts/gpu-check`` picks one whose torch sees a GPU). Without a GPU it is a dry run: it says what it would
run and exits 0, writing nothing (CI runs it so). A GPU that torch cannot use (a CPU build of torch, say) is
an error with the way out, never a dry run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("tests", "bench", "nccl")
SHARE = {"tests": 0.30, "bench": 0.60, "nccl": 0.10}  # of the budget; a stage also gets what earlier ones left
DEFAULT_BUDGET = 360.0  # two runs and two machine starts fit a 15-minute GPU window
BENCH_BACKENDS = ("torch-cuda-bf16", "torch-cuda-bf16-compile", "hf-cuda-bf16")
# the goals' points first, so that a run short of time still measures them
BENCH_POINTS = (("train", 16, 1024), ("decode", 1, 128), ("decode", 32, 128), ("decode", 1, 1024),
                ("decode", 32, 1024), ("forward", 1, 1024), ("forward", 16, 1024))
# the modules the library imports at the top and the GPU tests need (rouge-score, imported only by the instruct eval,
# is not among them): a GPU image's own
# Python may lack some (google_crc32c, imported by the mapper's TF reader, is not in the usual CUDA images)
NEEDED_MODULES = ("numpy", "torch", "safetensors", "tiktoken", "google_crc32c", "huggingface_hub", "transformers",
                  "pytest", "hypothesis", "matplotlib", "threadpoolctl", "tqdm")
CUDA_TORCH_HELP = ("install a CUDA build of torch: `GPT2_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 "
                   "bash scripts/setup` (the README's GPU section), or run with an interpreter whose torch has CUDA: "
                   "`GPT2_PYTHON=/path/to/python bash scripts/gpu-check OUT`")


def say(line: str) -> None:
    print(f"gpu-check: {line}", flush=True)


# ---------------------------------------------------------------------------------------------- what is here


def gpu_hardware() -> list[str]:
    """The NVIDIA GPUs the driver lists (``nvidia-smi -L``), whatever torch makes of them; [] when none."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
            gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ["/dev/nvidia0 (nvidia-smi unavailable)"] if Path("/dev/nvidia0").exists() else []


def preflight() -> dict:
    """Python, the modules the stages import, torch's build and the GPUs it sees, the GPUs the driver lists."""
    info: dict = {"python": sys.executable, "python_version": sys.version.split()[0],
                  "missing_modules": [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None],
                  "gpu_hardware": gpu_hardware(), "torch": None, "torch_cuda": None, "cuda_devices": []}
    if "torch" not in info["missing_modules"]:
        import torch

        info["torch"], info["torch_cuda"] = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def problem(info: dict) -> str | None:
    """Why the stages cannot run on a machine that has a GPU (one line with the way out), or None."""
    if info["missing_modules"]:
        return (f"{info['python']} lacks {', '.join(info['missing_modules'])}: run `bash scripts/setup` (see the "
                "README's GPU section) or point GPT2_PYTHON at an interpreter that has them")
    if info["torch_cuda"] is None:
        return f"torch {info['torch']} in {info['python']} has no CUDA (a CPU build); {CUDA_TORCH_HELP}"
    if not info["cuda_devices"]:
        return (f"torch {info['torch']} (CUDA {info['torch_cuda']}) sees no GPU although the driver lists "
                f"{'; '.join(info['gpu_hardware'])}: check CUDA_VISIBLE_DEVICES and that the driver supports CUDA "
                f"{info['torch_cuda']}")
    return None


# ---------------------------------------------------------------------------------------------- the stages


def tests_command(junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
            f"--junitxml={junit}", str(REPO / "parity_tests")]


def bench_command(out: Path, deadline: float) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check", "--bench-worker", str(out), "--deadline", str(deadline)]


def nccl_command(n_processes: int) -> list[str]:
    """torchrun with ``n_processes`` ranks running :func:`nccl_worker` (also what the nccl test runs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n_processes}",
            "-m", "benchmarks.gpu_check", "--nccl-worker"]


def ddp_train_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gpt2_cli",
            "train", "--backend", "torch", "--device", "cuda", "--data", str(REPO / "data" / "the-verdict.txt"),
            "--out", str(out), "--config", "n_layer=2,n_embd=64,n_head=4", "--context", "64", "--stride", "64",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--sample-tokens", "4", "--quiet"]


def run_stage(command: list[str], log: Path, seconds: float, env: dict[str, str] | None = None) -> dict:
    """Run ``command`` (output shown and copied to ``log``) for at most ``seconds``; its process group is stopped
    after that. Returns {"returncode", "seconds", "timed_out"}."""
    start = time.monotonic()
    say(f"$ {shown(command)}   (at most {seconds:.0f} s)")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            while proc.poll() is None or _drain(proc, sink):
                if time.monotonic() - start > seconds and proc.poll() is None:
                    timed_out = True
                    _stop(proc)
                _drain(proc, sink)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                _stop(proc)
    elapsed = time.monotonic() - start
    result = {"returncode": proc.returncode, "seconds": round(elapsed, 1), "timed_out": timed_out}
    say(f"  -> exit {proc.returncode} after {elapsed:.0f} s" + (" (stopped: out of time)" if timed_out else ""))
    return result


def _drain(proc: subprocess.Popen, sink) -> bool:
    """Copy what the child has written so far to the terminal and the log; True if there was something."""
    data = proc.stdout.read() if proc.stdout is not None else None
    if not data:
        return False
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    sink.write(data)
    return True


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (it started one: torchrun and pytest have children), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def junit_counts(path: Path) -> dict:
    """Counts and failing test names from pytest's JUnit XML (empty when pytest wrote none)."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


# ---------------------------------------------------------------------------------------------- the run


def shown(command: list[str]) -> str:
    """A command as the plan prints it: paths inside the checkout relative to it (the stages run from there)."""
    return " ".join(part.replace(f"{REPO}{os.sep}", "") for part in command)


def plan_lines(out: Path, budget: float, stages: tuple[str, ...]) -> list[str]:
    lines = [f"budget {budget:.0f} s, into {out}/ (results.json, results.md, the plots, a log per stage):"]
    if "tests" in stages:
        lines.append(f"1. CUDA tests, <= {SHARE['tests'] * budget:.0f} s: {shown(tests_command(Path('JUNIT')))}")
    if "bench" in stages:
        points = ", ".join(f"{w} B={b} {'context ' if w == 'decode' else 'T='}{t}" for w, b, t in BENCH_POINTS)
        lines.append(f"2. GPU benchmark, <= {SHARE['bench'] * budget:.0f} s: GPT-2 124M, {', '.join(BENCH_BACKENDS)}"
                     f" at {points}; MFU against the bf16 matmul rate measured in the run")
    if "nccl" in stages:
        lines.append(f"3. nccl check, <= {SHARE['nccl'] * budget:.0f} s: {shown(nccl_command(1))} (2 processes "
                     "and a 2-process gpt2 train when there are 2 GPUs)")
    return lines


def run(out: Path, budget: float, stages: tuple[str, ...]) -> int:
    from benchmarks.suite import add_hf_ratios, evaluate_goals

    start = time.monotonic()
    info = preflight()
    if not info["gpu_hardware"] and not info["cuda_devices"]:
        say("dry run: no CUDA GPU on this machine (the driver lists none), so nothing is measured and nothing is "
            f"written; with a GPU it would run (python {info['python_version']}, torch {info['torch']}, CUDA "
            f"{info['torch_cuda']}):")
        for line in plan_lines(out, budget, stages):
            say("  " + line)
        return 0
    reason = problem(info)
    if reason:
        say(f"error: {reason}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    say(f"{', '.join(info['cuda_devices'])}; torch {info['torch']} (CUDA {info['torch_cuda']}); "
        f"python {info['python_version']}")
    for line in plan_lines(out, budget, stages):
        say(line)
    report: dict = {"preflight": info, "budget_s": budget, "stages": {}, "bench": None}

    def left() -> float:
        return budget - (time.monotonic() - start)

    def allowance(stage: str) -> float:
        later = sum(SHARE[s] for s in STAGES[STAGES.index(stage) + 1:] if s in stages)
        return max(0.0, left() - later * budget - 5.0)  # 5 s to write the results

    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        if "tests" in stages:
            say("stage 1/3: CUDA tests")
            junit = scratch / "cuda-tests.xml"
            result = run_stage(tests_command(junit), out / "cuda-tests.log", allowance("tests"),
                               {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
            result |= junit_counts(junit)
            result["passed"] = result["returncode"] == 0 and not result["timed_out"]
            report["stages"]["tests"] = result
        if "bench" in stages:
            say("stage 2/3: GPU benchmark")
            seconds = allowance("bench")
            bench_dir = scratch / "bench"
            # the suite stops starting points 45 s before the stage's end: the last one and the writing fit
            result = run_stage(bench_command(bench_dir, time.time() + seconds - 45), out / "bench.log", seconds)
            if (bench_dir / "results.json").is_file():  # written after every point: a stopped run keeps its points
                report["bench"] = json.loads((bench_dir / "results.json").read_text())
                add_hf_ratios(report["bench"]["results"])  # again: a stopped run wrote neither
                report["bench"]["goals"] = evaluate_goals(report["bench"]["results"])
                for png in bench_dir.glob("*.png"):
                    shutil.move(png, out / png.name)
            result["passed"] = result["returncode"] == 0 and not result["timed_out"] and report["bench"] is not None
            report["stages"]["bench"] = result
        if "nccl" in stages:
            say("stage 3/3: nccl")
            n = min(2, len(info["cuda_devices"]))
            result = run_stage(nccl_command(n), out / "nccl.log", allowance("nccl"))
            result["processes"] = n
            if n == 2 and result["returncode"] == 0:
                ddp = run_stage(ddp_train_command(scratch / "ddp-run"), out / "nccl.log", max(left() - 5.0, 0.0))
                result["ddp_train"] = ddp
                result["returncode"] = ddp["returncode"]
                result["timed_out"] = result["timed_out"] or ddp["timed_out"]
            result["passed"] = result["returncode"] == 0 and not result["timed_out"]
            report["stages"]["nccl"] = result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render(report) + "\n")
    failed = [name for name, stage in report["stages"].items() if not stage["passed"]]
    say(f"{'FAILED: ' + ', '.join(failed) if failed else 'all stages passed'} in {report['elapsed_s']:.0f} s; "
        f"wrote {out}/results.json and results.md")
    return 1 if failed else 0


def render(report: dict) -> str:
    """results.md: the stages, then the benchmark's own tables."""
    from benchmarks.suite import Report, render_markdown

    info = report["preflight"]
    lines = [f"# gpu-check: {', '.join(info['cuda_devices'])}", "",
             f"torch {info['torch']} (CUDA {info['torch_cuda']}), python {info['python_version']}; budget "
             f"{report['budget_s']:.0f} s, took {report['elapsed_s']:.0f} s.", "",
             "| stage | result | seconds | detail |", "|---|---|---|---|"]
    for name, stage in report["stages"].items():
        detail = ""
        if name == "tests" and "tests" in stage:
            detail = (f"{stage['tests']} tests, {stage['failures']} failed, {stage['errors']} errors, "
                      f"{stage['skipped']} skipped" + (f": {', '.join(stage['failed'])}" if stage["failed"] else ""))
        if name == "nccl":
            detail = f"{stage['processes']} process(es)" + (", then a 2-process gpt2 train" if "ddp_train" in stage
                                                             else "")
        status = "passed" if stage["passed"] else ("out of time" if stage["timed_out"] else "FAILED")
        lines.append(f"| {name} | {status} | {stage['seconds']:.0f} | {detail} |")
    if report["bench"]:
        lines += ["", render_markdown(Report(**report["bench"]))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the children


def bench_worker(out: Path, deadline: float) -> int:
    """The benchmark stage, in its own process: the suite on :data:`BENCH_POINTS`, its tables printed."""
    from benchmarks.suite import Settings, render_markdown
    from benchmarks.suite import run as run_suite

    settings = Settings(quick=True, backends=BENCH_BACKENDS, points=BENCH_POINTS, deadline=deadline)
    report = run_suite(settings, out, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render_markdown(report), flush=True)
    return 0


def nccl_worker() -> int:
    """One torchrun rank: its GPU, an nccl group bound to it, an all-reduce whose sum is known, a barrier."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        value = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(value)
        dist.barrier()
        expected = world * (world + 1) / 2
        if value.tolist() != [expected] * 4:
            print(f"nccl rank {rank}: all-reduce gave {value.tolist()}, expected {expected}", flush=True)
            return 1
    finally:
        dist.destroy_process_group()
    print(f"nccl ok: rank {rank} of {world} on {torch.cuda.get_device_name(device)}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for results.json, results.md, plots and logs")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"wall-clock seconds for the whole check (default {DEFAULT_BUDGET:.0f})")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, from {', '.join(STAGES)} (default: all three)")
    parser.add_argument("--bench-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        return nccl_worker()
    if args.bench_worker is not None:
        return bench_worker(args.bench_worker, args.deadline)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if args.out is None or unknown or not stages or not args.budget > 0:
        parser.error(f"unknown stage(s) {unknown}" if unknown else "give OUT, a positive --budget and some --stages")
    return run(args.out, args.budget, stages)


if __name__ == "__main__":
    sys.exit(main())
