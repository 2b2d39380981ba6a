"""The gated attention unit (chapter 6): parity with flash-pytorch's ``GAU`` and with the
GAU-α port ``gau-alpha``, float64 rebuilds of the four normalisers, the parameter count,
padding invariance and causality of the block in every head, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from standins import VOCAB, make_examples, mlm_collate
from tutorial_lib import build_model
from tutorial_lib.assembly import position_plugins
from tutorial_lib.core.attention import AttentionContext
from tutorial_lib.core.model import TransformerBlock
from tutorial_lib.techniques import gau
from tutorial_lib.techniques.gau import (GAUBlock, GAUOptions, gau_config, gau_parameter_count,
                                         transformer_parameter_count)
from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.training.loop import BatchLoader, TrainConfig, default_loss_step, train

flash_pytorch = pytest.importorskip("flash_pytorch")


def gau_alpha_layer_module():
    """gau_alpha/layer.py loaded by path: ``import gau_alpha`` fails with transformers >= 5."""
    spec = importlib.util.find_spec("gau_alpha")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gau-alpha is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "layer.py"
    module_spec = importlib.util.spec_from_file_location("gau_alpha_layer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def context(batch, length, mask=None, causal=False):
    positions = torch.arange(length)[None]
    return AttentionContext(query_positions=positions, key_positions=positions,
                            key_padding_mask=mask, causal=causal)


def padding(lengths, total):
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (batch, total)


# -- parity with flash-pytorch's GAU ------------------------------------------------------

def flash_pair(causal, hidden=32, key_size=16, seed=0):
    """flash-pytorch's GAU and our block with the same weights, in float64.

    Its T5 relative bias is always built (``rel_pos_bias=False`` is ignored): its table is
    zeroed. It divides by the padded length n *before* relu² (1/n² on qkᵀ, no 1/√s), so
    our block runs ``relu2_code`` with ``normaliser_length`` = the padded length.
    """
    torch.manual_seed(seed)
    reference = flash_pytorch.GAU(dim=hidden, query_key_dim=key_size, expansion_factor=2.0,
                                  causal=causal, dropout=0.0).double().eval()
    with torch.no_grad():
        reference.rel_pos_bias.relative_attention_bias.weight.zero_()
        reference.offsetscale.beta.normal_()  # β = 0 at init would hide an offset error
    return reference


def our_block_like(reference, length, causal, hidden=32, key_size=16):
    config = gau_config("tiny", hidden_size=hidden, num_heads=hidden // key_size,
                        norm_position="pre", layer_norm_eps=reference.norm.eps, causal=causal,
                        gau={"normaliser": "relu2_code", "normaliser_length": length})
    block = GAUBlock(config).double().eval()
    e = block.expanded_size
    with torch.no_grad():
        hidden_w, hidden_b = reference.to_hidden[0].weight, reference.to_hidden[0].bias
        # flash-pytorch chunks to_hidden into (v, gate); ours is one layer of (u, v, z).
        block.project.weight.copy_(torch.cat([hidden_w[e:], hidden_w[:e],
                                              reference.to_qk[0].weight]))
        block.project.bias.copy_(torch.cat([hidden_b[e:], hidden_b[:e],
                                            reference.to_qk[0].bias]))
        block.offset_scale.gamma.copy_(reference.offsetscale.gamma)
        block.offset_scale.beta.copy_(reference.offsetscale.beta)
        block.output.load_state_dict(reference.to_out[0].state_dict())
        block.norm.load_state_dict(reference.norm.state_dict())
    return block


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(13, 13), (13, 6)])
def test_gau_matches_flash_pytorch(causal, lengths):
    total = max(lengths)
    reference = flash_pair(causal)
    block = our_block_like(reference, total, causal)
    x = torch.randn(len(lengths), total, 32, dtype=torch.float64) * 3
    mask = padding(lengths, total)
    with torch.no_grad():
        expected = reference(x, mask=mask)
        ours, _ = block(x, context(len(lengths), total, mask, causal))
    real = mask[..., None].expand_as(ours)
    error = (ours - expected)[real].abs().max().item()
    assert error < 1e-12, error
    # The comparison can fail: the paper's text normaliser gives another answer.
    block.options = dataclasses.replace(block.options, normaliser="relu2", normaliser_length=None)
    with torch.no_grad():
        other, _ = block(x, context(len(lengths), total, mask, causal))
    assert (other - expected)[real].abs().max() > 1e-3


def test_flash_pytorch_adds_its_t5_bias_even_when_told_not_to():
    """What flash-pytorch 0.1.9 does with ``rel_pos_bias=False``: builds the bias anyway."""
    torch.manual_seed(0)
    reference = flash_pytorch.GAU(dim=32, query_key_dim=16, rel_pos_bias=False)
    assert reference.rel_pos_bias is not None
    assert reference.rel_pos_bias.relative_attention_bias.weight.abs().sum() > 0


# -- GAU-α ---------------------------------------------------------------------------------

def alpha_pair(length_of_rope, hidden=32, key_size=16, seed=0):
    layer_module = gau_alpha_layer_module()
    torch.manual_seed(seed)
    reference = layer_module.GAULayer(hidden_size=hidden, intermediate_size=2 * hidden,
                                      attention_key_size=key_size, use_bias=False,
                                      normalization="softmax_plus", attention_dropout=0.0,
                                      hidden_dropout=0.0).double().eval()
    with torch.no_grad():  # weights of a trained scale, not the unit init
        reference.gau.q_scaleoffset.weight.normal_()
        reference.gau.k_scaleoffset.weight.normal_()
    config = gau_config("tiny", hidden_size=hidden, num_heads=hidden // key_size,
                        norm_position="post", rotary=True, rotary_pairing="interleaved",
                        gau={"normaliser": "softmax_plus", "norm": "rms", "bias": False,
                             "offset_scale_init": "ones"})
    block = GAUBlock(config).double().eval()
    with torch.no_grad():
        block.project.weight.copy_(reference.gau.i_dense.weight)
        block.output.weight.copy_(reference.gau.o_dense.weight)
        block.offset_scale.gamma.copy_(torch.stack([reference.gau.q_scaleoffset.weight,
                                                    reference.gau.k_scaleoffset.weight]))
    # gau-alpha's RoPE: sin and cos of position · 10000^(-2i/s), shape (1, n, s/2).
    frequencies = 10000.0 ** (-2 * torch.arange(key_size // 2, dtype=torch.float64) / key_size)
    angles = torch.arange(length_of_rope, dtype=torch.float64)[:, None] * frequencies
    rope = (angles.sin()[None], angles.cos()[None])
    return reference, block, position_plugins(config), rope


@pytest.mark.parametrize("lengths", [(40, 40), (40, 17)])
def test_gau_alpha_layer_matches_the_gau_alpha_package(lengths):
    total = max(lengths)
    reference, block, plugins, rope = alpha_pair(total)
    x = torch.randn(len(lengths), total, 32, dtype=torch.float64)
    mask = padding(lengths, total)
    with torch.no_grad():
        expected = reference(x, mask[:, None, :].long(), rope)[0]
        ours, _ = block(x, context(len(lengths), total, mask), [p.double() for p in plugins])
    real = mask[..., None].expand_as(ours)
    error = (ours - expected)[real].abs().max().item()
    assert error < 1e-8, error  # the port takes log(ℓ) of an integer tensor: float32


def test_softmax_plus_counts_at_least_16_keys_where_the_port_does_not():
    """Below 16 keys GAU-α's bert4keras clamps ℓ at 16; the PyTorch port does not."""
    length = 8
    reference, block, plugins, rope = alpha_pair(length)
    x = torch.randn(1, length, 32, dtype=torch.float64)
    with torch.no_grad():
        port = reference(x, None, rope)[0]
        ours, weights = block(x, context(1, length), [p.double() for p in plugins],
                              need_weights=True)
        # Rebuild the weights in float64 from the block's own q and k.
        _, _, z = block.branches(x)
        q, k = block.offset_scale(z)
        q, k = plugins[0].double().transform_qk(block, q[:, None], k[:, None], context(1, length))
        scores = q @ k.transpose(-1, -2) / math.sqrt(16)
        rebuilt = torch.softmax(scores * math.log(16) / math.log(512), dim=-1)
    assert (weights - rebuilt).abs().max() < 1e-12
    assert (ours - port).abs().max() > 1e-6  # the clamp changes the answer at n = 8


