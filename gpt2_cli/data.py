"""``gpt2 data arithmetic``: write the generated arithmetic word problems (``tasks.arithmetic``) as GSM8K files."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2_cli.common import non_negative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate data sets (arithmetic word problems in GSM8K's format)",
                       description="Data sets made here rather than shipped.")
    kinds = p.add_subparsers(dest="dataset", required=True, metavar="DATASET", help="arithmetic")
    a = kinds.add_parser(
        "arithmetic", help="seeded one- and two-step word problems, GSM8K format",
        description="Write OUT/train.jsonl and OUT/test.jsonl: short word problems (sums and differences of two "
        "or three small numbers, products of two) with worked steps and a final '#### N' line, as GSM8K writes "
        "them, so `gpt2 finetune reason` trains on them and `gpt2 eval gsm8k` scores them. No question is in both "
        "files; the same --seed gives the same files.")
    a.add_argument("--out", required=True, metavar="DIR", help="the folder to write (created)")
    a.add_argument("--train", type=positive_int, default=6000, help="training problems (default 6000)")
    a.add_argument("--test", type=positive_int, default=500, help="test problems (default 500)")
    a.add_argument("--seed", type=non_negative_int, default=0, help="seeds the problems (default 0)")
    a.add_argument("--force", action="store_true", help="replace existing train.jsonl / test.jsonl in OUT")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper.atomic import atomic_write
    from mapper.outputs import Output, check_outputs
    from tasks.arithmetic import make_splits, to_jsonl

    out = Path(args.out)
    files = {name: out / f"{name}.jsonl" for name in ("train", "test")}
    check_outputs([Output("--out", out, tuple(f.name for f in files.values()))], {}, force=args.force)
    train, test = make_splits(args.train, args.test, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", train), ("test", test)):
        text = to_jsonl(problems).encode()
        atomic_write(files[name], lambda f, text=text: f.write(text))
    print(f"wrote {len(train)} training and {len(test)} test problems to {files['train']} and {files['test']}")
    return 0
