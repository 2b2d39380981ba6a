"""Study records: committed results that CI checks against the code that made them."""

import dataclasses
import json

import pytest

from tutorial_lib.studies import __main__ as studies_cli
from tutorial_lib.studies import baseline as pretrained
from tutorial_lib.studies import (finetune, gau, ladder, length, position, pretraining, records,
                                  sift, unargmaxable, whitening)

BASELINE = dataclasses.replace(pretrained.RECIPES["cpu"], name="test", preset="tiny",
                               vocab_size=300, max_length=32, batch_size=8, steps=2,
                               warmup_steps=1, eval_sequences=16)
RECIPE = finetune.SST2Recipe(name="test", train_examples=64, batch_size=8, steps=3,
                             warmup_steps=1, attack_examples=24)
STUDY = finetune.Study(name="tiny", methods=(("plain", None),), seeds=(0,),
                       epsilons=(0.0, 0.1), recipe=RECIPE, start=BASELINE)
TOLERANCE = {"abs": 1e-3, "rel": 0.0}


def test_compare_reports_numbers_beyond_the_tolerance_and_skips_timings():
    recorded = {"accuracy": 0.70, "curve": [0.5, 0.25], "seconds_per_step": 1.0,
                "final": {"elapsed_s": 3.0, "loss": 0.4}, "method": "plain"}
    close = {"accuracy": 0.7005, "curve": [0.5, 0.2501], "seconds_per_step": 9.0,
             "final": {"elapsed_s": 99.0, "loss": 0.4}, "method": "plain"}
    assert records.compare(recorded, close, TOLERANCE) == []
    far = dict(close, accuracy=0.71, curve=[0.5], method="FGM")
    problems = records.compare(recorded, far, TOLERANCE)
    assert any(p.startswith("/accuracy: recorded 0.7") for p in problems)
    assert any("2 entries in the record, 1 in the sample" in p for p in problems)
    assert any("/method" in p for p in problems)
    assert records.compare({"a": 1}, {"b": 1}, TOLERANCE) == ["/a: only in the record",
                                                              "/b: only in the sample"]
    assert records.compare(1.0, 1.1, {"abs": 0.0, "rel": 0.2}) == []  # relative part
    with pytest.raises(ValueError, match="tolerance"):
        records.compare(1.0, 1.0, {"abs": -1.0, "rel": 0.0})


def test_record_names_are_checked():
    with pytest.raises(ValueError, match="study"):
        records.record_path("../escape", "cpu")
    with pytest.raises(ValueError, match="scale"):
        records.record_path("length", "")


def test_a_study_record_passes_its_check_and_fails_once_perturbed(tmp_path):
    cache, directory = tmp_path / "cache", tmp_path / "records"
    pretrained.baseline_mlm(BASELINE, cache_dir=cache)
    path = finetune.record_study(STUDY, cache_dir=cache, workers=1, directory=directory)
    record = json.loads(path.read_text())
    assert path.name == "tiny-test.json" and record["sample"] == ["runs/plain-seed0.json"]
    assert record["key"] == finetune.study_key(STUDY) and record["gpu"] is False
    assert set(record["data"]) >= {"sst-2/train.tsv", "sst-2/dev.tsv"}
    for field in ("tutorial_lib", "commit", "torch", "device"):
        assert record["environment"][field]
    # The chapters read the record, not the cache.
    loaded = finetune.load_study(STUDY, directory=directory)
    assert loaded.runs == [record["files"]["runs/plain-seed0.json"]]
    # The sample, computed again, agrees with the record...
    assert finetune.check_study(STUDY, cache_dir=cache, directory=directory) == []
    # ...and a record whose numbers were changed does not.
    run = record["files"]["runs/plain-seed0.json"]
    run["accuracy"] += 0.05
    run["train_loss"][0] *= 1.01
    path.write_text(json.dumps(record))
    problems = finetune.check_study(STUDY, cache_dir=cache, directory=directory)
    assert any("accuracy" in p for p in problems) and any("train_loss[0]" in p for p in problems)
    # A record made by another recipe is refused by the chapters and by the check.
    record["key"] = "0" * 16
    path.write_text(json.dumps(record))
    with pytest.raises(records.RecordError, match="another recipe"):
        finetune.load_study(STUDY, directory=directory)
    with pytest.raises(records.RecordError, match="remake it"):
        finetune.check_study(STUDY, cache_dir=cache, directory=directory)


