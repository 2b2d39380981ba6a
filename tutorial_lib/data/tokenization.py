"""Tokenizers behind one small interface: WordPiece, byte-level BPE and characters.

Every chapter talks to a tokenizer through the same methods (``encode``,
``encode_with_types``, ``encode_batch``, ``decode``, ``tokenize``, ``save``/``load``)
and the same special-token properties (``pad_id``, ``unk_id``, ``cls_id``,
``sep_id``, ``mask_id``, ``bos_id``, ``eos_id``, each ``None`` where the tokenizer has
no such token, and ``special_ids``).

* :func:`train_wordpiece` builds a BERT-style tokenizer (Devlin et al., 2019):
  BertNormalizer, BertPreTokenizer, WordPiece with ``##`` continuations, special
  tokens ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4`` and the templates
  ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` (type ids 0 for A, 1 for B).
* :func:`train_bpe` builds a byte-level BPE for causal LMs (GPT-2, Radford et al.,
  2019): ``<pad>=0, <eos>=1``, with ``<eos>`` appended after each sequence.
* :class:`CharTokenizer`: one id per character, for synthetic tasks and Tiny Shakespeare.

Text tokenizers wrap a Hugging Face ``tokenizers.Tokenizer`` and save it as a single
``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``
also reads. Truncation (``max_length``) counts the special tokens and, for a pair,
shortens the longer sequence first; the split follows the Rust ``tokenizers``
library, so on a tie the second sequence keeps the odd token.
"""

from __future__ import annotations

import json
from numbers import Integral
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIALS = ("<pad>", "<eos>")

# Names under which a role's token is recognised in a tokenizer file.
_ROLE_TOKENS = {
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"), "mask": ("[MASK]", "<mask>"), "bos": ("<bos>", "<s>"),
    "eos": ("<eos>", "</s>"),
}

# WikiText marks rare words as "<unk>". The WordPiece normalizer turns that mark into
# this private-use character: BertNormalizer has already deleted every private-use
# character of the input by then, so it can only come from "<unk>", and it is kept out
# of the trained vocabulary, so WordPiece maps it to [UNK].
_UNKNOWN_WORD = "\ue000"


