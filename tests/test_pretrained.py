"""The cached baseline: built once, deterministic, never half-written."""

import dataclasses

import pytest
import torch

from tutorial_lib.studies import __main__ as studies_cli
from tutorial_lib.studies import baseline as pretrained
from tutorial_lib.training.checkpoint import load_weights

SMALL = dataclasses.replace(pretrained.RECIPES["cpu"], name="test", preset="tiny",
                            vocab_size=300, max_length=32, batch_size=8, steps=3,
                            warmup_steps=1, eval_sequences=16)


def test_baseline_is_built_once_then_loaded(tmp_path):
    first = pretrained.baseline_mlm(SMALL, cache_dir=tmp_path)
    assert first.trained_now and (first.path / "COMPLETE").exists()
    assert [r["step"] for r in first.history if r["event"] == "eval"][-1] == 3
    second = pretrained.baseline_mlm(SMALL, cache_dir=tmp_path)
    assert not second.trained_now and second.path == first.path
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    assert not second.model.training


def test_baseline_build_is_deterministic(tmp_path):
    a = pretrained.baseline_mlm(SMALL, cache_dir=tmp_path / "a")
    b = pretrained.baseline_mlm(SMALL, cache_dir=tmp_path / "b")
    weights_a = load_weights(a.path / "model.safetensors")
    weights_b = load_weights(b.path / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_interrupted_build_leaves_no_entry(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrained.baseline_mlm(SMALL, cache_dir=tmp_path)
    assert not list(tmp_path.glob("study-baseline-*"))
    monkeypatch.undo()
    assert pretrained.baseline_mlm(SMALL, cache_dir=tmp_path).trained_now


def test_recipe_key_changes_with_the_recipe_and_bad_names_are_refused():
    assert SMALL.key() != dataclasses.replace(SMALL, steps=4).key()
    with pytest.raises(ValueError, match="recipe must be one of"):
        pretrained.baseline_mlm("tpu")


def test_command_line_builds_then_finds_the_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pretrained.RECIPES, "cpu", SMALL)
    assert studies_cli.main(["baseline", "--cache-dir", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert "ran now" in first and "accuracy" in first
    assert studies_cli.main(["baseline", "--scale", "cpu", "--cache-dir", str(tmp_path)]) == 0
    assert "found in the cache" in capsys.readouterr().out
    assert len(list(tmp_path.glob("study-baseline-*"))) == 1
    with pytest.raises(SystemExit):
        studies_cli.main(["baseline", "--scale", "tpu"])
    with pytest.raises(SystemExit):
        studies_cli.main(["no-such-study"])
