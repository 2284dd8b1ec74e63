"""clean: repair, de-markup, redact and filter every record (README: "The data stages").

Reads the shards of `paths.raw`; writes each kept record to the same shard of `paths.clean` (the
corpus gains `lang`), each dropped one with its reason to `paths.quarantine`, and samples of both
and of the removed lines to `reports/clean/`.

    python -m stages.clean [--params params.yaml]
"""

from __future__ import annotations

import functools
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from stages.common.config import Paths, StageConfig
from stages.common.datastage import DataStage, write_verdicts
from stages.common.io import Drop, write_jsonl
from stages.common.langid import LanguageId
from stages.common.markup import Markup, strip_markup
from stages.common.pii import redact
from stages.common.quality import (
    Doc,
    LineCut,
    LineRule,
    Rule,
    corpus_rules,
    line_rules,
    remove_lines,
    too_little_left,
)
from stages.common.runner import run_stage
from stages.common.sections import CleanLimits
from stages.common.shards import DataConfig, ShardTask, read_shard
from stages.common.text import repair, tidy

log = logging.getLogger("llm_forge.clean")

READS = {"data": DataConfig}  # how the shards run (no dvc.yaml param: it never changes the output)


class CleanConfig(CleanLimits, StageConfig):
    """The `clean` section: its size limit (stages/common/sections.py, validate checks it) plus these."""

    # --- repair and markup ---
    unicode_form: Literal["NFC", "NFKC"] | None
    """Unicode normal form applied to every text (NFKC also folds full-width forms; null: none)."""
    fix_mojibake: bool
    """Repair encoding damage with ftfy (full-width CJK punctuation and curly quotes are kept)."""
    markup: dict[str, Markup]
    """Markup of each corpus source, by source name: mediawiki, html, text or auto."""
    default_markup: Markup
    """Markup of a corpus source the map does not name; auto detects HTML and wikitext."""
    wiki_drop_sections: list[str]
    """Wiki sections dropped whole, matched by heading title (case-insensitive)."""
    redact_pii: bool
    """Replace PII and secrets with placeholders such as <EMAIL> (patterns in stages.common.pii)."""
    # --- language ---
    languages: list[str]
    """Corpus languages kept (ISO 639-1 codes from py3langid); empty: any language."""
    min_lang_confidence: float = Field(ge=0, le=1)
    """Lowest language-identification probability for a corpus document to be kept."""
    language_aliases: dict[str, str]
    """Identifier labels read as another code (py3langid labels some standard Chinese news 'wuu')."""
    # --- Gopher quality (words: whitespace tokens; each CJK character is one word) ---
    min_words: int | None
    """Fewest words in a corpus document (null: no rule)."""
    max_words: int | None
    """Most words in a corpus document (null: no rule)."""
    min_mean_word_length: float | None
    """Shortest mean word length in characters; not applied to CJK documents (null: no rule)."""
    max_mean_word_length: float | None
    """Longest mean word length in characters; not applied to CJK documents (null: no rule)."""
    max_symbol_word_ratio: float | None
    """Most '#' and ellipses per word (null: no rule)."""
    min_alpha_word_fraction: float | None
    """Smallest share of tokens that hold a letter (null: no rule)."""
    max_digit_fraction: float | None
    """Largest share of non-space characters that are digits (null: no rule)."""
    max_bullet_line_fraction: float | None
    """Largest share of lines that start with a bullet (null: no rule)."""
    max_ellipsis_line_fraction: float | None
    """Largest share of lines that end with an ellipsis (null: no rule)."""
    drop_phrases: list[str]
    """A document holding one of these phrases (case-insensitive) drops, C4-style ("lorem ipsum")."""
    # --- C4 line rules: a line they name is removed; the document goes only when too little is left ---
    remove_unpunctuated_lines: bool
    """Remove lines ending without terminal punctuation (menus, buttons, headings), as C4 does."""
    prose_line_min_words: int = Field(ge=1)
    """An unpunctuated line of this many words that holds a sentence end is prose and stays."""
    remove_letterless_lines: bool
    """Remove lines without a letter (digit rows, rules, symbol soup)."""
    line_drop_phrases: dict[str, list[str]]
    """Reason -> phrases: a line holding one (case-insensitive) is removed and counted under the reason."""
    min_kept_fraction: float = Field(ge=0, le=1)
    """Smallest share of its words (and min_words) the line rules must leave a document, else it drops."""
    stop_words: dict[str, list[str]]
    """Stop words per language; a document of a listed language must hold min_stop_words of them."""
    min_stop_words: int
    """Fewest stop-word occurrences a document of a language in `stop_words` must hold."""
    # --- Gopher repetition ---
    max_dup_line_fraction: float | None
    """Largest share of lines that repeat an earlier line (null: no rule)."""
    max_dup_line_char_fraction: float | None
    """Largest share of characters in repeated lines (null: no rule)."""
    max_dup_paragraph_fraction: float | None
    """Largest share of paragraphs that repeat an earlier paragraph (null: no rule)."""
    max_dup_paragraph_char_fraction: float | None
    """Largest share of characters in repeated paragraphs (null: no rule)."""
    max_top_ngram_fraction: dict[int, float]
    """n -> largest share of word characters covered by the most frequent n-gram."""
    max_dup_ngram_fraction: dict[int, float]
    """n -> largest share of word characters inside n-grams that occur more than once."""
    cjk_ngram_scale: int = Field(ge=1)
    """CJK documents count n-grams in characters: an n-word rule looks at n x this many characters."""
    # --- reporting ---
    samples: int
    """Kept records written to reports/clean/samples_kept.jsonl."""
    samples_per_reason: int
    """Dropped records per reason written to reports/clean/samples_dropped.jsonl."""


