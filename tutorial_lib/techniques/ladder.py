"""Ladder side-tuning (LST): train a thin side network, never back-propagate through the backbone.

Sung, Cho and Bansal, "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer
Learning" (NeurIPS 2022), and Su's simpler replication (kexue.fm 9138, bojone/LST-CLUE).
Chapter 9 of the book.

Adapters and LoRA train few parameters, yet their gradient still flows back through every
backbone layer, so autograd keeps the backbone's activations. LST runs the frozen backbone
under ``torch.no_grad`` and reads its per-layer states ``h^b_0 … h^b_L`` (the core's
``Encoder.encode(..., output_hidden_states=True)``). A side network of width ``d / r``
climbs a *ladder* of down-projections ``Down_i``: d → d/r. The released code
(``seq2seq/third_party/models/t5/modeling_side_t5.py``) computes, for each kept layer i::

    h^s_0 = Down_0(h^b_0)
    h^s  ← g_i · h^s + (1 − g_i) · Down_i(h^b_i),   g_i = σ(α_i / T),  α_i = 0 at init (g = 0.5)
    h^s  ← SideBlock_i(h^s)

with T = 0.1, then Up: d/r → d and the task's head. The side blocks are the backbone's own
block type with every width divided by r and the same number of heads — a thin
Transformer, not adapter MLPs. :class:`LadderSideTuning` builds that (``ladder="gated"``)
from the core's :class:`~tutorial_lib.core.model.TransformerBlock`, and Su's variant
(``ladder="add"``: no gate, the side block first, then ``h^s ← h^s + Down_i(h^b_i)``;
:func:`su_variant` picks his layers and sizes). ``side_layers`` keeps a subset of the
backbone's layers (the released scripts' layer dropping, on by default there).

Initialisation: ``init="random"`` draws the side network like the backbone's own
initialiser; ``init="pruned"`` copies each side block from its backbone layer, structurally
pruned to 1/r of its hidden units, of each head's query/key and value dimensions and of its
feed-forward units, keeping the units of largest Fisher importance (:func:`fisher_importance`:
squared gradients of a multiplicative mask on each unit, summed over batches — the
released code's ``fisher-v2`` idea, ``pruning/fisher.py``), and starts each down-projection
as the selection of the kept hidden units.

Conventions pinned by tests (``tests/test_ladder.py``): the side blocks use the backbone's
padding mask and no position plugin (positions reach the side network through the ladder's
states); the backbone's dropout follows the model's train/eval mode, as in the released
code, but never a gradient; :func:`training_memory` counts what a step holds at the end of
its forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from typing import Any, Iterable

import torch
from torch import nn

from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.core.model import (Encoder, ModelOutput, TransformerBlock, init_weights,
                                     pool_sequence, sequence_loss)

LADDERS = ("gated", "add")
INITS = ("random", "pruned")
POOLINGS = ("cls", "mean")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def side_config(config: TransformerConfig, reduction: int, num_layers: int,
                num_heads: int | None = None) -> TransformerConfig:
    """The side network's config: the backbone's with hidden and feed-forward widths divided
    by ``reduction`` and ``num_heads`` heads (default: the backbone's, as the released code)."""
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    if not _is_int(reduction) or reduction < 1:
        raise ValueError(f"reduction must be an integer >= 1, got {reduction!r}")
    heads = config.num_heads if num_heads is None else num_heads
    if not _is_int(heads) or heads < 1:
        raise ValueError(f"side_heads must be None or an integer >= 1, got {num_heads!r}")
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name) % reduction:
            raise ValueError(f"reduction must divide the backbone's {name} "
                             f"({getattr(config, name)}), got {reduction}")
    hidden = config.hidden_size // reduction
    if hidden % heads:
        raise ValueError(f"side_heads must divide the side width {hidden} "
                         f"(hidden_size / reduction), got {heads}")
    return dataclasses.replace(config, hidden_size=hidden, num_heads=heads, num_layers=num_layers,
                               intermediate_size=config.intermediate_size // reduction)


class LadderSideTuning(nn.Module):
    """A frozen encoder, a side network of width d/r fed by its layers, and a task head.

    ``backbone``: the core's :class:`Encoder` (its weights are frozen in place);
    ``side_layers``: the backbone layers (1 to L) that get a side block and a ladder rung
    (default: all); ``ladder``: ``"gated"`` (the paper's) or ``"add"`` (Su's);
    ``temperature``: T of the gates; ``init``: ``"random"`` or ``"pruned"`` (then
    ``importance`` from :func:`fisher_importance` is required); ``pooling`` and
    ``num_labels`` as :class:`~tutorial_lib.core.model.SequenceClassifier`.
    ``forward`` takes the classifier's inputs and returns a ``ModelOutput``.
    """

    def __init__(self, backbone: Encoder, *, reduction: int = 8,
                 side_layers: Iterable[int] | None = None, ladder: str = "gated",
                 temperature: float = 0.1, side_heads: int | None = None,
                 num_labels: int = 2, pooling: str = "mean", init: str = "random",
                 importance: dict[str, Any] | None = None):
        super().__init__()
        if not isinstance(backbone, Encoder):
            raise TypeError(f"backbone must be a tutorial_lib Encoder, got {type(backbone).__name__}")
        config = backbone.config
        if config.causal:
            raise ValueError("backbone must be a bidirectional encoder (config.causal=False)")
        layers = config.num_layers
        side_layers = tuple(range(1, layers + 1)) if side_layers is None else tuple(side_layers)
        if not side_layers or any(not _is_int(i) or not 1 <= i <= layers for i in side_layers) \
                or list(side_layers) != sorted(set(side_layers)):
            raise ValueError(f"side_layers must be increasing backbone layers in [1, {layers}], "
                             f"got {side_layers!r}")
        if ladder not in LADDERS:
            raise ValueError(f"ladder must be one of {LADDERS}, got {ladder!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not _is_int(num_labels) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "pruned" and importance is None:
            raise ValueError("init='pruned' needs importance (from fisher_importance)")
        self.backbone = backbone.requires_grad_(False)
        self.side = side_config(config, reduction, len(side_layers), side_heads)
        self.side_layers, self.ladder, self.temperature = side_layers, ladder, float(temperature)
        self.reduction, self.num_labels, self.pooling, self.init = reduction, num_labels, pooling, init
        d, width = config.hidden_size, self.side.hidden_size
        # Rung 0 reads the embedding output; rung k + 1 the output of backbone layer side_layers[k].
        self.down = nn.ModuleList(nn.Linear(d, width) for _ in range(len(side_layers) + 1))
        self.blocks = nn.ModuleList(TransformerBlock(self.side, k) for k in range(len(side_layers)))
        self.final_norm = (nn.LayerNorm(width, eps=config.layer_norm_eps)
                           if config.norm_position == "pre" else None)
        self.gate_logits = nn.Parameter(torch.zeros(len(side_layers))) if ladder == "gated" else None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.up = nn.Linear(width, d)
        self.pooler = nn.Linear(d, d) if pooling == "cls" else None
        self.classifier = nn.Linear(d, num_labels)
        for name, module in self.named_children():
            if name != "backbone":
                module.apply(lambda m: init_weights(m, config.initializer_range))
        if init == "pruned":
            prune_into(self, importance)

    @property
    def config(self) -> dict[str, Any]:
        """What a checkpoint records of the model (compared on resume)."""
        return {"backbone": self.backbone.config.to_dict(), "reduction": self.reduction,
                "side_layers": list(self.side_layers), "ladder": self.ladder,
                "temperature": self.temperature, "side_heads": self.side.num_heads,
                "num_labels": self.num_labels, "pooling": self.pooling, "init": self.init}

    def gates(self) -> torch.Tensor:
        """g_i = σ(α_i / T), one per rung after the first (the gated ladder only)."""
        if self.gate_logits is None:
            raise ValueError("gates exist only with ladder='gated'")
        return torch.sigmoid(self.gate_logits / self.temperature)

    def backbone_states(self, input_ids=None, attention_mask=None, token_type_ids=None,
                        position_ids=None, inputs_embeds=None):
        """The frozen backbone's per-layer states (``num_layers + 1`` tensors) and context,
        computed without autograd."""
        with torch.no_grad():
            state = self.backbone.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                         inputs_embeds, output_hidden_states=True)
        return state.all_hidden_states, state.ctx

    def side_forward(self, states: list[torch.Tensor], ctx) -> torch.Tensor:
        """The side network on the backbone's states: (batch, seq, d) after Up."""
        h = self.down[0](self.dropout(states[0]))  # (batch, seq, d / r)
        gates = self.gates() if self.ladder == "gated" else None
        for k, (layer, block) in enumerate(zip(self.side_layers, self.blocks)):
            rung = self.down[k + 1](states[layer])
            if gates is not None:
                h = gates[k] * h + (1 - gates[k]) * rung
                h, _ = block(h, ctx)
            else:  # Su: the block first, then add the rung
                h, _ = block(h, ctx)
                h = h + rung
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.up(h)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq, d) -> (batch, d), as the core's classifier pools."""
        return pool_sequence(h, attention_mask, self.pooling, self.pooler)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None) -> ModelOutput:
        states, ctx = self.backbone_states(input_ids, attention_mask, token_type_ids,
                                           position_ids, inputs_embeds)
        h = self.side_forward(states, ctx)
        logits = self.classifier(self.dropout(self.pool(h, attention_mask)))  # (batch, labels)
        loss = None if labels is None else sequence_loss(logits, labels, self.num_labels)
        return ModelOutput(logits=logits, hidden_states=h, loss=loss)


