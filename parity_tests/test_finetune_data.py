"""The fine-tunes' data and metric code (tasks.classify, tasks.instruct, tasks.reason, tasks.metrics) on hand-made
cases whose answers are written out, hostile inputs included, and a smoke test on the data files in data/."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from mapper.tokens import IGNORE_INDEX
from parity_tests.conftest import DATA, REPO
from tasks import classify, instruct, metrics, reason

E, I = 50256, IGNORE_INDEX
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.")


class CharEncoder:
    """One token per character (id = code point), refusing ``<|endoftext|>`` like tiktoken does."""

    def encode(self, text, allowed_special=frozenset()):
        if "<|endoftext|>" in text and "<|endoftext|>" not in allowed_special:
            raise ValueError("Encountered text corresponding to disallowed special token '<|endoftext|>'.")
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class ChunkEncoder:
    """One token per run of non-space characters with the whitespace after it (or per leading whitespace run),
    so the tokens of ``a + b`` need not start with those of ``a``: "x " + "\\n..." merges into "x \\n"."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, allowed_special=frozenset()):
        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r"\S+\s*|\s+", text)]

    def decode(self, ids):
        inverse = {i: s for s, i in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_ignore_index_comes_from_mapper():
    assert instruct.IGNORE_INDEX is IGNORE_INDEX == -100
    for module in ("classify", "instruct", "reason", "metrics"):
        assert not re.search(r"^IGNORE_INDEX\s*=", (REPO / "tasks" / f"{module}.py").read_text(), re.M)


# ---------------------------------------------------------------------------------------------- classify


def test_read_labelled_tsv_keeps_text_after_first_tab_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, "sms.tsv", "ham\tGo until jurong point\r\n\nspam\tWIN £1000 now\tor never ☃\nham\t  x\n")
    texts, labels = classify.read_labelled(path)
    assert texts == ["Go until jurong point", "WIN £1000 now\tor never ☃", "  x"]
    assert labels == ["ham", "spam", "ham"]


