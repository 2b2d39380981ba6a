"""tutorial_lib: the shared library of the book *Beyond BERT*.

Modules, each readable on its own:

* :mod:`tutorial_lib.config`: ``TransformerConfig`` and named presets;
* :mod:`tutorial_lib.attention`: the attention core and its plugin extension point;
* :mod:`tutorial_lib.positions`: sinusoidal positions and RoPE;
* :mod:`tutorial_lib.extrapolation`: length extrapolation (NTK-aware RoPE, ReRoPE, ALiBi,
  log-n scaling, random and evenly spaced positions);
* :mod:`tutorial_lib.deberta`: DeBERTa's disentangled attention (a plugin) and its
  enhanced mask decoder;
* :mod:`tutorial_lib.model`: encoder/decoder stacks and heads;
* :mod:`tutorial_lib.interop`: loading Hugging Face weights;
* :mod:`tutorial_lib.data`, :mod:`tutorial_lib.tokenization`, :mod:`tutorial_lib.batching`:
  datasets, tokenizers, collators;
* :mod:`tutorial_lib.training`, :mod:`tutorial_lib.checkpoint`,
  :mod:`tutorial_lib.distributed`: the training loop (CLI: ``python -m tutorial_lib.train``);
* :mod:`tutorial_lib.pretrained`: the book's cached baseline (``python -m tutorial_lib.pretrained``);
* :mod:`tutorial_lib.adversarial`: embedding-space adversarial training (FGM, PGD, FreeLB,
  VAT, ALUM/SMART) as loss steps for the training loop, and a PGD attack for evaluation.
"""

from .attention import AttentionContext, AttentionPlugin, MultiHeadAttention, SlidingWindowMask
from .config import PRESETS, TransformerConfig
from .extrapolation import (ALiBi, LogNScaling, ReRotaryEmbedding, alibi_slopes,
                            equal_mean_random_positions, evenly_spaced_positions,
                            ntk_scaled_base, random_positions)
from .deberta import (DisentangledAttention, EnhancedMaskDecoder, RelativePositionBias,
                      RelativePositionTable)
from .model import (CausalLM, Encoder, EncoderState, MaskedLM, ModelOutput,
                    SequenceClassifier, build_model, set_position_options)
from .positions import RotaryEmbedding, sinusoidal_embedding

__version__ = "0.1.0"

__all__ = [
    "AttentionContext", "AttentionPlugin", "MultiHeadAttention", "SlidingWindowMask",
    "PRESETS", "TransformerConfig", "CausalLM", "Encoder", "MaskedLM", "ModelOutput",
    "SequenceClassifier", "build_model", "RotaryEmbedding", "sinusoidal_embedding",
    "set_position_options", "ALiBi", "LogNScaling", "ReRotaryEmbedding", "alibi_slopes",
    "equal_mean_random_positions", "evenly_spaced_positions", "ntk_scaled_base",
    "random_positions",
    "DisentangledAttention", "EnhancedMaskDecoder", "RelativePositionBias", "RelativePositionTable", "EncoderState",
]
