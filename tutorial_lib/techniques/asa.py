r"""Adversarial self-attention (ASA; Wu, Ding, Zhao, Xie, Huang and Zhang, AAAI 2023).

Chapter 2. Chapter 1's adversary perturbs the input; ASA's adversary attacks the
model's structure. In every layer a small adversary reads the layer's input and decides
which attention units (query :math:`i`, key :math:`j`) to cut; the model learns to give
the same prediction without them. As in the authors' code (``modeling/bert.py``,
``modeling/utils.py`` of gingasan/adversarialSA):

* **the adversary** of layer :math:`\ell` is one attention head of full width on the
  *detached* layer input :math:`h`:
  :math:`s = (hW_q + b_q)(hW_k + b_k)^\top/\sqrt d`, minus :math:`10^4` on padded keys;
* **the mask** is :math:`M = \mathbb 1[s > 0]` (1 = keep) in the forward pass, with the
  gradient :math:`\sigma'(s)` in the backward pass (straight-through,
  :func:`straight_through`), then a gradient-reversal layer (:func:`reverse_gradient`);
* **in the layer**, one mask shared by all heads *replaces* the padding mask, and a
  masked unit's logit becomes exactly :math:`-10^4`: the code computes
  ``scores * (mask >= 0) + mask`` with ``mask = (1 - M) * -10000``. The gradient
  reaching :math:`M` on a kept unit is therefore :math:`10^4` times the sum over heads
  of the gradient of the attention logit;
* **the loss** of one step (:class:`ASA`) is

  .. math:: \mathcal L = \mathrm{CE}(z) + \tfrac12\big[\mathrm{KL}(p_{\tilde z}\|p_z)
            + \mathrm{KL}(p_z\|p_{\tilde z})\big]
            + \tau^2 \sum_\ell \sum_{i,j} M^{(\ell)}_{ij} / B

  with :math:`z` the clean pass, :math:`\tilde z` the masked pass (each with its own
  dropout), neither side of the KL detached (:func:`divergence`), and the budget summed
  over every layer and unit, padded query rows included, divided by the batch size.
  ``--tau`` (0.5) is this budget's weight, not a temperature;
* **one backward pass** serves both players: the model descends :math:`\mathcal L`; the
  adversary, behind the reversal, ascends it, so it is paid by the divergence it causes
  and by every unit it *keeps*, i.e. it pays :math:`\tau^2/B` per unit it masks;
* **at evaluation** there is no masked pass: the adversaries are saved with the model
  and unused.

Here the adversaries live in an attention plugin (:class:`AdversarialSelfAttention`)
that does nothing unless its :meth:`~AdversarialSelfAttention.masking` context is open,
so the clean pass and evaluation are the plain model's, bitwise. :class:`ASA`, the loss
step, attaches the plugin itself (``train`` calls its ``attach`` before building the
optimiser, so the adversaries train and are checkpointed with the model).
``ASA(adversary=False)`` is the ablation "M ≡ 1": a second, unmasked pass, i.e. R-Drop's
consistency loss with α = 1 and the task loss on the clean pass only (R-Drop puts it on
both passes), which ASA contains.

The masked logits also drop the padding mask of the core for the layer's own, as the
code does: padded keys have :math:`M = 0` and logit :math:`-10^4`, which differs from a
plain pass only in a query row whose every key is masked (the code, and this module,
then spread that query's attention evenly over all keys, padding included).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin, MultiHeadAttention
from tutorial_lib.core.model import Encoder, init_weights
from tutorial_lib.data.batching import model_inputs

MASKED_LOGIT = -10000.0  # the code's additive mask: a masked unit's logit
_PADDING = "asa-padding"  # ctx.cache key: the batch's key-padding mask, taken by the plugin


# -- the two gradient tricks ------------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores):
        ctx.save_for_backward(scores)
        return (scores > 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (scores,) = ctx.saved_tensors
        sigmoid = scores.sigmoid()
        return grad_output * sigmoid * (1 - sigmoid)


def straight_through(scores: torch.Tensor) -> torch.Tensor:
    """``1[scores > 0]`` exactly, with the gradient of ``sigmoid(scores)``.

    The code writes it as ``(hard − σ(s)).detach() + σ(s)``, whose forward value is the
    0/1 mask only up to a rounding error; here the forward pass is exactly 0 or 1. (The
    code's "Gumbel" noise is added and subtracted, ``(s + g − g)``, so it cancels.)
    """
    return _StraightThrough.apply(scores)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.alpha * grad_output, None


def reverse_gradient(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer: the identity forward, ``−alpha ·`` the gradient backward."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
    return _Reverse.apply(x, float(alpha))


# -- the adversary ------------------------------------------------------------------------------

class Adversary(nn.Module):
    """One layer's adversary: a single attention head of the model's width, with biases."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)

    def scores(self, hidden_states: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``s`` (batch, query, key): ``q·kᵀ/√d``, minus 10⁴ on padded keys
        (``d = hidden_size``)."""
        q, k = self.query(hidden_states), self.key(hidden_states)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        if key_padding_mask is not None:
            s = s + (~key_padding_mask[:, None, :]).to(s.dtype) * MASKED_LOGIT
        return s

    def forward(self, hidden_states: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mask ``M`` (batch, query, key), 1 = keep, behind the gradient reversal.
        ``hidden_states`` is detached here: the adversary never trains the encoder."""
        return reverse_gradient(straight_through(self.scores(hidden_states.detach(),
                                                             key_padding_mask)))


def _encoder(model: nn.Module) -> Encoder:
    encoder = model if isinstance(model, Encoder) else getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"model must be a tutorial_lib Encoder or a model with one as .encoder "
                        f"(e.g. SequenceClassifier), got {type(model).__name__}")
    return encoder


class AdversarialSelfAttention(AttentionPlugin):
    """One :class:`Adversary` per layer, as an attention plugin of the encoder.

    Outside :meth:`masking` it changes nothing (every hook returns the base class's
    answer), so a model carrying it computes what the plain model computes, bitwise.
    Inside, each layer's adversary reads the layer's input (a forward pre-hook on the
    layer) and the layer attends with the code's masked logits. Build it with
    :func:`attach`.
    """

    def __init__(self, hidden_size: int, num_layers: int, initializer_range: float = 0.02):
        super().__init__()
        self.adversaries = nn.ModuleList(Adversary(hidden_size) for _ in range(num_layers))
        self.apply(lambda module: init_weights(module, initializer_range))
        self._masks: list[torch.Tensor] | None = None  # this pass's masks, in layer order

    @property
    def active(self) -> bool:
        return self._masks is not None

    @contextmanager
    def masking(self, model: nn.Module) -> Iterator[list[torch.Tensor]]:
        """Within the block, forward passes of ``model`` are masked; the list yielded
        receives each layer's ``M`` (batch, query, key), in order, as they are drawn."""
        encoder = _encoder(model)
        if self not in list(encoder.attention_plugins):
            raise ValueError("this AdversarialSelfAttention is not attached to model's encoder "
                             "(use asa.attach(model))")
        if self.active:
            raise RuntimeError("masking() is already open for this plugin")
        if len(encoder.layers) != len(self.adversaries):
            raise ValueError(f"the encoder has {len(encoder.layers)} layers but the plugin "
                             f"{len(self.adversaries)} adversaries")
        masks: list[torch.Tensor] = []
        handles = [layer.register_forward_pre_hook(self._draw_mask) for layer in encoder.layers]
        self._masks = masks
        try:
            yield masks
        finally:
            for handle in handles:
                handle.remove()
            self._masks = None

    def _draw_mask(self, layer: nn.Module, args: tuple) -> None:
        hidden_states, ctx = args[0], args[1]
        mask = self.adversaries[ctx.layer_index](hidden_states, ctx.cache.get(_PADDING))
        ctx.cache[("asa", ctx.layer_index)] = mask
        self._masks.append(mask)

    def prepare(self, encoder: nn.Module, ctx: AttentionContext) -> None:
        if self.active:  # the layer's mask replaces the padding mask, as in the code
            ctx.cache[_PADDING] = ctx.key_padding_mask
            ctx.key_padding_mask = None

    def score_bias(self, attn: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor,
                   ctx: AttentionContext) -> torch.Tensor | None:
        if not self.active:
            return None
        mask = ctx.cache[("asa", ctx.layer_index)][:, None]  # (batch, 1, query, key)
        masked = (mask.detach() == 0).to(q.dtype)
        # The code's logit is  score · 1[kept] + (1 − M)·(−10⁴):  the core adds this bias to
        # the score, so the bias removes the score of each masked unit (its gradient too).
        content = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
        return (1 - mask) * MASKED_LOGIT - content * masked


def attach(model: nn.Module) -> AdversarialSelfAttention:
    """The model's :class:`AdversarialSelfAttention`, added to its encoder if it has none.

    New adversaries are initialised as the code does (BERT's normal initialisation with
    the encoder's ``initializer_range``, zero biases), drawing from the global generator.
    """
    encoder = _encoder(model)
    found = [p for p in encoder.attention_plugins if isinstance(p, AdversarialSelfAttention)]
    if found:
        return found[0]
    config = encoder.config
    parameter = next(encoder.parameters())
    plugin = AdversarialSelfAttention(config.hidden_size, config.num_layers,
                                      config.initializer_range)
    return encoder.add_attention_plugin(plugin.to(device=parameter.device, dtype=parameter.dtype))


def masked_fraction(masks: list[torch.Tensor], attention_mask: torch.Tensor | None) -> list[float]:
    """Per layer, the fraction of real (query, key) units whose ``M`` is 0."""
    fractions = []
    for mask in masks:
        real = torch.ones_like(mask, dtype=torch.bool) if attention_mask is None else \
            attention_mask.bool()[:, :, None] & attention_mask.bool()[:, None, :]
        fractions.append(float(((mask.detach() == 0) & real).sum() / real.sum()))
    return fractions


# -- the loss ---------------------------------------------------------------------------------

def divergence(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """The code's ``divergence``: ``½[KL(p_other‖p) + KL(p‖p_other)]``, summed over the
    classes and divided by the batch size, with neither side detached.

    With one logit per row (a regression head) the code flattens the (batch, 1) logits to
    (batch,) and takes the softmax *over the batch*: the two "distributions" are the
    batch-softmaxes of the predicted scores (so shifting every score by the same amount
    changes nothing).
    """
    if logits.shape != other_logits.shape:
        raise ValueError(f"logits and other_logits must have one shape, got "
                         f"{tuple(logits.shape)} and {tuple(other_logits.shape)}")
    if logits.dim() == 2 and logits.shape[1] == 1:
        logits, other_logits = logits.reshape(-1), other_logits.reshape(-1)
    rows = logits.shape[0]
    log_p, log_q = F.log_softmax(logits, dim=-1), F.log_softmax(other_logits, dim=-1)
    p_to_q = (log_q.exp() * (log_q - log_p)).sum() / rows  # KL(q ‖ p)
    q_to_p = (log_p.exp() * (log_p - log_q)).sum() / rows  # KL(p ‖ q)
    return 0.5 * (p_to_q + q_to_p)


def _output(output, key: str) -> torch.Tensor:
    value = output[key] if isinstance(output, dict) else getattr(output, key)
    if value is None:
        raise ValueError(f"the model returned no {key}; ASA needs the batch's labels and logits")
    return value


@dataclass
class ASA:
    """Adversarial self-attention as a loss step of :func:`tutorial_lib.training.loop.train`.

    ``tau`` is the code's ``--tau`` (0.5): the budget's weight is ``tau²``.
    ``adversary=False`` is the ablation "M ≡ 1": the second pass is unmasked, the loss is
    ``CE + ½(KL + KL)`` (R-Drop's consistency term with α = 1, the task loss on the clean
    pass only) and there are no adversaries.

    Cost per step: two forward passes and one backward pass through both, plus one
    ``d × d`` query and key map per layer (``d = hidden_size``) for the adversaries.
    """

    tau: float = 0.5
    adversary: bool = True

    def __post_init__(self):
        if not isinstance(self.tau, (int, float)) or isinstance(self.tau, bool) \
                or not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        if not isinstance(self.adversary, bool):
            raise ValueError(f"adversary must be True or False, got {self.adversary!r}")

    def attach(self, model: nn.Module) -> list[nn.Parameter]:
        """Give ``model`` its adversaries (``train`` calls this before building the
        optimiser) and return their parameters; nothing for ``adversary=False``.

        ``train`` leaves the returned parameters out of the model's gradient clipping: the
        adversary's gradient carries the factor 10⁴ of the masked logits and would
        otherwise dominate the clipping norm and shrink the model's update (the authors'
        script does not clip at all)."""
        if not self.adversary:
            return []
        return list(attach(model).parameters())

    def __call__(self, model: nn.Module, batch: dict[str, Any]):
        inputs = model_inputs(batch)
        clean = model(**inputs)
        loss, logits = _output(clean, "loss"), _output(clean, "logits")
        if not self.adversary:
            other = _output(model(**inputs), "logits")
            consistency = divergence(logits, other)
            return loss + consistency, {"clean_loss": loss.detach(),
                                        "divergence": consistency.detach()}
        plugin = _plugin(model)
        with plugin.masking(model) as masks:
            other = _output(model(**inputs), "logits")
        consistency = divergence(logits, other)
        budget = sum(mask.sum() for mask in masks) / logits.shape[0]
        masked = masked_fraction(masks, batch.get("attention_mask"))
        logs = {"clean_loss": loss.detach(), "divergence": consistency.detach(),
                "budget": budget.detach(), "masked": sum(masked) / len(masked)}
        return loss + consistency + self.tau ** 2 * budget, logs


def _plugin(model: nn.Module) -> AdversarialSelfAttention:
    found = [p for p in _encoder(model).attention_plugins
             if isinstance(p, AdversarialSelfAttention)]
    if not found:
        raise ValueError("model has no adversaries: call ASA().attach(model) (train does) or "
                         "tutorial_lib.techniques.asa.attach(model) first")
    return found[0]


__all__ = ["ASA", "Adversary", "AdversarialSelfAttention", "MASKED_LOGIT", "attach",
           "divergence", "masked_fraction", "reverse_gradient", "straight_through"]
