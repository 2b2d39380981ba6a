"""Model configuration: one validated dataclass and a few named presets.

Every model in the book is described by a :class:`TransformerConfig`. A chapter
that changes the architecture does so through a field here (or by adding an
attention plugin, see :mod:`tutorial_lib.core.attention`), never by copying a model.

Presets are shapes (and, for DeBERTa, its attention scheme); everything else is
passed as an override::

    TransformerConfig.preset("cpu-notebook", vocab_size=8000)
    TransformerConfig.preset("bert-base", causal=True, norm_position="pre")
    TransformerConfig.preset("deberta-v3-base", share_att_key=False)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

POSITION_EMBEDDINGS = ("learned", "sinusoidal", "none")
NORM_POSITIONS = ("post", "pre")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
ROTARY_PAIRINGS = ("half", "interleaved")
POSITION_TERMS = ("c2p", "p2c")
P2C_CONVENTIONS = ("code", "paper")
REL_NORMS = ("none", "layer_norm")
# Checks of the options a technique owns, registered by tutorial_lib.assembly: each is
# called as check(config) by TransformerConfig.validate and raises ValueError.
CONFIG_CHECKS: list = []


def register_config_check(check) -> None:
    """Have every ``TransformerConfig`` validated by ``check(config)`` too (once)."""
    if not callable(check):
        raise TypeError(f"check must be callable as check(config), got {type(check).__name__}")
    if check not in CONFIG_CHECKS:
        CONFIG_CHECKS.append(check)


# Field metadata of the options that may change on a trained model.
SWITCHABLE = {"switchable": True}

PRESETS: dict[str, dict[str, Any]] = {
    # For unit tests: every code path, milliseconds per step.
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 max_position_embeddings=128),
    # The CPU notebook model: trains on WikiText-2 in minutes on two cores.
    "cpu-notebook": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                         max_position_embeddings=512),
    # The BERT family of Turc et al. (2019) and BERT-base (Devlin et al., 2019).
    "bert-small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048,
                       max_position_embeddings=512),
    "bert-medium": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048,
                        max_position_embeddings=512),
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      max_position_embeddings=512, vocab_size=30522),
    # microsoft/deberta-v3-base: no absolute positions in the input, disentangled
    # attention with 256 log buckets over 512 positions, shared keys, normalised table.
    "deberta-v3-base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                            max_position_embeddings=512, vocab_size=128100, type_vocab_size=0,
                            position_embedding="none", layer_norm_eps=1e-7,
                            relative_attention=True, pos_att_type=("p2c", "c2p"),
                            position_buckets=256, max_relative_positions=512,
                            share_att_key=True, norm_rel_ebd="layer_norm"),
}


def is_number(value: Any) -> bool:
    """A finite real number (not a bool, a string, NaN or infinity)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass
