"""Chapter 5's length study: recipes, data, variants, plotting, and the cached, resumable run."""

import dataclasses
import json

import matplotlib
import pytest
import torch

from tutorial_lib.studies import length as ls
from tutorial_lib.core.model import CausalLM, set_position_options

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TEXT = ("To be, or not to be, that is the question:\n"
        "Whether 'tis nobler in the mind to suffer\n") * 60
TINY = ls.LengthRecipe(name="test", train_length=8, hidden_size=16, num_layers=1, num_heads=2,
                       intermediate_size=32, batch_size=4, steps=3, warmup_steps=1,
                       test_factors=(1, 2), eval_tokens=64, position_range=32, mlm_steps=2,
                       seeds=(0, 1))


@pytest.mark.parametrize("name", sorted(ls.LENGTH_RECIPES))
def test_every_recipe_builds_valid_models_for_every_variant(name):
    recipe = ls.LENGTH_RECIPES[name]
    for kind in ls.TRAINED:
        config = ls.model_config(recipe, kind, vocab_size=67)
        assert config.causal and config.max_position_embeddings >= recipe.longest_test_length
    # Every variant's options are valid on the model it runs on (validated on replace).
    for variant in ls.variants(recipe).values():
        config = ls.model_config(recipe, variant.model, vocab_size=67)
        options = dict(variant.options)
        if variant.ntk:
            options["rotary_ntk_factor"] = float(max(recipe.test_factors))
        dataclasses.replace(config, **options)
    assert recipe.train_length * max(recipe.test_factors) <= recipe.position_range


def test_gpu_recipe_is_su_scale():
    gpu = ls.LENGTH_RECIPES["gpu"]
    assert gpu.train_length == 512 and gpu.longest_test_length == 4096


@pytest.mark.parametrize("field, value", [("train_length", 6), ("steps", 0),
                                          ("repeat_fraction", 1.5), ("test_factors", (1, 0)),
                                          ("position_range", 8), ("warmup_steps", 10)])
def test_recipe_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_characters_split_and_round_trip():
    chars = ls.shakespeare_chars(TEXT)
    assert chars.decode(chars.train_ids[:20]) == TEXT[:20]
    assert len(chars.train_ids) + len(chars.test_ids) == len(TEXT)
    # The library's character tokenizer: <pad> = 0, <mask> = 1, then the alphabet.
    assert chars.mask_id == 1 and chars.train_ids.min() >= 2
    assert chars.vocab_size == len(set(TEXT)) + 2 and chars.alphabet == "".join(sorted(set(TEXT)))
    with pytest.raises(ValueError, match="text"):
        ls.shakespeare_chars("short")


def test_repeated_windows_copy_their_first_half():
    windows = torch.arange(12).view(2, 6)
    repeated = ls.repeat_halves(windows)
    assert repeated.tolist() == [[0, 1, 2, 0, 1, 2], [6, 7, 8, 6, 7, 8]]
    with pytest.raises(ValueError, match="even"):
        ls.repeat_halves(torch.arange(5)[None])


def test_test_windows_do_not_overlap_and_check_the_text_length():
    ids = torch.arange(100)
    windows = ls.test_windows(ids, 10, 4)
    starts = windows[:, 0].tolist()
    assert starts == [0, 25, 50, 75] and (windows.diff(dim=1) == 1).all()
    with pytest.raises(ValueError, match="characters"):
        ls.test_windows(ids, 30, 4)


def test_mlm_windows_are_masked_by_the_library_collator_in_bert_proportions():
    chars = ls.shakespeare_chars(TEXT * 20)
    collate = ls.MaskedWindows(chars.train_ids, 64, chars.mlm_collator(0.15))
    starts = list(range(0, 64 * 64, 64))
    batch = collate(starts, torch.Generator().manual_seed(0))
    windows = torch.stack([chars.train_ids[s: s + 64] for s in starts])
    chosen = batch["labels"] != -100
    assert abs(chosen.float().mean().item() - 0.15) < 0.02
    assert (batch["labels"][chosen] == windows[chosen]).all()
    assert (batch["input_ids"][~chosen] == windows[~chosen]).all()
    masked = (batch["input_ids"] == chars.mask_id).sum().item() / chosen.sum().item()
    assert 0.75 < masked < 0.85
    # Random replacements are characters, never <pad> or <mask>.
    replaced = chosen & (batch["input_ids"] != chars.mask_id) & (batch["input_ids"] != windows)
    assert (batch["input_ids"][replaced] >= 2).all()
    again = collate(starts, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], batch["input_ids"])  # the generator fixes it


def test_random_position_training_batches_carry_sorted_positions():
    collate = ls.CausalWindows(torch.arange(1, 200), 16, repeat_fraction=1.0,
                               position_range=64)
    batch = collate([0, 50, 100], torch.Generator().manual_seed(0))
    assert batch["position_ids"].shape == (3, 16)
    assert (batch["position_ids"].diff(dim=-1) > 0).all() and batch["position_ids"].max() < 64
    assert (batch["input_ids"][:, :8] == batch["input_ids"][:, 8:]).all()


