"""Markup extraction for `clean`: the readable text of a MediaWiki page or an HTML document.

MediaWiki goes through a real parser (mwparserfromhell: templates, refs, tables, files,
categories and the named reference sections dropped, links turned into their labels), HTML
through trafilatura with the stdlib parser as fallback. `detect_markup` guesses which a text
carries when the source does not say. Pure functions, no files.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from html.parser import HTMLParser
from typing import Any, Literal

Markup = Literal["auto", "text", "mediawiki", "html"]

_WIKI_HINT = re.compile(r"\[\[[^\]\n]+\]\]|\{\{[^}\n]*|^==+[^=\n]+==+\s*$|'''", re.M)
_HTML_HINT = re.compile(r"<(?:!doctype|html|head|body|div|p|br|span|table|a\s|li|h[1-6])\b", re.I)
_WIKI_HIDDEN_NS = {"file", "image", "media", "category"}
_WIKI_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_WIKI_LEFTOVER_TAG = re.compile(r"</?(?:ref|references|blockquote|div|span|small|big|center|br|sup|sub|poem|"
                                r"onlyinclude|includeonly|noinclude|nowiki)\b[^>]*>", re.I)
_WIKI_HIDDEN_TAGS = {"table", "gallery", "ref", "references", "math", "timeline", "imagemap"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")


def detect_markup(text: str) -> str:
    """'html', 'mediawiki' or 'text', from the markup in the first 20k characters."""
    head = text[:20_000]
    if len(_HTML_HINT.findall(head)) >= 3:
        return "html"
    if len(_WIKI_HINT.findall(head)) >= 3:
        return "mediawiki"
    return "text"


def strip_wikitext(text: str, drop_sections: Iterable[str] = ()) -> str:
    """Readable text of a wiki page: templates, refs, tables, files, categories, comments and
    the named sections gone; links become their label ([[a|b]] -> b)."""
    import mwparserfromhell

    # References go before parsing: the parser leaves a <ref> it finds ambiguous as plain text.
    text = _WIKI_REF.sub("", text)
    code = mwparserfromhell.parse(text)
    names = [re.escape(s) for s in drop_sections]
    if names:
        pattern = r"^\s*(?:" + "|".join(names) + r")\s*$"
        for section in code.get_sections(matches=pattern, flags=re.I):
            _remove(code, section)
    # Emptied in place rather than removed: Wikicode.remove searches the whole tree per node.
    for tag in code.filter_tags(matches=lambda n: str(n.tag).lower() in _WIKI_HIDDEN_TAGS):
        tag.contents = ""
    for link in code.filter_wikilinks():
        title = str(link.title).strip()
        prefix = title.split(":", 1)[0].strip().lower() if ":" in title else ""
        if prefix in _WIKI_HIDDEN_NS or (prefix and link.text is None and _INTERLANGUAGE.match(prefix)):
            link.title, link.text = "", None
    out = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    out = re.sub(r"__[A-Z]+__", "", out)  # magic words (__NOTOC__)
    # Table rows the parser could not see as a table (tables opened or closed inside templates).
    out = re.sub(r"(?m)^[ \t]*(?:\{\||\|\}|\|-|\||!).*$", "", out)
    out = re.sub(r"(?m)^[ \t]*\[\[(?:File|Image|Category):.*$", "", out)  # links the parser gave up on
    out = _WIKI_LEFTOVER_TAG.sub("", out)
    out = re.sub(r"(?m)^[ \t]+", "", out)  # indent left by list markers
    out = re.sub(r"\(\s*[,;:]?\s*\)", "", out)  # brackets left empty by removed templates
    out = re.sub(r"[ \t]+([,.;:])", r"\1", out)  # space left before punctuation by removed refs
    out = re.sub(r"[ \t]{2,}", " ", out)
    return out


def _remove(code: Any, node: Any) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with an enclosing section
        pass


class _TextExtractor(HTMLParser):
    """Fallback HTML -> text: visible text, one line per block, scripts and styles dropped."""

    HIDDEN = {"script", "style", "noscript", "template", "head", "nav", "footer", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section",
             "article", "blockquote", "pre", "ul", "ol", "table", "header", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def html_to_text(text: str) -> str:
    """Main text of an HTML page: trafilatura, or the stdlib parser when it finds nothing."""
    try:
        import trafilatura

        out = trafilatura.extract(text, include_comments=False, include_tables=False, deduplicate=False)
    except Exception:  # trafilatura gives up on fragments and odd pages; the fallback does not
        out = None
    if out and out.strip():
        return out
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return html.unescape("\n".join(line for line in lines if line))


def strip_markup(text: str, markup: str, drop_sections: Iterable[str] = ()) -> str:
    """`text` without its markup (`auto`: detected); plain text comes back as it is."""
    if markup == "auto":
        markup = detect_markup(text)
    if markup == "mediawiki":
        return strip_wikitext(text, drop_sections)
    if markup == "html":
        return html_to_text(text)
    return text
