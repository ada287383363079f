"""The ``gpt2`` command: a thin layer over the packages (floor 3). Run ``gpt2 --help``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mapper import GPT2Config
from mapper.config import PRESETS, ConfigError

TINY_DEFAULT = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)


def parse_config(preset: str | None, config: str | None, default: dict) -> GPT2Config:
    """A config from a preset and/or ``--config`` (a JSON file, or ``key=value,key=value`` overrides)."""
    fields: dict = {}
    if config:
        path = Path(config)
        if path.is_file():
            data = json.loads(path.read_text())
            return GPT2Config.from_hf_dict(data) if "n_embd" in data else GPT2Config(**data)
        for item in config.split(","):
            key, sep, value = item.partition("=")
            known = GPT2Config.__dataclass_fields__
            if not sep or key.strip() not in known:
                raise ConfigError(f"--config takes a JSON file or key=value pairs of {', '.join(known)}; got {item!r}")
            fields[key.strip()] = json.loads(value.strip().lower()) if value.strip() else None
    if preset:
        return GPT2Config.from_preset(preset, **fields)
    return GPT2Config(**{**default, **fields})


# ---------------------------------------------------------------------------------------------- gradcheck


def cmd_gradcheck(args: argparse.Namespace) -> int:
    from mapper import init_params
    from numpy_gpt2.gradcheck import check_model_gradients

    config = parse_config(args.preset, args.config, TINY_DEFAULT)
    if args.seq > config.n_positions:
        raise ValueError(f"--seq {args.seq} exceeds the model's context n_positions={config.n_positions}")
    rng = np.random.default_rng(args.seed)
    # GPT-2's init plus noise so LayerNorm gains and every bias carry non-trivial gradients
    params = {
        k: v + args.noise * rng.standard_normal(v.shape)
        for k, v in init_params(config, args.seed, np.float64).items()
    }
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    targets = rng.integers(0, config.vocab_size, (args.batch, args.seq))
    print(
        f"gradcheck: float64, fourth-order central differences, {config.n_layer} layer(s), C={config.n_embd}, "
        f"NH={config.n_head}, V={config.vocab_size}, B={args.batch}, T={args.seq}, "
        f"{'all' if args.entries is None else args.entries} entries per tensor (+ the largest), tolerance {args.tol:g}"
    )
    start = time.perf_counter()
    errors = check_model_gradients(params, config, tokens, targets, entries_per_tensor=args.entries, seed=args.seed)
    width = max(len(k) for k in errors)
    print(f"{'parameter':<{width}}  {'shape':>14}  {'max rel error':>13}")
    for name, err in errors.items():
        flag = "" if err <= args.tol else "  FAIL"
        print(f"{name:<{width}}  {str(params[name].shape):>14}  {err:13.3e}{flag}")
    worst = max(errors, key=errors.get)
    failed = [k for k, e in errors.items() if e > args.tol]
    print(
        f"worst: {worst} {errors[worst]:.3e}; {len(errors) - len(failed)}/{len(errors)} tensors within "
        f"{args.tol:g} ({time.perf_counter() - start:.1f} s)"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- shared


def load_model_params(
    weights: str | None, preset: str | None, config_arg: str | None, dtype: str, seed: int
) -> tuple[GPT2Config, dict[str, np.ndarray], str]:
    """(config, params, description): from a checkpoint, or GPT-2's seeded init of a preset/config."""
    from mapper import init_params, load_checkpoint

    if weights:
        if preset or config_arg:
            raise ValueError("give either --weights or --preset/--config, not both")
        config, params = load_checkpoint(weights)
        params = {k: v.astype(dtype, copy=False) for k, v in params.items()}
        return config, params, f"weights {weights}"
    config = parse_config(preset or "gpt2", config_arg, TINY_DEFAULT)
    name = (preset or "gpt2") + (f" + {config_arg}" if config_arg else "")
    return config, init_params(config, seed, dtype), f"{name} shape, GPT-2 init (seed {seed}), no download"


# ---------------------------------------------------------------------------------------------- parity