def test_evaluation_restores_the_trained_options():
    chars = ls.shakespeare_chars(TEXT)
    torch.manual_seed(0)  # the weights, whatever tests ran before
    model = CausalLM(ls.model_config(TINY, "rope", chars.vocab_size)).eval()
    before = model.config
    variant = ls.variants(TINY)["RoPE + NTK + log n"]
    result = ls.evaluate_variant(model, variant, TINY, chars)
    assert set(result) == {"loss", "accuracy", "repeated_loss", "repeated_accuracy"}
    assert all(len(values) == 2 for values in result.values())
    assert model.config == before
    # At the training length NTK (factor 1) and log n (factor 1) change nothing.
    plain = ls.evaluate_variant(model, ls.variants(TINY)["RoPE"], TINY, chars)
    assert result["loss"][0] == pytest.approx(plain["loss"][0], rel=1e-5)
    # A window shorter than the test length does change the long one. An untrained model
    # attends almost evenly, so the change in the mean loss is small, but far above float
    # rounding (1e-7 of it).
    windows = ls.test_windows(chars.test_ids, 16, 2)
    full, _ = ls.causal_scores(model, windows, None)
    set_position_options(model, attention_window=2)
    windowed, _ = ls.causal_scores(model, windows, None)
    set_position_options(model, attention_window=None)
    assert windowed != pytest.approx(full, rel=1e-5)


def test_study_runs_caches_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(ls.data, "load_tiny_shakespeare", lambda **_: TEXT)
    calls = []
    result = ls.run_length_study(TINY, cache_dir=tmp_path, workers=1, log=calls.append)
    assert result.built_now and len(calls) == len(ls.TRAINED) + 1 + 1  # + seed 1, + MLM
    assert list(result.curves) == list(ls.variants(TINY))
    assert sorted(result.curves["RoPE"]) == [0, 1] and sorted(result.curves["ALiBi"]) == [0]
    assert len(result.masked["log n"]) == 2
    accuracy = result.metric("ALiBi")
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    with pytest.raises(ValueError, match="variant"):
        result.metric("nope")
    with pytest.raises(ValueError, match="seeds"):
        result.metric("ALiBi", seed=1)
    again = ls.run_length_study(TINY, cache_dir=tmp_path, workers=1)
    assert not again.built_now and again.curves == result.curves
    # An interrupted build keeps its finished runs: remove one and mark it unfinished.
    entry = result.path
    staging = entry.parent / f".staging-{entry.name}"
    entry.rename(staging)
    (staging / "COMPLETE").unlink()
    (staging / "runs" / "alibi-seed0.json").unlink()
    calls.clear()
    resumed = ls.run_length_study(TINY, cache_dir=tmp_path, workers=1, log=calls.append)
    assert len(calls) == 1 and calls[0].startswith("alibi")
    assert resumed.curves["ALiBi"] == result.curves["ALiBi"]  # deterministic
    assert json.loads((resumed.path / "COMPLETE").read_text())["runs"]


def test_plot_draws_the_chosen_methods_and_lengths(tmp_path, monkeypatch):
    monkeypatch.setattr(ls.data, "load_tiny_shakespeare", lambda **_: TEXT)
    result = ls.run_length_study(TINY, cache_dir=tmp_path, workers=1)
    figure, ax = plt.subplots()
    lines = ls.plot_length_curves(result, ["RoPE", "ALiBi"], ax, max_length=8)
    assert [line.get_label() for line in lines] == ["RoPE (2 seeds)", "ALiBi"]
    assert list(lines[0].get_xdata()) == [8]
    assert lines[1].get_ydata()[0] == result.metric("ALiBi")[0]
    with pytest.raises(ValueError, match="metric"):
        ls.plot_length_curves(result, ["RoPE"], ax, metric="bleu")
    with pytest.raises(ValueError, match="unknown methods"):
        ls.plot_length_curves(result, ["GPT-5"], ax)
    with pytest.raises(ValueError, match="max_length"):
        ls.plot_length_curves(result, ["RoPE"], ax, max_length=4)
    plt.close(figure)


def test_training_takes_a_device_and_evaluation_follows_the_model():
    chars = ls.shakespeare_chars(TEXT)
    model = ls.train_causal(TINY, chars, "alibi", seed=0, device="cpu")
    assert next(model.parameters()).device.type == "cpu" and not model.training
    loss, accuracy = ls.causal_scores(model, ls.test_windows(chars.test_ids, 8, 2), None)
    assert loss > 0 and 0 <= accuracy <= 1
    masked = ls.train_masked(TINY, chars, seed=0, device="cpu")
    assert 0 <= ls.masked_accuracy(masked, TINY, chars, 16, logn=True) <= 1
    assert masked.config.logn_training_length is None  # restored after evaluation
