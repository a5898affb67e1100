"""Stage 1: clean text - HTML to text, Unicode NFC, whitespace, Markdown markers.

HTML goes through a real extractor when one is installed (trafilatura, else
BeautifulSoup); without one, the standard library's parser strips tags and drops
script/style/navigation blocks. Only documents that are HTML get extracted
(``looks_like_html``): a page that starts like one (doctype, ``<html>``, ``<head>``,
``<body>``), a fragment that starts with a tag and ends with a closing tag, or text
whose characters are mostly markup. Prose that talks about HTML and quotes a few tags
(the documentation of an HTML formatter or a template engine) is text, and the
extractor would throw most of it away. Code keeps its indentation and its ``#`` lines: the
Markdown and space-collapsing rules skip documents that are (or look like) code.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from html.parser import HTMLParser

from recipe.data.curate.detect import looks_like_code
from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register

__all__ = ["Clean", "html_to_text", "looks_like_html", "normalize_whitespace", "strip_markdown"]

# HTML element names (HTML5 plus a few legacy ones still common in crawls): only these count as
# tags, so "<stdin>", "<T>" or "<module>" in prose and code are not markup.
_HTML_ELEMENTS = frozenset(
    "a abbr address area article aside audio b base bdi bdo big blockquote body br button canvas caption center "
    "cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption figure "
    "font footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd label "
    "legend li link main map mark menu meta meter nav noscript object ol optgroup option output p param picture pre "
    "progress q rp rt ruby s samp script section select small source span strong style sub summary sup svg table "
    "tbody td template textarea tfoot th thead time title tr track tt u ul var video wbr".split()
)
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)(?:\s[^<>]*)?/?>")
_CLOSING_END = re.compile(r"</([A-Za-z][A-Za-z0-9]*)\s*>\s*\Z")
# What may precede a page's first element: a BOM, an XML declaration, comments.
_PAGE_START = re.compile(r"\A\ufeff?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b",
                         re.I | re.S)  # fmt: skip
HTML_SCAN_CHARS = 20_000
HTML_MIN_TAGS = 3
HTML_MIN_MARKUP = 0.2  # share of characters inside tags
# Spaces other than " " and invisible characters that break word matching downstream.
_ODD_SPACES = {cp: " " for cp in (0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000)}
_INVISIBLE = {cp: None for cp in (0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD)}
_CONTROL = {cp: None for cp in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F)}
_TRANSLATE = {**_ODD_SPACES, **_INVISIBLE, **_CONTROL, 0x0D: "\n"}
_BLANK_RUNS = re.compile(r"\n{3,}")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}(?=\S)")

_MD_RULES = [
    (re.compile(r"^```[^\n]*$\n?", re.M), ""),  # code fences (the code between them stays)
    (re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M), r"\1"),  # ATX headings
    (re.compile(r"^ {0,3}(?:[-*_][ \t]*){3,}$", re.M), ""),  # horizontal rules
    (re.compile(r"^ {0,3}> ?", re.M), ""),  # block quotes
    (re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)"), r"\1"),  # images -> alt text
    (re.compile(r"\[([^\]\n]+)\]\([^)\n]*\)"), r"\1"),  # links -> their text
    (re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*"), r"\1"),  # bold (not __x__: Python's dunder names)
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
]


def looks_like_html(text: str, min_markup: float = HTML_MIN_MARKUP) -> bool:
    """Whether ``text`` is an HTML page or fragment rather than text that mentions tags.

    HTML when (on the first 20,000 characters) the text starts like a page (doctype,
    ``<html>``, ``<head>`` or ``<body>``, after an XML declaration or comments), or holds
    at least three element tags and either starts with a tag and ends with a closing
    tag (a fragment: ``<div>...</div>``) or has ``min_markup`` of its characters inside
    tags. Real pages have 15-90% of their characters in tags; documentation quoting
    HTML examples has under 10%, and starts and ends with sentences.
    """
    head = text[:HTML_SCAN_CHARS]
    if _PAGE_START.match(head):
        return True
    tags = [m for m in _TAG.finditer(head) if m.group(2).lower() in _HTML_ELEMENTS]
    if len(tags) < HTML_MIN_TAGS:
        return False
    # A fragment is wrapped in markup: the first tag opens the text and a closing tag ends it.
    closing = _CLOSING_END.search(text[-200:])
    if head.lstrip().startswith(tags[0].group(0)) and closing and closing.group(1).lower() in _HTML_ELEMENTS:
        return True
    markup = sum(m.end() - m.start() for m in tags)
    return markup / max(len(head.strip()), 1) >= min_markup


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "nav", "header", "footer", "noscript", "template", "svg", "form", "aside"}
    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "h1", "h2", "h3", "h4",
              "h5", "h6", "pre", "blockquote", "title", "dd", "dt"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def _extractor() -> tuple[str, object | None]:
    for name in ("trafilatura", "bs4"):
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    return "html.parser", None


def html_to_text(html: str) -> str:
    """Main text of an HTML page (the best extractor installed; the standard library otherwise)."""
    name, mod = _extractor()
    if name == "trafilatura":
        text = mod.extract(html, include_comments=False, include_tables=True)  # type: ignore[union-attr]
        if text:
            return text
    elif name == "bs4":
        soup = mod.BeautifulSoup(html, "html.parser")  # type: ignore[union-attr]
        for tag in soup(list(_TextExtractor._SKIP)):
            tag.decompose()
        return soup.get_text("\n")
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def normalize_whitespace(text: str, collapse_inner: bool = True) -> str:
    """Odd spaces to " ", invisible/control characters out, trailing spaces off, at most one blank line.

    Leading indentation always stays (code, verse); runs of spaces inside a line are
    collapsed only with ``collapse_inner``.
    """
    text = text.replace("\r\n", "\n").translate(_TRANSLATE)
    lines = [line.rstrip() for line in text.split("\n")]
    if collapse_inner:
        lines = [_INNER_SPACES.sub(" ", line) for line in lines]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")


def strip_markdown(text: str) -> str:
    """Remove Markdown markup (headings, emphasis, links, fences, quotes, rules), keep the words."""
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    return text


@register
class Clean(Stage):
    """Normalize text; drops (``empty_after_clean``) what has no text left.

    Args:
        html: extract the text of documents that look like HTML.
        markdown: strip Markdown markers from documents that are not code.
        collapse_spaces: collapse runs of spaces inside lines of documents that are not code.
    """

    name = "clean"

    def __init__(self, html: bool = True, markdown: bool = True, collapse_spaces: bool = True, **kw) -> None:
        super().__init__(**kw)
        self.html, self.markdown, self.collapse_spaces = html, markdown, collapse_spaces

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.extractor = _extractor()[0]
        self.stats.notes["html_extractor"] = self.extractor

    def process(self, docs: list[Doc]) -> None:
        for doc in docs:
            text = doc.text
            code = (doc.bucket or doc.domain) == "code" or looks_like_code(text)
            if self.html and not code and looks_like_html(text):
                text = html_to_text(text)
                self.count("html_extracted")
            nfc = unicodedata.normalize("NFC", text)
            if nfc != text:
                self.count("unicode_normalized")
            text = normalize_whitespace(nfc, collapse_inner=self.collapse_spaces and not code)
            if self.markdown and not code:
                stripped = strip_markdown(text)
                if stripped != text:
                    self.count("markdown_stripped")
                    text = normalize_whitespace(stripped, collapse_inner=self.collapse_spaces)
            if text != doc.text:
                self.count("documents_changed")
            doc.text = text
            if not text.strip():
                self.drop(doc, "empty_after_clean")
