"""Text normalisation: Unicode NFKC, width unification, whitespace/control characters, HTML.

NFKC already folds full-width ASCII (ＡＢＣ１２３) to half width and half-width katakana (ｶﾀｶﾅ) to
full width; `unify_width` adds the punctuation NFKC leaves alone (wave dash, minus signs, ...).
"""
from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from typing import Iterable, Iterator

from hibari.data.sources import Doc

# Characters NFKC keeps but a corpus wants as one form.
_WIDTH_MAP = str.maketrans({
    "\u301c": "~", "\uff5e": "~",            # wave dash, full-width tilde
    "\u2212": "-", "\u2010": "-", "\u2011": "-", "\u2013": "-", "\uff0d": "-",  # minus, hyphens
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u00a0": " ", "\u3000": " ",            # no-break and ideographic space
})
_INVISIBLE = re.compile("[\u200b-\u200f\u2028\u2029\u2060-\u2064\ufeff\u00ad]")
# C0/C1 controls except tab and newline.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def unify_width(text: str) -> str:
    """NFKC, then map the remaining width/punctuation variants to one form."""
    return unicodedata.normalize("NFKC", text).translate(_WIDTH_MAP)


def normalize_whitespace(text: str) -> str:
    """Drop control/invisible characters, collapse runs of spaces, keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _INVISIBLE.sub("", text))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


class _TextExtractor(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
             "article", "header", "footer", "pre", "blockquote", "table", "ul", "ol", "title"}
    SKIP = {"script", "style", "noscript", "template", "svg", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(page: str) -> str:
    """Visible text of an HTML page: scripts/styles dropped, block elements become line breaks."""
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    return normalize_whitespace("".join(parser.parts))  # entities decoded by the parser


def clean_text(text: str, html_input: bool = False) -> str:
    if html_input:
        text = html_to_text(text)
    return normalize_whitespace(unify_width(text))


def clean_docs(docs: Iterable[Doc], html_input: bool = False) -> Iterator[Doc]:
    """Clean every document; documents left empty are dropped."""
    for doc in docs:
        text = clean_text(doc["text"], html_input)
        if text:
            yield {**doc, "text": text}
