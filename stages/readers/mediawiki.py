"""MediaWiki XML exports (plain or .bz2), streamed page by page; the text keeps its wiki markup
for `clean` to parse. Redirects, empty pages, other namespaces and pages over the size cap are
counted, not kept; a dump that is a symlink out of its folder is refused."""

from __future__ import annotations

import bz2
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from typing import Literal

from stages.common.io import Drop
from stages.readers.base import Item, Source, existing
from stages.readers.safe import files_of


class MediaWikiSource(Source):
    type: Literal["mediawiki"]
    namespaces: list[int] = [0]
    """Page namespaces to keep (0 = articles, the default)."""


def read_mediawiki(src: MediaWikiSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    path = existing(src, where)
    refused = next((f for f in files_of(path, None) if isinstance(f, Drop)), None)
    if refused is not None:
        yield refused
        return
    cap = src.max_file_bytes
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as f:
            for _, elem in ET.iterparse(f, events=("end",)):
                if not elem.tag.endswith("}page") and elem.tag != "page":
                    continue
                ns = {c.tag.rsplit("}", 1)[-1]: c for c in elem}
                page_id = ns["id"].text if "id" in ns else None
                title = ns["title"].text if "title" in ns else ""
                namespace = int(ns["ns"].text) if "ns" in ns else 0
                revision = ns.get("revision")
                text_el = None if revision is None else next((c for c in revision if c.tag.endswith("text")), None)
                body = (text_el.text or "") if text_el is not None else ""
                elem.clear()
                if namespace not in src.namespaces:
                    yield Drop("other_namespace", f"{path}: {title}")
                elif "redirect" in ns or body.lstrip().upper().startswith("#REDIRECT"):
                    yield Drop("redirect", f"{path}: {title}")
                elif not body.strip():
                    yield Drop("empty_page", f"{path}: {title}")
                elif cap is not None and len(body.encode("utf-8", "surrogatepass")) > cap:
                    yield Drop("record_too_large", f"{path}: {title}: over {cap} bytes")
                else:
                    yield {"id": page_id, "text": f"{title}\n\n{body}" if title else body}
    except (ET.ParseError, OSError, EOFError) as err:
        yield Drop("malformed_xml", f"{path}: {err}")
