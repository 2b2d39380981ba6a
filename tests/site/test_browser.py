"""The rendered book, page by page, in a headless Chromium.

For every page of ``_toc.yml`` this opens the built HTML and checks what a reader
would notice first: no JavaScript errors, mathematics typeset by MathJax (no raw
TeX left on the page), every image loaded, every image a notebook cell outputs shown
as a numbered figure with a caption, chapter-exercise solutions folded
until clicked, a link to open an issue in the book's repository, and, on pages made
from notebooks, a Colab launch link to exactly that notebook in the book's repository.
On a chapter page (``chapters/NN_<slug>``), figures and exercises are numbered per
chapter, "Fig. NN.1", "Exercise NN.1", ..., and the title carries the same number; the
library's source is shown as highlighted code under a link to its lines in the book's
repository (``tutorial_lib.source.show``), fitting the column of a 1440-pixel-wide window;
and figures have twice the pixels they are shown at, for high-DPI screens.

Build first (``make book``), install MathJax locally once
(``npm install --prefix .cache/mathjax mathjax@3``), then run ``pytest tests/site``.
"""

from __future__ import annotations

import mimetypes
import re
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from playwright.sync_api import expect

REPO_ROOT = Path(__file__).resolve().parents[2]


def book_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "_config.yml").read_text())


def toc_pages() -> list[str]:
    """Every document of ``_toc.yml`` (root, parts, chapters, sections), in order."""
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [str(Path(page).with_suffix("")) if page.endswith((".md", ".ipynb")) else page for page in pages]


PAGES = toc_pages()
CONFIG = book_config()
# Images on these hosts are badges (e.g. "Open in Colab") whose files the book
# does not ship. They cannot be fetched offline, so only their host is checked;
# every other image must be served by the book itself.
BADGE_HOSTS = {"colab.research.google.com"}
# MathJax as referenced by the pages, on jsDelivr/unpkg (.../mathjax@3/es5/...)
# or cdnjs (.../mathjax/3.2.2/es5/...): the part after the version is a path
# inside the npm package.
MATHJAX_URL = re.compile(r"/mathjax(?:@[^/]+|/\d[^/]*)/(?P<path>.+)$")
# Raw TeX delimiters, or dollars around TeX, left in the text of a page.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\$[^$\n]*[\\^_{}][^$\n]*\$")
TEXT_NOT_PROSE = "pre, code, kbd, samp, script, style, textarea, mjx-container, .highlight"
TIMEOUT_MS = 30_000
# The window width at which a chapter's library source must fit its column: a common
# laptop screen. Narrower windows scroll long lines sideways.
WIDE_WINDOW = {"width": 1440, "height": 900}
# Runs before the page's own scripts. MathJax normally draws an undefined macro
# such as \R as red text and carries on; with its "noundefined" package removed
# the macro becomes a TeX error that check_math finds. The page's configuration
# is otherwise kept as it is.
STRICT_MATHJAX = """
Object.defineProperty(window, 'MathJax', {
  configurable: true,
  get() { return undefined; },
  set(config) {
    config.tex = Object.assign({}, config.tex);
    const packages = config.tex.packages;
    if (Array.isArray(packages)) {
      config.tex.packages = packages.filter(name => name !== 'noundefined');
    } else {
      const changes = Object.assign({}, packages);
      changes['[-]'] = (changes['[-]'] || []).concat(['noundefined']);
      config.tex.packages = changes;
    }
    Object.defineProperty(window, 'MathJax', {value: config, writable: true, configurable: true});
  },
});
"""


