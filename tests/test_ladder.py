"""Ladder side-tuning (LST): a float64 rebuild from the paper's equations, and its laws.

No package implements LST, so the reference is written here from the released code's
description (``modeling_side_t5.py``: ``h ← g·h + (1 − g)·Down_i(h^b_i)`` then the side
block, ``g = σ(α/T)``; Su's variant adds after the block): a post-LN BERT layer by layer in
float64 from the library model's weights, for the backbone and the side blocks alike. It
uses nothing of :mod:`tutorial_lib.techniques.ladder` but the weights.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.data.batching import ClassificationCollator
from tutorial_lib.techniques import ladder
from tutorial_lib.training.loop import BatchLoader, train

# Weights of std 0.2 so that every term is of order 1; no dropout unless a test adds it.
CONFIG = TransformerConfig.preset("tiny", vocab_size=60, num_layers=3, hidden_dropout=0.0,
                                  attention_dropout=0.0, initializer_range=0.2)


def backbone(seed=0, config=CONFIG, dtype=torch.float32):
    torch.manual_seed(seed)
    return SequenceClassifier(config, num_labels=3, pooling="mean").to(dtype)


def lst(seed=0, dtype=torch.float32, config=CONFIG, **options):
    model = ladder.LadderSideTuning(backbone(seed, config).encoder, num_labels=3,
                                    reduction=options.pop("reduction", 4), **options)
    return model.to(dtype)


def make_batch(seed=0, lengths=(9, 6, 3, 8)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
        ids[row, length:] = 0
    labels = torch.randint(0, 3, (len(lengths),), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- the rebuild -------------------------------------------------------------------------------

def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + module.eps) * module.weight + module.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def bert_layer(h, layer, extended):
    """A post-LN BERT layer with the additive padding mask ``extended`` (B, 1, 1, L)."""
    attn = layer.attention
    heads = attn.num_heads
    d = h.shape[-1] // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # (B, heads, L, d)

    q = split(h @ attn.query.weight.T + attn.query.bias)
    k = split(h @ attn.key.weight.T + attn.key.bias)
    v = split(h @ attn.value.weight.T + attn.value.bias)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + extended
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
    h = layer_norm(h + context @ attn.output.weight.T + attn.output.bias, layer.attention_norm)
    ff = layer.feed_forward
    inner = gelu(h @ ff.up.weight.T + ff.up.bias) @ ff.down.weight.T + ff.down.bias
    return layer_norm(h + inner, layer.feed_forward_norm)


def reference_logits(model, batch):
    """LST's forward from its equations, in the dtype of the weights."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extended = (1.0 - mask[:, None, None, :].to(torch.float64)) * -1e9
    emb = model.backbone.embeddings
    h = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[torch.arange(ids.shape[1])] \
        + emb.token_type_embeddings.weight[torch.zeros_like(ids)]
    states = [layer_norm(h, emb.norm)]
    for layer in model.backbone.layers:
        states.append(bert_layer(states[-1], layer, extended))
    linear = lambda x, m: x @ m.weight.T + m.bias  # noqa: E731
    side = linear(states[0], model.down[0])
    for k, (index, block) in enumerate(zip(model.side_layers, model.blocks)):
        rung = linear(states[index], model.down[k + 1])
        if model.ladder == "gated":
            g = 1 / (1 + math.exp(-model.gate_logits[k].detach().item() / model.temperature))
            side = bert_layer(g * side + (1 - g) * rung, block, extended)
        else:
            side = bert_layer(side, block, extended) + rung
    up = linear(side, model.up)
    weights = mask[..., None].to(up.dtype)
    pooled = (up * weights).sum(1) / weights.sum(1)
    return linear(pooled, model.classifier)


@pytest.mark.parametrize("options", [
    {}, {"side_layers": (1, 3)}, {"ladder": "add", "side_layers": (2, 3)},
    {"reduction": 2, "side_heads": 1}])
def test_forward_matches_the_float64_rebuild(options):
    model = lst(dtype=torch.float64, **options).eval()
    with torch.no_grad():  # gates away from 0.5, so that a swapped g and 1 − g would show
        if model.gate_logits is not None:
            model.gate_logits.copy_(torch.linspace(-0.2, 0.3, len(model.side_layers)))
    batch = make_batch()
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, reference_logits(model, batch), rtol=1e-10, atol=1e-10)


