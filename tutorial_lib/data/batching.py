"""Examples and collators: from token ids to padded batches of tensors.

An example is a plain dict (``{"input_ids": [...], ...}``) and a data set is a list of
them, so any list works as a map-style ``torch.utils.data.Dataset``. A collator turns
a list of examples into a batch, a dict of tensors with the keys the models read:

* ``input_ids``: long ``(batch, length)``, padded on the right to the batch's longest;
* ``attention_mask``: long ``(batch, length)``, 1 for a token, 0 for padding (as in
  Hugging Face);
* ``token_type_ids`` (optional): long ``(batch, length)``, 0 on padding;
* ``labels``: for masked LM, the original id at the masked positions and -100
  elsewhere; for causal LM, ``input_ids`` with -100 on padding (the model shifts
  them itself); long ``(batch,)`` for classification, float ``(batch,)`` for regression.

Masking follows BERT (Devlin et al., 2019, section 3.1 and appendix A.1): each
ordinary token is chosen with probability 0.15, independently, as in Hugging Face's
``DataCollatorForLanguageModeling`` (BERT's own data script instead picks
``round(0.15 * length)`` positions per sequence); of the chosen ones 80% become
``[MASK]``, 10% a random token and 10% stay unchanged. Unlike BERT and Hugging Face,
which draw the random token from the whole vocabulary, it is drawn here from the
non-special tokens only, so no ``[CLS]`` or ``[PAD]`` ever appears inside a sentence.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, Sequence

import torch

from tutorial_lib.core.model import IGNORE_INDEX  # -100, the label the losses skip

# What each per-token key is padded with; input_ids use the tokenizer's pad id.
_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def _as_id_list(value: Any, name: str, *, allow_bool: bool = False) -> list[int]:
    """``value`` (a list of ints or a 1-D integer tensor) as a list of ints.

    Floats are refused, not truncated (``5.5`` is no id); so are bools, except where
    ``allow_bool`` (an attention mask).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        if value.is_floating_point() or value.is_complex() or \
                (value.dtype == torch.bool and not allow_bool):
            raise TypeError(f"{name} must hold integer ids, got a tensor of {value.dtype}")
        return value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of ints or a 1-D tensor, "
                        f"got {type(value).__name__}")
    items = list(value)
    if not all(type(item) is int for item in items):  # the common case costs one pass
        for position, item in enumerate(items):
            if not isinstance(item, Integral) or (isinstance(item, bool) and not allow_bool):
                raise TypeError(f"{name} must hold integer ids, got {item!r} at position "
                                f"{position}")
        items = [int(item) for item in items]
    return items


def _is_scalar(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, (Integral, Real))


