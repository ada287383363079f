"""Floor 1: the contract both backends share — configs, the parameter schema, sampling, tokenizer, checkpoints."""

from mapper.checkpoint import CheckpointError, detect_format, load_checkpoint, save_checkpoint
from mapper.config import PRESETS, ConfigError, GPT2Config
from mapper.schema import count_params, init_params, param_shapes, validate_params
from mapper.tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "TokenizerError",
    "count_params",
    "detect_format",
    "init_params",
    "load_checkpoint",
    "load_tokenizer",
    "param_shapes",
    "save_checkpoint",
    "validate_params",
]