@dataclass
class PageLog:
    """What a page did while loading: errors, refused and failed requests."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    local_failures: list[str] = field(default_factory=list)
    mathjax_missing: list[str] = field(default_factory=list)


def is_local(url: str, base: str) -> bool:
    return url.startswith(base + "/") or url == base or url.startswith(("data:", "blob:", "about:"))


@pytest.fixture
def open_page(browser, server, mathjax_dir):
    """A function that opens a built page with all outside traffic intercepted.

    Call it with a page name from ``_toc.yml``; it returns the Playwright page and
    the ``PageLog`` that collects what went wrong while the page was used.
    """
    contexts = []

    def handle(route):
        url = route.request.url
        if is_local(url, server):
            route.continue_()
            return
        match = MATHJAX_URL.search(urlsplit(url).path)
        if match:
            local = mathjax_dir / match.group("path")
            if local.is_file():
                route.fulfill(
                    status=200,
                    body=local.read_bytes(),
                    content_type=mimetypes.guess_type(local.name)[0] or "application/octet-stream",
                    headers={"Access-Control-Allow-Origin": "*"},
                )
                return
            log.mathjax_missing.append(url)
        log.refused.add(url)
        route.abort()

    def opener(page_name: str):
        nonlocal log
        log = PageLog()
        context = browser.new_context()
        contexts.append(context)
        context.route("**/*", handle)
        context.add_init_script(STRICT_MATHJAX)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: log.page_errors.append(str(error)))

        def on_console(message):
            if message.type != "error":
                return
            location = message.location.get("url", "")
            # Our own refusal of an outside request shows up as exactly this.
            if message.text.startswith("Failed to load resource") and location in log.refused:
                return
            log.console_errors.append(f"{message.text} ({location})")

        page.on("console", on_console)
        page.on(
            "requestfailed",
            lambda request: is_local(request.url, server)
            and log.local_failures.append(f"{request.url}: {request.failure}"),
        )
        page.on(
            "response",
            lambda response: is_local(response.url, server)
            and response.status >= 400
            and log.local_failures.append(f"{response.url}: HTTP {response.status}"),
        )
        response = page.goto(f"{server}/{page_name}.html", wait_until="load")
        assert response is not None and response.ok, f"{page_name}.html did not load"
        return page, log

    log = PageLog()
    yield opener
    for context in contexts:
        context.close()


def notebook_path(page_name: str) -> Path | None:
    """The repository path of the notebook a page is made from, if it is one."""
    path = Path(CONFIG["repository"].get("path_to_book") or "") / f"{page_name}.ipynb"
    return path if (REPO_ROOT / path).is_file() else None


def colab_url() -> str:
    return CONFIG["launch_buttons"]["colab_url"].rstrip("/")


def colab_prefix() -> str:
    """https://colab.research.google.com/github/<owner>/<repo>/blob/<branch>/"""
    repository = urlsplit(CONFIG["repository"]["url"]).path.strip("/")
    return f"{colab_url()}/github/{repository}/blob/{CONFIG['repository']['branch']}/"


def check_math(page) -> list[str]:
    """Problems with the mathematics of a page; waits for MathJax if it has any."""
    math_count = page.locator("span.math, div.math").count()
    if math_count:
        try:
            page.wait_for_function(
                "() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                timeout=TIMEOUT_MS,
            )
        except Exception:
            return [f"MathJax never started, though the page has {math_count} formulas"]
        page.evaluate("() => MathJax.startup.promise")
    report = page.evaluate(
        """([skip, pattern]) => {
            const raw = new RegExp(pattern);
            const math = [...document.querySelectorAll('span.math, div.math')];
            const untypeset = math.filter(node => !node.querySelector('mjx-container'))
                                  .map(node => node.textContent.trim().slice(0, 80));
            const errors = [...document.querySelectorAll('mjx-merror')]
                .map(node => node.getAttribute('data-mjx-error') || node.textContent.slice(0, 80));
            const leftovers = [];
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            while (walker.nextNode()) {
                const node = walker.currentNode;
                if (node.parentElement.closest(skip)) continue;
                if (raw.test(node.textContent)) leftovers.push(node.textContent.trim().slice(0, 80));
            }
            return {untypeset, errors, leftovers};
        }""",
        [TEXT_NOT_PROSE, RAW_TEX.pattern],
    )
    problems = [f"formula not typeset by MathJax: {text!r}" for text in report["untypeset"]]
    problems += [f"MathJax error: {text!r}" for text in report["errors"]]
    problems += [f"raw TeX left in the text: {text!r}" for text in report["leftovers"]]
    return problems


def check_images(page, server: str) -> list[str]:
    """Every image served by the book has loaded with a non-zero width."""
    images = page.evaluate(
        """async () => {
            const images = [...document.images];
            images.forEach(image => { image.loading = 'eager'; });
            const settled = images.map(image => image.complete ? null : new Promise(resolve => {
                image.addEventListener('load', resolve, {once: true});
                image.addEventListener('error', resolve, {once: true});
            }));
            await Promise.race([Promise.all(settled), new Promise(r => setTimeout(r, 20000))]);
            return images.map(image => ({src: image.currentSrc || image.src,
                                         width: image.naturalWidth}));
        }"""
    )
    problems = []
    for image in images:
        if not is_local(image["src"], server):
            host = urlsplit(image["src"]).hostname
            if host not in BADGE_HOSTS:
                problems.append(f"image from outside the book (ship it instead): {image['src']}")
        elif image["width"] == 0:
            problems.append(f"image did not load: {image['src']}")
    return problems


