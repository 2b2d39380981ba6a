r"""Adversarial training in embedding space: FGM, PGD, FreeLB, VAT and ALUM/SMART.

Chapter 1. Miyato, Dai and Goodfellow, "Adversarial Training Methods for
Semi-Supervised Text Classification" (ICLR 2017: FGM on word embeddings; VAT);
Madry et al. (ICLR 2018: PGD); Zhu et al., "FreeLB" (ICLR 2020); Liu et al., "ALUM"
(2020) and Jiang et al., "SMART" (ACL 2020). All of them approximate

.. math:: \min_\theta \; \mathbb E_{(x, y)} \max_{\lVert\delta\rVert \le \varepsilon}
          L(\theta;\, E(x) + \delta,\, y)

with a few gradient steps on :math:`\delta`. Paper vs. code: ALUM's paper projects
:math:`\delta` back into the ball, its released code (and ``smart-pytorch``)
normalises it per token instead (``projection="paper" | "code"``, below).

Every method perturbs the output of one module, its *perturbation site*, by a tensor
``δ`` of shape ``(batch, seq, hidden)`` through a forward hook, so it works with any
model of the library (and any model converted from Hugging Face) without editing it.
A method's ``where`` names the site; the registry :data:`SITES` maps each name to a
function ``locate(model) -> nn.Module`` that finds the module in a model. Built in:

* ``where="word_embeddings"``: ``δ`` is added to the token embeddings, before the
  positions, token types and LayerNorm (FGM, PGD and FreeLB as their papers do it);
* ``where="embedding_sum"``: ``δ`` is added to the sum of the token, position and
  token-type embeddings, just before the embedding LayerNorm
  (``Embeddings.embedding_sum``). For an additive ``δ`` this is the same as
  ``"word_embeddings"``; it is the site for a technique that transforms the sum itself
  (SiFT normalises it before perturbing);
* ``where="embedding_output"``: ``δ`` is added to what the embedding layer hands to
  the first block, after LayerNorm and dropout (ALUM and SMART).

A technique adds a site with :func:`register_perturbation_site` (``name`` and
``locate``); every method then accepts ``where=name``.

Each method is a *loss step* for :func:`tutorial_lib.training.loop.train`: called as
``method(model, batch)``, it returns ``(loss, logs)``, and one ``loss.backward()``
gives the method's parameter gradient. ``δ`` is always zero at padding positions.

Norms (``norm``): ``"l2"`` is the Frobenius norm of one example's ``δ`` over its real
tokens; ``"linf"`` is the per-token L∞ norm, whose ball is a box ``|δ| ≤ ε``.
ALUM's ``projection`` chooses between the paper (project ``δ`` back into the ε-ball)
and the authors' code (normalise ``δ ← δ / (‖δ‖∞ + γ)`` per token).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.data.batching import model_inputs

NORMS = ("l2", "linf")
PROJECTIONS = ("paper", "code")


# -- where the perturbation goes -------------------------------------------------------

# The perturbation sites by name: ``locate(model)`` returns the module whose output δ
# is added to (``model`` is never a DistributedDataParallel wrapper). Filled below and
# by register_perturbation_site; iterating it gives the names, in registration order.
SITES: dict[str, Callable[[nn.Module], nn.Module]] = {}


def register_perturbation_site(name: str, locate: Callable[[nn.Module], nn.Module]):
    """Make ``where=name`` add ``δ`` to the output of the module ``locate(model)``.

    That output must have the shape of ``δ``, (batch, seq, hidden). Returns ``locate``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(locate):
        raise TypeError(f"locate must be callable as locate(model) -> nn.Module, "
                        f"got {type(locate).__name__}")
    SITES[name] = locate
    return locate


def _check_where(where: str) -> None:
    if not isinstance(where, str) or where not in SITES:
        raise ValueError(f"where must be one of {tuple(SITES)}, got {where!r}")


