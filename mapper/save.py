"""Writing checkpoints: a model in Hugging Face's layout or the torch engine's, llm.c's model file, the tokenizer
and generation files that make a folder a complete Hugging Face model, and LoRA adapters on their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mapper.atomic import atomic_write
from mapper.config import GPT2_VOCAB_SIZE, GPT2Config
from mapper.errors import CheckpointError
from mapper.formats.llmc import check_llmc_writable, write_llmc
from mapper.formats.safetensors_file import load_tensors, save_tensors, write_safetensors
from mapper.layouts import ATTENTION_LAYOUTS, to_module_state
from mapper.lora import LoraConfig, check_lora_params, is_lora_key
from mapper.schema import param_shapes, validate_params
from mapper.tokenizer import openai_bpe_files

HF_PREFIX = "transformer."
LAYOUT_KEY = "gpt2_layout"  # metadata / config.json field naming a torch-module layout (custom or fused)
LORA_METADATA_KEY = "gpt2_lora"  # safetensors metadata of an adapters file: the LoraConfig as JSON
CHECKPOINT_FILES = ("model.safetensors", "config.json")  # what save_checkpoint writes into its folder
PIPELINE_FILES = ("generation_config.json", "vocab.json", "merges.txt", "tokenizer_config.json")  # save_pipeline_files


def save_checkpoint(
    params: dict[str, np.ndarray], config: GPT2Config, path: str | os.PathLike[str], *, fmt: str = "hf"
) -> Path:
    """Write ``params`` (canonical schema, float32/float64) to the directory ``path``; return it.

    ``fmt="hf"`` (default) is described below. ``fmt="custom"`` / ``"fused"`` writes the torch engine's module
    state instead (``mapper.layouts``; nn.Linear ``[out, in]`` matrices, split or fused q/k/v), with the layout
    in the safetensors metadata and config.json (``"gpt2_layout"``); ``load_checkpoint`` reads it back.

    Writes ``model.safetensors`` in Hugging Face's names and layout (``transformer.`` prefix on the body,
    ``lm_head.weight`` only when untied, ``score.weight`` transposed to nn.Linear's [n_classes, C], no bias, so
    ``transformers.GPT2ForSequenceClassification.from_pretrained`` reads a classifier; its config.json carries
    ``pad_token_id``), metadata ``{"format": "pt"}``, and ``config.json``. A model without the q/k/v bias
    (``config.qkv_bias`` False) gets a zero ``c_attn.bias`` in this layout, which has no switch for it, and
    ``"gpt2_qkv_bias": false`` in its config.json, which this project's loader reads back. Each file is written
    atomically (temp file in the same directory, fsync, rename): a crash leaves the old file or the new one.

    Parameters holding LoRA adapters are refused (module docstring): merge them first (``mapper.merge_lora``),
    or write the adapters alone with :func:`save_lora_adapters`.
    """
    if fmt not in ("hf", *ATTENTION_LAYOUTS):
        raise CheckpointError(f"unknown checkpoint layout {fmt!r}; choose 'hf', 'custom' or 'fused'")
    directory = Path(path)
    adapters = [k for k in params if is_lora_key(k)]
    if adapters:
        raise CheckpointError(
            f"cannot save to {directory}: the parameters hold {len(adapters)} LoRA adapter tensor(s) ({adapters[0]}, "
            "...), which transformers and every GPT-2 loader would ignore. Save mapper.merge_lora(params, lora) for "
            "a plain GPT-2, or the adapters alone with mapper.save_lora_adapters(params, lora, path)"
        )
    try:
        validate_params(params, config)
    except ValueError as e:
        raise CheckpointError(f"cannot save to {directory}: {e}") from None
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, np.ndarray] = {}
    metadata = {"format": "pt"}
    config_dict = config.to_hf_dict()
    if fmt == "hf":
        for name in param_shapes(config):
            if name == "score.weight":
                tensors[name] = params[name].T  # canonical [C, n_classes] -> nn.Linear [n_classes, C]
            elif name == "lm_head.weight":
                tensors[name] = params[name]
            else:
                tensors[HF_PREFIX + name] = params[name]
            if name.endswith("attn.c_attn.weight") and not config.qkv_bias:  # HF's GPT-2 always has this bias
                C = config.n_embd
                tensors[HF_PREFIX + name.replace(".weight", ".bias")] = np.zeros(3 * C, dtype=params[name].dtype)
    else:  # the torch engine's own module state; the layout is recorded so the loader can undo it
        tensors = to_module_state(params, config, fmt)
        metadata[LAYOUT_KEY] = fmt
        config_dict[LAYOUT_KEY] = fmt
    atomic_write(directory / "model.safetensors", lambda f: write_safetensors(f, tensors, metadata))
    config_bytes = (json.dumps(config_dict, indent=2) + "\n").encode()
    atomic_write(directory / "config.json", lambda f: f.write(config_bytes))
    return directory


def save_pipeline_files(config: GPT2Config, path: str | os.PathLike[str], *, keep_existing: bool = False) -> list[str]:
    """Beside a Hugging Face-layout model in the folder ``path``, what ``transformers.pipeline("text-generation",
    model=path)`` also needs, written atomically (``keep_existing``: files already there are left as they are);
    returns the names of the files it wrote.

    ``generation_config.json`` (the end-of-text id as ``bos_token_id`` / ``eos_token_id``, so generation stops there)
    for a language model; for a model whose vocabulary holds GPT-2's 50,257 tokens, GPT-2's tokenizer as Hugging
    Face names it: ``vocab.json`` and ``merges.txt`` (byte for byte OpenAI's ``encoder.json`` and ``vocab.bpe``) and
    ``tokenizer_config.json``. Another vocabulary gets no tokenizer: GPT-2's would produce ids outside it.
    """
    directory = Path(path)
    files: dict[str, bytes] = {}
    if config.n_classes is None:
        eos = config.to_hf_dict()["eos_token_id"]
        files["generation_config.json"] = _json_bytes({"bos_token_id": eos, "eos_token_id": eos})
    if config.vocab_size >= GPT2_VOCAB_SIZE:
        files["vocab.json"], files["merges.txt"] = openai_bpe_files()
        files["tokenizer_config.json"] = _json_bytes({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.n_positions, "add_prefix_space": False,
            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        })
    if keep_existing:
        files = {name: data for name, data in files.items() if not (directory / name).exists()}
    for name, data in files.items():
        atomic_write(directory / name, lambda f, data=data: f.write(data))
    return list(files)


def save_llmc(params: dict[str, np.ndarray], config: GPT2Config, path: str | os.PathLike[str], *,
              dtype: str = "float32") -> Path:
    """Write ``params`` as llm.c's model file ``path`` (``mapper.formats.llmc``: version 3 for float32, 5 for
    bfloat16), atomically, so llm.c's C/CUDA trainers continue from it; ``load_checkpoint`` reads it back.

    llm.c's GPT-2 is the tied-head model with every bias: an untied head, a model without the q/k/v bias, a
    classifier or LoRA adapters are refused (``CheckpointError``)."""
    file = Path(path)
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"llm.c's model files hold float32 (version 3) or bfloat16 (version 5), not {dtype}")
    try:
        validate_params(params, config)
        check_llmc_writable(config)
    except ValueError as e:
        raise CheckpointError(f"cannot save {file} in llm.c's format: {e}") from None
    if file.is_dir():
        raise CheckpointError(f"cannot save {file} in llm.c's format: it is a folder; give the .bin file's path")
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(file, lambda f: write_llmc(f, params, config, dtype))
    return file


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def save_lora_adapters(
    params: dict[str, np.ndarray], lora: LoraConfig, path: str | os.PathLike[str]
) -> Path:
    """Write the LoRA adapters of ``params`` (canonical names and ``[in, out]`` orientation; any other key is
    left out) to the safetensors file ``path``, with ``lora`` in its metadata; atomically. Returns the path.

    The adapters must be complete for ``lora`` (every target layer of every block). Their base model is saved
    separately (``save_checkpoint`` of the params without adapters), usually once.
    """
    try:
        check_lora_params(params, lora)
    except ValueError as e:
        raise CheckpointError(f"cannot save LoRA adapters to {path}: {e}") from None
    adapters = {k: v for k, v in params.items() if is_lora_key(k)}
    save_tensors(path, adapters, {LORA_METADATA_KEY: json.dumps(lora.to_dict())})
    return Path(path)


def load_lora_adapters(path: str | os.PathLike[str]) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """What :func:`save_lora_adapters` wrote: ``(lora, adapters)``; add them to the base parameters with
    ``{**params, **adapters}`` (``validate_params(params, config, lora)`` then checks that they fit)."""
    tensors, metadata = load_tensors(path)
    if LORA_METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a LoRA adapters file: its metadata has no {LORA_METADATA_KEY!r}")
    try:
        lora = LoraConfig.from_dict(json.loads(metadata[LORA_METADATA_KEY]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unusable LoRA settings in its metadata ({e})") from None
    foreign = [k for k in tensors if not is_lora_key(k)]
    if foreign:
        raise CheckpointError(f"{path} holds tensors that are not LoRA adapters: {', '.join(foreign[:4])}")
    return lora, tensors