# --- the steps -------------------------------------------------------------------------------


@dataclass
class Cleaner:
    """Cleans one record of any kind: returns the cleaned record, or a Drop."""

    cfg: CleanConfig
    langid: LanguageId | None = None
    rules: list[Rule] = field(default_factory=list)
    line_rules: list[LineRule] = field(default_factory=list)
    redacted: Counter[str] = field(default_factory=Counter)
    lines_removed: Counter[str] = field(default_factory=Counter)  # from kept documents, by reason
    line_samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    def __post_init__(self) -> None:
        self.rules = corpus_rules(self.cfg)
        self.line_rules = line_rules(self.cfg)

    def text(self, text: str | None) -> tuple[str, Counter[str]]:
        """`text` repaired and (when configured) redacted, with the count of each PII found."""
        text = repair(text or "", self.cfg.unicode_form, self.cfg.fix_mojibake)
        counts: Counter[str] = Counter()
        if self.cfg.redact_pii:
            text, found = redact(text)
            counts.update(found)
        return text, counts

    def too_long(self, size: int) -> Drop | None:
        # Checked before any work: a huge record must not stall the stage.
        return Drop("too_long", f"{size} chars > {self.cfg.max_chars}") if size > self.cfg.max_chars else None

    def fields(self, fields: list[tuple[str, str | None, bool]]) -> tuple[list[str], Counter[str]] | Drop:
        """Each (label, text, is_answer) cleaned by `text`, or a Drop for the first one left empty."""
        counts: Counter[str] = Counter()
        out = []
        for label, text, answer in fields:
            cleaned, found = self.text(text)
            counts.update(found)
            if not cleaned.strip():
                return Drop("empty_answer" if answer else "empty_prompt", f"{label} is empty")
            out.append(cleaned)
        return out, counts

    def corpus(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        return self.corpus_many([record])[0]

    def corpus_many(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | Drop]:
        """`corpus` of each record: the text work record by record, the language identification
        of all of them in one batch (`LanguageId.many`), then the document rules."""
        prepared = [self._prepare(record) for record in records]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, Drop)]
        texts = [prepared[i][0].text for i in todo]  # type: ignore[index]
        found = self.langid.many(texts) if self.langid else [("", 1.0)] * len(texts)
        out: list[dict[str, Any] | Drop] = list(prepared)  # type: ignore[arg-type]
        for i, (lang, conf) in zip(todo, found):
            cut, counts = prepared[i]  # type: ignore[misc]
            out[i] = self._judge(records[i], cut, counts, self.cfg.language_aliases.get(lang, lang), conf)
        return out

    def _prepare(self, record: dict[str, Any]) -> tuple[LineCut, Counter[str]] | Drop:
        """A corpus text repaired, without markup, redacted and without the lines the line rules
        name (with the PII counts), or why it drops before its language is known."""
        raw = record.get("text") or ""
        if dropped := self.too_long(len(raw)):
            return dropped
        text = repair(raw, self.cfg.unicode_form, self.cfg.fix_mojibake)
        markup = self.cfg.markup.get(record.get("source") or "", self.cfg.default_markup)
        try:
            text = strip_markup(text, markup, self.cfg.wiki_drop_sections)
        except Exception as err:  # a page the parser cannot read is quarantined, not fatal
            return Drop("markup_error", f"{markup}: {type(err).__name__}: {err}"[:200])
        text = tidy(text)
        counts: Counter[str] = Counter()
        if self.cfg.redact_pii:
            text, found = redact(text)
            counts.update(found)
        if not text.strip():
            return Drop("empty", f"no text left after {markup} cleaning")
        cut = remove_lines(text, self.line_rules)
        if dropped := too_little_left(cut, self.cfg.min_kept_fraction, self.cfg.min_words):
            return dropped
        return cut, counts

    def _judge(self, record: dict[str, Any], cut: LineCut, counts: Counter[str], lang: str,
               conf: float) -> dict[str, Any] | Drop:
        """The document rules on what the line rules left; a kept record is counted in the report."""
        doc = Doc(cut.text, lang, conf, cut.words)
        for rule in self.rules:
            if dropped := rule(doc):
                return dropped
        self.redacted.update(counts)
        self.lines_removed.update(cut.lines)
        for reason, line in cut.examples.items():  # a few removed lines per reason, for the report
            if len(samples := self.line_samples[reason]) < self.cfg.samples_per_reason:
                samples.append({"id": record.get("id"), "source": record.get("source"), "reason": reason, "line": line})
        return {**record, "text": cut.text, "lang": lang}

    def instructions(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        messages = record.get("messages") or []
        if dropped := self.too_long(sum(len(m.get("content") or "") for m in messages)):
            return dropped
        if not any(m.get("role") == "assistant" for m in messages):
            return Drop("no_answer", f"roles {[m.get('role') for m in messages]} hold no assistant message")
        result = self.fields([(f"message {i} ({m.get('role')})", m.get("content"), m.get("role") == "assistant")
                              for i, m in enumerate(messages)])
        if isinstance(result, Drop):
            return result
        contents, counts = result
        self.redacted.update(counts)
        return {**record, "messages": [{**m, "content": c} for m, c in zip(messages, contents)]}

    def preferences(self, record: dict[str, Any]) -> dict[str, Any] | Drop:
        names = ("prompt", "chosen", "rejected")
        if dropped := self.too_long(sum(len(record.get(f) or "") for f in names)):
            return dropped
        result = self.fields([(name, record.get(name), name != "prompt") for name in names])
        if isinstance(result, Drop):
            return result
        texts, counts = result
        if texts[1].strip() == texts[2].strip():
            return Drop("identical_pair", "chosen == rejected")
        self.redacted.update(counts)
        return {**record, **dict(zip(names, texts))}




def _preview(kind: str, record: dict[str, Any], limit: int = 500) -> str:
    if kind == "instructions":
        text = "\n\n".join(f"[{m.get('role')}] {m.get('content') or ''}" for m in record.get("messages") or [])
    elif kind == "preferences":
        text = f"{record.get('prompt')}\n\n[chosen] {record.get('chosen')}\n\n[rejected] {record.get('rejected')}"
    else:
        text = record.get("text") or ""
    return text if len(text) <= limit else text[:limit] + "…"


# --- the stage -------------------------------------------------------------------------------


@functools.cache
def _langid() -> LanguageId:
    return LanguageId()  # loads its model once per worker process


def clean_shard(task: ShardTask, cfg: CleanConfig) -> dict[str, Any]:
    """Clean one shard into its `clean` and `quarantine` outputs; returns its tally, its counts
    and the first samples of each group."""
    cleaner = Cleaner(cfg, _langid())
    records = read_shard(task.source).to_pylist()
    results = (cleaner.corpus_many(records) if task.kind == "corpus"
               else [getattr(cleaner, task.kind)(record) for record in records])
    sorted_ = write_verdicts(task, records, results, "clean", "quarantine")
    languages: Counter[str] = Counter()
    kept_samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    dropped_samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record, result in sorted_.kept:
        if task.kind == "corpus":
            languages[result["lang"]] += 1
        group = kept_samples[record.get("source") or ""]
        if len(group) < cfg.samples:
            group.append({"kind": task.kind, "id": result.get("id"), "source": result.get("source"),
                          **({"lang": result["lang"]} if task.kind == "corpus" else {}),
                          "text": _preview(task.kind, result)})
    for record, row in sorted_.dropped:
        if len(group := dropped_samples[row["reason"]]) < cfg.samples_per_reason:
            where = {k: v for k, v in row.items() if k != "record"}
            group.append({"kind": task.kind, **where, "text": _preview(task.kind, record)})
    return {**sorted_.tally.as_metrics(), "languages": dict(languages), "redacted": dict(cleaner.redacted),
            "lines_removed": dict(cleaner.lines_removed), "line_samples": dict(cleaner.line_samples),
            "kept_samples": dict(kept_samples), "dropped_samples": dict(dropped_samples)}


def run(cfg: CleanConfig, paths: Paths, data: DataConfig) -> dict:
    report = paths.report_dir("clean")
    report.mkdir(parents=True, exist_ok=True)
    stage = DataStage("clean", paths.raw, {"clean": paths.clean, "quarantine": paths.quarantine}, data)
    results = stage.run(clean_shard, cfg, key=cfg.model_dump_json())
    stage.publish()

    # Kept samples spread over every (kind, source), round robin.
    groups = list(stage.samples(results, "kept_samples", cfg.samples, by_kind=True).values())
    spread = [g[i] for i in range(cfg.samples) for g in groups if i < len(g)][: cfg.samples]
    write_jsonl(report / "samples_kept.jsonl", spread)
    for name, found in (("dropped", "dropped_samples"), ("lines_removed", "line_samples")):
        by_reason = stage.samples(results, found, cfg.samples_per_reason)
        write_jsonl(report / f"samples_{name}.jsonl", [s for r in sorted(by_reason) for s in by_reason[r]])
    return {**stage.metrics(stage.tallies(results)),
            "redacted": dict(sorted(stage.counts(results, "redacted").items())),
            "lines_removed": dict(sorted(stage.counts(results, "lines_removed").items())),
            "languages": dict(stage.counts(results, "languages").most_common())}


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", CleanConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
