"""The core: chapter 0's Transformer, which every chapter builds on.

* :mod:`tutorial_lib.core.config`: ``TransformerConfig`` and its presets;
* :mod:`tutorial_lib.core.attention`: the attention core and its extension point,
  :class:`~tutorial_lib.core.attention.AttentionPlugin`;
* :mod:`tutorial_lib.core.positions`: sinusoidal positions and RoPE;
* :mod:`tutorial_lib.core.model`: encoder and decoder stacks, their heads, and the
  extension points the techniques use (plugins, blocks, perturbation sites, per-layer
  states).

Nothing here imports :mod:`tutorial_lib.techniques`, :mod:`tutorial_lib.training` or
:mod:`tutorial_lib.studies` (``tests/test_layers.py`` checks it). Techniques reach the
core through its registries; :mod:`tutorial_lib.assembly` is the one place that maps
a config's options to the techniques that implement them.
"""