def _embeddings(model: nn.Module) -> nn.Module:
    """``model.encoder.embeddings`` (or ``model.embeddings`` for a bare encoder)."""
    encoder = getattr(model, "encoder", model)
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "word_embeddings"):
        raise TypeError(f"model must be a tutorial_lib model with encoder.embeddings, "
                        f"got {type(model).__name__}")
    return embeddings


def _embedding_sum(model: nn.Module) -> nn.Module:
    """The identity module applied to the embedding sum, before the embedding LayerNorm."""
    site = getattr(_embeddings(model), "embedding_sum", None)
    if not isinstance(site, nn.Module):
        raise TypeError(f"model's embeddings have no embedding_sum module (the sum before "
                        f"the embedding LayerNorm), got {type(model).__name__}")
    return site


register_perturbation_site("word_embeddings", lambda model: _embeddings(model).word_embeddings)
register_perturbation_site("embedding_output", _embeddings)
register_perturbation_site("embedding_sum", _embedding_sum)


def perturbation_site(model: nn.Module, where: str) -> nn.Module:
    """The module whose output ``δ`` is added to."""
    _check_where(where)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # the hook goes on the wrapped model's module
    site = SITES[where](model)
    if not isinstance(site, nn.Module):
        raise TypeError(f"perturbation site {where!r} must locate an nn.Module, "
                        f"got {type(site).__name__}")
    return site


