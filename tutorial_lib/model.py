r"""BERT-style encoders, GPT-style decoders and their heads.

One stack serves both: :class:`Encoder` with ``config.causal=False`` is BERT
(Devlin et al., 2019); with ``config.causal=True`` (and usually
``norm_position="pre"``) it is a GPT-style decoder. A block is

* post-LN (BERT):  :math:`h \leftarrow \mathrm{LN}(h + \mathrm{Attn}(h))`,
  :math:`h \leftarrow \mathrm{LN}(h + \mathrm{FFN}(h))`, with a LayerNorm on the
  embeddings;
* pre-LN (GPT-2; Xiong et al., 2020): :math:`h \leftarrow h + \mathrm{Attn}(\mathrm{LN}(h))`,
  :math:`h \leftarrow h + \mathrm{FFN}(\mathrm{LN}(h))`, with a final LayerNorm.

Attention modifications are plugins (:mod:`tutorial_lib.attention`): those the
config asks for (RoPE and its variants, ALiBi, windows, log-n scaling) are built in
``Encoder.position_plugins`` and can be changed on a trained model with
:func:`set_position_options`; those a chapter adds live in
``Encoder.attention_plugins``. ``config.relative_attention`` makes the stack a
DeBERTa encoder (:mod:`tutorial_lib.deberta`: the disentangled-attention plugin
and the relative table ``Encoder.relative_embeddings``). Heads (masked LM,
sequence classification or regression, causal LM) sit on top of an encoder and
return a :class:`ModelOutput`.
The parameter layout follows Hugging Face BERT closely enough that
:func:`tutorial_lib.interop.from_hf` maps it one tensor to one tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionContext, AttentionPlugin, MultiHeadAttention, SlidingWindowMask
from .config import TransformerConfig
from .extrapolation import ALiBi, LogNScaling, ReRotaryEmbedding, ntk_scaled_base
from .deberta import DisentangledAttention, EnhancedMaskDecoder, RelativePositionTable
from .positions import RotaryEmbedding, sinusoidal_embedding

IGNORE_INDEX = -100

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class ModelOutput:
    """What every model returns. ``loss`` is None when no labels were given."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor  # (batch, seq, hidden), the encoder's final output
    loss: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None  # per layer (batch, heads, query, key)


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
        self.norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                     if config.norm_position == "post" else None)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs_embeds`` (batch, seq, hidden) replaces the word-embedding lookup."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        elif self.config.position_embedding == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, self.config.hidden_size).to(x.dtype)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
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


@dataclass
class EncoderState:
    """What :meth:`Encoder.encode` returns: enough to run the last layer again (EMD)."""

    hidden_states: torch.Tensor  # (batch, seq, hidden), the encoder's final output
    last_layer_input: torch.Tensor  # (batch, seq, hidden), H_{L-1}
    ctx: AttentionContext
    attentions: list[torch.Tensor] = field(default_factory=list)


