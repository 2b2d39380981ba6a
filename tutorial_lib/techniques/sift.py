r"""SiFT, scale-invariant fine-tuning (He, Liu, Gao and Chen, DeBERTa, ICLR 2021).

Chapter 4. Chapter 1's methods perturb raw embeddings, whose norms differ from model to
model, so one ε means different things in different models. SiFT normalises first and
perturbs the normalised vector:

.. math:: \hat x = \mathrm{LN}_0(x) = \frac{x - \bar x}{\sqrt{\operatorname{Var}(x) + \epsilon}},
          \qquad \text{perturbed input } \hat x + \delta ,

where :math:`x` is the *embedding sum* that the model's embedding LayerNorm normalises
(word + position + token type for BERT and MiniLM; the word embedding alone for
DeBERTa-v2/v3, which has neither absolute positions nor token types) and
:math:`\mathrm{LN}_0` is a LayerNorm without affine parameters. Every token of
:math:`\hat x` has mean 0 and norm :math:`\sqrt d`, whatever the model's scale, so
:math:`\delta`'s size means the same thing everywhere. The clean forward pass goes
through :math:`\mathrm{LN}_0` too; since the model's own LayerNorm follows,
:math:`\mathrm{LN}(\mathrm{LN}_0(x)) = \mathrm{LN}(x)` up to the eps terms and the clean
model is unchanged.

One step, as in the authors' code (``DeBERTa/sift/sift.py``; :class:`SiFT` below):

1. clean pass: task loss, logits :math:`z`, and :math:`\hat x`;
2. :math:`\delta_0 = \mathrm{clamp}(\mathcal N(0, \sigma^2), \pm 2\sigma)` with
   :math:`\sigma` = ``init_std`` (1e-2);
3. a perturbed pass at :math:`\mathrm{sg}(\hat x) + \delta_0`, gradient :math:`g` of the
   loss with respect to :math:`\delta` only;
4. :math:`\delta = \delta_0 + \eta\, g / (10^{-6} + \max_{\text{hidden}} |g|)`, one
   per-token :math:`\ell_\infty`-normalised ascent step of size :math:`\eta` =
   ``step_size`` (1e-4), with **no projection** (skipped when :math:`g` is not finite);
5. a perturbed pass at :math:`\mathrm{sg}(\hat x) + \delta`; the loss is
   ``task loss + alpha · sym(z_δ, z)``.

``sym`` is the authors' ``symmetric_kl`` (:func:`code_symmetric_kl`):
:math:`\sum \mathrm{sg}(p)(-\log q) + \sum \mathrm{sg}(q)(-\log p)`. Its *value* is the
symmetric KL plus both entropies; its *gradient* is that of
:math:`\mathrm{KL}(\mathrm{sg}(p)\|q) + \mathrm{KL}(\mathrm{sg}(q)\|p)`
(:func:`tutorial_lib.techniques.adversarial.symmetric_kl`), not that of the full
symmetric KL.

Where this follows the code and where it does not:

* ``δ`` is zero at padding positions, as everywhere in :mod:`.adversarial` (the code
  perturbs padding too; attention never reads it);
* ``loss="mse"`` uses the mean squared error in *both* perturbed passes. The code's
  ``vat_loss_fn`` changes only the ascent pass: its final pass is always
  ``symmetric_kl``, which is identically 0 for a one-logit (regression) head. Here a
  one-logit head with ``loss="symmetric_kl"`` is refused instead;
* ``ascent=False`` skips steps 3–4 ("noise only"), an ablation the paper does not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.data.batching import model_inputs
from tutorial_lib.techniques.adversarial import (_embeddings, _logits, _loss, symmetric_kl,
                                                  token_mask, transformed)

LOSSES = ("symmetric_kl", "mse")
SITE = "embedding_sum"  # adversarial's site: the embedding sum, before the embedding LayerNorm


# -- the pieces ------------------------------------------------------------------------------

def layer_norm_0(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``LN₀(x)``: LayerNorm over the last axis without affine parameters (eps 1e-7 as the
    authors' code). Every row of the result has mean 0 and norm ``√(d·var/(var + eps))``."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def initial_delta(shape: tuple[int, ...] | torch.Size, init_std: float, *,
                  device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``δ₀ = clamp(N(0, init_std²), ±2·init_std)`` in float32."""
    _check_number("init_std", init_std)
    delta = torch.empty(tuple(shape), device=device, dtype=torch.float32)
    delta.normal_(0.0, init_std, generator=generator)
    return delta.clamp(-2 * init_std, 2 * init_std)


