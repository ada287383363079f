"""gpt2 bench on small shapes: every workload for every present backend, the report's fields, the plots, what is
skipped and why, the FLOP and byte counts against a hand count, and how NumPy's BLAS kernels are chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.backends import ALL_BACKENDS, unavailable_reason
from benchmarks.common import decode_bytes, decode_weight_bytes, forward_flops, train_step_flops
from benchmarks.sections import sections
from benchmarks.suite import Settings, memory_needed, plan, render_markdown, resolve_backends, run
from gpt2_cli import main
from mapper import GPT2Config
from numpy_gpt2 import runtime

TINY = "n_layer=1,n_embd=32,n_head=2,vocab_size=128,n_positions=128"
REPO = Path(__file__).resolve().parents[1]


def test_flop_and_byte_counts_match_a_hand_count():
    config = GPT2Config(vocab_size=10, n_positions=8, n_embd=4, n_layer=2, n_head=2)
    B, T, C, V = 3, 5, 4, 10
    per_layer = (2 * B * T * C * 3 * C  # q, k, v projection
                 + 2 * B * T * T * C    # q k^T over all heads: B*NH*T*T*hs multiply-adds
                 + 2 * B * T * T * C    # att v
                 + 2 * B * T * C * C    # attention output projection
                 + 2 * B * T * C * 4 * C + 2 * B * T * 4 * C * C)  # the MLP's two projections
    assert forward_flops(config, B, T) == 2 * per_layer + 2 * B * T * C * V
    assert train_step_flops(config, B, T) == 3 * forward_flops(config, B, T)
    # every weight except the position table, 4 bytes each: wte 40, per layer 2 LN (16) + c_attn 60 + c_proj 20
    # + c_fc 80 + mlp.c_proj 68, ln_f 8
    assert decode_weight_bytes(config) == 4 * (40 + 2 * (16 + 60 + 20 + 80 + 68) + 8)
    # + the KV cache: 2 layers x (k and v) x B=3 rows x context 7 x C=4, in bf16 with bf16 weights
    assert decode_bytes(config, 3, 7, itemsize=2) == 2 * (40 + 2 * (16 + 60 + 20 + 80 + 68) + 8) + 2 * 2 * 2 * 3 * 7 * 4


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    settings = Settings(quick=True, config=TINY, repeats=1, backends=("numpy", "torch-cpu", "torch-cuda", "hf"),
                        threads=2)
    return run(settings, out, log=lambda line: None), out


def test_every_workload_runs_for_every_present_backend(tiny_report):
    report, _ = tiny_report
    present = [s.name for s in resolve_backends(("numpy", "torch-cpu", "torch-cuda", "hf"))
               if unavailable_reason(s) is None]
    assert {"numpy", "torch-cpu-fused", "torch-cpu-custom", "hf-cpu"} <= set(present)
    for workload in ("forward", "train", "decode"):
        assert {r["backend"] for r in report.results if r["workload"] == workload} == set(present), workload
    for row in report.results:
        spec = ALL_BACKENDS[row["backend"]]
        assert row["seconds"]["min"] <= row["seconds"]["median"] <= row["seconds"]["max"]
        assert row["seconds"]["median"] > 0 and row["peak_memory_mib"] is not None
        if row["workload"] == "decode":
            assert row["ms_per_token"] > 0 and row["read_gbs"] > 0 and row["fraction_of_bandwidth"] > 0
        else:
            assert row["gflops"] > 0 and 0 < row["fraction_of_limit"]
        if spec.family == "hf":  # the reference of its device and precision: no ratio with itself
            assert "speedup_vs_hf" not in row and spec.hf_reference == spec.name
        else:
            assert row["speedup_vs_hf"] > 0 and spec.hf_reference in present


def test_results_json_has_the_documented_fields(tiny_report):
    _, out = tiny_report
    data = json.loads((out / "results.json").read_text())
    assert {"settings", "machine", "threads", "limits", "results", "skipped", "goals"} <= set(data)
    assert {"cpu", "logical_cpus", "numpy", "torch", "transformers", "openblas", "gpu"} <= set(data["machine"])
    assert {"core", "chosen_by", "cpu_avx512"} <= set(data["machine"]["openblas"])
    cpu = data["limits"]["cpu"]
    assert cpu["best_matmul_gflops"] == max(cpu["matmul_gflops"].values()) > 0
    assert any(key.startswith("numpy") for key in cpu["matmul_gflops"]) and cpu["memory_gbs"] > 0
    assert data["threads"]["blas_threads"] == data["threads"]["torch_threads"] == 2
    row = data["results"][0]
    assert {"size", "workload", "device", "B", "T", "backend", "seconds", "peak_memory_mib"} <= set(row)


def test_plots_are_written(tiny_report):
    _, out = tiny_report
    for name in ("throughput.png", "decode.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_results_md_sections_group_runs_by_machine(tiny_report, tmp_path):
    """benchmarks.sections: one section per machine, each run's tables and plots, links relative to RESULTS.md."""
    _, out = tiny_report
    other = tmp_path / "xeon"
    other.mkdir()
    data = json.loads((out / "results.json").read_text())
    data["machine"]["cpu"] = "Intel(R) Xeon(R) Platinum 8488C"
    (other / "results.json").write_text(json.dumps(data))
    text = sections([out, other, out], relative_to=out.parent)
    assert text.count("## ") - text.count("### ") == 2  # two machines
    assert f"## {data['machine']['cpu']}" in text and text.count("**forward**") == 3
    assert f"![throughput.png]({out.name}/throughput.png)" in text
    with pytest.raises(ValueError, match="holds no results.json"):
        sections([tmp_path / "nothing"], relative_to=tmp_path)


