"""Choices made per machine (issue 18): the oneDNN-vs-MKL kernel measured once and cached per CPU model and torch
version, the bench's thread default, what counts as native bf16/fp16, the bf16 rows where the CPU has the
instructions (skipped with the reason where not), and bf16 autocast training on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks import limits
from benchmarks.backends import ALL_BACKENDS, BackendSpec, unavailable_reason
from benchmarks.common import default_threads
from gpt2_cli.main import build_parser
from mapper import GPT2Config, init_params
from mapper.download import CACHE_ENV
from mapper.host import cpu_flags, cpu_identity, cpu_model, low_precision_support
from parity_tests.conftest import DATA, REPO
from tasks.runlog import read_log
from torch_gpt2 import GPT2, onednn

# ---------------------------------------------------------------- the oneDNN / MKL choice


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """An empty cache folder, a counting stand-in for the measurement (oneDNN 2 s, MKL 3 s), and the process's
    answer forgotten before and after."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(onednn.ENV, raising=False)
    monkeypatch.setattr(onednn, "onednn_linear_available", lambda: True)
    measured = []

    def measure(repeats: int = 5) -> dict[str, float]:
        measured.append(1)
        return {"oneDNN": 2.0, "MKL": 3.0}

    monkeypatch.setattr(onednn, "measure_linear_kernels", measure)
    monkeypatch.setattr(onednn, "machine_busy", lambda: None)  # whatever else this machine runs meanwhile
    onednn.preferred_linear.cache_clear()
    yield tmp_path / onednn.CACHE_FILE, measured
    onednn.preferred_linear.cache_clear()


def test_the_choice_is_measured_once_and_cached(kernel_cache):
    path, measured = kernel_cache
    choice = onednn.preferred_linear()
    assert choice.onednn and choice.seconds == {"oneDNN": 2.0, "MKL": 3.0} and len(measured) == 1
    assert f"cached in {path}" in choice.describe()
    entries = json.loads(path.read_text())["entries"]
    assert list(entries) == [f"{cpu_identity()} | torch {torch.__version__}"]
    onednn.preferred_linear.cache_clear()  # a new process: the file is read, nothing is measured
    again = onednn.preferred_linear()
    assert again.onednn and len(measured) == 1 and f"read from {path}" in again.describe()


def test_the_faster_kernel_wins(kernel_cache, monkeypatch):
    path, _ = kernel_cache
    key = f"{cpu_identity()} | torch {torch.__version__}"
    path.write_text(json.dumps({"format": 1, "entries": {key: {"seconds": {"oneDNN": 5.0, "MKL": 4.0}, "threads": 2}}}))
    choice = onednn.preferred_linear()
    assert not choice.onednn and choice.kernel == "MKL (F.linear)"


@pytest.mark.parametrize("change", ["cpu", "torch"])
def test_another_cpu_or_torch_measures_again(kernel_cache, monkeypatch, change):
    path, measured = kernel_cache
    onednn.preferred_linear()
    onednn.preferred_linear.cache_clear()
    if change == "cpu":
        monkeypatch.setattr(onednn, "cpu_identity", lambda: "AMD EPYC (family 26, model 2, stepping 0)")
    else:
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    onednn.preferred_linear()
    assert len(measured) == 2
    assert len(json.loads(path.read_text())["entries"]) == 2  # both machines' answers are kept


def test_a_measurement_on_a_busy_machine_is_used_but_not_cached(kernel_cache, monkeypatch):
    path, measured = kernel_cache
    monkeypatch.setattr(onednn, "machine_busy", lambda: "the machine is busy (load average 6.0 on 2 CPUs)")
    choice = onednn.preferred_linear()
    assert choice.onednn and len(measured) == 1 and not path.exists()
    assert "not cached: the machine is busy (load average 6.0 on 2 CPUs)" in choice.describe()
    onednn.preferred_linear.cache_clear()
    monkeypatch.setattr(onednn, "machine_busy", lambda: None)  # the next process, on a quiet machine
    assert onednn.preferred_linear().onednn and len(measured) == 2 and path.exists()