def test_a_sample_of_a_run_s_first_updates_checks_those_losses_only(tmp_path, monkeypatch):
    cache, directory = tmp_path / "cache", tmp_path / "records"
    pretrained.baseline_mlm(BASELINE, cache_dir=cache)
    path = finetune.record_study(STUDY, cache_dir=cache, workers=1, directory=directory)
    record = json.loads(path.read_text())
    assert len(record["files"]["runs/plain-seed0.json"]["train_loss"]) == 3  # logged every update
    monkeypatch.setitem(finetune.SAMPLES, STUDY.name, [("plain", 0, 2)])
    assert finetune.check_study(STUDY, cache_dir=cache, directory=directory) == []
    run = record["files"]["runs/plain-seed0.json"]
    run["train_loss"][2] += 1.0  # beyond the two updates re-run: not checked
    run["accuracy"] += 0.5
    path.write_text(json.dumps(record))
    assert finetune.check_study(STUDY, cache_dir=cache, directory=directory) == []
    run["train_loss"][1] *= 1.01  # within them: checked
    path.write_text(json.dumps(record))
    problems = finetune.check_study(STUDY, cache_dir=cache, directory=directory)
    assert len(problems) == 1 and "train_loss[1]" in problems[0]


def test_the_command_line_check_exits_with_1_on_a_disagreeing_record(tmp_path, monkeypatch,
                                                                      capsys):
    cache, directory = tmp_path / "cache", tmp_path / "records"
    monkeypatch.setitem(pretrained.RECIPES, "cpu", BASELINE)
    monkeypatch.setattr(records, "RECORDS_DIR", directory)
    assert studies_cli.main(["baseline", "--record", "--cache-dir", str(cache)]) == 0
    assert studies_cli.main(["baseline", "--check", "--cache-dir", str(cache)]) == 0
    assert "the record agrees" in capsys.readouterr().out
    path = directory / "baseline-test.json"
    record = json.loads(path.read_text())
    eval_rows = [row for row in record["files"]["metrics.jsonl"] if row["event"] == "eval"]
    eval_rows[-1]["mlm_loss"] += 0.1
    path.write_text(json.dumps(record))
    assert studies_cli.main(["baseline", "--check", "--cache-dir", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "disagrees" in out and "mlm_loss" in out


@pytest.mark.parametrize("name, scale, key", [
    ("baseline", "cpu", lambda: pretrained.RECIPES["cpu"].key()),
    ("pretraining", "cpu", pretraining.study_key),
    ("adversarial", "cpu", lambda: finetune.study_key("adversarial-sst2")),
    ("positions", "cpu", lambda: position.study_key(pretrained.RECIPES["cpu"])),
    ("length", "cpu", lambda: length.study_key(length.LENGTH_RECIPES["cpu"])),
    ("gau", "cpu", lambda: gau.study_key(gau.GAU_RECIPES["cpu"])),
    ("sift", "cpu", lambda: finetune.study_key("sift-sst2")),
    ("asa", "cpu", lambda: finetune.study_key("asa-sst2")),
    ("sift-scale", "cpu", sift.study_key),
    ("whitening", "cpu", whitening.study_key),
    ("unargmaxable", "cpu", unargmaxable.study_key),
    ("ladder", "cpu", ladder.study_key),
])
def test_every_committed_record_was_made_by_the_code_s_recipe(name, scale, key):
    record = records.read_record(name, scale)
    assert record["key"] == key(), (
        f"{name}: the recipe changed; remake the record with "
        f"python -m tutorial_lib.studies {name} --record")
    assert record["gpu"] is False and record["tolerance"]["abs"] > 0
    assert set(record["sample"]) <= set(record["files"])
