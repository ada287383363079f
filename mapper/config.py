"""GPT-2 model configuration: the one description of a model's shape both backends read.

Field names follow Hugging Face's ``GPT2Config`` (``vocab_size``, ``n_positions``, ``n_embd``, ``n_layer``,
``n_head``, ``layer_norm_epsilon``) so a ``config.json`` maps onto it with no renaming.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mapper.errors import ConfigError

# The four sizes OpenAI released. Parameter counts (tied head, counted once) are tested.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124,439,808 parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 354,823,168
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774,030,080
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1,557,611,200
}

GPT2_VOCAB_SIZE = 50257
GPT2_CONTEXT = 1024
GPT2_EOS_TOKEN_ID = 50256
# config.json field of a model without the q/k/v bias; transformers ignores it and reads the zero bias in the file
QKV_BIAS_KEY = "gpt2_qkv_bias"
# config.json field naming the initialisation of a model that was not drawn with GPT-2's (transformers ignores it)
INIT_KEY = "gpt2_init"
# How a fresh model's parameters are drawn (mapper.schema.init_params): GPT-2's, or the course's GPTModel's
INITS = ("gpt2", "course")
COURSE_DROPOUT = 0.1  # the book's drop_rate
DROPOUT_FIELDS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")
# the course's config dict (GPT_CONFIG_124M), which its model files do not carry; saved as JSON it is read too
COURSE_CONFIG_KEYS = frozenset({"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"})


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model.

    Legend used throughout the project: ``V`` = vocab_size, ``C`` = n_embd, ``L`` = n_layer,
    ``NH`` = n_head, ``hs`` = C // NH (head size), ``B`` = batch, ``T`` = time (sequence length).

    ``tie_word_embeddings``: the LM head reuses ``wte`` (logits = h @ wte.T). When False the parameters
    carry an extra ``lm_head.weight`` [V, C]. ``qkv_bias``: the query/key/value projection has a bias
    (``h.{i}.attn.c_attn.bias``, GPT-2's); False is the course's from-scratch model (``qkv_bias: False``), whose
    parameters have no such key and whose arithmetic has no such term. ``n_classes``: when set, the model also
    has a classification head ``score.weight`` [C, n_classes] without bias (Hugging Face's
    ``GPT2ForSequenceClassification``), read at the last real token of each row; its ``config.json`` carries
    ``pad_token_id`` (the EOS id), which is how transformers finds that token in right-padded rows.

    ``init``: how a fresh model is drawn (``mapper.schema.init_params``): "gpt2" (GPT-2's) or "course" (the book's
    ``GPTModel``: PyTorch's default initialisation; :meth:`with_init` also unties the head, drops the q/k/v bias
    and sets dropout 0.1). ``embd_pdrop``, ``attn_pdrop``, ``resid_pdrop``: dropout probabilities while training,
    named as in Hugging Face's config, at the three places both GPT-2 and the course put it: after the
    embeddings, on the attention weights after the softmax, and on each residual branch (attention's and the
    MLP's output) before it is added. They are 0 unless asked for; evaluation and decoding never drop anything.
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    n_positions: int = GPT2_CONTEXT
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    n_classes: int | None = None
    qkv_bias: bool = True
    init: str = "gpt2"
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"{self.n_embd} / {self.n_head} = {self.n_embd / self.n_head:.3f}"
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in DROPOUT_FIELDS:
            check_dropout(name, getattr(self, name))
        if self.n_classes is not None and (
            isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or self.n_classes < 1
        ):
            raise ConfigError(f"n_classes must be a positive integer or None, got {self.n_classes!r}")

    @property
    def head_dim(self) -> int:
        """hs = C / NH."""
        return self.n_embd // self.n_head

    @property
    def has_dropout(self) -> bool:
        """Whether training drops anything (any of the three probabilities above 0)."""
        return any(getattr(self, name) > 0.0 for name in DROPOUT_FIELDS)

    def with_dropout(self, p: float) -> GPT2Config:
        """A copy with dropout probability ``p`` at all three places."""
        return self.replace(**dict.fromkeys(DROPOUT_FIELDS, p))

    def with_init(self, init: str) -> GPT2Config:
        """This shape as the initialisation ``init`` builds it: "gpt2" changes nothing else; "course" is the book's
        ``GPTModel`` (its chapter 4): an untied output head without bias, no q/k/v bias, dropout 0.1."""
        if init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if init == "gpt2":
            return self.replace(init=init)
        return self.replace(init=init, tie_word_embeddings=False, qkv_bias=False).with_dropout(COURSE_DROPOUT)

    def computation(self) -> GPT2Config:
        """The fields that decide what the model computes: a copy with GPT-2's init and no dropout, for formats that
        record neither (llm.c's, OpenAI's hparams.json)."""
        return self.replace(init="gpt2").with_dropout(0.0)

    @property
    def eos_token_id(self) -> int | None:
        """GPT-2's ``<|endoftext|>`` (50256) for a model with GPT-2's vocabulary; None for any other vocabulary,
        whose end-of-text token (if any) this project cannot know."""
        return GPT2_EOS_TOKEN_ID if self.vocab_size == GPT2_VOCAB_SIZE else None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (V=50257, context 1024)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_spec(cls, preset: str | None = None, spec: str | None = None, **defaults: Any) -> GPT2Config:
        """A config from a preset name and/or a spec string, as the command line gives them.

        ``spec`` is a JSON file (a Hugging Face ``config.json`` or this class's fields), or overrides such as
        ``"n_layer=2,n_embd=64"`` applied to ``preset`` (else to ``defaults``, else to the field defaults).
        """
        if spec and Path(spec).is_file():
            if preset:
                raise ConfigError(f"give either a preset ({preset!r}) or a config file ({spec}), not both")
            try:
                data = json.loads(Path(spec).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"config file {spec} is not readable JSON: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"config file {spec} does not hold a JSON object")
            if set(data) <= set(cls.__dataclass_fields__):
                return cls(**data)
            if COURSE_CONFIG_KEYS <= set(data):  # a fresh model of the course's: its GPTModel has its own out_head
                return cls.from_course_dict(data).replace(tie_word_embeddings=False)
            return cls.from_hf_dict(data)  # anything else is read as a Hugging Face config.json
        fields: dict[str, Any] = {}
        for item in (spec or "").split(","):
            if not item.strip():
                continue
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or key not in cls.__dataclass_fields__:
                raise ConfigError(
                    f"a config is a JSON file or key=value pairs of {', '.join(cls.__dataclass_fields__)}; "
                    f"got {item.strip()!r}" + ("" if sep else " (no such file either)")
                )
            try:
                fields[key] = json.loads(value.lower()) if value else None
            except json.JSONDecodeError:
                raise ConfigError(f"config value {key}={value!r} is not a number, true/false or null") from None
        if preset:
            return cls.from_preset(preset, **fields)
        return cls(**{**defaults, **fields})

    def replace(self, **changes: Any) -> GPT2Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----- interchange with Hugging Face config.json and OpenAI hparams.json -----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json`` dict (unknown fields are ignored)."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"config.json describes model_type {d.get('model_type')!r}, not 'gpt2'")
        try:
            n_positions = d.get("n_positions", d.get("n_ctx"))
            kwargs: dict[str, Any] = dict(
                vocab_size=d["vocab_size"],
                n_positions=n_positions,
                n_embd=d["n_embd"],
                n_layer=d["n_layer"],
                n_head=d["n_head"],
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
                tie_word_embeddings=d.get("tie_word_embeddings", True),
                qkv_bias=d.get(QKV_BIAS_KEY, True),
                init=d.get(INIT_KEY, "gpt2"),
                **{name: d.get(name, 0.0) for name in DROPOUT_FIELDS},
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the GPT-2 field {e.args[0]!r}") from None
        if kwargs["n_positions"] is None:
            raise ConfigError("config.json has neither 'n_positions' nor 'n_ctx'")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new'); this project implements "
                "only the tanh form"
            )
        if "GPT2ForSequenceClassification" in (d.get("architectures") or []):
            # transformers writes the class count as num_labels (ours, older versions) or only as id2label (5.x)
            n_classes = d.get("num_labels") or len(d.get("id2label") or {})
            if n_classes:
                kwargs["n_classes"] = int(n_classes)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.GPT2Config`` / ``from_pretrained`` accepts."""
        d: dict[str, Any] = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": GPT2_EOS_TOKEN_ID if self.vocab_size == GPT2_VOCAB_SIZE else self.vocab_size - 1,
            "eos_token_id": GPT2_EOS_TOKEN_ID if self.vocab_size == GPT2_VOCAB_SIZE else self.vocab_size - 1,
        }
        if not self.qkv_bias:
            # Hugging Face's GPT-2 has no switch for it: the file holds a zero c_attn.bias, which computes the same
            d[QKV_BIAS_KEY] = False
        if self.init != "gpt2":
            d[INIT_KEY] = self.init
        if self.n_classes is not None:
            d["architectures"] = ["GPT2ForSequenceClassification"]
            d["num_labels"] = self.n_classes
            # transformers pools at the rightmost token != pad_token_id (and refuses batches without one)
            d["pad_token_id"] = d["eos_token_id"]
        return d

    @classmethod
    def from_course_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Read the course's config dict (``GPT_CONFIG_124M``: ``vocab_size``, ``context_length``, ``emb_dim``,
        ``n_heads``, ``n_layers``, ``qkv_bias``, ``drop_rate``), e.g. saved as JSON: the course's initialisation
        (``init`` "course"), that q/k/v bias and ``drop_rate`` at all three dropout places (0 when absent). The head
        is left tied here, as weights beside the dict decide it (an ``out_head`` equal to ``tok_emb`` is the tied
        head, a different one unties it); :meth:`from_spec` unties it for a fresh model."""
        try:
            config = cls(vocab_size=d["vocab_size"], n_positions=d["context_length"], n_embd=d["emb_dim"],
                         n_layer=d["n_layers"], n_head=d["n_heads"], qkv_bias=d.get("qkv_bias", False),
                         init="course")
        except KeyError as e:
            raise ConfigError(f"the course's config lacks the field {e.args[0]!r}") from None
        return config.with_dropout(d.get("drop_rate", 0.0))

    @classmethod
    def from_openai_hparams(cls, d: dict[str, Any]) -> GPT2Config:
        """Read OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
        try:
            return cls(
                vocab_size=d["n_vocab"], n_positions=d["n_ctx"], n_embd=d["n_embd"], n_layer=d["n_layer"],
                n_head=d["n_head"],
            )
        except KeyError as e:
            raise ConfigError(f"hparams.json lacks the field {e.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (our own checkpoints store this)."""
        return dataclasses.asdict(self)


def check_dropout(name: str, p: Any) -> None:
    """``ConfigError`` unless ``p`` is a dropout probability, a number in [0, 1) (1 would drop everything)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {p!r}")