def pad_batch(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack ``examples`` into a batch, padding on the right to the longest sequence.

    ``input_ids`` is padded with ``pad_id``, ``token_type_ids`` and ``attention_mask``
    with 0, per-token ``labels`` with -100; ``attention_mask`` is built when absent.
    A scalar value (e.g. ``"label": 1``) becomes a ``(batch,)`` tensor, long for ints
    and float32 for floats.
    """
    if isinstance(examples, dict) or not isinstance(examples, Sequence) or not examples:
        raise ValueError("examples must be a non-empty list of dicts")
    if not isinstance(pad_id, Integral) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
    if not isinstance(examples[0], dict) or "input_ids" not in examples[0]:
        raise ValueError(f"every example must be a dict that has 'input_ids', "
                         f"got {examples[0]!r:.80}")
    keys = list(examples[0])  # the first example's key order, for a stable batch order
    lengths = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict) or set(example) != set(keys):
            found = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise ValueError(f"examples[{index}] must be a dict with the keys of examples[0] "
                             f"{sorted(keys)}, got {found}")
        length = len(_as_id_list(example["input_ids"], f"examples[{index}]['input_ids']"))
        if length == 0:
            raise ValueError(f"examples[{index}]['input_ids'] is empty; a sequence needs at "
                             "least one token")
        lengths.append(length)
    longest = max(lengths)

    batch = {}
    for key in keys:
        values = [example[key] for example in examples]
        if all(_is_scalar(value) for value in values):
            batch[key] = torch.tensor([v.item() if isinstance(v, torch.Tensor) else v
                                       for v in values])
            if batch[key].is_floating_point():
                batch[key] = batch[key].float()
            continue
        pad_value = pad_id if key == "input_ids" else _PAD_VALUES.get(key)
        if pad_value is None:
            raise ValueError(f"no padding value is known for the per-token key {key!r}; "
                             f"known keys: input_ids, {', '.join(_PAD_VALUES)}")
        rows = torch.full((len(examples), longest), pad_value, dtype=torch.long)
        for index, (value, length) in enumerate(zip(values, lengths)):
            row = _as_id_list(value, f"examples[{index}][{key!r}]",
                              allow_bool=key == "attention_mask")
            if len(row) != length:
                raise ValueError(f"examples[{index}][{key!r}] has {len(row)} items but "
                                 f"input_ids has {length}")
            rows[index, :length] = torch.tensor(row, dtype=torch.long)
        _check_values(rows, key)
        batch[key] = rows
    if "attention_mask" not in batch:
        positions = torch.arange(longest)  # (length,)
        batch["attention_mask"] = (positions[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


def _check_values(rows: torch.Tensor, key: str) -> None:
    """Refuse values no model takes: negative ids, masks other than 0/1, labels below 0
    other than -100. Ids beyond a vocabulary are the collator's to check."""
    if key == "attention_mask":
        wrong = (rows != 0) & (rows != 1)
        expected = "0 (padding) or 1 (token)"
    elif key == "labels":
        wrong = (rows < 0) & (rows != IGNORE_INDEX)
        expected = f"ids >= 0 or {IGNORE_INDEX} (ignored)"
    else:
        wrong = rows < 0
        expected = "ids >= 0"
    if bool(wrong.any()):
        row, column = (int(i) for i in wrong.nonzero()[0])
        raise ValueError(f"examples[{row}][{key!r}] must hold {expected}, got "
                         f"{int(rows[row, column])} at position {column}")


def _check_fraction(value: float, name: str, *, open_at_zero: bool = False) -> None:
    if not isinstance(value, Real) or isinstance(value, bool) or \
            not (0 < value <= 1 if open_at_zero else 0 <= value <= 1):
        interval = "(0, 1]" if open_at_zero else "[0, 1]"
        raise ValueError(f"{name} must be a probability in {interval}, got {value!r}")


class MLMCollator:
    """Pads examples and applies BERT's masking; see the module docstring.

    Every random draw comes from ``generator``, so a generator in the same state
    gives the same batch, whatever happened before (exact resumption). The draws
    cover the whole padded batch, so their number depends only on its shape.
    """

    def __init__(self, mask_id: int, vocab_size: int, special_ids: Iterable[int], pad_id: int,
                 mlm_probability: float = 0.15, mask_fraction: float = 0.8,
                 random_fraction: float = 0.1):
        if not isinstance(vocab_size, Integral) or isinstance(vocab_size, bool) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        for name, value in (("mask_id", mask_id), ("pad_id", pad_id)):
            if not isinstance(value, Integral) or isinstance(value, bool) \
                    or not 0 <= value < vocab_size:
                raise ValueError(f"{name} must be an id in [0, {vocab_size}), got {value!r}")
        if isinstance(special_ids, torch.Tensor):
            special_ids = special_ids.flatten().tolist()
        if isinstance(special_ids, (str, bytes)) or not isinstance(special_ids, Iterable):
            raise TypeError(f"special_ids must be an iterable of ids (ints), "
                            f"got {type(special_ids).__name__}")
        special_ids = list(special_ids)
        for value in special_ids:
            if not isinstance(value, Integral) or isinstance(value, bool) \
                    or not 0 <= value < vocab_size:
                raise ValueError(f"special_ids must hold ids in [0, {vocab_size}), "
                                 f"got {value!r}")
        _check_fraction(mlm_probability, "mlm_probability", open_at_zero=True)
        _check_fraction(mask_fraction, "mask_fraction")
        _check_fraction(random_fraction, "random_fraction")
        if mask_fraction + random_fraction > 1:
            raise ValueError(f"mask_fraction + random_fraction must be at most 1, got "
                             f"{mask_fraction} + {random_fraction}")
        # Padding and [MASK] are never prediction targets nor random replacements.
        self.special_ids = frozenset(int(i) for i in special_ids) | {int(mask_id), int(pad_id)}
        ordinary = [i for i in range(vocab_size) if i not in self.special_ids]
        if not ordinary:
            raise ValueError("special_ids must leave at least one ordinary token in the "
                             "vocabulary")
        self.mask_id, self.pad_id, self.vocab_size = int(mask_id), int(pad_id), int(vocab_size)
        self.mlm_probability = float(mlm_probability)
        self.mask_fraction = float(mask_fraction)
        self.random_fraction = float(random_fraction)
        self._special_tensor = torch.tensor(sorted(self.special_ids))
        self._ordinary_tensor = torch.tensor(ordinary)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **options: float) -> MLMCollator:
        """A collator with ``tokenizer``'s mask, pad and special ids and vocabulary size."""
        if tokenizer.mask_id is None or tokenizer.pad_id is None:
            raise ValueError("tokenizer must have a mask and a pad token for masked LM")
        return cls(tokenizer.mask_id, tokenizer.vocab_size, tokenizer.special_ids,
                   tokenizer.pad_id, **options)

    def __call__(self, examples: Sequence[dict],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be None or a torch.Generator, "
                            f"got {type(generator).__name__}")
        batch = pad_batch(examples, self.pad_id)
        input_ids = batch["input_ids"]  # (batch, length)
        if int(input_ids.max()) >= self.vocab_size:
            row, column = (int(i) for i in (input_ids >= self.vocab_size).nonzero()[0])
            raise ValueError(f"examples[{row}]['input_ids'] must hold ids in [0, vocab_size="
                             f"{self.vocab_size}), got {int(input_ids[row, column])} at "
                             f"position {column}")
        shape = input_ids.shape
        maskable = batch["attention_mask"].bool() & ~torch.isin(input_ids, self._special_tensor)
        selected = (torch.rand(shape, generator=generator) < self.mlm_probability) & maskable
        # One uniform draw per position splits the selected ones 80/10/10.
        action = torch.rand(shape, generator=generator)
        to_mask = selected & (action < self.mask_fraction)
        to_random = selected & (action >= self.mask_fraction) & (
            action < self.mask_fraction + self.random_fraction)
        random_ids = self._ordinary_tensor[
            torch.randint(len(self._ordinary_tensor), shape, generator=generator)]

        batch["labels"] = torch.where(selected, input_ids, IGNORE_INDEX)
        masked = torch.where(to_mask, self.mask_id, input_ids)
        batch["input_ids"] = torch.where(to_random, random_ids, masked)
        return batch


