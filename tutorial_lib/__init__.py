"""tutorial_lib: the shared library of the book *Beyond BERT*.

Its folders are its layers; each imports only those above it in this list
(``tests/test_layers.py`` enforces it):

* :mod:`tutorial_lib.core`: chapter 0's Transformer (config, attention and its plugin
  extension point, positions, the model and its heads, the registries techniques plug
  into);
* :mod:`tutorial_lib.data`: data files, tokenizers, batching;
* :mod:`tutorial_lib.training`: the training loop, checkpoints, distributed set-up,
  evaluation helpers, the command line (``python -m tutorial_lib.train``);
* :mod:`tutorial_lib.techniques`: one module per technique of the book;
* :mod:`tutorial_lib.assembly`: the one place that maps config options to techniques;
* :mod:`tutorial_lib.interop`: Hugging Face ↔ tutorial_lib;
* :mod:`tutorial_lib.source`: the library's source as the chapters show it (highlighted,
  with a link to the lines on GitHub);
* :mod:`tutorial_lib.studies`: the book's experiments (``python -m tutorial_lib.studies``);
  nothing else imports them.
"""

__version__ = "0.1.0"

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin, MultiHeadAttention
from tutorial_lib.core.config import PRESETS, TransformerConfig
from tutorial_lib.core.model import (EXTENSIONS, CausalLM, Encoder, EncoderState, MaskedLM,
                                     ModelOutput, SequenceClassifier, build_model,
                                     position_options, set_position_options)
from tutorial_lib.core.positions import RotaryEmbedding, sinusoidal_embedding
from tutorial_lib import assembly  # noqa: F401  (registers the techniques with the core)
from tutorial_lib.techniques.deberta import (DisentangledAttention, EnhancedMaskDecoder,
                                             RelativePositionBias, RelativePositionTable)
from tutorial_lib.techniques.extrapolation import (ALiBi, LogNScaling, ReRotaryEmbedding,
                                                   SlidingWindowMask, alibi_slopes,
                                                   equal_mean_random_positions,
                                                   evenly_spaced_positions, ntk_scaled_base,
                                                   random_positions)

__all__ = [
    "AttentionContext", "AttentionPlugin", "MultiHeadAttention", "SlidingWindowMask",
    "PRESETS", "TransformerConfig", "CausalLM", "Encoder", "EncoderState", "MaskedLM",
    "ModelOutput", "SequenceClassifier", "build_model", "EXTENSIONS", "RotaryEmbedding",
    "sinusoidal_embedding", "set_position_options", "position_options", "ALiBi",
    "LogNScaling", "ReRotaryEmbedding", "alibi_slopes", "equal_mean_random_positions",
    "evenly_spaced_positions", "ntk_scaled_base", "random_positions",
    "DisentangledAttention", "EnhancedMaskDecoder", "RelativePositionBias",
    "RelativePositionTable",
]
