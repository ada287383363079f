"""gpt2 train end to end on a tiny config and a slice of The Verdict: both backends learn, resume is bit-exact,
the checkpoint loads in transformers, DDP on 2 processes equals 1 process, float64 backends agree, every bad
input is refused before anything is written; and the data windows, split and schedules by hand-made cases."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_cli import main
from mapper import load_checkpoint, load_tokenizer
from tasks.runlog import read_log
from tasks.schedule import schedule_lr
from tasks.text import TextData, Windows, prepare, read_texts, split_text, window_starts

REPO = Path(__file__).resolve().parents[1]
VERDICT = REPO / "data" / "the-verdict.txt"
TINY = "n_layer=2,n_embd=32,n_head=2,n_positions=32"
TINY_RUN = ["--config", TINY, "--context", "16", "--stride", "16", "--batch-size", "4", "--eval-every", "4",
            "--eval-batches", "2", "--sample-tokens", "4", "--quiet"]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """The first 4000 characters of The Verdict (about 1000 tokens: 50 windows of 16 + 1)."""
    path = tmp_path_factory.mktemp("data") / "verdict-head.txt"
    path.write_text(VERDICT.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def gpt2_train(data: Path, out: Path, *extra: str, backend: str = "numpy") -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--backend", backend, *TINY_RUN, *extra])


# ------------------------------------------------------------------------------------------ data, by hand


def test_window_starts_drop_the_last_partial_window():
    # a window needs context + 1 tokens (its inputs and the shifted targets)
    assert window_starts(10, 4, 4).tolist() == [0, 4]      # 8 + 5 > 10: the partial window at 8 is dropped
    assert window_starts(9, 4, 4).tolist() == [0, 4]       # 4 + 5 = 9 tokens exactly: kept
    assert window_starts(8, 4, 4).tolist() == [0]
    assert window_starts(10, 4, 2).tolist() == [0, 2, 4]   # stride < context: overlapping windows
    assert window_starts(4, 4, 1).tolist() == []           # context tokens alone make no target for the last
    with pytest.raises(ValueError, match="must be >= 1"):
        window_starts(10, 0, 1)


def test_windows_hold_inputs_and_next_token_targets():
    windows = Windows(np.arange(100, 111, dtype=np.uint16), context=4, stride=3)  # 11 tokens: starts 0, 3, 6
    assert len(windows) == 3
    inputs, targets = windows.batch([2, 0])
    assert inputs.tolist() == [[106, 107, 108, 109], [100, 101, 102, 103]]
    assert targets.tolist() == [[107, 108, 109, 110], [101, 102, 103, 104]]
    assert inputs.dtype == np.int64


def test_split_is_by_position_and_the_tail_is_validation():
    assert split_text("abcdefghij", 0.1) == ("abcdefghi", "j")
    assert split_text("abcdefghij", 0.0) == ("abcdefghij", "")
    assert split_text("abcdefghijk", 0.25) == ("abcdefgh", "ijk")  # int(0.75 * 11) = 8
    with pytest.raises(ValueError, match="val-fraction"):
        split_text("abc", 1.0)


def test_epoch_order_is_a_seeded_permutation_with_the_last_incomplete_batch_dropped():
    data = TextData(Windows(np.arange(40, dtype=np.uint16), 3, 3), Windows(np.arange(9, dtype=np.uint16), 3, 3))
    assert len(data.train) == 13  # starts 0, 3, ..., 36
    epoch0 = data.train_batches(4, 0, seed=123)
    assert [len(b) for b in epoch0] == [4, 4, 4]  # 13 = 3 * 4 + 1 dropped
    assert len(set(np.concatenate(epoch0).tolist())) == 12
    assert all(np.array_equal(a, b) for a, b in zip(epoch0, data.train_batches(4, 0, seed=123), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, data.train_batches(4, 1, seed=123), strict=True))
    assert [b.tolist() for b in data.val_batches(2)] == [[0, 1]]  # 9 tokens, context 3: windows at 0 and 3


def test_schedules():
    assert [schedule_lr("constant", s, 1.0, 0, 10, 0.0) for s in (0, 5, 20)] == [1.0, 1.0, 1.0]
    assert [schedule_lr("constant", s, 1.0, 4, 10, 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [schedule_lr("cosine", s, 1.0, 2, 12, 0.1) for s in range(13)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine[12] == 0.1 and all(a >= b for a, b in zip(cosine[1:], cosine[2:], strict=False))


def test_bad_text_files_name_the_file(tmp_path):
    empty, binary = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    binary.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="does not exist"):
        read_texts([tmp_path / "nope.txt"])
    with pytest.raises(ValueError, match="empty.txt is empty"):
        read_texts([empty])
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3, line 1"):
        read_texts([binary])
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one")
    b.write_text("two")
    assert read_texts([a, b]) == "one<|endoftext|>two"


def test_token_ids_are_cached_and_reused(text, tmp_path):
    encoder = load_tokenizer()
    first = prepare([text], encoder, 16, 16, 0.1, 4, cache_dir=tmp_path)
    assert not list(tmp_path.glob("tokens-*.npy"))  # nothing is written until the run's checks pass
    first.save_cache()
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2

    class NoEncoding:
        def encode(self, *args, **kwargs):
            raise AssertionError("the cache should have been used")

    second = prepare([text], NoEncoding(), 16, 16, 0.1, 4, cache_dir=tmp_path)
    assert np.array_equal(first.train.ids, second.train.ids) and np.array_equal(first.val.ids, second.val.ids)
    assert first.train.ids.tolist()[:4] == encoder.encode(text.read_text()[:40])[:4]


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_both_backends_learn_and_write_a_loadable_model(text, tmp_path, backend):
    out = tmp_path / "run"
    assert gpt2_train(text, out, "--max-steps", "12", "--lr", "3e-3", backend=backend) == 0
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 4, 8, 12]
    assert evals[-1]["eval_train_loss"] < evals[0]["eval_train_loss"] - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert all(isinstance(r["sample"], str) for r in evals)
    assert log[-1]["tokens_seen"] == 12 * 4 * 16
    assert (out / "loss.png").stat().st_size > 1000
    config, params = load_checkpoint(out)
    assert config.n_layer == 2 and config.n_positions == 32
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 12 and state["args"]["backend"] == backend


@pytest.mark.parametrize("init", ["gpt2", "course"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_resume_is_bit_exact(text, tmp_path, backend, init, capsys):
    """With --init course the run drops (0.1 at the three places): each step's masks come from (seed, step), so the
    resumed run draws the uninterrupted run's masks without any stored generator state."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ("--max-steps", "10", "--grad-accum", "2", "--schedule", "cosine", "--warmup-steps", "2", "--grad-clip",
           "1.0", "--lr", "2e-3", "--init", init)
    assert gpt2_train(text, straight, *run, backend=backend) == 0
    assert gpt2_train(text, resumed, *run, "--stop-after", "4", backend=backend) == 0
    assert "stopped after step 4 of 10" in capsys.readouterr().err
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["step"] == 4
    assert gpt2_train(text, resumed, *run, "--resume", backend=backend) == 0
    a, b = load_checkpoint(straight)[1], load_checkpoint(resumed)[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "elapsed"} for r in read_log(straight / "log.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed"} for r in read_log(resumed / "log.jsonl")]
    if init == "course":  # the dropout really ran: without it the same run ends elsewhere
        assert gpt2_train(text, tmp_path / "no-dropout", *run, "--dropout", "0", backend=backend) == 0
        c = load_checkpoint(tmp_path / "no-dropout")[1]
        assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_the_course_init_learns_the_text_faster_than_gpt2_init(tmp_path):
    """The contrast of the README's curves, small: on a text of 10 windows, GPT-2's initialisation (tied head,
    embeddings of std 0.02) stalls near the unigram loss while the course's model (embeddings N(0, 1), an untied
    head, dropout 0.1) goes on memorising (measured: 4.08 against 2.49 after 20 steps)."""
    short = tmp_path / "verdict-700.txt"
    short.write_text(VERDICT.read_text(encoding="utf-8")[:700], encoding="utf-8")
    runs = {}
    for init in ("gpt2", "course"):
        out = tmp_path / init
        assert main(["train", "--data", str(short), "--out", str(out), "--backend", "torch", "--config",
                     "n_layer=1,n_embd=64,n_head=2,n_positions=32", "--context", "16", "--stride", "16",
                     "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--max-steps", "20", "--lr",
                     "6e-3", "--decay", "all", "--init", init, "--sample-prompt", "", "--quiet"]) == 0
        runs[init] = [r["eval_train_loss"] for r in read_log(out / "log.jsonl") if "eval_train_loss" in r]
    gpt2, course = runs["gpt2"], runs["course"]
    assert course[-1] < gpt2[-1] - 1.0, runs
    assert course[0] - course[-1] > gpt2[0] - gpt2[-1] + 1.0, runs  # it fell further, from a higher start


