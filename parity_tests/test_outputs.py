"""The one output rule (``mapper.outputs``) and every command that writes: an input is never written (an output
that is, contains or lies inside an input is refused, after symlinks), an existing file is replaced only with
--force, and the outputs are probed before any model is built; gsm8k predictions stream to their file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpt2_cli import main
from mapper import GPT2Config, init_params, save_checkpoint
from mapper.outputs import Output, check_outputs
from parity_tests.conftest import DATA
from parity_tests.test_train import TINY_RUN

UNWRITABLE = Path("/proc/gpt2-cannot-write-here")  # nobody, root included, creates files in /proc


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2-vocabulary model W, a GSM8K slice D, a predictions file P and a one-step run RUN."""
    tmp = tmp_path_factory.mktemp("world")
    config = GPT2Config(n_positions=256, n_embd=16, n_layer=1, n_head=2)  # every prompt of D fits
    weights = save_checkpoint(init_params(config, seed=1), config, tmp / "W")
    data = tmp / "D.jsonl"
    data.write_text("\n".join((DATA / "gsm8k/test.jsonl").read_text(encoding="utf-8").splitlines()[:4]) + "\n")
    predictions = tmp / "P.jsonl"
    predictions.write_text(json.dumps({"index": 0, "response": "<answer>18</answer>"}) + "\n")
    text = tmp / "text.txt"
    text.write_text((DATA / "the-verdict.txt").read_text(encoding="utf-8")[:3000], encoding="utf-8")
    run = tmp / "RUN"
    assert main(["train", "--data", str(text), "--out", str(run), "--backend", "numpy", *TINY_RUN, "--max-steps",
                 "1", "--sample-prompt", ""]) == 0
    return {"W": weights, "D": data, "P": predictions, "RUN": run, "text": text, "tmp": tmp}


def snapshot(*roots: Path) -> dict[Path, bytes]:
    files = [p for r in roots for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]
    return {p: p.read_bytes() for p in files}


