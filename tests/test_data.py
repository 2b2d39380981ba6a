"""Data files: search order, checksums, downloads through pooch (faked, offline), loaders."""

import dataclasses
import gzip
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import pooch
import pytest
import requests

from tutorial_lib.data import files as data

CONTENT = b"line one\nline two\n"
# The real default downloader and Hub fetcher, before the autouse fixture below replaces them.
DOWNLOAD_URL = data.download_url
FETCH_HUB_SPLIT = data.fetch_hub_split


def entry_for(content, relpath="fake/file.txt", **overrides):
    fields = dict(relpath=relpath, url=f"https://example.invalid/{relpath}", size=len(content),
                  sha256=hashlib.sha256(content).hexdigest())
    fields.update(overrides)
    return data.DataFile(**fields)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, no user cache, no TUTORIAL_LIB_DATA, and a cwd with no shared/ above it."""
    def no_network(url, output_file, pooch_instance=None):
        pytest.fail(f"a test tried to download {url}")
    def no_hub(repo_id, revision, split):
        pytest.fail(f"a test tried to fetch {repo_id}@{revision} from the Hub")
    monkeypatch.setattr(data, "download_url", no_network)
    monkeypatch.setattr(data, "fetch_hub_split", no_hub)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TUTORIAL_LIB_DATA", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_file(monkeypatch):
    entry = entry_for(CONTENT)
    monkeypatch.setitem(data.REGISTRY, entry.relpath, entry)
    return entry


def shared_or_skip(relpath):
    try:
        return data.find_file(relpath, download=False)
    except data.DataNotFoundError:
        pytest.skip(f"the book's shared data ({relpath}) is not on this machine")


# --- registry and search order ------------------------------------------------------------

def test_registry_matches_the_manifest_sizes_and_pins_urls_to_commits():
    assert data.REGISTRY["wikitext-2/valid.txt"].size == 1_121_681
    assert data.REGISTRY["sst-2/dev.tsv"].sha256.startswith("84207e6b")
    for entry in data.REGISTRY.values():
        assert entry.url.startswith("https://raw.githubusercontent.com/")
        assert entry.url.endswith(entry.relpath.split("/")[-1])
        commit = entry.url.split("/")[5]
        assert len(commit) == 40 and set(commit) <= set("0123456789abcdef")
        assert entry.sha256 is not None or entry.git_blob_sha1 is not None


def test_search_order_env_folder_then_shared_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    chapters = tmp_path / "book" / "chapters"
    chapters.mkdir(parents=True)
    monkeypatch.chdir(chapters)
    locations = data.search_locations("x/y.txt")
    assert locations[0] == tmp_path / "env" / "x" / "y.txt"
    assert locations[1] == data._REPOSITORY_ROOT.parent / "shared" / "data" / "x" / "y.txt"
    # walking up from the current directory reaches <book>/shared/data
    assert tmp_path.resolve() / "book" / "shared" / "data" / "x" / "y.txt" in locations
    assert locations[-1] == tmp_path / "cache" / "tutorial_lib" / "data" / "x" / "y.txt"
    assert len(set(locations)) == len(locations)


def test_env_folder_wins_over_cache(fake_file, monkeypatch, tmp_path):
    for folder in (tmp_path / "env", tmp_path / "cache" / "tutorial_lib" / "data"):
        (folder / "fake").mkdir(parents=True)
        (folder / "fake" / "file.txt").write_bytes(CONTENT)
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    assert data.find_file("fake/file.txt") == tmp_path / "env" / "fake" / "file.txt"


def test_shared_data_is_found_walking_up_from_a_chapter_folder(fake_file, monkeypatch, tmp_path):
    target = tmp_path / "book" / "shared" / "data" / "fake" / "file.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT)
    (tmp_path / "book" / "main" / "chapters").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "book" / "main" / "chapters")
    assert data.find_file("fake/file.txt", download=False) == target.resolve()


def test_unknown_relpath_is_rejected_by_name():
    with pytest.raises(ValueError, match="relpath must be one of"):
        data.find_file("wikitext-103/train.txt")


# --- checksums ----------------------------------------------------------------------------

def test_corrupted_file_raises_checksum_error_with_both_digests(fake_file, monkeypatch, tmp_path):
    bad = b"line one\nline 2!!\n"  # same size, different bytes
    (tmp_path / "env" / "fake").mkdir(parents=True)
    (tmp_path / "env" / "fake" / "file.txt").write_bytes(bad)
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    with pytest.raises(data.ChecksumError) as error:
        data.find_file("fake/file.txt")
    message = str(error.value)
    assert "fake/file.txt" in message
    assert fake_file.sha256 in message and hashlib.sha256(bad).hexdigest() in message
    # verify=False is the explicit way to use it anyway
    assert data.find_file("fake/file.txt", verify=False).read_bytes() == bad


def test_wrong_size_is_caught_before_hashing(fake_file, monkeypatch, tmp_path):
    (tmp_path / "env" / "fake").mkdir(parents=True)
    (tmp_path / "env" / "fake" / "file.txt").write_bytes(CONTENT + b"extra")
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(data, "_digests", lambda *a: pytest.fail("hashed a file of wrong size"))
    with pytest.raises(data.ChecksumError, match="expected 18"):
        data.find_file("fake/file.txt")


def test_verification_is_memoised_until_the_file_changes(fake_file, monkeypatch, tmp_path):
    path = tmp_path / "env" / "fake" / "file.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(CONTENT)
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    calls = []
    real_digests = data._digests
    monkeypatch.setattr(data, "_digests", lambda *a: calls.append(a) or real_digests(*a))
    data.find_file("fake/file.txt")
    data.find_file("fake/file.txt")
    assert len(calls) == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data.find_file("fake/file.txt")
    assert len(calls) == 2


def test_git_blob_id_verifies_a_file_without_sha256(monkeypatch, tmp_path):
    # The id `git hash-object` prints for CONTENT, computed independently here.
    blob_id = hashlib.sha1(b"blob 18\0" + CONTENT).hexdigest()
    entry = entry_for(CONTENT, size=None, sha256=None, git_blob_sha1=blob_id)
    path = tmp_path / "file.txt"
    path.write_bytes(CONTENT)
    data.verify_file(path, entry)
    path.write_bytes(CONTENT.upper())
    with pytest.raises(data.ChecksumError, match=blob_id):
        data.verify_file(path, entry)


def test_shared_wikitext_valid_has_the_manifest_checksum():
    # Also checks that the registry entry agrees with the file actually shipped.
    path = shared_or_skip("wikitext-2/valid.txt")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        data.REGISTRY["wikitext-2/valid.txt"].sha256


# --- downloads (through pooch, with a faked downloader) -----------------------------------

def cached(tmp_path, relpath="fake/file.txt"):
    return tmp_path / "cache" / "tutorial_lib" / "data" / relpath


def writing(content, calls=None):
    """A pooch downloader that writes ``content`` and records what pooch passed it."""
    def downloader(url, output_file, pooch_instance):
        if calls is not None:
            calls.append((url, Path(output_file), pooch_instance))
        Path(output_file).write_bytes(content)
    return downloader


def test_pooch_registry_carries_sha256_hashes_pinned_urls_and_the_cache():
    pup = data.pooch_for()
    assert isinstance(pup, pooch.Pooch)
    assert pup.abspath == data.cache_dir()
    valid = data.REGISTRY["wikitext-2/valid.txt"]
    assert pup.registry["wikitext-2/valid.txt"] == "sha256:" + valid.sha256
    assert pup.get_url("wikitext-2/valid.txt") == valid.url
    # pooch cannot check a git blob id: train.txt is fetched with known_hash=None
    # and checked by our code (see the git-blob tests below)
    assert pup.registry["wikitext-2/train.txt"] is None
    assert set(pup.registry) == set(data.REGISTRY)
    assert set(data.pooch_for(verify=False).registry.values()) == {None}


def test_download_goes_through_pooch_into_the_cache_and_is_verified(fake_file, tmp_path):
    calls = []
    path = data.find_file("fake/file.txt", downloader=writing(CONTENT, calls))
    [(url, output_file, pup)] = calls
    assert url == fake_file.url
    # pooch called us with itself, holding the registered hash it then checked ...
    assert isinstance(pup, pooch.Pooch)
    assert pup.registry == {"fake/file.txt": "sha256:" + fake_file.sha256}
    # ... and a temporary file in the cache folder, renamed into place once checked
    assert output_file.parent == cached(tmp_path).parent and output_file != cached(tmp_path)
    assert path == cached(tmp_path)
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]
    # found in the cache the second time, no second download
    assert data.find_file("fake/file.txt", downloader=writing(CONTENT, calls)) == path
    assert len(calls) == 1


def test_module_download_url_is_the_default_downloader(fake_file, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(data, "download_url", writing(CONTENT, calls))
    assert data.find_file("fake/file.txt") == cached(tmp_path)
    assert [url for url, _, _ in calls] == [fake_file.url]


def test_download_url_uses_poochs_http_downloader_with_a_progress_bar(monkeypatch, tmp_path):
    made = []

    class FakeHTTPDownloader:
        def __init__(self, **options):
            made.append(options)

        def __call__(self, url, output_file, pooch_instance):
            Path(output_file).write_bytes(url.encode())

    monkeypatch.setattr(pooch, "HTTPDownloader", FakeHTTPDownloader)
    DOWNLOAD_URL("https://example.invalid/x", tmp_path / "x", None, timeout=5.0)
    assert made == [{"progressbar": True, "timeout": 5.0}]
    assert (tmp_path / "x").read_bytes() == b"https://example.invalid/x"


def test_corrupted_download_is_rejected_deleted_and_reported(fake_file, tmp_path):
    with pytest.raises(data.ChecksumError) as error:
        data.find_file("fake/file.txt", downloader=writing(CONTENT[::-1]))
    message = str(error.value)
    assert fake_file.url in message and fake_file.sha256 in message
    assert "fake/file.txt" in message
    assert hashlib.sha256(CONTENT[::-1]).hexdigest() in message
    assert list(cached(tmp_path).parent.iterdir()) == []  # neither target nor temporary file


@pytest.fixture
def blob_only_file(monkeypatch):
    """An entry like WikiText-2's train.txt: a git blob id, no size, no sha256."""
    blob_id = hashlib.sha1(b"blob %d\0" % len(CONTENT) + CONTENT).hexdigest()
    entry = entry_for(CONTENT, size=None, sha256=None, git_blob_sha1=blob_id)
    monkeypatch.setitem(data.REGISTRY, entry.relpath, entry)
    return entry


