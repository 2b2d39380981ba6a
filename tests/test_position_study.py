"""The relative-bias plugin and chapter 3's position-study variants (no training here)."""

import dataclasses

import pytest
import torch

from tutorial_lib import MaskedLM, RelativePositionBias, TransformerConfig
from tutorial_lib.core.attention import AttentionContext, MultiHeadAttention
from tutorial_lib.techniques.deberta import log_bucket_position
from tutorial_lib.studies.position import VARIANTS, build_variant, variant_config


def reference_bias(table, query_positions, key_positions, span, buckets, max_relative):
    """Entry by entry, in float64, from the definition b_h[clamp(bucket(i - j) + k)]."""
    heads = table.shape[0]
    out = torch.zeros(heads, len(query_positions), len(key_positions), dtype=torch.float64)
    for a, i in enumerate(query_positions):
        for b, j in enumerate(key_positions):
            r = torch.tensor(i - j)
            if buckets:
                r = log_bucket_position(r, buckets, max_relative)
            row = min(max(int(r) + span, 0), 2 * span - 1)
            out[:, a, b] = table[:, row].double()
    return out


@pytest.mark.parametrize("buckets,max_relative", [(0, 0), (8, 40)])
def test_relative_bias_is_the_table_entry_of_the_bucketed_distance(buckets, max_relative):
    torch.manual_seed(0)
    span = buckets or 6
    plugin = RelativePositionBias(3, span, buckets, max_relative)
    with torch.no_grad():
        plugin.bias.normal_()  # distinct entries: a wrong row or sign shows
    positions = torch.tensor([[0, 1, 2, 5, 9, 17, 30, 47]])
    attn = MultiHeadAttention(12, 3)
    ctx = AttentionContext(positions, positions, None, causal=False)
    bias = plugin.score_bias(attn, None, None, ctx)  # (1, heads, query, key)
    expected = reference_bias(plugin.bias.detach(), positions[0].tolist(),
                              positions[0].tolist(), span, buckets, max_relative)
    assert bias.shape == (1, 3, 8, 8)
    assert torch.equal(bias[0].double(), expected)
    # Not symmetric: i - j and j - i read different rows.
    assert not torch.allclose(bias[0], bias[0].transpose(-1, -2))


