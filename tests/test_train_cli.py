"""The ``python -m tutorial_lib.train`` command line: help, config validation, a tiny
end-to-end masked-LM run on WikiText-2 (offline copy), and resuming it."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.core.config import TransformerConfig
from tutorial_lib.core.model import build_model

REPO = Path(__file__).resolve().parents[1]
# By module path: a `train` function exported from tutorial_lib/__init__.py would shadow
# the attribute `tutorial_lib.training.cli`, but never the module registered under this name.
cli = importlib.import_module("tutorial_lib.training.cli")

TINY = {
    "description": "test run",
    "task": "mlm",
    "seed": 3,
    "model": {"preset": "tiny", "overrides": {"max_position_embeddings": 32}},
    "tokenizer": {"vocab_size": 600},
    "data": {"max_length": 24, "max_train_lines": 120, "max_eval_lines": 40, "eval_sequences": 16,
             "eval_batch_size": 8, "download": False},
    "batch": {"global_batch_size": 8, "accumulation_steps": 2},
    "training": {"steps": 8, "lr": 0.002, "warmup_steps": 2, "log_every": 4, "eval_every": 4,
                 "save_every": 4, "device": "cpu", "progress": False},
}


def write_config(tmp_path: Path, values: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


def test_help_explains_every_option_with_an_example():
    completed = subprocess.run([sys.executable, "-m", "tutorial_lib.training.cli", "--help"],
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    text = completed.stdout
    for option in ("--config", "--out", "--resume", "--max-steps", "--save-every", "--device",
                   "--no-progress"):
        assert option in text
    assert "examples:" in text and "torchrun --nproc_per_node" in text
    assert "configs/mlm_wikitext2_cpu.json" in text


def test_tiny_run_end_to_end_then_resume(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    out = tmp_path / "out"
    assert cli.main(["--config", str(config), "--out", str(out)]) == 0
    assert "finished step 8" in capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "tokenizer.json", "run_config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [("train", 4), ("eval", 4), ("train", 8), ("eval", 8)]
    assert all(torch.isfinite(torch.tensor(r.get("loss", r.get("eval_loss")))) for r in records)

    # The final weights load into the model described by config.json, strictly.
    model_config = TransformerConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert model_config.vocab_size <= 600 and model_config.hidden_size == 32
    ckpt.load_weights(out / "model.safetensors", build_model("mlm", model_config))

    # A fresh run refuses the directory; --resume extends the run to 12 updates.
    assert cli.main(["--config", str(config), "--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["--config", str(config), "--out", str(out), "--resume", "--max-steps", "12"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [4, 8, 12]
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step-00000012"


def test_bad_command_line_values_name_the_option(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--config", str(config), "--out", str(tmp_path / "out"), "--max-steps", "0"])
    assert exit_info.value.code == 2
    assert "--max-steps: must be a positive integer" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    assert cli.main(["--config", str(config), "--out", str(tmp_path / "empty"), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"training": {"learning_rate": 1.0}}, "unknown key(s) ['learning_rate'] in config.training"),
    ({"training": {"lr": "fast"}}, "config.training.lr must be a number"),
    ({"training": {"precision": "fp8"}}, "precision must be one of"),
    ({"training": {"seed": 1}}, "unknown key(s) ['seed'] in config.training"),
    ({"data": {"max_length": 0}}, "data.max_length must be >= 1"),
    ({"batch": {"global_batch_size": "8"}}, "config.batch.global_batch_size must be an integer"),
    ({"task": "translation"}, "task must be one of"),
    ({"model": []}, "config.model must be a table/object"),
])
def test_bad_configs_name_the_key(tmp_path, capsys, change, message):
    values = json.loads(json.dumps(TINY))
    for section, update in change.items():
        if isinstance(update, dict):
            values[section].update(update)
        else:
            values[section] = update
    config = write_config(tmp_path, values)
    assert cli.main(["--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_toml_config_and_unknown_format(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('task = "mlm"\nseed = 5\n[model]\npreset = "tiny"\n'
                    '[training]\nsteps = 7\nbetas = [0.9, 0.98]\nsave_every = 3\n')
    config = cli.load_run_config(toml)
    assert config.seed == config.training.seed == 5
    assert config.training.steps == 7 and config.training.betas == (0.9, 0.98)
    assert config.model.preset == "tiny"
    with pytest.raises(ValueError, match=".json or .toml"):
        cli.load_run_config(write_config(tmp_path, TINY, "run.yaml"))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        cli.load_run_config(tmp_path / "broken.json")


@pytest.mark.parametrize("name", ["mlm_wikitext2_cpu.json", "mlm_wikitext2_bert_base.json"])
def test_shipped_configs_are_valid(name):
    config = cli.load_run_config(REPO / "configs" / name)
    model = TransformerConfig.preset(config.model.preset, vocab_size=config.tokenizer.vocab_size,
                                     **config.model.overrides)
    assert config.data.max_length <= model.max_position_embeddings
    assert config.batch.global_batch_size % config.batch.accumulation_steps == 0
    if "bert_base" in name:
        assert (model.hidden_size, model.num_layers, model.num_heads) == (768, 12, 12)
        assert config.training.precision == "bf16" and config.batch.global_batch_size == 256
    else:
        assert config.training.precision == "fp32" and config.training.steps <= 200
