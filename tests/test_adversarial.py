"""Embedding-space adversarial training: parity with smart-pytorch and the methods' invariants."""

import functools

import pytest
import smart_pytorch
import torch
import torch.nn.functional as F
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from tutorial_lib import SequenceClassifier, TransformerConfig
from tutorial_lib.techniques import adversarial as adv
from tutorial_lib.interop import from_hf
from tutorial_lib.training.loop import BatchLoader, TrainConfig, train

CONFIG = TransformerConfig.preset("tiny", vocab_size=60, hidden_dropout=0.0, attention_dropout=0.0)


def classifier(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    return SequenceClassifier(config, num_labels=3)


def make_batch(seed=0, padded=True):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG.vocab_size, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        for row, length in enumerate((9, 6, 3, 8)):
            mask[row, length:] = 0
            ids[row, length:] = 0
    labels = torch.randint(0, 3, (4,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def parameter_gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def plain_loss(model, batch):
    return adv.forward_with(model, batch, None, "word_embeddings").loss


# -- parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
def test_alum_code_normalisation_equals_smart_pytorch(padded):
    model = classifier().eval()
    batch = make_batch(padded=padded)
    alum = adv.ALUM(projection="code", step_size=1e-3, noise_std=1e-5, gamma=1e-6, steps=1)

    # Theirs: SMARTLoss on the embedding output, with an eval_fn that swaps it in.
    captured = {}
    site = adv.perturbation_site(model, alum.where)
    handle = site.register_forward_hook(lambda m, i, out: captured.setdefault("embed", out))
    clean_logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    handle.remove()

    def eval_fn(embed):
        handle = site.register_forward_hook(lambda m, i, out: embed)
        try:
            return model(batch["input_ids"], batch["attention_mask"]).logits
        finally:
            handle.remove()

    theirs_fn = smart_pytorch.SMARTLoss(
        eval_fn=eval_fn, loss_fn=smart_pytorch.kl_loss,
        loss_last_fn=functools.partial(smart_pytorch.sym_kl_loss, reduction="batchmean"),
        num_steps=1, step_size=1e-3, epsilon=1e-6, noise_var=1e-5)
    torch.manual_seed(7)
    theirs = theirs_fn(captured["embed"], clean_logits)
    theirs_grads = parameter_gradients(model, theirs)

    torch.manual_seed(7)
    ours = alum.smoothness(model, {k: batch[k] for k in ("input_ids", "attention_mask")},
                           model(batch["input_ids"], batch["attention_mask"]).logits)
    ours_grads = parameter_gradients(model, ours)
    # Theirs also perturbs padding positions; no real token attends to them, so the
    # loss and the gradients are the same as ours, which keeps δ = 0 there.
    assert abs(ours.item() - theirs.item()) < 1e-6
    assert_same_gradients(ours_grads, theirs_grads, atol=1e-6)
    assert ours.item() > 0


# -- invariants ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(epsilon=st.floats(1e-4, 10.0), scale=st.floats(1e-3, 1e3), norm=st.sampled_from(adv.NORMS),
       seed=st.integers(0, 1000))
def test_projection_never_leaves_the_ball(epsilon, scale, norm, seed):
    generator = torch.Generator().manual_seed(seed)
    delta = scale * torch.randn(3, 5, 8, generator=generator)
    projected = adv.project(delta, epsilon, norm)
    assert (adv.delta_norm(projected, norm) <= epsilon * (1 + 1e-5)).all()
    inside = adv.delta_norm(delta, norm) <= epsilon
    if norm == "l2":  # points inside stay where they are
        assert torch.allclose(projected[inside[:, 0, 0]], delta[inside[:, 0, 0]])


@pytest.mark.parametrize("norm", adv.NORMS)
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_delta_stays_in_the_ball_and_off_padding(norm, random_start):
    model = classifier().eval()
    batch = make_batch()
    attack = adv.PGD(epsilon=0.05, step_size=0.04, steps=4, norm=norm, random_start=random_start)
    delta = attack.attack(model, batch)
    assert (adv.delta_norm(delta, norm) <= 0.05 * (1 + 1e-5)).all()
    assert (delta[batch["attention_mask"] == 0] == 0).all()


def test_alum_paper_delta_stays_in_the_ball_code_delta_does_not():
    model = classifier().eval()
    batch = make_batch()
    logits = adv.forward_with(model, batch, None, "embedding_output").logits
    paper = adv.ALUM(epsilon=1e-5, projection="paper").adversarial_delta(model, batch, logits)
    code = adv.ALUM(epsilon=1e-5, projection="code").adversarial_delta(model, batch, logits)
    real = batch["attention_mask"].bool()
    assert paper.abs().max() <= 1e-5 * (1 + 1e-5)
    token_inf = adv.delta_norm(code, "linf")[real]
    assert token_inf.min() > 0.9  # the code's normalisation: ‖δ‖∞ ≈ 1 per token, not ε


METHODS = {
    "fgm": lambda eps: adv.FGM(epsilon=eps),
    "fgm-linf": lambda eps: adv.FGM(epsilon=eps, norm="linf"),
    "pgd": lambda eps: adv.PGD(epsilon=eps, steps=2),
    "freelb": lambda eps: adv.FreeLB(epsilon=eps, steps=3, init_magnitude=0.5),
    "vat": lambda eps: adv.VAT(epsilon=eps),
    "alum": lambda eps: adv.ALUM(epsilon=eps),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_epsilon_zero_is_plain_training(name):
    model = classifier().eval()
    batch = make_batch()
    torch.manual_seed(0)
    loss, _ = METHODS[name](0.0)(model, batch)
    plain = plain_loss(model, batch)
    assert abs(loss.item() - plain.item()) < 1e-6
    assert_same_gradients(parameter_gradients(model, loss), parameter_gradients(model, plain), atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_train_a_model_converted_from_hugging_face(name):
    hf_config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = from_hf(transformers.BertForSequenceClassification(hf_config))
    loss, logs = METHODS[name](0.1)(model, make_batch())
    loss.backward()
    assert torch.isfinite(loss) and logs
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_ascent_step_increases_the_inner_loss():
    model = classifier().eval()
    batch = make_batch()
    clean = plain_loss(model, batch).item()
    for norm in adv.NORMS:
        delta = adv.PGD(epsilon=0.5, step_size=0.2, steps=3, norm=norm).attack(model, batch)
        assert adv.forward_with(model, batch, delta, "word_embeddings").loss.item() > clean
    logits = adv.forward_with(model, batch, None, "embedding_output").logits.detach()
    alum = adv.ALUM(epsilon=0.1, step_size=0.1, noise_std=1e-3)
    torch.manual_seed(0)
    start = torch.randn_like(adv.zero_delta(model, batch)) * alum.noise_std * adv.token_mask(batch)
    torch.manual_seed(0)
    final = alum.adversarial_delta(model, batch, logits)

    def inner(delta):
        return adv.kl_divergence(logits, adv.forward_with(model, batch, delta, alum.where).logits).item()

    assert inner(final) > 10 * inner(start)


def test_freelb_gradient_is_the_mean_of_its_per_step_gradients():
    model = classifier().eval()
    batch = make_batch()
    method = adv.FreeLB(steps=3, step_size=0.3, epsilon=0.5)
    loss, _ = method(model, batch)
    together = parameter_gradients(model, loss)

    # The same ascent by hand, one backward per step.
    mask = adv.token_mask(batch)
    delta = adv.zero_delta(model, batch)
    per_step = []
    for _ in range(3):
        delta = delta.detach().requires_grad_()
        step_loss = adv.forward_with(model, batch, delta, "word_embeddings").loss
        (gradient,) = torch.autograd.grad(step_loss, delta, retain_graph=True)
        per_step.append(parameter_gradients(model, step_loss))
        delta = adv.project(delta + 0.3 * gradient / gradient.flatten(1).norm(dim=1)[:, None, None],
                            0.5, "l2") * mask
    mean = {name: sum(g[name] for g in per_step) / 3 for name in per_step[0]}
    assert_same_gradients(together, mean, atol=1e-6)
    assert not torch.allclose(per_step[0]["classifier.weight"], per_step[-1]["classifier.weight"])


def test_vat_needs_no_labels():
    model = classifier().eval()
    batch = {k: v for k, v in make_batch().items() if k != "labels"}
    loss, logs = adv.VAT(epsilon=0.5)(model, batch)
    assert loss.item() > 0 and "clean_loss" not in logs
    loss.backward()


def test_seeded_runs_are_reproducible():
    examples = [{"input_ids": make_batch(s)["input_ids"][0].tolist(), "label": s % 3} for s in range(16)]

    def collate(items):
        ids = torch.tensor([item["input_ids"] for item in items])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([item["label"] for item in items])}

    def run():
        model = classifier(config=TransformerConfig.preset("tiny", vocab_size=60))  # dropout on
        result = train(model, BatchLoader(examples, 4, collate, seed=0),
                       TrainConfig(steps=4, lr=1e-3, seed=0, log_every=1, progress=False),
                       loss_step=adv.ALUM(alpha=1.0, epsilon=1e-3, step_size=1e-2))
        timeless = [{k: v for k, v in record.items() if k != "elapsed_s"} for record in result.history]
        return result.model.state_dict(), timeless

    (weights_a, history_a), (weights_b, history_b) = run(), run()
    assert history_a == history_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert "adv_penalty" in history_a[0]


def test_attacked_accuracy_is_at_most_clean_accuracy_and_restores_the_mode():
    model = classifier().train()
    batches = [make_batch(s) for s in range(3)]
    result = adv.attacked_accuracy(model, batches, adv.PGD(epsilon=1.0, step_size=0.5, steps=3))
    assert model.training
    assert 0 <= result["attacked_accuracy"] <= result["accuracy"] <= 1
    untouched = adv.attacked_accuracy(model, batches, adv.PGD(epsilon=0.0, steps=1))
    assert untouched["attacked_accuracy"] == untouched["accuracy"]


@pytest.mark.parametrize("make, message", [
    (lambda: adv.FGM(epsilon=-1.0), "epsilon must be a number >= 0"),
    (lambda: adv.FGM(norm="l1"), "norm must be one of"),
    (lambda: adv.PGD(steps=0), "steps must be an int >= 1"),
    (lambda: adv.PGD(adv_weight=1.5), "adv_weight must be a number in"),
    (lambda: adv.FreeLB(where="positions"), "where must be one of"),
    (lambda: adv.VAT(xi=0.0), "xi must be a number > 0"),
    (lambda: adv.ALUM(projection="clip"), "projection must be one of"),
])
def test_bad_settings_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_wrong_model_and_missing_labels_are_explained():
    with pytest.raises(TypeError, match="encoder.embeddings"):
        adv.FGM()(torch.nn.Linear(2, 2), make_batch())
    batch = {k: v for k, v in make_batch().items() if k != "labels"}
    with pytest.raises(ValueError, match="no labels"):
        adv.FGM()(classifier(), batch)


def test_the_hook_is_removed_even_after_an_error():
    model = classifier()
    site = adv.perturbation_site(model, "word_embeddings")
    with pytest.raises(ValueError, match="delta has shape"):
        adv.forward_with(model, make_batch(), torch.zeros(1, 2, 3), "word_embeddings")
    assert not site._forward_hooks


@pytest.mark.parametrize("norm", adv.NORMS)
def test_one_pgd_step_of_size_epsilon_is_fgm(norm):
    model = classifier().eval()
    batch = make_batch()
    fgm_loss, _ = adv.FGM(epsilon=0.3, norm=norm)(model, batch)
    fgm = parameter_gradients(model, fgm_loss)
    pgd_loss, _ = adv.PGD(epsilon=0.3, step_size=0.3, steps=1, norm=norm)(model, batch)
    pgd = parameter_gradients(model, pgd_loss)
    assert abs(fgm_loss.item() - pgd_loss.item()) < 1e-6
    assert_same_gradients(fgm, pgd, atol=1e-6)


def test_divergences_upcast_half_precision_and_keep_float64():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    b = a + 1e-6 * torch.randn(5, 4, generator=generator, dtype=torch.float64)
    exact = adv.kl_divergence(a, b)
    assert exact.dtype == torch.float64
    # second order: KL(p || p + dp) = 1/2 sum dp^2 / p
    p, q = a.softmax(-1), b.softmax(-1)
    assert torch.allclose(exact, (0.5 * (q - p) ** 2 / p).sum(-1).mean(), rtol=1e-4)
    assert adv.kl_divergence(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    assert adv.symmetric_kl(a, b).dtype == torch.float64


# -- perturbation sites ----------------------------------------------------------------------

@pytest.fixture
def feed_forward_site():
    """A site registered by a test: the first layer's feed-forward output. Yields the
    models its ``locate`` was called with; the site is removed afterwards."""
    located = []

    def locate(model):
        located.append(model)
        return model.encoder.layers[0].feed_forward

    adv.register_perturbation_site("first_feed_forward", locate)
    try:
        yield located
    finally:
        adv.SITES.pop("first_feed_forward", None)


def test_a_registered_site_is_used_by_fgm(feed_forward_site):
    model = classifier().eval()
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    method = adv.FGM(epsilon=0.5, where="first_feed_forward")
    loss, logs = method(model, batch)
    assert feed_forward_site and all(m is model for m in feed_forward_site)
    site = model.encoder.layers[0].feed_forward
    assert not site._forward_hooks

    # FGM at that site by hand: δ on the feed-forward output, the step along ∇_δ L.
    delta = torch.zeros(4, 9, CONFIG.hidden_size, requires_grad=True)
    handle = site.register_forward_hook(lambda module, i, output: output + delta)
    clean = model(**inputs).loss
    handle.remove()
    (gradient,) = torch.autograd.grad(clean, delta, retain_graph=True)
    step = (0.5 * gradient / gradient.flatten(1).norm(dim=1)[:, None, None]
            * adv.token_mask(batch)).detach()
    handle = site.register_forward_hook(lambda module, i, output: output + step)
    adversarial = model(**inputs).loss
    handle.remove()
    expected = 0.5 * clean + 0.5 * adversarial
    assert abs(loss.item() - expected.item()) < 1e-6
    assert abs(logs["adv_loss"].item() - adversarial.item()) < 1e-6
    assert_same_gradients(parameter_gradients(model, loss), parameter_gradients(model, expected),
                          atol=1e-6)
    # The site matters: the same attack on the word embeddings gives another loss.
    elsewhere, _ = adv.FGM(epsilon=0.5)(model, batch)
    assert abs(elsewhere.item() - loss.item()) > 1e-4


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_embedding_sum_adds_delta_to_the_sum_before_the_layer_norm(norm_position):
    config = TransformerConfig.preset("tiny", vocab_size=60, hidden_dropout=0.0,
                                      attention_dropout=0.0, norm_position=norm_position)
    model = classifier(config=config).eval()
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    embeddings = model.encoder.embeddings
    site = adv.perturbation_site(model, "embedding_sum")
    assert site is embeddings.embedding_sum
    ids = batch["input_ids"]
    delta = (torch.randn(*ids.shape, config.hidden_size, generator=torch.Generator().manual_seed(3))
             * adv.token_mask(batch))

    # Embeddings.forward by hand: token + position + token type (all type 0), then δ,
    # then the LayerNorm of a post-LN model (a pre-LN model has none); no dropout in eval.
    positions = torch.arange(ids.shape[1])[None]
    total = (embeddings.word_embeddings.weight[ids]
             + embeddings.position_embeddings.weight[positions]
             + embeddings.token_type_embeddings.weight[torch.zeros_like(ids)])
    by_hand = total + delta
    if norm_position == "post":
        by_hand = F.layer_norm(by_hand, (config.hidden_size,), embeddings.norm.weight,
                               embeddings.norm.bias, config.layer_norm_eps)
    else:
        assert embeddings.norm is None

    captured = {}
    handle = site.register_forward_hook(lambda m, i, output: captured.setdefault("sum", output))
    with torch.no_grad():
        clean = model(**inputs).loss
    handle.remove()
    assert torch.allclose(captured["sum"], total, atol=1e-6)  # the site's output is the sum

    handle = embeddings.register_forward_hook(lambda m, i, output: by_hand)
    with torch.no_grad():
        expected = model(**inputs).loss
    handle.remove()
    with torch.no_grad():
        got = adv.forward_with(model, batch, delta, "embedding_sum").loss
        after_norm = adv.forward_with(model, batch, delta, "embedding_output").loss
    assert abs(got.item() - expected.item()) < 1e-6
    assert abs(got.item() - clean.item()) > 1e-4
    if norm_position == "post":  # the LayerNorm lies between the two sites
        assert abs(got.item() - after_norm.item()) > 1e-4
    assert not site._forward_hooks


SITE_LIST = r"\('word_embeddings', 'embedding_output', 'embedding_sum'\)"


@pytest.mark.parametrize("call", [
    lambda: adv.perturbation_site(classifier(), "positions"),
    lambda: adv.forward_with(classifier(), make_batch(), torch.zeros(4, 9, 32), "positions"),
    lambda: adv.FGM(where="positions"),
    lambda: adv.PGD(where="positions"),
    lambda: adv.VAT(where="positions"),
    lambda: adv.ALUM(where="positions"),
], ids=["perturbation_site", "forward_with", "FGM", "PGD", "VAT", "ALUM"])
def test_an_unknown_site_is_refused_naming_where_and_the_sites(call):
    with pytest.raises(ValueError, match=f"where must be one of {SITE_LIST}, got 'positions'"):
        call()


def test_registered_sites_are_listed_and_bad_registrations_refused(feed_forward_site):
    with pytest.raises(ValueError, match=r"where must be one of \(.*'first_feed_forward'\)"):
        adv.FGM(where="nowhere")
    with pytest.raises(ValueError, match="where must be one of"):
        adv.perturbation_site(classifier(), ["word_embeddings"])  # not a name
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        adv.register_perturbation_site("", lambda model: model)
    with pytest.raises(TypeError, match="locate must be callable"):
        adv.register_perturbation_site("broken", "encoder.embeddings")
    assert "broken" not in adv.SITES
    adv.register_perturbation_site("not_a_module", lambda model: model.classifier.weight)
    adv.register_perturbation_site("first_layer", lambda model: model.encoder.layers[0])
    try:
        with pytest.raises(TypeError, match="site 'not_a_module' must locate an nn.Module"):
            adv.perturbation_site(classifier(), "not_a_module")
        model = classifier()
        with pytest.raises(TypeError, match="first_layer site's output must be a tensor"):
            adv.forward_with(model, make_batch(), torch.zeros(4, 9, 32), "first_layer")
        assert not model.encoder.layers[0]._forward_hooks
    finally:
        adv.SITES.pop("not_a_module", None)
        adv.SITES.pop("first_layer", None)