def test_relative_bias_changes_the_attention_and_receives_gradients():
    config = TransformerConfig.preset("tiny", vocab_size=50, position_embedding="none",
                                      hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = MaskedLM(config)
    plugin = model.encoder.add_attention_plugin(RelativePositionBias(config.num_heads, 4))
    ids = torch.randint(1, 50, (2, 9))
    at_zero = model(input_ids=ids).logits
    with torch.no_grad():
        plugin.bias.normal_()
    moved = model(input_ids=ids).logits
    assert (moved - at_zero).abs().max() > 1e-3
    moved.sum().backward()
    assert plugin.bias.grad is not None and plugin.bias.grad.abs().sum() > 0


def test_relative_bias_refuses_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        RelativePositionBias(0, 4)
    with pytest.raises(ValueError, match="span"):
        RelativePositionBias(2, 0)
    with pytest.raises(ValueError, match="max_relative_positions"):
        RelativePositionBias(2, 8, 8, 4)
    plugin = RelativePositionBias(2, 4)
    ctx = AttentionContext(torch.arange(3)[None], torch.arange(3)[None], None, causal=False)
    with pytest.raises(ValueError, match="num_heads"):
        plugin.score_bias(MultiHeadAttention(12, 3), None, None, ctx)


def test_variants_differ_only_in_how_positions_enter():
    base = TransformerConfig.preset("tiny", vocab_size=50, max_position_embeddings=64)
    for variant in VARIANTS:
        changed = set(variant_config(variant, base).diff(base))
        assert changed == {
            "absolute": set(),
            "relative bias": {"position_embedding"},
            "disentangled": {"position_embedding", "relative_attention", "position_buckets",
                             "max_relative_positions", "share_att_key", "norm_rel_ebd"},
            "disentangled + EMD": {"position_embedding", "relative_attention",
                                   "position_buckets", "max_relative_positions",
                                   "share_att_key", "norm_rel_ebd"},
        }[variant]
        model = build_variant(variant, base)
        assert (model.decoder is not None) == (variant == "disentangled + EMD")
        ids = torch.randint(1, 50, (2, 40))
        labels = torch.full_like(ids, -100)
        labels[:, ::5] = ids[:, ::5]
        assert torch.isfinite(model(input_ids=ids, labels=labels).loss)
    with pytest.raises(ValueError, match="variant"):
        variant_config("rotary", base)


@pytest.mark.parametrize("share_att_key", [True, False])
def test_score_terms_add_up_to_the_layers_attention(share_att_key):
    from tutorial_lib.techniques.deberta import attention_score_terms
    config = TransformerConfig.preset("tiny", vocab_size=50, position_embedding="none",
                                      relative_attention=True, position_buckets=4,
                                      max_relative_positions=12, share_att_key=share_att_key,
                                      norm_rel_ebd="layer_norm", initializer_range=0.2)
    torch.manual_seed(0)
    model = MaskedLM(config).eval()
    ids = torch.randint(1, 50, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    _, attentions = model.encoder(ids, mask, output_attentions=True)
    for layer in range(config.num_layers):
        terms = attention_score_terms(model, layer, ids, mask)
        scores = terms["c2c"] + terms["c2p"] + terms["p2c"]
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        assert torch.allclose(scores.softmax(-1), attentions[layer], atol=1e-6)
        assert terms["c2p"].abs().max() > 0.05 and terms["p2c"].abs().max() > 0.05
    with pytest.raises(ValueError, match="layer"):
        attention_score_terms(model, 2, ids)
    with pytest.raises(ValueError, match="DisentangledAttention"):
        attention_score_terms(MaskedLM(TransformerConfig.preset("tiny", vocab_size=50)), 0, ids)


def test_study_trains_the_variants_once_then_loads_them(tmp_path):
    from tutorial_lib.studies.position import position_study
    from tutorial_lib.studies.baseline import BaselineRecipe
    recipe = BaselineRecipe(name="test", preset="tiny", vocab_size=300, max_length=32,
                            batch_size=8, steps=3, lr=1e-3, warmup_steps=1,
                            train_split="valid", eval_split="test", eval_sequences=16)
    first = position_study(recipe, cache_dir=tmp_path, workers=1)
    assert first.built_now and set(first.histories) == set(VARIANTS)
    for variant in VARIANTS:
        assert first.final(variant)["step"] == 3
        model = first.model(variant)
        assert not model.training
        assert (model.decoder is not None) == (variant == "disentangled + EMD")
    again = position_study(recipe, cache_dir=tmp_path, workers=1)
    assert not again.built_now and again.path == first.path
    assert again.histories == first.histories
    # The cached weights are the trained ones: the relative bias started at zero.
    trained = again.model("relative bias")
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if n.endswith(".bias")
               and "attention_plugins" in n)
    with pytest.raises(ValueError, match="recipe"):
        position_study("tpu", cache_dir=tmp_path)


def test_chapters_read_the_record_and_train_only_the_variant_they_ask_for(tmp_path):
    import json

    from tutorial_lib.studies import position, records
    from tutorial_lib.studies.baseline import BaselineRecipe
    recipe = BaselineRecipe(name="test", preset="tiny", vocab_size=300, max_length=32,
                            batch_size=8, steps=3, lr=1e-3, warmup_steps=1,
                            train_split="valid", eval_split="test", eval_sequences=16)
    built, fresh, checked = tmp_path / "built", tmp_path / "fresh", tmp_path / "checked"
    directory = tmp_path / "records"
    path = position.record_position_study(recipe, cache_dir=built, workers=1,
                                          directory=directory)
    full = position.position_study(recipe, cache_dir=built, workers=1)
    # On a machine without the study's entry: histories from the record, nothing trained...
    study = position.load_position_study(recipe, cache_dir=fresh, directory=directory)
    assert not study.built_now
    assert all(study.histories[v] == full.histories[v] for v in VARIANTS[1:])
    assert study.final("absolute")["mlm_loss"] == full.final("absolute")["mlm_loss"]
    assert not study.path.exists()
    weights = position.variant_weights(recipe, "disentangled", fresh)
    assert not weights.exists()
    # ...until a notebook asks for a model: that variant alone is trained, and kept.
    model = study.model("disentangled")
    assert weights.exists()
    assert not position.variant_weights(recipe, "relative bias", fresh).exists()
    reference = dict(full.model("disentangled").named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter, reference[name], atol=1e-5), name
    # CI's check re-trains the sample, agrees with the record and keeps the weights.
    assert position.check_position_study(recipe, cache_dir=checked, directory=directory) == []
    assert position.variant_weights(recipe, "disentangled", checked).exists()
    record = json.loads(path.read_text())
    assert record["sample"] == ["disentangled/metrics.jsonl"]
    rows = record["files"]["disentangled/metrics.jsonl"]
    [row for row in rows if row.get("event") == "eval"][-1]["mlm_loss"] += 0.01
    path.write_text(json.dumps(record))
    problems = position.check_position_study(recipe, cache_dir=checked, directory=directory)
    assert problems and all("mlm_loss" in problem for problem in problems)
    with pytest.raises(ValueError, match="variant"):
        study.model("rotary")
    record["key"] = "0" * 16
    path.write_text(json.dumps(record))
    with pytest.raises(records.RecordError, match="another recipe"):
        position.load_position_study(recipe, cache_dir=fresh, directory=directory)
