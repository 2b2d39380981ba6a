"""The training loop, loader and schedule, on a stand-in model (no dependency on model.py).

The stand-in mixes information across positions (a masked mean), uses dropout and takes
the batch keys every model in the library takes, so padding, masking and RNG handling
are exercised the way a real MLM would exercise them, in milliseconds per step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tutorial_lib.training import checkpoint as ckpt
from tutorial_lib.training import distributed
from standins import VOCAB, StandInMLM, make_examples, mlm_collate
from tutorial_lib.training.loop import (BatchLoader, TrainConfig, build_scheduler, count_shifted_targets,
                                   count_targets, default_loss_step, evaluate_loss, lr_multiplier,
                                   parameter_groups, split_batch, train)

def quick(**overrides) -> TrainConfig:
    values = dict(steps=12, lr=1e-2, warmup_steps=3, log_every=3, progress=False, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def run(out_dir=None, *, accumulation_steps=1, dropout=0.1, seed=0, batch=8, **overrides):
    torch.manual_seed(1234)
    model = StandInMLM(dropout=dropout)
    loader = BatchLoader(make_examples(), batch, mlm_collate, seed=7,
                         accumulation_steps=accumulation_steps)
    result = train(model, loader, quick(seed=seed, **overrides), out_dir=out_dir)
    return result


# -- loader -----------------------------------------------------------------------------

def test_loader_rejects_global_batch_not_divisible():
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchLoader(make_examples(), 10, mlm_collate, seed=0, world_size=2, accumulation_steps=3)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(make_examples(), 8, mlm_collate, seed=0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchLoader(make_examples(4), 8, mlm_collate, seed=0)


def test_each_epoch_is_a_seeded_permutation():
    examples = [{"input_ids": [i + 2]} for i in range(24)]
    seen = []
    loader = BatchLoader(examples, 4, lambda xs: {"input_ids": torch.tensor([x["input_ids"] for x in xs])},
                         seed=3)
    for _ in range(12):  # two epochs of six batches
        (micro,) = loader.next_batch()
        seen.append(micro["input_ids"].flatten().tolist())
    first = sorted(sum(seen[:6], []))
    second = sorted(sum(seen[6:], []))
    assert first == second == list(range(2, 26))  # every example once per epoch
    assert sum(seen[:6], []) != sum(seen[6:], [])  # a new order each epoch
    again = BatchLoader(examples, 4, loader.collate_fn, seed=3)
    assert again.next_batch()[0]["input_ids"].flatten().tolist() == seen[0]


def test_global_batch_is_identical_whatever_the_world_size():
    """Concatenating every rank's micro-batches gives exactly the 1-process batch."""
    examples = make_examples()
    single = BatchLoader(examples, 8, mlm_collate, seed=5)
    ranks = [BatchLoader(examples, 8, mlm_collate, seed=5, rank=r, world_size=2, accumulation_steps=2)
             for r in range(2)]
    for _ in range(10):
        (whole,) = single.next_batch()
        parts = [micro for loader in ranks for micro in loader.next_batch()]
        assert len(parts) == 4 and all(p["input_ids"].shape[0] == 2 for p in parts)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        assert sum(p["num_targets"] for p in parts) == whole["num_global_targets"] == whole["num_targets"]
        assert all(p["num_global_targets"] == whole["num_global_targets"] for p in parts)


def test_loader_state_resumes_at_the_next_batch():
    examples = make_examples()
    original = BatchLoader(examples, 8, mlm_collate, seed=9)
    for _ in range(11):  # crosses an epoch boundary (8 batches per epoch)
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # survives JSON
    resumed = BatchLoader(examples, 8, mlm_collate, seed=9)
    resumed.load_state_dict(state)
    for _ in range(7):
        (a,), (b,) = original.next_batch(), resumed.next_batch()
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(a[key], b[key])
    other_seed = BatchLoader(examples, 8, mlm_collate, seed=10)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_collate_without_generator_and_partial_last_batch():
    examples = [{"x": i} for i in range(10)]
    loader = BatchLoader(examples, 4, lambda xs: {"x": torch.tensor([e["x"] for e in xs])},
                         seed=0, shuffle=False, drop_last=False, world_size=1, accumulation_steps=2)
    sizes = [[m["x"].shape[0] for m in loader.next_batch()] for _ in range(3)]
    assert sizes == [[2, 2], [2, 2], [1, 1]]  # the 2-example remainder is kept, split 1 + 1
    assert loader.batches_per_epoch == 3


