"""Local-first access to the book's data files, checked against known checksums.

Every file the book reads is listed in :data:`REGISTRY` with its size, its sha256 and
a download URL pinned to a commit of the repository it was copied from, so the bytes
behind a result never change silently. :func:`find_file` looks for a file, in order,

1. in ``$TUTORIAL_LIB_DATA/<relpath>``;
2. in ``shared/data/<relpath>`` beside the repository (``<repo>/../shared/data``), then
   in ``shared/data/<relpath>`` under the current directory and each of its parents
   (so a notebook run from ``chapters/`` finds the book's shared data);
3. in the user cache, ``$XDG_CACHE_HOME/tutorial_lib/data`` or ``~/.cache/tutorial_lib/data``;

checks the first copy it finds, and otherwise downloads the file into the cache.

The loaders return plain Python data (lists of strings and tuples); tokenising and
batching are :mod:`tutorial_lib.data.tokenization` and :mod:`tutorial_lib.data.batching`.

One family of data sets is not in the registry: the STS tasks other than STS-B that
chapter 7's lab scores BERT-whitening on (STS-12 to STS-16, SICK-R). Their canonical
copies are MTEB's data sets on the Hugging Face Hub, which are fetched with the Hub's
own client at a pinned commit (:data:`STS_TASKS`, :func:`load_sts`), not through pooch;
a local copy is looked for in the same places first.

What pooch does and what stays ours
-----------------------------------
Downloading is done by `pooch <https://www.fatiando.org/pooch>`_, the fetcher most
scientific Python packages use: :func:`pooch_for` turns :data:`REGISTRY` into a
``pooch.Pooch`` (file name -> ``sha256:`` hash, file name -> URL) rooted at
:func:`cache_dir`, and its ``fetch`` streams the file over HTTP with a progress bar
into a temporary file in the cache folder, checks the hash, and only then renames it
into place (deleting it on a mismatch), so an interrupted or corrupt download never
leaves a file behind. Those are the parts every project needs and gets subtly wrong
(atomic replacement, clean-up, HTTP errors, progress), so we do not keep our own copy.

Two things stay here, because pooch has no notion of them:

* the local-first search above. Pooch knows one folder (its cache) and one
  environment variable that *replaces* that folder; the book instead reads a copy
  shipped beside the repository or in ``$TUTORIAL_LIB_DATA`` first, and never writes
  there. So :func:`find_file` searches, verifies a local copy with
  :func:`verify_file`, and calls pooch only when nothing was found;
* the git-blob check. WikiText-2's ``train.txt`` has no known sha256 (the offline copy
  lacks it). Its registry entry carries instead the git blob id the file has in
  ``pytorch/examples`` (the SHA-1 of ``b"blob <size>\\0" + content``, the id
  ``git hash-object`` prints). Pooch's ``known_hash`` accepts ``sha256:``, ``md5:``,
  ``sha1:`` ... of the raw bytes, not this salted SHA-1, and a git blob id cannot be
  converted into any of them without the file. Such an entry is therefore given to
  pooch with ``known_hash=None`` (pooch checks nothing), and the downloader we hand
  pooch checks the git blob id of the temporary file with :func:`verify_file` before
  pooch renames it into the cache; on a mismatch it raises :class:`ChecksumError` and
  pooch deletes the temporary file. The file is thus verified before it is accepted,
  exactly as a sha256 entry is, only by our code rather than pooch's.

An entry with neither digest is refused unless the caller passes ``verify=False``.
The downloader is a seam: :func:`find_file` takes ``downloader=`` (pooch's downloader
protocol, ``downloader(url, output_file, pooch)``) and defaults to the module-level
:func:`download_url`, which tests replace to stay offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pooch


class ChecksumError(Exception):
    """A data file's bytes differ from the registered size or digest."""


class DataNotFoundError(FileNotFoundError):
    """A data file is in none of the searched places and could not be downloaded."""


@dataclass(frozen=True)
class DataFile:
    """One registered file: where it lives under a data folder and how to check it."""

    relpath: str
    url: str
    size: int | None
    sha256: str | None
    git_blob_sha1: str | None = None


def _github_raw(repository: str, commit: str, folder: str) -> str:
    return f"https://raw.githubusercontent.com/{repository}/{commit}/{folder}/"