def ascent_step(delta: torch.Tensor, gradient: torch.Tensor, step_size: float) -> torch.Tensor:
    """``δ + η · g / (1e-6 + max_hidden |g|)``: one per-token ℓ∞-normalised step, no
    projection. A gradient with a NaN or an infinity leaves ``δ`` as it is (as the code)."""
    if delta.shape != gradient.shape:
        raise ValueError(f"gradient must have delta's shape {tuple(delta.shape)}, "
                         f"got {tuple(gradient.shape)}")
    if not bool(torch.isfinite(gradient).all()):
        return delta
    scale = 1e-6 + gradient.abs().amax(dim=-1, keepdim=True)
    return delta + step_size * gradient / scale


def code_symmetric_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The authors' ``symmetric_kl``, one value per row (their caller takes the mean).

    ``Σ sg(p_t)·(−log p_s) + Σ sg(p_s)·(−log p_t)`` with ``p_s = softmax(logits)``,
    ``p_t = softmax(target)``: two cross-entropies whose weights are detached. Its value
    is ``KL(p_t‖p_s) + KL(p_s‖p_t) + H(p_t) + H(p_s)``; its gradient equals that of
    ``KL(sg(p_t)‖p_s) + KL(sg(p_s)‖p_t)``. Computed in float32 at least.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits and target must have one shape, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    dtype = torch.promote_types(torch.promote_types(logits.dtype, target.dtype), torch.float32)
    log_p_s = logits.reshape(-1, logits.shape[-1]).to(dtype).log_softmax(-1)
    log_p_t = target.reshape(-1, target.shape[-1]).to(dtype).log_softmax(-1)
    forward = (log_p_t.exp().detach() * -log_p_s).sum(-1)
    backward = (log_p_s.exp().detach() * -log_p_t).sum(-1)
    return forward + backward


def _mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(logits.dtype, target.dtype), torch.float32)
    return F.mse_loss(logits.to(dtype).flatten(), target.to(dtype).flatten())


def require_embedding_norm(model: nn.Module) -> nn.Module:
    """The model's embedding LayerNorm, which must follow the SiFT site.

    SiFT relies on it: without a LayerNorm after the embedding sum (a pre-LN model), the
    normalisation would change the clean model."""
    embeddings = _embeddings(model.module if isinstance(model, nn.parallel.DistributedDataParallel)
                             else model)
    norm = getattr(embeddings, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError("SiFT needs a model whose embedding sum is followed by a LayerNorm "
                         "(a post-LN model, as BERT and DeBERTa); this model's embeddings "
                         "have no norm")
    return norm


def _check_number(name: str, value: float, *, positive: bool = False) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value)
            or math.isinf(value) or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")


# -- the passes ---------------------------------------------------------------------------------

def normalised_forward(model: nn.Module, batch: dict[str, Any], eps: float = 1e-7):
    """The clean pass through ``LN₀``: ``(output, x̂)`` with ``x̂`` the normalised embedding
    sum (not detached: the task loss trains the embeddings through it)."""
    captured = {}

    def normalise(x):
        captured["x_hat"] = layer_norm_0(x, eps)
        return captured["x_hat"]

    with transformed(model, SITE, normalise):
        output = model(**model_inputs(batch))
    return output, captured["x_hat"]


def forward_at(model: nn.Module, batch: dict[str, Any], x_hat: torch.Tensor,
               delta: torch.Tensor):
    """A perturbed pass: the embedding sum is replaced by ``sg(x̂) + δ``."""
    if delta.shape != x_hat.shape:
        raise ValueError(f"delta must have x_hat's shape {tuple(x_hat.shape)}, "
                         f"got {tuple(delta.shape)}")
    fixed = x_hat.detach()

    def replace(x):
        # In float32 at least (the code adds a float32 δ), in float64 for a float64 model.
        dtype = torch.promote_types(fixed.dtype, delta.dtype)
        return (fixed.to(dtype) + delta.to(dtype)).to(x.dtype)

    with transformed(model, SITE, replace):
        return model(**model_inputs(batch))


# -- the method ---------------------------------------------------------------------------------