# -- the four normalisers, rebuilt in float64 ----------------------------------------------

def reference_weights(scores, allowed, normaliser, n_fixed=None):
    """The normalisers from their formulas, one query row at a time."""
    out = torch.zeros_like(scores)
    batch, _, queries, _ = scores.shape
    for b in range(batch):
        for i in range(queries):
            keep = allowed[b, 0, i]
            row = scores[b, 0, i][keep]
            n = n_fixed or int(keep.sum())
            if normaliser == "relu2":
                values = torch.relu(row / math.sqrt(16)) ** 2 / n
            elif normaliser == "relu2_code":
                values = torch.relu(row / n) ** 2
            elif normaliser == "softmax":
                values = torch.softmax(row / math.sqrt(16), -1)
            else:
                values = torch.softmax(row / math.sqrt(16) * math.log(max(n, 16)) / math.log(512), -1)
            out[b, 0, i, keep] = values
    return out


@pytest.mark.parametrize("normaliser", gau.NORMALISERS)
@pytest.mark.parametrize("causal", [False, True])
def test_normalisers_match_their_formulas(normaliser, causal):
    lengths, total = (30, 11), 30
    config = gau_config("tiny", hidden_size=32, num_heads=2, causal=causal,
                        gau={"normaliser": normaliser})
    torch.manual_seed(0)
    block = GAUBlock(config).double().eval()
    q = torch.randn(2, 1, total, 16, dtype=torch.float64) * 2
    k = torch.randn(2, 1, total, 16, dtype=torch.float64) * 2
    mask = padding(lengths, total)
    weights = block.attention_weights(q, k, context(2, total, mask, causal))
    allowed = mask[:, None, None, :].expand(2, 1, total, total)
    if causal:
        allowed = allowed & torch.ones(total, total, dtype=torch.bool).tril()
    expected = reference_weights(q @ k.transpose(-1, -2), allowed, normaliser)
    real_queries = mask[:, None, :, None].expand_as(weights)
    assert (weights - expected)[real_queries].abs().max() < 1e-12
    if normaliser.startswith("relu2"):
        fixed = dataclasses.replace(block.options, normaliser_length=64)
        block.options = fixed
        weights = block.attention_weights(q, k, context(2, total, mask, causal))
        expected = reference_weights(q @ k.transpose(-1, -2), allowed, normaliser, n_fixed=64)
        assert (weights - expected)[real_queries].abs().max() < 1e-12


