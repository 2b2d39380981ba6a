"""A stand-in MLM and its collator for the training-loop tests (no dependency on model.py).

The stand-in mixes information across positions (a masked mean), uses dropout and takes
the batch keys every model in the library takes, so padding, masking and RNG handling
are exercised the way a real MLM would exercise them, in milliseconds per step. The
subprocess workers of the DDP and SIGKILL tests import it too (``tests/`` is their
``sys.path[0]``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 40
MASK_ID = 1


class StandInMLM(nn.Module):
    """Embedding → masked-mean context mixing → LayerNorm → dropout → vocabulary logits."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, vocab: int = VOCAB):
        super().__init__()
        self.config = {"vocab_size": vocab, "hidden_size": hidden, "dropout": dropout}
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)  # (batch, seq, hidden)
        weights = attention_mask[..., None].float()  # (batch, seq, 1)
        context = (h * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        logits = self.out(self.dropout(self.norm(h + torch.tanh(self.mix(context)))))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def make_examples(count: int = 64, seed: int = 0, lengths: tuple[int, int] = (3, 14),
                  vocab: int = VOCAB) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(2, vocab, (n,), generator=generator).tolist()} for n in sizes]


def mlm_collate(examples, generator=None):
    """Pad to the longest example, then mask 30% of the real tokens (all randomness from generator)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, :len(example["input_ids"])] = 1
    chosen = (torch.rand(ids.shape, generator=generator) < 0.3) & (mask == 1)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(chosen, torch.full_like(ids, MASK_ID), ids),
            "attention_mask": mask, "labels": labels}