def test_git_blob_entry_is_downloaded_unhashed_by_pooch_then_checked_by_us(blob_only_file,
                                                                           tmp_path):
    calls = []
    path = data.find_file("fake/file.txt", downloader=writing(CONTENT, calls))
    [(_, output_file, pup)] = calls
    assert pup.registry == {"fake/file.txt": None}  # pooch's known_hash=None
    assert output_file != path  # checked before pooch renamed it into the cache
    assert path == cached(tmp_path) and path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]


def test_git_blob_mismatch_rejects_and_deletes_the_download(blob_only_file, tmp_path):
    with pytest.raises(data.ChecksumError) as error:
        data.find_file("fake/file.txt", downloader=writing(CONTENT.upper()))
    message = str(error.value)
    assert blob_only_file.url in message and blob_only_file.git_blob_sha1 in message
    assert list(cached(tmp_path).parent.iterdir()) == []
    # verify=False is the explicit way to take it anyway
    taken = data.find_file("fake/file.txt", downloader=writing(CONTENT.upper()), verify=False)
    assert taken.read_bytes() == CONTENT.upper()


@pytest.mark.parametrize("failure", [
    OSError("Temporary failure in name resolution"),
    requests.exceptions.ConnectionError("Temporary failure in name resolution"),
    requests.exceptions.HTTPError("404 Client Error: Not Found (name resolution)"),
], ids=["oserror", "requests-connection", "requests-http"])
def test_offline_error_names_the_file_checksum_places_and_remedies(fake_file, tmp_path,
                                                                   failure):
    def offline_downloader(url, output_file, pooch_instance):
        raise failure

    with pytest.raises(data.DataNotFoundError) as error:
        data.find_file("fake/file.txt", downloader=offline_downloader)
    message = str(error.value)
    assert "fake/file.txt" in message and fake_file.sha256 in message
    for place in data.search_locations("fake/file.txt"):
        assert str(place) in message
    assert "name resolution" in message
    assert "TUTORIAL_LIB_DATA" in message and fake_file.url in message
    assert str(cached(tmp_path)) in message
    assert not cached(tmp_path).exists()
    assert not cached(tmp_path).parent.exists() or list(cached(tmp_path).parent.iterdir()) == []