class TransformerConfig:
    """Hyperparameters of an encoder (``causal=False``) or decoder (``causal=True``) stack.

    Defaults are BERT's where BERT has one (post-LN, GELU, learned positions,
    two token types, LayerNorm epsilon 1e-12, initialiser std 0.02).
    """

    vocab_size: int = 8000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    # Absolute positions added to the input: "learned" (BERT, GPT-2), "sinusoidal"
    # (Vaswani et al.) or "none" (when positions enter through attention only).
    position_embedding: str = "learned"
    # Vaswani et al.'s token embeddings: multiplied by sqrt(hidden_size), the table
    # initialised with standard deviation hidden_size ** -0.5 (as in fairseq), so tokens
    # enter at unit scale, the scale of a sinusoidal table's rows. False: BERT's, at
    # initializer_range and unscaled.
    scale_word_embeddings: bool = False
    # 0 disables token-type (segment) embeddings.
    type_vocab_size: int = 2
    causal: bool = False
    # "post": LayerNorm after each residual sum (BERT); "pre": before each sublayer,
    # with a final LayerNorm (GPT-2, Xiong et al. 2020).
    norm_position: str = "post"
    activation: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    # The layer of the stack: "transformer" (attention + FFN); a technique registers
    # others with tutorial_lib.core.model.EXTENSIONS.register_block.
    block: str = "transformer"
    # Position options, marked SWITCHABLE: they own no weights, so
    # tutorial_lib.core.model.position_options can change them on a trained model.
    rotary: bool = field(default=False, metadata=SWITCHABLE)
    rotary_base: float = field(default=10000.0, metadata=SWITCHABLE)
    rotary_pairing: str = field(default="half", metadata=SWITCHABLE)
    attention_window: int | None = field(default=None, metadata=SWITCHABLE)
    # Length extrapolation (chapter 5, tutorial_lib.techniques.extrapolation).
    # NTK-aware RoPE: base * factor^(d/(d-2)); 1.0 is off.
    rotary_ntk_factor: float = field(default=1.0, metadata=SWITCHABLE)
    # ReRoPE: RoPE with relative positions clipped to [-window, window] (needs rotary).
    rerope_window: int | None = field(default=None, metadata=SWITCHABLE)
    # ALiBi: per-head linear distance penalties on the scores (Press et al., 2022).
    alibi: bool = field(default=False, metadata=SWITCHABLE)
    # log-n scaling: logits times max(1, log(n)/log(this)), n the keys a query sees.
    logn_training_length: int | None = field(default=None, metadata=SWITCHABLE)
    # DeBERTa's disentangled attention (tutorial_lib.techniques.deberta). Off: BERT's attention.
    relative_attention: bool = False
    # Position terms added to content-to-content: "c2p", "p2c" or both.
    pos_att_type: tuple[str, ...] = POSITION_TERMS
    # > 0: v2/v3 log buckets and a table of 2 * position_buckets rows; 0: v1's clamp.
    position_buckets: int = 0
    # k of the clamp (and R of the log buckets); None means max_position_embeddings.
    max_relative_positions: int | None = None
    # True: the layer's own W_q, W_k project the relative table (v2/v3); False: each
    # layer has separate position projections.
    share_att_key: bool = False
    # "layer_norm": normalise the relative table (v2/v3); "none": use it as is.
    norm_rel_ebd: str = "none"
    # Index of the p2c term: "code" delta(i, j) (released code, checkpoints) or
    # "paper" delta(j, i) (the paper's equation).
    p2c_convention: str = "code"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept Hugging Face's "p2c|c2p" and JSON's lists; store a tuple.
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = tuple(t.strip() for t in self.pos_att_type.lower().split("|")
                                      if t.strip())
        elif isinstance(self.pos_att_type, list):
            self.pos_att_type = tuple(self.pos_att_type)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def resolved_max_relative_positions(self) -> int:
        return self.max_relative_positions or self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """k: the relative table has 2k rows (DeBERTa)."""
        return self.position_buckets if self.position_buckets > 0 \
            else self.resolved_max_relative_positions

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for any invalid combination."""
        if not isinstance(self.block, str) or not self.block:
            raise ValueError(f"block must be the name of a registered block, e.g. "
                             f"'transformer', got {self.block!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, "
                             f"got {self.position_embedding!r}")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, "
                             f"got {self.norm_position!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool) \
                or self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be an integer >= 0, got {self.type_vocab_size!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not is_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"initializer_range must be a number >= 0 (the standard deviation "
                             f"of the initial weights), got {self.initializer_range!r}")
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool) \
                or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id!r}")
        for name in ("causal", "tie_word_embeddings", "rotary", "scale_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.rotary_pairing not in ROTARY_PAIRINGS:
            raise ValueError(f"rotary_pairing must be one of {ROTARY_PAIRINGS}, "
                             f"got {self.rotary_pairing!r}")
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"rotary needs an even head dimension, got hidden_size/num_heads "
                             f"= {self.head_dim}")
        if not is_number(self.rotary_base) or self.rotary_base <= 1:
            raise ValueError(f"rotary_base must be > 1, got {self.rotary_base!r}")
        for check in CONFIG_CHECKS:  # the techniques' own options (tutorial_lib.assembly)
            check(self)

    # -- presets and serialisation -------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TransformerConfig":
        """A named shape (see ``PRESETS``) with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig field(s): {unknown}")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TransformerConfig":
        return cls.from_dict(json.loads(text))

    def diff(self, other: "TransformerConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: ``{name: (self_value, other_value)}``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