@pytest.mark.parametrize("content, message", [
    ("ham\tok\nspam no tab here\n", "line 2: no tab"),
    ("ham\tok\n\t text without label\n", "line 2: empty label"),
    ("ham\tok\nspam\t   \n", "line 2: empty text"),
    ("\n  \n", "is empty"),
])
def test_read_labelled_tsv_refuses_bad_lines(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        classify.read_labelled(write(tmp_path, "bad.tsv", content))


def test_read_labelled_refuses_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        classify.read_labelled(tmp_path / "nope.tsv")
    (tmp_path / "latin1.tsv").write_bytes("ham\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        classify.read_labelled(tmp_path / "latin1.tsv")


def test_read_labelled_csv(tmp_path):
    path = write(tmp_path, "d.csv", 'id,label,text\n1,spam,"Call now, free"\n2,ham,"two\nlines"\n3,ham,é\n')
    assert classify.read_labelled(path) == (["Call now, free", "two\nlines", "é"], ["spam", "ham", "ham"])


@pytest.mark.parametrize("content, message", [
    ("label,message\nham,hi\n", r"lacks the column\(s\) \['text'\]"),
    ("Text,Label\nhi,ham\n", "lacks the column"),
    ("text,label\nhi,ham\nbye\n", "line 3: the row has fewer fields"),
    ("text,label\nhi,\n", "line 2: empty label"),
    ("text,label\n", "holds no labelled texts"),
])
def test_read_labelled_csv_refuses_wrong_columns_and_rows(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        classify.read_labelled(write(tmp_path, "d.csv", content))


def test_class_names_and_label_ids():
    assert classify.class_names(["spam", "ham", "spam"]) == ["ham", "spam"]
    assert classify.label_ids(["spam", "ham", "spam"], ["ham", "spam"]).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"\['eggs'\] are not among"):
        classify.label_ids(["eggs"], ["ham", "spam"])
    with pytest.raises(ValueError, match="no labels"):
        classify.class_names([])


def test_balance_undersamples_to_the_smallest_class_in_original_order():
    texts = [f"t{i}" for i in range(12)]
    ids = np.array([0, 0, 1, 0, 0, 2, 0, 1, 0, 2, 0, 0])  # 8 of class 0, 2 of class 1, 2 of class 2
    kept, kept_ids = classify.balance(texts, ids, seed=3)
    assert len(kept) == 6 and np.bincount(kept_ids).tolist() == [2, 2, 2]
    positions = [texts.index(t) for t in kept]
    assert positions == sorted(positions)  # original relative order
    assert all(ids[p] == c for p, c in zip(positions, kept_ids, strict=True))
    assert {2, 7, 5, 9} <= set(positions)  # the small classes are kept whole
    again = classify.balance(texts, ids, seed=3)
    assert again[0] == kept and again[1].tolist() == kept_ids.tolist()
    choices = {tuple(classify.balance(texts, ids, seed=s)[0]) for s in range(10)}
    assert len(choices) > 1  # the seed matters
    with pytest.raises(ValueError, match="12 texts"):
        classify.balance(texts, ids[:5], seed=0)


def test_one_class_is_refused(tmp_path):
    path = write(tmp_path, "one.tsv", "ham\thello\nham\tthere\nham\tfriend\n")
    with pytest.raises(ValueError, match=r"one.tsv: every text has the label 'ham'; a classifier needs at least two"):
        classify.prepare_classification(path, CharEncoder(), seed=0)


def test_labels_differing_only_in_case_or_spacing_and_tiny_classes_are_warned_about(tmp_path):
    lines = [f"{label}\t{text}" for label, text in
             [("spam", "win"), ("Spam", "cash"), ("ham", "hi"), ("HAM ", "yo"), ("ham", "ok"), ("spam", "now")] * 3]
    data = classify.prepare_classification(write(tmp_path, "d.tsv", "\n".join(lines)), CharEncoder(), seed=0)
    assert data.class_names == ["HAM", "Spam", "ham", "spam"]  # kept apart, as the data says
    assert data.read_counts == {"HAM": 3, "Spam": 3, "ham": 6, "spam": 6}
    assert data.warnings == [
        "the labels 'HAM', 'ham' differ only in case or spacing and are 2 different classes (3, 6 texts); correct the "
        "data if they mean one class",
        "the labels 'Spam', 'spam' differ only in case or spacing and are 2 different classes (3, 6 texts); correct "
        "the data if they mean one class",
        "2 class(es) ('HAM', 'Spam') have only 3 text(s): balancing keeps 3 of each of the 4 classes",
    ]
    assert data.summary().startswith("4 classes, 18 texts (HAM 3, Spam 3, ham 6, spam 6) -> 12 kept (3 per class)")


def test_a_special_token_in_a_text_names_its_line_in_the_file(tmp_path, gpt2_encoder):
    lines = [f"{'spam' if i % 2 else 'ham'}\ttext number {i}" for i in range(40)]
    lines[26] = "ham\tsee you <|endoftext|> later"
    path = write(tmp_path, "d.tsv", "\n".join(lines))
    with pytest.raises(ValueError, match=r"d.tsv line 27 'see you <\|endoftext\|> later': the text cannot be encoded"):
        classify.prepare_classification(path, gpt2_encoder, seed=0)  # 20 of each class: balancing keeps all


@pytest.mark.parametrize("n, sizes", [(10, (7, 1, 2)), (1494, (1045, 149, 300)), (1, (0, 0, 1)), (3, (2, 0, 1))])
def test_split_sizes_cover_everything_once(n, sizes):
    parts = classify.split(n, seed=5)
    assert tuple(map(len, parts)) == sizes
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert all(a.tolist() == b.tolist() for a, b in zip(parts, classify.split(n, seed=5), strict=True))


def test_split_is_seeded_and_checks_fractions():
    assert classify.split(50, seed=0)[0].tolist() != classify.split(50, seed=1)[0].tolist()
    assert tuple(map(len, classify.split(10, (0.5, 0.5, 0.0), seed=0))) == (5, 5, 0)
    for bad in [(0.7, 0.1), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError, match="fractions"):
            classify.split(10, bad, seed=0)
    with pytest.raises(ValueError, match="nothing to split"):
        classify.split(0)


def test_encode_batch_pads_right_and_counts_truncation():
    enc = CharEncoder()
    tokens, lengths, cut = classify.encode_batch(["ab", "abcd", "é"], enc)
    assert tokens.dtype == np.int64 and lengths.dtype == np.int64
    assert tokens.tolist() == [[97, 98, E, E], [97, 98, 99, 100], [233, E, E, E]]
    assert lengths.tolist() == [2, 4, 1] and cut == 0
    tokens, lengths, cut = classify.encode_batch(["ab", "abcd", "é"], enc, max_length=3, pad_id=0)
    assert tokens.tolist() == [[97, 98, 0], [97, 98, 99], [233, 0, 0]]
    assert lengths.tolist() == [2, 3, 1] and cut == 1
    tokens, lengths, cut = classify.encode_batch(["ab"], enc, max_length=5)
    assert tokens.tolist() == [[97, 98, E, E, E]] and cut == 0


def test_encode_batch_refuses_empty_text_special_text_and_bad_length():
    enc = CharEncoder()
    with pytest.raises(ValueError, match="text 1 '' is empty"):
        classify.encode_batch(["ok", ""], enc)
    with pytest.raises(ValueError, match="text 0 .*cannot be encoded"):
        classify.encode_batch(["win <|endoftext|>"], enc)
    with pytest.raises(ValueError, match="max_length"):
        classify.encode_batch(["ok"], enc, max_length=0)
    with pytest.raises(ValueError, match="no texts"):
        classify.encode_batch([], enc)


def test_last_token_index_points_at_the_last_real_token_not_padding():
    tokens, lengths, _ = classify.encode_batch(["hi!", "a", "four"], CharEncoder())
    index = classify.last_token_index(lengths)
    assert index.tolist() == [2, 0, 3]
    assert tokens[np.arange(3), index].tolist() == [ord("!"), ord("a"), ord("r")]
    assert tokens[:2, -1].tolist() == [E, E]  # what the course's position -1 would read
    with pytest.raises(ValueError, match="at least one real token"):
        classify.last_token_index(np.array([3, 0]))


def test_prepare_classification_balances_splits_and_pads_to_the_training_length(tmp_path):
    lines = [f"ham\t{'h' * (1 + i % 9)}" for i in range(20)] + [f"spam\t{'s' * (2 + i)}" for i in range(10)]
    path = write(tmp_path, "d.tsv", "\n".join(lines) + "\n")
    data = classify.prepare_classification(path, CharEncoder(), seed=1)
    assert data.class_names == ["ham", "spam"] and data.read_counts == {"ham": 20, "spam": 10}
    assert tuple(map(len, (data.train, data.val, data.test))) == (14, 2, 4)
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    assert np.bincount(labels).tolist() == [10, 10]
    width = int(data.train.lengths.max())
    assert data.length == width
    for part in (data.train, data.val, data.test):
        assert part.tokens.shape == (len(part), width) and part.tokens.dtype == np.int64
        for row, n, label in zip(part.tokens, part.lengths, part.labels, strict=True):
            letter = "hs"[label]
            assert row[:n].tolist() == [ord(letter)] * n and (row[n:] == E).all()
    assert data.n_truncated["train"] == 0
    again = classify.prepare_classification(path, CharEncoder(), seed=1)
    assert np.array_equal(again.test.tokens, data.test.tokens)
    summary = data.summary()
    assert "2 classes, 30 texts (ham 20, spam 10) -> 20 kept (10 per class) -> train 14 / val 2 / test 4" in summary


def test_prepare_classification_max_length_truncates_every_split_and_counts(tmp_path):
    lines = [f"ham\t{'h' * (1 + i)}" for i in range(6)] + [f"spam\t{'s' * (1 + i)}" for i in range(6)]
    path = write(tmp_path, "d.tsv", "\n".join(lines))
    data = classify.prepare_classification(path, CharEncoder(), seed=0, max_length=3, balance=False)
    assert data.length == 3
    original = np.array([1 + i % 6 for i in range(12)])  # token counts in file order (no balancing)
    for name, index in zip(("train", "val", "test"), classify.split(12, seed=0), strict=True):
        part = getattr(data, name)
        assert data.n_truncated[name] == int((original[index] > 3).sum())
        assert part.lengths.tolist() == np.minimum(original[index], 3).tolist()
    assert sum(data.n_truncated.values()) == 6  # lengths 4, 5, 6 in each class


def test_prepare_classification_truncates_val_and_test_to_the_training_length(tmp_path, monkeypatch):
    lines = [f"{'spam' if i == 0 else 'ham'}\t{'h' * n}" for i, n in enumerate((1, 1, 1, 1, 1, 1, 1, 5, 9, 9))]
    path = write(tmp_path, "d.tsv", "\n".join(lines))
    monkeypatch.setattr(classify, "split", lambda n, fractions=(0.7, 0.1, 0.2), seed=0: (
        np.arange(7), np.array([7]), np.array([8, 9])))
    data = classify.prepare_classification(path, CharEncoder(), seed=0, balance=False)
    assert data.length == 1
    assert data.n_truncated == {"train": 0, "val": 1, "test": 2}
    assert data.test.tokens.tolist() == [[ord("h")], [ord("h")]]


# ---------------------------------------------------------------------------------------------- metrics


def test_accuracy_and_confusion_matrix():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert metrics.accuracy(np.array([1]), np.array([1])) == 1.0
    matrix = metrics.confusion_matrix([0, 1, 1, 0, 2], [0, 1, 0, 0, 1], n_classes=3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]  # rows true, columns predicted
    with pytest.raises(ValueError, match="no predictions"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
        metrics.confusion_matrix([0, 1], [0, 2], n_classes=2)
    with pytest.raises(ValueError, match="predictions must be class ids"):
        metrics.confusion_matrix([0.5, 1.0], [0, 1], n_classes=2)


def test_rouge_l_known_pairs():
    assert metrics.rouge_l(["The cat sat."], ["the cat sat"]) == 1.0
    assert metrics.rouge_l(["red green blue"], ["one two"]) == 0.0
    # LCS of "the cat ate the mat" (5 words) and "the cat sat on the mat" (6) is "the cat the mat": 2*4/(5+6)
    assert metrics.rouge_l(["the cat ate the mat"], ["the cat sat on the mat"]) == pytest.approx(8 / 11)
    assert metrics.rouge_l(["a b", "the cat ate the mat"], ["a b", "the cat sat on the mat"]) == pytest.approx(
        (1 + 8 / 11) / 2)
    assert metrics.rouge_l([""], ["something"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metrics.rouge_l([], [])
    with pytest.raises(ValueError, match="must be strings"):
        metrics.rouge_l([None], ["a"])


# ---------------------------------------------------------------------------------------------- instruct


def test_alpaca_template_literal():
    entry = {"instruction": "Rewrite in passive voice.", "input": "The cat ate ☃.", "output": "☃ was eaten."}
    assert instruct.format_prompt(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite in passive voice.\n\n### Input:\nThe cat ate ☃.")
    assert instruct.format_response(entry) == "\n\n### Response:\n☃ was eaten."
    for no_input in ({"input": ""}, {"input": None}, {}):
        e = {"instruction": "Name a color.", "output": "Blue.", **no_input}
        assert instruct.format_prompt(e) == ALPACA + "\n\n### Instruction:\nName a color."


@pytest.mark.parametrize("entry, message", [
    ({"input": "", "output": "x"}, "has no 'instruction' key"),
    ({"instruction": "x", "input": ""}, "has no 'output' key"),
    ({"instruction": "  ", "output": "x"}, "'instruction' is empty"),
    ({"instruction": "x", "output": ""}, "'output' is empty"),
    ({"instruction": "x", "output": 3}, "'output' must be a string"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string"),
    ("just text", "must be a JSON object"),
])
def test_instruction_records_are_checked_naming_the_index(entry, message):
    good = {"instruction": "a", "input": "", "output": "b"}
    with pytest.raises(ValueError, match=f"instruction record 1.*{message}"):
        instruct.encode_examples([good, entry], CharEncoder())


def test_read_instructions(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]
    assert instruct.read_instructions(write(tmp_path, "ok.json", json.dumps(records))) == records
    with pytest.raises(ValueError, match="record 1 has no 'output'"):
        instruct.read_instructions(write(tmp_path, "bad.json", json.dumps([records[0], {"instruction": "x"}])))
    with pytest.raises(ValueError, match="not valid JSON"):
        instruct.read_instructions(write(tmp_path, "broken.json", "[{"))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        instruct.read_instructions(write(tmp_path, "obj.json", "{}"))
    with pytest.raises(ValueError, match="empty list"):
        instruct.read_instructions(write(tmp_path, "empty.json", "[]"))


@pytest.mark.parametrize("n, sizes", [(1100, (935, 55, 110)), (20, (17, 1, 2)), (1, (0, 1, 0))])
def test_split_instructions_sizes_and_seed(n, sizes):
    train, val, test = instruct.split_instructions(n, seed=2)
    assert (len(train), len(val), len(test)) == sizes
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(n))
    assert instruct.split_instructions(n, seed=2)[2].tolist() == test.tolist()
    if n > 10:
        assert instruct.split_instructions(n, seed=3)[0].tolist() != train.tolist()


def test_encode_examples_prompt_length():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    [(ids, prompt_length)] = instruct.encode_examples([entry], CharEncoder())
    prompt = ALPACA + "\n\n### Instruction:\nSay hi."
    assert ids == [ord(c) for c in prompt + "\n\n### Response:\nHi!"]
    assert prompt_length == len(prompt)
    with pytest.raises(ValueError, match="instruction record 0: the text cannot be encoded"):
        instruct.encode_examples([{"instruction": "<|endoftext|>", "output": "x"}], CharEncoder())


def test_encode_examples_keeps_the_prompt_tokens_when_the_joint_encoding_merges_across_the_boundary():
    enc = ChunkEncoder()
    entry = {"instruction": "Do it.", "input": "x ", "output": "done"}
    prompt, response = instruct.format_prompt(entry), instruct.format_response(entry)
    joint = enc.encode(prompt + response)
    assert joint[: len(enc.encode(prompt))] != enc.encode(prompt)  # the hostile case really happens
    [(ids, prompt_length)] = instruct.encode_examples([entry], enc)
    assert ids == enc.encode(prompt) + enc.encode(response) and prompt_length == len(enc.encode(prompt))
    assert enc.decode(ids) == prompt + response


def test_collate_worked_example_by_hand():
    batch = [([1, 2, 3, 4], 2), ([5, 6], 1)]
    inputs, targets = instruct.collate(batch)
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, E, E]]
    assert targets.tolist() == [[2, 3, 4, E], [6, E, I, I]]
    inputs, targets = instruct.collate(batch, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, E, E]]
    assert targets.tolist() == [[I, 3, 4, E], [6, E, I, I]]


def test_collate_mask_prompt_two_rows_and_max_length():
    batch = [([10, 11, 12, 13, 14], 3), ([20, 21, 22], 2)]
    inputs, targets = instruct.collate(batch, pad_id=0, mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]
    assert targets.tolist() == [[I, I, 13, 14, 0], [I, 22, 0, I, I]]
    inputs, targets = instruct.collate(batch, pad_id=0, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[10, 11, 12], [20, 21, 22]]
    assert targets.tolist() == [[I, I, 13], [I, 22, 0]]
    # a prompt as long as the example masks every target but the end-of-text; length 0 masks nothing
    assert instruct.collate([([7, 8], 2)], mask_prompt=True)[1].tolist() == [[I, E]]
    assert instruct.collate([([7, 8], 0)], mask_prompt=True)[1].tolist() == [[8, E]]


def test_collate_refuses_bad_batches():
    with pytest.raises(ValueError, match="no examples"):
        instruct.collate([])
    with pytest.raises(ValueError, match="example 1 has no tokens"):
        instruct.collate([([1], 0), ([], 0)])
    with pytest.raises(ValueError, match=r"prompt_length 3 is outside \[0, 2\]"):
        instruct.collate([([1, 2], 3)])
    with pytest.raises(ValueError, match="max_length"):
        instruct.collate([([1, 2], 1)], max_length=0)


# ---------------------------------------------------------------------------------------------- reason


def test_reasoning_template_literal():
    assert reason.format_reason_prompt("What is 2+2?") == "What is 2+2?\n<think>\n"
    assert reason.format_reason_text("What is 2+2?", "2 and 2 make 4.", "4") == (
        "What is 2+2?\n<think>\n2 and 2 make 4.\n</think>\n<answer>\n4\n</answer>")
    assert reason.format_reason_text("Q", "", "A") == "Q\n<think>\n\n</think>\n<answer>\nA\n</answer>"


def gsm8k_line(question, answer):
    return json.dumps({"question": question, "answer": answer}) + "\n"


def test_read_gsm8k_strips_calculator_annotations(tmp_path):
    path = write(tmp_path, "g.jsonl",
                 gsm8k_line("Ducks lay 16 eggs…", "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes "
                            "9 * 2 = $<<9*2=18>>18.\n#### 18")
                 + "\n" + gsm8k_line(" Négatif? ", "It drops <<5-8=-3>>-3.\n####  -3 \n"))
    records = reason.read_gsm8k(path)
    assert records == [
        reason.Example("Ducks lay 16 eggs…", "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.", "18", 0),
        reason.Example("Négatif?", "It drops -3.", "-3", 2),  # index = 0-based line; line 2 is blank
    ]
    assert records.skipped_lines == []
    assert reason.strip_calculator("a <<1+1=2>>2 and <<x>>") == "a 2 and "


def test_read_gsm8k_refuses_or_skips_records_without_a_final_answer(tmp_path):
    path = write(tmp_path, "g.jsonl", gsm8k_line("q1", "r\n#### 1") + gsm8k_line("q2", "no final line")
                 + gsm8k_line("q3", "r\n####   ") + gsm8k_line("q4", "#### four"))
    with pytest.raises(ValueError, match="line 2: the answer has no final line '#### <answer>'"):
        reason.read_gsm8k(path)
    records = reason.read_gsm8k(path, strict=False)
    assert [(r.question, r.thinking, r.answer, r.index) for r in records] == [("q1", "r", "1", 0),
                                                                               ("q4", "", "four", 3)]
    assert records.skipped_lines == [2, 3]


@pytest.mark.parametrize("content, message", [
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q"\n', "line 2 is not valid JSON"),
    ('{"question": "q"}\n', "line 1 has no 'answer' key"),
    ('{"question": "", "answer": "#### 1"}\n', "line 1: empty question"),
    ('{"question": 3, "answer": "#### 1"}\n', "line 1: 'question' must be a string"),
    ('[1, 2]\n', "line 1 must be a JSON object"),
    ("\n\n", "is empty"),
])
def test_read_gsm8k_refuses_bad_records_even_when_not_strict(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        reason.read_gsm8k(write(tmp_path, "g.jsonl", content), strict=False)


def am_line(content, think=None, answer=None, user="What is 6 x 7?", extra_messages=()):
    messages = [*extra_messages, {"role": "user", "content": user, "info": {"think_content": None}},
                {"role": "assistant", "content": content, "info": {"think_content": think, "answer_content": answer}}]
    return json.dumps({"messages": messages}) + "\n"


def test_read_am_uses_info_or_parses_the_content(tmp_path):
    lines = [
        am_line("<think>ignored</think>\n<answer>ignored</answer>", think="Six sevens.", answer="42"),
        am_line("<think>\nSix sevens are 42 ✓\n</think>\n<answer>\n42\n</answer>"),  # info null: parsed
        am_line("<think>six sevens</think>\n<answer>42", think=""),  # no closing answer tag: to the end
        am_line("<think>hm</think>\nThe answer is 42."),  # no answer tags: after </think>
        am_line("42", extra_messages=[{"role": "system", "content": "be brief"}]),  # no tags at all
    ]
    records = reason.read_am(write(tmp_path, "am.jsonl", "".join(lines)))
    assert [tuple(r) for r in records] == [
        ("What is 6 x 7?", "Six sevens.", "42", 0),
        ("What is 6 x 7?", "Six sevens are 42 ✓", "42", 1),
        ("What is 6 x 7?", "six sevens", "42", 2),
        ("What is 6 x 7?", "hm", "The answer is 42.", 3),
        ("What is 6 x 7?", "", "42", 4),
    ]


@pytest.mark.parametrize("line, message", [
    (am_line("<think>only thinking</think>"), "line 1: the assistant message holds no answer"),
    (am_line("<think>unclosed"), "holds no answer"),
    (am_line("<answer>1</answer>", user="  "), "empty question"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n", "needs a 'user' message"),
    (json.dumps({"conversation": []}) + "\n", "a 'messages' list"),
    (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}) + "\n",
     "message 0: 'content' must be a string"),
])
def test_read_am_refuses_bad_records(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        reason.read_am(write(tmp_path, "am.jsonl", line))


def test_fit_to_context_keeps_fitting_examples_whole():
    enc = CharEncoder()
    text = reason.format_reason_text("Q?", "abcdef", "42")
    (fitted, shortened, dropped) = reason.fit_to_context([("Q?", "abcdef", "42")], enc, context=len(text))
    assert fitted == [([ord(c) for c in text], len("Q?\n<think>\n"))] and (shortened, dropped) == (0, 0)


def test_fit_to_context_shortens_the_end_of_the_thinking_and_drops_hopeless_examples():
    enc = CharEncoder()
    prompt, tail = "Q?\n<think>\n", "\n</think>\n<answer>\n42\n</answer>"
    full = len(prompt) + 6 + len(tail)
    examples = [reason.Example("Q?", "abcdef", "42"), ("Q?", "", "42"), ("Q?", "ab", "42")]
    fitted, shortened, dropped = reason.fit_to_context(examples, enc, context=full - 2)
    # 6 - 2 tokens too many: keep 3 thinking tokens + the one-token marker
    assert fitted[0] == ([ord(c) for c in prompt + "abc…" + tail], len(prompt))
    assert enc.decode(fitted[0][0]).endswith("\n<answer>\n42\n</answer>")
    assert [enc.decode(ids) for ids, _ in fitted[1:]] == [prompt + tail, prompt + "ab" + tail]
    assert (shortened, dropped) == (1, 0)
    assert all(len(ids) <= full - 2 for ids, _ in fitted)
    # room for the marker but no thinking token: dropped (min_thinking_tokens=1); allowed with 0
    hopeless = len(prompt) + len(tail) + 1
    assert reason.fit_to_context(examples[:1], enc, context=hopeless) == ([], 0, 1)
    assert reason.fit_to_context(examples[:1], enc, context=hopeless, min_thinking_tokens=0) == (
        [([ord(c) for c in prompt + "…" + tail], len(prompt))], 1, 0)
    # even question + answer do not fit: dropped, whatever the settings
    assert reason.fit_to_context(examples, enc, context=len(prompt) + len(tail) - 1,
                                 min_thinking_tokens=0, marker="") == ([], 0, 3)
    # no marker: the cut thinking simply ends; min_thinking_tokens asks for more thinking
    assert reason.fit_to_context(examples[:1], enc, context=full - 2, marker="")[0][0][0] == [
        ord(c) for c in prompt + "abcd" + tail]
    assert reason.fit_to_context(examples[:1], enc, context=full - 2, min_thinking_tokens=4) == ([], 0, 1)


def test_fit_to_context_refuses_special_text_and_bad_context():
    with pytest.raises(ValueError, match="reasoning example 1: the text cannot be encoded"):
        reason.fit_to_context([("q", "t", "a"), ("q", "<|endoftext|>", "a")], CharEncoder(), 100)
    with pytest.raises(ValueError, match="context"):
        reason.fit_to_context([("q", "t", "a")], CharEncoder(), 0)


def test_fitted_examples_collate_with_the_end_of_text_as_last_target():
    enc = CharEncoder()
    context = len("Q\n<think>\n") + 3 + len("\n</think>\n<answer>\n7\n</answer>")
    fitted, _, _ = reason.fit_to_context([("Q", "abcdef", "7")], enc, context)
    inputs, targets = instruct.collate(fitted, max_length=context)
    assert inputs.shape == (1, context) and targets[0, -1] == E
    assert enc.decode(inputs[0].tolist()).endswith("ab…\n</think>\n<answer>\n7\n</answer>")


@pytest.mark.parametrize("response, answer", [
    ("<think>x</think>\n<answer>\n 18 \n</answer>", "18"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<answer>3</answer> ... <answer>4 dollars", "4 dollars"),
    ("<answer></answer>", ""),
    ("The answer is 5.", None),
    ("", None),
])
def test_extract_answer(response, answer):
    assert reason.extract_answer(response) == answer


@pytest.mark.parametrize("text, value", [
    ("The answer is $1,234.00.", Fraction(1234)),
    ("$30.00", Fraction(30)),
    ("25%", Fraction(25)),
    ("-5", Fraction(-5)),
    ("x = -0.25", Fraction(-1, 4)),
    ("\u22127 degrees", Fraction(-7)),
    ("-$5", Fraction(-5)),
    ("16-3-4=9", Fraction(9)),
    ("16-3", Fraction(3)),
    ("3.50", Fraction(7, 2)),
    (".5", Fraction(1, 2)),
    ("first 10, then 20 apples", Fraction(20)),
    ("1,2,3", Fraction(3)),
    ("1,234,567", Fraction(1234567)),
    ("eighteen", None),
    ("", None),
    (None, None),
    ("$ .", None),
])
def test_parse_number(text, value):
    result = reason.parse_number(text)
    assert result == value and (value is None or isinstance(result, Fraction))


def test_answers_match():
    assert reason.answers_match("$18.00", "18")
    assert reason.answers_match("18 dollars", "18")
    assert not reason.answers_match("17", "18")
    assert not reason.answers_match("eighteen", "18")
    assert not reason.answers_match(None, "18")
    assert reason.answers_match("  Blue  Whale", "blue whale")  # a reference without a number: as text
    assert not reason.answers_match("", "blue whale")


def test_score_gsm8k():
    data = [reason.Example("q0", "t", "18", 0), reason.Example("q1", "t", "1,000", 1),
            reason.Example("q2", "t", "-3", 2)]
    predictions = [
        {"index": 2, "response": "<think>..</think><answer>The answer is -3.</answer>", "extra": 1},
        {"index": 0, "response": "<answer>$18.00</answer>"},
        {"index": 1, "response": "I think 1000"},  # no answer tag: wrong
    ]
    score = reason.score_gsm8k(iter(predictions), data)
    assert {k: score[k] for k in ("accuracy", "correct", "n", "n_no_answer")} == {
        "accuracy": 2 / 3, "correct": 2, "n": 3, "n_no_answer": 1}
    assert [(r["index"], r["correct"], r["predicted"], r["reference"]) for r in score["results"]] == [
        (2, True, "The answer is -3.", "-3"), (0, True, "$18.00", "18"), (1, False, None, "1,000")]
    # plain tuples are indexed by position
    assert reason.score_gsm8k([{"index": 1, "response": "<answer>5"}], [("q", "t", "4"), ("q", "t", "5")])[
        "accuracy"] == 1.0
    # the parse rate counts answers with a number at all, right or wrong
    wordy = [{"index": 0, "response": "<answer>eighteen</answer>"}, {"index": 1, "response": "<answer>7</answer>"},
             {"index": 2, "response": "no tags"}]
    assert reason.score_gsm8k(wordy, data)["parse_rate"] == 1 / 3


def test_score_gsm8k_refuses_bad_predictions():
    data = reason.Examples([reason.Example("q0", "t", "1", 0), reason.Example("q2", "t", "2", 2)], [2])
    with pytest.raises(ValueError, match="prediction 0: index 1 names no record"):  # a skipped line
        reason.score_gsm8k([{"index": 1, "response": "x"}], data)
    with pytest.raises(ValueError, match="index 7 names no record"):
        reason.score_gsm8k([{"index": 0, "response": "x"}, {"index": 7, "response": "x"}], data)
    with pytest.raises(ValueError, match="prediction 1: index 2 is predicted twice"):
        reason.score_gsm8k([{"index": 2, "response": "x"}, {"index": 2, "response": "y"}], data)
    with pytest.raises(ValueError, match="'index' must be an integer"):
        reason.score_gsm8k([{"index": "0", "response": "x"}], data)
    with pytest.raises(ValueError, match="'index' must be an integer"):
        reason.score_gsm8k([{"index": True, "response": "x"}], data)
    with pytest.raises(ValueError, match="has no 'response' key"):
        reason.score_gsm8k([{"index": 0}], data)
    with pytest.raises(ValueError, match="no predictions"):
        reason.score_gsm8k([], data)


def test_read_predictions(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"index": 0, "response": "<answer>1</answer>", "model": "m"}\n\n'
                 '{"index": 1, "response": ""}\n')
    assert reason.read_predictions(path) == [{"index": 0, "response": "<answer>1</answer>", "model": "m"},
                                             {"index": 1, "response": ""}]
    for content, message in [('{"index": 0, "response": "x"}\nnot json\n', "line 2 is not valid JSON"),
                             ('{"index": 0}\n', "line 1 has no 'response' key"),
                             ('{"index": "0", "response": "x"}\n', "line 1: 'index' must be an integer"),
                             ('"text"\n', "line 1 must be a JSON object")]:
        with pytest.raises(ValueError, match=message):
            reason.read_predictions(write(tmp_path, "bad.jsonl", content))


# ---------------------------------------------------------------------------------------------- data/ files


@pytest.fixture(scope="module")
def gpt2_encoder():
    from mapper import load_tokenizer

    return load_tokenizer()


def test_sms_spam_collection_loads_and_balances(gpt2_encoder):
    path = DATA / "sms_spam_collection" / "SMSSpamCollection.tsv"
    texts, labels = classify.read_labelled(path)
    # 5,574 lines (the course's pandas read_csv merges some quoted lines into 5,572): 4,827 ham, 747 spam
    assert len(texts) == 5574 and labels.count("ham") == 4827 and labels.count("spam") == 747
    data = classify.prepare_classification(path, gpt2_encoder, seed=123)
    assert data.class_names == ["ham", "spam"]
    assert (len(data.train), len(data.val), len(data.test)) == (1045, 149, 300)
    labels_kept = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    assert np.bincount(labels_kept).tolist() == [747, 747]
    assert data.n_truncated["train"] == 0 and data.length == int(data.train.lengths.max())
    row = int(np.argmin(data.train.lengths))
    n = int(data.train.lengths[row])
    assert gpt2_encoder.decode(data.train.tokens[row, :n].tolist()) in texts


def test_instruction_data_loads(gpt2_encoder):
    entries = instruct.read_instructions(DATA / "instruction-data.json")
    assert len(entries) == 1100 and sum(1 for e in entries if e["input"]) == 325
    train, val, test = instruct.split_instructions(len(entries), seed=0)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    examples = instruct.encode_examples(entries, gpt2_encoder)
    for entry, (ids, prompt_length) in zip(entries, examples, strict=True):
        assert ids == gpt2_encoder.encode(instruct.format_prompt(entry) + instruct.format_response(entry))
        assert gpt2_encoder.decode(ids[:prompt_length]) == instruct.format_prompt(entry)


def test_gsm8k_and_am_sample_load(gpt2_encoder):
    test = reason.read_gsm8k(DATA / "gsm8k" / "test.jsonl")
    train = reason.read_gsm8k(DATA / "gsm8k" / "train.jsonl")
    assert (len(test), len(train)) == (1319, 7473) and test.skipped_lines == train.skipped_lines == []
    assert test[0].answer == "18" and test[0].index == 0 and test[-1].index == 1318
    assert test[0].thinking == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                                "She makes 9 * 2 = $18 every day at the farmer\u2019s market.")
    assert not any("<<" in r.thinking for r in test)
    assert all(reason.parse_number(r.answer) is not None for r in test + train)
    am = reason.read_am(DATA / "am_format_sample.jsonl")
    assert len(am) == 8
    for a, g in zip(am, test, strict=False):
        assert (a.question, reason.strip_calculator(a.thinking), a.answer) == (g.question, g.thinking, g.answer)
    fitted, shortened, dropped = reason.fit_to_context(test[:50], gpt2_encoder, context=128)
    assert len(fitted) + dropped == 50 and shortened > 0
    for ids, _ in fitted:
        assert len(ids) <= 128 and gpt2_encoder.decode(ids).endswith("\n</answer>")
    oracle = [{"index": r.index, "response": reason.format_reason_text(r.question, r.thinking, r.answer)[
        len(reason.format_reason_prompt(r.question)):]} for r in test]
    assert reason.score_gsm8k(oracle, test)["accuracy"] == 1.0
