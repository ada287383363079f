"""The benchmark's pictures (PNG, matplotlib): throughput vs length and batch, fraction of the machine's limit,
decode latency vs context. Written by ``gpt2 bench`` next to results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS = ("throughput.png", "fraction_of_limit.png", "decode.png")


def _series(rows: list[dict], workload: str, vary: str, fixed: dict[str, Any]) -> dict[str, tuple[list, list]]:
    """backend -> (x values, rows) for rows of ``workload`` where ``vary`` changes and ``fixed`` holds."""
    out: dict[str, tuple[list, list]] = {}
    chosen = [r for r in rows if r["workload"] == workload and all(r[k] == v for k, v in fixed.items())]
    for row in sorted(chosen, key=lambda r: r[vary]):
        xs, rs = out.setdefault(f"{row['backend']} ({row['size']})", ([], []))
        xs.append(row[vary])
        rs.append(row)
    return {k: v for k, v in out.items() if len(v[0]) > 1}


def write_plots(report: Any, out_dir: Path) -> list[Path]:
    """Write the PNGs into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.results
    machine = report.machine
    where = f"{machine.get('cpu')}, {report.threads.get('blas_threads')} threads" + (
        f"; GPU {machine['gpu']['name']}" if machine.get("gpu") else "")
    written = []

    # 1. throughput: forward and train, against T and against the batch
    panels = [("forward", "T", {"B": 1}, "forward, B=1"), ("forward", "B", {"T": 256}, "forward, T=256"),
              ("train", "T", {"B": 4}, "train step, B=4"), ("train", "B", {"T": 64}, "train step, T=64")]
    panels = [p for p in panels if _series(rows, p[0], p[1], p[2])]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
        for ax, (workload, vary, fixed, title) in zip(axes[0], panels, strict=True):
            for label, (xs, rs) in _series(rows, workload, vary, fixed).items():
                ax.plot(xs, [r["gflops"] for r in rs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T" if vary == "T" else "batch B")
            ax.set_ylabel("GFLOP/s (2·M·N·K over every matmul)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"throughput — {where}", fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "throughput.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 2. fraction of the machine's limit at the goals' points
    bars = [(r, f"{r['workload']} B={r['B']} T={r['T']} {r['device']}") for r in rows
            if r.get("fraction_of_limit") is not None and r["size"] == "gpt2"
            and (r["workload"], r["B"], r["T"]) in {("forward", 1, 1024), ("train", 4, 64), ("train", 16, 1024)}]
    if bars:
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(bars) + 2), 4.5))
        labels = [f"{r['backend']}\n{what}" for r, what in bars]
        values = [100 * r["fraction_of_limit"] for r, _ in bars]
        ax.bar(range(len(bars)), values, color=["C0" if r["workload"] == "forward" else "C1" for r, _ in bars])
        ax.set_xticks(range(len(bars)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("% of the best matmul rate measured in the same run")
        for target, workload in ((75, "forward"), (60, "train")):
            ax.axhline(target, color="C0" if workload == "forward" else "C1", ls="--", lw=1,
                       label=f"goal {workload} {target}% (CPU)")
        ax.set_title(f"fraction of the machine's limit, GPT-2 124M — {where}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "fraction_of_limit.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    # 3. decode: ms per token against the context reached
    decode = {**_series(rows, "decode", "T", {"B": 1}),
              **{f"{k}, B=32": v for k, v in _series(rows, "decode", "T", {"B": 32}).items()}}
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, (xs, rs) in decode.items():
            ax.plot(xs, [r["ms_per_token"] for r in rs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens in the KV cache)")
        ax.set_ylabel("ms per decoding step (greedy, KV cache)")
        ax.set_title(f"decoding — {where}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / "decode.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
