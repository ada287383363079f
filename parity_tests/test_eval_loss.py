"""``gpt2 eval loss`` and ``tasks.eval_loss``: the course's train/validation loss, against transformers' logits and
the course's windows rebuilt here by hand (90/10 split by characters, windows ``range(0, len(ids) - context,
stride)``, each window's mean cross-entropy, averaged over the windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from gpt2_cli import main
from mapper import GPT2Config, init_params, load_checkpoint, load_tokenizer, save_checkpoint
from numpy_gpt2.backend import NumpyBackend
from parity_tests.conftest import DATA, FIXTURES
from tasks.eval_loss import text_losses

VERDICT = DATA / "the-verdict.txt"
transformers.logging.set_verbosity_error()


class CharEncoder:
    """A tokenizer for the fixture's 97-token vocabulary: one id per character (ord mod 96)."""

    def encode(self, text: str, allowed_special=()) -> list[int]:
        return [ord(c) % 96 for c in text]


def course_losses_by_hand(model: transformers.GPT2LMHeadModel, text: str, encode, context: int,
                          stride: int) -> tuple[float, float, int, int]:
    cut = int(0.9 * len(text))
    results = []
    for part in (text[:cut], text[cut:]):
        ids = torch.tensor(encode(part))
        losses = []
        for start in range(0, len(ids) - context, stride):
            window = ids[start : start + context + 1]
            with torch.no_grad():
                logits = model(window[None, :-1]).logits[0]
            losses.append(F.cross_entropy(logits, window[1:]).item())
        results.append((float(np.mean(losses)), len(losses)))
    (train, n_train), (val, n_val) = results
    return train, val, n_train, n_val


def test_losses_on_the_fixture_equal_transformers(tmp_path: Path) -> None:
    """The fixture model (97 tokens) on a character-level encoding of the first 1500 characters of The Verdict."""
    text = VERDICT.read_text(encoding="utf-8")[:1500]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    config, params = load_checkpoint(FIXTURES / "hf_tiny")
    backend = NumpyBackend.for_inference(config, {k: v.astype(np.float64) for k, v in params.items()})
    hf = transformers.GPT2LMHeadModel.from_pretrained(FIXTURES / "hf_tiny", dtype=torch.float64).eval()
    for context, stride, batch in ((32, 32, 2), (16, 24, 3)):  # batch 3 leaves a smaller last batch
        ours = text_losses(backend, config, [tmp_path / "text.txt"], CharEncoder(), context, stride, 0.1, batch)
        train, val, n_train, n_val = course_losses_by_hand(hf, text, CharEncoder().encode, context, stride)
        assert (ours.train_windows, ours.val_windows) == (n_train, n_val)
        assert abs(ours.train_loss - train) < 1e-12 and abs(ours.val_loss - val) < 1e-12


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = GPT2Config(n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return save_checkpoint(init_params(config, seed=11, dtype=np.float64), config, tmp_path_factory.mktemp("m"))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cli_on_the_verdict_equals_transformers(gpt2_vocab_model: Path, tmp_path: Path, capsys, backend: str) -> None:
    """GPT-2's tokenizer on the first 6000 characters of The Verdict, a tiny model over GPT-2's vocabulary."""
    text, out = VERDICT.read_text(encoding="utf-8")[:6000], tmp_path / "loss.json"
    (tmp_path / "verdict.txt").write_text(text, encoding="utf-8")
    args = ["eval", "loss", "--weights", str(gpt2_vocab_model), "--data", str(tmp_path / "verdict.txt"),
            "--context", "32", "--stride", "32", "--backend", backend, "--dtype", "float64", "--json", str(out)]
    if backend == "torch":
        args += ["--device", "cpu"]
    assert main(args) == 0
    got = json.loads(out.read_text())
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_vocab_model, dtype=torch.float64).eval()
    encoder = load_tokenizer()
    train, val, n_train, n_val = course_losses_by_hand(
        hf, text, lambda t: encoder.encode(t, allowed_special={"<|endoftext|>"}), 32, 32)
    assert (got["train_windows"], got["val_windows"]) == (n_train, n_val)
    assert abs(got["train_loss"] - train) < 1e-12 and abs(got["val_loss"] - val) < 1e-12
    expected = (f"train loss {train:.4f} ({n_train} windows of 32 tokens, stride 32), validation loss {val:.4f} "
                f"({n_val} windows)")
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--context", "64"], "--context 64 is longer than the model's context of 32 positions"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1), got 1.5"),
])
def test_cli_errors_are_one_line(gpt2_vocab_model: Path, capsys, extra: list[str], message: str) -> None:
    assert main(["eval", "loss", "--weights", str(gpt2_vocab_model), "--data", str(VERDICT), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_text_outside_the_vocabulary_is_refused(capsys) -> None:
    assert main(["eval", "loss", "--weights", str(FIXTURES / "hf_tiny"), "--data", str(VERDICT), "--context",
                 "16", "--stride", "16"]) == 2
    assert "outside the model's vocabulary of 97: the model does not use this tokenizer" in capsys.readouterr().err