@contextlib.contextmanager
def transformed(model: nn.Module, where: str, transform: Callable[[torch.Tensor], torch.Tensor]):
    """Inside the block, the site's output is replaced by ``transform(output)``.

    The general form of :func:`perturbed`, for a technique that changes the site's
    output in another way than adding ``δ`` (SiFT normalises the embedding sum first).
    ``transform`` must return a tensor of the output's shape.
    """
    def apply(module, inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(f"the {where} site's output must be a tensor, "
                            f"got {type(output).__name__}")
        result = transform(output)
        if not torch.is_tensor(result) or result.shape != output.shape:
            shape = tuple(result.shape) if torch.is_tensor(result) else type(result).__name__
            raise ValueError(f"the transform of the {where} output must keep its shape "
                             f"{tuple(output.shape)}, got {shape}")
        return result

    handle = perturbation_site(model, where).register_forward_hook(apply)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def perturbed(model: nn.Module, delta: torch.Tensor, where: str):
    """Inside the block, the site's output is ``output + δ``."""
    def add_delta(output):
        if output.shape != delta.shape:
            raise ValueError(f"delta has shape {tuple(delta.shape)}, the {where} output "
                             f"{tuple(output.shape)}")
        return output + delta.to(output.dtype)

    with transformed(model, where, add_delta):
        yield


def forward_with(model: nn.Module, batch: dict[str, Any], delta: torch.Tensor | None,
                 where: str):
    """The model's output on ``batch`` with ``δ`` added at ``where`` (None: clean)."""
    if delta is None:
        return model(**model_inputs(batch))
    with perturbed(model, delta, where):
        return model(**model_inputs(batch))


def zero_delta(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """A zero ``δ`` of the embedding output's shape, (batch, seq, hidden)."""
    ids = batch["input_ids"]
    table = perturbation_site(model, "word_embeddings")  # (vocab, hidden); checks the model
    return torch.zeros(*ids.shape, table.embedding_dim, device=ids.device, dtype=table.weight.dtype)


def token_mask(batch: dict[str, Any]) -> torch.Tensor:
    """(batch, seq, 1): 1 at real tokens, 0 at padding."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    return mask[..., None].float()


# -- norms, steps and projections ----------------------------------------------------------

def delta_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per example (``l2``: shape (batch, 1, 1)) or per token (``linf``: (batch, seq, 1))."""
    if norm == "l2":
        return delta.flatten(1).norm(dim=1)[:, None, None]
    if norm == "linf":
        return delta.abs().amax(dim=-1, keepdim=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def ascent_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm``: ``g/‖g‖₂`` or ``sign(g)``.

    For L2 this is the gradient scaled to unit Frobenius norm per example; for the
    per-token L∞ ball the linearised maximum sits at a corner of the box, ``sign(g)``.
    """
    if norm == "l2":
        return gradient / delta_norm(gradient, "l2").clamp_min(1e-12)
    if norm == "linf":
        return gradient.sign()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """The closest point of the ε-ball: rescale (L2) or clip every coordinate (L∞)."""
    if norm == "l2":
        scale = (epsilon / delta_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        return delta * scale
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def code_normalise(delta: torch.Tensor, gamma: float) -> torch.Tensor:
    """The authors' ALUM/SMART "projection": ``δ / (‖δ‖∞ + γ)`` per token (not into ε)."""
    return delta / (delta_norm(delta, "linf") + gamma)


# -- divergences ---------------------------------------------------------------------------

def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(logits)), summed over classes, mean over rows.

    Computed in float32 at least (float64 inputs stay float64)."""
    # At least float32 (bf16/fp16 logits are upcast); float64 stays float64, so that
    # the tiny divergences of small perturbations can be checked exactly.
    dtype = torch.promote_types(torch.promote_types(target_logits.dtype, logits.dtype), torch.float32)
    target_log_p = target_logits.to(dtype).log_softmax(-1)
    log_p = logits.to(dtype).log_softmax(-1)
    rows = target_log_p.numel() // target_log_p.shape[-1]
    return (target_log_p.exp() * (target_log_p - log_p)).sum() / rows


def symmetric_kl(adversarial_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """ALUM's ``ℓ_sKL``: KL(clean ‖ adv) + KL(adv ‖ clean), each target detached.

    The gradient of the first term flows through the adversarial logits, that of the
    second through the clean ones (as in the authors' code and ``smart-pytorch``).
    """
    return (kl_divergence(clean_logits.detach(), adversarial_logits)
            + kl_divergence(adversarial_logits.detach(), clean_logits))


def _logits(output) -> torch.Tensor:
    logits = output["logits"] if isinstance(output, dict) else output.logits
    if logits is None:
        raise ValueError("the model returned no logits; adversarial losses need them")
    return logits


def _loss(output) -> torch.Tensor:
    loss = output["loss"] if isinstance(output, dict) else output.loss
    if loss is None:
        raise ValueError("the batch has no labels, so the model returned no loss")
    return loss


def _check(name: str, value: float, *, positive: bool = False) -> None:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (positive and value == 0):
        expected = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a number {expected}, got {value!r}")


def _check_weight(value: float) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"adv_weight must be a number in [0, 1], got {value!r}")


def _check_common(where: str, norm: str | None = None) -> None:
    _check_where(where)
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


# -- one backward for two gradients ------------------------------------------------------------

def loss_and_gradients(model: nn.Module, loss: torch.Tensor, delta: torch.Tensor,
                       weight: float = 1.0):
    """``∂loss/∂δ`` and ``weight · ∂loss/∂θ`` from one backward pass.

    A method that needs the gradient with respect to ``δ`` *and* the parameter
    gradient of the same loss (FGM's clean pass, each FreeLB step) gets both here,
    instead of a second backward through the same graph later.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    delta_gradient, *gradients = torch.autograd.grad(loss, [delta, *parameters], allow_unused=True)
    return delta_gradient, [(p, weight * g) for p, g in zip(parameters, gradients) if g is not None]


def carry_gradients(value: torch.Tensor, gradients) -> torch.Tensor:
    """A tensor equal to ``value`` whose backward adds the given parameter gradients.

    ``Σ θ·g − stop_grad(Σ θ·g)`` is zero, and its gradient with respect to ``θ`` is
    ``g``: returning it from a loss step lets the training loop's single
    ``backward()`` (with its gradient-accumulation weights and loss scaling) apply
    gradients that were already computed, at the price of one multiply per weight.
    """
    carrier = sum((p * g.detach()).sum() for p, g in gradients)
    if not torch.is_tensor(carrier):
        return value
    return value + (carrier - carrier.detach())


# -- the methods ---------------------------------------------------------------------------

@dataclass
class FGM:
    """Fast gradient method (Miyato et al., 2017): one linearised worst case.

    ``δ = ε · g/‖g‖₂`` (or ``ε · sign(g)`` for L∞, FGSM) with ``g = ∇_δ L`` at ``δ = 0``;
    the loss is ``(1 − a)·L(x) + a·L(x + δ)`` with ``δ`` a constant and ``a =
    adv_weight`` (½ in Goodfellow et al., 2015), so ``ε = 0`` is plain training.
    """

    epsilon: float = 1.0
    norm: str = "l2"
    where: str = "word_embeddings"
    adv_weight: float = 0.5

    def __post_init__(self):
        _check("epsilon", self.epsilon)
        _check_weight(self.adv_weight)
        _check_common(self.where, self.norm)

    def __call__(self, model, batch):
        delta = zero_delta(model, batch).requires_grad_()
        clean = _loss(forward_with(model, batch, delta, self.where))
        # One backward gives the ascent direction and the clean part of the gradient.
        gradient, clean_gradients = loss_and_gradients(model, clean, delta, 1 - self.adv_weight)
        delta = (self.epsilon * ascent_direction(gradient, self.norm) * token_mask(batch)).detach()
        adversarial = _loss(forward_with(model, batch, delta, self.where))
        value = (1 - self.adv_weight) * clean.detach() + self.adv_weight * adversarial
        return carry_gradients(value, clean_gradients), {"clean_loss": clean.detach(),
                                                         "adv_loss": adversarial.detach()}


@dataclass
class PGD:
    """Projected gradient ascent, K steps (Madry et al., 2018), on the task loss.

    ``δ ← Π_ε(δ + η · direction(∇_δ L))``; the loss is ``(1 − a)·L(x) + a·L(x + δ_K)``
    with ``a = adv_weight``: ½ mixes clean and adversarial examples as FGM does, 1 is
    Madry's adversarial-only objective.
    """

    epsilon: float = 1.0
    step_size: float = 0.3
    steps: int = 3
    norm: str = "l2"
    where: str = "word_embeddings"
    random_start: bool = False
    adv_weight: float = 0.5

    def __post_init__(self):
        _check("epsilon", self.epsilon)
        _check("step_size", self.step_size)
        _check_weight(self.adv_weight)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        _check_common(self.where, self.norm)

    def attack(self, model, batch, loss_fn: Callable | None = None) -> torch.Tensor:
        """The final ``δ`` (detached). ``loss_fn(output)`` defaults to the model's loss."""
        loss_fn = loss_fn or _loss
        mask = token_mask(batch)
        delta = zero_delta(model, batch)
        if self.random_start:
            delta = project(torch.empty_like(delta).uniform_(-1, 1) * self.epsilon * mask,
                            self.epsilon, self.norm)
        for _ in range(self.steps):
            delta.requires_grad_()
            loss = loss_fn(forward_with(model, batch, delta, self.where))
            (gradient,) = torch.autograd.grad(loss, delta)  # δ only: no weight gradients
            step = delta + self.step_size * ascent_direction(gradient, self.norm)
            delta = (project(step, self.epsilon, self.norm) * mask).detach()
        return delta

    def __call__(self, model, batch):
        delta = self.attack(model, batch)
        adversarial = _loss(forward_with(model, batch, delta, self.where))
        logs = {"adv_loss": adversarial.detach()}
        if self.adv_weight == 1:
            return adversarial, logs
        clean = _loss(forward_with(model, batch, None, self.where))
        logs["clean_loss"] = clean.detach()
        return (1 - self.adv_weight) * clean + self.adv_weight * adversarial, logs


@dataclass
class FreeLB:
    """FreeLB (Zhu et al., 2020): K ascent steps whose parameter gradients are averaged.

    ``δ₀`` is uniform noise of L2 norm ``init_magnitude`` per example (scaled as in the
    authors' code by ``1/√(tokens · hidden)``); step t uses ``L(x + δ_{t−1}) / K`` and
    moves ``δ ← Π_ε(δ + η · g/‖g‖₂)``. ``epsilon=None`` leaves δ unbounded (the code's
    ``adv_max_norm=0``). The returned loss is the mean of the K losses, so its gradient
    is the mean of the K per-step parameter gradients.
    """

    steps: int = 3
    step_size: float = 0.1
    epsilon: float | None = 1.0
    init_magnitude: float = 0.0
    where: str = "word_embeddings"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        _check("step_size", self.step_size)
        _check("init_magnitude", self.init_magnitude)
        if self.epsilon is not None:
            _check("epsilon", self.epsilon)
        _check_common(self.where)

    def _project(self, delta):
        return delta if self.epsilon is None else project(delta, self.epsilon, "l2")

    def __call__(self, model, batch):
        mask = token_mask(batch)
        delta = zero_delta(model, batch)
        if self.init_magnitude > 0:
            tokens = mask.sum(dim=(1, 2), keepdim=True)  # (batch, 1, 1)
            scale = self.init_magnitude / torch.sqrt(tokens * delta.shape[-1])
            delta = self._project(torch.empty_like(delta).uniform_(-1, 1) * mask * scale)
        losses, accumulated = [], {}
        for _ in range(self.steps):
            delta = delta.detach().requires_grad_()
            loss = _loss(forward_with(model, batch, delta, self.where))
            losses.append(loss.detach())
            # One backward per step: the ascent direction and this step's share (1/K)
            # of the parameter gradient, as in the authors' code.
            gradient, step_gradients = loss_and_gradients(model, loss, delta, 1 / self.steps)
            for parameter, g in step_gradients:
                key = id(parameter)
                accumulated[key] = (parameter, accumulated[key][1] + g if key in accumulated else g)
            delta = (self._project(delta + self.step_size * ascent_direction(gradient, "l2")) * mask).detach()
        value = torch.stack(losses).mean()
        return carry_gradients(value, accumulated.values()), {"first_loss": losses[0],
                                                               "last_loss": losses[-1]}


@dataclass
class VAT:
    """Virtual adversarial training (Miyato et al., 2019): no labels in the penalty.

    ``r = ξ·d`` with random unit ``d``; K power-iteration steps ``d ← ∇_r KL(p(x) ‖
    p(x + r))`` normalised; the penalty is ``KL(p(x) ‖ p(x + ε·d))`` with ``p(x)``
    fixed. The loss is ``L(x) + α · penalty`` (``L`` dropped if the batch has no labels).
    """

    epsilon: float = 1.0
    xi: float = 1e-6
    alpha: float = 1.0
    steps: int = 1
    where: str = "word_embeddings"

    def __post_init__(self):
        _check("epsilon", self.epsilon)
        _check("xi", self.xi, positive=True)
        _check("alpha", self.alpha)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        _check_common(self.where)

    def __call__(self, model, batch):
        mask = token_mask(batch)
        output = forward_with(model, batch, None, self.where)
        clean_logits = _logits(output).detach()
        direction = ascent_direction(torch.randn_like(zero_delta(model, batch)) * mask, "l2")
        for _ in range(self.steps):
            r = (self.xi * direction).requires_grad_()
            divergence = kl_divergence(clean_logits, _logits(forward_with(model, batch, r, self.where)))
            (gradient,) = torch.autograd.grad(divergence, r)
            direction = ascent_direction(gradient * mask, "l2").detach()
        penalty = kl_divergence(clean_logits,
                                _logits(forward_with(model, batch, self.epsilon * direction, self.where)))
        loss = output["loss"] if isinstance(output, dict) else output.loss
        logs = {"vat_penalty": penalty.detach()}
        if loss is None:
            return self.alpha * penalty, logs
        logs["clean_loss"] = loss.detach()
        return loss + self.alpha * penalty, logs


@dataclass
class ALUM:
    """ALUM / SMART (Liu et al., 2020; Jiang et al., 2020): a symmetric-KL smoothness term.

    ``δ₀ ~ noise_std · N(0, I)``; K ascent steps on ``KL(p(x) ‖ p(x + δ))`` (clean side
    fixed), each ``δ ← δ + η·g`` followed by the paper's projection (``g`` normalised by
    its per-token L∞ norm, then ``Π_ε``) or the code's normalisation ``δ/(‖δ‖∞ + γ)``;
    the loss is ``L(x) + α · ℓ_sKL(p(x + δ_K), p(x))``.
    """

    alpha: float = 1.0
    epsilon: float = 1e-5
    step_size: float = 1e-3
    noise_std: float = 1e-5
    steps: int = 1
    projection: str = "paper"
    norm: str = "linf"
    gamma: float = 1e-6
    where: str = "embedding_output"

    def __post_init__(self):
        for name in ("alpha", "epsilon", "step_size", "noise_std"):
            _check(name, getattr(self, name))
        _check("gamma", self.gamma, positive=True)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        _check_common(self.where, self.norm)

    def _update(self, delta, gradient):
        if self.projection == "code":
            return code_normalise(delta + self.step_size * gradient, self.gamma)
        direction = gradient / (delta_norm(gradient, self.norm) + self.gamma)
        return project(delta + self.step_size * direction, self.epsilon, self.norm)

    def adversarial_delta(self, model, batch, clean_logits: torch.Tensor) -> torch.Tensor:
        """``δ_K`` (detached), from ``δ₀`` drawn with the global generator."""
        mask = token_mask(batch)
        delta = torch.randn_like(zero_delta(model, batch)) * self.noise_std * mask
        for _ in range(self.steps):
            delta = delta.detach().requires_grad_()
            adversarial = _logits(forward_with(model, batch, delta, self.where))
            divergence = kl_divergence(clean_logits.detach(), adversarial)
            (gradient,) = torch.autograd.grad(divergence, delta)
            delta = self._update(delta, gradient) * mask
        return delta.detach()

    def smoothness(self, model, batch, clean_logits: torch.Tensor) -> torch.Tensor:
        """``ℓ_sKL(p(x + δ_K), p(x))``; gradients flow into both forward passes."""
        delta = self.adversarial_delta(model, batch, clean_logits)
        adversarial = _logits(forward_with(model, batch, delta, self.where))
        return symmetric_kl(adversarial, clean_logits)

    def __call__(self, model, batch):
        output = forward_with(model, batch, None, self.where)
        penalty = self.smoothness(model, batch, _logits(output))
        loss = _loss(output)
        return loss + self.alpha * penalty, {"clean_loss": loss.detach(),
                                             "adv_penalty": penalty.detach()}


# -- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def _accuracy(logits, labels):
    return (logits.argmax(-1) == labels).float().sum().item()


def attacked_accuracy(model: nn.Module, batches, attack: PGD) -> dict[str, float]:
    """Clean accuracy and accuracy under ``attack`` (a :class:`PGD`) on labelled batches.

    The attack maximises the cross-entropy of the true label; the model is put in
    evaluation mode (no dropout) and restored afterwards.
    """
    was_training = model.training
    model.eval()
    clean = attacked = total = 0.0
    try:
        for batch in batches:
            labels = batch["labels"]
            with torch.no_grad():
                clean += _accuracy(_logits(forward_with(model, batch, None, attack.where)), labels)
            with torch.enable_grad():
                delta = attack.attack(model, batch,
                                      loss_fn=lambda out: F.cross_entropy(_logits(out).float(), labels))
            with torch.no_grad():
                attacked += _accuracy(_logits(forward_with(model, batch, delta, attack.where)), labels)
            total += labels.numel()
    finally:
        model.train(was_training)
    return {"accuracy": clean / total, "attacked_accuracy": attacked / total}
