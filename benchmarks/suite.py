"""``gpt2 bench``: NumPy-CPU vs torch-CPU vs torch-GPU vs Hugging Face, side by side, against the machine's limits.

For every measured point (size, workload, batch, length) the backends on one device run alternately within
each repeat, in a rotating order, on the same inputs, so the noise of a shared machine hits them alike; on the
CPU a 0.2 s pause separates calls of different libraries (torch's OpenMP threads and OpenBLAS's threads both
spin for a while after a parallel op and would slow the other). Each backend makes two untimed calls first: a
warm-up, then one that measures its peak memory in steady state (optimizer state already allocated).
Reported: median, min and max seconds; GFLOP/s and the fraction of the machine's best matmul rate measured
beside the point (forward, train; bf16 rows against the bf16 rate); ms per token, tokens/s and the bytes a
step must read (the weights and the KV cache) against the measured memory bandwidth (decode); the time ratio
against Hugging Face on the same device at the same precision. ``-compile`` rows are timed under
``torch.compiler.set_stance("fail_on_recompile")``, so each timed call ran the compiled graph (a call that
would compile again, or fall back to eager, raises and stops the bench); they have no decode rows, since
decoding runs eager.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import limits
from benchmarks.backends import ALL_BACKENDS, GROUPS, BackendSpec, BenchModel, unavailable_reason
from benchmarks.common import (
    HeapPeak,
    decode_bytes,
    default_threads,
    forward_flops,
    machine,
    pin_threads,
    summary,
    timed,
    train_step_flops,
)
from mapper.atomic import atomic_write
from mapper.config import PRESETS, GPT2Config
from mapper.schema import count_params, init_params

WORKLOADS = ("forward", "train", "decode")
EXTRA_WORKLOADS = {  # opt-in with --workloads
    "load": "peak memory of loading a checkpoint of each size (fresh processes), as a multiple of its file size",
    "tricks": "what each speed trick of numpy_gpt2/fast.py buys, op by op (GPT-2 124M shape)",
}
DEFAULT_BACKENDS = ("numpy", "torch-cpu", "torch-cuda", "hf")
COMPILED_DECODE_REASON = ("decode: torch.compile covers the full-sequence forward and decoding runs eager, so a "
                          "-compile decode row would repeat the eager one")


@dataclass(frozen=True)
class Point:
    """One measurement: ``T`` is the sequence length (forward, train) or the context reached (decode)."""

    size: str
    workload: str
    device: str
    B: int
    T: int
    new_tokens: int = 0

    @property
    def label(self) -> str:
        what = f"context {self.T}" if self.workload == "decode" else f"T={self.T}"
        return f"{self.size} {self.workload} {self.device} B={self.B} {what}"


@dataclass
class Settings:
    quick: bool = False
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    sizes: tuple[str, ...] = ("gpt2",)
    workloads: tuple[str, ...] = WORKLOADS
    threads: int = field(default_factory=default_threads)
    repeats: int | None = None
    seed: int = 0
    config: str | None = None  # a GPT2Config.from_spec string: measure this shape (named "custom") instead of sizes
    # (workload, B, T) to measure on every device, in this order, instead of the plan (scripts/gpu-check's)
    points: tuple[tuple[str, int, int], ...] | None = None
    deadline: float | None = None  # time.time() after which no new point starts (the rest are skipped, named)

    def model_config(self, size: str) -> GPT2Config:
        return GPT2Config.from_spec(None, self.config) if size == "custom" else GPT2Config.from_preset(size)

    @property
    def size_names(self) -> tuple[str, ...]:
        return ("custom",) if self.config else self.sizes

    @property
    def n_repeats(self) -> int:
        return self.repeats or (3 if self.quick else 5)


@dataclass
class Report:
    settings: dict
    machine: dict = field(default_factory=dict)
    threads: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)


def resolve_backends(names: tuple[str, ...]) -> list[BackendSpec]:
    """Group names (numpy, torch-cpu, torch-cuda, hf) and single backend names -> specs, in a fixed order."""
    chosen = set()
    for name in names:
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in ALL_BACKENDS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join([*GROUPS, *ALL_BACKENDS])}")
    return [spec for name, spec in ALL_BACKENDS.items() if name in chosen]


def plan(settings: Settings, size: str, device: str) -> list[Point]:
    """The points measured for one size on one device: the goals' points plus sweeps over T and batch."""
    config = settings.model_config(size)
    P, q = config.n_positions, settings.quick
    points: list[Point] = []
    if settings.points is not None:
        new_tokens = min(16 if q else 32, P // 2)
        for workload, B, T in settings.points:
            if workload in settings.workloads:
                T = max(min(T, P), new_tokens + 2) if workload == "decode" else min(T, P)
                points.append(Point(size, workload, device, B, T, new_tokens if workload == "decode" else 0))
        return list(dict.fromkeys(points))
    if device == "cpu":
        forward = [(1, t) for t in ((64, 256, 1024) if q else (64, 128, 256, 512, 1024))]
        forward += [] if q else [(b, 256) for b in (2, 4, 8)]
        train = [(4, 64)] + ([] if q else [(4, 128), (4, 256), (1, 64), (2, 64), (8, 64)])
        decode = [(1, c) for c in ((64, 128, 1024) if q else (64, 128, 256, 512, 1024))]
        new_tokens = 8 if q else 16
    else:
        forward = [(1, t) for t in (64, 256, 1024)] + [(b, 1024) for b in ((16,) if q else (4, 16, 32))]
        train = [(16, 1024)] + ([] if q else [(4, 256), (8, 1024)])
        decode = [(b, c) for b in (1, 32) for c in ((128, 1024) if q else (64, 128, 256, 1024))]
        new_tokens = 16 if q else 32
    new_tokens = min(new_tokens, P // 2)
    if "forward" in settings.workloads:
        points += [Point(size, "forward", device, b, min(t, P)) for b, t in forward]
    if "decode" in settings.workloads:
        points += [Point(size, "decode", device, b, max(min(c, P), new_tokens + 2), new_tokens) for b, c in decode]
    if "train" in settings.workloads:
        points += [Point(size, "train", device, b, min(t, P)) for b, t in train]
    return list(dict.fromkeys(points))  # a small context folds several lengths into one point


def memory_needed(config: GPT2Config, specs: list[BackendSpec], points: list[Point]) -> int:
    """Bytes the models of ``specs`` need together for ``points``: float32 weights, plus gradients and AdamW's two
    moments when a point trains, plus the activations of the largest point (its logits three times over, as
    logits, softmax and their gradient, and ~40 [rows, C] arrays per block; decoding's KV cache at its context).
    The activations are those of the plan's own points: a margin sized for B=4 T=1024 left the 124M shape's
    quick CPU plan (at most 1,024 rows) "needing" 19 GiB for its six models, and skipped on a 24 GiB machine."""
    P = count_params(config)
    C, L, V = config.n_embd, config.n_layer, config.vocab_size  # noqa: N806
    trains = any(p.workload == "train" for p in points)
    per_model = 4 * P * (4 if trains else 1)
    rows = max([p.B * p.T for p in points if p.workload != "decode"], default=0)
    kv_cache = max([2 * p.B * p.T * C * L for p in points if p.workload == "decode"], default=0)
    activations = 4 * max(rows * (3 * V + 40 * C * L), kv_cache + 8 * max([p.B for p in points], default=0) * V)
    copies = sum(1 for s in specs if s.family != "numpy") + (1 if any(s.family == "numpy" for s in specs) else 0)
    return copies * per_model + activations


def available_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


class Runner:
    """Runs the plan, alternating backends within each repeat, and collects one result row per backend."""

    def __init__(self, settings: Settings, machine_limits: dict[str, dict],
                 progress: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.limits = machine_limits
        self.progress = progress or (lambda n: None)
        self.heap = HeapPeak()

    def run_point(self, point: Point, backends: list[BenchModel], probe_scale: float) -> list[dict]:
        if point.workload == "decode":
            backends = [b for b in backends if not b.spec.compile]  # decoding runs eager: an eager duplicate
        if not backends:
            return []
        config = backends[0].config
        rng = np.random.default_rng(self.settings.seed)
        if point.workload == "decode":
            # the prefill's token and new_tokens timed steps follow the prompt, so the cache ends at T
            data = rng.integers(0, config.vocab_size, (point.B, point.T - point.new_tokens - 1))
        else:
            data = rng.integers(0, config.vocab_size, (point.B, point.T + 1))
        calls: dict[str, Callable[[], object]] = {}
        memory: dict[str, float | None] = {}
        for backend in backends:
            fn = self._workload(backend, point, data)
            fn()  # warm-up: first-touch memory, lazily created optimizer state, oneDNN's primitive cache
            memory[backend.spec.name] = self._peak_memory(backend, fn)
            calls[backend.spec.name] = fn
            self.progress(1)
        limit_before = limits.quick_cpu_limit() if point.device == "cpu" else None
        by_name = {backend.spec.name: backend for backend in backends}
        times: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        previous_family = None
        for r in range(self.settings.n_repeats):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: nobody always goes first
            for name in order:
                family = ALL_BACKENDS[name].family == "numpy"  # OpenBLAS's threads, or torch's OpenMP threads
                if point.device == "cpu" and previous_family not in (None, family):
                    time.sleep(0.2)  # let the other library's spinning threads go idle
                with by_name[name].compiled_only():
                    times[name].append(calls[name]())
                previous_family = family
                self.progress(1)
        limit_after = limits.quick_cpu_limit() if point.device == "cpu" else None
        # how far this minute's matmul rate is from the run's limits, measured once at the start
        drift = None if limit_before is None else probe_scale * (limit_before + limit_after) / 2
        return [self._row(point, config, name, times[name], memory[name], drift) for name in names]


    def _workload(self, backend: BenchModel, point: Point, data: np.ndarray) -> Callable[[], float]:
        """A callable returning the seconds of one measured unit (one call; a decode's per-token time)."""
        if point.workload == "forward":
            fn = backend.forward_fn(data[:, :-1])
            return lambda: timed(fn)
        if point.workload == "train":
            fn = backend.train_fn(data[:, :-1], data[:, 1:])
            return lambda: timed(fn)
        decode = backend.decode_fn(data)
        return lambda: decode(point.new_tokens)  # seconds per cached one-token step, the prefill untimed

    def _peak_memory(self, backend: BenchModel, fn: Callable[[], float]) -> float | None:
        """One untimed call; returns its peak memory in MiB above what was allocated before it (CPU: the C heap;
        CUDA: torch's allocator, so the other resident models and this one's weights do not count)."""
        if backend.spec.device == "cuda":
            torch = backend.torch
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        with self.heap.watch() as watched:
            fn()
        return (watched.peak - watched.start) / 2**20 if watched.available else None

    def _row(self, point: Point, config: GPT2Config, name: str, seconds: list[float], memory_mib: float | None,
             drift: float | None) -> dict:
        spec = ALL_BACKENDS[name]
        row = {**asdict(point), "backend": name, "seconds": summary(seconds), "peak_memory_mib": memory_mib}
        if spec.compile:
            row["ran_compiled"] = True  # every timed call ran under set_stance("fail_on_recompile")
        median = row["seconds"]["median"]
        if point.workload in ("forward", "train"):
            flops = (forward_flops if point.workload == "forward" else train_step_flops)(config, point.B, point.T)
            row["gflops"] = flops / median / 1e9
            limit = self.matmul_limit_gflops(spec, drift)
            row["limit_gflops"] = limit
            row["fraction_of_limit"] = row["gflops"] / limit if limit else None
        else:
            # the timed steps attend over T - new_tokens .. T - 1 cached positions: each reads their mean
            context = point.T - (point.new_tokens + 1) / 2
            step_bytes = decode_bytes(config, point.B, context, spec.decode_itemsize)
            row["ms_per_token"] = 1e3 * median
            row["tokens_per_s"] = point.B / median
            row["bytes_per_step"] = step_bytes
            row["read_gbs"] = step_bytes / median / 1e9
            bandwidth = self.limits.get(point.device, {}).get("memory_gbs")
            row["fraction_of_bandwidth"] = row["read_gbs"] / bandwidth if bandwidth else None
        return row

    def matmul_limit_gflops(self, spec: BackendSpec, drift: float | None) -> float | None:
        """The matmul rate a row is set against: its device's best rate at its precision (on the CPU scaled by
        ``drift``, this point's probe against the run's start)."""
        if spec.device == "cuda":
            gpu = self.limits.get("cuda")
            return None if gpu is None else 1e3 * gpu["matmul_tflops"][spec.precision]
        cpu = self.limits.get("cpu")
        if cpu is None or drift is None:
            return None
        best = cpu["best_matmul_gflops"] if spec.precision == "fp32" else (
            cpu["low_precision_matmul_gflops"].get(spec.precision))
        return None if best is None else best * drift


def add_hf_ratios(rows: list[dict]) -> None:
    """hf_time / time for each row that has a Hugging Face counterpart measured at the same point."""
    key = ("size", "workload", "device", "B", "T")
    by_point: dict[tuple, dict[str, dict]] = {}
    for row in (r for r in rows if r["workload"] in WORKLOADS):
        by_point.setdefault(tuple(row[k] for k in key), {})[row["backend"]] = row
    for group in by_point.values():
        for row in group.values():
            reference = group.get(ALL_BACKENDS[row["backend"]].hf_reference)
            if reference is not None and reference is not row:
                row["speedup_vs_hf"] = reference["seconds"]["median"] / row["seconds"]["median"]


def evaluate_goals(rows: list[dict]) -> list[dict]:
    """The issues' goals, where their points were measured: (goal, value, target, met). Float32 CPU rows against the
    best float32 matmul rate; the GPU's bf16 + compile train step against the bf16 rate (its MFU)."""
    goals = []

    def find(**match) -> list[dict]:
        return [r for r in rows if all(r.get(k) == v for k, v in match.items())]

    def fp32_engines(rows_: list[dict]) -> list[dict]:
        return [r for r in rows_ if ALL_BACKENDS[r["backend"]].family != "hf"
                and ALL_BACKENDS[r["backend"]].precision == "fp32"]

    for workload, B, T, target in (("forward", 1, 1024, 0.75), ("train", 4, 64, 0.60)):
        what = "forward B=1 T=1024" if workload == "forward" else "train step B=4 T=64"
        for row in fp32_engines(find(size="gpt2", workload=workload, device="cpu", B=B, T=T)):
            goals.append(goal(f"{what}, {row['backend']}", row["fraction_of_limit"], target, "of limit"))
            if "speedup_vs_hf" in row:
                goals.append(goal(f"{what}, {row['backend']} vs HF", row["speedup_vs_hf"], 1.0, "x HF"))
    decode = fp32_engines(find(size="gpt2", workload="decode", device="cpu", B=1))
    for row in decode:
        if row["T"] == 128:
            goals.append(goal(f"decode context 128, {row['backend']}: bytes read vs bandwidth",
                              row["fraction_of_bandwidth"], 0.70, "of bandwidth"))
        if "speedup_vs_hf" in row:
            goals.append(goal(f"decode context {row['T']}, {row['backend']} vs HF", row["speedup_vs_hf"], 1.0, "x HF"))
    for backend in dict.fromkeys(r["backend"] for r in decode if r["backend"].startswith("torch")):
        at = {r["T"]: r["seconds"]["median"] for r in find(size="gpt2", workload="decode", B=1, backend=backend)}
        if 64 in at and 1024 in at:
            goals.append(goal(f"decode ms/token context 1024 / 64, {backend}", at[1024] / at[64], 1.5, "ratio",
                              lower_is_better=True))
    memory = {r["backend"]: r["peak_memory_mib"] for r in find(size="gpt2", workload="train", device="cpu", B=4, T=64)}
    if memory.get("numpy") and memory.get("torch-cpu-fused"):
        goals.append(goal("peak memory train step B=4 T=64, numpy / torch-cpu-fused",
                          memory["numpy"] / memory["torch-cpu-fused"], 2.0, "ratio", lower_is_better=True))
    for row in find(size="gpt2", workload="train", device="cuda", B=16, T=1024, backend="torch-cuda-bf16-compile"):
        goals.append(goal("train step B=16 T=1024, torch-cuda-bf16-compile (MFU)", row["fraction_of_limit"], 0.50,
                          "of bf16 matmul"))
    for row in find(size="gpt2", workload="decode", device="cuda", backend="torch-cuda-bf16"):
        if row["B"] in (1, 32) and "speedup_vs_hf" in row:
            goals.append(goal(f"decode B={row['B']} context {row['T']}, torch-cuda-bf16 vs HF", row["speedup_vs_hf"],
                              1.0, "x HF"))
    for row in find(workload="load", backend="mapper.load_checkpoint"):
        goals.append(goal(f"peak memory loading {row['size']}, x file size", row["times_file_size"], row["goal"],
                          "ratio", lower_is_better=True))
        for library in find(workload="load", size=row["size"], backend="safetensors.numpy.load_file"):
            goals.append(goal(f"seconds loading {row['size']}, mapper / safetensors' load_file",
                              row["seconds"] / library["seconds"], 1.0, "ratio", lower_is_better=True))
    return goals


def goal(name: str, value: float | None, target: float, unit: str, lower_is_better: bool = False) -> dict:
    met = None if value is None else (value <= target if lower_is_better else value >= target)
    return {"goal": name, "value": value, "target": target, "unit": unit, "met": met,
            "lower_is_better": lower_is_better}


def run(settings: Settings, out_dir: Path | None, log: Callable[[str], None] = print) -> Report:
    """Measure everything ``settings`` asks for; write results.json and the plots to ``out_dir``."""
    from tqdm import tqdm

    specs = resolve_backends(settings.backends)
    for name in settings.sizes:
        if name not in PRESETS:
            raise ValueError(f"unknown size {name!r}; choose from {', '.join(PRESETS)}")
    if settings.config:
        settings.model_config("custom")  # a bad --config fails here, before any measurement
    for name in settings.workloads:
        if name not in WORKLOADS and name not in EXTRA_WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose from {', '.join([*WORKLOADS, *EXTRA_WORKLOADS])}")
    report = Report(settings=asdict(settings))
    present = []
    for spec in specs:
        reason = unavailable_reason(spec)
        if reason:
            report.skipped.append({"backend": spec.name, "reason": reason})
        else:
            present.append(spec)
    if "decode" in settings.workloads:
        report.skipped += [{"backend": spec.name, "workload": "decode", "reason": COMPILED_DECODE_REASON}
                           for spec in present if spec.compile]
    for reason in dict.fromkeys(skip["reason"] for skip in report.skipped):
        log(f"skipped {', '.join(k['backend'] for k in report.skipped if k['reason'] == reason)}: {reason}")
    report.threads = pin_threads(settings.threads)
    report.machine = machine()
    devices = sorted({s.device for s in present}, key=["cpu", "cuda"].index)
    log("measuring the machine's limits (matmul kernels, memory bandwidth) ...")
    if "cpu" in devices:
        report.limits["cpu"] = limits.cpu_limits(settings.threads)
    if "cuda" in devices:
        report.limits["cuda"] = limits.gpu_limits()
    # the per-point probe runs this process's kernels: a point's limits are the run's limits times the ratio of its
    # probe to this first one
    probe_scale = 1.0 / limits.quick_cpu_limit() if "cpu" in report.limits else 1.0

    work: list[tuple[str, str, list[BackendSpec], list[Point]]] = []
    for size, device in itertools.product(settings.size_names, devices):
        on_device = [s for s in present if s.device == device]
        config = settings.model_config(size)
        points = plan(settings, size, device)
        need, have = memory_needed(config, on_device, points), available_bytes(device)
        if need > 0.85 * have:
            reason = (f"{size} needs ~{need / 2**30:.1f} GiB for {len(on_device)} models on {device}, "
                      f"{have / 2**30:.1f} GiB available")
            report.skipped.append({"size": size, "device": device, "reason": reason})
            log(f"skipped {size} on {device}: {reason}")
            continue
        if points:
            work.append((size, device, on_device, points))
    total = sum(sum(1 for s in on_device if not (p.workload == "decode" and s.compile)) * (1 + settings.n_repeats)
                for _, _, on_device, points in work for p in points)
    # (each backend's warm-up and memory calls count as one step of the bar)
    with tqdm(total=total, desc="gpt2 bench", unit="call", dynamic_ncols=True) as bar:
        runner = Runner(settings, report.limits, progress=bar.update)
        for size, device, on_device, points in work:
            config = settings.model_config(size)
            params = init_params(config, seed=settings.seed, dtype=np.float32)
            bar.set_postfix_str(f"building {size} models on {device}")
            backends = [BenchModel(spec, config, params) for spec in on_device]
            for point in points:
                if settings.deadline is not None and time.time() > settings.deadline:
                    report.skipped.append({"point": point.label, "reason": "out of time (the run's budget)"})
                    log(f"skipped {point.label}: out of time")
                    continue
                bar.set_postfix_str(point.label)
                report.results += runner.run_point(point, backends, probe_scale)
                if out_dir is not None:  # so far: a run stopped from outside keeps what it measured
                    write_results(report, out_dir)
            for backend in backends:
                backend.release()
            del backends, params
    if "tricks" in settings.workloads:
        log("measuring numpy_gpt2/fast.py's tricks on the 124M shape ...")
        from benchmarks import fast_tricks

        report.results += fast_tricks.measure("gpt2", max(settings.n_repeats, 7))
    if "load" in settings.workloads:
        from benchmarks import load_memory

        for size in settings.size_names:
            if size == "custom":
                continue
            log(f"measuring checkpoint loading memory for {size} (writes a temporary checkpoint) ...")
            report.results += load_memory.measure(size)
    add_hf_ratios(report.results)
    report.goals = evaluate_goals(report.results)
    if out_dir is not None:
        write_results(report, out_dir)
        from benchmarks.plots import write_plots

        write_plots(report, out_dir)
    return report


def write_results(report: Report, out_dir: Path) -> None:
    """``out_dir/results.json``, replaced whole (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(report), indent=2, default=str) + "\n"
    atomic_write(out_dir / "results.json", lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------------------------------- the report


def _cell(row: dict) -> str:
    if row["workload"] == "decode":
        text = f"{row['ms_per_token']:.1f} ms"
        if row.get("fraction_of_bandwidth") is not None:
            text += f" · {100 * row['fraction_of_bandwidth']:.0f}% bw"
    else:
        text = f"{row['seconds']['median']:.3f} s"
        if row.get("fraction_of_limit") is not None:
            text += f" · {100 * row['fraction_of_limit']:.0f}%"
    if "speedup_vs_hf" in row:
        text += f" · {row['speedup_vs_hf']:.2f}×HF"
    return text


def render_markdown(report: Report) -> str:
    """The terminal's (and RESULTS.md's) tables: machine, limits, every point, memory, goals, what was skipped."""
    m, lines = report.machine, []
    blas = m.get("openblas", {})
    libraries = ", ".join(f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')})"
                          for lib in m.get("blas") or [])  # (runs before these were recorded lack them)
    linear = f" (float32 CPU linear layers: {m['torch_cpu_linear']})" if m.get("torch_cpu_linear") else ""
    lines.append(f"**Machine:** {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, {m.get('memory_gib')} GiB"
                 + (f"; GPU {m['gpu']['name']} ({m['gpu']['memory_gib']} GiB)" if m.get("gpu") else "; no GPU")
                 + f". Python {m.get('python')}, numpy {m.get('numpy')} (OpenBLAS kernels: {blas.get('core')}, "
                 f"chosen by {blas.get('chosen_by')}{'; BLAS loaded: ' + libraries if libraries else ''}), torch "
                 f"{m.get('torch')}{linear}, transformers {m.get('transformers')}. "
                 f"Threads: {report.threads}. Repeats: {Settings(**report.settings).n_repeats} per point, "
                 "backends alternating; medians.")
    cpu = report.limits.get("cpu")
    if cpu:
        lines += ["", "| CPU limit | measured |", "|---|---|"]
        lines += [f"| float32 matmul 1024x768 @ 768x3072, {k} | {v:.0f} GFLOP/s |"
                  for k, v in cpu["matmul_gflops"].items()]
        lines += [f"| {k} matmul, same shape, torch F.linear | {v:.0f} GFLOP/s |"
                  for k, v in cpu.get("low_precision_matmul_gflops", {}).items()]
        lines += [f"| {k} matmul | skipped: {why} |" for k, why in cpu.get("low_precision_skipped", {}).items()]
        lines += [f"| memory read, {k} | {v:.1f} GB/s |" for k, v in cpu["memory_read_gbs"].items()]
        lines.append(f"| **limits used** | matmul {cpu['best_matmul_gflops']:.0f} GFLOP/s "
                     f"({cpu['best_matmul_kernel']}), memory {cpu['memory_gbs']:.1f} GB/s |")
    gpu = report.limits.get("cuda")
    if gpu:
        lines += ["", "| GPU limit | measured |", "|---|---|"]
        lines += [f"| matmul 8192³ {k} | {v:.1f} TFLOP/s |" for k, v in gpu["matmul_tflops"].items()]
        lines.append(f"| device copy bandwidth | {gpu['memory_gbs']:.0f} GB/s |")
    for workload, what in (("forward", "seconds per forward · % of the matmul limit · speed-up vs HF"),
                           ("train", "seconds per train step (fwd + bwd + AdamW) · % of the matmul limit · vs HF"),
                           ("decode", "ms per token · bytes read (weights + KV cache) as % of memory bandwidth · "
                                      "vs HF")):
        rows = [r for r in report.results if r["workload"] == workload]
        if not rows:
            continue
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        lines += ["", f"**{workload}** ({what})", "",
                  "| size | device | B | " + ("context" if workload == "decode" else "T") + " | "
                  + " | ".join(backends) + " |", "|---|---|---|---|" + "---|" * len(backends)]
        points = list(dict.fromkeys((r["size"], r["device"], r["B"], r["T"]) for r in rows))
        for point in points:
            cells = {r["backend"]: _cell(r) for r in rows if (r["size"], r["device"], r["B"], r["T"]) == point}
            lines.append("| " + " | ".join(str(v) for v in point) + " | "
                         + " | ".join(cells.get(b, "") for b in backends) + " |")
    tricks = [r for r in report.results if r["workload"] == "tricks"]
    if tricks:
        lines += ["", f"**tricks** ({EXTRA_WORKLOADS['tricks']})", "",
                  "| step | trick | spec | fast | share of the step saved |", "|---|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['backend']} | {1e3 * r['spec_s']:.1f} ms | {1e3 * r['fast_s']:.1f} ms | "
                  f"{100 * r['gain']:.1f}% |" for r in tricks]
    loads = [r for r in report.results if r["workload"] == "load"]
    if loads:
        lines += ["", f"**load** ({EXTRA_WORKLOADS['load']})", "",
                  "| size | loader | file | peak RSS above baseline | x file | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['backend']} | {r['file_bytes'] / 2**20:,.0f} MiB | "
                  f"{(r['peak_rss'] - r['baseline_rss']) / 2**20:,.0f} MiB | {r['times_file_size']:.2f} | "
                  f"{r['seconds']:.2f} |" for r in loads]
    memory = [r for r in report.results if r.get("peak_memory_mib") is not None and r["size"] == "gpt2"]
    if memory:
        lines += ["", "**peak memory during one steady-state call** (MiB; CPU: C-heap in use above the start, i.e. "
                  "activations and temporaries, weights excluded; CUDA: max_memory_allocated, weights included)", ""]
        lines += ["| point | " + " | ".join(dict.fromkeys(r["backend"] for r in memory)) + " |"]
        names = list(dict.fromkeys(r["backend"] for r in memory))
        lines += ["|---|" + "---|" * len(names)]
        for point in dict.fromkeys((r["workload"], r["device"], r["B"], r["T"]) for r in memory):
            cells = {r["backend"]: f"{r['peak_memory_mib']:.0f}" for r in memory
                     if (r["workload"], r["device"], r["B"], r["T"]) == point}
            lines.append(f"| {point[0]} {point[1]} B={point[2]} T={point[3]} | "
                         + " | ".join(cells.get(n, "") for n in names) + " |")
    if report.goals:
        lines += ["", "| goal | measured | target | met |", "|---|---|---|---|"]
        for g in report.goals:
            value = "n/a" if g["value"] is None else (f"{100 * g['value']:.1f}%" if "of" in g["unit"]
                                                      else f"{g['value']:.2f}{'x' if g['unit'] != 'ratio' else ''}")
            target = f"{'<=' if g['lower_is_better'] else '>='} " + (
                f"{100 * g['target']:.0f}%" if "of" in g["unit"] else f"{g['target']:.2f}")
            lines.append(f"| {g['goal']} | {value} | {target} | {'yes' if g['met'] else 'NO'} |")
    by_reason: dict[str, list[str]] = {}
    for skip in report.skipped:
        what = skip.get("backend") or skip.get("point") or f"{skip.get('size')} on {skip.get('device')}"
        by_reason.setdefault(skip["reason"], []).append(what)
    lines += [""] + [f"skipped {', '.join(whats)}: {reason}" for reason, whats in by_reason.items()]
    return "\n".join(lines)