def test_offline_error_for_a_git_blob_entry_names_its_blob_id(blob_only_file):
    with pytest.raises(data.DataNotFoundError, match=blob_only_file.git_blob_sha1):
        data.find_file("fake/file.txt", download=False)


def test_download_false_never_calls_the_downloader(fake_file):
    with pytest.raises(data.DataNotFoundError, match="download=False"):
        data.find_file("fake/file.txt", download=False,
                       downloader=lambda *a: pytest.fail("downloaded"))


def test_download_without_any_checksum_is_refused_unless_verify_false(monkeypatch):
    entry = entry_for(CONTENT, size=None, sha256=None)
    monkeypatch.setitem(data.REGISTRY, entry.relpath, entry)
    with pytest.raises(data.ChecksumError, match="verify=False"):
        data.find_file(entry.relpath, downloader=writing(CONTENT))
    taken = data.find_file(entry.relpath, downloader=writing(CONTENT), verify=False)
    assert taken.read_bytes() == CONTENT


# --- loaders ------------------------------------------------------------------------------

@pytest.mark.parametrize("loader", [data.load_wikitext2, data.load_sst2, data.load_stsb])
def test_invalid_split_names_the_parameter_and_choices(loader):
    with pytest.raises(ValueError, match=r"split must be one of .*'test'.*got 'validation'"):
        loader("validation")