def test_the_course_model_is_recorded_and_exported_as_it_trained(text, tmp_path, capsys):
    """--init course reaches the run's state and config.json (so --resume and export keep it); transformers, which
    has no switch for the q/k/v bias, loads the export (zero bias) with the same logits, dropout off in eval."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy_gpt2

    out = tmp_path / "run"
    assert gpt2_train(text, out, "--max-steps", "2", "--init", "course", backend="torch") == 0
    err = capsys.readouterr().err
    assert "the course's init (seed 123), dropout 0.1" in err and "3,242,752 parameters" in err
    config, params = load_checkpoint(out)
    assert (config.init, config.tie_word_embeddings, config.qkv_bias) == ("course", False, False)
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0.1, 0.1, 0.1)
    assert "lm_head.weight" in params and "h.0.attn.c_attn.bias" not in params
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["args"]["config"] == config.to_dict()
    exported = json.loads((out / "config.json").read_text())
    assert (exported["attn_pdrop"], exported["gpt2_init"], exported["gpt2_qkv_bias"]) == (0.1, "course", False)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.attn_pdrop == hf.config.resid_pdrop == hf.config.embd_pdrop == 0.1
    assert not hf.config.tie_word_embeddings
    tokens = np.array([[464, 3290, 318, 257, 1332, 13]])
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.double().numpy()
    np.testing.assert_allclose(theirs, numpy_gpt2.forward(params, config, tokens), rtol=1e-4, atol=1e-4)


def test_checkpoint_loads_in_transformers_with_the_same_logits(text, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import numpy_gpt2

    out = tmp_path / "run"
    assert gpt2_train(text, out, "--max-steps", "3") == 0
    config, params = load_checkpoint(out)
    tokens = np.array([[464, 3290, 318, 257, 1332, 13, 198, 50256]])
    ours = numpy_gpt2.forward(params, config, tokens)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.double().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    # the run folder also holds GPT-2's tokenizer and generation config: transformers' pipeline runs on it offline
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    generated = pipe("The Verdict", max_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = load_tokenizer().encode("The Verdict")
    expected = numpy_gpt2.generate(params, config, np.array([prompt]), 5, eos_token_id=config.eos_token_id)[0]
    assert list(generated) == expected.tolist()[: len(generated)] and len(generated) > len(prompt)


def test_float64_backends_agree_step_by_step(text, tmp_path):
    runs = {}
    for backend in ("numpy", "torch"):
        out = tmp_path / backend
        assert gpt2_train(text, out, "--max-steps", "3", "--dtype", "float64", "--lr", "1e-3", "--grad-clip", "0.5",
                          "--sample-prompt", "", backend=backend) == 0
        runs[backend] = (read_log(out / "log.jsonl"), load_checkpoint(out)[1])
    (log_n, params_n), (log_t, params_t) = runs["numpy"], runs["torch"]
    for a, b in zip(log_n, log_t, strict=True):
        for key in ("train_loss", "grad_norm", "val_loss", "eval_train_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-10 * abs(a[key]), (a["step"], key, a[key], b[key])
    for name in params_n:
        np.testing.assert_allclose(params_t[name], params_n[name], rtol=0, atol=1e-10, err_msg=name)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_ddp_on_two_processes_equals_one_process(text, tmp_path):
    pytest.importorskip("torch.distributed")
    common = ["train", "--data", str(text), "--backend", "torch", "--device", "cpu", *TINY_RUN, "--max-steps", "6",
              "--sample-prompt", ""]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one)]) == 0
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gpt2_cli", *common, "--out", str(two)], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log_one, log_two = read_log(one / "log.jsonl"), read_log(two / "log.jsonl")
    assert len(log_one) == len(log_two) == 6  # rank 0 alone writes the log
    for a, b in zip(log_one, log_two, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam divides m by sqrt(v): where a gradient element is nearly zero, float32 round-off in the all-reduced
    # gradient changes that element's step by a fraction of lr (seen: 0.25% of lr), so the weights are compared
    # in units of one step (lr = 4e-4), the losses above to round-off
    p1, p2 = load_checkpoint(one)[1], load_checkpoint(two)[1]
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], rtol=0, atol=0.02 * 4e-4, err_msg=name)


# ------------------------------------------------------------------------------------------ bad input


def _bad_cases(text: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    empty, latin1, short = tmp / "empty.txt", tmp / "latin1.txt", tmp / "short.txt"
    empty.write_text("")
    latin1.write_bytes("na\xefve".encode("latin-1"))
    short.write_text("Too short for one window.")
    return {
        "missing file": (["--data", str(tmp / "nope.txt")], "does not exist"),
        "empty file": (["--data", str(empty)], "is empty"),
        "not UTF-8": (["--data", str(latin1)], "is not UTF-8"),
        "shorter than a window": (["--data", str(short)], "fewer than one batch"),
        "context above n_positions": (["--data", str(text), "--context", "33"], "model's context of 32 positions"),
        "autocast in float64": (["--data", str(text), "--backend", "torch", "--autocast", "bf16", "--dtype",
                                 "float64"], "--autocast needs --dtype float32"),
        "torch flag on numpy": (["--data", str(text), "--device", "cpu"], "--device is a torch option"),
        "resume with nothing to resume": (["--data", str(text), "--resume"], "holds no checkpoint"),
        "course init from a checkpoint": (["--data", str(text), "--init", "course", "--init-from",
                                           str(REPO / "parity_tests" / "fixtures" / "hf_tiny")],
                                          "--init course draws a fresh model; --init-from starts from trained"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "not UTF-8", "shorter than a window",
                                  "context above n_positions", "autocast in float64", "torch flag on numpy",
                                  "resume with nothing to resume", "course init from a checkpoint"])
def test_bad_input_is_one_line_and_writes_nothing(text, tmp_path, capsys, case):
    flags, message = _bad_cases(text, tmp_path)[case]
    out = tmp_path / "out"
    argv = ["train", "--out", str(out), *TINY_RUN, "--max-steps", "2"]
    if "--backend" not in flags:
        argv += ["--backend", "numpy"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("gpt2 train: error:"), err
    assert not out.exists()


def test_a_run_is_never_overwritten_and_resume_checks_its_arguments(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert gpt2_train(text, out, "--max-steps", "2") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    cases = [
        ((), "already holds a training run (step 2); pass --resume"),
        (("--resume", "--config", "n_layer=1,n_embd=32,n_head=2,n_positions=32"), "config"),
        (("--resume", "--lr", "1e-3"), "lr 0.0004 -> 0.001"),
        (("--resume",), "already finished (2 steps)"),
    ]
    for extra, message in cases:
        argv = ["train", "--data", str(text), "--out", str(out), "--backend", "numpy", *TINY_RUN, "--max-steps", "2",
                *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
    assert main(["train", "--data", str(text), "--out", str(out), "--backend", "torch", *TINY_RUN, "--max-steps",
                 "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "backend 'numpy' -> 'torch'" in err and "max_steps 2 -> 4" in err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_help_names_the_course_run(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--resume" in out and "torchrun" in out and "the-verdict" in out
    assert math.isclose(4e-4, float(out.split("peak learning rate (default: ")[1].split(")")[0]))


def test_plot_overlays_runs_and_reports_time_per_step(text, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert gpt2_train(text, a, "--max-steps", "4") == 0
    assert gpt2_train(text, b, "--max-steps", "4", "--lr", "1e-3") == 0
    capsys.readouterr()
    book = REPO / "benchmarks" / "results" / "pretrain-verdict" / "book.json"
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "both.png"), "--labels", "slow,fast", "--reference",
                 str(book)]) == 0
    out = capsys.readouterr().out
    assert "slow: 4 steps" in out and "fast: 4 steps" in out and "s/step (median)" in out
    assert (tmp_path / "both.png").stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no log.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"label": "x", "points": [{"tokens_seen": 512}]}')
    assert main(["plot", str(a), "--out", str(tmp_path / "x.png"), "--reference", str(bad)]) == 2
    assert "point 0 needs an integer tokens_seen and a train_loss or val_loss" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
