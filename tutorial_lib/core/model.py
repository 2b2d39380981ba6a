r"""BERT-style encoders, GPT-style decoders and their heads.

One stack serves both: :class:`Encoder` with ``config.causal=False`` is BERT
(Devlin et al., 2019); with ``config.causal=True`` (and usually
``norm_position="pre"``) it is a GPT-style decoder. A block is

* post-LN (BERT):  :math:`h \leftarrow \mathrm{LN}(h + \mathrm{Attn}(h))`,
  :math:`h \leftarrow \mathrm{LN}(h + \mathrm{FFN}(h))`, with a LayerNorm on the
  embeddings;
* pre-LN (GPT-2; Xiong et al., 2020): :math:`h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h))`,
  :math:`h \leftarrow h + \mathrm{FFN}(\mathrm{LN}(h))`, with a final LayerNorm.

Attention modifications are plugins (:mod:`tutorial_lib.core.attention`): those the
config asks for (RoPE and its variants, ALiBi, windows, log-n scaling) are built in
``Encoder.position_plugins`` and can be changed on a trained model with
:func:`set_position_options`; those a chapter adds live in
``Encoder.attention_plugins``. ``config.relative_attention`` makes the stack a
DeBERTa encoder (:mod:`tutorial_lib.techniques.deberta`: the disentangled-attention plugin
and the relative table ``Encoder.relative_embeddings``). Heads (masked LM,
sequence classification or regression, causal LM) sit on top of an encoder and
return a :class:`ModelOutput`.
The parameter layout follows Hugging Face BERT closely enough that
:func:`tutorial_lib.interop.from_hf` maps it one tensor to one tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin, MultiHeadAttention
from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.core.positions import sinusoidal_embedding

IGNORE_INDEX = -100
# Index dtypes the models accept for ids (token, segment, learned position, label);
# nn.Embedding and the losses take int64 (and int32), so the others are widened.
_INDEX_DTYPES = (torch.long, torch.int32, torch.int16, torch.uint8)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class Extensions:
    """What the techniques plug into the core, filled by :mod:`tutorial_lib.assembly`.

    The core names no technique. It asks this registry, whose defaults are chapter 0's
    BERT, for:

    * ``position_plugins(config)``: the attention plugins a config's position options
      ask for. They own no weights, so :func:`position_options` can rebuild them on a
      trained model;
    * ``encoder_extensions``: functions ``extend(encoder, config)`` run while an
      :class:`Encoder` is built, before its weights are initialised, to attach what a
      technique owns (DeBERTa's relative table and its plugin);
    * ``blocks``: the layer of the stack by ``config.block`` (``"transformer"``:
      attention + FFN, :class:`TransformerBlock`). A block is built as
      ``block(config, layer_index)`` and called as
      ``block(h, ctx, plugins, key_value_states=None, need_weights=False)``, returning
      ``(h, attention weights or None)``.
    """

    def __init__(self):
        self.position_plugins: Callable[[TransformerConfig], list[AttentionPlugin]] = \
            lambda config: []
        self.encoder_extensions: list[Callable[["Encoder", TransformerConfig], None]] = []
        self.blocks: dict[str, Callable[[TransformerConfig, int], nn.Module]] = {}

    def register_block(self, name: str, build: Callable[[TransformerConfig, int], nn.Module]):
        """Make ``config.block = name`` build the stack's layers with ``build``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if not callable(build):
            raise TypeError(f"build must be callable as build(config, layer_index), "
                            f"got {type(build).__name__}")
        self.blocks[name] = build
        return build


EXTENSIONS = Extensions()


@dataclass
class ModelOutput:
    """What every model returns. ``loss`` is None when no labels were given."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor  # (batch, seq, hidden), the encoder's final output
    loss: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None  # per layer (batch, heads, query, key)
    # With output_hidden_states: the embedding output, then every layer's output
    # (num_layers + 1 tensors of shape (batch, seq, hidden), Hugging Face's convention;
    # a pre-LN stack's final LayerNorm is applied to the last one).
    all_hidden_states: list[torch.Tensor] | None = None


class Embeddings(nn.Module):
    """Token (+ token-type) (+ absolute position) embeddings, then LayerNorm for post-LN."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding == "learned" else None)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if config.type_vocab_size > 0 else None)
        # A perturbation site: the sum of the embeddings, before the LayerNorm (SiFT
        # normalises and perturbs here). An identity unless a hook is attached.
        self.embedding_sum = nn.Identity()
        self.norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                     if config.norm_position == "post" else None)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` (batch, seq, hidden) replaces the word-embedding lookup (and is
        scaled like it with ``scale_word_embeddings``)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.scale_word_embeddings:
            x = x * math.sqrt(self.config.hidden_size)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        elif self.config.position_embedding == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.config.hidden_size).to(x.dtype)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        x = self.embedding_sum(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: hidden -> intermediate -> hidden."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


class TransformerBlock(nn.Module):
    """Attention and feed-forward sublayers with residuals, post-LN or pre-LN."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.pre_norm = config.norm_position == "pre"
        self.attention = MultiHeadAttention(config.hidden_size, config.num_heads,
                                            dropout=config.attention_dropout)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h: torch.Tensor, ctx: AttentionContext,
                plugins: tuple[AttentionPlugin, ...] = (),
                key_value_states: torch.Tensor | None = None,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            normed = self.attention_norm(h)
            kv = None if key_value_states is None else self.attention_norm(key_value_states)
            attended, weights = self.attention(normed, ctx, plugins, kv, need_weights)
            h = h + self.dropout(attended)
            h = h + self.dropout(self.feed_forward(self.feed_forward_norm(h)))
        else:
            attended, weights = self.attention(h, ctx, plugins, key_value_states, need_weights)
            h = self.attention_norm(h + self.dropout(attended))
            h = self.feed_forward_norm(h + self.dropout(self.feed_forward(h)))
        return h, weights


EXTENSIONS.register_block("transformer", TransformerBlock)


@dataclass
class EncoderState:
    """What :meth:`Encoder.encode` returns: enough to run the last layer again (EMD)."""

    hidden_states: torch.Tensor  # (batch, seq, hidden), the encoder's final output
    last_layer_input: torch.Tensor  # (batch, seq, hidden), H_{L-1}
    ctx: AttentionContext
    attentions: list[torch.Tensor] = field(default_factory=list)
    # With output_hidden_states: num_layers + 1 tensors (batch, seq, hidden), see
    # ModelOutput.all_hidden_states; otherwise None.
    all_hidden_states: list[torch.Tensor] | None = None


class Encoder(nn.Module):
    """The Transformer stack: ``forward(input_ids, attention_mask)`` -> (batch, seq, hidden).

    ``attention_mask`` follows Hugging Face: 1 for tokens, 0 for padding.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = Embeddings(config)
        if config.block not in EXTENSIONS.blocks:
            raise ValueError(f"config.block must be one of {sorted(EXTENSIONS.blocks)} "
                             f"(register others with EXTENSIONS.register_block), "
                             f"got {config.block!r}")
        build_block = EXTENSIONS.blocks[config.block]
        self.layers = nn.ModuleList(build_block(config, i) for i in range(config.num_layers))
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                           if config.norm_position == "pre" else None)
        self.position_plugins = nn.ModuleList(EXTENSIONS.position_plugins(config))
        self.attention_plugins = nn.ModuleList()
        for extend in EXTENSIONS.encoder_extensions:  # e.g. DeBERTa's relative table
            extend(self, config)
        self.apply(lambda module: init_weights(module, config.initializer_range))
        if config.scale_word_embeddings:  # Vaswani et al.: unit scale after the sqrt(d)
            init_weights(self.embeddings.word_embeddings, config.hidden_size ** -0.5)

    def add_attention_plugin(self, plugin: AttentionPlugin) -> AttentionPlugin:
        """Attach a plugin that every layer's attention will call. Returns it."""
        if not isinstance(plugin, AttentionPlugin):
            raise TypeError(f"plugin must be an AttentionPlugin, got {type(plugin).__name__}")
        self.attention_plugins.append(plugin)
        return plugin

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                output_attentions: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final hidden states (batch, seq, hidden); with ``output_attentions`` also the
        per-layer attention weights (batch, heads, query, key)."""
        state = self.encode(input_ids, attention_mask, token_type_ids, position_ids,
                            inputs_embeds, output_attentions)
        return (state.hidden_states, state.attentions) if output_attentions \
            else state.hidden_states

    def encode(self, input_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None,
               inputs_embeds: torch.Tensor | None = None,
               output_attentions: bool = False,
               output_hidden_states: bool = False) -> EncoderState:
        """Like :meth:`forward`, also returning the last layer's input and the context;
        with ``output_hidden_states`` also the embedding output and every layer's output
        (``EncoderState.all_hidden_states``, ``num_layers + 1`` tensors)."""
        batch, length, device = self._check_inputs(input_ids, attention_mask, token_type_ids,
                                                   position_ids, inputs_embeds)
        input_ids, token_type_ids, position_ids = (
            _widen_index(input_ids), _widen_index(token_type_ids), _widen_index(position_ids))
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]  # (1, seq)
        key_padding = None if attention_mask is None else attention_mask.bool()
        if key_padding is not None and not torch.compiler.is_compiling() \
                and bool(key_padding.all()):
            key_padding = None  # nothing to mask: keep the fused kernel's fastest path
        ctx = AttentionContext(query_positions=position_ids, key_positions=position_ids,
                               key_padding_mask=key_padding, causal=self.config.causal)
        plugins = tuple(self.position_plugins) + tuple(self.attention_plugins)
        for plugin in plugins:
            plugin.prepare(self, ctx)  # once per forward, for all layers
        h = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)
        attentions = []
        all_hidden_states = [h] if output_hidden_states else None
        last_layer_input = h
        for index, layer in enumerate(self.layers):
            ctx.layer_index = index
            last_layer_input = h
            h, weights = layer(h, ctx, plugins, need_weights=output_attentions)
            if output_attentions:
                attentions.append(weights)
            if output_hidden_states:
                all_hidden_states.append(h)
        if self.final_norm is not None:
            h = self.final_norm(h)
            if output_hidden_states:
                all_hidden_states[-1] = h
        return EncoderState(h, last_layer_input, ctx, attentions, all_hidden_states)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids, position_ids,
                      inputs_embeds):
        """Validate shapes and (outside ``torch.compile``) values; return batch, seq, device.

        Value checks read tensors back to the host; under ``torch.compile`` that would
        break the graph, so a compiled model checks shapes only.
        """
        config = self.config
        check_values = not torch.compiler.is_compiling()
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        weight = self.embeddings.word_embeddings.weight
        if input_ids is not None:
            source = "input_ids"
            if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
                raise ValueError("input_ids must be a tensor of shape (batch, seq), got "
                                 f"{_describe(input_ids)}")
            if input_ids.dtype not in _INDEX_DTYPES:
                raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            shape = tuple(input_ids.shape)
            device = input_ids.device
        else:
            source = "inputs_embeds"
            if not torch.is_tensor(inputs_embeds):
                raise TypeError(f"inputs_embeds must be a tensor of shape (batch, seq, "
                                f"hidden_size={config.hidden_size}), got "
                                f"{_describe(inputs_embeds)}")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, seq, hidden_size="
                                 f"{config.hidden_size}), got {tuple(inputs_embeds.shape)}")
            if not inputs_embeds.is_floating_point():
                raise TypeError(f"inputs_embeds must be a floating-point tensor, "
                                f"got {inputs_embeds.dtype}")
            shape = tuple(inputs_embeds.shape[:2])
            device = inputs_embeds.device
        if device != weight.device:
            raise ValueError(f"{source} is on {device} but the model is on {weight.device}; "
                             f"move the inputs with .to({str(weight.device)!r})")
        # Mixed dtypes work only by accident of type promotion (and fail in the LayerNorm
        # or the first projection otherwise); under autocast they are fine.
        if check_values and inputs_embeds is not None and inputs_embeds.dtype != weight.dtype \
                and not torch.is_autocast_enabled(device.type):
            raise TypeError(f"inputs_embeds must have the model's dtype {weight.dtype}, "
                            f"got {inputs_embeds.dtype}; cast it with .to({weight.dtype})")
        if check_values and input_ids is not None and input_ids.numel() and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={config.vocab_size}), found values "
                f"in [{int(input_ids.min())}, {int(input_ids.max())}]")
        if shape[0] == 0:
            raise ValueError(f"the input batch is empty ({source} has batch size 0)")
        if shape[1] == 0:
            raise ValueError("the input sequence is empty (seq = 0)")
        for name, tensor in (("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if tensor is None:
                continue
            if not torch.is_tensor(tensor):
                raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
            if tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but {source} is on {device}")
        for name, tensor in (("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids)):
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have the shape of {source} {shape}, "
                                 f"got {tuple(tensor.shape)}")
        if attention_mask is not None and attention_mask.is_complex():
            raise TypeError(f"attention_mask must hold 0 and 1 (or False and True), "
                            f"got {attention_mask.dtype}")
        if check_values and attention_mask is not None:
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
            empty = ~attention_mask.bool().any(dim=-1)
            if bool(empty.any()):
                rows = empty.nonzero().flatten().tolist()
                raise ValueError(f"attention_mask has no token (only 0) in row(s) {rows[:10]}: "
                                 f"every sequence needs at least one token")
        if token_type_ids is not None:
            if config.type_vocab_size == 0:
                raise ValueError("token_type_ids given but the config has type_vocab_size=0")
            if token_type_ids.dtype not in _INDEX_DTYPES:
                raise TypeError(f"token_type_ids must hold integer segment ids, "
                                f"got {token_type_ids.dtype}")
            if check_values and (int(token_type_ids.min()) < 0
                                 or int(token_type_ids.max()) >= config.type_vocab_size):
                raise ValueError(f"token_type_ids must lie in [0, type_vocab_size="
                                 f"{config.type_vocab_size})")
        learned = config.position_embedding == "learned"
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[-1] != shape[1] \
                    or position_ids.shape[0] not in (1, shape[0]):
                raise ValueError(f"position_ids must have shape (batch or 1, seq={shape[1]}), "
                                 f"got {tuple(position_ids.shape)}")
            if learned and position_ids.dtype not in _INDEX_DTYPES:
                raise TypeError(f"learned position embeddings need integer position_ids, "
                                f"got {position_ids.dtype}")
            if position_ids.dtype == torch.bool or position_ids.is_complex():
                raise TypeError(f"position_ids must hold integer or real positions, "
                                f"got {position_ids.dtype}")
            if check_values and position_ids.is_floating_point() \
                    and not bool(torch.isfinite(position_ids).all()):
                raise ValueError("position_ids must be finite, found NaN or infinity")
            if check_values and learned and int(position_ids.min()) < 0:
                raise ValueError(f"position_ids must be >= 0 for learned position embeddings, "
                                 f"found {int(position_ids.min())}")
        if learned and (check_values or position_ids is None):
            longest = shape[1] if position_ids is None else int(position_ids.max()) + 1
            if longest > config.max_position_embeddings:
                raise ValueError(
                    f"sequence needs position {longest - 1} but the learned position "
                    f"embeddings cover only max_position_embeddings="
                    f"{config.max_position_embeddings} positions")
        return shape[0], shape[1], device


def switchable_options() -> tuple[str, ...]:
    """The config fields that may change on a trained model: those whose dataclass field
    is marked ``switchable`` (position options that own no weights)."""
    return tuple(f.name for f in dataclasses.fields(TransformerConfig)
                 if f.metadata.get("switchable"))


def _single_encoder(model: nn.Module) -> "Encoder":
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    encoders = [module for module in model.modules() if isinstance(module, Encoder)]
    if len(encoders) != 1:
        raise ValueError(f"model must contain exactly one Encoder, found {len(encoders)}")
    return encoders[0]


def set_position_options(model: nn.Module, **options) -> TransformerConfig:
    """Change position options (:func:`switchable_options`) of a built, possibly trained,
    model, for good; :func:`position_options` changes them inside a ``with`` block.

    None of these options owns weights, so the model's parameters are untouched: the
    config is replaced (validated) on every module that holds it and the encoder's
    ``position_plugins`` are rebuilt; plugins added with ``add_attention_plugin`` stay.
    Returns the new config. Example: ``set_position_options(model, rerope_window=64,
    logn_training_length=128)`` before evaluating at four times the training length.
    """
    allowed = switchable_options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"set_position_options changes only {allowed}; got {unknown}")
    encoder = _single_encoder(model)
    old = encoder.config
    new = dataclasses.replace(old, **options)  # validates
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    device = next(encoder.parameters()).device
    encoder.position_plugins = nn.ModuleList(EXTENSIONS.position_plugins(new)).to(device)
    return new


@contextlib.contextmanager
def position_options(model: nn.Module, **options):
    """Inside the ``with`` block the model runs with other position options; on leaving
    (also by an exception) every module gets back the config object it had and the
    encoder its own position plugins. Yields the temporary config.

    Example: ``with position_options(model, rotary_ntk_factor=4.0): evaluate(model)``.
    """
    encoder = _single_encoder(model)
    saved_configs = [(module, module.config) for module in model.modules()
                     if isinstance(getattr(module, "config", None), TransformerConfig)]
    saved_plugins = encoder.position_plugins
    try:
        yield set_position_options(model, **options)
    finally:
        for module, config in saved_configs:
            module.config = config
        encoder.position_plugins = saved_plugins


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _widen_index(ids: torch.Tensor | None) -> torch.Tensor | None:
    """int16/uint8 ids as int64 (what nn.Embedding needs; uint8 differences would wrap);
    int64, int32, float positions and None unchanged."""
    if ids is None or ids.is_floating_point() or ids.dtype in (torch.long, torch.int32):
        return ids
    return ids.long()


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- heads ----------------------------------------------------------------------------

class _LanguageModelBase(nn.Module):
    """Shared by the masked and causal LM: an output projection tied to the input embedding."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        # Tying is done in forward by reading the embedding matrix, so the checkpoint
        # stores the tensor once (safetensors refuses aliased tensors).
        self.output_weight = (None if config.tie_word_embeddings else
                              nn.Parameter(torch.empty(config.vocab_size, config.hidden_size)))
        if self.output_weight is not None:
            nn.init.normal_(self.output_weight, std=config.initializer_range)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def project_to_vocab(self, h: torch.Tensor) -> torch.Tensor:
        weight = (self.encoder.embeddings.word_embeddings.weight
                  if self.output_weight is None else self.output_weight)
        return F.linear(h, weight, self.output_bias)


class MaskedLM(_LanguageModelBase):
    """Encoder + BERT's masked-LM head (dense, activation, LayerNorm, tied decoder).

    With ``sparse_prediction=True`` and labels given, the head runs only at the
    labelled (masked) positions and ``logits`` has shape (n_masked, vocab), in the
    order of ``labels != -100``. Only about 15% of positions carry a label, and the
    vocabulary projection is a large part of a small model's step, so this speeds up
    pre-training without changing the loss. Without labels the logits are dense.

    A ``decoder`` (a head extension point) is built as ``decoder(config)`` and called
    as ``decoder(encoder, state)`` with the :class:`EncoderState`; the head then reads
    what it returns instead of the encoder's output. DeBERTa's enhanced mask decoder
    is one: ``MaskedLM(config, decoder=EnhancedMaskDecoder)``
    (:class:`~tutorial_lib.techniques.deberta.EnhancedMaskDecoder`). ``hidden_states``
    stays the encoder's output, the representation fine-tuning uses.
    """

    def __init__(self, config: TransformerConfig, sparse_prediction: bool = False,
                 decoder: Callable[[TransformerConfig], nn.Module] | None = None):
        super().__init__(config)
        if not isinstance(sparse_prediction, bool):
            raise TypeError(f"sparse_prediction must be True or False, got {sparse_prediction!r}")
        if decoder is not None and not callable(decoder):
            raise TypeError(f"decoder must be None or callable as decoder(config), "
                            f"got {type(decoder).__name__}")
        self.sparse_prediction = sparse_prediction
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.activation]
        init_weights(self.transform, config.initializer_range)
        self.decoder = None if decoder is None else decoder(config)
        if self.decoder is not None:
            self.decoder.apply(lambda module: init_weights(module, config.initializer_range))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False, output_hidden_states=False) -> ModelOutput:
        state = self.encoder.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                    inputs_embeds, output_attentions, output_hidden_states)
        h = state.hidden_states
        attentions = state.attentions if output_attentions else None
        head_input = h if self.decoder is None else self.decode(state)
        if labels is not None:
            labels = _check_labels(labels, h.shape[:2], "token", device=h.device,
                                   classes=("vocab_size", self.config.vocab_size))
        loss = None
        if labels is not None and self.sparse_prediction:
            targets = labels != IGNORE_INDEX
            logits = self.predict(head_input[targets])  # (n_masked, vocab)
            loss = F.cross_entropy(logits.float(), labels[targets])
        else:
            logits = self.predict(head_input)  # (batch, seq, vocab)
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions,
                           all_hidden_states=state.all_hidden_states)

    def decode(self, state: EncoderState) -> torch.Tensor:
        """The decoder's output (batch, seq, hidden) for an encoder state."""
        if self.decoder is None:
            raise ValueError("decode needs a model built with a decoder")
        return self.decoder(self.encoder, state)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """The head: (..., hidden) -> (..., vocab) logits."""
        return self.project_to_vocab(self.transform_norm(self.activation(self.transform(h))))


class CausalLM(_LanguageModelBase):
    """Causal decoder + tied LM head. ``labels`` are the input ids; the loss shifts them."""

    def __init__(self, config: TransformerConfig):
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        if not config.causal:
            raise ValueError("CausalLM needs a config with causal=True")
        super().__init__(config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False, output_hidden_states=False) -> ModelOutput:
        state = self.encoder.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                    inputs_embeds, output_attentions, output_hidden_states)
        h, attentions = state.hidden_states, (state.attentions if output_attentions else None)
        logits = self.project_to_vocab(h)  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            labels = _check_labels(labels, h.shape[:2], "token", device=h.device,
                                   classes=("vocab_size", self.config.vocab_size))
            # Position t predicts token t+1.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions,
                           all_hidden_states=state.all_hidden_states)


class SequenceClassifier(nn.Module):
    """Encoder + pooling + linear classifier; ``num_labels=1`` is regression (MSE).

    ``pooling="cls"`` is BERT's: the first token through a dense layer and tanh (the
    "pooler"); ``pooling="mean"`` averages the unpadded tokens.
    """

    def __init__(self, config: TransformerConfig, num_labels: int = 2, pooling: str = "cls",
                 classifier_dropout: float | None = None):
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if classifier_dropout is not None and (
                not isinstance(classifier_dropout, (int, float))
                or isinstance(classifier_dropout, bool) or not 0 <= classifier_dropout < 1):
            raise ValueError(f"classifier_dropout must be None or a probability in [0, 1), "
                             f"got {classifier_dropout!r}")
        self.config = config
        self.num_labels = num_labels
        self.pooling = pooling
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if pooling == "cls" else None
        self.dropout = nn.Dropout(config.hidden_dropout if classifier_dropout is None
                                  else classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        for module in (self.pooler, self.classifier):
            if module is not None:
                init_weights(module, config.initializer_range)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, hidden)."""
        return pool_sequence(h, attention_mask, self.pooling, self.pooler)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False, output_hidden_states=False) -> ModelOutput:
        state = self.encoder.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                    inputs_embeds, output_attentions, output_hidden_states)
        h, attentions = state.hidden_states, (state.attentions if output_attentions else None)
        logits = self.classifier(self.dropout(self.pool(h, attention_mask)))  # (batch, labels)
        loss = None if labels is None else sequence_loss(logits, labels, self.num_labels)
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions,
                           all_hidden_states=state.all_hidden_states)


# A sequence classifier's head, for SequenceClassifier and for techniques that put another
# network under the same head (chapter 9's side network).

def pool_sequence(h: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str,
                  pooler: nn.Module | None = None) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): ``"cls"`` is the first token through
    ``pooler`` and tanh, ``"mean"`` the average of the unpadded tokens."""
    if pooling == "cls":
        return torch.tanh(pooler(h[:, 0]))
    if attention_mask is None:
        return h.mean(dim=1)
    weights = attention_mask.to(h.dtype)[..., None]  # (batch, seq, 1)
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def sequence_loss(logits: torch.Tensor, labels, num_labels: int) -> torch.Tensor:
    """Cross-entropy over class ids, or MSE on scores when ``num_labels == 1``, after
    checking the labels (:func:`_check_labels`)."""
    labels = _check_labels(labels, logits.shape[:1], "sequence", device=logits.device,
                           classes=None if num_labels == 1 else ("num_labels", num_labels))
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def _check_labels(labels: torch.Tensor, expected: torch.Size, kind: str, *,
                  classes: tuple[str, int] | None, device: torch.device) -> torch.Tensor:
    """Validate ``labels``; return them as the loss takes them (int64 ids, or the scores).

    ``classes``: ``(name, n)`` when the labels are ids in ``[0, n)`` (or ``-100``, which
    the loss skips); None for regression scores, which must be floats. Integer ids are
    never guessed from floats: ``0.7`` is no class. Value checks read the labels back
    to the host, so a compiled model (``torch.compile``) checks dtype and shape only.
    """
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a tensor of shape {tuple(expected)} ({kind} labels), "
                        f"got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"labels must have shape {tuple(expected)} ({kind} labels), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the model's outputs on {device}")
    check_values = not torch.compiler.is_compiling()
    if classes is None:
        if not labels.is_floating_point():
            raise TypeError(f"labels of a regression head (num_labels=1) must be float scores, "
                            f"got {labels.dtype}; pass labels.float(), or build the model "
                            f"with num_labels >= 2 for class ids")
        if check_values and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels must be finite regression scores, found NaN or infinity")
        return labels
    name, count = classes
    what = "class ids" if kind == "sequence" else "token ids"
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        hint = ("; for regression scores build the model with num_labels=1"
                if kind == "sequence" else "")
        raise TypeError(f"labels must hold integer {what} (an integer dtype such as "
                        f"torch.long), got {labels.dtype}; convert whole-number labels with "
                        f"labels.long(){hint}")
    if check_values:
        valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < count))
        if not bool(valid.all()):
            wrong = labels[~valid]
            raise ValueError(f"labels must be {what} in [0, {name}={count}) or {IGNORE_INDEX} "
                             f"(ignored), found values in [{int(wrong.min())}, "
                             f"{int(wrong.max())}] outside it")
    return labels.long()


TASKS = {"mlm": MaskedLM, "causal-lm": CausalLM, "classification": SequenceClassifier}


def build_model(task: str, config: TransformerConfig, **kwargs) -> nn.Module:
    """``task`` in ``TASKS``; ``kwargs`` go to the head (e.g. ``num_labels``, ``pooling``,
    ``decoder=EnhancedMaskDecoder`` for DeBERTa's masked LM)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    return TASKS[task](config, **kwargs)