def test_su_variant_taps_every_third_layer():
    config = TransformerConfig.preset("tiny", vocab_size=60, num_layers=12, hidden_size=48,
                                      num_heads=4, intermediate_size=96)
    model = ladder.su_variant(backbone(config=config).encoder)
    assert model.side_layers == (3, 6, 9, 12)  # Su: after side layer i, backbone layer 3(i+1)
    assert model.ladder == "add" and model.gate_logits is None
    assert model.side.hidden_size == 8 and model.side.num_heads == 4


# -- the laws ----------------------------------------------------------------------------------

def test_gates_are_one_half_at_initialisation():
    model = lst()
    assert torch.equal(model.gate_logits.detach(), torch.zeros(CONFIG.num_layers))
    assert torch.equal(model.gates().detach(), torch.full((CONFIG.num_layers,), 0.5))
    assert lst(ladder="add").gate_logits is None


def test_gate_one_cuts_the_backbone_off():
    batch = make_batch()
    model = lst().eval()
    with torch.no_grad():
        model.gate_logits.fill_(1e4)  # σ(1e5) is exactly 1 in float32
        before = model(**batch).logits
        for layer in model.backbone.layers:  # change every backbone layer
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        after = model(**batch).logits
        assert torch.equal(before, after)
        model.gate_logits.fill_(0.0)  # the control: at g = 0.5 the same change shows
        first = model(**batch).logits
        for p in model.backbone.layers[-1].parameters():
            p.add_(torch.randn_like(p))
        assert not torch.allclose(first, model(**batch).logits)


def test_no_backbone_parameter_receives_a_gradient():
    model = lst()
    model.train()
    model(**make_batch()).loss.backward()
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    side = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    assert side and all(p.grad is not None for p in side)
    assert ladder.trainable_parameters(model) == sum(p.numel() for p in side)


def backbone_storages(encoder, run):
    """Storages of every tensor a backbone module outputs while ``run()`` runs (the
    tensors are kept alive, so that no later tensor can reuse their memory)."""
    outputs, alive = set(), []

    def record(module, args, output):
        for t in (output if isinstance(output, tuple) else (output,)):
            if torch.is_tensor(t):
                alive.append(t)
                outputs.add(t.untyped_storage().data_ptr())

    handles = [m.register_forward_hook(record) for m in encoder.modules()]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return outputs, result


@pytest.mark.parametrize("side_layers", [None, (2,)])
def test_autograd_saves_no_backbone_activation(side_layers):
    model = lst(side_layers=side_layers)
    model.train()
    batch = make_batch()
    during_backbone = []
    real_states = model.backbone_states

    def spied_states(*args):
        with ladder.saved_tensors() as saved:
            result = real_states(*args)
        during_backbone.extend(saved)
        return result

    model.backbone_states = spied_states
    with ladder.saved_tensors() as saved:
        produced, output = backbone_storages(model.backbone, lambda: model(**batch))
    assert during_backbone == []  # nothing is saved while the backbone runs
    states, _ = real_states(batch["input_ids"], batch["attention_mask"])
    taps = [0] + list(model.side_layers)
    saved_from_backbone = {t.untyped_storage().data_ptr() for t in saved} & produced
    # The only backbone tensors kept are the states the ladder's down-projections read:
    # one per rung, (batch, seq, d) each.
    assert len(saved_from_backbone) == len(taps)
    down_inputs = []
    handles = [down.register_forward_pre_hook(lambda m, args: down_inputs.append(args[0]))
               for down in model.down]
    model(**batch)
    for h in handles:
        h.remove()
    assert [tuple(t.shape) for t in down_inputs] == [tuple(states[i].shape) for i in taps]
    output.loss.backward()

    # The control: full fine-tuning of the same encoder saves many backbone tensors.
    full = backbone()
    full.train()
    with ladder.saved_tensors() as saved:
        produced, _ = backbone_storages(full.encoder, lambda: full(**batch))
    assert len({t.untyped_storage().data_ptr() for t in saved} & produced) > 4 * CONFIG.num_layers


