"""collect: read every configured source into Parquet documents under `data/raw/`.

Reads the sources listed in `params.yaml` (`collect.sources` for the pretraining corpus,
`collect.instructions` for SFT data, `collect.preferences` for reward-model pairs) with the
readers of `stages.readers` (files, folders, archives, JSONL/Parquet, MediaWiki dumps, datasets,
URLs) and writes them to `paths.raw` as Parquet shards of at most `collect.shard_bytes` of text
(`corpus/part-00000.parquet`, ..., and the same for `instructions` and `preferences`), record
by record as the readers stream them: a source larger than memory passes through. Records keep
their source's own id where it has one (else a stable content id). Nothing is lost silently: a
record that cannot be read (malformed line, wrong type, binary file, a symlink leaving its
folder, a file over `max_file_bytes`, an unsafe archive member...) is counted under a reason in
`metrics.json` and sampled in `reports/collect/`; a line that is not UTF-8 is decoded or dropped
on its own, never changing how the rest of its file is read. A source that is also a benchmark
(`holdout: true`: hhh_alignment) gives only the part `evaluate.holdout` leaves for training; the
examples held out are counted per kind and source (`kinds.<kind>.held_out_for_evaluation`). Every
preference record gets its part of the data in a `split` column (`reward`, `judge`, `policy`,
`test`: `stages.common.preferences`), by a salted hash of its prompt (`collect.preference_split`;
counted in `kinds.preferences.splits`); an instruction that asks a prompt of the `test` part is
dropped (`test_prompt`), so that no model trains on what it is scored on. A missing source path, a
source with no readable record, or an empty corpus stop the stage with one sentence naming the
source.

    python -m stages.collect [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from pydantic import Field

from stages.common.benchmarks import HELD_OUT, EvaluationSets, Holdout
from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import KINDS, Drop, Tally, atomic_dir, content_id, record_bytes, records_table, write_jsonl
from stages.common.preferences import PARTS, SPLIT, TEST, PreferenceSplit, normalize_prompt
from stages.common.runner import run_stage
from stages.common.shards import ShardWriter
from stages.common.text import SURROGATE, fix_surrogates
from stages.readers import archive, bigbench, chat, files, hub, jsonl, mediawiki, parquet

log = logging.getLogger("llm_forge.collect")

READS = {"evaluate": EvaluationSets}  # `evaluate.holdout`: the part of a shared source kept for evaluation

CorpusSource = Annotated[
    jsonl.JsonlSource | parquet.ParquetSource | files.TextSource | files.TaggedSource | mediawiki.MediaWikiSource
    | hub.HFSource | files.UrlSource | archive.ArchiveSource,
    Field(discriminator="type"),
]
InstructionSource = Annotated[chat.AlpacaSource | chat.ChatSource | bigbench.BigBenchSource | hub.HFSource,
                              Field(discriminator="type")]
PreferenceSource = Annotated[chat.PairsSource | bigbench.BigBenchSource | hub.HFSource,
                             Field(discriminator="type")]


class CollectConfig(StageConfig):
    sources: list[CorpusSource]
    """The pretraining corpus."""
    instructions: list[InstructionSource]
    """Instruction data for SFT (and prompts for PPO)."""
    preferences: list[PreferenceSource]
    """Chosen/rejected pairs for the reward model, the judge and preference optimization."""
    preference_split: PreferenceSplit
    """How the preference records are split into the parts each model trains or is scored on (by prompt)."""
    limit: int | None = Field(ge=1)
    """At most this many records from every source (the tiny profile samples this way; null: all)."""
    max_file_bytes: int = Field(ge=1)
    """Largest file, archive member or single line a reader loads (a source's own
    `max_file_bytes` overrides it); anything bigger is dropped and named, never read whole."""
    samples: int = Field(ge=0)
    """Records of each kind written to the report as samples (and five times as many dropped ones)."""
    shard_bytes: int = Field(ge=1)
    """Text per Parquet shard of `data/raw` (UTF-8 bytes): the unit every data stage holds in memory
    and hands to one worker."""


# --- the steps -------------------------------------------------------------------------------

Reader = Callable[[Any, str, Counter], Iterator[Any]]
# kind -> source type -> reader
READERS: dict[str, dict[str, Reader]] = {
    "corpus": {"jsonl": jsonl.read_jsonl, "parquet": parquet.read_parquet, "text": files.read_text,
               "tagged": files.read_tagged, "mediawiki": mediawiki.read_mediawiki, "hf": hub.read_corpus,
               "url": files.read_url, "archive": archive.read_archive},
    "instructions": {"alpaca": chat.read_alpaca, "chat": chat.read_chat, "bigbench": bigbench.read_instructions,
                     "hf": hub.read_instructions},
    "preferences": {"pairs": chat.read_pairs, "bigbench": bigbench.read_preferences, "hf": hub.read_preferences},
}
SECTIONS = {"corpus": "sources", "instructions": "instructions", "preferences": "preferences"}
# Preferences before instructions: an instruction asking a held-out preference prompt is left out.
ORDER = ("corpus", "preferences", "instructions")
TEST_PROMPT = "test_prompt"


def repair_strings(record: dict[str, Any], stats: Counter[str]) -> dict[str, Any]:
    """`record` with lone surrogates (from JSON escapes) replaced in every string, so that
    Parquet can hold them; each repaired string is counted."""

    def fix(text: str) -> str:
        if SURROGATE.search(text):
            stats["lone_surrogates_replaced"] += 1
        return fix_surrogates(text)

    rec = {k: fix(v) if isinstance(v, str) else v for k, v in record.items()}
    if "messages" in rec:
        rec["messages"] = [{"role": m["role"], "content": fix(m["content"])} for m in rec["messages"]]
    return rec


def instruction_prompt(record: dict[str, Any]) -> str | None:
    """The user turn an instruction record answers (its last user message), if it has one."""
    return next((m["content"] for m in reversed(record.get("messages") or []) if m.get("role") == "user"), None)


def collect_kind(kind: str, sources: list[Any], cfg: CollectConfig, stats: Counter[str],
                 drops: list[dict[str, str]], tally: Tally, holdout: Holdout,
                 emit: Callable[[dict[str, Any]], None],
                 screen: Callable[[dict[str, Any]], Drop | None] = lambda rec: None) -> None:
    """Every record of one kind from its sources to `emit`, with unique ids and fixed surrogates;
    a source that is also a benchmark (`holdout: true`) without its evaluation part, and without
    the records `screen` drops."""
    seen: set[str] = set()
    for i, src in enumerate(sources):
        where = f"collect.{SECTIONS[kind]}[{i}] ({src.name})"
        kept = taken = 0
        cap = min(n for n in (src.max_docs, cfg.limit, sys.maxsize) if n is not None)
        if src.max_file_bytes is None:
            src = src.model_copy(update={"max_file_bytes": cfg.max_file_bytes})
        shared = {"holdout": holdout} if getattr(src, "holdout", False) else {}
        for item in READERS[kind][src.type](src, where, stats, **shared):
            if taken >= cap:
                break
            taken += 1
            tally.docs_in += 1
            if not isinstance(item, Drop):
                item = repair_strings(item, stats)
                item = screen(item) or item
            if isinstance(item, Drop):
                tally.drop(item.reason)
                if len(drops) < cfg.samples * 5:
                    drops.append({"kind": kind, "source": src.name, "reason": item.reason, "detail": item.detail})
                continue
            rec = item
            body = json.dumps({k: v for k, v in rec.items() if k != "id"}, ensure_ascii=False, sort_keys=True)
            rid = rec.get("id") or content_id(src.name, body)
            if rid in seen:  # two records with one id: keep both, make the second id unique
                stats["ids_made_unique"] += 1
                rid = f"{rid}~{content_id(body)[:8]}"
                while rid in seen:
                    rid += "+"
            seen.add(rid)
            rec["id"], rec["source"] = rid, src.name
            emit(rec)
            kept += 1
            tally.docs_out += 1
        if not kept:
            raise StageError(f"{where}: no readable record in {src.path}")
        log.info("%s: %d records", where, kept)


# --- the stage -------------------------------------------------------------------------------


def run(cfg: CollectConfig, paths: Paths, evaluate: EvaluationSets) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    drops: list[dict[str, str]] = []
    total, per_kind, samples, sources = Tally(), {}, {}, {}
    splits: Counter[str] = Counter()
    test_prompts: set[str] = set()  # normalized prompts of the `test` part

    def split(rec: dict[str, Any]) -> None:
        rec[SPLIT] = cfg.preference_split.part(rec["prompt"])
        splits[rec[SPLIT]] += 1
        if rec[SPLIT] == TEST:
            test_prompts.add(normalize_prompt(rec["prompt"]))

    def screen(rec: dict[str, Any]) -> Drop | None:
        prompt = instruction_prompt(rec)
        if prompt is not None and normalize_prompt(prompt) in test_prompts:
            return Drop(TEST_PROMPT, f"asks a prompt of the preference data's {TEST} part: {prompt[:80]!r}")
        return None

    with atomic_dir(paths.raw) as tmp:
        for kind in ORDER:
            tally, counts, samples[kind], sources[kind] = Tally(), Counter(), [], Counter()
            writer = ShardWriter(tmp, kind, cfg.shard_bytes, lambda rs, k=kind: records_table(k, rs),
                                 lambda r, k=kind: record_bytes(k, r))

            def emit(rec: dict[str, Any], kind: str = kind, writer: ShardWriter = writer) -> None:
                if kind == "preferences":
                    split(rec)
                writer.add(rec)
                sources[kind][rec["source"]] += 1
                if len(samples[kind]) < cfg.samples:
                    samples[kind].append(rec)

            collect_kind(kind, getattr(cfg, SECTIONS[kind]), cfg, counts, drops, tally, evaluate.holdout, emit,
                         **({"screen": screen} if kind == "instructions" else {}))
            writer.close()
            tally.check(f"collect {kind}")
            held = {k.partition(".")[2]: counts.pop(k) for k in sorted(counts) if k.startswith(HELD_OUT)}
            per_kind[kind] = {**tally.as_metrics(), "shards": writer.shards, **({HELD_OUT: held} if held else {})}
            total.merge(tally)
            stats.update(counts)
        per_kind["preferences"]["splits"] = {part: splits[part] for part in PARTS}
        per_kind = {kind: per_kind[kind] for kind in KINDS}
        if not sources["corpus"]:
            raise StageError("the corpus sources yielded no document")

    report = paths.report_dir("collect")
    report.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        write_jsonl(report / f"samples_{kind}.jsonl", samples[kind])
    write_jsonl(report / "samples_dropped.jsonl", drops)
    return {**total.as_metrics(), "kinds": per_kind, "repairs": dict(sorted(stats.items())),
            "sources": {k: dict(sources[k]) for k in KINDS}}


def main(argv: list[str] | None = None) -> int:
    return run_stage("collect", CollectConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
