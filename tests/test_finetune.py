"""SST-2 fine-tuning studies: the data, the robustness curve, and the cached, resumable grid."""

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch

from tutorial_lib.techniques import adversarial as adv
from tutorial_lib.studies import __main__ as studies_cli
from tutorial_lib.studies import finetune
from tutorial_lib.studies import baseline as pretrained
from tutorial_lib.training.evaluation import classification_metrics
from tutorial_lib.core.model import SequenceClassifier
from tutorial_lib.training.loop import default_loss_step

BASELINE = dataclasses.replace(pretrained.RECIPES["cpu"], name="test", preset="tiny",
                               vocab_size=300, max_length=32, batch_size=8, steps=2,
                               warmup_steps=1, eval_sequences=16)
RECIPE = finetune.SST2Recipe(name="test", train_examples=64, batch_size=8, steps=3,
                             warmup_steps=1, attack_examples=24)


@dataclass
class Interruptible:
    """Plain training that can be made to fail; the flag is not part of its repr."""

    fail: list = field(default_factory=lambda: [False], repr=False, compare=False)

    def __call__(self, model, batch):
        if self.fail[0]:
            raise KeyboardInterrupt
        return default_loss_step(model, batch)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return pretrained.baseline_mlm(BASELINE, cache_dir=tmp_path_factory.mktemp("cache"))


def test_sst2_data_follows_the_recipe(baseline):
    sst2 = finetune.sst2_data(RECIPE, baseline.tokenizer)
    assert len(sst2.train) == 64
    assert all(len(e["input_ids"]) <= RECIPE.max_length for e in sst2.train)
    assert sum(len(b["labels"]) for b in sst2.dev_batches) == 872  # the whole dev set
    assert sum(len(b["labels"]) for b in sst2.attack_batches) == 24
    assert 0.5 < sst2.majority_rate < 0.52
    again = finetune.sst2_data(RECIPE, baseline.tokenizer)  # the subset is fixed by data_seed
    assert [e["input_ids"] for e in again.train] == [e["input_ids"] for e in sst2.train]


def test_robustness_curve_starts_at_clean_accuracy_and_attacks_lower_it(baseline):
    sst2 = finetune.sst2_data(RECIPE, baseline.tokenizer)
    torch.manual_seed(0)
    model = SequenceClassifier(baseline.model.config, num_labels=2, pooling="mean")
    finetune.fine_tune_sst2(model, sst2, RECIPE, seed=0)
    curve = finetune.robustness_curve(model, sst2.attack_batches, (0.0, 0.5, 50.0))
    assert curve[0] == classification_metrics(model, sst2.attack_batches)["accuracy"]
    assert curve[2] <= curve[0]
    assert curve[2] < 0.2  # a radius far beyond the embeddings' scale breaks any model
    with pytest.raises(ValueError, match="epsilons"):
        finetune.robustness_curve(model, sst2.attack_batches, (-1.0,))


def test_study_is_cached_and_resumes_after_an_interruption(baseline, tmp_path):
    cache = tmp_path / "cache"
    pretrained.baseline_mlm(BASELINE, cache_dir=cache)  # the study finds it there
    flaky = Interruptible()
    study = finetune.Study(name="test", methods=(("plain", None), ("flaky", flaky),
                                                 ("FGM", adv.FGM(epsilon=0.01))),
                           seeds=(0,), epsilons=(0.0, 0.1), recipe=RECIPE, start=BASELINE)
    flaky.fail[0] = True
    with pytest.raises(KeyboardInterrupt):
        finetune.run_study(study, cache_dir=cache, workers=1)
    staged = list(cache.glob(".staging-study-test-*/runs/*.json"))
    assert [p.name for p in staged] == ["plain-seed0.json"]  # the finished run was kept
    kept = staged[0].read_text()

    flaky.fail[0] = False
    result = finetune.run_study(study, cache_dir=cache, workers=1)
    assert result.built_now
    assert (result.path / "runs" / "plain-seed0.json").read_text() == kept  # not run again
    assert [run["method"] for run in result.runs] == ["plain", "flaky", "FGM"]
    for run in result.runs:
        assert len(run["attacked_accuracy"]) == 2 and len(run["train_loss"]) >= 1
        assert run["seconds_per_step"] > 0
    # plain and "flaky" are the same training with the same seed: identical results.
    assert result.runs[0]["train_loss"] == result.runs[1]["train_loss"]
    assert result.table("accuracy")["plain"] == result.table("accuracy")["flaky"]

    again = finetune.run_study(study, cache_dir=cache, workers=1)
    assert not again.built_now and again.runs == result.runs
    changed = dataclasses.replace(study, methods=(("FGM", adv.FGM(epsilon=0.02)),))
    assert changed.key("b") != study.key("b")  # a method's settings are part of the key


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="pooling"):
        finetune.SST2Recipe(pooling="max")
    with pytest.raises(ValueError, match="warmup_steps"):
        finetune.SST2Recipe(steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="attack_examples"):
        finetune.SST2Recipe(attack_examples=0)
    with pytest.raises(ValueError, match="study must be one of"):
        finetune.run_study("no-such-study")
    with pytest.raises(ValueError, match="workers"):
        finetune.run_study("adversarial-sst2", workers=0)


