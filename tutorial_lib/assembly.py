"""Where a config meets the techniques: the one module beside the core that names them.

The core (:mod:`tutorial_lib.core`) builds chapter 0's BERT and asks
:data:`~tutorial_lib.core.model.EXTENSIONS` for everything else. This module fills that
registry when the package is imported:

* the attention plugins a config's position options ask for (chapter 5: RoPE and its
  NTK/ReRoPE variants, ALiBi, sliding windows, log-n scaling), rebuilt by
  :func:`~tutorial_lib.core.model.position_options` on a trained model;
* DeBERTa's relative table and disentangled-attention plugin (chapter 3) when
  ``config.relative_attention`` is set;
* the gated attention unit's block (chapter 6), ``config.block = "gau"``;
* each technique's checks of the config options it owns.

A new chapter whose technique is switched on by a config option adds one line here;
a technique used by building it explicitly (a loss step, a head decoder, a block
registered with ``EXTENSIONS.register_block``) adds nothing.
"""

from __future__ import annotations

from tutorial_lib.core.attention import AttentionPlugin
from tutorial_lib.core.config import TransformerConfig, register_config_check
from tutorial_lib.core.model import EXTENSIONS
from tutorial_lib.core.positions import RotaryEmbedding
from tutorial_lib.techniques import deberta, extrapolation, gau
from tutorial_lib.techniques.extrapolation import (ALiBi, LogNScaling, ReRotaryEmbedding,
                                                   SlidingWindowMask, ntk_scaled_base)


def position_plugins(config: TransformerConfig) -> list[AttentionPlugin]:
    """The attention plugins the config's position options ask for, in calling order."""
    plugins: list[AttentionPlugin] = []
    if config.rotary:
        base = config.rotary_base
        if config.rotary_ntk_factor != 1:
            base = ntk_scaled_base(base, config.rotary_ntk_factor, config.head_dim)
        if config.rerope_window is None:
            plugins.append(RotaryEmbedding(config.head_dim, base=base,
                                           pairing=config.rotary_pairing))
        else:
            plugins.append(ReRotaryEmbedding(config.head_dim, config.rerope_window, base=base,
                                             pairing=config.rotary_pairing))
    if config.alibi:
        plugins.append(ALiBi(config.num_heads))
    if config.attention_window is not None:
        plugins.append(SlidingWindowMask(config.attention_window))
    if config.logn_training_length is not None:
        plugins.append(LogNScaling(config.logn_training_length, window=config.attention_window))
    return plugins


EXTENSIONS.position_plugins = position_plugins
register_config_check(extrapolation.check_config)
register_config_check(deberta.check_config)
register_config_check(gau.check_config)  # block="gau" (chapter 6) registers itself on import
if deberta.extend_encoder not in EXTENSIONS.encoder_extensions:
    EXTENSIONS.encoder_extensions.append(deberta.extend_encoder)
