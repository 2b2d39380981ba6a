"""The core's extension points: registered blocks, per-layer hidden states, switchable
position options.

A toy block registered here (pre-LN attention and a gated MLP, no FFN of BERT's kind)
must be a full citizen of the library: padding masks, heads, attention weights,
checkpoints and resumed training work with it exactly as with the default
``"transformer"`` block, which it leaves untouched.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from standins import VOCAB, make_examples, mlm_collate
from tutorial_lib import (EXTENSIONS, CausalLM, Encoder, MaskedLM, SequenceClassifier,
                          TransformerConfig, build_model)
from tutorial_lib.core.attention import MultiHeadAttention
from tutorial_lib.core.config import SWITCHABLE
from tutorial_lib.core.model import (TransformerBlock, position_options, switchable_options)
from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.training.loop import BatchLoader, TrainConfig, default_loss_step, train


def tiny(**overrides):
    return TransformerConfig.preset("tiny", vocab_size=VOCAB, **overrides)


class GatedBlock(nn.Module):
    """A block of another kind: pre-LN attention, then a gated (SwiGLU-like) MLP."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = MultiHeadAttention(config.hidden_size, config.num_heads,
                                            dropout=config.attention_dropout)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h, ctx, plugins=(), key_value_states=None, need_weights=False):
        kv = None if key_value_states is None else self.attention_norm(key_value_states)
        attended, weights = self.attention(self.attention_norm(h), ctx, plugins, kv, need_weights)
        h = h + self.dropout(attended)
        x = self.mlp_norm(h)
        h = h + self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))
        return h, weights


@pytest.fixture
def toy():
    """``block="toy"`` builds GatedBlock layers while the test runs, and no longer after."""
    EXTENSIONS.register_block("toy", GatedBlock)
    try:
        yield
    finally:
        EXTENSIONS.blocks.pop("toy", None)


TOY = tiny(block="toy")
TOY_DECODER = tiny(block="toy", causal=True, norm_position="pre", type_vocab_size=0)
HEADS = {
    "mlm": (TOY, {}, MaskedLM),
    "classification": (TOY, {"num_labels": 3}, SequenceClassifier),
    "causal-lm": (TOY_DECODER, {}, CausalLM),
}


def build(task, seed=0, config=None):
    default, kwargs, _ = HEADS[task]
    torch.manual_seed(seed)
    return build_model(task, config or default, **kwargs).eval()


def ids_and_mask(seed=0, lengths=(11, 7, 3)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids, mask


# -- blocks -------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(HEADS))
def test_build_model_builds_the_registered_block_under_every_head(toy, task):
    config, _, head = HEADS[task]
    model = build(task)
    assert type(model) is head
    assert [type(layer) for layer in model.encoder.layers] == [GatedBlock] * config.num_layers
    assert [layer.layer_index for layer in model.encoder.layers] == list(range(config.num_layers))
    ids, mask = ids_and_mask()
    labels = torch.tensor([0, 2, 1]) if task == "classification" else \
        torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    model.train()
    out = model(ids, mask, labels=labels, output_attentions=True, output_hidden_states=True)
    assert torch.isfinite(out.loss)
    assert out.logits.shape == ((3, 3) if task == "classification" else (3, 11, VOCAB))
    assert len(out.attentions) == config.num_layers
    assert len(out.all_hidden_states) == config.num_layers + 1
    for weights in out.attentions:  # the block passed need_weights through
        assert weights.shape == (3, config.num_heads, 11, 11)
        assert (weights[0].sum(-1) - 1).abs().max() < 1e-5
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("task", ["mlm", "causal-lm"])
def test_padding_never_changes_unpadded_outputs_with_the_registered_block(toy, task):
    model = build(task)
    for seed, (length, pad) in enumerate([(1, 3), (5, 1), (9, 6)]):
        ids, _ = ids_and_mask(seed, lengths=(length,))
        padded = torch.cat([ids, torch.randint(5, VOCAB, (1, pad))], dim=1)
        mask = torch.cat([torch.ones(1, length), torch.zeros(1, pad)], dim=1).long()
        with torch.no_grad():
            alone = model(ids).logits
            masked = model(padded, mask).logits
            unmasked = model(padded).logits
        assert torch.allclose(masked[:, :length], alone, atol=1e-5)
        if task == "mlm":  # the padding tokens would change the result: the mask matters
            assert not torch.allclose(unmasked[:, :length], alone, atol=1e-5)


def test_the_registered_block_keeps_a_decoder_causal(toy):
    model = build("causal-lm")
    ids, _ = ids_and_mask(lengths=(10,))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("task", list(HEADS))
def test_weights_and_checkpoints_of_a_registered_block_round_trip(toy, tmp_path, task):
    config = HEADS[task][0]
    model = build(task, seed=0)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = model(ids, mask).logits

    ckpt.save_weights(model, tmp_path / "model.safetensors")
    fresh = build(task, seed=1)
    with torch.no_grad():
        assert not torch.allclose(fresh(ids, mask).logits, expected)
    ckpt.load_weights(tmp_path / "model.safetensors", fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask).logits, expected)

    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path / "checkpoints", 3, model=model,
                         training_state={"optimizer": optimizer.state_dict()},
                         state={"model_config": config.to_dict()})
    saved = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    other = build(task, seed=2)
    ckpt.load_model_state(other, saved, config)
    with torch.no_grad():
        assert torch.equal(other(ids, mask).logits, expected)
    # The block is part of the recorded config: a default-block model is told so.
    with pytest.raises(ckpt.CheckpointError, match="block"):
        ckpt.load_model_state(other, saved, dataclasses.replace(config, block="transformer"))