class Encoder(nn.Module):
    """The Transformer stack: ``forward(input_ids, attention_mask)`` -> (batch, seq, hidden).

    ``attention_mask`` follows Hugging Face: 1 for tokens, 0 for padding.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                           if config.norm_position == "pre" else None)
        self.position_plugins = nn.ModuleList(position_plugins(config))
        self.attention_plugins = nn.ModuleList()
        # DeBERTa: the relative table lives here, shared by every layer (as in Hugging
        # Face); the plugin holds what is per layer.
        self.relative_embeddings = None
        if config.relative_attention:
            self.relative_embeddings = RelativePositionTable(
                config.relative_span, config.hidden_size, config.norm_rel_ebd,
                config.layer_norm_eps)
            self.attention_plugins.append(DisentangledAttention.from_config(config))
        self.apply(lambda module: init_weights(module, config.initializer_range))

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
               output_attentions: bool = False) -> EncoderState:
        """Like :meth:`forward`, also returning the last layer's input and the context."""
        batch, length, device = self._check_inputs(input_ids, attention_mask, token_type_ids,
                                                   position_ids, inputs_embeds)
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]  # (1, seq)
        key_padding = None if attention_mask is None else attention_mask.bool()
        if key_padding is not None and not torch.compiler.is_compiling() \
                and bool(key_padding.all()):
            key_padding = None  # nothing to mask: keep the fused kernel's fastest path
        ctx = AttentionContext(query_positions=position_ids, key_positions=position_ids,
                               key_padding_mask=key_padding, causal=self.config.causal)
        if self.relative_embeddings is not None:
            ctx.relative_embeddings = self.relative_embeddings()  # once for all layers
        h = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)
        plugins = tuple(self.position_plugins) + tuple(self.attention_plugins)
        attentions = []
        last_layer_input = h
        for layer in self.layers:
            ctx.layer_index = layer.layer_index
            last_layer_input = h
            h, weights = layer(h, ctx, plugins, need_weights=output_attentions)
            if output_attentions:
                attentions.append(weights)
        if self.final_norm is not None:
            h = self.final_norm(h)
        return EncoderState(h, last_layer_input, ctx, attentions)

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
        if input_ids is not None:
            if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
                raise ValueError("input_ids must be a tensor of shape (batch, seq), got "
                                 f"{_describe(input_ids)}")
            if input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
            if check_values and input_ids.numel() and (int(input_ids.min()) < 0
                                      or int(input_ids.max()) >= config.vocab_size):
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={config.vocab_size}), found values "
                    f"in [{int(input_ids.min())}, {int(input_ids.max())}]")
            shape = tuple(input_ids.shape)
            device = input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, seq, hidden_size="
                                 f"{config.hidden_size}), got {tuple(inputs_embeds.shape)}")
            shape = tuple(inputs_embeds.shape[:2])
            device = inputs_embeds.device
        if shape[1] == 0:
            raise ValueError("the input sequence is empty (seq = 0)")
        for name, tensor in (("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids)):
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have the shape of input_ids {shape}, "
                                 f"got {tuple(tensor.shape)}")
        if check_values and attention_mask is not None and attention_mask.numel() and \
                not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 (padding) and 1 (token)")
        if token_type_ids is not None:
            if config.type_vocab_size == 0:
                raise ValueError("token_type_ids given but the config has type_vocab_size=0")
            if check_values and (int(token_type_ids.min()) < 0
                                 or int(token_type_ids.max()) >= config.type_vocab_size):
                raise ValueError(f"token_type_ids must lie in [0, type_vocab_size="
                                 f"{config.type_vocab_size})")
        if position_ids is not None:
            if position_ids.dim() != 2 or position_ids.shape[-1] != shape[1] \
                    or position_ids.shape[0] not in (1, shape[0]):
                raise ValueError(f"position_ids must have shape (batch or 1, seq={shape[1]}), "
                                 f"got {tuple(position_ids.shape)}")
        if config.position_embedding == "learned" and (check_values or position_ids is None):
            longest = shape[1] if position_ids is None else int(position_ids.max()) + 1
            if longest > config.max_position_embeddings:
                raise ValueError(
                    f"sequence needs position {longest - 1} but the learned position "
                    f"embeddings cover only max_position_embeddings="
                    f"{config.max_position_embeddings} positions")
            if position_ids is not None and position_ids.is_floating_point():
                raise TypeError("learned position embeddings need integer position_ids")
        return shape[0], shape[1], device


def position_plugins(config: TransformerConfig) -> list[AttentionPlugin]:
    """The attention plugins the config's position options ask for, in calling order."""
    plugins: list[AttentionPlugin] = []
    if config.rotary:
        base = config.rotary_base
        if config.rotary_ntk_factor != 1:
            base = ntk_scaled_base(base, config.rotary_ntk_factor, config.head_dim)
        if config.rerope_window is None:
            plugins.append(RotaryEmbedding(config.head_dim, base=base,
                                           pairing=config.rotary_pairing))
        else:
            plugins.append(ReRotaryEmbedding(config.head_dim, config.rerope_window, base=base,
                                             pairing=config.rotary_pairing))
    if config.alibi:
        plugins.append(ALiBi(config.num_heads))
    if config.attention_window is not None:
        plugins.append(SlidingWindowMask(config.attention_window))
    if config.logn_training_length is not None:
        plugins.append(LogNScaling(config.logn_training_length, window=config.attention_window))
    return plugins


POSITION_OPTIONS = ("rotary", "rotary_base", "rotary_pairing", "rotary_ntk_factor",
                    "rerope_window", "alibi", "logn_training_length", "attention_window")


def set_position_options(model: nn.Module, **options) -> TransformerConfig:
    """Change position options (``POSITION_OPTIONS``) of a built, possibly trained, model.

    None of these options owns weights, so the model's parameters are untouched: the
    config is replaced (validated) on every module that holds it and the encoder's
    ``position_plugins`` are rebuilt; plugins added with ``add_attention_plugin`` stay.
    Returns the new config. Example: ``set_position_options(model, rerope_window=64,
    logn_training_length=128)`` before evaluating at four times the training length.
    """
    unknown = sorted(set(options) - set(POSITION_OPTIONS))
    if unknown:
        raise ValueError(f"set_position_options changes only {POSITION_OPTIONS}; "
                         f"got {unknown}")
    encoders = [module for module in model.modules() if isinstance(module, Encoder)]
    if len(encoders) != 1:
        raise ValueError(f"model must contain exactly one Encoder, found {len(encoders)}")
    encoder = encoders[0]
    old = encoder.config
    new = dataclasses.replace(old, **options)  # validates
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = new
    device = next(encoder.parameters()).device
    encoder.position_plugins = nn.ModuleList(position_plugins(new)).to(device)
    return new


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


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

    With ``enhanced_mask_decoder=True`` (DeBERTa's EMD,
    :class:`~tutorial_lib.deberta.EnhancedMaskDecoder`; needs
    ``position_embedding="none"``) the head reads the EMD's query stream: absolute
    positions plus the last layer's input, passed twice through the last layer. ``hidden_states`` stays the encoder's output, the
    representation fine-tuning uses; the EMD is for pre-training only.
    """

    def __init__(self, config: TransformerConfig, sparse_prediction: bool = False,
                 enhanced_mask_decoder: bool = False):
        super().__init__(config)
        self.sparse_prediction = sparse_prediction
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.activation]
        init_weights(self.transform, config.initializer_range)
        self.enhanced_mask_decoder = (EnhancedMaskDecoder(config) if enhanced_mask_decoder
                                      else None)
        if self.enhanced_mask_decoder is not None:
            init_weights(self.enhanced_mask_decoder.position_embeddings,
                         config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False) -> ModelOutput:
        state = self.encoder.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                    inputs_embeds, output_attentions)
        h = state.hidden_states
        attentions = state.attentions if output_attentions else None
        head_input = h if self.enhanced_mask_decoder is None else self.decode(state)
        if labels is not None:
            _check_labels(labels, h.shape[:2], "token")
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
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions)


    def decode(self, state: EncoderState) -> torch.Tensor:
        """The enhanced mask decoder's output (batch, seq, hidden) for an encoder state."""
        plugins = tuple(self.encoder.attention_plugins)
        h = self.enhanced_mask_decoder(self.encoder.layers[-1], state.last_layer_input,
                                       state.ctx, plugins)
        return h if self.encoder.final_norm is None else self.encoder.final_norm(h)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """The head: (..., hidden) -> (..., vocab) logits."""
        return self.project_to_vocab(self.transform_norm(self.activation(self.transform(h))))


class CausalLM(_LanguageModelBase):
    """Causal decoder + tied LM head. ``labels`` are the input ids; the loss shifts them."""

    def __init__(self, config: TransformerConfig):
        if not config.causal:
            raise ValueError("CausalLM needs a config with causal=True")
        super().__init__(config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False) -> ModelOutput:
        h, attentions = _run_encoder(self.encoder, input_ids, attention_mask, token_type_ids,
                                     position_ids, inputs_embeds, output_attentions)
        logits = self.project_to_vocab(h)  # (batch, seq, vocab)
        loss = None
        if labels is not None:
            _check_labels(labels, h.shape[:2], "token")
            # Position t predicts token t+1.
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions)