def su_variant(backbone: Encoder, *, every: int = 3, reduction: int = 6, side_heads: int = 4,
               **options: Any) -> LadderSideTuning:
    """Su's replication: no gate, one side block per ``every``-th backbone layer (layers
    3, 6, 9, 12 of BERT-base: four side blocks), width d/6 (128 for BERT-base) and 4 heads."""
    if not _is_int(every) or not 1 <= every <= backbone.config.num_layers:
        raise ValueError(f"every must be an integer in [1, {backbone.config.num_layers}], "
                         f"got {every!r}")
    layers = range(every, backbone.config.num_layers + 1, every)
    return LadderSideTuning(backbone, reduction=reduction, side_layers=layers, ladder="add",
                            side_heads=side_heads, **options)


# -- pruned initialisation --------------------------------------------------------------

def fisher_importance(model: nn.Module,
                      batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Fisher importance of every structural unit of ``model``'s encoder.

    ``model`` is a :class:`~tutorial_lib.core.model.SequenceClassifier` (its loss gives the
    gradient). A mask of ones multiplies each unit: the hidden units of the embedding and of
    every layer's output (one mask per site, scores summed), each layer's query/key
    dimensions (query and key summed: they are kept together), value dimensions and
    feed-forward units. The importance of a unit is Σ_batches (∂L/∂m)², in evaluation mode.
    Returns ``{"hidden": (d,), "qk": [(d,)] * L, "value": [(d,)] * L, "ffn": [(d_ff,)] * L}``.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, Encoder):
        raise TypeError(f"model must be a classifier with a tutorial_lib Encoder as .encoder, "
                        f"got {type(model).__name__}")
    config = encoder.config
    dtype = next(encoder.parameters()).dtype
    sites = {"hidden": [torch.ones(config.hidden_size, dtype=dtype, requires_grad=True)
                        for _ in range(config.num_layers + 1)]}
    for kind, size in (("query", config.hidden_size), ("key", config.hidden_size),
                       ("value", config.hidden_size), ("ffn", config.intermediate_size)):
        sites[kind] = [torch.ones(size, dtype=dtype, requires_grad=True)
                       for _ in range(config.num_layers)]
    scores = {name: [torch.zeros_like(m) for m in masks] for name, masks in sites.items()}

    def scale(mask):
        return lambda module, args, output: output * mask

    def scale_first(mask):  # a layer returns (hidden states, attention weights or None)
        return lambda module, args, output: (output[0] * mask,) + tuple(output[1:])

    handles = [encoder.embeddings.register_forward_hook(scale(sites["hidden"][0]))]
    for i, layer in enumerate(encoder.layers):
        handles += [layer.register_forward_hook(scale_first(sites["hidden"][i + 1])),
                    layer.attention.query.register_forward_hook(scale(sites["query"][i])),
                    layer.attention.key.register_forward_hook(scale(sites["key"][i])),
                    layer.attention.value.register_forward_hook(scale(sites["value"][i])),
                    layer.feed_forward.up.register_forward_hook(scale(sites["ffn"][i]))]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            masks = [m for ms in sites.values() for m in ms]
            loss = model(**{k: v for k, v in batch.items() if k in
                            ("input_ids", "attention_mask", "token_type_ids", "labels")}).loss
            grads = torch.autograd.grad(loss, masks)
            flat = [s for ss in scores.values() for s in ss]
            for total, grad in zip(flat, grads):
                total += grad.detach() ** 2
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("batches must hold at least one batch")
    # The feed-forward mask multiplies the up-projection before its activation: an
    # activation-free proxy of the unit, enough to rank units.
    return {"hidden": torch.stack(scores["hidden"]).sum(0),
            "qk": [q + k for q, k in zip(scores["query"], scores["key"])],
            "value": scores["value"], "ffn": scores["ffn"]}