def _check_text(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def _text_list(texts: Iterable[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be an iterable of strings, not a single str")
    texts = list(texts)
    for text in texts:
        _check_text(text, f"every item of {name}")
    return texts


def _id_list(ids: Any, vocab_size: int) -> list[int]:
    """``ids`` (a list or a 1-D tensor or array of token ids) checked against the vocabulary."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids must be a list of ints or a 1-D tensor, got {type(ids).__name__}")
    if hasattr(ids, "tolist"):  # a tensor or a NumPy array
        if getattr(ids, "ndim", 1) != 1:
            raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    for position, token_id in enumerate(ids):
        if not isinstance(token_id, Integral) or isinstance(token_id, bool):
            raise TypeError(f"ids must hold integer token ids, got {token_id!r} at position "
                            f"{position}")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"ids must lie in [0, {vocab_size}), got {token_id} at position "
                             f"{position}")
    return [int(token_id) for token_id in ids]


def truncation_lengths(length_a: int, length_b: int, budget: int) -> tuple[int, int]:
    """Lengths that fit ``budget`` tokens, taken from the longer sequence first.

    When both must shrink, the first gets ``budget // 2`` and the second the rest
    (when the first is the longer one, the split is mirrored), as in ``tokenizers``.
    """
    for name, value in (("length_a", length_a), ("length_b", length_b), ("budget", budget)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if length_a + length_b <= budget:
        return length_a, length_b
    shorter, longer = sorted((length_a, length_b))
    if shorter <= budget - shorter:
        kept_shorter, kept_longer = shorter, budget - shorter
    else:
        kept_shorter, kept_longer = budget // 2, budget - budget // 2
    return (kept_shorter, kept_longer) if length_a <= length_b else (kept_longer, kept_shorter)


class _Tokenizer:
    """Encoding, truncation and the special-id properties, shared by every tokenizer.

    A subclass sets ``_role_ids`` and provides four hooks: ``_pieces`` (texts to
    per-text content without special tokens), ``_cut`` (shorten one content),
    ``_special_count`` and ``_assemble`` (add special tokens, give ids and type ids).
    """

    _role_ids: dict[str, int]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_ids(self) -> frozenset[int]:
        raise NotImplementedError

    @property
    def pad_id(self) -> int | None:
        return self._role_ids.get("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role_ids.get("unk")

    @property
    def cls_id(self) -> int | None:
        return self._role_ids.get("cls")

    @property
    def sep_id(self) -> int | None:
        return self._role_ids.get("sep")

    @property
    def mask_id(self) -> int | None:
        return self._role_ids.get("mask")

    @property
    def bos_id(self) -> int | None:
        return self._role_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role_ids.get("eos")

    def encode(self, text: str, pair: str | None = None, *, max_length: int | None = None,
               add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (and ``pair``), at most ``max_length`` including specials."""
        return self.encode_with_types(text, pair, max_length,
                                      add_special_tokens=add_special_tokens)[0]

    def encode_with_types(self, text: str, pair: str | None = None,
                          max_length: int | None = None, *,
                          add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
        """``(ids, token_type_ids)``: type 0 for ``text`` and its specials, 1 for ``pair``'s."""
        _check_text(text, "text")
        if pair is not None:
            _check_text(pair, "pair")
        return self._encode_many([text], None if pair is None else [pair], max_length,
                                 add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                     max_length: int | None = None,
                     add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` for each text (and the pair at the same position)."""
        texts = _text_list(texts, "texts")
        if pairs is not None:
            pairs = _text_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"pairs must have one item per text ({len(texts)}), "
                                 f"got {len(pairs)}")
        encoded = self._encode_many(texts, pairs, max_length, add_special_tokens)
        return [ids for ids, _ in encoded]

    def _encode_many(self, texts: list[str], pairs: list[str] | None, max_length: int | None,
                     add_special_tokens: bool) -> list[tuple[list[int], list[int]]]:
        specials = self._special_count(pairs is not None) if add_special_tokens else 0
        if max_length is not None and (not isinstance(max_length, int)
                                       or isinstance(max_length, bool)
                                       or max_length <= specials):
            raise ValueError(f"max_length must be an int above the {specials} special tokens "
                             f"added to each sequence, got {max_length!r}")
        firsts = self._pieces(texts)
        seconds = self._pieces(pairs) if pairs is not None else [None] * len(texts)
        encoded = []
        for first, second in zip(firsts, seconds):
            if max_length is not None:
                kept_first, kept_second = truncation_lengths(
                    len(first), 0 if second is None else len(second), max_length - specials)
                first = self._cut(first, kept_first)
                if second is not None:
                    second = self._cut(second, kept_second)
            encoded.append(self._assemble(first, second, add_special_tokens))
        return encoded

    def _pieces(self, texts: list[str]) -> list[Any]:
        raise NotImplementedError

    def _cut(self, piece: Any, length: int) -> Any:
        raise NotImplementedError

    def _special_count(self, is_pair: bool) -> int:
        raise NotImplementedError

    def _assemble(self, first: Any, second: Any | None,
                  add_special_tokens: bool) -> tuple[list[int], list[int]]:
        raise NotImplementedError


class TextTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` behind the book's interface.

    The roles of special tokens are recognised by their text (``[PAD]`` or ``<pad>``,
    ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``<eos>``, ...), so any tokenizer file
    with conventional names works, e.g. a pretrained BERT's.
    """

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, "
                            f"got {type(tokenizer).__name__}")
        # A private copy without the library's own truncation and padding settings:
        # truncation happens here, padding in the collators.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        added = self._tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._role_ids = {}
        for role, names in _ROLE_TOKENS.items():
            for name in names:
                token_id = self._tokenizer.token_to_id(name)
                if token_id is not None and token_id in self._special_ids:
                    self._role_ids.setdefault(role, token_id)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (for interop; do not enable truncation on it)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor).

        Exact for byte-level BPE; WordPiece gives BERT's normalised text (lowercase,
        no space before punctuation, ``[UNK]`` for unknown words).
        """
        ids = _id_list(ids, self.vocab_size)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text``, without special tokens."""
        _check_text(text, "text")
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as one ``tokenizer.json`` (Hugging Face format)."""
        self._tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Read a ``tokenizer.json`` written by :meth:`save` (or by Hugging Face)."""
        return cls(Tokenizer.from_file(str(path)))

    def __repr__(self) -> str:
        model = type(self._tokenizer.model).__name__
        return f"TextTokenizer({model}, vocab_size={self.vocab_size})"

    def _pieces(self, texts):
        return self._tokenizer.encode_batch(texts, add_special_tokens=False)

    def _cut(self, piece, length):
        piece.truncate(length)
        return piece

    def _special_count(self, is_pair):
        return self._tokenizer.num_special_tokens_to_add(is_pair)

    def _assemble(self, first, second, add_special_tokens):
        merged = self._tokenizer.post_process(first, second,
                                              add_special_tokens=add_special_tokens)
        return merged.ids, merged.type_ids


def _check_training_arguments(vocab_size: int, min_frequency: int) -> None:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or isinstance(min_frequency, bool) \
            or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000, *, min_frequency: int = 2,
                    lowercase: bool = True) -> TextTokenizer:
    """Train a BERT-style WordPiece tokenizer on ``texts``.

    ``<unk>`` marks in the texts (WikiText's rare words) encode as ``[UNK]`` and are
    not counted as words in training. The vocabulary is a function of the texts
    alone: Hugging Face's trainer numbers the ``##x`` continuation symbols in hash-map
    order, which differs from run to run and decides how merges with equal counts are
    ordered, so they are registered first, sorted. The vocabulary therefore starts
    with the 5 special tokens, then every ``##x``, every character, then the merges.
    """
    texts = _text_list(texts, "texts")
    _check_training_arguments(vocab_size, min_frequency)
    normalizer = normalizers.Sequence([
        normalizers.BertNormalizer(lowercase=lowercase),
        normalizers.Replace("<unk>", f" {_UNKNOWN_WORD} "),
    ])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    # The trainer is fed these word lists, so this pass sees exactly its words.
    corpus, characters, continuations = [], set(), set()
    for text in texts:
        words = [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
                 if word != _UNKNOWN_WORD]
        for word in words:
            characters.update(word)
            continuations.update(word[1:])
        corpus.append(" ".join(words))
    if not characters:
        raise ValueError("texts must contain at least one word, got only empty texts")
    reserved = [*WORDPIECE_SPECIALS, *sorted("##" + c for c in continuations)]
    if vocab_size < len(reserved) + len(characters):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the texts have {len(characters)} distinct "
            f"characters and {len(continuations)} word-inner ones (as ##x), which with the "
            f"{len(WORDPIECE_SPECIALS)} special tokens need {len(reserved) + len(characters)}")

    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    scratch.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    scratch.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=reserved,
        continuing_subword_prefix="##", show_progress=False))

    # Rebuilt from the vocabulary alone, so that only the five real specials are
    # special tokens (the trainer made every reserved ##x one).
    tokenizer = Tokenizer(models.WordPiece(scratch.get_vocab(with_added_tokens=False),
                                           unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in WORDPIECE_SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return TextTokenizer(tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int = 8000, *,
              min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Every byte has a symbol, so there is no unknown token (``unk_id`` is None) and
    ``<unk>`` in WikiText is ordinary text. ``encode`` appends ``<eos>``; pairs get
    ``A <eos> B <eos>`` with type ids 0/1. Training is deterministic: the byte
    alphabet is numbered in code-point order and ties between merges are broken by
    symbol ids.
    """
    texts = _text_list(texts, "texts")
    _check_training_arguments(vocab_size, min_frequency)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(BPE_SPECIALS) + len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(BPE_SPECIALS) + len(alphabet)} "
                         f"(2 special tokens and 256 byte symbols), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(BPE_SPECIALS),
        initial_alphabet=alphabet, show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", pair="$A <eos> $B:1 <eos>:1", special_tokens=[("<eos>", 1)])
    return TextTokenizer(tokenizer)


class CharTokenizer(_Tokenizer):
    """One id per character: ``<pad>`` = 0, then the chosen specials, then the alphabet.

    ``specials`` is a subset of ``("unk", "cls", "sep", "mask", "bos", "eos")``, each
    becoming a token such as ``<cls>``. ``encode`` adds ``<cls>`` (or else ``<bos>``)
    in front and ``<sep>`` (or else ``<eos>``) after each sequence, when present. A
    character outside the alphabet encodes as ``<unk>`` if there is one and is an
    error otherwise.
    """

    SPECIALS = ("unk", "cls", "sep", "mask", "bos", "eos")

    def __init__(self, alphabet: Iterable[str], *, specials: Iterable[str] = ()):
        alphabet = list(alphabet)
        specials = tuple(specials)
        if not alphabet:
            raise ValueError("alphabet must contain at least one character")
        for character in alphabet:
            if not isinstance(character, str) or len(character) != 1:
                raise ValueError(f"alphabet must hold single characters, got {character!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not repeat a character")
        unknown = [role for role in specials if role not in self.SPECIALS]
        if unknown or len(set(specials)) != len(specials):
            raise ValueError(f"specials must be distinct names from {self.SPECIALS} "
                             f"(<pad> = 0 is always present), got {specials}")
        self._specials = specials
        self._tokens = ["<pad>", *(f"<{role}>" for role in specials), *alphabet]
        self._role_ids = {"pad": 0, **{role: i for i, role in enumerate(specials, start=1)}}
        self._character_ids = {c: i for i, c in enumerate(alphabet, start=1 + len(specials))}
        self._start = [self._role_ids[r] for r in ("cls", "bos") if r in self._role_ids][:1]
        self._end = [self._role_ids[r] for r in ("sep", "eos") if r in self._role_ids][:1]

    @classmethod
    def from_text(cls, text: str, *, specials: Iterable[str] = ()) -> CharTokenizer:
        """A tokenizer whose alphabet is the sorted set of characters of ``text``."""
        _check_text(text, "text")
        if not text:
            raise ValueError("text must contain at least one character")
        return cls(sorted(set(text)), specials=specials)

    @property
    def alphabet(self) -> str:
        return "".join(self._character_ids)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._role_ids.values())

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); specials render as ``<name>``."""
        ids = _id_list(ids, len(self._tokens))
        special = self.special_ids
        return "".join(self._tokens[i] for i in ids
                       if not (skip_special_tokens and i in special))

    def tokenize(self, text: str) -> list[str]:
        """One token string per character of ``text`` (``<unk>`` for unknown ones)."""
        _check_text(text, "text")
        return [self._tokens[i] for i in self._pieces([text])[0]]

    def save(self, path: str | Path) -> None:
        """Write the alphabet and specials as JSON."""
        content = {"type": "CharTokenizer", "specials": list(self._specials),
                   "alphabet": list(self._character_ids)}
        Path(path).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        """Read a file written by :meth:`save`."""
        content = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(content, dict) or content.get("type") != "CharTokenizer":
            raise ValueError(f"path must name a file written by CharTokenizer.save, got {path}")
        return cls(content["alphabet"], specials=content["specials"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, specials={self._specials})"

    def _pieces(self, texts):
        unk = self.unk_id
        encoded = []
        for text in texts:
            ids = []
            for position, character in enumerate(text):
                token_id = self._character_ids.get(character, unk)
                if token_id is None:
                    raise ValueError(
                        f"text has {character!r} at position {position}, which is not in the "
                        "alphabet; extend the alphabet or add 'unk' to specials")
                ids.append(token_id)
            encoded.append(ids)
        return encoded

    def _cut(self, piece, length):
        return piece[:length]

    def _special_count(self, is_pair):
        return len(self._start) + len(self._end) * (2 if is_pair else 1)

    def _assemble(self, first, second, add_special_tokens):
        if not add_special_tokens:
            first_part, second_part = first, second or []
        elif second is None:
            first_part, second_part = self._start + first + self._end, []
        elif not self._end:
            raise ValueError("pair needs a separator: build the tokenizer with 'sep' or "
                             "'eos' in specials")
        else:
            first_part, second_part = self._start + first + self._end, second + self._end
        return first_part + second_part, [0] * len(first_part) + [1] * len(second_part)
