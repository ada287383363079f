"""Arithmetic word problems in GSM8K's format, generated from a seed: a reasoning task a small model can learn.

GSM8K itself is out of reach for a model trained from a random initialisation on two cores (it scores ~0%), so the
reasoning pipeline (``gpt2 finetune reason`` -> ``gpt2 eval gsm8k``) is proven on problems with a learnable signal:
short sentences about people and things, each solved in one or two worked steps, the answer on a last line
``#### N`` exactly as GSM8K writes it. The kinds, drawn in equal shares:

* ``add``:      two numbers 1..9 added           "Mia has 4 apples. Leo gives her 7 more. ..."      4 + 7 = 11
* ``subtract``: a number 2..18 less a smaller one "Sam had 15 coins. He spent 6 of them. ..."      15 - 6 = 9
* ``chain``:    three numbers, a sum then a difference (the result never below zero)   3 + 8 = 11. 11 - 5 = 6.
* ``multiply``: groups of equal size, 2..9 by 2..9 "Ana packs 6 boxes with 7 pens in each. ..."    6 * 7 = 42

Every step is written ``a op b = c`` (GSM8K's calculator annotations left out), so a reader or a test can check
the arithmetic line by line. Questions are unique within a generated set, and :func:`make_splits` keeps the
training and test questions disjoint. The same seed always gives the same problems.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

KINDS = ("add", "subtract", "chain", "multiply")
NAMES = ("Mia", "Leo", "Ana", "Sam", "Ivy", "Ben", "Zoe", "Max", "Eva", "Tom", "Lily", "Omar", "Nina", "Raj", "Kai",
         "Ella", "Finn", "Maya", "Jack", "Rosa")
THINGS = ("apples", "coins", "pens", "stickers", "books", "marbles", "cards", "shells", "cookies", "stamps",
          "flowers", "toys", "rocks", "buttons", "beads", "candles")
CONTAINERS = ("boxes", "bags", "jars", "baskets", "trays", "bowls")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question, the worked steps (one ``a op b = c`` sentence each) and the answer."""

    kind: str
    question: str
    steps: tuple[str, ...]
    answer: int

    def gsm8k_record(self) -> dict[str, str]:
        """The problem as a GSM8K line: ``{"question", "answer"}``, the answer's last line ``#### N``."""
        return {"question": self.question, "answer": "\n".join(self.steps) + f"\n#### {self.answer}"}


def _pick(rng: np.random.Generator, options: tuple[str, ...], count: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=count, replace=False)]


def draw_problem(rng: np.random.Generator, kind: str) -> Problem:
    """One problem of ``kind`` (one of ``KINDS``), its numbers and words drawn from ``rng``."""
    a_name, b_name = _pick(rng, NAMES, 2)
    thing = _pick(rng, THINGS)[0]
    if kind == "add":
        a, b = (int(v) for v in rng.integers(1, 10, size=2))
        question = (f"{a_name} has {a} {thing}. {b_name} gives {a_name} {b} more {thing}. "
                    f"How many {thing} does {a_name} have now?")
        return Problem(kind, question, (f"{a_name} has {a} + {b} = {a + b} {thing}.",), a + b)
    if kind == "subtract":
        a = int(rng.integers(2, 19))
        b = int(rng.integers(1, a))
        question = f"{a_name} had {a} {thing}. {a_name} gave {b} of them to {b_name}. How many {thing} are left?"
        return Problem(kind, question, (f"{a_name} has {a} - {b} = {a - b} {thing} left.",), a - b)
    if kind == "chain":
        a, b = (int(v) for v in rng.integers(1, 10, size=2))
        c = int(rng.integers(1, min(a + b, 9) + 1))
        question = (f"{a_name} has {a} {thing} and finds {b} more. Then {a_name} gives {c} {thing} to {b_name}. "
                    f"How many {thing} does {a_name} have now?")
        steps = (f"{a_name} first has {a} + {b} = {a + b} {thing}.",
                 f"After giving some away, {a_name} has {a + b} - {c} = {a + b - c} {thing}.")
        return Problem(kind, question, steps, a + b - c)
    if kind == "multiply":
        a, b = (int(v) for v in rng.integers(2, 10, size=2))
        container = _pick(rng, CONTAINERS)[0]
        question = (f"{a_name} fills {a} {container} with {b} {thing} in each. "
                    f"How many {thing} does {a_name} use in all?")
        return Problem(kind, question, (f"{a_name} uses {a} * {b} = {a * b} {thing}.",), a * b)
    raise ValueError(f"unknown problem kind {kind!r}; choose one of {KINDS}")


def make_problems(n: int, seed: int) -> list[Problem]:
    """``n`` problems with distinct questions, the kinds in turn, reproducible from ``seed``."""
    if n < 1:
        raise ValueError(f"the number of problems must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems (only {len(problems)} exist in reach)")
        problem = draw_problem(rng, KINDS[len(problems) % len(KINDS)])
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def make_splits(n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, test): ``n_train + n_test`` distinct problems from ``seed``, cut so no question is in both."""
    problems = make_problems(n_train + n_test, seed)
    return problems[:n_train], problems[n_train:]


def to_jsonl(problems: list[Problem]) -> str:
    """GSM8K JSON lines of the problems (what ``tasks.reason.read_gsm8k`` reads)."""
    return "".join(json.dumps(p.gsm8k_record()) + "\n" for p in problems)
