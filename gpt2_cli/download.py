"""``gpt2 download``: fetch a model by name (the Hugging Face Hub, or OpenAI's bucket) and say where its files are."""

from __future__ import annotations

import argparse
from pathlib import Path

from mapper.download import BASE_URL_ENV, CACHE_ENV, fetch, known_names, parse_model_name


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download GPT-2 weights by name and print where they are",
        description="Fetch a model's files once; every command then reads them by the same name (--weights, "
        "--init-from, gpt2 convert), offline too. Hub names go through huggingface_hub (its cache, HF_HOME, "
        "HF_ENDPOINT, HF_HUB_OFFLINE); openai:SIZE fetches OpenAI's original TensorFlow checkpoint from its bucket "
        f"(falling back to the course's mirror; ${BASE_URL_ENV} replaces both) into ${CACHE_ENV} (default: the "
        "user cache folder), resuming a cut transfer and checking every file before it is used. "
        f"Names: {known_names()}.",
    )
    p.add_argument("name", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name[@revision], openai:124M, ...")
    p.add_argument("--to", metavar="DIR", default=None, help="put the files in DIR instead of the cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper.outputs import Output, check_outputs

    if args.to:  # a folder that cannot be written fails here, before any transfer (complete files are reused)
        check_outputs([Output("--to", Path(args.to), ())], {})
    folder = fetch(args.name, args.to)
    files = sorted(f for f in folder.iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    print(f"{parse_model_name(args.name).describe()}: {len(files)} files, {size / 1e6:.1f} MB in {folder}")
    print(f"use it as --weights {args.name} (or --weights {folder})")
    return 0