# Commits at which each file has exactly the bytes listed in shared/data/MANIFEST.md
# (checked by comparing git blob ids), so a download reproduces the offline copy.
_WIKITEXT = _github_raw("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8",
                        "word_language_model/data/wikitext-2")
_SST2 = _github_raw("awake020/pytorch_Bert_sst2", "ce2ab1719d32182e6233b24b2de246bd32814fde",
                    "SST-2")
_STSB = _github_raw("korjak/sts-dev", "5c830c7afb02a63218fe0e3ff85474c36d95d674",
                    "data/STS-B/original")
_SHAKESPEARE = _github_raw("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
                           "data/tinyshakespeare")

REGISTRY: dict[str, DataFile] = {entry.relpath: entry for entry in (
    DataFile("wikitext-2/train.txt", _WIKITEXT + "train.txt", None, None,
             git_blob_sha1="2d84b35af79e411d73ea7cae83c73964c6ac83b4"),
    DataFile("wikitext-2/valid.txt", _WIKITEXT + "valid.txt", 1_121_681,
             "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    DataFile("wikitext-2/test.txt", _WIKITEXT + "test.txt", 1_256_449,
             "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    DataFile("sst-2/train.tsv", _SST2 + "train.tsv", 3_806_081,
             "e981ceb4fe6c9acd1c79851d0d091b9e78103f1f2a399ca83dda27915d41c56c"),
    DataFile("sst-2/dev.tsv", _SST2 + "dev.tsv", 94_414,
             "84207e6be5873fb18db798cc6faec86871f5a426554650ff64a1c34e87665f6f"),
    DataFile("sst-2/test.tsv", _SST2 + "test.tsv", 193_576,
             "fcd46f967b7b8efd8b5398481dadf873886298d092195167af907fd532e81e1c"),
    DataFile("sts-b/sts-train.tsv", _STSB + "sts-train.tsv", 901_177,
             "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82"),
    DataFile("sts-b/sts-dev.tsv", _STSB + "sts-dev.tsv", 255_680,
             "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234"),
    DataFile("sts-b/sts-test.tsv", _STSB + "sts-test.tsv", 282_419,
             "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a"),
    DataFile("tinyshakespeare/input.txt", _SHAKESPEARE + "input.txt", 1_115_394,
             "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
)}

# The directory that contains the tutorial_lib package: the repository in a checkout.
_REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# Where files are looked for
# ---------------------------------------------------------------------------

def cache_dir() -> Path:
    """The folder downloads go to: ``$XDG_CACHE_HOME/tutorial_lib/data`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tutorial_lib" / "data"


def search_locations(relpath: str) -> list[Path]:
    """Every path :func:`find_file` tries for ``relpath``, in order, without duplicates."""
    candidates = []
    if os.environ.get("TUTORIAL_LIB_DATA"):
        candidates.append(Path(os.environ["TUTORIAL_LIB_DATA"]) / relpath)
    candidates.append(_REPOSITORY_ROOT.parent / "shared" / "data" / relpath)
    cwd = Path.cwd().resolve()
    candidates.extend(folder / "shared" / "data" / relpath for folder in (cwd, *cwd.parents))
    candidates.append(cache_dir() / relpath)
    unique = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------

# (resolved path, size, mtime_ns, entry) of files already checked. Rewriting a file
# changes its mtime (unless a tool deliberately restores it), so an edited or
# replaced file is hashed again.
_verified: set[tuple[str, int, int, DataFile]] = set()


def _digests(path: Path, size: int) -> tuple[str, str]:
    """sha256 and git blob SHA-1 of a file, read once in 1 MiB chunks."""
    sha256 = hashlib.sha256()
    blob_sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            sha256.update(chunk)
            blob_sha1.update(chunk)
    return sha256.hexdigest(), blob_sha1.hexdigest()


def verify_file(path: Path, entry: DataFile) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has ``entry``'s size and digest."""
    if entry.sha256 is None and entry.git_blob_sha1 is None:
        raise ChecksumError(f"{entry.relpath}: no checksum is registered, so {path} cannot "
                            "be verified; pass verify=False to use it unverified")
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, entry)
    if key in _verified:
        return
    if entry.size is not None and stat.st_size != entry.size:
        raise ChecksumError(f"{entry.relpath} at {path} has {stat.st_size:,} bytes, "
                            f"expected {entry.size:,} (sha256 {entry.sha256})")
    sha256, blob_sha1 = _digests(Path(path), stat.st_size)
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise ChecksumError(f"{entry.relpath} at {path} is corrupted or a different version: "
                            f"expected sha256 {entry.sha256}, got {sha256}")
    if entry.sha256 is None and blob_sha1 != entry.git_blob_sha1:
        raise ChecksumError(f"{entry.relpath} at {path} is corrupted or a different version: "
                            f"expected git blob id {entry.git_blob_sha1}, got {blob_sha1} "
                            f"(its sha256 is {sha256})")
    _verified.add(key)