def chapter_number(page_name: str) -> int | None:
    """The number of a chapter page, read from its file name (chapters/02_... is 2)."""
    match = re.match(r"chapters/(\d+)_", page_name)
    return int(match.group(1)) if match else None


def check_figures(page, page_name: str) -> list[str]:
    """Every image output by a notebook cell is a figure with a number and a caption
    (the cell's metadata {"mystnb": {"figure": {"caption": ..., "name": ...}}}); on a
    chapter page the figures are numbered "Fig. N.1", "Fig. N.2", ... in page order."""
    figures = page.evaluate(
        """() => [...document.querySelectorAll('.cell_output img')].map(image => {
            const figure = image.closest('figure');
            const caption = figure && figure.querySelector('figcaption');
            const part = selector => {
                const node = caption && caption.querySelector(selector);
                return node ? node.textContent.trim() : '';
            };
            return {src: image.getAttribute('src'), id: figure ? figure.id : '',
                    number: part('.caption-number'), text: part('.caption-text')};
        })"""
    )
    problems = []
    chapter = chapter_number(page_name)
    for position, figure in enumerate(figures, start=1):
        where = f"output image {position} ({figure['src']})"
        if not figure["number"]:
            problems.append(f"{where} is not a numbered figure: give its cell a caption and a name "
                            'in the metadata {"mystnb": {"figure": {...}}}')
            continue
        if not figure["text"]:
            problems.append(f"{where}, {figure['number']}, has an empty caption")
        if not figure["id"]:
            problems.append(f"{where}, {figure['number']}, has no name to refer to it by")
        if chapter is not None and figure["number"] != f"Fig. {chapter}.{position}":
            problems.append(f"{where} is numbered {figure['number']!r}, not 'Fig. {chapter}.{position}'")
    return problems


def check_chapter_numbers(page, page_name: str) -> list[str]:
    """A chapter's title starts with its number, and its exercises are numbered in
    order "Exercise N.1", "Exercise N.2", ... (the number from the file name)."""
    chapter = chapter_number(page_name)
    if chapter is None:
        return []
    problems = []
    title = page.locator("article.bd-article h1").first.inner_text().strip()
    if not title.startswith(f"{chapter}. "):
        problems.append(f"the title {title!r} does not start with the chapter's number {chapter}")
    numbers = page.eval_on_selector_all(
        "div.exercise > .admonition-title",
        """titles => titles.map(title => {
            const number = title.querySelector('.caption-number');
            return number ? number.textContent.trim() : title.textContent.trim();
        })""",
    )
    expected = [f"Exercise {chapter}.{k}" for k in range(1, len(numbers) + 1)]
    if numbers != expected:
        problems.append(f"exercises numbered {numbers}, not {expected}")
    return problems


def open_folded_outputs(page) -> None:
    """Unfold the outputs a notebook hides behind a toggle (myst-nb's hide-output)."""
    page.evaluate("() => document.querySelectorAll('details').forEach(d => { d.open = true; })")


def check_library_source(page, page_name: str) -> list[str]:
    """On a chapter page, library source is highlighted Python under a link to its lines
    in the book's repository, and fits the column of a 1440-pixel-wide window."""
    if chapter_number(page_name) is None:
        return []
    page.set_viewport_size(WIDE_WINDOW)
    open_folded_outputs(page)
    blob = f"{CONFIG['repository']['url'].rstrip('/')}/blob/{CONFIG['repository']['branch']}/"
    shown = page.evaluate(
        """(blob) => [...document.querySelectorAll('.cell_output a[href]')]
            .filter(link => link.getAttribute('href').startsWith(blob))
            .map(link => {
                // The output is a paragraph with the link, then the highlighted code.
                const next = link.closest('p') && link.closest('p').nextElementSibling;
                const pre = next && next.matches('div.highlight-python') ? next.querySelector('pre') : null;
                return {href: link.getAttribute('href'),
                        highlighted: !!(pre && pre.querySelector('span.k, span.kn')),
                        overflow: pre ? pre.scrollWidth - pre.clientWidth : 0};
            })""",
        blob,
    )
    plain = page.evaluate(
        """() => [...document.querySelectorAll('.cell_output pre')]
            .filter(pre => pre.textContent.trim().startsWith('# tutorial_lib/'))
            .map(pre => pre.textContent.trim().split('\\n')[0])"""
    )
    problems = [f"library source printed as plain text (use tutorial_lib.source.show): {first!r}"
                for first in plain]
    if not shown:
        problems.append("no library source shown with a link to its file (tutorial_lib.source.show)")
    for item in shown:
        match = re.fullmatch(re.escape(blob) + r"(?P<path>[\w./\-]+)#L(?P<a>\d+)-L(?P<b>\d+)", item["href"])
        if not match:
            problems.append(f"source link without a line range: {item['href']}")
            continue
        file = REPO_ROOT / match["path"]
        if not file.is_file():
            problems.append(f"source link to a file the repository lacks: {item['href']}")
        elif int(match["b"]) > len(file.read_text().splitlines()) or int(match["a"]) > int(match["b"]):
            problems.append(f"source link to lines the file lacks: {item['href']}")
        if not item["highlighted"]:
            problems.append(f"the source under {item['href']} is not highlighted Python")
        if item["overflow"] > 1:
            problems.append(f"the source under {item['href']} is {item['overflow']} px wider than "
                            f"the column at a {WIDE_WINDOW['width']}-px window")
    return problems