def test_count_targets_token_rows_and_regression():
    tokens = {"labels": torch.tensor([[1, -100, 3], [-100, -100, 5]])}
    assert count_targets(tokens) == 3
    assert count_shifted_targets(tokens) == 2  # position 0 predicts nothing in a causal LM
    assert count_targets({"labels": torch.tensor([0, 1, -100])}) == 2
    assert count_targets({"labels": torch.tensor([0.5, 1.0, 4.0])}) == 3
    parts = split_batch({"labels": torch.arange(5), "names": list("abcde"), "scale": 2.0}, 2)
    assert [p["names"] for p in parts] == [["a", "b"], ["c", "d", "e"]]
    assert all(p["scale"] == 2.0 for p in parts)


# -- schedule and optimiser ---------------------------------------------------------------

def test_warmup_then_linear_and_cosine_decay():
    kw = dict(warmup_steps=4, total_steps=14)
    assert [lr_multiplier(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **kw) == 1.0
    assert lr_multiplier(9, **kw) == pytest.approx(0.5)
    assert lr_multiplier(14, **kw) == pytest.approx(0.0)
    assert lr_multiplier(9, **kw, min_lr_ratio=0.2) == pytest.approx(0.6)
    assert lr_multiplier(9, **kw, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(6, **kw, schedule="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_multiplier(14, **kw, schedule="cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(100, **kw, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(0, **kw, schedule="exponential")


def test_scheduler_drives_the_optimizer_lr():
    config = quick(lr=0.1, warmup_steps=2, steps=6, schedule="linear")
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=config.lr)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025])


def test_weight_decay_skips_biases_and_layernorm():
    model = StandInMLM()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model.embed.weight), id(model.mix.weight), id(model.out.weight)}
    assert ids(no_decay) == {id(model.mix.bias), id(model.norm.weight), id(model.norm.bias),
                             id(model.out.bias)}
    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5))
    tied[1].weight = tied[0].weight
    assert len(parameter_groups(tied, 0.1)[0]["params"]) == 1  # a tied matrix is decayed once


