"""The generated arithmetic word problems (tasks.arithmetic): every worked step's arithmetic checked independently,
the final answer equal to the last step's result and to the question's own numbers combined, seeded, unique, and
split with no question in both parts; the files read back through the GSM8K reader and scorer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2_cli import main
from tasks.arithmetic import KINDS, draw_problem, make_problems, make_splits, to_jsonl
from tasks.reason import read_gsm8k, score_gsm8k

STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def numbers_in(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@given(st.integers(0, 2**32 - 1), st.sampled_from(KINDS))
def test_every_problem_is_correct_by_construction(seed, kind):
    problem = draw_problem(np.random.default_rng(seed), kind)
    results = []
    for step in problem.steps:
        (a, op, b, c), = STEP.findall(step)  # one equation per step, written out in full
        assert OPS[op](int(a), int(b)) == int(c), step
        results.append(int(c))
    assert problem.answer == results[-1] >= 0
    q = numbers_in(problem.question)  # the question states the operands in the order they are used
    expected = {"add": lambda: q[0] + q[1], "subtract": lambda: q[0] - q[1], "multiply": lambda: q[0] * q[1],
                "chain": lambda: q[0] + q[1] - q[2]}[kind]()
    assert problem.answer == expected
    if len(problem.steps) == 2:  # the second step starts from the first one's result
        assert int(STEP.findall(problem.steps[1])[0][0]) == results[0]


def test_generation_is_seeded_unique_and_mixed():
    a, b, c = make_problems(400, seed=1), make_problems(400, seed=1), make_problems(400, seed=2)
    assert a == b and a != c
    assert len({p.question for p in a}) == 400
    assert {p.kind: sum(q.kind == p.kind for q in a) for p in a} == dict.fromkeys(KINDS, 100)


def test_splits_share_no_question():
    train, test = make_splits(3000, 400, seed=5)
    assert len(train) == 3000 and len(test) == 400
    assert not {p.question for p in train} & {p.question for p in test}


def test_files_read_back_through_the_gsm8k_reader_and_score_perfectly_with_their_own_answers(tmp_path):
    problems = make_problems(40, seed=3)
    path = tmp_path / "test.jsonl"
    path.write_text(to_jsonl(problems))
    examples = read_gsm8k(path)
    assert [e.answer for e in examples] == [str(p.answer) for p in problems]
    assert [e.thinking for e in examples] == ["\n".join(p.steps) for p in problems]
    perfect = [{"index": e.index, "response": f"{e.thinking}\n</think>\n<answer>\n{e.answer}\n</answer>"}
               for e in examples]
    assert score_gsm8k(perfect, examples)["accuracy"] == 1.0


def test_gpt2_data_arithmetic_writes_disjoint_files_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "arith"
    assert main(["data", "arithmetic", "--out", str(out), "--train", "50", "--test", "10", "--seed", "4"]) == 0
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 50 and len(test) == 10
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert all(r["answer"].rsplit("\n", 1)[1].startswith("#### ") for r in train + test)
    before = (out / "train.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["data", "arithmetic", "--out", str(out), "--seed", "9"]) == 2
    assert "already holds train.jsonl, test.jsonl, which this command would replace; pass --force" in (
        capsys.readouterr().err)
    assert (out / "train.jsonl").read_bytes() == before


def test_make_problems_refuses_nonsense():
    with pytest.raises(ValueError, match="must be >= 1"):
        make_problems(0, seed=0)
    with pytest.raises(ValueError, match="unknown problem kind 'divide'"):
        draw_problem(np.random.default_rng(0), "divide")
