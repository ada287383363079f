"""``gpt2 chat`` and the templates it shares with the fine-tunes: the prompt it builds is the training text up to
the answer, byte for byte and token for token; EOS ends an answer; the reasoning template prints thinking and
answer apart; the loop answers each line and leaves on EOF (from a pipe and at a terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_cli import main
from mapper import GPT2Config, init_params, load_tokenizer, save_checkpoint
from tasks.inference import decode_stream, template_prompt
from tasks.instruct import encode_examples, format_prompt, format_response, read_instructions
from tasks.reason import ReasoningSections, format_reason_text
from tasks.text import encode_plain

REPO = Path(__file__).resolve().parents[1]
NEWLINE, PARIS, EOS = 198, 6342, 50256  # GPT-2 ids of "\n", " Paris", <|endoftext|>


@pytest.fixture(scope="module")
def encoder():
    return load_tokenizer()


def test_alpaca_prompt_is_the_training_text_up_to_the_response(encoder):
    entries = read_instructions(REPO / "data" / "instruction-data.json")
    with_input = next(e for e in entries if e.get("input"))
    without = next(e for e in entries if not e.get("input"))
    for entry in (with_input, without):
        prompt = template_prompt("alpaca", entry["instruction"], entry.get("input"))
        training_text = format_prompt(entry) + format_response(entry)
        assert training_text == prompt + entry["output"]  # byte for byte
        (ids, _), = encode_examples([entry], encoder)
        prompt_ids = encode_plain(encoder, prompt, "chat prompt")
        assert ids[: len(prompt_ids)] == prompt_ids  # and token for token: the model sees what it was trained on


def test_reason_prompt_is_the_training_text_up_to_the_thinking(encoder):
    question, thinking, answer = "Mia has 4 apples and finds 7 more. How many now?", "4 + 7 = 11.", "11"
    prompt = template_prompt("reason", question)
    text = format_reason_text(question, thinking, answer)
    assert text.startswith(prompt) and text[len(prompt):].startswith(thinking)
    assert encoder.encode(text)[: len(encoder.encode(prompt))] == encoder.encode(prompt)
    with pytest.raises(ValueError, match="question only"):
        template_prompt("reason", question, "an input")


def test_decode_stream_stops_at_eos_without_reading_further(encoder):
    def steps():
        yield np.array([PARIS])
        yield np.array([EOS])
        raise AssertionError("read past the end-of-text token")

    assert list(decode_stream(steps(), encoder, EOS)) == [" Paris"]
    smile = encoder.encode("🙂")  # one character, four bytes, two tokens: it comes out whole, once
    assert len(smile) == 2 and list(decode_stream(iter(np.array([[t] for t in smile])), encoder, EOS)) == ["🙂"]


def test_reasoning_sections_split_thinking_from_answer_across_any_cut():
    text = "Mia has 4 + 7 = 11.\n</think>\n<answer>\n11\n</answer>"
    for width in (1, 2, 3, 5, len(text)):
        sections = ReasoningSections()
        parts = [p for i in range(0, len(text), width) for p in sections.feed(text[i : i + width])]
        parts += sections.close()
        joined = {name: "".join(t for s, t in parts if s == name) for name in ("thinking", "answer")}
        assert joined == {"thinking": "Mia has 4 + 7 = 11.\n", "answer": "\n11\n"}, width


def rigged_model(tmp_path: Path, task: str | None = None) -> Path:
    """A GPT-2-vocabulary model that answers every template with " Paris" and then <|endoftext|>.

    Its blocks add nothing (zero output projections) and no position is embedded, so the next token depends on
    the current one alone: after "\\n" (the last token of both templates) the logits favour " Paris", after it
    EOS (h = LayerNorm(wte[token]); wte rows chosen so those dot products win, every other row zero)."""
    config = GPT2Config(n_positions=128, n_embd=8, n_layer=1, n_head=2)
    params = init_params(config, 0)
    for name, value in params.items():
        if not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value[...] = 0.0
    wte = params["wte.weight"]
    wte[NEWLINE, :2] = [1, -1]
    wte[PARIS, :4] = [2, -2, 1, -1]
    wte[EOS, 2:4] = [10, -10]
    out = tmp_path / "model"
    save_checkpoint(params, config, out)
    if task is not None:
        (out / "checkpoint").mkdir()
        state = {"format": 1, "step": 1, "args": {"task": task}}
        (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    return out


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_one_answer_streams_until_eos(tmp_path, capsys, backend):
    model = rigged_model(tmp_path)
    argv = ["chat", str(model), "--template", "alpaca", "--prompt", "Name the capital of France.", "--backend",
            backend, "--max-new-tokens", "50"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "Paris\n"


def test_the_template_comes_from_the_run_and_reasoning_prints_apart(tmp_path, capsys):
    model = rigged_model(tmp_path, task="reason")
    assert main(["chat", str(model), "--prompt", "What is 2 + 2?"]) == 0
    assert capsys.readouterr().out == "thinking: Paris\n"  # the rigged model never closes its thinking
    plain = rigged_model(tmp_path / "plain")
    assert main(["chat", str(plain), "--prompt", "hi"]) == 2
    assert "pass --template alpaca or --template reason" in capsys.readouterr().err


def test_piped_lines_are_answered_one_by_one_until_eof(tmp_path, capsys, monkeypatch):
    model = rigged_model(tmp_path, task="instruct")
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\n\nsecond question\n"))
    assert main(["chat", str(model)]) == 0
    assert capsys.readouterr().out == "Paris\nParis\n"  # the blank line is skipped


def test_the_terminal_loop_leaves_on_eof(tmp_path):
    """At a real terminal (a pty): a prompt, an answer, and Ctrl-D ends the session with exit code 0."""
    model = rigged_model(tmp_path, task="instruct")
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2_cli", "chat", str(model), "--backend", "numpy"],
                            stdin=follower, stdout=follower, stderr=follower, env=env, cwd=REPO)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")

    try:
        read_until(b"> ")
        os.write(leader, b"Name the capital of France.\n")
        read_until(b"Paris")
        read_until(b"> ")
        os.write(leader, b"\x04")  # Ctrl-D: EOF at the start of a line
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