# ---------------------------------------------------------------------------
# Finding and downloading
# ---------------------------------------------------------------------------

# pooch's downloader protocol: downloader(url, output_file, pooch_instance), where
# output_file is the path of pooch's temporary file (a str) and pooch_instance is the
# calling pooch.Pooch (None when called outside one).
Downloader = Callable[[str, str, Optional[pooch.Pooch]], None]


def download_url(url: str, output_file: str | Path, pooch_instance: pooch.Pooch | None = None,
                 *, timeout: float = 60.0, progressbar: bool = True) -> None:
    """Write the bytes at ``url`` to ``output_file`` with pooch's HTTP downloader.

    This is the default ``downloader`` of :func:`find_file` (pooch calls it with its
    temporary file and itself); tests replace it to stay offline. A progress bar is
    shown on stderr; a network failure raises a ``requests`` exception, which is an
    :class:`OSError`.
    """
    pooch.HTTPDownloader(progressbar=progressbar, timeout=timeout)(
        url, str(output_file), pooch_instance)


def _registered(relpath: str) -> DataFile:
    if relpath not in REGISTRY:
        raise ValueError(f"relpath must be one of the registered files {sorted(REGISTRY)}, "
                         f"got {relpath!r}")
    return REGISTRY[relpath]


def _known_hash(entry: DataFile) -> str | None:
    """The hash pooch can check for ``entry``: its sha256, else None (see the module notes)."""
    return f"sha256:{entry.sha256}" if entry.sha256 is not None else None


def pooch_for(registry: dict[str, DataFile] | None = None, *,
              verify: bool = True) -> pooch.Pooch:
    """A ``pooch.Pooch`` over ``registry`` (default :data:`REGISTRY`) rooted at :func:`cache_dir`.

    Each file maps to ``"sha256:<digest>"``, or to ``None`` when only a git blob id is
    registered (or ``verify=False``); URLs are the pinned ones. It is built on each call,
    so a changed ``$XDG_CACHE_HOME`` or registry entry is honoured.
    """
    registry = REGISTRY if registry is None else registry
    return pooch.create(
        path=cache_dir(), base_url="",
        registry={relpath: _known_hash(entry) if verify else None
                  for relpath, entry in registry.items()},
        urls={relpath: entry.url for relpath, entry in registry.items()},
        retry_if_failed=0)


def _checksum_description(entry: DataFile) -> str:
    if entry.sha256 is not None:
        return f"sha256 {entry.sha256}"
    if entry.git_blob_sha1 is not None:
        return f"git blob id {entry.git_blob_sha1}, sha256 not registered"
    return "no checksum registered"


def find_file(relpath: str, *, download: bool = True, verify: bool = True,
              downloader: Downloader | None = None) -> Path:
    """Path of the registered file ``relpath`` (e.g. ``"wikitext-2/valid.txt"``).

    The first copy found in :func:`search_locations` is checked (size, then digest;
    repeated calls on an unchanged file are free) and a mismatch raises
    :class:`ChecksumError` rather than falling through to another copy. With nothing
    found and ``download=True``, pooch fetches the file into :func:`cache_dir` through
    ``downloader(url, output_file, pooch)`` (default :func:`download_url`): it lands in
    a temporary file, is checked (sha256 by pooch, a git blob id by us), and only then
    is renamed into place, so an interrupted or corrupt download never leaves a file
    behind. Raises :class:`DataNotFoundError` when that is impossible.
    ``verify=False`` skips every check.
    """
    entry = _registered(relpath)
    locations = search_locations(relpath)
    for path in locations:
        if path.is_file():
            if verify:
                verify_file(path, entry)
            return path
    failure = "download=False was passed"
    if download:
        if verify and entry.sha256 is None and entry.git_blob_sha1 is None:
            raise ChecksumError(f"{relpath}: no checksum is registered, so a download could "
                                "not be verified; pass verify=False to download it unverified")
        try:
            return _download(entry, downloader or download_url, verify)
        except OSError as error:  # requests' exceptions and socket timeouts are OSErrors
            failure = f"downloading {entry.url} failed: {error}"
    searched = "\n".join(f"  {path}" for path in locations)
    raise DataNotFoundError(
        f"{relpath} ({_checksum_description(entry)}) was not found; searched:\n"
        f"{searched}\n{failure}.\nTo provide it, set TUTORIAL_LIB_DATA to a folder that "
        f"contains {relpath}, or save {entry.url} as {cache_dir() / relpath}.")


