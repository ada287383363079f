"""CPU decoding speed with a KV cache: the torch engine against Hugging Face ``generate``, side by side.

    python -m benchmarks.decode [--new-tokens 64] [--prompt-len 8] [--repeats 5] [--threads 2]
                                [--attention fused] [--json OUT]

Both models hold the same random GPT-2 124M weights (``mapper.init_params``, float32) and decode greedily,
batch 1. Per-token time excludes the prompt: each repeat times ``generate`` for 1 and for N + 1 new tokens
and takes (t[N+1] - t[1]) / N. The two implementations alternate within every repeat, so machine noise
hits both alike; medians over repeats and their ratio are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mapper import GPT2Config, init_params
from torch_gpt2 import GPT2


def build_hf_model(params: dict[str, np.ndarray], config: GPT2Config) -> torch.nn.Module:
    """``transformers.GPT2LMHeadModel`` holding ``params`` (Conv1D weights are [in, out], as canonical)."""
    import transformers

    hf_config = transformers.GPT2Config(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"})
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {f"transformer.{name}": torch.from_numpy(value) for name, value in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte
        raise RuntimeError(f"HF state mismatch: missing {missing}, unexpected {unexpected}")
    return model


def per_token_seconds(generate: Callable[[int], object], new_tokens: int) -> float:
    """(time to generate new_tokens + 1) - (time to generate 1), over new_tokens: decode steps only."""
    t0 = time.perf_counter()
    generate(1)
    t1 = time.perf_counter()
    generate(new_tokens + 1)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / new_tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt length; prefill is not counted (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating ours/HF repeats (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--attention", choices=("fused", "custom"), default="fused", help="our layout (default fused)")
    parser.add_argument("--preset", default="gpt2", help="model shape, random weights (default gpt2 = 124M)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    import transformers

    torch.set_num_threads(args.threads)
    config = GPT2Config.from_preset(args.preset)
    params = init_params(config, seed=0, dtype=np.float32)
    ours = GPT2.from_params(params, config, attention=args.attention, device="cpu")
    hf = build_hf_model(params, config)
    prompt = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (1, args.prompt_len)))

    with torch.inference_mode():
        logits_gap = float((ours(prompt) - hf(prompt).logits).abs().max())

    def run_ours(n: int) -> torch.Tensor:
        return ours.generate(prompt, n)

    def run_hf(n: int) -> torch.Tensor:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, do_sample=False,
                           max_new_tokens=n, eos_token_id=None, pad_token_id=0)

    print(f"decode benchmark: warming up ({args.repeats} timed repeats follow)", file=sys.stderr, flush=True)
    same_tokens = bool(torch.equal(run_ours(args.new_tokens), run_hf(args.new_tokens)))  # also warms up
    ours_s, hf_s = [], []
    for i in range(args.repeats):
        ours_s.append(per_token_seconds(run_ours, args.new_tokens))
        hf_s.append(per_token_seconds(run_hf, args.new_tokens))
        print(f"  repeat {i + 1}/{args.repeats}: ours {1e3 * ours_s[-1]:.1f} ms/token, "
              f"HF {1e3 * hf_s[-1]:.1f} ms/token", file=sys.stderr, flush=True)
    ours_ms, hf_ms = 1e3 * statistics.median(ours_s), 1e3 * statistics.median(hf_s)
    result = {
        "benchmark": "decode, batch 1, greedy, KV cache, float32, CPU",
        "preset": args.preset,
        "attention": args.attention,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__},
        "ours_ms_per_token": round(ours_ms, 2),
        "hf_ms_per_token": round(hf_ms, 2),
        "hf_over_ours": round(hf_ms / ours_ms, 2),
        "ours_ms_all": [round(1e3 * s, 2) for s in ours_s],
        "hf_ms_all": [round(1e3 * s, 2) for s in hf_s],
        "prompt_logits_max_abs_diff": logits_gap,
        "same_greedy_tokens": same_tokens,
    }
    print(f"GPT-2 {args.preset} decode (CPU, fp32, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{result['threads']} threads, {args.repeats} alternating repeats) on {result['machine']}")
    print(f"  torch_gpt2 ({args.attention}): {ours_ms:6.2f} ms/token (median; all {result['ours_ms_all']})")
    print(f"  HF generate      : {hf_ms:6.2f} ms/token (median; all {result['hf_ms_all']})")
    print(f"  HF / ours        : {hf_ms / ours_ms:.2f}x   prompt logits max |diff| {logits_gap:.2e}   "
          f"same greedy tokens: {same_tokens}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