def test_wikitext2_valid_lines_and_headings():
    shared_or_skip("wikitext-2/valid.txt")
    lines = data.load_wikitext2("valid")
    assert lines[0] == "= Homarus gammarus ="
    assert all(line == line.strip() and line for line in lines)
    assert len(lines) == 2461
    without = data.load_wikitext2("valid", drop_headings=True)
    assert len(without) == 2461 - 620
    assert not any(line.startswith("= ") and line.endswith(" =") for line in without)
    assert sum(line.split().count("<unk>") for line in lines) > 1000


def test_pretraining_splits_fall_back_to_valid_and_test_offline():
    shared_or_skip("wikitext-2/test.txt")
    if any(p.is_file() for p in data.search_locations("wikitext-2/train.txt")):
        pytest.skip("train.txt is present here")
    train, evaluation, note = data.wikitext2_pretraining_splits(download=False)
    assert train == data.load_wikitext2("valid")
    assert evaluation == data.load_wikitext2("test")
    assert "not available" in note and "valid.txt" in note and "test.txt" in note


def test_pretraining_splits_use_train_when_it_is_available(monkeypatch, tmp_path):
    shared_or_skip("wikitext-2/valid.txt")
    train_text = " = Heading = \n \n First paragraph . \n Second <unk> paragraph . \n"
    train_bytes = train_text.encode()
    monkeypatch.setitem(data.REGISTRY, "wikitext-2/train.txt",
                        entry_for(train_bytes, relpath="wikitext-2/train.txt"))
    (tmp_path / "env" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "env" / "wikitext-2" / "train.txt").write_bytes(train_bytes)
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    train, evaluation, note = data.wikitext2_pretraining_splits()
    assert train == ["= Heading =", "First paragraph .", "Second <unk> paragraph ."]
    assert evaluation == data.load_wikitext2("valid")
    assert "train.txt" in note and "valid.txt" in note and "not available" not in note


def test_sst2_reads_both_column_orders(monkeypatch, tmp_path):
    rows = [("a fine film .", 1), ("dull", 0)]
    for name, text in (("label_first", "label\tcontent\n1\ta fine film .\n0\tdull\n"),
                       ("glue_order", "sentence\tlabel\r\na fine film .\t1\r\ndull\t0\r\n")):
        content = text.encode()
        folder = tmp_path / name / "sst-2"
        folder.mkdir(parents=True)
        (folder / "dev.tsv").write_bytes(content)
        monkeypatch.setitem(data.REGISTRY, "sst-2/dev.tsv",
                            entry_for(content, relpath="sst-2/dev.tsv"))
        monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / name))
        assert data.load_sst2("dev") == rows


def test_sst2_without_labels_is_a_clear_error(monkeypatch, tmp_path):
    content = b"index\tsentence\n0\tunlabelled glue test row\n"
    (tmp_path / "sst-2").mkdir()
    (tmp_path / "sst-2" / "test.tsv").write_bytes(content)
    monkeypatch.setitem(data.REGISTRY, "sst-2/test.tsv",
                        entry_for(content, relpath="sst-2/test.tsv"))
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="'label' column"):
        data.load_sst2("test")