def _head_dimensions(score: torch.Tensor, heads: int, chosen_heads: torch.Tensor,
                     keep: int) -> torch.Tensor:
    """In each chosen head, the ``keep`` dimensions of largest score, in order:
    (len(chosen_heads) * keep,) indices into the backbone's hidden dimension."""
    head_dim = score.numel() // heads
    per_head = score.view(heads, head_dim)[chosen_heads]  # (side heads, head_dim)
    chosen = per_head.topk(keep, dim=-1).indices.sort(dim=-1).values  # (side heads, keep)
    return (chosen + chosen_heads[:, None] * head_dim).reshape(-1)


def _top(score: torch.Tensor, keep: int) -> torch.Tensor:
    return score.topk(keep).indices.sort().values


@torch.no_grad()
def prune_into(model: LadderSideTuning, importance: dict[str, Any]) -> None:
    """Copy into each side block its backbone layer, pruned to the units of largest importance.

    One set of hidden units (of the summed hidden importance) serves every block, since the
    side blocks share one residual stream; each down-projection starts as the selection of
    those units (bias zero). With as many side heads as the backbone has (the paper's
    layout), every head keeps its most important 1/r of query/key and value dimensions;
    with fewer (Su's four), the heads of largest query/key plus value importance are kept
    first, then their most important dimensions.
    """
    config, side = model.backbone.config, model.side
    head_dim = config.hidden_size // config.num_heads
    head_keep = side.hidden_size // side.num_heads
    if side.num_heads > config.num_heads or head_keep > head_dim:
        raise ValueError(f"init='pruned' needs side_heads <= the backbone's {config.num_heads} "
                         f"and a side head width <= {head_dim}, got {side.num_heads} heads of "
                         f"{head_keep}")
    expected = {"hidden": (config.hidden_size,)}
    if not isinstance(importance, dict) or set(importance) != {"hidden", "qk", "value", "ffn"} \
            or tuple(importance["hidden"].shape) != expected["hidden"] \
            or any(len(importance[k]) != config.num_layers for k in ("qk", "value", "ffn")):
        raise ValueError("importance must be fisher_importance(...) of this backbone: keys "
                         "hidden, qk, value, ffn, with one entry per layer")
    hidden = _top(importance["hidden"], side.hidden_size)
    for down in model.down:
        down.weight.zero_()
        down.weight[torch.arange(side.hidden_size), hidden] = 1.0
        down.bias.zero_()
    for block, layer in zip(model.blocks, model.side_layers):
        source = model.backbone.layers[layer - 1]
        qk_score, value_score = importance["qk"][layer - 1], importance["value"][layer - 1]
        per_head = (qk_score + value_score).view(config.num_heads, head_dim).sum(-1)
        heads = _top(per_head, side.num_heads)
        qk = _head_dimensions(qk_score, config.num_heads, heads, head_keep)
        value = _head_dimensions(value_score, config.num_heads, heads, head_keep)
        ffn = _top(importance["ffn"][layer - 1], side.intermediate_size)
        for name, rows in (("query", qk), ("key", qk), ("value", value)):
            target, origin = getattr(block.attention, name), getattr(source.attention, name)
            target.weight.copy_(origin.weight[rows][:, hidden])
            if target.bias is not None:
                target.bias.copy_(origin.bias[rows])
        out, origin = block.attention.output, source.attention.output
        out.weight.copy_(origin.weight[hidden][:, value])
        if out.bias is not None:
            out.bias.copy_(origin.bias[hidden])
        block.feed_forward.up.weight.copy_(source.feed_forward.up.weight[ffn][:, hidden])
        block.feed_forward.up.bias.copy_(source.feed_forward.up.bias[ffn])
        block.feed_forward.down.weight.copy_(source.feed_forward.down.weight[hidden][:, ffn])
        block.feed_forward.down.bias.copy_(source.feed_forward.down.bias[hidden])
        for name in ("attention_norm", "feed_forward_norm"):
            getattr(block, name).weight.copy_(getattr(source, name).weight[hidden])
            getattr(block, name).bias.copy_(getattr(source, name).bias[hidden])


