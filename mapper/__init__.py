"""Floor 1: the contract everything above shares — configs, the parameter schema, sampling, tokenizer, checkpoints,
and the small types and rules the engines and the jobs have in common (``mapper.training``)."""

from mapper.checkpoint import (
    CheckpointError,
    detect_format,
    load_checkpoint,
    load_lora_adapters,
    save_checkpoint,
    save_llmc,
    save_lora_adapters,
    save_pipeline_files,
)
from mapper.config import PRESETS, ConfigError, GPT2Config
from mapper.lora import LoraConfig, init_lora_params, lora_param_shapes, merge_lora
from mapper.schema import count_params, init_params, param_shapes, validate_params
from mapper.tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "LoraConfig",
    "TokenizerError",
    "count_params",
    "detect_format",
    "init_lora_params",
    "init_params",
    "load_checkpoint",
    "load_lora_adapters",
    "load_tokenizer",
    "lora_param_shapes",
    "merge_lora",
    "param_shapes",
    "save_checkpoint",
    "save_llmc",
    "save_lora_adapters",
    "save_pipeline_files",
    "validate_params",
]