@pytest.mark.parametrize("field, value", [("precision", "fp8"), ("schedule", "step"), ("steps", 0),
                                          ("warmup_steps", -1), ("lr", 0.0), ("save_every", 0)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_rejects_unknown_option_and_wrong_rank():
    loader = BatchLoader(make_examples(), 8, mlm_collate, seed=0)
    with pytest.raises(TypeError, match="learning_rate"):
        train(StandInMLM(), loader, learning_rate=1.0)
    other = BatchLoader(make_examples(), 8, mlm_collate, seed=0, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        train(StandInMLM(), other, quick())


# -- the loop ---------------------------------------------------------------------------

def test_training_reduces_the_loss_and_logs_history(tmp_path):
    result = run(tmp_path, steps=30, log_every=5, dropout=0.0)
    losses = result.series("loss")[1]
    assert len(losses) == 6 and losses[-1] < losses[0]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "lr", "grad_norm", "epoch"} <= set(lines[0])
    # The record at step 5 carries the rate of the 5th update (index 4): one step into
    # the linear decay that follows 3 warm-up updates, out of 27 decay updates.
    assert lines[0]["lr"] == pytest.approx(1e-2 * (1 - 1 / 27))
    weights = ckpt.load_weights(tmp_path / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in result.model.state_dict().items())
    assert json.loads((tmp_path / "config.json").read_text()) == result.model.config


def test_accumulation_equals_one_big_batch():
    """Micro-batches have unequal target counts, so a plain average of their mean losses
    would be wrong; target-weighted normalisation makes accumulation exact up to
    float summation order (hence allclose, not equal)."""
    loader = BatchLoader(make_examples(), 8, mlm_collate, seed=7, accumulation_steps=4)
    micro = loader.next_batch()
    counts = [m["num_targets"] for m in micro]
    assert len(set(counts)) > 1  # the test is sensitive to naive averaging
    one = run(steps=8, dropout=0.0).model.state_dict()
    four = run(steps=8, dropout=0.0, accumulation_steps=4).model.state_dict()
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-5, atol=1e-6)


def test_dropout_seed_matters_and_runs_are_reproducible():
    a = run(steps=5).model.state_dict()
    b = run(steps=5).model.state_dict()
    c = run(steps=5, seed=1).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_stop_after_runs_the_beginning_of_the_same_run(tmp_path):
    whole = run(steps=12, log_every=3)
    torch.manual_seed(1234)
    model = StandInMLM()
    loader = BatchLoader(make_examples(), 8, mlm_collate, seed=7)
    first = train(model, loader, quick(steps=12, log_every=3), stop_after=6)
    # The first six updates of the 12-update run, with its schedule: the same two logs.
    assert first.history == [{k: v for k, v in r.items() if k != "elapsed_s"} | {"elapsed_s": f["elapsed_s"]}
                             for r, f in zip(whole.history[:2], first.history)]
    assert len(first.history) == 2 and first.history[1]["step"] == 6
    shorter = run(steps=6, log_every=3)  # a 6-update run decays faster: not the same
    assert shorter.history[1]["lr"] != first.history[1]["lr"]
    for bad in (0, 13, 2.5, True):
        with pytest.raises(ValueError, match="stop_after"):
            train(StandInMLM(), BatchLoader(make_examples(), 8, mlm_collate, seed=7),
                  quick(), stop_after=bad)
    with pytest.raises(ValueError, match="stop_after"):
        train(StandInMLM(), BatchLoader(make_examples(), 8, mlm_collate, seed=7),
              quick(), stop_after=3, out_dir=tmp_path)


class Interrupt(Exception):
    pass


def interrupting(after_calls: int):
    calls = {"n": 0}

    def loss_step(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Interrupt
        return default_loss_step(model, batch)
    return loss_step


def test_resume_in_process_is_bitwise_identical(tmp_path):
    """A crash after step 8 (checkpoint at 6) and a resume reproduce the uninterrupted run."""
    reference = run(tmp_path / "ref", save_every=3, accumulation_steps=2)

    def build():
        torch.manual_seed(1234)
        return (StandInMLM(), BatchLoader(make_examples(), 8, mlm_collate, seed=7, accumulation_steps=2))
    model, loader = build()
    with pytest.raises(Interrupt):
        train(model, loader, quick(save_every=3), out_dir=tmp_path / "run",
              loss_step=interrupting(after_calls=2 * 8))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")] == \
        ["step-00000003", "step-00000006"]
    with pytest.raises(FileExistsError, match="resume"):
        train(*build(), quick(save_every=3), out_dir=tmp_path / "run")
    model, loader = build()
    resumed = train(model, loader, quick(save_every=3), out_dir=tmp_path / "run", resume=True)
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(reference.history)
    on_disk = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert strip(on_disk) == strip(reference.history)  # the crashed run's step-9 log was dropped


def test_resume_needs_a_checkpoint_and_the_same_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(StandInMLM(), BatchLoader(make_examples(), 8, mlm_collate, seed=7), quick(),
              out_dir=tmp_path, resume=True)
    run(tmp_path, steps=3)
    bigger = StandInMLM(hidden=24)
    with pytest.raises(ckpt.CheckpointError, match="hidden_size: checkpoint has 16, current model has 24"):
        train(bigger, BatchLoader(make_examples(), 8, mlm_collate, seed=7), quick(steps=6),
              out_dir=tmp_path, resume=True)


def test_loss_step_logs_eval_fn_and_bf16(tmp_path):
    modes = []

    def loss_step(model, batch):
        loss, _ = default_loss_step(model, batch)
        return loss, {"double_loss": 2 * loss.detach()}

    def eval_fn(model):
        modes.append(model.training)
        batches = [mlm_collate(make_examples(8, seed=99), torch.Generator().manual_seed(0))]
        return evaluate_loss(model, batches)

    torch.manual_seed(0)
    model = StandInMLM()
    loader = BatchLoader(make_examples(), 8, mlm_collate, seed=7)
    result = train(model, loader, quick(steps=6, eval_every=2, precision="bf16"),
                   loss_step=loss_step, eval_fn=eval_fn)
    train_rows = [r for r in result.history if r["event"] == "train"]
    assert all(r["double_loss"] == pytest.approx(2 * r["loss"], rel=1e-5) for r in train_rows)
    assert result.series("eval_loss", event="eval")[0] == [2, 4, 6]
    assert all(math.isfinite(v) for v in result.series("eval_loss", event="eval")[1])
    assert modes == [False, False, False] and model.training


# torch.compile's own imports trip a torch-internal deprecation warning; not ours to fix.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_unwrap_model_strips_compile_wrapper():
    model = StandInMLM()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert distributed.unwrap_model(compiled) is model
    assert list(distributed.unwrap_model(compiled).state_dict()) == list(model.state_dict())
