"""Evaluation helpers shared by the chapters: fixed evaluation batches and metrics.

Evaluation batches are collated once with a fixed seed, so every evaluation of
every model sees the same masked positions; metrics are weighted by the number
of targets, not averaged per batch.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tutorial_lib.core.model import IGNORE_INDEX


def fixed_batches(examples: Sequence[Any], collate_fn: Callable, batch_size: int,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Collate ``examples`` in order into batches; a seeded generator drives any randomness."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    generator = torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(collate_fn).parameters
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        batches.append(collate_fn(chunk, generator=generator) if takes_generator
                       else collate_fn(chunk))
    return batches


def fixed_mlm_batches(examples: Sequence[Any], collator: Callable, batch_size: int = 64,
                      seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """MLM evaluation batches whose masking is fixed by ``seed``."""
    return fixed_batches(examples, collator, batch_size, seed)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def masked_lm_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
                      ) -> dict[str, float]:
    """Loss (nats) and accuracy over the masked tokens of ``batches``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        labels = batch["labels"]
        targets = labels != IGNORE_INDEX
        n = int(targets.sum())
        if n == 0:
            continue
        output = model(**batch)
        total_loss += float(output.loss) * n
        # Dense logits are (batch, seq, vocab); sparse ones already (n_masked, vocab).
        predicted = output.logits.argmax(-1)
        predicted = predicted[targets] if predicted.dim() == 2 else predicted
        correct += int((predicted == labels[targets]).sum())
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("the batches contain no masked tokens")
    return {"mlm_loss": total_loss / count, "mlm_accuracy": correct / count,
            "masked_tokens": count}


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
                           ) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier over ``batches``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        output = model(**batch)
        n = batch["labels"].shape[0]
        total_loss += float(output.loss) * n
        correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
        count += n
    model.train(was_training)
    return {"accuracy": correct / count, "loss": total_loss / count, "examples": count}
