"""An author–year bibliography that matches the author–year citations of the text.

sphinxcontrib-bibtex's ``author_year`` reference style writes "Vaswani et al. [2017]" in
the text, but the pybtex styles it can format the bibliography with label the entries by
number (``plain``, ``unsrt``) or by an abbreviation (``alpha``: "[VSP+17]"). This module
registers two plugins:

* the pybtex formatting style ``author_year``: pybtex's ``plain`` (entries sorted by
  author, year and title), with each entry labelled by its author and year, exactly as
  the text cites it: "Vaswani et al., 2017", "Su and Lu, 2023", "Su, 2022";
* the sphinxcontrib-bibtex reference style ``author_year_labelled``: the ``author_year``
  style, whose year is read from that label.

Two works with the same author and year ("Su, 2022" three times) get the letters a, b,
c in the order of the bibliography, in the list and in the text alike: "Su [2022b]".
Use them in ``_config.yml`` with ``bibtex_default_style: author_year`` and
``bibtex_reference_style: author_year_labelled``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from string import ascii_lowercase

import pybtex.plugin
from pybtex.richtext import Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx
from sphinxcontrib.bibtex.plugin import register_plugin
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.referencing.basic_author_year import (
    BasicAuthorYearParentheticalReferenceStyle,
    BasicAuthorYearTextualReferenceStyle,
)
from sphinxcontrib.bibtex.style.referencing.extra_year import ExtraYearReferenceStyle
from sphinxcontrib.bibtex.style.template import join, join2, node, post_text, pre_text, reference

# As sphinxcontrib-bibtex's PersonStyle writes the authors in the text: one name, two
# joined by "and", the first of three or more followed by "et al.".
LAST_NAMES = pybtex.plugin.find_plugin("pybtex.style.names", "last")()


def authors(entry) -> str:
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [LAST_NAMES.format(person, True).format().render_as("text") for person in persons]
    if not names:
        return entry.fields.get("title", entry.key)
    if len(names) <= 2:
        return " and ".join(names)
    return f"{names[0]} et al."


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels "Author, year", with a, b, c for the same author and year."""

    def format_labels(self, sorted_entries):
        sorted_entries = list(sorted_entries)
        labels = [f"{authors(entry)}, {entry.fields.get('year', 'n.d.')}" for entry in sorted_entries]
        repeated = {label for label, count in Counter(labels).items() if count > 1}
        seen: Counter[str] = Counter()
        for label in labels:
            if label in repeated:
                seen[label] += 1
                label += ascii_lowercase[seen[label] - 1]
            yield label


class AuthorYearStyle(PlainStyle):
    """pybtex's plain style (sorted by author, year, title), labelled by author and year."""

    default_label_style = "author_year"


@node
def labelled_year(children, data):
    """The year of a cited work as its bibliography label has it ("2022b")."""
    assert not children
    return Text(data["formatted_entry"].label.rsplit(", ", 1)[-1])


@dataclasses.dataclass
class ParentheticalStyle(BasicAuthorYearParentheticalReferenceStyle):
    def inner(self, role_name):
        return join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
            pre_text,
            reference[
                join(sep=self.author_year_sep)[
                    self.person.author_or_editor_or_title(full="s" in role_name),
                    labelled_year,
                ]
            ],
            post_text,
        ]


@dataclasses.dataclass
class TextualStyle(BasicAuthorYearTextualReferenceStyle):
    def inner(self, role_name):
        return join(sep=self.text_reference_sep)[
            self.person.author_or_editor_or_title(full="s" in role_name),
            join[
                self.bracket.left,
                join2(sep1=self.pre_text_sep, sep2=self.post_text_sep)[
                    pre_text,
                    reference[labelled_year],
                    post_text,
                ],
                self.bracket.right,
            ],
        ]


@dataclasses.dataclass
class YearStyle(ExtraYearReferenceStyle):
    def inner(self, role_name):
        return reference[labelled_year]


LABELLED = {
    BasicAuthorYearParentheticalReferenceStyle: ParentheticalStyle,
    BasicAuthorYearTextualReferenceStyle: TextualStyle,
    ExtraYearReferenceStyle: YearStyle,
}


@dataclasses.dataclass
class AuthorYearLabelledReferenceStyle(AuthorYearReferenceStyle):
    """sphinxcontrib-bibtex's author_year, with the year taken from the entry's label."""

    def __post_init__(self):
        super().__post_init__()

        def labelled(style):
            kind = LABELLED.get(type(style))
            if kind is None:
                return style
            return kind(**{f.name: getattr(style, f.name) for f in dataclasses.fields(style) if f.init})

        self.styles = [labelled(style) for style in self.styles]
        self.role_style.update((name, style) for style in self.styles for name in style.role_names())


def setup(app: Sphinx) -> dict:
    pybtex.plugin.register_plugin("pybtex.style.labels", "author_year", AuthorYearLabelStyle)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "author_year", AuthorYearStyle)
    register_plugin("sphinxcontrib.bibtex.style.referencing", "author_year_labelled",
                    AuthorYearLabelledReferenceStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