def test_sst2_shared_splits():
    shared_or_skip("sst-2/dev.tsv")
    shared_or_skip("sst-2/train.tsv")
    dev = data.load_sst2("dev")
    assert len(dev) == 872 and dev[0] == ("one long string of cliches .", 0)
    assert {label for _, label in dev} == {0, 1}
    train = data.load_sst2("train")  # header `label<TAB>sentence`, CRLF line ends
    assert len(train) == 67_349
    assert train[0] == ("hide new secretions from the parental units", 0)
    assert not any("\r" in sentence for sentence, _ in train)


def test_stsb_reads_the_first_seven_columns():
    shared_or_skip("sts-b/sts-train.tsv")
    train = data.load_stsb("train")
    assert len(train) == 5749
    assert train[0] == ("A plane is taking off.", "An air plane is taking off.", 5.0)
    assert all(0.0 <= score <= 5.0 and isinstance(score, float) for _, _, score in train)
    # no extra field leaked into the second sentence
    assert not any("\t" in first or "\t" in second for first, second, _ in train)


def test_tiny_shakespeare_is_the_whole_text():
    shared_or_skip("tinyshakespeare/input.txt")
    text = data.load_tiny_shakespeare()
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\n")


# --- the other STS tasks: MTEB's copies at pinned revisions ---------------------------------

# The revisions MTEB's task metadata pins (embeddings-benchmark/mteb, mteb/tasks/sts/eng/),
# written out here so that a changed pin is a deliberate edit of both places.
MTEB_STS = {
    "sts12": ("mteb/sts12-sts", "a0d554a64d88156834ff5ae9920b964011b16384", 3108),
    "sts13": ("mteb/sts13-sts", "7e90230a92c190f1bf69ae9002b8cea547a64cca", 1500),
    "sts14": ("mteb/sts14-sts", "6031580fec1f6af667f0bd2da0a551cf4f0b2375", 3750),
    "sts15": ("mteb/sts15-sts", "ae752c7c21bf194d8b67fd573edf7ae58183cbe3", 3000),
    "sts16": ("mteb/sts16-sts", "4d8694f8f0e0100860b497b999b3dbed754a0513", 1186),
    "sts-b": ("mteb/stsbenchmark-sts", "b0fddb56ed78048fa8b90373c8a3cfc37b684831", 1379),
    "sick-r": ("mteb/sickr-sts", "20a6d6f312dd54037fe07a32d58e5e168867909d", 9927),
}


def sts_rows(count, low=0.0, high=5.0):
    """``count`` distinct pairs as MTEB's rows, scores spread over [low, high]."""
    return [{"sentence1": f"A man plays the guitar number {i}.", "sentence2": f"Sentence é{i}",
             "score": low + (high - low) * (i % 11) / 10} for i in range(count)]


def triples(rows):
    return [(row["sentence1"], row["sentence2"], float(row["score"])) for row in rows]


