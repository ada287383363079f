"""``benchmarks/RESULTS.md``'s sections, one per machine, from ``gpt2 bench --out DIR`` folders:

    python -m benchmarks.sections benchmarks/results/cpu benchmarks/results/xeon ... > sections.md

Each folder's ``results.json`` is read back; folders measured on the same machine (CPU model, and GPU when there
is one) share one section. A section holds the machine and versions, the threads, then for each run its
limits, the side-by-side tables (``benchmarks.suite.render_markdown``: every figure comes from one run, medians,
backends alternating), its goals table and its plots, linked relative to ``--relative-to`` (RESULTS.md's folder).
Nothing is computed here that the run did not measure.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.plots import PLOTS
from benchmarks.suite import Report, render_markdown


def machine_name(report: Report) -> str:
    """The section's title: the CPU model, and the GPU when the run had one."""
    m = report.machine
    gpu = m.get("gpu")
    return f"{m.get('cpu')}" + (f" + {gpu['name']}" if gpu else "")


def section(name: str, runs: list[tuple[Path, Report]], relative_to: Path) -> str:
    """One machine's section: a heading, then each run's tables and plots."""
    lines = [f"## {name}", ""]
    for folder, report in runs:
        settings = report.settings
        what = (f"`gpt2 bench{' --quick' if settings.get('quick') else ''} --backends {','.join(settings['backends'])}"
                f" --workloads {','.join(settings['workloads'])} --threads {settings['threads']}`")
        lines += [f"### {folder.name}: {what}", "", f"`{os.path.relpath(folder / 'results.json', relative_to)}` "
                  "holds every figure (all repeats).", "", render_markdown(report), ""]
        plots = [png for png in PLOTS if (folder / png).is_file()]
        lines += [f"![{png}]({os.path.relpath(folder / png, relative_to)})" for png in plots]
        lines.append("")
    return "\n".join(lines)


def sections(folders: list[Path], relative_to: Path) -> str:
    """Every folder's run, grouped into one section per machine, in the order the machines first appear."""
    by_machine: dict[str, list[tuple[Path, Report]]] = {}
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            raise ValueError(f"{folder} holds no results.json (make it with gpt2 bench --out {folder})")
        report = Report(**json.loads(path.read_text()))
        by_machine.setdefault(machine_name(report), []).append((folder, report))
    return "\n".join(section(name, runs, relative_to) for name, runs in by_machine.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sections", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="gpt2 bench --out folders")
    parser.add_argument("--relative-to", type=Path, default=Path("benchmarks"),
                        help="the folder the links are relative to (RESULTS.md's; default benchmarks)")
    args = parser.parse_args(argv)
    print(sections(args.folders, args.relative_to))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