def causal_lm_blocks(token_ids: Sequence[int] | torch.Tensor,
                     block_size: int) -> list[dict[str, list[int]]]:
    """Cut a token stream into consecutive, non-overlapping blocks of ``block_size``.

    The ragged tail is dropped. Each example is ``{"input_ids": block, "labels":
    block}`` (a separate copy): the causal LM shifts the labels itself.
    """
    if not isinstance(block_size, Integral) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (a next-token target needs two "
                         f"tokens), got {block_size!r}")
    ids = _as_id_list(token_ids, "token_ids")
    if len(ids) < block_size:
        raise ValueError(f"token_ids has {len(ids)} tokens, fewer than one block of "
                         f"block_size={block_size}")
    return [{"input_ids": ids[start:start + block_size], "labels": ids[start:start + block_size]}
            for start in range(0, len(ids) - block_size + 1, block_size)]


def mlm_examples(lines: Iterable[str], tokenizer: Any, max_length: int) -> list[dict]:
    """Pack tokenised ``lines`` into ``[CLS] ... [SEP]`` sequences of at most ``max_length``.

    Consecutive lines share a sequence while they fit (no separator between them, as
    RoBERTa's FULL-SENTENCES packing); a line that does not fit starts a new one, and
    a line longer than ``max_length - 2`` tokens is cut into consecutive chunks, so no
    token is lost. Lines that encode to nothing are skipped.
    """
    if isinstance(lines, str):
        raise TypeError("lines must be an iterable of strings, not a single str")
    if tokenizer.cls_id is None or tokenizer.sep_id is None:
        raise ValueError("tokenizer must have cls and sep tokens to build MLM sequences")
    if not isinstance(max_length, Integral) or max_length < 3:
        raise ValueError(f"max_length must be an int >= 3 ([CLS], a token, [SEP]), "
                         f"got {max_length!r}")
    capacity = max_length - 2
    sequences: list[list[int]] = []
    current: list[int] = []
    for ids in tokenizer.encode_batch(list(lines), add_special_tokens=False):
        if current and len(current) + len(ids) > capacity:
            sequences.append(current)
            current = []
        while len(ids) > capacity:
            sequences.append(ids[:capacity])
            ids = ids[capacity:]
        current.extend(ids)
    if current:
        sequences.append(current)
    return [{"input_ids": [tokenizer.cls_id, *ids, tokenizer.sep_id]} for ids in sequences]