def test_training_memory_counts_what_a_step_holds():
    batch = make_batch()
    model = lst()
    memory = ladder.training_memory(model, batch)
    trainable = ladder.trainable_parameters(model)
    assert memory["gradients"] == 4 * trainable and memory["optimizer"] == 8 * trainable
    assert memory["weights"] == 4 * sum(p.numel() for p in model.parameters())
    assert memory["total"] == sum(memory[k] for k in ("weights", "gradients", "optimizer",
                                                       "activations"))
    assert all(p.grad is None for p in model.parameters())
    full = ladder.training_memory(backbone(), batch)
    assert memory["activations"] < full["activations"]

    class Linear(torch.nn.Module):  # a known case: a linear layer saves its input only
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(5, 3)

        def forward(self, x, labels):
            return type("Out", (), {"loss": self.layer(x).square().mean()})

    x = torch.randn(7, 5)
    assert ladder.training_memory(Linear(), {"x": x, "labels": None})["activations"] \
        == 7 * 5 * 4 + 7 * 3 * 4  # the input, and the output saved by square


def test_layer_dropping_builds_blocks_only_where_asked():
    model = lst(side_layers=(1, 3))
    assert len(model.blocks) == 2 and len(model.down) == 3 and model.gate_logits.numel() == 2


# -- pruned initialisation -----------------------------------------------------------------

def importance_of(model_seed=0):
    classifier = backbone(model_seed)
    batches = [make_batch(seed) for seed in range(3)]
    return classifier, ladder.fisher_importance(classifier, batches)


def test_fisher_importance_is_zero_for_a_dead_unit():
    classifier = backbone()
    with torch.no_grad():
        classifier.encoder.layers[1].feed_forward.up.weight[5].zero_()
        classifier.encoder.layers[1].feed_forward.up.bias[5] = 0.0
    scores = ladder.fisher_importance(classifier, [make_batch(0), make_batch(1)])
    assert scores["ffn"][1][5] == 0 and (scores["ffn"][1] > 0).sum() == CONFIG.intermediate_size - 1
    assert scores["hidden"].shape == (CONFIG.hidden_size,) and len(scores["qk"]) == CONFIG.num_layers
    assert all(p.grad is None for p in classifier.parameters())


def test_pruning_with_r_1_copies_the_backbone_layer():
    classifier, scores = importance_of()
    model = ladder.LadderSideTuning(classifier.encoder, reduction=1, init="pruned",
                                    importance=scores, num_labels=3).eval()
    batch = make_batch()
    states, ctx = model.backbone_states(batch["input_ids"], batch["attention_mask"])
    for k, block in enumerate(model.blocks):
        expected, _ = model.backbone.layers[k](states[k], ctx)
        got, _ = block(states[k], ctx)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.down[0](states[0]), states[0])


def test_pruning_keeps_the_most_important_units():
    classifier, scores = importance_of()
    model = ladder.LadderSideTuning(classifier.encoder, reduction=4, init="pruned",
                                    importance=scores, num_labels=3)
    kept = scores["hidden"].topk(8).indices.sort().values
    assert torch.equal(model.down[1].weight.nonzero()[:, 1], kept)
    source, block = model.backbone.layers[2].feed_forward, model.blocks[2].feed_forward
    units = scores["ffn"][2].topk(16).indices.sort().values
    assert torch.equal(block.up.weight, source.up.weight[units][:, kept])
    assert torch.equal(block.down.weight, source.down.weight[kept][:, units])
    # query and key keep the same dimensions of each head (their dot product stays a sum)
    query, key = model.blocks[2].attention.query, model.blocks[2].attention.key
    origin = model.backbone.layers[2].attention
    rows = [torch.nonzero((origin.query.weight[:, kept] == row).all(-1)).item()
            for row in query.weight]
    assert torch.equal(key.weight, origin.key.weight[rows][:, kept])
    assert sorted(r // 16 for r in rows) == [0] * 4 + [1] * 4  # 4 of each head's 16


def test_pruning_to_fewer_heads_keeps_the_most_important_heads():
    classifier, scores = importance_of()
    model = ladder.LadderSideTuning(classifier.encoder, reduction=4, side_heads=1,
                                    init="pruned", importance=scores, num_labels=3)
    head = int((scores["qk"][0] + scores["value"][0]).view(2, 16).sum(-1).argmax())
    origin = model.backbone.layers[0].attention
    kept = scores["hidden"].topk(8).indices.sort().values
    dims = scores["qk"][0][head * 16:(head + 1) * 16].topk(8).indices.sort().values + head * 16
    assert torch.equal(model.blocks[0].attention.query.weight, origin.query.weight[dims][:, kept])


# -- training with the book's loop, checkpoints -------------------------------------------------

def examples(n=32):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(5, CONFIG.vocab_size, (int(length),), generator=generator).tolist(),
             "label": int(label)}
            for length, label in zip(torch.randint(3, 10, (n,), generator=generator),
                                     torch.randint(0, 3, (n,), generator=generator))]