# Tolerances (atol, rtol) for |torch - numpy| <= atol + rtol |numpy|, and max|d| / max|numpy| for gradients.
# float64: the same math up to rounding; measured ~1e-14 on logits and gradients (124M shape, seeded init).
# float32: measured on the 124M shape (B=2..4, T=64..128, three seeds): logits |d| <= 3.7e-6 with |logits| ~ 3,
# loss |d| <= 9.5e-7, gradients <= 1.3e-6 relative; the limits leave a 5-10x margin.
TOLERANCES = {
    "float64": {"logits": (1e-10, 0.0), "loss": (1e-12, 0.0), "grad_rel": 1e-9},
    "float32": {"logits": (2e-5, 1e-5), "loss": (1e-5, 1e-6), "grad_rel": 1e-5},
}


def cmd_parity(args: argparse.Namespace) -> int:
    import torch

    import numpy_gpt2
    from torch_gpt2 import GPT2, resolve_device

    config, params, origin = load_model_params(args.weights, args.preset, args.config, args.dtype, args.seed)
    T = min(args.seq, config.n_positions)
    rng = np.random.default_rng(args.seed)
    data = rng.integers(0, config.vocab_size, (args.batch, T + 1))
    tokens, targets = data[:, :-1], data[:, 1:]
    device = resolve_device(args.device, torch.float64 if args.dtype == "float64" else torch.float32)
    print(f"parity: {origin}; {config.n_layer} layers, C={config.n_embd}, NH={config.n_head}, V={config.vocab_size}; "
          f"{args.dtype}, batch {args.batch}x{T}, torch on {device}")

    start = time.perf_counter()
    ref_logits = numpy_gpt2.forward(params, config, tokens)
    ref_loss, ref_grads = numpy_gpt2.loss_and_grads(params, config, tokens, targets)
    print(f"  numpy spec: forward + backward in {time.perf_counter() - start:.1f} s, loss {ref_loss:.6f}")

    results = {}
    for attention in ("custom", "fused"):
        start = time.perf_counter()
        # float64 uses the explicit-math attention: SDPA's kernels may reorder sums on some devices
        model = GPT2.from_params(params, config, attention, device=device,
                                 attn_impl="math" if args.dtype == "float64" else "sdpa")
        logits, loss = model(torch.from_numpy(tokens).to(device), torch.from_numpy(targets).to(device))
        loss.backward()
        results[attention] = (logits.detach().cpu().numpy(), float(loss.detach()), model.grads_to_params())
        elapsed = time.perf_counter() - start
        print(f"  torch {attention}: forward + backward in {elapsed:.1f} s, loss {results[attention][1]:.6f}")
        del model, logits, loss

    tol = TOLERANCES[args.dtype]
    rows: list[tuple[str, str, list[tuple[float, float]], float, bool]] = []

    def add(name: str, shape: tuple, ref: np.ndarray, others: list[np.ndarray], kind: str) -> None:
        diffs = []
        for other in others:
            diff = np.abs(np.asarray(other, np.float64) - np.asarray(ref, np.float64))
            scale = float(np.abs(ref).max(initial=0.0))
            diffs.append((float(diff.max(initial=0.0)), float(diff.max(initial=0.0)) / scale if scale else 0.0))
        if kind == "grad":
            limit, ok = tol["grad_rel"], all(rel <= tol["grad_rel"] for _, rel in diffs)
        else:
            atol, rtol = tol[kind]
            limit = atol
            ok = all(bool(np.all(np.abs(np.asarray(o, np.float64) - np.asarray(ref, np.float64))
                                 <= atol + rtol * np.abs(np.asarray(ref, np.float64)))) for o in others)
        rows.append((name, str(shape), diffs, limit, ok))

    add("logits", ref_logits.shape, ref_logits, [r[0] for r in results.values()], "logits")
    add("loss", (), np.array(ref_loss), [np.array(r[1]) for r in results.values()], "loss")
    for name, g in ref_grads.items():
        add(f"grad {name}", g.shape, g, [r[2][name] for r in results.values()], "grad")

    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'quantity':<{width}} {'shape':>15}  {'custom max|d|':>13} {'rel':>9}  {'fused max|d|':>13} {'rel':>9}"
          f"  {'tolerance':>11}")
    for name, shape, diffs, limit, ok in rows:
        (ca, cr), (fa, fr) = diffs
        kind = "rel" if name.startswith("grad") else "abs"
        print(f"{name:<{width}} {shape:>15}  {ca:13.2e} {cr:9.1e}  {fa:13.2e} {fr:9.1e}  {kind} {limit:7.0e}"
              f"{'' if ok else '  FAIL'}")
    failed = [r[0] for r in rows if not r[4]]
    print()
    if args.dtype == "float32":
        print("float32 tolerances: logits and loss |d| <= atol + rtol*|numpy|, gradients max|d| / max|numpy|")
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} quantities exceed their tolerance: {', '.join(failed[:5])}")
        return 1
    print(f"OK: NumPy spec, torch custom and torch fused agree on all {len(rows)} quantities "
          f"(logits, loss, {len(ref_grads)} gradients)")
    return 0