def _download(entry: DataFile, downloader: Downloader, verify: bool) -> Path:
    """Fetch ``entry`` into the cache with pooch; sha256 checked by pooch, a git blob id here."""

    def download_and_check(url: str, output_file: str, pooch_instance: pooch.Pooch) -> None:
        downloader(url, output_file, pooch_instance)
        # pooch checks the sha256 (its known_hash) after we return. For an entry with
        # only a git blob id pooch's known_hash is None, so we check the temporary file
        # here, before pooch renames it into the cache; raising makes pooch delete it.
        if verify and entry.sha256 is None:
            verify_file(Path(output_file), entry)

    try:
        fetched = pooch_for({entry.relpath: entry}, verify=verify).fetch(
            entry.relpath, downloader=download_and_check)
    except ChecksumError as error:
        raise ChecksumError(f"the download from {entry.url} failed its check "
                            f"and was deleted: {error}") from None
    except OSError:
        raise
    except ValueError as error:  # pooch's hash mismatch (the temporary file is deleted)
        raise ChecksumError(f"the download from {entry.url} failed its check "
                            f"and was deleted: {entry.relpath}: {error}") from None
    return Path(fetched)


def _read_text(relpath: str, download: bool) -> str:
    # newline=None turns the CRLF line ends of SST-2's train.tsv into "\n"; splitting
    # on "\n" alone (not str.splitlines) keeps rare separators such as U+2028 in text.
    with open(find_file(relpath, download=download), encoding="utf-8", newline=None) as f:
        return f.read()


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------

def _is_wikitext_heading(line: str) -> bool:
    return line.startswith("= ") and line.endswith(" =")


def load_wikitext2(split: str, *, drop_headings: bool = False,
                   download: bool = True) -> list[str]:
    """Non-empty lines of WikiText-2 (tokenised, ``<unk>`` for rare words), stripped.

    A line is a paragraph or a heading such as ``"= Homarus gammarus ="`` (sections:
    ``"= = Description = ="``). Headings are kept by default, as in the usual
    perplexity benchmarks on this text; ``drop_headings=True`` removes them.
    """
    _check_split(split, ("train", "valid", "test"))
    lines = (line.strip() for line in _read_text(f"wikitext-2/{split}.txt", download).split("\n"))
    return [line for line in lines
            if line and not (drop_headings and _is_wikitext_heading(line))]


def wikitext2_pretraining_splits(*, download: bool = True) -> tuple[list[str], list[str], str]:
    """``(train_lines, eval_lines, note)`` for language-model pretraining on WikiText-2.

    With ``train.txt`` available (found, or downloaded when ``download=True``) this is
    train/valid; otherwise the model trains on ``valid.txt`` and is evaluated on
    ``test.txt``. ``note`` says which, for printing beside any result. A corrupted
    ``train.txt`` raises :class:`ChecksumError` instead of being silently replaced.
    """
    try:
        find_file("wikitext-2/train.txt", download=download)
    except DataNotFoundError:
        train, evaluation = load_wikitext2("valid"), load_wikitext2("test")
        return train, evaluation, (
            f"WikiText-2 train.txt is not available: training on valid.txt ({len(train):,} "
            f"lines) and evaluating on test.txt ({len(evaluation):,} lines)")
    train, evaluation = load_wikitext2("train"), load_wikitext2("valid")
    return train, evaluation, (
        f"WikiText-2: training on train.txt ({len(train):,} lines) and evaluating on "
        f"valid.txt ({len(evaluation):,} lines)")


_SST2_TEXT_COLUMNS = ("sentence", "content", "text")