def test_busy_means_a_load_average_of_at_least_the_cpus_in_use(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus - 0.5, 0.0, 0.0))
    assert onednn.machine_busy() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 0.0, 0.0, 0.0))
    assert onednn.machine_busy() == f"the machine is busy (load average {cpus:.1f} on {cpus} CPUs)"


def test_a_damaged_cache_is_measured_again(kernel_cache):
    path, measured = kernel_cache
    path.write_text("{not json")
    assert onednn.preferred_linear().onednn and len(measured) == 1
    assert json.loads(path.read_text())["format"] == onednn.CACHE_FORMAT


def test_the_environment_and_the_flag_override(kernel_cache, monkeypatch):
    _, measured = kernel_cache
    monkeypatch.setenv(onednn.ENV, "0")
    choice = onednn.preferred_linear()
    assert not choice.onednn and choice.decided_by == f"{onednn.ENV}=0" and measured == []
    onednn.preferred_linear.cache_clear()
    monkeypatch.setenv(onednn.ENV, "maybe")
    with pytest.raises(ValueError, match=f"{onednn.ENV}='maybe'"):
        onednn.preferred_linear()


def test_models_left_at_none_follow_the_choice_and_the_flag_wins(kernel_cache, monkeypatch):
    """onednn_linear=None routes every float32 CPU product by the measured choice; True/False override it."""
    calls = []
    real_op = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or real_op(*a))
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    params = init_params(config, 0, np.float32)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    counts = {}
    for label, env, flag in (("measured: oneDNN", None, None), ("env: MKL", "0", None), ("flag wins", "0", True),
                             ("flag off", None, False)):
        onednn.preferred_linear.cache_clear()
        if env is None:
            monkeypatch.delenv(onednn.ENV, raising=False)
        else:
            monkeypatch.setenv(onednn.ENV, env)
        calls.clear()
        with torch.no_grad():
            GPT2.from_params(params, config, device="cpu", onednn_linear=flag)(tokens)
        counts[label] = len(calls)
    assert counts == {"measured: oneDNN": 5, "env: MKL": 0, "flag wins": 5, "flag off": 0}


@pytest.mark.skipif(not onednn.onednn_linear_available(), reason="oneDNN's linear is not in this torch build")
def test_the_real_measurement_times_both_kernels():
    seconds = onednn.measure_linear_kernels(repeats=1)
    assert set(seconds) == {"oneDNN", "MKL"} and all(0 < s < 60 for s in seconds.values())


