"""collect: read every configured source into Parquet documents under `data/raw/`.

Reads the sources listed in `params.yaml` (`collect.sources` for the pretraining corpus,
`collect.instructions` for SFT data, `collect.preferences` for reward-model pairs) and writes
`corpus.parquet`, `instructions.parquet` and `preferences.parquet` into `paths.raw`. Records keep
their source's own id where it has one (else a stable content id). Nothing is lost silently: a
record that cannot be read (malformed line, wrong type, binary file, a symlink leaving its
folder...) is counted under a reason in `metrics.json` and sampled in `reports/collect/`.
A missing source path, a source with no readable record, or an empty corpus stop the stage
with one sentence naming the source.

    python -m stages.collect [--params params.yaml]
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import re
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import KINDS, Tally, atomic_dir, content_id, resolve_path, write_jsonl, write_records
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.collect")


# --- sources ---------------------------------------------------------------------------------


class Source(StageConfig):
    name: str
    """Short name: the `source` column of every record, and how clean picks its markup rules."""
    path: str
    """File, folder, URL, dataset name; `pkg://package/rel` points inside an installed package."""
    max_docs: int | None = None
    """Take at most this many records from the source."""


class JsonlSource(Source):
    type: Literal["jsonl"]
    text_field: str = "text"
    """Field holding the document text."""
    id_field: str | None = "id"
    """Field holding the source's id; records without it get a content id."""


class ParquetSource(Source):
    type: Literal["parquet"]
    text_field: str = "text"
    id_field: str | None = "id"


class TextSource(Source):
    type: Literal["text"]
    glob: str = "**/*.txt"
    """Files to read when `path` is a folder."""
    split: Literal["file", "line"] = "file"
    """One document per file, or one per non-empty line (corpora stored one article a line)."""


class TaggedSource(Source):
    type: Literal["tagged"]
    lines_per_doc: int = Field(1, ge=1)
    """Consecutive paragraphs joined into one document."""


class MediaWikiSource(Source):
    type: Literal["mediawiki"]
    namespaces: list[int] = [0]
    """Page namespaces to keep (0 = articles)."""


class HFSource(Source):
    type: Literal["hf"]
    split: str = "train"
    text_field: str = "text"
    id_field: str | None = "id"


class UrlSource(Source):
    type: Literal["url"]
    max_bytes: int = 50_000_000
    """Refuse a download larger than this."""
    timeout_s: float = 60.0


class AlpacaSource(Source):
    type: Literal["alpaca"]
    """Alpaca records: `instruction`, optional `input`, `output` (a JSON array or JSONL)."""


class ChatSource(Source):
    type: Literal["chat"]
    """JSONL of `{"messages": [{"role": ..., "content": ...}, ...]}` records."""
    messages_field: str = "messages"


class BigBenchSource(Source):
    type: Literal["bigbench"]
    """A BIG-bench `task.json`: instructions take the input and its best target; preferences
    pair the best-scored answer with each lower-scored one."""
    prompt_template: str = "{input}"
    """How the task input becomes the user's prompt (`{input}` is replaced)."""


class PairsSource(Source):
    type: Literal["pairs"]
    """JSONL of preference pairs: `prompt`, `chosen`, `rejected` (strings, or chat messages)."""


CorpusSource = Annotated[
    Union[JsonlSource, ParquetSource, TextSource, TaggedSource, MediaWikiSource, HFSource, UrlSource],
    Field(discriminator="type"),
]
InstructionSource = Annotated[Union[AlpacaSource, ChatSource, BigBenchSource, HFSource], Field(discriminator="type")]
PreferenceSource = Annotated[Union[PairsSource, BigBenchSource, HFSource], Field(discriminator="type")]


class CollectConfig(StageConfig):
    sources: list[CorpusSource]
    """The pretraining corpus."""
    instructions: list[InstructionSource] = []
    """Instruction data for SFT (and prompts for PPO)."""
    preferences: list[PreferenceSource] = []
    """Chosen/rejected pairs for the reward model."""
    limit: int | None = None
    """At most this many records from every source (the tiny profile samples this way)."""
    samples: int = 20
    """Records of each kind (and dropped records) written to the report as samples."""


