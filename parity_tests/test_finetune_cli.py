"""The fine-tune commands end to end on a tiny config and slices of the real data: each trains through the one
loop, writes its metric, and its export loads where it should (transformers, gpt2 classify, gpt2 eval)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_cli import main
from mapper import load_checkpoint
from tasks.metrics import rouge_l

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "n_layer=2,n_embd=32,n_head=2,n_positions=128", "--quiet"]


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    sms = (REPO / "data/sms_spam_collection/SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines()
    (tmp / "sms.tsv").write_text("\n".join(sms[:300]) + "\n", encoding="utf-8")
    records = json.loads((REPO / "data/instruction-data.json").read_text(encoding="utf-8"))
    (tmp / "instructions.json").write_text(json.dumps(records[:60]), encoding="utf-8")
    gsm = (REPO / "data/gsm8k/train.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp / "gsm8k.jsonl").write_text("\n".join(gsm[:30]) + "\n", encoding="utf-8")
    return tmp


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_classify_learns_and_loads_in_transformers(slices, tmp_path, backend, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "clf"
    assert main(["finetune", "classify", "--data", str(slices / "sms.tsv"), "--out", str(out), "--backend", backend,
                 *TINY, "--max-steps", "12", "--eval-every", "6", "--trainable", "all", "--lr", "1e-3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(0.0 <= metrics[f"{s}_accuracy"] <= 1.0 for s in ("train", "val", "test"))
    assert np.array(metrics["test_confusion_matrix"]).sum() == 19  # 88 balanced texts: 61 train, 8 val, 19 test
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["eval_train_loss"] < evals[0]["eval_train_loss"]
    config, params = load_checkpoint(out)
    assert config.n_classes == 2 and "score.bias" not in params
    tokens = np.array([[40, 1842, 345, 50256, 50256], [9014, 6, 257, 1332, 13]])
    lengths = np.array([3, 5])
    import numpy_gpt2

    ours = numpy_gpt2.classify(params, config, tokens, lengths)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.double().numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["classify", "--weights", str(out), "--backend", backend, "Free entry! Win cash now"]) == 0
    label, probability, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(probability) <= 1.0 and text == "Free entry! Win cash now"


def test_lora_classifier_trains_only_adapters_and_head_and_merges(slices, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "lora"
    init = tmp_path / "init"
    assert main(["train", "--data", str(REPO / "data/the-verdict.txt"), "--out", str(init), "--backend", "numpy",
                 *TINY, "--context", "32", "--stride", "32", "--max-steps", "1", "--sample-prompt", ""]) == 0
    assert main(["finetune", "classify", "--data", str(slices / "sms.tsv"), "--out", str(out), "--backend", "torch",
                 "--init-from", str(init), "--quiet", "--max-steps", "4", "--trainable", "lora", "--lora-rank", "4",
                 "--lora-targets", "attn,mlp", "--lr", "1e-2"]) == 0
    _, base = load_checkpoint(init)
    _, frozen = load_checkpoint(out / "checkpoint")  # the LoRA run's base weights
    assert all(np.array_equal(frozen[k], base[k]) for k in base)  # nothing but adapters and the head moved
    merged_dir = tmp_path / "merged"
    assert main(["lora", "merge", str(out), str(merged_dir)]) == 0
    _, merged = load_checkpoint(merged_dir)
    _, exported = load_checkpoint(out)
    assert all(np.array_equal(merged[k], exported[k]) for k in merged)
    assert not np.array_equal(merged["h.0.attn.c_attn.weight"], base["h.0.attn.c_attn.weight"])
    assert main(["lora", "merge", str(init), str(tmp_path / "x")]) == 2


def test_instruct_writes_responses_and_rouge(slices, tmp_path):
    out = tmp_path / "instruct"
    assert main(["finetune", "instruct", "--data", str(slices / "instructions.json"), "--out", str(out),
                 "--backend", "numpy", *TINY, "--max-steps", "3", "--eval-every", "3", "--batch-size", "4",
                 "--max-new-tokens", "4", "--mask-prompt"]) == 0
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 6  # of 60: 85% train (51), 10% test (6), the rest validation (3)
    assert all({"instruction", "output", "model_response"} <= set(r) for r in responses)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["rouge_l"] <= 1.0 and metrics["val_loss"] > 0
    # gpt2 eval instruct on the fine-tune gives the same responses and score; on the untrained init, a baseline
    scored = tmp_path / "scored.json"
    assert main(["eval", "instruct", "--weights", str(out), "--data", str(slices / "instructions.json"),
                 "--backend", "numpy", "--max-new-tokens", "4", "--out", str(scored)]) == 0
    result = json.loads(scored.read_text())
    assert [r["model_response"] for r in result["responses"]] == [r["model_response"] for r in responses]
    assert result["rouge_l"] == metrics["rouge_l"]
    baseline = tmp_path / "baseline.json"
    assert main(["eval", "instruct", "--config", TINY[1], "--data", str(slices / "instructions.json"), "--limit", "2",
                 "--backend", "numpy", "--max-new-tokens", "4", "--out", str(baseline)]) == 0
    result = json.loads(baseline.read_text())
    assert result["n_test"] == 2 and "GPT-2 init (seed 123)" in result["model"]
    assert result["rouge_l"] == rouge_l([r["model_response"] for r in result["responses"]],
                                        [r["output"] for r in result["responses"]])


def test_reason_then_gsm8k_eval_and_predictions_scoring(slices, tmp_path, capsys):
    out = tmp_path / "reason"
    assert main(["finetune", "reason", "--data", str(slices / "gsm8k.jsonl"), "--out", str(out), "--backend",
                 "torch", *TINY, "--max-steps", "2", "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "30 samples" in err and "shortened thinking" in err
    test = REPO / "data/gsm8k/test.jsonl"
    summary = tmp_path / "score.json"
    assert main(["eval", "gsm8k", "--weights", str(out), "--data", str(test), "--limit", "2", "--max-new-tokens", "4",
                 "--json", str(summary)]) == 0
    assert json.loads(summary.read_text())["n"] == 2
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps({"index": 0, "response": "<answer>The answer is $18.00.</answer>"}) + "\n"
                           + json.dumps({"index": 1, "response": "<answer>4</answer>"}) + "\n")
    assert main(["eval", "gsm8k", "--predictions", str(predictions), "--data", str(test), "--json",
                 str(summary), "--force"]) == 0  # the first score.json is replaced only when asked
    # Janet's ducks: 18; robe: 3; both answers hold a number
    assert json.loads(summary.read_text()) == {"accuracy": 0.5, "correct": 1, "n": 2, "parse_rate": 1.0}


def test_finetune_refuses_bad_input_in_one_line(slices, tmp_path, capsys):
    cases = [
        (["classify", "--data", str(tmp_path / "missing.tsv")], "does not exist"),
        (["classify", "--data", str(slices / "sms.tsv"), "--trainable", "lora"], "--trainable lora needs --lora-rank"),
        (["classify", "--data", str(slices / "sms.tsv"), "--max-length", "129"], "model's context of 128 positions"),
        (["instruct", "--data", str(slices / "sms.tsv")], "is not valid JSON"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert main(["finetune", *argv, "--out", str(out), "--backend", "numpy", *TINY, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
        assert not out.exists()


def test_a_fine_tune_resumes_from_its_out_folder_alone(slices, tmp_path, capsys):
    out = tmp_path / "clf"
    argv = ["finetune", "classify", "--data", str(slices / "sms.tsv"), "--out", str(out), "--backend", "numpy", *TINY,
            "--max-steps", "4", "--eval-every", "2", "--trainable", "all", "--lora-rank", "2", "--lr", "1e-3"]
    assert main([*argv, "--stop-after", "2"]) == 0
    assert not (out / "metrics.json").exists()
    assert main(["finetune", "classify", "--out", str(out), "--resume", "--quiet"]) == 0
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["args"]["options"]["trainable"] == "all"
    assert state["args"]["options"]["lora"] == {"rank": 2, "alpha": 16.0, "targets": ["attn"]}
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert main(["finetune", "classify", "--out", str(out), "--resume", "--lr", "1"]) == 2  # a differing value
    assert "lr 0.001 -> 1.0" in capsys.readouterr().err


def test_course_defaults_and_the_random_init_note(slices, tmp_path, capsys):
    """Chapter 6 trains 5 epochs; chapter 7 trains 2 epochs and evaluates every 5 steps. A run that does not start
    from pretrained weights says so, and names the course's setting."""
    from gpt2_cli.main import build_parser

    parser = build_parser()
    data = str(slices / "sms.tsv")
    classify = parser.parse_args(["finetune", "classify", "--data", data, "--out", "x"])
    instruct = parser.parse_args(["finetune", "instruct", "--data", data, "--out", "x"])
    assert (classify.epochs, classify.eval_every) == (5, 50)
    assert (instruct.epochs, instruct.eval_every) == (2, 5)
    assert parser.parse_args(["train", "--data", data, "--out", "x"]).epochs is None  # gpt2 train: 1 unless asked
    capsys.readouterr()
    assert main(["finetune", "classify", "--data", data, "--out", str(tmp_path / "c"), "--backend", "numpy", *TINY,
                 "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "starting from a random initialisation (seed 123)" in err and "--init-from gpt2" in err