def check_figure_resolution(page) -> list[str]:
    """Notebook figures carry twice the pixels they are shown at (sharp on high-DPI
    screens: the chapters' inline format is "retina")."""
    open_folded_outputs(page)
    images = page.evaluate(
        """() => [...document.querySelectorAll('.cell_output img')]
            .filter(image => image.clientWidth > 0)
            .map(image => ({src: image.getAttribute('src'), natural: image.naturalWidth,
                            shown: image.clientWidth}))"""
    )
    return [f"figure {image['src']} has {image['natural']} px for {image['shown']} px on the page "
            f"(blurred on a high-DPI screen: use the retina inline format)"
            for image in images if image["natural"] < 1.9 * image["shown"]]


def check_colab_links(page, page_name: str) -> list[str]:
    """The launch button of a notebook page, and every Colab link on any page."""
    prefix = colab_prefix()
    problems = []
    notebook = notebook_path(page_name)
    if notebook is not None:
        # The theme's launch menu (Bootstrap moves the links' title attributes
        # into tooltips, so select by place and address, not by title).
        launch = page.locator(f'.dropdown-launch-buttons a[href^="{colab_url()}/"]')
        if launch.count() == 0:
            problems.append("no Colab launch button on a notebook page")
        for href in [launch.nth(i).get_attribute("href") for i in range(launch.count())]:
            expected = f"/blob/{CONFIG['repository']['branch']}/{notebook.as_posix()}"
            if not (href.startswith(prefix) and href.endswith(expected)):
                problems.append(f"Colab launch link {href} is not {prefix}{notebook.as_posix()}")
    for href in page.eval_on_selector_all(
        f'a[href^="{colab_url()}/github/"]', "links => links.map(link => link.getAttribute('href'))"
    ):
        if not href.startswith(prefix):
            problems.append(f"Colab link {href} is not into this repository and branch ({prefix})")
            continue
        target = href[len(prefix) :].split("#")[0].split("?")[0]
        if not (target.endswith(".ipynb") and (REPO_ROOT / target).is_file()):
            problems.append(f"Colab link {href} points to no notebook of the repository")
    return problems


def check_solutions(page) -> list[str]:
    """Solutions are dropdowns, folded on arrival and shown by a click on their title."""
    problems = []
    undropped = page.locator("div.solution:not(.dropdown)")
    for i in range(undropped.count()):
        title = undropped.nth(i).locator(".admonition-title").inner_text().strip()
        problems.append(f"solution without ':class: dropdown' is shown to everyone: {title!r}")
    solutions = page.locator("div.solution.dropdown")
    for i in range(solutions.count()):
        solution = solutions.nth(i)
        title = solution.locator(":scope > .admonition-title")
        name = title.inner_text().strip()
        body = solution.locator(":scope > :not(.admonition-title)")
        if body.count() == 0 or not solution.evaluate("node => node.textContent.trim().length > 0"):
            problems.append(f"empty solution: {name!r}")
            continue
        shown = [j for j in range(body.count()) if body.nth(j).is_visible()]
        if shown:
            problems.append(f"solution visible before it was clicked: {name!r}")
            continue
        # Click the toggle (the chevron at the right of the title). The title's centre
        # may be the link back to the exercise, which navigates instead of unfolding.
        toggle = title.locator("button.toggle-button")
        (toggle if toggle.count() else title).click()
        try:
            for j in range(body.count()):
                if body.nth(j).evaluate("node => node.textContent.trim().length > 0"):
                    expect(body.nth(j)).to_be_visible(timeout=5_000)
        except AssertionError:
            problems.append(f"solution still hidden after a click on its toggle: {name!r}")
    return problems