def test_version_prints_both_kernel_choices(tmp_path):
    env = {"PATH": "/usr/bin:/bin", CACHE_ENV: str(tmp_path), onednn.ENV: "1"}
    out = subprocess.run([sys.executable, "-m", "gpt2_cli", "--version"], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "OpenBLAS's" in out and f"float32 CPU linear layers on oneDNN ({onednn.ENV}=1)" in out


# ---------------------------------------------------------------- threads, instructions


def test_bench_threads_default_to_the_cpus_this_process_may_use():
    args = build_parser().parse_args(["bench"])
    assert args.threads == default_threads() == len(os.sched_getaffinity(0))


def test_native_low_precision_is_read_from_the_cpu_flags():
    assert low_precision_support(frozenset({"avx512f", "amx_bf16"})) == {
        "bf16": None, "fp16": low_precision_support(frozenset())["fp16"]}
    assert low_precision_support(frozenset({"avx512_bf16", "avx512_fp16"})) == {"bf16": None, "fp16": None}
    none = low_precision_support(frozenset({"avx2", "fma"}))
    assert "no amx_bf16 or avx512_bf16 instructions" in none["bf16"] and "amx_fp16 or avx512_fp16" in none["fp16"]


def test_bf16_rows_run_where_the_cpu_has_the_instructions_and_are_skipped_where_not(monkeypatch):
    bf16 = [spec for spec in ALL_BACKENDS.values() if spec.device == "cpu" and spec.precision == "bf16"]
    assert {s.name for s in bf16} == {"torch-cpu-bf16", "hf-cpu-bf16"}
    monkeypatch.setattr("benchmarks.backends.cpu_flags", lambda: frozenset({"avx2"}))
    assert all("no amx_bf16 or avx512_bf16" in unavailable_reason(s) for s in bf16)
    assert unavailable_reason(ALL_BACKENDS["torch-cpu-fused"]) is None
    monkeypatch.setattr("benchmarks.backends.cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert all(unavailable_reason(s) is None for s in bf16)
    assert BackendSpec("x", "torch", precision="bf16").hf_reference == "hf-cpu-bf16"
    assert BackendSpec("y", "torch", "cuda", "tf32").hf_reference == "hf-cuda-tf32"


def test_low_precision_limits_follow_the_instructions(monkeypatch):
    monkeypatch.setattr(limits, "cpu_flags", lambda: frozenset({"avx2"}))
    rates, skipped = limits.torch_low_precision_gflops(reps=1)
    assert rates == {} and set(skipped) == {"bf16", "fp16"}
    monkeypatch.setattr(limits, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    rates, skipped = limits.torch_low_precision_gflops(reps=1)
    assert set(rates) == {"bf16"} and rates["bf16"] > 0 and set(skipped) == {"fp16"}


# ---------------------------------------------------------------- bf16 autocast on the CPU


@pytest.mark.skipif(low_precision_support(cpu_flags())["bf16"] is not None,
                    reason="this CPU has no native bf16 (AVX512-BF16 / AMX-BF16)")
def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    """gpt2 train --autocast bf16 --device cpu: the loss falls, and it ends near the float32 run of the same steps."""
    from gpt2_cli import main

    data = tmp_path / "head.txt"
    data.write_text((DATA / "the-verdict.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    common = ["train", "--data", str(data), "--backend", "torch", "--device", "cpu", "--config",
              "n_layer=2,n_embd=32,n_head=2,n_positions=32", "--context", "16", "--stride", "16", "--batch-size", "4",
              "--max-steps", "12", "--lr", "3e-3", "--eval-every", "4", "--eval-batches", "2", "--sample-tokens", "4",
              "--quiet"]
    assert main([*common, "--out", str(tmp_path / "bf16"), "--autocast", "bf16"]) == 0
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    bf16, fp32 = (read_log(tmp_path / run / "log.jsonl") for run in ("bf16", "fp32"))
    evals = [r for r in bf16 if "val_loss" in r]
    assert evals[-1]["eval_train_loss"] < evals[0]["eval_train_loss"] - 0.5
    assert abs(bf16[-1]["train_loss"] - fp32[-1]["train_loss"]) < 0.05 * fp32[-1]["train_loss"]
    assert bf16[0]["train_loss"] != fp32[0]["train_loss"]  # it did run in bf16


def test_two_cpus_that_share_a_bare_model_name_are_told_apart(tmp_path):
    """VMs show Zen 4 and Zen 5 both as "AMD EPYC": the kernel cache and the bench's machine key add family, model
    and stepping, so one part's measured choice is never reused on the other."""
    def cpuinfo(name: str, family: int, model: int) -> str:
        path = tmp_path / f"cpuinfo-{family}-{model}"
        path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                        f"model name\t: {name}\nstepping\t: 1\nflags\t\t: avx2 avx512f\n\n"
                        f"processor\t: 1\ncpu family\t: 99\nmodel\t\t: 99\nmodel name\t: other\n")
        return str(path)

    zen4, zen5 = cpuinfo("AMD EPYC", 25, 17), cpuinfo("AMD EPYC", 26, 2)
    assert cpu_model(zen4) == cpu_model(zen5) == "AMD EPYC"
    assert cpu_identity(zen4) == "AMD EPYC (family 25, model 17, stepping 1)"
    assert cpu_identity(zen5) == "AMD EPYC (family 26, model 2, stepping 1)"
    bare = tmp_path / "cpuinfo-bare"
    bare.write_text("model name\t: Some CPU\n")
    assert cpu_identity(str(bare)) == "Some CPU"
