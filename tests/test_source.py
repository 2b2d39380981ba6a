"""tutorial_lib.source: the chapters' view of the library's source."""

from pathlib import Path

import pytest
import torch

import tutorial_lib
from tutorial_lib import MultiHeadAttention
from tutorial_lib.source import BRANCH, REPOSITORY, Source, repository_path, show, source
from tutorial_lib.techniques import asa

REPO = Path(tutorial_lib.__file__).resolve().parent.parent


@pytest.mark.parametrize("obj", [asa.ASA, asa.divergence, MultiHeadAttention.forward])
def test_the_lines_named_are_the_code_shown(obj):
    shown = source(obj)
    lines = (REPO / shown.path).read_text().splitlines()[shown.first_line - 1:shown.last_line]
    code = shown.code.splitlines()
    assert len(lines) == len(code)
    # A method is shown dedented; the lines are otherwise the file's.
    indent = len(lines[0]) - len(lines[0].lstrip())
    assert [line[indent:] for line in lines] == code
    assert shown.url == (f"{REPOSITORY}/blob/{BRANCH}/{shown.path}"
                         f"#L{shown.first_line}-L{shown.last_line}")


def test_markdown_links_the_file_and_fences_the_code():
    shown = source(asa.divergence)
    markdown = shown._repr_markdown_()
    assert markdown.startswith(f"`divergence` in [`tutorial_lib/techniques/asa.py`, lines "
                               f"{shown.first_line}–{shown.last_line}]({shown.url})")
    assert f"```python\n{shown.code}\n```" in markdown
    assert str(shown).startswith("# tutorial_lib/techniques/asa.py, lines ")


def test_a_fence_is_longer_than_the_code_s_backticks():
    code = 'x = """```python\ninside\n```"""'
    markdown = Source("x", "tutorial_lib/x.py", 1, 3, code, "u")._repr_markdown_()
    assert "````python\n" in markdown and markdown.rstrip().endswith("````")


def test_a_decorated_function_is_shown_as_written():
    import functools

    def wrapper(f):
        @functools.wraps(f)
        def inner(*a, **k):
            return f(*a, **k)
        return inner
    assert source(wrapper(asa.divergence)).code == source(asa.divergence).code


def test_linked_folders_keep_their_repository_path(tmp_path):
    package = Path(tutorial_lib.__file__).absolute().parent
    assert repository_path(package / "benchmarks" / "bench_asa.py") == "benchmarks/bench_asa.py"
    assert repository_path(package / "techniques" / "asa.py") == "tutorial_lib/techniques/asa.py"
    with pytest.raises(ValueError, match="file must be a source file of tutorial_lib"):
        repository_path(tmp_path / "elsewhere.py")


def test_show_displays_the_source(capsys):
    show(asa.divergence)  # outside a notebook, IPython's display prints the plain text
    assert capsys.readouterr().out.strip() == str(source(asa.divergence))


def test_objects_outside_the_library_are_refused():
    with pytest.raises(ValueError, match="obj must be defined in tutorial_lib"):
        source(torch.nn.Linear)
    with pytest.raises(TypeError, match="obj must be a function, class or method"):
        source(3)