def test_offset_scale_is_an_affine_map_per_dimension():
    scale = gau.OffsetScale(4, heads=2)
    with torch.no_grad():
        scale.gamma.copy_(torch.tensor([[1., 2, 3, 4], [-1, 0, 1, 2]]))
        scale.beta.copy_(torch.tensor([[0., 0, 0, 1], [5, 5, 5, 5]]))
    q, k = scale(torch.ones(3, 4))
    assert torch.equal(q, torch.tensor([[1., 2, 3, 5]]).expand(3, 4))
    assert torch.equal(k, torch.tensor([[4., 5, 6, 7]]).expand(3, 4))
    assert gau.OffsetScale(4, offset=False).beta is None


# -- parameter count -----------------------------------------------------------------------

@pytest.mark.parametrize("bias,norm", [(True, "layer_norm"), (False, "rms"), (True, "scale_norm")])
def test_parameter_count_formula(bias, norm):
    config = gau_config("tiny", hidden_size=48, num_heads=3, gau={"bias": bias, "norm": norm})
    block = GAUBlock(config)
    assert sum(p.numel() for p in block.parameters()) == \
        gau_parameter_count(48, 96, 16, bias=bias, norm=norm)


def test_two_gaus_hold_about_the_parameters_of_one_transformer_layer():
    """At d = 768, s = 128, e = 2d: 7.29 M (7.28 M without the GAUs' LayerNorms) against
    7.09 M, +2.8 %: the Z projection and OffsetScale."""
    with torch.device("meta"):
        config = gau_config("bert-base", num_heads=6)
        pair = sum(p.numel() for p in GAUBlock(config).parameters()) * 2
        layer = sum(p.numel() for p in TransformerBlock(
            dataclasses.replace(config, block="transformer", extra={}, num_heads=12), 0)
            .parameters())
    assert pair == 2 * gau_parameter_count(768, 1536, 128)
    assert layer == transformer_parameter_count(768, 3072)
    assert round(pair / 1e6, 2) == 7.29 and round(layer / 1e6, 2) == 7.09
    assert round(2 * gau_parameter_count(768, 1536, 128, norm="rms") / 1e6, 2) == 7.28
    assert 0.027 < pair / layer - 1 < 0.029