def test_missing_backends_are_skipped_with_a_reason(tiny_report):
    report, _ = tiny_report
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cuda = {s["backend"]: s["reason"] for s in report.skipped
            if s.get("backend", "").startswith(("torch-cuda", "hf-cuda"))}
    assert len(cuda) == 9 and all("no CUDA GPU" in reason for reason in cuda.values())
    assert "skipped torch-cuda-fp32" in render_markdown(report)


def test_plan_covers_the_goals_points():
    points = {(p.workload, p.B, p.T) for p in plan(Settings(quick=True), "gpt2", "cpu")}
    goals = {("forward", 1, 1024), ("train", 4, 64), ("decode", 1, 128), ("decode", 1, 64), ("decode", 1, 1024)}
    assert goals <= points
    assert ("train", 16, 1024) in {(p.workload, p.B, p.T) for p in plan(Settings(quick=True), "gpt2", "cuda")}


def test_memory_needed_counts_the_plan_s_points_not_a_fixed_margin():
    """The 124M shape's quick CPU plan with every CPU backend (six models, each trained) fits a 24 GiB machine:
    the estimate once used B=4 T=1024 activations whatever the plan and skipped the whole CPU run there."""
    config = GPT2Config.from_preset("gpt2")
    specs = [ALL_BACKENDS[name] for name in ("numpy", "torch-cpu-fused", "torch-cpu-custom", "torch-cpu-bf16",
                                             "hf-cpu", "hf-cpu-bf16")]
    points = plan(Settings(quick=True), "gpt2", "cpu")
    weights_and_adam = 6 * 4 * 4 * 124_439_808  # six models: weights, gradients, two moments, float32
    need = memory_needed(config, specs, points)
    # the largest point is forward B=1 T=1024: 1,024 rows of logits (x3) and ~40 [rows, C] arrays per block
    assert need == weights_and_adam + 4 * 1024 * (3 * 50257 + 40 * 768 * 12)
    assert need < 0.85 * 23.5 * 2**30
    # a plan with a larger point needs more; inference alone needs no optimizer state
    bigger = points + [type(points[0])("gpt2", "train", "cpu", 8, 1024)]
    assert memory_needed(config, specs, bigger) > need
    forward_only = [p for p in points if p.workload == "forward"]
    assert memory_needed(config, specs, forward_only) == 6 * 4 * 124_439_808 + 4 * 1024 * (3 * 50257 + 40 * 768 * 12)