@dataclass
class SiFT:
    """Scale-invariant fine-tuning as a loss step of :func:`tutorial_lib.training.loop.train`.

    ``alpha`` is the code's ``vat_lambda`` (its default 0 turns SiFT off; every shipped
    SiFT configuration uses 5 but DeBERTa-v3-xsmall's 3), ``step_size`` its
    ``vat_learning_rate`` (1e-4), ``init_std`` its ``vat_init_perturbation`` (1e-2),
    ``layer_norm_eps`` the eps of ``LN₀`` (1e-7). ``ascent=False`` keeps the initial noise
    and skips the ascent step ("noise only"). ``loss`` is ``"symmetric_kl"`` (the
    authors', :func:`code_symmetric_kl`) or ``"mse"`` (for a one-logit head).

    Cost per step: three forward passes, a backward pass to ``δ`` only (the ascent), and
    the final backward pass, which runs through both the clean and the perturbed forward
    pass (``ascent=False``: two forward passes, the final backward).
    """

    alpha: float = 5.0
    step_size: float = 1e-4
    init_std: float = 1e-2
    ascent: bool = True
    loss: str = "symmetric_kl"
    layer_norm_eps: float = 1e-7

    def __post_init__(self):
        _check_number("alpha", self.alpha)
        _check_number("step_size", self.step_size)
        _check_number("init_std", self.init_std)
        _check_number("layer_norm_eps", self.layer_norm_eps, positive=True)
        if not isinstance(self.ascent, bool):
            raise ValueError(f"ascent must be True or False, got {self.ascent!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def divergence(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The penalty between perturbed ``logits`` and clean ``target``, a mean over rows."""
        if self.loss == "mse":
            return _mse(logits, target)
        if logits.shape[-1] == 1:
            raise ValueError("loss='symmetric_kl' is identically 0 for a model with one logit "
                             "(a regression head: the softmax of one class is 1); use loss='mse'")
        return code_symmetric_kl(logits, target).mean()

    def adversarial_delta(self, model: nn.Module, batch: dict[str, Any], clean_logits: torch.Tensor,
                          x_hat: torch.Tensor) -> torch.Tensor:
        """``δ`` (detached): the clamped initial noise, plus the ascent step unless
        ``ascent=False``. ``δ₀`` is drawn with the global generator."""
        mask = token_mask(batch).to(x_hat.device)
        # Drawn in float32 as the code does; kept in float64 for a float64 model.
        dtype = torch.promote_types(torch.float32, x_hat.dtype)
        delta = (initial_delta(x_hat.shape, self.init_std, device=x_hat.device) * mask).to(dtype)
        if not self.ascent:
            return delta
        delta.requires_grad_()
        logits = _logits(forward_at(model, batch, x_hat, delta))
        (gradient,) = torch.autograd.grad(self.ascent_objective(logits, clean_logits.detach()),
                                          delta)
        return (ascent_step(delta.detach(), gradient, self.step_size) * mask).detach()

    def ascent_objective(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """What the ascent step climbs: as the code, the symmetric KL *summed* over rows
        (the mean squared error is a mean already). The sum matters: the step divides the
        gradient by ``1e-6 + max|g|``, and per-token gradients of a mean over rows are
        often of the order of that 1e-6, which would shrink the step many times."""
        if self.loss == "mse":
            return _mse(logits, target)
        self.divergence(logits, target)  # refuses a one-logit head by name
        return code_symmetric_kl(logits, target).sum()

    def penalty(self, model: nn.Module, batch: dict[str, Any], clean_logits: torch.Tensor,
                x_hat: torch.Tensor) -> torch.Tensor:
        """``sym(z_δ, z)``: its gradient flows into the perturbed pass (all parameters but
        the embedding tables, which ``sg(x̂)`` cuts off) and into the clean logits."""
        delta = self.adversarial_delta(model, batch, clean_logits, x_hat)
        return self.divergence(_logits(forward_at(model, batch, x_hat, delta)), clean_logits)

    def __call__(self, model, batch):
        require_embedding_norm(model)
        output, x_hat = normalised_forward(model, batch, self.layer_norm_eps)
        loss = _loss(output)
        penalty = self.penalty(model, batch, _logits(output), x_hat)
        return loss + self.alpha * penalty, {"clean_loss": loss.detach(),
                                             "sift_penalty": penalty.detach()}


__all__ = ["LOSSES", "SiFT", "ascent_step", "code_symmetric_kl", "forward_at", "initial_delta",
           "layer_norm_0", "normalised_forward", "require_embedding_norm", "symmetric_kl"]