def load_sst2(split: str, *, download: bool = True) -> list[tuple[str, int]]:
    """``(sentence, label)`` pairs of SST-2, label 0 = negative, 1 = positive.

    The column order is read from the header, so both ``label<TAB>content`` (the
    offline copy) and GLUE's ``sentence<TAB>label`` work.
    """
    _check_split(split, ("train", "dev", "test"))
    relpath = f"sst-2/{split}.tsv"
    header, *rows = _read_text(relpath, download).rstrip("\n").split("\n")
    columns = [name.strip().lower() for name in header.split("\t")]
    text_columns = [name for name in columns if name in _SST2_TEXT_COLUMNS]
    if "label" not in columns or len(text_columns) != 1:
        raise ValueError(f"{relpath}: expected a header with a 'label' column and one of "
                         f"{_SST2_TEXT_COLUMNS}, got {header!r}")
    label_at, text_at = columns.index("label"), columns.index(text_columns[0])
    examples = []
    for number, row in enumerate(rows, start=2):
        fields = row.split("\t")
        if len(fields) != len(columns) or fields[label_at] not in ("0", "1"):
            raise ValueError(f"{relpath}, line {number}: expected {len(columns)} tab-separated "
                             f"fields with label 0 or 1, got {row!r}")
        examples.append((fields[text_at], int(fields[label_at])))
    return examples