collate = ClassificationCollator(pad_id=0)


def test_trains_with_the_books_loop_and_leaves_the_backbone_unchanged():
    model = lst()
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    result = train(model, BatchLoader(examples(), 8, collate, seed=0), steps=30, lr=1e-2,
                   progress=False, log_every=5)
    losses = result.series("loss")[1]
    assert losses[-1] < losses[0]
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    assert not torch.equal(model.gate_logits.detach(), torch.zeros(CONFIG.num_layers))


class Interrupt(Exception):
    pass


def test_resume_is_exact(tmp_path):
    def loader():
        return BatchLoader(examples(), 8, collate, seed=0)

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Interrupt
        return model(**{k: v for k, v in batch.items()
                        if k in ("input_ids", "attention_mask", "labels")}).loss, {}

    whole = train(lst(), loader(), steps=4, lr=1e-2, out_dir=tmp_path / "whole", save_every=2,
                  progress=False).model
    with pytest.raises(Interrupt):
        train(lst(), loader(), steps=4, lr=1e-2, loss_step=crashing_step,
              out_dir=tmp_path / "cut", save_every=2, progress=False)
    resumed = train(lst(), loader(), steps=4, lr=1e-2, out_dir=tmp_path / "cut", save_every=2,
                    resume=True, progress=False).model
    state = resumed.state_dict()
    for name, tensor in whole.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # a checkpoint of another ladder is refused
    with pytest.raises(Exception, match="reduction"):
        train(lst(reduction=2), loader(), steps=4, lr=1e-2, out_dir=tmp_path / "cut",
              save_every=2, resume=True, progress=False)


# -- bad input -----------------------------------------------------------------------------------

def test_bad_settings_are_refused_by_name():
    encoder = backbone().encoder
    with pytest.raises(TypeError, match="backbone"):
        ladder.LadderSideTuning(torch.nn.Linear(3, 3))
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="reduction"):
            ladder.LadderSideTuning(encoder, reduction=bad)
    for bad in ((), (0,), (4,), (2, 1), (1, 1), (1.0,)):
        with pytest.raises(ValueError, match="side_layers"):
            ladder.LadderSideTuning(encoder, side_layers=bad)
    with pytest.raises(ValueError, match="ladder"):
        ladder.LadderSideTuning(encoder, ladder="adapter")
    for bad in (0, -1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match="temperature"):
            ladder.LadderSideTuning(encoder, temperature=bad)
    with pytest.raises(ValueError, match="side_heads"):
        ladder.LadderSideTuning(encoder, side_heads=3)
    with pytest.raises(ValueError, match="init"):
        ladder.LadderSideTuning(encoder, init="distilled")
    with pytest.raises(ValueError, match="importance"):
        ladder.LadderSideTuning(encoder, init="pruned")
    with pytest.raises(ValueError, match="importance"):
        ladder.LadderSideTuning(encoder, init="pruned", importance={"hidden": torch.ones(3)})
    with pytest.raises(ValueError, match="pooling"):
        ladder.LadderSideTuning(encoder, pooling="max")
    with pytest.raises(ValueError, match="num_labels"):
        ladder.LadderSideTuning(encoder, num_labels=0)
    with pytest.raises(ValueError, match="every"):
        ladder.su_variant(encoder, every=0)
    with pytest.raises(ValueError, match="gated"):
        lst(ladder="add").gates()
    with pytest.raises(TypeError, match="model"):
        ladder.fisher_importance(torch.nn.Linear(3, 3), [])
    with pytest.raises(ValueError, match="batches"):
        ladder.fisher_importance(backbone(), [])
    with pytest.raises(ValueError, match="optimizer_states"):
        ladder.training_memory(lst(), make_batch(), optimizer_states=-1)
    model = lst()
    batch = make_batch()
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=batch["input_ids"], labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=batch["input_ids"], labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=batch["input_ids"][0])
