"""Evaluation helpers shared by the chapters: fixed evaluation batches and metrics.

Evaluation batches are collated once with a fixed seed, so every evaluation of
every model sees the same masked positions; metrics are weighted by the number
of targets, not averaged per batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from numbers import Integral
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tutorial_lib.core.model import IGNORE_INDEX


def fixed_batches(examples: Sequence[Any], collate_fn: Callable, batch_size: int,
                  seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Collate ``examples`` in order into batches; a seeded generator drives any randomness."""
    if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (an integer), got {batch_size!r}")
    if not isinstance(seed, Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not callable(collate_fn):
        raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
    if isinstance(examples, (str, bytes, Mapping)) or not (
            hasattr(examples, "__len__") and hasattr(examples, "__getitem__")):
        raise TypeError(f"examples must be a sequence of examples, "
                        f"got {type(examples).__name__}")
    if not len(examples):
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


def _labelled_batches(batches: Any, caller: str):
    """Each batch (a dict of tensors with ``labels``) of a list of batches, in order."""
    if isinstance(batches, (dict, str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{caller}: batches must be a list of collated batches (dicts), "
                        f"got {type(batches).__name__}")
    for index, batch in enumerate(batches):
        if not isinstance(batch, dict) or not torch.is_tensor(batch.get("labels")):
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"{caller}: batches[{index}] must be a dict with a 'labels' "
                             f"tensor, got {found}")
        yield batch


@torch.no_grad()
def masked_lm_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]
                      ) -> dict[str, float]:
    """Loss (nats) and accuracy over the masked tokens of ``batches``."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    for batch in _labelled_batches(batches, "masked_lm_metrics"):
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
    """Accuracy and mean cross-entropy of a classifier over ``batches``.

    Rows labelled -100 are left out, as the loss leaves them out.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total_loss, correct, count = 0.0, 0, 0
    for batch in _labelled_batches(batches, "classification_metrics"):
        if batch["labels"].is_floating_point():
            raise TypeError("classification_metrics needs integer class labels, got "
                            f"{batch['labels'].dtype} labels (a regression head's scores?)")
        batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
        labelled = batch["labels"] != IGNORE_INDEX
        n = int(labelled.sum())
        if n == 0:
            continue
        output = model(**batch)
        total_loss += float(output.loss) * n
        correct += int(((output.logits.argmax(-1) == batch["labels"]) & labelled).sum())
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("classification_metrics: the batches contain no labelled example")
    return {"accuracy": correct / count, "loss": total_loss / count, "examples": count}