class Interrupt(Exception):
    pass


def test_training_a_registered_block_resumes_bitwise(toy, tmp_path):
    """A crash after step 5 (checkpoint at 4) and a resume reproduce the uninterrupted run."""
    config = tiny(block="toy")  # dropout on: the resumed RNG streams matter

    def start():
        torch.manual_seed(1234)
        return MaskedLM(config), BatchLoader(make_examples(), 8, mlm_collate, seed=7)

    def settings():
        return TrainConfig(steps=6, lr=1e-2, warmup_steps=2, log_every=2, save_every=2,
                           progress=False, device="cpu")

    reference = train(*start(), settings(), out_dir=tmp_path / "reference")
    calls = {"n": 0}

    def crash_after_five(model, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Interrupt
        return default_loss_step(model, batch)

    with pytest.raises(Interrupt):
        train(*start(), settings(), out_dir=tmp_path / "run", loss_step=crash_after_five)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")] == \
        ["step-00000002", "step-00000004"]
    resumed = train(*start(), settings(), out_dir=tmp_path / "run", resume=True)

    initial = start()[0].state_dict()
    final = reference.model.state_dict()
    assert not all(torch.equal(initial[name], final[name]) for name in final)  # it trained
    for name, tensor in final.items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    strip = lambda history: [{k: v for k, v in r.items() if k != "elapsed_s"}  # noqa: E731
                             for r in history]
    assert strip(resumed.history) == strip(reference.history)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["block"] == "toy"


def test_an_unregistered_block_is_refused_naming_config_block():
    for make in (lambda: Encoder(tiny(block="nope")),
                 lambda: build_model("mlm", tiny(block="nope"))):
        with pytest.raises(ValueError, match=r"config\.block must be one of \[.*'transformer'.*"
                                             r"got 'nope'"):
            make()
    with pytest.raises(ValueError, match="block must be the name of a registered block"):
        tiny(block="")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        EXTENSIONS.register_block("", GatedBlock)
    with pytest.raises(TypeError, match="build must be callable"):
        EXTENSIONS.register_block("toy", "GatedBlock")
    assert "toy" not in EXTENSIONS.blocks


def test_the_default_block_is_unaffected_by_registering_another():
    assert tiny().block == "transformer"
    assert EXTENSIONS.blocks["transformer"] is TransformerBlock
    ids, mask = ids_and_mask()

    def logits():
        torch.manual_seed(0)
        model = MaskedLM(tiny()).eval()
        assert all(type(layer) is TransformerBlock for layer in model.encoder.layers)
        with torch.no_grad():
            return model(ids, mask).logits

    before = logits()
    EXTENSIONS.register_block("toy", GatedBlock)
    try:
        assert torch.equal(logits(), before)
    finally:
        EXTENSIONS.blocks.pop("toy")
    assert "toy" not in EXTENSIONS.blocks


# -- per-layer hidden states --------------------------------------------------------------

def hf_config(transformers, **overrides):
    values = dict(vocab_size=211, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64, type_vocab_size=2)
    values.update(overrides)
    return transformers.BertConfig(**values)


def padded_batch(vocab=211, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 23), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate([23, 17, 9, 2]):  # unequal lengths, one very short
        mask[row, length:] = 0
        ids[row, length:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    return ids, mask, types


@pytest.mark.parametrize("kind", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_hidden_states_match_hugging_face(kind):
    transformers = pytest.importorskip("transformers")
    from tutorial_lib.interop import from_hf

    torch.manual_seed(0)
    hf = getattr(transformers, kind)(hf_config(transformers)).eval()
    with torch.no_grad():  # large position embeddings, so an index error would show
        hf.base_model.embeddings.position_embeddings.weight.normal_(0, 1.0)
    ours = from_hf(hf)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types,
                      output_hidden_states=True).hidden_states
        if kind == "BertModel":
            state = ours.encode(ids, mask, types, output_hidden_states=True)
            got, final = state.all_hidden_states, state.hidden_states
        else:
            out = ours(ids, mask, types, output_hidden_states=True)
            got, final = out.all_hidden_states, out.hidden_states
    assert len(expected) == 4 and len(got) == 4  # the embedding output and 3 layers
    real = mask.bool()
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a[real], b[real], atol=1e-5, rtol=0), index
    assert torch.equal(got[-1], final)


def test_pre_ln_states_are_the_layer_outputs_with_the_final_norm_on_the_last():
    config = tiny(causal=True, norm_position="pre", type_vocab_size=0)
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    ids, _ = ids_and_mask(lengths=(12, 12))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        states = out.all_hidden_states
        assert len(states) == config.num_layers + 1
        assert torch.equal(states[-1], out.hidden_states)
        # By hand: the embeddings, then each layer on the previous state.
        encoder = model.encoder
        ctx = encoder.encode(ids).ctx
        assert torch.equal(states[0], encoder.embeddings(ids, torch.arange(12)[None]))
        h = states[0]
        for index, layer in enumerate(encoder.layers):
            ctx.layer_index = index
            h, _ = layer(h, ctx, ())
            if index < config.num_layers - 1:
                assert torch.equal(states[index + 1], h), index
        assert torch.equal(states[-1], encoder.final_norm(h))
        assert not torch.allclose(states[-1], h, atol=1e-3)  # the norm did something


@pytest.mark.parametrize("task", ["mlm", "classification", "causal-lm"])
def test_hidden_states_are_returned_only_when_asked_and_change_nothing(task):
    config = tiny(causal=True, norm_position="pre") if task == "causal-lm" else tiny()
    torch.manual_seed(0)
    model = build_model(task, config).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        plain = model(ids, mask)
        full = model(ids, mask, output_hidden_states=True)
    assert plain.all_hidden_states is None
    assert model.encoder.encode(ids, mask).all_hidden_states is None
    assert torch.equal(plain.logits, full.logits)
    assert torch.equal(plain.hidden_states, full.hidden_states)
    assert len(full.all_hidden_states) == config.num_layers + 1
    assert all(s.shape == (3, 11, config.hidden_size) for s in full.all_hidden_states)


# -- switchable position options -----------------------------------------------------------

# Weights large enough (init std 0.3) for attention to depend visibly on the positions.
ROPE = tiny(position_embedding="none", rotary=True, initializer_range=0.3)


def configs_by_module(model):
    return {name: module.config for name, module in model.named_modules()
            if isinstance(getattr(module, "config", None), TransformerConfig)}


def assert_restored(model, configs, plugins, plugin_list, weights):
    assert configs_by_module(model).keys() == configs.keys()
    for name, config in configs_by_module(model).items():
        assert config is configs[name], name
    assert model.encoder.position_plugins is plugins
    assert list(model.encoder.position_plugins) == plugin_list
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def snapshot(model):
    plugins = model.encoder.position_plugins
    return (configs_by_module(model), plugins, list(plugins),
            {k: v.clone() for k, v in model.state_dict().items()})


def test_position_options_change_the_model_inside_the_block_only():
    torch.manual_seed(0)
    model = MaskedLM(ROPE).eval()
    original = model.config
    saved = snapshot(model)
    assert len(saved[0]) >= 3  # the head, the encoder and the embeddings hold it
    ids, mask = ids_and_mask(lengths=(24, 19, 11))
    with torch.no_grad():
        before = model(ids, mask).logits
        with position_options(model, rotary_ntk_factor=4.0) as temporary:
            assert temporary.diff(original) == {"rotary_ntk_factor": (4.0, 1.0)}
            assert all(config is temporary for config in configs_by_module(model).values())
            assert model.encoder.position_plugins is not saved[1]
            inside = model(ids, mask).logits
        after = model(ids, mask).logits
    real = mask.bool()
    assert not torch.allclose(inside[real], before[real], atol=1e-2)
    assert torch.equal(after, before)
    assert original.rotary_ntk_factor == 1.0  # the original object was never changed
    assert_restored(model, *saved)
    # Inside, the model was the one built with those options.
    built = MaskedLM(dataclasses.replace(ROPE, rotary_ntk_factor=4.0)).eval()
    built.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(built(ids, mask).logits[real], inside[real], atol=1e-6)


def test_position_options_are_restored_when_the_block_raises():
    torch.manual_seed(0)
    model = SequenceClassifier(ROPE, num_labels=2).eval()
    saved = snapshot(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model(ids, mask).logits
    with pytest.raises(RuntimeError, match="inside the block"):
        with position_options(model, rotary_ntk_factor=4.0, attention_window=3):
            assert model.encoder.config.attention_window == 3
            raise RuntimeError("inside the block")
    assert_restored(model, *saved)
    with torch.no_grad():
        assert torch.equal(model(ids, mask).logits, before)


@pytest.mark.parametrize("options, name", [
    ({"hidden_size": 64}, "hidden_size"),
    ({"rotary_ntk_factor": 4.0, "relative_attention": True}, "relative_attention"),
    ({"block": "toy"}, "block"),
    ({"rotary_ntk_factor": 0.5}, "rotary_ntk_factor"),  # switchable, but invalid
])
def test_position_options_refuse_what_they_cannot_switch(options, name):
    torch.manual_seed(0)
    model = MaskedLM(ROPE).eval()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=name):
        with position_options(model, **options):
            pytest.fail("the block must not run")
    assert_restored(model, *saved)


def test_switchable_options_are_the_marked_position_fields():
    marked = {f.name for f in dataclasses.fields(TransformerConfig) if f.metadata == SWITCHABLE}
    assert set(switchable_options()) == marked
    assert {"rotary", "rotary_ntk_factor", "rerope_window", "alibi", "attention_window",
            "logn_training_length"} <= marked
    assert not {"hidden_size", "num_layers", "block", "relative_attention",
                "position_embedding", "max_position_embeddings"} & marked


def test_the_toy_block_left_no_trace():
    assert "toy" not in EXTENSIONS.blocks


def test_technique_options_are_checked_by_their_technique_modules():
    from tutorial_lib.core import config as core_config
    from tutorial_lib.techniques import deberta, extrapolation

    assert extrapolation.check_config in core_config.CONFIG_CHECKS
    assert deberta.check_config in core_config.CONFIG_CHECKS
    with pytest.raises(ValueError, match="rerope_window modifies RoPE"):
        TransformerConfig.preset("tiny", rerope_window=4)
    with pytest.raises(ValueError, match="norm_rel_ebd"):
        TransformerConfig.preset("tiny", relative_attention=True, norm_rel_ebd="batch_norm")
    with pytest.raises(TypeError, match="check must be callable"):
        core_config.register_config_check("not a function")