class SequenceClassifier(nn.Module):
    """Encoder + pooling + linear classifier; ``num_labels=1`` is regression (MSE).

    ``pooling="cls"`` is BERT's: the first token through a dense layer and tanh (the
    "pooler"); ``pooling="mean"`` averages the unpadded tokens.
    """

    def __init__(self, config: TransformerConfig, num_labels: int = 2, pooling: str = "cls",
                 classifier_dropout: float | None = None):
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1, got {num_labels!r}")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
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
        if self.pooling == "cls":
            return torch.tanh(self.pooler(h[:, 0]))
        if attention_mask is None:
            return h.mean(dim=1)
        weights = attention_mask.to(h.dtype)[..., None]  # (batch, seq, 1)
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, inputs_embeds=None,
                output_attentions=False) -> ModelOutput:
        h, attentions = _run_encoder(self.encoder, input_ids, attention_mask, token_type_ids,
                                     position_ids, inputs_embeds, output_attentions)
        logits = self.classifier(self.dropout(self.pool(h, attention_mask)))  # (batch, labels)
        loss = None
        if labels is not None:
            _check_labels(labels, h.shape[:1], "sequence")
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return ModelOutput(logits=logits, hidden_states=h, loss=loss, attentions=attentions)


def _run_encoder(encoder, input_ids, attention_mask, token_type_ids, position_ids,
                 inputs_embeds, output_attentions):
    out = encoder(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                  output_attentions=output_attentions)
    return out if output_attentions else (out, None)


def _check_labels(labels: torch.Tensor, expected: torch.Size, kind: str) -> None:
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"labels must have shape {tuple(expected)} ({kind} labels), "
                         f"got {tuple(labels.shape)}")


TASKS = {"mlm": MaskedLM, "causal-lm": CausalLM, "classification": SequenceClassifier}


def build_model(task: str, config: TransformerConfig, **kwargs) -> nn.Module:
    """``task`` in ``TASKS``; ``kwargs`` go to the head (e.g. ``num_labels``, ``pooling``,
    ``enhanced_mask_decoder=True`` for DeBERTa's masked LM)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
    return TASKS[task](config, **kwargs)