def load_stsb(split: str, *, download: bool = True) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` triples of the STS Benchmark, score in [0, 5].

    Only the first 7 tab-separated columns (genre, file, year, id, score, sentence1,
    sentence2) are read: some lines carry extra fields after them.
    """
    _check_split(split, ("train", "dev", "test"))
    relpath = f"sts-b/sts-{split}.tsv"
    examples = []
    for number, row in enumerate(_read_text(relpath, download).rstrip("\n").split("\n"), 1):
        fields = row.split("\t")
        try:
            examples.append((fields[5], fields[6], float(fields[4])))
        except (IndexError, ValueError):
            raise ValueError(f"{relpath}, line {number}: expected at least 7 tab-separated "
                             f"fields with a numeric score in the 5th, got {row!r}") from None
    return examples


def load_tiny_shakespeare(*, download: bool = True) -> str:
    """The whole Tiny Shakespeare text (about 1.1 million characters)."""
    return _read_text("tinyshakespeare/input.txt", download)


# ---------------------------------------------------------------------------
# The STS tasks of the BERT-whitening paper (STS-12 to STS-16, STS-B, SICK-R)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class STSTask:
    """One sentence-similarity task as :func:`load_sts` reads it."""

    name: str  # as the papers print it
    repo_id: str  # MTEB's copy on the Hugging Face Hub (columns sentence1, sentence2, score)
    revision: str  # the Hub commit of that copy which MTEB's task metadata pins
    pairs: dict[str, int]  # split -> number of pairs at that revision
    scores: tuple[float, float]  # the range of the gold scores, kept as they are


# Each revision is the one MTEB pins for the task (TaskMetadata(dataset={"path": ...,
# "revision": ...}) in embeddings-benchmark/mteb, mteb/tasks/sts/eng/sts12_sts.py,
# sts13_sts.py, sts14_sts.py, sts15_sts.py, sts16_sts.py, sts_benchmark_sts.py and
# sickr_sts.py, read at the mteb commit a905523d0111f999360b312bd4a601a0a97a0e1c); the
# pair counts and score ranges are MTEB's statistics of those copies
# (mteb/descriptive_stats/STS/<name>.json at the same commit: num_samples,
# label_statistics). STS-12 to STS-16 are each year's test files concatenated, STS-13
# without its SMT file (FNWN, headlines and OnWN: the three files SentEval and the
# authors' code read); SICK-R's "test" split has as many pairs as SICK's train (4,500),
# trial (500) and test (4,927) files together.
STS_TASKS: dict[str, STSTask] = {
    "sts12": STSTask("STS-12", "mteb/sts12-sts", "a0d554a64d88156834ff5ae9920b964011b16384",
                     {"test": 3108}, (0.0, 5.0)),
    "sts13": STSTask("STS-13", "mteb/sts13-sts", "7e90230a92c190f1bf69ae9002b8cea547a64cca",
                     {"test": 1500}, (0.0, 5.0)),
    "sts14": STSTask("STS-14", "mteb/sts14-sts", "6031580fec1f6af667f0bd2da0a551cf4f0b2375",
                     {"test": 3750}, (0.0, 5.0)),
    "sts15": STSTask("STS-15", "mteb/sts15-sts", "ae752c7c21bf194d8b67fd573edf7ae58183cbe3",
                     {"test": 3000}, (0.0, 5.0)),
    "sts16": STSTask("STS-16", "mteb/sts16-sts", "4d8694f8f0e0100860b497b999b3dbed754a0513",
                     {"test": 1186}, (0.0, 5.0)),
    # Read from the book's checksummed STS-B files by load_stsb (the same 1,379 test pairs
    # as MTEB's copy), so that every split is there and every chapter scores the same bytes.
    "sts-b": STSTask("STS-B", "mteb/stsbenchmark-sts", "b0fddb56ed78048fa8b90373c8a3cfc37b684831",
                     {"train": 5749, "dev": 1500, "test": 1379}, (0.0, 5.0)),
    "sick-r": STSTask("SICK-R", "mteb/sickr-sts", "20a6d6f312dd54037fe07a32d58e5e168867909d",
                      {"test": 9927}, (1.0, 5.0)),
}

STS_FOLDER = "mteb-sts"


def sts_relpath(task: str, split: str = "test") -> str:
    """Where a local copy of an STS task's split lives under a data folder:
    ``mteb-sts/<task>/<split>.jsonl`` (``.jsonl.gz`` is read too)."""
    return f"{STS_FOLDER}/{task}/{split}.jsonl"


def fetch_hub_split(repo_id: str, revision: str, split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` of the Hub data set ``repo_id`` at the commit ``revision``.

    With the ``datasets`` package installed (Colab has it) this is
    ``datasets.load_dataset(repo_id, split=split, revision=revision)``. Otherwise
    ``huggingface_hub`` (which transformers installs) lists the repository's files at
    ``revision`` and downloads the split's own: ``<split>.jsonl.gz``, ``<split>.jsonl`` or
    the Parquet shards ``<split>-*.parquet`` (read with pandas). Either way the download
    is cached under ``~/.cache/huggingface``. Network, Hub and import errors propagate:
    :func:`load_sts` reports them. Tests replace this function to stay offline.
    """
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        return [dict(row) for row in datasets.load_dataset(repo_id, split=split,
                                                           revision=revision)]
    from huggingface_hub import hf_hub_download, list_repo_files

    files = list_repo_files(repo_id, repo_type="dataset", revision=revision)
    chosen = _split_files(files, split)
    if not chosen:
        raise FileNotFoundError(f"{repo_id} at revision {revision} has no file for the split "
                                f"{split!r}: its files are {sorted(files)}")
    rows = []
    for name in chosen:
        path = Path(hf_hub_download(repo_id, name, repo_type="dataset", revision=revision))
        if name.endswith(".parquet"):
            import pandas  # with pyarrow, as Colab has them

            rows.extend(pandas.read_parquet(path).to_dict("records"))
        else:
            rows.extend(_json_rows(path))
    return rows


def _split_files(files: Iterable[str], split: str) -> list[str]:
    """The file(s) of a Hub data set that hold ``split``: one JSON-lines file, else the
    Parquet shards (sorted)."""
    by_name = {name.rsplit("/", 1)[-1]: name for name in files}
    for candidate in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if candidate in by_name:
            return [by_name[candidate]]
    return sorted(path for name, path in by_name.items()
                  if name.startswith(f"{split}-") and name.endswith(".parquet"))


def _json_rows(path: Path) -> list[Any]:
    """The JSON value of every non-blank line of ``path`` (gzip-compressed if it ends in .gz)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: expected a JSON object, "
                                     f"got {line.strip()[:80]!r} ({error})") from None
    return rows