# -- a citizen of the library: heads, padding, causality, checkpoints ------------------------

def tiny_gau(**overrides):
    gau_options = overrides.pop("gau", {})
    return gau_config("tiny", vocab_size=VOCAB, gau=gau_options, **overrides)


def ids_and_mask(seed=0, lengths=(11, 7, 3)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=generator)
    return ids, padding(lengths, max(lengths)).long()


@pytest.mark.parametrize("normaliser", gau.NORMALISERS)
@pytest.mark.parametrize("task", ["mlm", "causal-lm"])
def test_padding_never_changes_unpadded_outputs(normaliser, task):
    causal = task == "causal-lm"
    # initializer_range 0.5: at BERT's 0.02 relu² attention starts near zero (scores
    # ~1e-2, squared), and the check that the mask matters could not fail.
    config = tiny_gau(causal=causal, norm_position="pre" if causal else "post",
                      rotary=True, position_embedding="none", initializer_range=0.5,
                      gau={"normaliser": normaliser})
    torch.manual_seed(0)
    model = build_model(task, config).eval()
    for seed, (length, pad) in enumerate([(1, 3), (5, 1), (9, 6)]):
        ids, _ = ids_and_mask(seed, lengths=(length,))
        padded = torch.cat([ids, torch.randint(5, VOCAB, (1, pad))], dim=1)
        mask = torch.cat([torch.ones(1, length), torch.zeros(1, pad)], dim=1).long()
        with torch.no_grad():
            alone = model(ids).logits
            masked = model(padded, mask).logits
            unmasked = model(padded).logits
        assert torch.allclose(masked[:, :length], alone, atol=1e-5)
        if not causal:  # the padding tokens would change the result: the mask matters
            assert not torch.allclose(unmasked[:, :length], alone, atol=1e-5)


@pytest.mark.parametrize("normaliser", gau.NORMALISERS)
def test_a_gau_decoder_never_sees_the_future(normaliser):
    config = tiny_gau(causal=True, norm_position="pre", type_vocab_size=0,
                      gau={"normaliser": normaliser, "offset_scale_init": "ones"})
    torch.manual_seed(0)
    model = build_model("causal-lm", config).eval()
    ids, _ = ids_and_mask(lengths=(10,))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("task,kwargs", [("mlm", {}), ("classification", {"num_labels": 3}),
                                         ("causal-lm", {})])
def test_every_head_builds_and_trains_a_gau_stack(task, kwargs):
    config = tiny_gau(causal=task == "causal-lm")
    torch.manual_seed(0)
    model = build_model(task, config, **kwargs).train()
    assert all(type(layer) is GAUBlock for layer in model.encoder.layers)
    ids, mask = ids_and_mask()
    labels = torch.tensor([0, 2, 1]) if task == "classification" else \
        torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    out = model(ids, mask, labels=labels, output_attentions=True)
    assert torch.isfinite(out.loss)
    assert [w.shape for w in out.attentions] == [(3, 1, 11, 11)] * config.num_layers
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


class Interrupt(Exception):
    pass