def test_command_line_runs_a_study_then_finds_it(baseline, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    pretrained.baseline_mlm(BASELINE, cache_dir=cache)
    study = finetune.Study(name="cli", methods=(("plain", None),), seeds=(0,), epsilons=(0.0,),
                           recipe=RECIPE, start=BASELINE)
    monkeypatch.setitem(finetune.STUDIES, "adversarial-sst2", study)
    assert studies_cli.main(["adversarial", "--cache-dir", str(cache)]) == 0
    assert "ran now" in capsys.readouterr().out
    assert studies_cli.main(["adversarial", "--cache-dir", str(cache)]) == 0
    assert "found in the cache" in capsys.readouterr().out
    summary = json.loads(next(cache.glob("study-cli-*/COMPLETE")).read_text())
    assert summary["runs"] == ["plain-seed0.json"]
    with pytest.raises(SystemExit):
        studies_cli.main(["adversarial", "--scale", "gpu", "--cache-dir", str(cache)])


def test_worker_processes_give_the_same_numbers_as_one_process(baseline, tmp_path):
    study = finetune.Study(name="workers", methods=(("plain", None), ("FGM", adv.FGM(epsilon=0.01))),
                           seeds=(0,), epsilons=(0.0, 0.1), recipe=RECIPE, start=BASELINE)
    results = []
    for workers, cache in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        pretrained.baseline_mlm(BASELINE, cache_dir=cache)
        results.append(finetune.run_study(study, cache_dir=cache, workers=workers))
    strip = lambda runs: [{k: v for k, v in run.items() if k not in ("seconds_per_step", "final_logs")}
                          for run in runs]
    assert strip(results[0].runs) == strip(results[1].runs)


def test_fine_tuned_trains_a_missing_run_once_then_loads_it(baseline, tmp_path):
    cache = tmp_path / "cache"
    pretrained.baseline_mlm(BASELINE, cache_dir=cache)
    study = finetune.Study(name="kept", methods=(("plain", None), ("FGM", adv.FGM(epsilon=0.01))),
                           seeds=(0, 1), epsilons=(0.0,), recipe=RECIPE, start=BASELINE)
    lines = []
    model, start, sst2 = finetune.fine_tuned(study, "FGM", 1, cache_dir=cache, log=lines.append)
    assert len(lines) == 1 and "FGM" in lines[0]  # trained now
    path = finetune.weights_path(study, "FGM", 1, cache_dir=cache)
    assert path.exists() and not model.training
    again, _, _ = finetune.fine_tuned(study, "FGM", 1, cache_dir=cache, log=lines.append)
    assert len(lines) == 1  # loaded, not trained again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    # It is the study's run: the same dev accuracy as the grid's own run of (FGM, seed 1).
    result = finetune.run_study(study, cache_dir=cache, workers=1)
    run = next(r for r in result.runs if r["method"] == "FGM" and r["seed"] == 1)
    assert classification_metrics(model, sst2.dev_batches)["accuracy"] == pytest.approx(run["accuracy"])
    # The grid keeps the weights of KEEP_WEIGHTS only.
    assert finetune.weights_path(study, "plain", 0, cache_dir=cache).exists()
    assert not finetune.weights_path(study, "plain", 1, cache_dir=cache).exists()
    with pytest.raises(ValueError, match="method must be one of"):
        finetune.fine_tuned(study, "PGD", 0, cache_dir=cache)
    with pytest.raises(ValueError, match="seed must be one of"):
        finetune.fine_tuned(study, "plain", 7, cache_dir=cache)


def test_starting_points_are_named():
    assert finetune.start_key(finetune.MINILM).startswith("all-MiniLM-L6-v2:")
    assert finetune.start_key("cpu") == pretrained.RECIPES["cpu"].key()
    with pytest.raises(ValueError, match="start must be"):
        finetune.start_key("bert-large")
    with pytest.raises(ValueError, match="start must be"):
        finetune.load_start("bert-large")
    assert finetune.STUDIES["adversarial-sst2"].start == finetune.MINILM