def _sts_examples(rows: Iterable[Any], source: str, task: str,
                  split: str) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` of each row, checked against :data:`STS_TASKS`."""
    spec = STS_TASKS[task]
    low, high = spec.scores
    examples = []
    for number, row in enumerate(rows, 1):
        try:
            first, second, score = row["sentence1"], row["sentence2"], row["score"]
            valid = (isinstance(first, str) and isinstance(second, str)
                     and isinstance(score, Real) and not isinstance(score, bool)
                     and math.isfinite(score) and low <= score <= high)
        except (TypeError, KeyError, IndexError):
            valid = False
        if not valid:
            raise ValueError(f"{source}, pair {number}: expected an object with the strings "
                             f"sentence1 and sentence2 and a score in [{low:g}, {high:g}], "
                             f"got {str(row)[:200]}")
        examples.append((first, second, float(score)))
    expected = spec.pairs[split]
    if len(examples) != expected:
        raise ValueError(f"{source} has {len(examples):,} pairs, but {spec.repo_id} at revision "
                         f"{spec.revision} has {expected:,} in its {split!r} split: the copy is "
                         "truncated or of another revision; replace it")
    return examples


def _write_json_lines(path: Path, examples: list[tuple[str, str, float]]) -> None:
    """Write the pairs as JSON lines, atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            for first, second, score in examples:
                stream.write(json.dumps({"sentence1": first, "sentence2": second,
                                         "score": score}, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_sts(task: str, split: str = "test", *,
             download: bool = True) -> list[tuple[str, str, float]]:
    """``(sentence1, sentence2, score)`` triples of one of the STS tasks that Su et al.
    score BERT-whitening on: ``task`` is one of :data:`STS_TASKS`, ``"sts12"`` to
    ``"sts16"``, ``"sts-b"`` and ``"sick-r"``.

    Scores are the gold scores as released, not rescaled: 0 to 5 for STS-12 to STS-16
    and STS-B, 1 to 5 for SICK-R. Spearman's correlation, the measure these tasks are
    scored with, only sees their order, so no common scale is needed.

    ``"sts-b"`` is :func:`load_stsb` (splits ``"train"``, ``"dev"``, ``"test"``: the book's
    checksummed files). The other tasks have only the ``"test"`` split that MTEB
    evaluates (and BERT-whitening fits its "target" statistics on), read from a local
    copy of MTEB's data set at the revision pinned in :data:`STS_TASKS`:
    ``mteb-sts/<task>/test.jsonl`` (or ``.jsonl.gz``), one JSON object per pair with
    ``sentence1``, ``sentence2`` and ``score``, searched in the places
    :func:`search_locations` lists (``$TUTORIAL_LIB_DATA``, the shared data folder, the
    cache). With no copy and ``download=True``, :func:`fetch_hub_split` fetches the pinned
    revision from the Hugging Face Hub and the pairs are saved in the cache, so the next
    call reads them offline; when that is impossible :class:`DataNotFoundError` says where
    to put the file and how to make it. The number of pairs and the score range are
    checked against the pinned revision's (no checksum of those files could be recorded
    offline).
    """
    if not isinstance(task, str) or task not in STS_TASKS:
        raise ValueError(f"task must be one of {tuple(STS_TASKS)}, got {task!r}")
    spec = STS_TASKS[task]
    _check_split(split, tuple(spec.pairs))
    if task == "sts-b":
        return load_stsb(split, download=download)
    relpath = sts_relpath(task, split)
    locations = [candidate for path in search_locations(relpath)
                 for candidate in (path, path.with_name(path.name + ".gz"))]
    for path in locations:
        if path.is_file():
            return _sts_examples(_json_rows(path), str(path), task, split)
    failure, cause = "download=False was passed", None
    if download:
        try:
            rows = fetch_hub_split(spec.repo_id, spec.revision, split)
        except Exception as error:  # network, Hub and missing-package errors, reported below
            failure, cause = (f"fetching {spec.repo_id} at revision {spec.revision} failed: "
                              f"{type(error).__name__}: {error}"), error
        else:
            source = f"{spec.repo_id} at revision {spec.revision}"
            examples = _sts_examples(rows, source, task, split)
            _write_json_lines(cache_dir() / relpath, examples)
            return examples
    searched = "\n".join(f"  {path}" for path in locations)
    raise DataNotFoundError(
        f"{relpath} ({spec.name}, {spec.repo_id} at revision {spec.revision}) was not found; "
        f"searched:\n{searched}\n{failure}.\nTo provide it, save that revision's {split!r} "
        f"split as JSON lines (one object per pair with sentence1, sentence2 and score) to "
        f"{cache_dir() / relpath}, or to {relpath} in the folder that TUTORIAL_LIB_DATA "
        f"names. On a machine with internet access, either call load_sts({task!r}) once and "
        f"copy the file it saves in the cache, or run\n"
        f"  mkdir -p {STS_FOLDER}/{task} && python -c \"from datasets import load_dataset; "
        f"load_dataset('{spec.repo_id}', "
        f"split='{split}', revision='{spec.revision}').to_json('{relpath}')\"") from cause