def test_training_a_gau_model_resumes_bitwise(tmp_path):
    """A crash after step 5 (checkpoint at 4) and a resume reproduce the uninterrupted run."""
    config = tiny_gau()  # dropout on: the resumed RNG streams matter

    def start():
        torch.manual_seed(1234)
        return build_model("mlm", config), BatchLoader(make_examples(), 8, mlm_collate, seed=7)

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
    resumed = train(*start(), settings(), out_dir=tmp_path / "run", resume=True)
    initial = start()[0].state_dict()
    final = reference.model.state_dict()
    assert not all(torch.equal(initial[name], final[name]) for name in final)  # it trained
    for name, tensor in final.items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["block"] == "gau" and saved["extra"] == {"gau": {}}
    latest = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ckpt.CheckpointError, match="block"):
        ckpt.load_model_state(build_model("mlm", config), latest,
                              dataclasses.replace(config, block="transformer", extra={}))


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    ({"normaliser": "relu3"}, "normaliser must be one of"),
    ({"normaliser": "softmax", "normaliser_length": 64}, "normaliser_length"),
    ({"normaliser_length": 0}, "normaliser_length"),
    ({"expansion": -1}, "expansion"),
    ({"norm": "batch"}, "norm must be one of"),
    ({"key_size": 64}, "unknown GAU option"),
    ({"logn_base": 1}, "logn_base"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        tiny_gau(gau=options)


def test_gau_options_need_the_gau_block_and_no_alibi():
    with pytest.raises(ValueError, match="block is 'transformer'"):
        gau.TransformerConfig.preset("tiny", extra={"gau": {}})
    with pytest.raises(ValueError, match="alibi"):
        tiny_gau(alibi=True)
    assert GAUOptions.of(tiny_gau(gau={"normaliser": "softmax"})).normaliser == "softmax"


# -- the shipped config: the training command line trains and resumes a GAU stack ----------

def test_the_gau_preset_trains_and_resumes_with_the_command_line(tmp_path, capsys):
    import importlib
    cli = importlib.import_module("tutorial_lib.training.cli")
    shipped = Path(__file__).resolve().parents[1] / "configs" / "mlm_wikitext2_gau_cpu.json"
    values = json.loads(shipped.read_text())
    config = cli.load_run_config(shipped)
    model_config = gau.TransformerConfig.preset(config.model.preset, vocab_size=8000,
                                                **config.model.overrides)
    layer = gau.TransformerConfig.preset("cpu-notebook", hidden_size=128, num_layers=4,
                                         num_heads=2, intermediate_size=512, vocab_size=8000)
    with torch.device("meta"):
        ours = sum(p.numel() for p in build_model("mlm", model_config).parameters())
        baseline = sum(p.numel() for p in build_model("mlm", layer).parameters())
    assert model_config.block == "gau" and abs(ours / baseline - 1) < 0.05
    # The same config at test size: offline data, 4 + 2 updates.
    values["model"]["overrides"].update(hidden_size=32, num_layers=2, intermediate_size=64,
                                        max_position_embeddings=32)
    values["tokenizer"]["vocab_size"] = 600
    values["data"].update(max_length=24, max_train_lines=120, max_eval_lines=40,
                          eval_sequences=16, eval_batch_size=8, download=False)
    values["batch"]["global_batch_size"] = 8
    values["training"].update(steps=4, log_every=2, eval_every=2, save_every=2, device="cpu",
                              progress=False)
    path = tmp_path / "gau.json"
    path.write_text(json.dumps(values))
    out = tmp_path / "out"
    assert cli.main(["--config", str(path), "--out", str(out)]) == 0
    saved = gau.TransformerConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert saved.block == "gau" and GAUOptions.of(saved).normaliser == "relu2"
    expected = ckpt.read_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert cli.main(["--config", str(path), "--out", str(out), "--resume", "--max-steps", "6"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [2, 4, 6]
    assert all(math.isfinite(r.get("loss", r.get("eval_loss", 0.0))) for r in records)
    assert expected is not None and ckpt.latest_checkpoint(out / "checkpoints").name == \
        "step-00000006"


# -- FLASH: mixed chunk attention (chunk_size) ----------------------------------------------

def test_flash_matches_flash_pytorch_bidirectional():
    """flash-pytorch's FLASH (T5 table zeroed, no token shift, no rotary): quadratic
    relu²(qkᵀ/c) in chunks plus linear attention over all keys divided by n."""
    hidden, key_size, chunk = 32, 16, 4
    for length in (12, 13):  # a whole number of chunks, and a padded last chunk
        torch.manual_seed(0)
        reference = flash_pytorch.FLASH(dim=hidden, group_size=chunk, query_key_dim=key_size,
                                        expansion_factor=2.0, causal=False, dropout=0.0,
                                        shift_tokens=False).double().eval()
        config = gau_config("tiny", hidden_size=hidden, num_heads=hidden // key_size,
                            norm_position="pre", layer_norm_eps=reference.norm.eps,
                            gau={"normaliser": "relu2_code", "chunk_size": chunk})
        block = GAUBlock(config).double().eval()
        e = block.expanded_size
        with torch.no_grad():
            reference.rel_pos_bias.relative_attention_bias.weight.zero_()
            reference.qk_offset_scale.beta.normal_()
            w, b = reference.to_hidden[0].weight, reference.to_hidden[0].bias
            block.project.weight.copy_(torch.cat([w[e:], w[:e], reference.to_qk[0].weight]))
            block.project.bias.copy_(torch.cat([b[e:], b[:e], reference.to_qk[0].bias]))
            block.offset_scale.gamma.copy_(reference.qk_offset_scale.gamma)
            block.offset_scale.beta.copy_(reference.qk_offset_scale.beta)
            block.output.load_state_dict(reference.to_out.state_dict())
            block.norm.load_state_dict(reference.norm.state_dict())
        x = torch.randn(2, length, hidden, dtype=torch.float64) * 3
        with torch.no_grad():
            expected = reference(x)
            ours, _ = block(x, context(2, length))
        assert (ours - expected).abs().max() < 1e-12, length


def dense_flash(block, z, v, real, causal):
    """FLASH from its definition, one query at a time, in float64."""
    c, s = block.options.chunk_size, block.head_dim
    quad_q, lin_q, quad_k, lin_k = block.offset_scale(z)
    out = torch.zeros_like(v)
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(z.shape[1]):
                if not real[b, j]:
                    continue
                same = i // c == j // c
                if same and (not causal or j <= i):
                    score = quad_q[b, i] @ quad_k[b, j] / math.sqrt(s)
                    out[b, i] += torch.relu(score) ** 2 / c * v[b, j]
                if not causal or j // c < i // c:
                    seen = real[b] if not causal else real[b] & (torch.arange(z.shape[1]) // c < i // c)
                    out[b, i] += (lin_q[b, i] @ lin_k[b, j]) * v[b, j] / seen.sum()
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_matches_its_definition(causal):
    config = gau_config("tiny", hidden_size=32, num_heads=2, causal=causal,
                        gau={"normaliser": "relu2", "chunk_size": 4})
    torch.manual_seed(0)
    block = GAUBlock(config).double().eval()
    with torch.no_grad():
        block.offset_scale.gamma.normal_()
        block.offset_scale.beta.normal_()
    z = torch.randn(2, 11, 16, dtype=torch.float64)
    v = torch.randn(2, 11, 64, dtype=torch.float64)
    real = padding((11, 7), 11)
    ours = block.flash_attention(z, v, context(2, 11, real, causal))
    expected = dense_flash(block, z, v, real, causal)
    assert (ours - expected)[real].abs().max() < 1e-12


@pytest.mark.parametrize("task", ["mlm", "causal-lm"])
def test_flash_blocks_are_padding_invariant_and_causal(task):
    causal = task == "causal-lm"
    config = tiny_gau(causal=causal, norm_position="pre", rotary=True, position_embedding="none",
                      initializer_range=0.5, gau={"chunk_size": 3})
    torch.manual_seed(0)
    model = build_model(task, config).eval()
    ids, _ = ids_and_mask(0, lengths=(10,))
    padded = torch.cat([ids, torch.randint(5, VOCAB, (1, 4))], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], dim=1).long()
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB
    with torch.no_grad():
        alone, masked = model(ids).logits, model(padded, mask).logits
        other = model(changed).logits
    assert torch.allclose(masked[:, :10], alone, atol=1e-5)
    if causal:
        assert torch.equal(other[:, :7], alone[:, :7]) and not torch.allclose(other[:, 7:], alone[:, 7:])
    else:
        assert not torch.allclose(other[:, :7], alone[:, :7])
    block = GAUBlock(config)
    assert sum(p.numel() for p in block.parameters()) == gau_parameter_count(32, 64, 16, maps=4)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny_gau(gau={"chunk_size": 4, "normaliser": "softmax"})