def write_jsonl(path, rows, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


@pytest.fixture
def few_pairs(monkeypatch):
    """Shrink a task's registered size to 12 test pairs, so fakes stay small."""
    def shrink(task, pairs=12):
        monkeypatch.setitem(data.STS_TASKS, task,
                            dataclasses.replace(data.STS_TASKS[task], pairs={"test": pairs}))
        return pairs
    return shrink


def test_sts_tasks_pin_the_revisions_mteb_pins():
    assert tuple(data.STS_TASKS) == tuple(MTEB_STS)
    for task, (repo_id, revision, test_pairs) in MTEB_STS.items():
        spec = data.STS_TASKS[task]
        assert (spec.repo_id, spec.revision, spec.pairs["test"]) == (repo_id, revision, test_pairs)
    assert data.STS_TASKS["sick-r"].scores == (1.0, 5.0)
    assert {data.STS_TASKS[task].scores for task in MTEB_STS if task != "sick-r"} == {(0.0, 5.0)}


def test_sts_reads_a_local_copy_in_the_env_folder(monkeypatch, tmp_path):
    rows = sts_rows(1500)  # STS-13's real size: the registered count is checked
    rows[3]["split"] = "test"  # extra columns (as datasets' to_json may write) are ignored
    path = write_jsonl(tmp_path / "env" / "mteb-sts" / "sts13" / "test.jsonl", rows)
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # a blank line
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    pairs = data.load_sts("sts13")
    assert pairs == triples(rows)
    assert pairs[1] == ("A man plays the guitar number 1.", "Sentence é1", 0.5)
    assert all(isinstance(score, float) for _, _, score in pairs)


def test_sts_reads_a_gzip_copy_in_the_cache_and_keeps_sick_r_scores(few_pairs, tmp_path):
    rows = sts_rows(few_pairs("sick-r"), low=1.0, high=5.0)
    write_jsonl(data.cache_dir() / "mteb-sts" / "sick-r" / "test.jsonl.gz", rows, compress=True)
    pairs = data.load_sts("sick-r", "test")
    assert pairs == triples(rows)
    assert min(score for *_, score in pairs) == 1.0 and max(score for *_, score in pairs) == 5.0


def test_sts_b_is_the_books_checksummed_stsb():
    shared_or_skip("sts-b/sts-dev.tsv")
    assert data.load_sts("sts-b", "dev") == data.load_stsb("dev")
    assert len(data.load_sts("sts-b")) == 1379  # the test split by default


@pytest.mark.parametrize("task", ["sts17", "STS12", "sickr", "", None, 12])
def test_unknown_task_is_rejected_naming_the_parameter(task):
    with pytest.raises(ValueError, match=r"task must be one of \('sts12'.*'sick-r'\), got"):
        data.load_sts(task)


@pytest.mark.parametrize("task, split, allowed", [
    ("sts12", "train", r"\('test',\)"), ("sick-r", "dev", r"\('test',\)"),
    ("sts-b", "validation", r"\('train', 'dev', 'test'\)")])
def test_sts_split_is_checked_per_task(task, split, allowed):
    with pytest.raises(ValueError, match=rf"split must be one of {allowed}, got '{split}'"):
        data.load_sts(task, split)


def test_offline_without_a_copy_says_where_to_put_it_and_how_to_get_it(monkeypatch, tmp_path):
    failure = OSError("Temporary failure in name resolution")

    def offline_fetch(repo_id, revision, split):
        raise failure

    monkeypatch.setattr(data, "fetch_hub_split", offline_fetch)
    with pytest.raises(data.DataNotFoundError) as error:
        data.load_sts("sts15")
    message = str(error.value)
    for place in data.search_locations("mteb-sts/sts15/test.jsonl"):
        assert str(place) in message and f"{place}.gz" in message
    assert "mteb/sts15-sts" in message and MTEB_STS["sts15"][1] in message
    assert "name resolution" in message and error.value.__cause__ is failure
    assert "TUTORIAL_LIB_DATA" in message
    assert str(data.cache_dir() / "mteb-sts" / "sts15" / "test.jsonl") in message
    assert f"revision='{MTEB_STS['sts15'][1]}'" in message and "load_dataset(" in message
    assert not (data.cache_dir() / "mteb-sts").exists()


def test_download_false_never_fetches():
    with pytest.raises(data.DataNotFoundError, match="download=False was passed"):
        data.load_sts("sts16", download=False)  # the autouse fixture fails on any fetch


def test_online_fetch_asks_for_the_pinned_revision_and_caches_the_pairs(monkeypatch):
    rows, calls = sts_rows(1186), []  # STS-16's real size

    def hub(repo_id, revision, split):
        calls.append((repo_id, revision, split))
        return [dict(row) for row in rows]

    monkeypatch.setattr(data, "fetch_hub_split", hub)
    assert data.load_sts("sts16") == triples(rows)
    assert calls == [("mteb/sts16-sts", "4d8694f8f0e0100860b497b999b3dbed754a0513", "test")]
    cached = data.cache_dir() / "mteb-sts" / "sts16" / "test.jsonl"
    assert [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()] == rows
    assert not [name for name in os.listdir(cached.parent) if name.endswith(".tmp")]
    # the next call reads the cache, offline
    monkeypatch.setattr(data, "fetch_hub_split", lambda *a: pytest.fail("fetched twice"))
    assert data.load_sts("sts16", download=False) == triples(rows)


@pytest.mark.parametrize("break_rows, expected", [
    (lambda rows: rows[:-1], r"has 11 pairs, but mteb/sickr-sts at revision 20a6d6f3\w+ has 12"),
    (lambda rows: rows[:5] + [{**rows[5], "score": 0.5}] + rows[6:],
     r"pair 6: .*score in \[1, 5\]"),
    (lambda rows: rows[:2] + [{**rows[2], "score": float("nan")}] + rows[3:], r"pair 3: "),
    (lambda rows: rows[:2] + [{**rows[2], "score": "4.0"}] + rows[3:], r"pair 3: "),
    (lambda rows: rows[:1] + [{"sentence1": "only one"}] + rows[2:], r"pair 2: .*sentence2"),
], ids=["truncated", "score-below-sick-r-range", "nan", "score-as-text", "missing-column"])
def test_a_wrong_copy_is_a_clear_error(few_pairs, monkeypatch, tmp_path, break_rows, expected):
    few_pairs("sick-r")
    path = write_jsonl(tmp_path / "env" / "mteb-sts" / "sick-r" / "test.jsonl",
                       break_rows(sts_rows(12, low=1.0, high=5.0)))
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path / "env"))
    with pytest.raises(ValueError, match=expected) as error:
        data.load_sts("sick-r")
    assert str(path) in str(error.value)


