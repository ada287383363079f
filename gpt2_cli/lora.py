"""``gpt2 lora merge``: fold a LoRA run's adapters into its base weights, a plain GPT-2 checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA adapters: merge them into a plain checkpoint")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="merge")
    m = actions.add_parser(
        "merge", help="write W + (alpha/r) A B as a plain GPT-2 checkpoint",
        description="Read a LoRA run (a gpt2 finetune folder or its checkpoint/ folder, which holds the base "
        "weights and lora.safetensors) and write the merged model, which every loader here and transformers "
        "reads. (A LoRA run's DIR/model.safetensors is already this merge.)")
    m.add_argument("run", metavar="DIR", help="the LoRA run's folder, or a checkpoint folder with lora.safetensors")
    m.add_argument("out", metavar="OUT", help="the folder to write (outside DIR; a model in it is replaced only "
                   "with --force)")
    m.add_argument("--force", action="store_true", help="replace the model files of an existing OUT")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mapper import load_checkpoint, load_lora_adapters, merge_lora, save_checkpoint
    from mapper.outputs import Output, check_outputs
    from mapper.save import CHECKPOINT_FILES
    from tasks.run_folder import CHECKPOINT, LORA_FILE

    out = Path(args.out)
    check_outputs([Output("OUT", out, CHECKPOINT_FILES)], {"DIR": args.run}, force=args.force)
    source = Path(args.run)
    if (source / CHECKPOINT / LORA_FILE).is_file():
        source = source / CHECKPOINT
    if not (source / LORA_FILE).is_file():
        raise ValueError(f"{args.run} holds no LoRA adapters ({LORA_FILE})")
    config, base = load_checkpoint(source)
    lora, adapters = load_lora_adapters(source / LORA_FILE)
    merged = merge_lora({**base, **adapters}, lora)
    save_checkpoint(merged, config, out)
    print(f"merged rank-{lora.rank} adapters ({', '.join(lora.targets)}, alpha {lora.alpha:g}) into {out}")
    return 0