# -- what a training step holds -----------------------------------------------------------

@contextmanager
def saved_tensors():
    """Record every tensor autograd saves for the backward pass inside the block:
    yields a list of the saved tensors (the hooks keep them as they are)."""
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once), leaving out
    the storages of ``exclude`` (e.g. the parameters, counted elsewhere)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def training_memory(model: nn.Module, batch: dict[str, torch.Tensor],
                    optimizer_states: int = 2) -> dict[str, int]:
    """What one training step of ``model`` on ``batch`` holds at the end of its forward
    pass, in bytes: every parameter (``weights``), a gradient per trainable one
    (``gradients``), ``optimizer_states`` tensors per trainable one (2 for Adam's moments:
    ``optimizer``) and the activations autograd saved for the backward pass
    (``activations``: distinct storages, parameters left out). ``total`` is their sum: the
    memory a GPU would hold, less the framework's workspace and the input batch.
    Runs one forward and backward in training mode; gradients are cleared afterwards.
    """
    if not _is_int(optimizer_states) or optimizer_states < 0:
        raise ValueError(f"optimizer_states must be an integer >= 0, got {optimizer_states!r}")
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameter (requires_grad=True)")
    weights = sum(p.numel() * p.element_size() for p in parameters)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    was_training = model.training
    model.train()
    try:
        with saved_tensors() as saved:
            loss = model(**batch).loss
        activations = storage_bytes(saved, exclude=parameters)
        loss.backward()
    finally:
        for p in trainable:
            p.grad = None
        model.train(was_training)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer_states * grads,
            "activations": activations,
            "total": weights + grads + optimizer_states * grads + activations}


def trainable_parameters(model: nn.Module) -> int:
    """How many parameters receive a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
