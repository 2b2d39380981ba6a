"""Number figures and exercises per chapter: "Fig. 2.1", "Exercise 2.1".

Sphinx numbers figures and the other enumerable nodes (sphinx-exercise's exercises
are one) by section number; the book's table of contents is not numbered, since every
chapter title carries its own number ("# 2. Adversarial self-attention (ASA)") and
chapter 6 is not yet written, so Sphinx would number them 1, 2, 3, ... through the whole
book. After Sphinx has assigned its numbers, this extension renumbers the kinds listed in
``chapter_numbered_types`` in every page ``chapters/NN_<slug>``: the k-th of a kind on the
page becomes ``(NN, k)``, which the HTML writer, ``{numref}`` and sphinx-exercise all
print as "NN.k". Pages outside ``chapters/`` keep Sphinx's numbers.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

CHAPTER_PAGE = re.compile(r"^chapters/(\d+)_")


def chapter_number(docname: str) -> int | None:
    """The chapter number of a page, read from its file name, or None."""
    match = CHAPTER_PAGE.match(docname)
    return int(match.group(1)) if match else None


def number_per_chapter(app: Sphinx, env: BuildEnvironment) -> list[str]:
    renumbered = []
    for docname, numbers_by_type in env.toc_fignumbers.items():
        chapter = chapter_number(docname)
        if chapter is None:
            continue
        for figtype in app.config.chapter_numbered_types:
            numbers = numbers_by_type.get(figtype)
            if not numbers:
                continue
            # Sphinx numbered them in the order of the page; keep that order.
            in_order = sorted(numbers, key=numbers.__getitem__)
            numbers_by_type[figtype] = {
                node_id: (chapter, position) for position, node_id in enumerate(in_order, start=1)
            }
        renumbered.append(docname)
    return renumbered


def setup(app: Sphinx) -> dict:
    app.add_config_value("chapter_numbered_types", ("figure", "exercise"), "env")
    # After Sphinx's own numbering (TocTreeCollector, default priority 500).
    app.connect("env-get-updated", number_per_chapter, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