def classification_examples(texts: Sequence[str], labels: Sequence[int | float], tokenizer: Any,
                            max_length: int, pairs: Sequence[str] | None = None) -> list[dict]:
    """``{"input_ids", "token_type_ids", "label"}`` per text (and second sentence of ``pairs``).

    Sequences are truncated to ``max_length`` with the tokenizer's rule (the longer
    sentence of a pair first). Labels are kept as given: ints for classes, floats for
    regression scores.
    """
    for name, value in (("texts", texts), ("labels", labels), ("pairs", pairs)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a list, not a single str")
    texts, labels = list(texts), list(labels)
    if len(labels) != len(texts):
        raise ValueError(f"labels must have one item per text ({len(texts)}), got {len(labels)}")
    if pairs is not None:
        pairs = list(pairs)
        if len(pairs) != len(texts):
            raise ValueError(f"pairs must have one item per text ({len(texts)}), "
                             f"got {len(pairs)}")
    examples = []
    for index, (text, label) in enumerate(zip(texts, labels)):
        if not _is_scalar(label) or isinstance(label, bool) or (
                isinstance(label, torch.Tensor) and label.dtype == torch.bool):
            raise TypeError(f"labels[{index}] must be an int or a float, got {label!r}")
        if not math.isfinite(float(label)):
            raise ValueError(f"labels[{index}] must be finite, got {label!r}")
        ids, types = tokenizer.encode_with_types(
            text, None if pairs is None else pairs[index], max_length)
        examples.append({"input_ids": ids, "token_type_ids": types, "label": label})
    return examples


class ClassificationCollator:
    """Pads examples with a ``"label"`` into a batch with ``labels`` (long, or float)."""

    def __init__(self, pad_id: int, regression: bool = False):
        if not isinstance(pad_id, Integral) or isinstance(pad_id, bool) or pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative int, got {pad_id!r}")
        if not isinstance(regression, bool):
            raise TypeError(f"regression must be True or False, got {regression!r}")
        self.pad_id = int(pad_id)
        self.regression = regression

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if isinstance(examples, dict) or not isinstance(examples, Sequence) or not examples:
            raise ValueError("examples must be a non-empty list of dicts")
        labels = []
        for index, example in enumerate(examples):
            label = example.get("label") if isinstance(example, dict) else None
            if label is None:
                raise ValueError(f"examples[{index}] needs a 'label'")
            if isinstance(label, torch.Tensor) and label.dim() == 0:
                label = label.item()
            if not isinstance(label, Real) or isinstance(label, bool):
                raise TypeError(f"examples[{index}]['label'] must be an int (class) or a float "
                                f"(score), got {label!r}")
            if self.regression:
                if not math.isfinite(label):
                    raise ValueError(f"examples[{index}]['label'] must be a finite score, "
                                     f"got {label!r}")
            elif not float(label).is_integer():
                raise ValueError(f"examples[{index}]['label'] must be a class index, got "
                                 f"{label!r} (use regression=True for scores)")
            elif label < 0 and label != IGNORE_INDEX:
                raise ValueError(f"examples[{index}]['label'] must be a class index >= 0 (or "
                                 f"{IGNORE_INDEX} to leave the row out of the loss), got {label!r}")
            labels.append(label)
        batch = pad_batch([{k: v for k, v in e.items() if k != "label"} for e in examples],
                          self.pad_id)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression
                                       else torch.long)
        return batch


# Keys the training loader adds to a batch for loss normalisation; not model inputs.
BOOKKEEPING_KEYS = ("num_targets", "num_global_targets")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the loader's bookkeeping keys: what a model's forward takes."""
    return {key: value for key, value in batch.items() if key not in BOOKKEEPING_KEYS}
