"""Adversarial self-attention (ASA): a float64 rebuild from the authors' code, and its laws.

No package implements ASA, so the reference is written here from the description of
gingasan/adversarialSA (``modeling/bert.py``, ``modeling/utils.py``): a post-LN BERT
layer by layer from the library model's weights, with the code's adversary
(``(hW_q+b)(hW_k+b)ᵀ/√H`` plus the extended padding mask), its straight-through sampler
written as the code writes it, ``(hard − σ).detach() + σ``, its gradient reversal, its
masked attention ``scores · 1[mask ≥ 0] + mask`` with ``mask = (1 − M)·(−10000)``
replacing the padding mask, its ``divergence`` (``KLDivLoss(batchmean)`` both ways) and
its loss ``CE + divergence + τ²·Σ M / B``. It uses nothing of
:mod:`tutorial_lib.techniques.asa` but the adversaries' weights.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques import asa
from tutorial_lib.training.loop import BatchLoader, train

# Weights drawn with std 0.2 (not BERT's 0.02) so that logits are of order 1 and about half
# of the adversaries' scores are positive; no dropout unless a test adds it.
CONFIG = TransformerConfig.preset("tiny", vocab_size=60, hidden_dropout=0.0, attention_dropout=0.0,
                                  initializer_range=0.2)


def classifier(seed=0, config=CONFIG, num_labels=3, pooling="mean", dtype=torch.float64):
    torch.manual_seed(seed)
    model = SequenceClassifier(config, num_labels=num_labels, pooling=pooling).to(dtype)
    asa.attach(model)
    return model.to(dtype)


def make_batch(seed=0, lengths=(9, 6, 3, 8), regression=False):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG.vocab_size, (len(lengths), max(lengths)), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
        ids[row, length:] = 0
    labels = (torch.randn(len(lengths), generator=generator, dtype=torch.float64) if regression
              else torch.randint(0, 3, (len(lengths),), generator=generator))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- the rebuild -------------------------------------------------------------------------------

def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + module.eps) * module.weight + module.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def code_sampler(s):
    """``gumbel_sigmoid_sub`` at its temperature 1e-12, noise cancelled."""
    y = s.sigmoid()
    hard = (s / 1e-12).sigmoid()
    return (hard - y).detach() + y


def code_reversal(x):
    return 2 * x.detach() - x  # x forward (exactly: 2x − x is exact), −grad backward


def code_forward(model, batch, masked, captured=None, change_scores=None):
    """The code's BERT forward (post-LN, mean pooling as the library's classifier):
    ``(logits, masks)``; ``masked=False`` is the clean pass with the extended mask."""
    encoder = model.encoder
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    extended = (1.0 - attention_mask[:, None, None, :].to(torch.float64)) * -10000.0  # (B,1,1,L)
    emb = encoder.embeddings
    positions = torch.arange(ids.shape[1])
    h = F.embedding(ids, emb.word_embeddings.weight, padding_idx=CONFIG.pad_token_id) + emb.position_embeddings.weight[positions] \
        + emb.token_type_embeddings.weight[torch.zeros_like(ids)]
    h = layer_norm(h, emb.norm)
    masks = []
    plugin = encoder.attention_plugins[0]
    for index, layer in enumerate(encoder.layers):
        attention_mask_layer = extended
        if masked:
            adversary = plugin.adversaries[index]
            x = h.detach()
            s = (x @ adversary.query.weight.T + adversary.query.bias) \
                @ (x @ adversary.key.weight.T + adversary.key.bias).transpose(-1, -2) \
                / math.sqrt(x.shape[-1]) + extended[:, 0]
            if change_scores is not None:
                s = change_scores(s)
            if captured is not None:
                s.retain_grad()
                captured.setdefault("s", []).append(s)
            m = code_reversal(code_sampler(s))
            masks.append(m)
            attention_mask_layer = (1 - m[:, None]) * -10000.0
        attn = layer.attention
        heads, d = attn.num_heads, attn.head_dim

        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

        q = split(h @ attn.query.weight.T + attn.query.bias)
        k = split(h @ attn.key.weight.T + attn.key.bias)
        v = split(h @ attn.value.weight.T + attn.value.bias)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores * (attention_mask_layer >= 0).to(scores.dtype) + attention_mask_layer
        if captured is not None and masked:
            scores.retain_grad()
            captured.setdefault("logits", []).append(scores)
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
        h = layer_norm(h + context @ attn.output.weight.T + attn.output.bias, layer.attention_norm)
        ff = layer.feed_forward
        inner = gelu(h @ ff.up.weight.T + ff.up.bias) @ ff.down.weight.T + ff.down.bias
        h = layer_norm(h + inner, layer.feed_forward_norm)
    weights = attention_mask[..., None].to(h.dtype)
    pooled = (h * weights).sum(1) / weights.sum(1)
    logits = pooled @ model.classifier.weight.T + model.classifier.bias
    return logits, masks


def code_divergence(query, target):
    if query.dim() <= 2 and query.shape[1] == 1:
        query, target = query.view(-1), target.view(-1)
    q2t = F.kl_div(torch.log_softmax(query, -1), torch.softmax(target, -1), reduction="batchmean")
    t2q = F.kl_div(torch.log_softmax(target, -1), torch.softmax(query, -1), reduction="batchmean")
    return 0.5 * (q2t + t2q)


def code_loss(model, batch, tau=0.5, captured=None):
    logits, _ = code_forward(model, batch, masked=False)
    adv_logits, masks = code_forward(model, batch, masked=True, captured=captured)
    # The task loss as the library's classifier computes it (in float32, as under autocast):
    # what is rebuilt here is ASA, not the classifier.
    if logits.shape[1] == 1:
        task = F.mse_loss(logits.view(-1).float(), batch["labels"].view(-1).float())
    else:
        task = F.cross_entropy(logits.float(), batch["labels"])
    budget = sum(m.sum() / m.shape[0] for m in masks)
    return task + code_divergence(logits, adv_logits) + budget * tau ** 2, adv_logits, masks


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# -- the pieces --------------------------------------------------------------------------------

def test_straight_through_is_hard_forward_and_sigmoid_backward():
    s = torch.tensor([-3.0, -1e-3, 0.0, 1e-3, 2.5], dtype=torch.float64, requires_grad=True)
    m = asa.straight_through(s)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    weights = torch.arange(1.0, 6.0, dtype=torch.float64)
    (grad,) = torch.autograd.grad((m * weights).sum(), s)
    sig = s.detach().sigmoid()
    torch.testing.assert_close(grad, weights * sig * (1 - sig), rtol=0, atol=1e-15)
    # The code's form has the same gradient; its forward is the mask up to rounding only.
    (code_grad,) = torch.autograd.grad((code_sampler(s) * weights).sum(), s)
    torch.testing.assert_close(code_grad, grad, rtol=0, atol=1e-15)


def test_gradient_reversal_negates_and_scales():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = asa.reverse_gradient(x, alpha=0.5)
    assert torch.equal(y, x)
    upstream = torch.randn(3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, -0.5 * upstream)
    for bad in (-1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="alpha"):
            asa.reverse_gradient(x, alpha=bad)


def test_divergence_matches_kl_div_batchmean_both_ways():
    torch.manual_seed(1)
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(asa.divergence(a, b), code_divergence(a, b), rtol=1e-13, atol=0)
    # Regression: softmax over the batch, so a common shift of all scores changes nothing.
    r, t = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    torch.testing.assert_close(asa.divergence(r, t), code_divergence(r, t), rtol=1e-13, atol=0)
    torch.testing.assert_close(asa.divergence(r + 3.0, t), asa.divergence(r, t), rtol=1e-12,
                               atol=1e-15)
    with pytest.raises(ValueError, match="one shape"):
        asa.divergence(a, b[:3])


def test_adversary_scores_and_mask_against_the_formula():
    model = classifier()
    adversary = model.encoder.attention_plugins[0].adversaries[1]
    torch.manual_seed(3)
    h = torch.randn(2, 5, CONFIG.hidden_size, dtype=torch.float64)
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    q = h @ adversary.query.weight.T + adversary.query.bias
    k = h @ adversary.key.weight.T + adversary.key.bias
    expected = q @ k.transpose(-1, -2) / math.sqrt(CONFIG.hidden_size) \
        + (1.0 - padding[:, None, :].to(torch.float64)) * -10000.0
    torch.testing.assert_close(adversary.scores(h, padding), expected, rtol=1e-13, atol=1e-9)
    m = adversary(h, padding)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert not m[1, :, 3:].any()  # padded keys are always masked
    assert torch.equal(m, (expected > 0).to(m.dtype))


# -- the whole step against the rebuild --------------------------------------------------------

@pytest.mark.parametrize("num_labels", [3, 1])
def test_asa_loss_logits_and_every_gradient_match_the_code(num_labels):
    batch = make_batch(regression=num_labels == 1)
    model = classifier(num_labels=num_labels)
    step = asa.ASA(tau=0.5)
    loss, logs = step(model, batch)
    mine = gradients(model, loss)
    reference_loss, _, masks = code_loss(model, batch)
    theirs = gradients(model, reference_loss)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-11, atol=1e-11)
    assert set(mine) == set(theirs)
    assert any(name.startswith("encoder.attention_plugins.0.adversaries") for name in mine)
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-9, atol=1e-10, msg=name)
    # Both masks are hard and about half of the units are kept: the comparison is not vacuous.
    kept = torch.cat([m.detach().flatten() for m in masks])
    assert 0.2 < float(kept.mean()) < 0.8
    assert 0 < logs["masked"] < 1


def test_masked_pass_matches_the_code_including_a_fully_masked_row():
    model = classifier()
    batch = make_batch()
    plugin = model.encoder.attention_plugins[0]
    original = asa.Adversary.scores

    def kill_first_row(s):
        return torch.cat([s[:, :1] - 1e3, s[:, 1:]], dim=1)  # query 0 masks every key

    def scores_with_a_dead_row(self, hidden_states, key_padding_mask=None):
        return kill_first_row(original(self, hidden_states, key_padding_mask))

    asa.Adversary.scores = scores_with_a_dead_row
    try:
        with plugin.masking(model):
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_attentions=True)
        with torch.no_grad():
            # the rebuild, with the same dead row
            reference, _ = code_forward(model, batch, masked=True, change_scores=kill_first_row)
    finally:
        asa.Adversary.scores = original
    torch.testing.assert_close(output.logits, reference, rtol=1e-10, atol=1e-10)
    # The dead row attends evenly to every key, padding included, as in the code.
    first = output.attentions[0][:, :, 0]  # (batch, heads, key)
    torch.testing.assert_close(first, torch.full_like(first, 1 / first.shape[-1]))


def test_gradient_identities_kept_and_masked_units():
    batch = make_batch(lengths=(7, 7, 7, 7))
    model = classifier()
    captured = {}
    tau = 0.5
    loss, _, masks = code_loss(model, batch, tau, captured)
    loss.backward()
    budget_gradient = tau ** 2 / batch["input_ids"].shape[0]
    for s, logits, m in zip(captured["s"], captured["logits"], masks):
        sig = s.detach().sigmoid()
        dl_dm = 1e4 * logits.grad.sum(1) + budget_gradient  # ∂L/∂M: 10⁴ Σ_heads ∂L/∂logit + τ²/B
        expected = -sig * (1 - sig) * dl_dm  # reversed
        torch.testing.assert_close(s.grad, expected, rtol=1e-9, atol=1e-14)
        kept = m.detach() > 0.5
        # A masked unit in a row that keeps some unit: only the budget term survives (its
        # softmax weight is e^-10000 = 0). A row with every unit masked attends evenly,
        # so its units do get the divergence's gradient.
        masked = (m.detach() < 0.5) & kept.any(-1, keepdim=True)
        assert masked.any() and kept.any()
        torch.testing.assert_close(s.grad[masked], (-budget_gradient * sig * (1 - sig))[masked],
                                   rtol=1e-12, atol=0)
    # and the library's adversaries receive the same gradients
    mine = gradients(model, asa.ASA(tau=tau)(model, batch)[0])
    model.zero_grad()
    loss, _, _ = code_loss(model, batch, tau)
    theirs = gradients(model, loss)
    for name in mine:
        if "adversaries" in name:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-9, atol=1e-10)


def test_keep_everything_is_r_drop():
    config = TransformerConfig.preset("tiny", vocab_size=60, hidden_dropout=0.3,
                                      attention_dropout=0.0, initializer_range=0.2)
    model = classifier(config=config).train()
    batch = make_batch(lengths=(7, 7, 7, 7))  # no padding: M ≡ 1 masks nothing
    plugin = model.encoder.attention_plugins[0]
    with torch.no_grad():
        for adversary in plugin.adversaries:  # s = b_q · b_k / √H > 0 for every unit
            for linear in (adversary.query, adversary.key):
                linear.weight.zero_()
                linear.bias.fill_(1.0)
    torch.manual_seed(5)
    loss, logs = asa.ASA(tau=0.5)(model, batch)
    units = CONFIG.num_layers * 7 * 7  # Σ M / B with M ≡ 1
    assert logs["masked"] == 0.0
    torch.manual_seed(5)
    r_drop, _ = asa.ASA(adversary=False)(model, batch)
    torch.testing.assert_close(loss - 0.25 * units, r_drop, rtol=1e-12, atol=1e-12)
    # and R-Drop from its definition: two dropout samples, CE on the first, symmetric KL
    torch.manual_seed(5)
    first = model(**batch)
    second = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    p, q = first.logits.log_softmax(-1), second.logits.log_softmax(-1)
    kl = 0.5 * ((p.exp() * (p - q)).sum(-1) + (q.exp() * (q - p)).sum(-1)).mean()
    torch.testing.assert_close(r_drop, first.loss + kl, rtol=1e-12, atol=1e-12)


def test_evaluation_is_the_plain_model_bitwise():
    torch.manual_seed(0)
    plain = SequenceClassifier(TransformerConfig.preset("tiny", vocab_size=60), num_labels=2).eval()
    with_adversaries = copy.deepcopy(plain)
    asa.attach(with_adversaries)
    batch = make_batch()
    with torch.no_grad():
        a = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = with_adversaries(input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_budget_counts_every_layer_and_padded_query_rows():
    model = classifier()
    batch = make_batch()
    plugin = model.encoder.attention_plugins[0]
    with plugin.masking(model) as masks:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(masks) == CONFIG.num_layers
    assert all(m.shape == (4, 9, 9) for m in masks)
    padded_rows = sum(float(m.detach()[1, 6:, :6].sum()) for m in masks)
    assert padded_rows > 0  # padded queries keep units, and those count in the budget
    _, logs = asa.ASA(tau=0.5)(model, batch)
    assert logs["budget"] == pytest.approx(sum(float(m.detach().sum()) for m in masks) / 4, rel=1e-12)
    fractions = asa.masked_fraction(masks, batch["attention_mask"])
    real = batch["attention_mask"].bool()
    pairs = real[:, :, None] & real[:, None, :]
    assert fractions[0] == pytest.approx(float(((masks[0] == 0) & pairs).sum() / pairs.sum()))


def test_masking_leaves_no_hook_behind_even_on_error():
    model = classifier()
    plugin = model.encoder.attention_plugins[0]
    with pytest.raises(RuntimeError, match="boom"):
        with plugin.masking(model):
            raise RuntimeError("boom")
    assert not plugin.active
    assert all(not layer._forward_pre_hooks for layer in model.encoder.layers)


# -- the loss step in the training loop --------------------------------------------------------

def examples(n=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 9, (1,), generator=generator))
        ids = torch.randint(5, CONFIG.vocab_size, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "label": i % 2})
    return out


def collate(batch, generator=None):
    width = max(len(e["input_ids"]) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(batch):
        ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, :len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([e["label"] for e in batch])}


def fresh(seed=0):
    torch.manual_seed(seed)
    return SequenceClassifier(TransformerConfig.preset("tiny", vocab_size=60), num_labels=2)


def test_train_attaches_the_adversaries_and_trains_them(tmp_path):
    model = fresh()
    loader = BatchLoader(examples(), 8, collate, seed=0)
    result = train(model, loader, steps=3, lr=1e-3, loss_step=asa.ASA(), log_every=1)
    plugin = model.encoder.attention_plugins[0]
    assert isinstance(plugin, asa.AdversarialSelfAttention)
    torch.manual_seed(0)
    untrained = asa.AdversarialSelfAttention(CONFIG.hidden_size, CONFIG.num_layers)
    assert not torch.equal(plugin.adversaries[0].query.weight, untrained.adversaries[0].query.weight)
    assert any("masked" in row for row in result.history)


class Interrupt(Exception):
    pass


class InterruptedASA(asa.ASA):
    """ASA that crashes on its ``after``-th call, as a killed run would."""

    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls > self.after:
            raise Interrupt
        return super().__call__(model, batch)


def test_resume_is_exact_with_the_adversaries(tmp_path):
    def loader():
        return BatchLoader(examples(), 8, collate, seed=0)

    whole = train(fresh(), loader(), steps=4, lr=1e-3, loss_step=asa.ASA(),
                  out_dir=tmp_path / "whole", save_every=2).model
    with pytest.raises(Interrupt):
        train(fresh(), loader(), steps=4, lr=1e-3, loss_step=InterruptedASA(after=3),
              out_dir=tmp_path / "cut", save_every=2)
    # A new process would build a plain model: train attaches the adversaries, then restores.
    resumed = train(fresh(), loader(), steps=4, lr=1e-3, loss_step=asa.ASA(),
                    out_dir=tmp_path / "cut", save_every=2, resume=True).model
    state = resumed.state_dict()
    assert any("adversaries" in name for name in state)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(state[name], tensor), name


# -- bad input ---------------------------------------------------------------------------------

def test_bad_settings_are_refused_by_name():
    for bad in (-0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="tau"):
            asa.ASA(tau=bad)
    with pytest.raises(ValueError, match="adversary"):
        asa.ASA(adversary=1)
    with pytest.raises(TypeError, match="model"):
        asa.attach(torch.nn.Linear(3, 3))
    model = fresh()
    with pytest.raises(ValueError, match="attach"):
        asa.ASA()(model, collate(examples(4)))
    other = asa.AdversarialSelfAttention(CONFIG.hidden_size, CONFIG.num_layers)
    with pytest.raises(ValueError, match="attach"):
        with other.masking(model):
            pass


def test_attach_is_idempotent():
    model = fresh()
    first = asa.attach(model)
    assert asa.attach(model) is first
    assert len(model.encoder.attention_plugins) == 1


def test_clipping_leaves_the_adversaries_out(monkeypatch):
    import tutorial_lib.training.loop as loop

    seen = []
    real_clip = loop.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm):
        parameters = list(parameters)
        seen.append({id(p) for p in parameters})
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(loop.nn.utils, "clip_grad_norm_", spy)
    model = fresh()
    train(model, BatchLoader(examples(), 8, collate, seed=0), steps=1, lr=1e-3,
          loss_step=asa.ASA(), grad_clip=1.0)
    plugin = model.encoder.attention_plugins[0]
    adversaries = {id(p) for p in plugin.parameters()}
    others = {id(p) for p in model.parameters()} - adversaries
    assert seen == [others]
    # plain training clips every parameter, as before
    seen.clear()
    plain = fresh()
    train(plain, BatchLoader(examples(), 8, collate, seed=0), steps=1, lr=1e-3, grad_clip=1.0)
    assert seen == [{id(p) for p in plain.parameters()}]