# --- reading ---------------------------------------------------------------------------------


@dataclass
class Drop:
    """A record a reader could not turn into a document: why, and where it was."""

    reason: str
    where: str


Item = Union[dict[str, Any], Drop]


def decode(data: bytes, where: str, stats: Counter[str]) -> str | None:
    """Bytes to text: UTF-8 when it is, else the encoding charset-normalizer finds; None for
    binary data. Lone surrogates (from JSON escapes) become U+FFFD so Parquet can hold them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192] and data[:8192].count(b"\x00") > len(data[:8192]) // 100:
        return None
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        return None
    # Short texts fit many code pages equally well; among the least chaotic, prefer the common.
    least = min(m.chaos for m in matches)
    tied = [m for m in matches if m.chaos <= least + 0.01]
    best = next((m for enc in COMMON_ENCODINGS for m in tied if m.encoding == enc), tied[0])
    stats[f"decoded_{best.encoding}"] += 1
    log.info("%s is not UTF-8: decoded as %s", where, best.encoding)
    return str(best)


# Legacy encodings most text that is not UTF-8 comes in, most common first.
COMMON_ENCODINGS = ("cp1252", "gb18030", "big5", "shift_jis", "euc_jp", "euc_kr", "cp1251", "utf_16", "latin_1")


_SURROGATE = re.compile("[\ud800-\udfff]")


def fix_surrogates(text: str, stats: Counter[str]) -> str:
    if _SURROGATE.search(text):
        stats["lone_surrogates_replaced"] += 1
        # A pair written as two escapes is one character; a lone half becomes U+FFFD.
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".bz2":
        return bz2.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    return raw


def existing(src: Source, where: str) -> Path:
    try:
        path = resolve_path(src.path)
    except FileNotFoundError as err:
        raise StageError(f"{where}: {err}") from None
    if not path.exists():
        raise StageError(f"{where}: path {path} does not exist")
    return path


def read_lines(src: Source, where: str, stats: Counter[str]) -> Iterator[tuple[int, Any] | Drop]:
    """(line number, parsed JSON object) for each non-blank line of a JSONL file (or the
    elements of a JSON array file)."""
    path = existing(src, where)
    text = decode(open_bytes(path), str(path), stats)
    if text is None:
        yield Drop("binary_file", str(path))
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            yield Drop("malformed_json", f"{path}: {err}")
            return
        for i, obj in enumerate(items, 1):
            yield i, obj
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError:
            yield Drop("malformed_json", f"{path}:{lineno}")


def field_text(obj: Any, field: str, where: str) -> str | Drop:
    if not isinstance(obj, dict):
        return Drop("not_an_object", where)
    value = obj.get(field)
    if value is None:
        return Drop(f"missing_{field}", where)
    if not isinstance(value, str):
        return Drop(f"wrong_type_{field}", where)
    return value


def native_id(obj: dict[str, Any], field: str | None) -> str | None:
    if field and obj.get(field) is not None and not isinstance(obj.get(field), (dict, list)):
        return str(obj[field])
    return None


def read_jsonl(src: JsonlSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    for item in read_lines(src, where, stats):
        if isinstance(item, Drop):
            yield item
            continue
        lineno, obj = item
        text = field_text(obj, src.text_field, f"{src.path}:{lineno}")
        if isinstance(text, Drop):
            yield text
            continue
        yield {"id": native_id(obj, src.id_field), "text": text}


def read_parquet(src: ParquetSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path = existing(src, where)
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as err:
            yield Drop("unreadable_file", f"{file}: {err}")
            continue
        if src.text_field not in table.column_names:
            raise StageError(f"{where}: {file} has no column '{src.text_field}' (columns: {table.column_names})")
        for i, row in enumerate(table.to_pylist()):
            text = field_text(row, src.text_field, f"{file}#{i}")
            if isinstance(text, Drop):
                yield text
            else:
                yield {"id": native_id(row, src.id_field), "text": text}


def read_text(src: TextSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    path = existing(src, where)
    if path.is_dir():
        root = path.resolve()
        files = sorted(p for p in path.glob(src.glob) if p.is_file() or p.is_symlink())
    else:
        root, files = path.parent.resolve(), [path]
    for file in files:
        rel = file.relative_to(path) if path.is_dir() else Path(file.name)
        real = file.resolve()
        if not real.is_relative_to(root):
            yield Drop("symlink_outside_source", f"{file} -> {real}")
            continue
        if not real.is_file():
            yield Drop("unreadable_file", str(file))
            continue
        data = open_bytes(real)
        if not data.strip():
            yield Drop("empty_file", str(file))
            continue
        text = decode(data, str(file), stats)
        if text is None:
            yield Drop("binary_file", str(file))
            continue
        if src.split == "file":
            yield {"id": rel.as_posix(), "text": text}
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield {"id": f"{rel.as_posix()}:{lineno}", "text": line.strip()}


_TAG = re.compile(r"/[A-Za-z]+\b")


def read_tagged(src: TaggedSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    """A word/POS-tagged corpus (People's Daily style `词/n  词/v`): tags and the spaces between
    words removed, `lines_per_doc` paragraphs joined into a document."""
    path = existing(src, where)
    text = decode(open_bytes(path), str(path), stats)
    if text is None:
        yield Drop("binary_file", str(path))
        return
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for start in range(0, len(lines), src.lines_per_doc):
        paras = ["".join(_TAG.sub("", tok) for tok in ln.split()) for ln in lines[start : start + src.lines_per_doc]]
        yield {"id": f"{path.name}:{start + 1}", "text": "\n".join(paras)}


def read_mediawiki(src: MediaWikiSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    """Pages of a MediaWiki XML export (plain or .bz2), streamed; text keeps its wiki markup
    for `clean` to parse. Redirects are counted, not kept."""
    path = existing(src, where)
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
                else:
                    yield {"id": page_id, "text": f"{title}\n\n{body}" if title else body}
    except (ET.ParseError, OSError, EOFError) as err:
        yield Drop("malformed_xml", f"{path}: {err}")


def read_hf(src: HFSource, where: str, stats: Counter[str]) -> Iterator[dict[str, Any] | Drop]:
    """Rows of a `datasets` dataset: a local `save_to_disk` folder, or a hub name."""
    import datasets

    local = resolve_path(src.path)
    try:
        if local.exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.path, split=src.split)
    except Exception as err:
        raise StageError(f"{where}: cannot load dataset '{src.path}': {err}") from None
    for i, row in enumerate(ds):
        yield {"_row": row, "_where": f"{src.path}#{i}"}


def read_url(src: UrlSource, where: str, stats: Counter[str]) -> Iterator[Item]:
    if not re.match(r"https?://", src.path):
        raise StageError(f"{where}: '{src.path}' is not an http(s) URL")
    try:
        with urllib.request.urlopen(src.path, timeout=src.timeout_s) as resp:
            data = resp.read(src.max_bytes + 1)
    except OSError as err:
        raise StageError(f"{where}: cannot download {src.path}: {err}") from None
    if len(data) > src.max_bytes:
        yield Drop("download_too_large", f"{src.path} > {src.max_bytes} bytes")
        return
    text = decode(data, src.path, stats)
    if text is None or not text.strip():
        yield Drop("binary_file" if text is None else "empty_file", src.path)
        return
    yield {"id": src.path, "text": text}


CORPUS_READERS = {
    "jsonl": read_jsonl, "parquet": read_parquet, "text": read_text, "tagged": read_tagged,
    "mediawiki": read_mediawiki, "url": read_url,
}


def corpus_records(src: Any, where: str, stats: Counter[str]) -> Iterator[Item]:
    if src.type == "hf":
        for item in read_hf(src, where, stats):
            text = field_text(item["_row"], src.text_field, item["_where"])
            yield text if isinstance(text, Drop) else {"id": native_id(item["_row"], src.id_field), "text": text}
        return
    yield from CORPUS_READERS[src.type](src, where, stats)


# --- instructions and preferences ------------------------------------------------------------


def as_messages(value: Any) -> list[dict[str, str]] | None:
    """Chat messages in the `[{"role", "content"}]` form, or None when they are not."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def alpaca_messages(obj: Any) -> list[dict[str, str]] | str:
    """Alpaca fields to chat messages, or the reason they cannot be."""
    if not isinstance(obj, dict):
        return "not_an_object"
    instruction, extra, output = obj.get("instruction"), obj.get("input") or "", obj.get("output")
    if not isinstance(instruction, str) or not isinstance(extra, str):
        return "wrong_type_instruction"
    if output is None:
        return "missing_output"
    if not isinstance(output, str):
        return "wrong_type_output"
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def bigbench_examples(src: BigBenchSource, where: str, stats: Counter[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    path = existing(src, where)
    files = sorted(path.glob("**/task.json")) if path.is_dir() else [path]
    for file in files:
        try:
            task = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StageError(f"{where}: {file} is not a BIG-bench task file ({err})") from None
        if "examples" not in task:
            if path.is_dir():
                continue  # a parent task: its subtasks' files hold the examples
            raise StageError(f"{where}: {file} is not a BIG-bench task file (no 'examples')")
        examples = task["examples"]
        for i, ex in enumerate(examples):
            yield f"{file.parent.name}/{i}", ex


def ranked_answers(ex: dict[str, Any]) -> list[tuple[float, str]]:
    scores = ex.get("target_scores")
    if isinstance(scores, dict):
        return sorted(((float(s), a) for a, s in scores.items()), key=lambda t: -t[0])
    return []


def instruction_records(src: Any, where: str, stats: Counter[str]) -> Iterator[Item]:
    if src.type == "bigbench":
        for ex_id, ex in bigbench_examples(src, where, stats):
            target = ex.get("target")
            answer = target[0] if isinstance(target, list) and target else target
            if not isinstance(answer, str):
                ranked = ranked_answers(ex)
                answer = ranked[0][1] if ranked else None
            if not isinstance(ex.get("input"), str) or not isinstance(answer, str):
                yield Drop("no_answer", f"{src.path}#{ex_id}")
                continue
            prompt = src.prompt_template.replace("{input}", ex["input"])
            yield {"id": ex_id, "messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}]}
        return
    if src.type == "hf":
        rows = ((item["_where"], item["_row"]) for item in read_hf(src, where, stats))
    else:
        rows = ((f"{src.path}:{n}", obj) for n, obj in
                (it if not isinstance(it, Drop) else (None, it) for it in read_lines(src, where, stats)))
    for at, obj in rows:
        if isinstance(obj, Drop):
            yield obj
            continue
        if src.type == "chat":
            messages = as_messages(obj.get(src.messages_field)) if isinstance(obj, dict) else None
            if messages is None:
                yield Drop("malformed_messages", at)
                continue
        else:  # alpaca rows (JSON, JSONL or a dataset with alpaca columns)
            messages = alpaca_messages(obj)
            if isinstance(messages, str):
                yield Drop(messages, at)
                continue
        yield {"id": native_id(obj, "id"), "messages": messages}


def pair_text(value: Any) -> str | None:
    """A chosen/rejected answer as text: a string, or the last assistant turn of messages."""
    if isinstance(value, str):
        return value
    messages = as_messages(value)
    if messages:
        return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)
    return None


def preference_records(src: Any, where: str, stats: Counter[str]) -> Iterator[Item]:
    if src.type == "bigbench":
        for ex_id, ex in bigbench_examples(src, where, stats):
            ranked = ranked_answers(ex)
            if len(ranked) < 2 or not isinstance(ex.get("input"), str):
                yield Drop("no_pair", f"{src.path}#{ex_id}")
                continue
            best_score, best = ranked[0]
            for j, (score, worse) in enumerate(ranked[1:], 1):
                if score < best_score:
                    yield {"id": f"{ex_id}/{j}", "prompt": src.prompt_template.replace("{input}", ex["input"]),
                           "chosen": best, "rejected": worse}
        return
    rows = (((item["_where"], item["_row"]) for item in read_hf(src, where, stats)) if src.type == "hf" else
            ((f"{src.path}:{n}", obj) for n, obj in
             (it if not isinstance(it, Drop) else (None, it) for it in read_lines(src, where, stats))))
    for at, obj in rows:
        if isinstance(obj, Drop):
            yield obj
            continue
        if not isinstance(obj, dict):
            yield Drop("not_an_object", at)
            continue
        prompt = obj.get("prompt", "")
        if isinstance(prompt, list):  # conversational prompt: the user's last turn
            msgs = as_messages(prompt) or []
            prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), None)
        chosen, rejected = pair_text(obj.get("chosen")), pair_text(obj.get("rejected"))
        if not isinstance(prompt, str) or chosen is None or rejected is None:
            yield Drop("malformed_pair", at)
            continue
        yield {"id": native_id(obj, "id"), "prompt": prompt, "chosen": chosen, "rejected": rejected}


# --- the stage -------------------------------------------------------------------------------

READERS = {"corpus": corpus_records, "instructions": instruction_records, "preferences": preference_records}
SECTIONS = {"corpus": "sources", "instructions": "instructions", "preferences": "preferences"}


def collect_kind(kind: str, sources: list[Any], limit: int | None, stats: Counter[str],
                 drops: list[dict[str, str]], tally: Tally) -> list[dict[str, Any]]:
    """Every record of one kind from its sources, with unique ids and fixed surrogates."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, src in enumerate(sources):
        where = f"collect.{SECTIONS[kind]}[{i}] ({src.name})"
        kept_before = len(records)
        taken = 0
        cap = min(n for n in (src.max_docs, limit, sys.maxsize) if n is not None)
        for item in READERS[kind](src, where, stats):
            if taken >= cap:
                break
            taken += 1
            tally.docs_in += 1
            if isinstance(item, Drop):
                tally.drop(item.reason)
                drops.append({"kind": kind, "source": src.name, "reason": item.reason, "where": item.where})
                continue
            rec = {k: fix_surrogates(v, stats) if isinstance(v, str) else v for k, v in item.items()}
            if "messages" in rec:
                rec["messages"] = [{"role": m["role"], "content": fix_surrogates(m["content"], stats)}
                                   for m in rec["messages"]]
            body = json.dumps({k: v for k, v in rec.items() if k != "id"}, ensure_ascii=False, sort_keys=True)
            rid = rec.get("id") or content_id(src.name, body)
            if rid in seen:  # two records with one id: keep both, make the second id unique
                stats["ids_made_unique"] += 1
                rid = f"{rid}~{content_id(body)[:8]}"
                while rid in seen:
                    rid += "+"
            seen.add(rid)
            rec["id"], rec["source"] = rid, src.name
            records.append(rec)
            tally.docs_out += 1
        if len(records) == kept_before:
            raise StageError(f"{where}: no readable record in {src.path}")
        log.info("%s: %d records", where, len(records) - kept_before)
    return records


def run(cfg: CollectConfig, paths: Paths) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    drops: list[dict[str, str]] = []
    total, per_kind, collected = Tally(), {}, {}
    for kind in KINDS:
        sources = getattr(cfg, SECTIONS[kind])
        tally = Tally()
        collected[kind] = collect_kind(kind, sources, cfg.limit, stats, drops, tally)
        tally.check(f"collect {kind}")
        per_kind[kind] = tally.as_metrics()
        total.merge(tally)
    if not collected["corpus"]:
        raise StageError("collect: the corpus sources yielded no document")

    with atomic_dir(paths.raw) as tmp:
        for kind in KINDS:
            write_records(tmp, kind, collected[kind])

    report = paths.report_dir("collect")
    report.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        write_jsonl(report / f"samples_{kind}.jsonl", collected[kind][: cfg.samples])
    write_jsonl(report / "samples_dropped.jsonl", drops[: cfg.samples * 5])
    return {**total.as_metrics(), "kinds": per_kind, "repairs": dict(sorted(stats.items())),
            "sources": {k: dict(Counter(r["source"] for r in collected[k])) for k in KINDS}}


def main(argv: list[str] | None = None) -> int:
    return run_stage("collect", CollectConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