def check_issue_link(page) -> list[str]:
    """A link to report a problem: a new issue in the book's repository."""
    issues = CONFIG["repository"]["url"].rstrip("/") + "/issues/new"
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(link => link.href)")
    if not any(href.startswith(issues) for href in hrefs):
        return [f"no link to open an issue ({issues}...)"]
    return []


def test_site_is_built(site):
    """Fails with a hint when ``_build/html`` is missing (see conftest)."""
    assert (site / "index.html").is_file()


def test_checks_have_something_to_check(site):
    """The book has typeset mathematics and folded solutions, so the checks bite."""
    html = {name: (site / f"{name}.html").read_text() for name in PAGES if (site / f"{name}.html").is_file()}
    assert any('class="math' in text for text in html.values()), "no page of the book has mathematics"
    assert any(re.search(r'class="solution dropdown', text) for text in html.values()), (
        "no page of the book has a dropdown solution"
    )
    chapters = {name: text for name, text in html.items() if chapter_number(name) is not None}
    assert any('<span class="caption-number">Fig. ' in text for text in chapters.values()), (
        "no chapter has a numbered figure"
    )
    assert any('<span class="caption-number">Exercise ' in text for text in chapters.values()), (
        "no chapter has a numbered exercise"
    )
    blob = f"{CONFIG['repository']['url'].rstrip('/')}/blob/{CONFIG['repository']['branch']}/tutorial_lib/"
    assert any(blob in text and "highlight-python" in text for text in chapters.values()), (
        "no chapter shows the library's source with a link"
    )


def test_bibliography_is_author_year(site):
    """The bibliography labels each work as the text cites it, by author and year
    ("Vaswani et al., 2017"; a, b, c after the year for one author's works of one year),
    and gives the URL of each work that has one, such as Su's post behind chapter 3's
    central theorem."""
    text = (site / "book" / "bibliography.html").read_text()
    labels = [
        unescape(re.sub(r"<[^>]+>", "", label)).strip("[]")
        for label in re.findall(r'<span class="label">(.*?)</span></span>', text)
    ]
    assert labels, "the bibliography page has no entries"
    author_year = re.compile(r"^\S.*, (\d{4}[a-z]?|n\.d\.)$")
    assert [label for label in labels if not author_year.match(label)] == []
    assert len(set(labels)) == len(labels), "two entries share a label"
    entries = dict(re.findall(r'<span class="label">.*?\[</span>(.*?)<span.*?<p>(.*?)</p>', text, re.DOTALL))
    flaw = [entry for entry in entries.values() if "theoretical flaw of relative position" in entry]
    assert flaw and "https://kexue.fm/archives/9105" in flaw[0]


def test_colab_check_has_notebook_pages():
    """The Colab-link check bites only on pages made from notebooks."""
    if not any(notebook_path(name) for name in PAGES):
        pytest.skip("no page of the book is made from a notebook yet (_toc.yml lists none)")
    assert all((REPO_ROOT / notebook_path(name)).is_file() for name in PAGES if notebook_path(name))


@pytest.mark.parametrize("page_name", PAGES)
def test_page(page_name, site, server, open_page):
    assert (site / f"{page_name}.html").is_file(), (
        f"{page_name} is in _toc.yml but {page_name}.html was not built"
    )
    page, log = open_page(page_name)
    problems = []
    problems += check_math(page)
    problems += check_images(page, server)
    problems += check_figures(page, page_name)
    problems += check_chapter_numbers(page, page_name)
    problems += check_figure_resolution(page)
    problems += check_library_source(page, page_name)
    problems += check_colab_links(page, page_name)
    problems += check_solutions(page)
    problems += check_issue_link(page)
    # Errors are collected last: clicking and typesetting can raise them too.
    page.wait_for_timeout(200)
    problems += [f"JavaScript error: {error}" for error in log.page_errors]
    problems += [f"console error: {error}" for error in log.console_errors]
    problems += [f"failed request for a file of the site: {failure}" for failure in log.local_failures]
    problems += [f"MathJax file missing from the local copy: {url}" for url in log.mathjax_missing]
    assert not problems, f"{page_name}.html:\n  " + "\n  ".join(problems)
