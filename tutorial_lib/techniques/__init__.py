"""Techniques: one module per technique of the book, each importing only the core, the
data layer and (where it builds on one) another technique.

* :mod:`tutorial_lib.techniques.adversarial`: chapter 1, embedding-space adversarial
  training (FGM, PGD, FreeLB, VAT, ALUM/SMART);
* :mod:`tutorial_lib.techniques.asa`: chapter 2, adversarial self-attention (per-layer
  adversaries as an attention plugin, the ASA loss step and its R-Drop ablation);
* :mod:`tutorial_lib.techniques.deberta`: chapter 3, disentangled attention, the
  relative table, the enhanced mask decoder;
* :mod:`tutorial_lib.techniques.sift`: chapter 4, scale-invariant fine-tuning (SiFT), a
  perturbation of the normalised embedding sum built on :mod:`.adversarial`'s sites;
* :mod:`tutorial_lib.techniques.extrapolation`: chapter 5, length extrapolation
  (NTK-aware RoPE, ReRoPE, ALiBi, log-n scaling, windows, random positions);
* :mod:`tutorial_lib.techniques.gau`: chapter 6, the gated attention unit (GAU, FLASH's
  quadratic layer) as the block ``"gau"``, with the normalisers relu²/n (the paper's text
  and its code), softmax and GAU-α's log-n softmax;
* :mod:`tutorial_lib.techniques.whitening`: chapter 7, BERT-whitening with β and γ,
  sentence pooling, Spearman's correlation;
* :mod:`tutorial_lib.techniques.unargmaxable`: chapter 8, which classes of a softmax
  layer can be its argmax (quick certificate, braid reflect, Chebyshev LP);
* :mod:`tutorial_lib.techniques.ladder`: chapter 9, ladder side-tuning (a thin side
  Transformer fed by a frozen backbone's layers through gated or added rungs, random or
  Fisher-pruned initialisation, and what a training step holds in memory).
"""