def refused(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, (argv, err)


# ------------------------------------------------------------------------------------------ the rule itself


def test_an_output_may_not_be_contain_or_lie_inside_an_input_after_symlinks(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    a, folder = tmp_path / "in" / "a.txt", tmp_path / "in"
    cases = [(a, a, "is"), (tmp_path / "link" / "a.txt", a, "is"), (tmp_path / "in" / "b.txt", folder, "lies inside"),
             (tmp_path / "link" / "sub" / "b.txt", folder, "lies inside"), (tmp_path, a, "contains")]
    for out, given, relation in cases:
        with pytest.raises(ValueError) as info:
            check_outputs([Output("--out", out)], {"--data": [given]})
        assert str(info.value) == (f"--out {out} {relation} the input --data {given}; an input is never written: "
                                   "choose another --out")
    check_outputs([Output("--out", tmp_path / "elsewhere.txt")], {"--data": folder, "--x": None})


def test_existing_files_are_replaced_only_with_force(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="x.json already exists; pass --force to replace it"):
        check_outputs([Output("--json", tmp_path / "x.json")], {})
    check_outputs([Output("--json", tmp_path / "x.json")], {}, force=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds config.json, which this command would replace"):
        check_outputs([Output("--out", tmp_path / "run", ("config.json", "model.safetensors"))], {})
    check_outputs([Output("--out", tmp_path / "run", ("model.safetensors",))], {})  # notes.txt is not written
    with pytest.raises(ValueError, match="--out and --json name the same path"):
        check_outputs([Output("--out", tmp_path / "y"), Output("--json", tmp_path / "." / "y")], {})
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "notes.txt", "run", "x.json"]


@pytest.mark.parametrize(("make", "message"), [
    (lambda t: Output("--out", UNWRITABLE / "x.jsonl"), "the folder /proc/gpt2-cannot-write-here does not exist"),
    (lambda t: Output("--out", Path("/proc/x.jsonl")), "cannot write in /proc"),
    (lambda t: Output("--out", UNWRITABLE / "run", ()), "cannot write in /proc"),
    (lambda t: Output("--out", t), "is a folder; give a file name"),
    (lambda t: Output("--out", t / "file.txt" / "run", ()), "file.txt is not a folder"),
    (lambda t: Output("--out", t / "file.txt", ()), "exists and is not a folder"),
])
def test_the_write_probe(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=message):
        check_outputs([make(tmp_path)], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the probe left nothing behind


# ------------------------------------------------------------------------------------------ every writing command


def cases(w: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    W, D, P, RUN, text = (str(w[k]) for k in ("W", "D", "P", "RUN", "text"))
    gsm = ["eval", "gsm8k", "--weights", W, "--data", D, "--max-new-tokens", "2"]
    return {
        "eval --out = --data": ([*gsm, "--out", D], f"--out {D} is the input --data {D}"),
        "eval --json = --data": ([*gsm, "--json", D], f"--json {D} is the input --data {D}"),
        "eval --json = --predictions": (["eval", "gsm8k", "--predictions", P, "--data", D, "--json", P],
                                        f"--json {P} is the input --predictions {P}"),
        "eval --out over the model": ([*gsm, "--out", f"{W}/model.safetensors"],
                                      f"lies inside the input --weights {W}"),
        "plot over its log": (["plot", RUN, "--out", f"{RUN}/log.jsonl"], f"lies inside the input DIR {RUN}"),
        "train --out = --init-from": (["train", "--data", text, "--init-from", W, "--out", W, "--backend", "numpy"],
                                      f"--out {W} is the input --init-from {W}"),
        "finetune inside --init-from": (["finetune", "classify", "--data", str(DATA / "sms_spam_collection" /
                                         "SMSSpamCollection.tsv"), "--init-from", W, "--out", f"{W}/ft"],
                                        f"lies inside the input --init-from {W}"),
        "train --out holding --data": (["train", "--data", text, "--out", str(w["tmp"]), "--backend", "numpy"],
                                       f"--out {w['tmp']} contains the input --data {text}"),
        "convert into the run it reads": (["convert", RUN, f"{RUN}/checkpoint", "--force"],
                                          f"OUT {RUN}/checkpoint lies inside the input IN {RUN}"),
        "convert into its input": (["convert", W, f"{W}/sub"], f"OUT {W}/sub lies inside the input IN {W}"),
        "convert a file into its folder": (["convert", f"{W}/model.safetensors", W, "--force"],
                                           f"OUT {W} contains the input IN {W}/model.safetensors"),
        "lora merge into the run": (["lora", "merge", RUN, f"{RUN}/merged"], f"lies inside the input DIR {RUN}"),
    }


CASES = ["eval --out = --data", "eval --json = --data", "eval --json = --predictions", "eval --out over the model",
         "plot over its log", "train --out = --init-from", "finetune inside --init-from",
         "train --out holding --data", "convert into the run it reads", "convert into its input",
         "convert a file into its folder", "lora merge into the run"]


@pytest.mark.parametrize("case", CASES)
def test_no_command_writes_its_input(world, capsys, case):
    argv, message = cases(world)[case]
    before = snapshot(world["W"], world["D"], world["P"], world["RUN"])
    refused(capsys, argv, message)
    assert snapshot(world["W"], world["D"], world["P"], world["RUN"]) == before


def test_a_symlinked_output_that_is_the_input_is_refused(world, tmp_path, capsys):
    link = tmp_path / "predictions.jsonl"
    link.symlink_to(world["D"])
    before = world["D"].read_bytes()
    refused(capsys, ["eval", "gsm8k", "--weights", str(world["W"]), "--data", str(world["D"]), "--out", str(link)],
            f"--out {link} is the input --data {world['D']}")
    assert world["D"].read_bytes() == before


def test_an_unrelated_config_json_in_out_is_kept_unless_force(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    argv = ["train", "--data", str(world["text"]), "--out", str(out), "--backend", "numpy", *TINY_RUN, "--max-steps",
            "1", "--sample-prompt", ""]
    refused(capsys, argv, "already holds config.json, which this command would replace; pass --force")
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    assert main([*argv, "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_bench_keeps_an_earlier_run_unless_force(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}")
    refused(capsys, ["bench", "--out", str(tmp_path), "--config", "n_layer=1,n_embd=8,n_head=2", "--backends",
                     "numpy", "--workloads", "forward", "--repeats", "1"], "already holds results.json")
    assert (tmp_path / "results.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------ probed before any work


def never(*args, **kwargs):
    raise AssertionError("work started before the outputs were checked")


@pytest.mark.parametrize(("out", "message"), [
    (lambda t: UNWRITABLE / "p.jsonl", "the folder /proc/gpt2-cannot-write-here does not exist"),
    (lambda t: Path("/proc/p.jsonl"), "cannot write in /proc"),
    (lambda t: t, "is a folder; give a file name"),
])
def test_eval_checks_its_outputs_before_loading_the_model(world, tmp_path, capsys, monkeypatch, out, message):
    monkeypatch.setattr("mapper.load_checkpoint", never)
    refused(capsys, ["eval", "gsm8k", "--weights", str(world["W"]), "--data", str(world["D"]), "--out",
                     str(out(tmp_path))], message)


@pytest.mark.parametrize("command", [
    ["train", "--data", "{text}", "--backend", "numpy", "--out", "/proc/run"],
    ["finetune", "reason", "--data", "{D}", "--backend", "numpy", "--out", "/proc/run"],
    ["convert", "{W}", "/proc/out"],
    ["plot", "{RUN}", "--out", "/proc/loss.png"],
    ["lora", "merge", "{RUN}", "/proc/out"],
    ["download", "gpt2", "--to", "/proc/gpt2"],
])
def test_every_writing_command_probes_before_any_model_is_built(world, capsys, monkeypatch, command):
    for target in ("gpt2_cli.train.resolve_model", "mapper.load_checkpoint", "mapper.detect_format",
                   "tasks.runlog.read_run_log", "gpt2_cli.download.fetch"):
        monkeypatch.setattr(target, never)
    argv = [part.format(**{k: str(v) for k, v in world.items()}) for part in command]
    refused(capsys, argv, "cannot write in /proc")


# ------------------------------------------------------------------------------------------ gsm8k predictions


def test_gsm8k_predictions_stream_to_their_file_and_an_interruption_keeps_them(world, tmp_path, capsys, monkeypatch):
    from numpy_gpt2.backend import NumpyBackend

    real, calls = NumpyBackend.greedy, []

    def interrupted_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NumpyBackend, "greedy", interrupted_at_the_third)
    out = tmp_path / "predictions.jsonl"
    assert main(["eval", "gsm8k", "--weights", str(world["W"]), "--data", str(world["D"]), "--backend", "numpy",
                 "--max-new-tokens", "2", "--out", str(out)]) == 130
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1]  # the two answers made before the interruption
    assert all({"response", "predicted", "reference", "correct"} <= set(r) for r in lines)
    capsys.readouterr()


def test_gsm8k_says_how_many_records_it_skipped(world, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    records = world["D"].read_text().splitlines()
    data.write_text("\n".join([records[0], json.dumps({"question": "2+2?", "answer": "four, no final line"}),
                               records[1]]) + "\n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"index": 0, "response": "<answer>18</answer>"}) + "\n")
    assert main(["eval", "gsm8k", "--predictions", str(predictions), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert f"{data}: 1 record(s) without a final '#### answer' line skipped (line 2)" in captured.err
    assert "1 records skipped" in captured.out


def test_the_default_predictions_file_lies_beside_the_weights(world, tmp_path, capsys):
    weights = tmp_path / "model"
    shutil.copytree(world["W"], weights)
    assert main(["eval", "gsm8k", "--weights", str(weights), "--data", str(world["D"]), "--backend", "numpy",
                 "--max-new-tokens", "1", "--limit", "1"]) == 0
    assert len((tmp_path / "model-gsm8k.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in weights.iterdir()) == ["config.json", "model.safetensors"]
    capsys.readouterr()
    refused(capsys, ["eval", "gsm8k", "--weights", str(weights), "--data", str(world["D"]), "--limit", "1"],
            "model-gsm8k.jsonl already exists; pass --force")
