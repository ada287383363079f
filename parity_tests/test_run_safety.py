"""A training run survives what happens to real runs, on the tiny config of test_train.py: signals (a real SIGINT,
SIGTERM, SIGHUP, and under torchrun one signal to one process), a second run on the same folder, a run killed with
SIGKILL, a NaN from a diverging run, a full disk mid-checkpoint, a log line cut short; and --resume with nothing
but --out continues the run bit-exactly."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_cli import main
from mapper import load_checkpoint
from parity_tests.test_train import REPO, TINY_RUN, VERDICT, gpt2_train
from tasks.run_folder import LOCK_FILE, nonfinite_problem
from tasks.runlog import read_log

SLOW_STEPS = ["--batch-size", "1", "--eval-every", "1", "--max-steps", "100000"]  # first checkpoint after 56 steps


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "verdict-head.txt"
    path.write_text(VERDICT.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_run(text: Path, out: Path, *extra: str, backend: str = "numpy") -> subprocess.Popen:
    command = [sys.executable, "-m", "gpt2_cli", "train", "--data", str(text), "--out", str(out), "--backend",
               backend, *TINY_RUN, "--sample-prompt", "", *extra]
    return subprocess.Popen(command, env=_env(), cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_log_lines(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    log, deadline = out / "log.jsonl", time.monotonic() + timeout
    while not (log.exists() and log.read_bytes().count(b"\n") >= n):
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run was too slow to log")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def state_step(out: Path) -> int:
    return json.loads((out / "checkpoint" / "state.json").read_text())["step"]


# ------------------------------------------------------------------------------------------ signals


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_finishes_the_step_checkpoints_and_exits_with_its_code(text, tmp_path, signum, code):
    out = tmp_path / "run"
    proc = start_run(text, out, "--max-steps", "100000")
    wait_for_log_lines(proc, out, 3)
    proc.send_signal(signum)
    err = finish(proc)
    assert proc.returncode == code, err
    assert f"{signum.name} at step" in err and "continue with --resume" in err and "Traceback" not in err
    assert len(read_log(out / "log.jsonl")) == state_step(out) >= 3
    assert load_checkpoint(out)[0].n_layer == 2
    assert not (out / "checkpoint.new").exists()
    assert (out / LOCK_FILE).read_text() == ""  # released by a normal end


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's processes through /proc")
def test_under_torchrun_a_signal_to_one_process_stops_all_after_the_same_step(text, tmp_path):
    pytest.importorskip("torch.distributed")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "gpt2_cli", "train", "--data", str(text), "--out", str(out), "--backend", "torch", "--device", "cpu",
               *TINY_RUN, "--sample-prompt", "", "--max-steps", "100000"]
    proc = subprocess.Popen(command, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    workers: dict[int | None, int] = {}
    hung = False
    try:
        wait_for_log_lines(proc, out, 3, timeout=240)
        workers = {_rank(pid): pid for pid in _children(proc.pid)}
        os.kill(workers[1], signal.SIGTERM)  # rank 1 alone: rank 0 never saw a signal
        proc.wait(timeout=120)  # a rank left in a barrier while the other all-reduces would hang here
    except subprocess.TimeoutExpired:
        hung = True
    finally:  # torchrun starts each worker in its own session, holding our pipes: end them all before reading
        for pid in [*workers.values(), *_children(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1]
    assert not hung, f"the processes did not stop together: {err[-3000:]}"
    assert "SIGTERM at step" in err, err[-3000:]
    assert len(read_log(out / "log.jsonl")) == state_step(out) >= 3
    assert not (out / "checkpoint.new").exists()


# ------------------------------------------------------------------------------------------ one run per folder


def test_two_runs_started_together_one_runs_and_the_other_is_refused(text, tmp_path):
    out = tmp_path / "run"
    runs = [start_run(text, out, "--max-steps", "30", "--seed", str(seed)) for seed in (1, 2)]
    errors = [finish(p) for p in runs]
    codes = [p.returncode for p in runs]
    assert sorted(codes) == [0, 2], errors
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = errors[loser].strip().splitlines()[-1]  # after the run's first line if it got as far as the lock
    assert refusal.startswith("gpt2 train: error: ") and "Traceback" not in errors[loser]
    assert "in use by another gpt2 run" in refusal or "already holds a training run" in refusal, refusal
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 31))  # one run's lines, not two interleaved
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 30 and state["args"]["seed"] == (1, 2)[winner]


def test_a_live_run_refuses_others_and_a_killed_runs_folder_is_taken_over(text, tmp_path, capsys):
    out = tmp_path / "run"
    first = start_run(text, out, *SLOW_STEPS)
    wait_for_log_lines(first, out, 2)
    assert gpt2_train(text, out, "--max-steps", "3", "--force") == 2
    assert f"{out} is in use by another gpt2 run (process {first.pid})" in capsys.readouterr().err
    first.kill()  # SIGKILL: no handler runs, the lock file keeps its pid, the system drops the lock itself
    first.communicate()
    assert (out / LOCK_FILE).read_text().strip() == str(first.pid)
    assert not (out / "checkpoint").exists()

    assert gpt2_train(text, out, "--max-steps", "3") == 2
    assert "stopped before its first checkpoint; pass --force to start afresh" in capsys.readouterr().err
    assert gpt2_train(text, out, "--max-steps", "3", "--resume") == 2
    assert "start it afresh with --force instead of --resume" in capsys.readouterr().err
    assert gpt2_train(text, out, "--max-steps", "3", "--force") == 0
    err = capsys.readouterr().err
    assert f"left by process {first.pid}, which has ended; the lock is taken over" in err
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3]  # the killed run's lines are gone
    assert state_step(out) == 3 and (out / LOCK_FILE).read_text() == ""


# ------------------------------------------------------------------------------------------ nothing non-finite kept


def test_a_diverging_run_writes_no_checkpoint_from_nan_weights_and_logs_valid_json(text, tmp_path, capsys):
    out = tmp_path / "run"
    # an absurd learning rate: step 1's loss is finite, but its update sends the weights to ~1e30, whose logits
    # overflow: the evaluation after step 1 is NaN
    code = gpt2_train(text, out, "--max-steps", "5", "--lr", "1e30", "--save-every", "1", "--sample-prompt", "")
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's first line
    assert code == 2 and err.startswith("gpt2 train: error: the evaluation after step 1 gave val_loss nan"), err
    assert err.endswith("stopped before writing a checkpoint from it; no checkpoint was written yet")
    assert not (out / "checkpoint").exists() and not (out / "model.safetensors").exists()

    def no_nan(token: str):
        raise AssertionError(f"{token} is not JSON")

    (line,) = (out / "log.jsonl").read_text().splitlines()
    record = json.loads(line, parse_constant=no_nan)
    assert record["step"] == 1 and record["val_loss"] is None and record["nonfinite"]["val_loss"] == "nan"


def test_nonfinite_problem_names_what_is_not_finite():
    good = {"a": np.ones(3), "b": np.zeros((2, 2), np.float32)}
    assert nonfinite_problem(good, {"step": 4, "train_loss": 1.0, "val_loss": 2.0}) is None
    bad = {**good, "b": np.array([[0.0, np.inf], [0.0, 0.0]], np.float32)}
    assert nonfinite_problem(bad, {"step": 4}) == "the parameters after step 4 are not finite (NaN or inf in b)"
    assert nonfinite_problem(good, {"step": 7, "val_loss": float("nan"), "eval_train_loss": 3.0}) == (
        "the evaluation after step 7 gave val_loss nan")


def test_a_full_disk_mid_checkpoint_leaves_the_previous_checkpoint_and_no_debris(text, tmp_path, capsys, monkeypatch):
    import tasks.run_folder

    out = tmp_path / "run"
    real_save, calls = tasks.run_folder.save_tensors, []

    def full_disk_on_the_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(tasks.run_folder, "save_tensors", full_disk_on_the_second)
    assert gpt2_train(text, out, "--max-steps", "4", "--save-every", "2", "--sample-prompt", "") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's first line
    assert err.startswith(f"gpt2 train: error: --out {out}: the checkpoint of step 4 could not be written (No space "
                          "left on device"), err
    assert "the last complete checkpoint is kept" in err
    assert state_step(out) == 2 and load_checkpoint(out / "checkpoint")[0].n_layer == 2
    assert not (out / "checkpoint.new").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".link")]


# ------------------------------------------------------------------------------------------ resume


def test_resume_with_only_out_continues_bit_exactly_past_a_cut_short_log_line(text, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ("--max-steps", "8", "--grad-accum", "2", "--schedule", "cosine", "--warmup-steps", "2", "--lr", "2e-3",
           "--seed", "5", "--eval-every", "3")
    assert gpt2_train(text, straight, *run) == 0
    assert gpt2_train(text, resumed, *run, "--stop-after", "3") == 0
    with open(resumed / "log.jsonl", "ab") as f:
        f.write(b'{"step": 4, "epoch": 1, "tokens_se')  # a power cut in the middle of a line
    capsys.readouterr()
    assert main(["train", "--out", str(resumed), "--resume", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "has no line end, cut short when the run stopped; dropped" in err and "resuming" in err
    a, b = load_checkpoint(straight)[1], load_checkpoint(resumed)[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in read_log(straight / "log.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in read_log(resumed / "log.jsonl")]


def test_a_log_that_is_not_text_is_named_with_its_line(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert gpt2_train(text, out, "--max-steps", "2", "--stop-after", "1") == 0
    log = out / "log.jsonl"
    log.write_bytes(b"\xff\xfe\x00binary\n" + log.read_bytes())
    capsys.readouterr()
    for argv in (["plot", str(out), "--out", str(tmp_path / "loss.png")], ["train", "--out", str(out), "--resume"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # --resume says first which run it continues
        assert err.endswith(f"{log} line 1 is not UTF-8 text (byte 0); not a gpt2 train log"), err
        assert "Traceback" not in err