def test_a_line_that_is_not_json_names_the_file_and_line(few_pairs, monkeypatch, tmp_path):
    few_pairs("sts14")
    path = write_jsonl(tmp_path / "mteb-sts" / "sts14" / "test.jsonl", sts_rows(12))
    path.write_text(path.read_text(encoding="utf-8") + "sentence1\tsentence2\t3.0\n",
                    encoding="utf-8")
    monkeypatch.setenv("TUTORIAL_LIB_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=rf"{path}, line 13: expected a JSON object"):
        data.load_sts("sts14")


def test_a_wrong_download_is_not_cached(few_pairs, monkeypatch):
    few_pairs("sts12")
    monkeypatch.setattr(data, "fetch_hub_split", lambda *a: sts_rows(11))
    with pytest.raises(ValueError, match="has 11 pairs"):
        data.load_sts("sts12")
    assert not (data.cache_dir() / "mteb-sts").exists()


def test_fetch_hub_split_loads_the_revision_with_datasets(monkeypatch):
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return [{"sentence1": "a", "sentence2": "b", "score": 1.0}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = FETCH_HUB_SPLIT("mteb/sts13-sts", "7e90230a92c190f1bf69ae9002b8cea547a64cca", "test")
    assert rows == [{"sentence1": "a", "sentence2": "b", "score": 1.0}]
    assert calls == [("mteb/sts13-sts", {"split": "test",
                                         "revision": "7e90230a92c190f1bf69ae9002b8cea547a64cca"})]


def test_fetch_hub_split_without_datasets_downloads_the_splits_file(monkeypatch, tmp_path):
    revision = MTEB_STS["sick-r"][1]
    listed, downloaded = [], []

    def list_repo_files(repo_id, *, repo_type=None, revision=None):
        listed.append((repo_id, repo_type, revision))
        return [".gitattributes", "README.md", "train.jsonl.gz", "test.jsonl.gz"]

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None):
        downloaded.append((repo_id, filename, repo_type, revision))
        return str(write_jsonl(tmp_path / filename, sts_rows(3, 1.0, 5.0), compress=True))

    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(
        list_repo_files=list_repo_files, hf_hub_download=hf_hub_download))
    assert FETCH_HUB_SPLIT("mteb/sickr-sts", revision, "test") == sts_rows(3, 1.0, 5.0)
    assert listed == [("mteb/sickr-sts", "dataset", revision)]
    assert downloaded == [("mteb/sickr-sts", "test.jsonl.gz", "dataset", revision)]


def test_the_splits_file_is_chosen_by_name():
    shards = ["data/test-00001-of-00002.parquet", "data/train-00000-of-00001.parquet",
              "data/test-00000-of-00002.parquet", "README.md"]
    assert data._split_files(shards, "test") == ["data/test-00000-of-00002.parquet",
                                                 "data/test-00001-of-00002.parquet"]
    assert data._split_files(["test.jsonl", "test.jsonl.gz", "latest.jsonl.gz"], "test") == \
        ["test.jsonl.gz"]
    assert data._split_files(["train.jsonl.gz", "README.md"], "test") == []