# ---------------------------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    import codecs

    from mapper import load_tokenizer
    from mapper.config import GPT2_EOS_TOKEN_ID, GPT2_VOCAB_SIZE

    config, params, origin = load_model_params(args.weights, args.preset, args.config, args.dtype, args.seed or 0)
    if not args.weights:
        print(f"note: no --weights given, generating from an untrained model ({origin}): expect noise",
              file=sys.stderr)
    enc = load_tokenizer(args.tokenizer)
    prompt = enc.encode(args.prompt, allowed_special="all")
    if not prompt:
        raise ValueError("the prompt is empty after tokenization")
    if max(prompt) >= config.vocab_size:
        raise ValueError(f"the prompt encodes to id {max(prompt)}, outside this model's vocabulary of "
                         f"{config.vocab_size}: the checkpoint does not use the GPT-2 tokenizer")
    eos = None if args.no_eos or config.vocab_size != GPT2_VOCAB_SIZE else GPT2_EOS_TOKEN_ID
    max_new = args.max_new_tokens
    if len(prompt) + max_new > config.n_positions:
        max_new = config.n_positions - len(prompt)
        print(f"note: --max-new-tokens lowered to {max_new} to fit the context of {config.n_positions}",
              file=sys.stderr)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
                    seed=args.seed)
    if args.backend == "numpy":
        import numpy_gpt2

        steps = numpy_gpt2.generate_stream(params, config, np.array([prompt]), max_new, **sampling)
    else:
        from torch_gpt2 import GPT2

        model = GPT2.from_params(params, config, args.attention, device=args.device)
        steps = model.generate_stream([prompt], max_new, **sampling)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    start, n = time.perf_counter(), 0
    for ids in steps:
        token = int(ids[0])
        n += 1
        if token == eos:
            break
        sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    elapsed = time.perf_counter() - start
    print(f"[{n} tokens in {elapsed:.2f} s, {1000 * elapsed / max(n, 1):.1f} ms/token, backend {args.backend}]",
          file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from mapper import detect_format, load_checkpoint, save_checkpoint

    fmt_in = detect_format(args.input)
    config, params = load_checkpoint(args.input)
    if args.dtype:
        params = {k: v.astype(args.dtype) for k, v in params.items()}
    out = save_checkpoint(params, config, args.output, fmt=args.to)
    again_config, again = load_checkpoint(out)
    same = again_config == config and all(np.array_equal(again[k], params[k]) for k in params)
    if not same:
        raise ValueError(f"reading {out} back did not reproduce the parameters; the output is not trustworthy")
    print(f"converted {args.input} ({fmt_in}) -> {out} ({args.to} layout, safetensors + config.json); "
          f"{len(params)} tensors, read back identical")
    return 0


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2",
        description="GPT-2 from scratch: a hand-differentiated NumPy spec and a PyTorch engine that agree.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p: argparse.ArgumentParser, default_desc: str) -> None:
        p.add_argument("--preset", choices=list(PRESETS), help=f"a GPT-2 size (default: {default_desc})")
        p.add_argument(
            "--config",
            help="a config JSON file (Hugging Face config.json or our fields), or overrides such as "
            "'n_layer=1,n_embd=64' applied to the preset or default",
        )

    g = sub.add_parser(
        "gradcheck",
        help="check the NumPy backward against finite differences (float64)",
        description="Compare every parameter gradient of the NumPy spec's hand-written backward with "
        "fourth-order central finite differences in float64, on a small model (default V=64, n_ctx=16, C=32, "
        "2 layers, 4 heads) with GPT-2's init plus noise. Prints the max relative error per tensor; exits 1 "
        "if any exceeds --tol.",
    )
    model_args(g, "a tiny model, V=64 C=32 L=2 NH=4")
    g.add_argument("--batch", type=int, default=2, help="batch size B (default 2)")
    g.add_argument("--seq", type=int, default=8, help="sequence length T (default 8)")
    g.add_argument("--entries", type=int, default=6,
                   help="random entries checked per tensor, plus the largest (default 6); 0 = every entry")
    g.add_argument("--tol", type=float, default=1e-6, help="max relative error allowed (default 1e-6)")
    g.add_argument("--noise", type=float, default=0.3, help="std of the noise added to the init (default 0.3)")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_gradcheck)

    p = sub.add_parser(
        "parity",
        help="run NumPy, torch-custom and torch-fused on one batch and compare everything (the main job)",
        description="Run the same batch through the NumPy spec and the torch engine in both attention layouts, "
        "forward and backward, and print max absolute/relative differences of the logits, the loss and every "
        "gradient. Exits 1 if any exceeds its tolerance. Default: the GPT-2 124M shape with GPT-2's seeded "
        "initialisation in float64 (no download).",
    )
    p.add_argument("--weights", help="a checkpoint file or directory (any format `gpt2 convert` reads)")
    model_args(p, "gpt2, i.e. the 124M shape")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="(default float64)")
    p.add_argument("--device", default=None, help="torch device: cpu, cuda, mps (default: cuda > mps > cpu)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the batch (default 0)")
    p.set_defaults(func=cmd_parity)

    gen = sub.add_parser(
        "generate",
        help="generate text, streaming tokens as they come",
        description="Generate a continuation of --prompt with the NumPy spec or the torch engine (KV cache). "
        "Temperature 0 is greedy; otherwise sampling after top-k/top-p filtering, reproducible with --seed. "
        "Stops at <|endoftext|> for GPT-2-vocabulary models unless --no-eos.",
    )
    gen.add_argument("--weights", help="a checkpoint file or directory (HF safetensors/.bin, OpenAI TF, ours)")
    model_args(gen, "gpt2 shape, untrained, if no --weights")
    gen.add_argument("--backend", choices=["numpy", "torch"], default="torch", help="(default torch)")
    gen.add_argument("--attention", choices=["custom", "fused"], default="fused", help="torch layout (default fused)")
    gen.add_argument("--device", default=None, help="torch device (default: cuda > mps > cpu)")
    gen.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="(default float32)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="(default 50)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    gen.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    gen.add_argument("--tokenizer", default=None,
                     help="gpt2.tiktoken, or a folder with it or vocab.bpe + encoder.json (default: "
                          "$GPT2_TOKENIZER_PATH, else tiktoken's download/cache)")
    gen.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "convert",
        help="convert a checkpoint between formats and layouts",
        description="Read any supported checkpoint (HF safetensors, sharded safetensors, pytorch_model.bin, "
        "OpenAI's TensorFlow checkpoint, ours) and write it as safetensors + config.json in Hugging Face's "
        "layout (--to hf, loadable by transformers) or the torch engine's module layout (--to custom|fused). "
        "The output is read back and compared before the command reports success.",
    )
    c.add_argument("input", help="checkpoint file or directory")
    c.add_argument("output", help="output directory")
    c.add_argument("--to", choices=["hf", "custom", "fused"], default="hf", help="(default hf)")
    c.add_argument("--dtype", choices=["float32", "float64"], default=None, help="cast the weights (default: keep)")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "entries", None) == 0:
        args.entries = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, CheckpointError and bad input are ValueErrors
        print(f"gpt2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly, as Unix tools do
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