def test_bad_settings_are_clear_errors(capsys, tmp_path):
    assert main(["bench", "--backends", "tpu", "--out", str(tmp_path)]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err
    assert main(["bench", "--sizes", "gpt5", "--out", str(tmp_path)]) == 2
    assert "unknown size 'gpt5'" in capsys.readouterr().err
    assert main(["bench", "--workloads", "fly", "--out", str(tmp_path)]) == 2
    assert "unknown workload 'fly'" in capsys.readouterr().err


def test_gpt2_bench_end_to_end(capsys, tmp_path):
    args = ["bench", "--config", TINY, "--backends", "numpy,torch-cpu-fused", "--workloads", "forward,decode",
            "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "**forward**" in out and "**decode**" in out and "| numpy | torch-cpu-fused |" in out
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["backends"] == ["numpy", "torch-cpu-fused"]


# ---------------------------------------------------------------- OpenBLAS's kernels


AVX512 = set(runtime.AVX512_FLAGS) | {"avx2", "fma"}


@pytest.mark.parametrize(("flags", "core", "env", "expected"), [
    (AVX512, "Haswell", {}, "SkylakeX"),             # an AVX-512 CPU on AVX2 kernels: take the AVX-512 ones
    (AVX512, "Zen", {}, "SkylakeX"),
    (AVX512, "SkylakeX", {}, None),                  # already on them
    (AVX512, "SapphireRapids", {}, None),
    ({"avx2", "fma", "avx512f"}, "Haswell", {}, None),  # not every feature SkylakeX's kernels use: never
    (AVX512, "Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, None),  # the user's own choice wins
    (AVX512, None, {}, None),                        # OpenBLAS not found: leave it
])
def test_kernel_choice(flags, core, env, expected):
    assert runtime.better_openblas_coretype(frozenset(flags), core, env) == expected


def test_restart_sets_the_kernels_before_numpy_loads(monkeypatch):
    """Where OpenBLAS under-detects, the command re-executes itself with OPENBLAS_CORETYPE=SkylakeX set."""
    monkeypatch.delenv(runtime.CORETYPE_ENV, raising=False)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(AVX512))
    monkeypatch.setattr(runtime, "openblas_core", lambda: "Haswell")
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: calls.append((exe, argv, dict(os.environ))))
    runtime.restart_with_best_openblas(["gpt2", "bench", "--quick"])
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "bench", "--quick"]
    assert env[runtime.CORETYPE_ENV] == "SkylakeX" and env[runtime.SELECTED_ENV] == "Haswell"
    monkeypatch.setenv(runtime.CORETYPE_ENV, "Haswell")  # the user's own setting: no restart
    runtime.restart_with_best_openblas(["gpt2"])
    assert len(calls) == 1


def run_version(env_changes: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key in (runtime.CORETYPE_ENV, runtime.SELECTED_ENV):
        env.pop(key, None)
    env.update({k: v for k, v in env_changes.items() if v is not None})
    out = subprocess.run([sys.executable, "-m", "gpt2_cli", "--version"], env=env, cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_the_command_runs_numpy_on_the_best_kernels_unless_told_otherwise():
    """End to end, both ways: without OPENBLAS_CORETYPE an AVX-512 CPU ends up on AVX-512 kernels (OpenBLAS's
    own choice, or gpt2's restart where OpenBLAS under-detects); with it, the user's kernels stay."""
    plain = run_version({})
    if runtime.AVX512_FLAGS <= runtime.cpu_flags():
        assert "SkylakeX" in plain or "Cooperlake" in plain or "SapphireRapids" in plain, plain
    forced = run_version({runtime.CORETYPE_ENV: "Haswell"})
    assert "on OpenBLAS's Haswell kernels (chosen by the environment's OPENBLAS_CORETYPE=Haswell)" in forced
