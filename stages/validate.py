"""validate: check the deduplicated data with a Great Expectations suite before any model sees it.

Reads `data/dedup/` (corpus, instructions, preferences) and runs one suite per kind: schema,
non-null fields, unique ids, text length bounds, no PII or secret left unredacted (the same
patterns `clean` redacts), and the corpus's language mix within the configured bounds. Writes
`reports/validate/report.json` (the full Great Expectations result), `summary.md` and `verdict.json`
(what tokenize depends on); the stage fails, naming each failed expectation, when any
expectation fails, so DVC and the flow stop. The longest corpus document allowed is the limit
`clean` drops at, `clean.max_chars` (one key for one value: the runner hands validate that section).

    python -m stages.validate [--params params.yaml]
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pydantic import Field

from stages.clean import CleanConfig
from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import KINDS, SCHEMAS, read_records, write_json
from stages.common.pii import PATTERNS as PII_PATTERNS
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.validate")

READS = {"clean": CleanConfig}  # the longest document allowed is the one clean lets through


class ValidateConfig(StageConfig):
    min_docs: int = Field(ge=1)
    """Fewest corpus documents the pipeline may go on with."""
    min_chars: int = Field(ge=0)
    """Shortest corpus document allowed, in characters (the longest is `clean.max_chars`)."""
    languages: dict[str, tuple[float, float]]
    """Allowed corpus languages, each with the [min, max] share of documents it may hold."""
    pii: bool
    """Fail when a PII or secret pattern is still found in any text."""


# --- the steps -------------------------------------------------------------------------------


def text_columns(kind: str, records: list[dict[str, Any]]) -> Any:
    """The kind's records as a DataFrame with one string column per text field."""
    import pandas as pd

    if kind == "instructions":
        rows = [{"id": r["id"], "source": r["source"],
                 "prompt": "\n".join(m["content"] for m in r["messages"] if m["role"] != "assistant"),
                 "answer": "\n".join(m["content"] for m in r["messages"] if m["role"] == "assistant")}
                for r in records]
        return pd.DataFrame(rows, columns=["id", "source", "prompt", "answer"])
    columns = [c for c in SCHEMAS[kind].names] + (["lang"] if kind == "corpus" else [])
    return pd.DataFrame(records, columns=columns)


def build_suite(kind: str, cfg: ValidateConfig, columns: list[str], max_chars: int) -> list[Any]:
    import great_expectations.expectations as gxe

    text_fields = [c for c in columns if c not in ("id", "source", "lang")]
    exps: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
    ]
    for col in ("id", "source", *text_fields):
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
    if cfg.pii:
        for col in text_fields:
            for name, pattern in PII_PATTERNS.items():
                exps.append(gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=pattern.pattern,
                                                                  meta={"pii": name}))
    if kind == "corpus":
        exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_docs))
        exps.append(gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_chars,
                                                            max_value=max_chars))
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=sorted(cfg.languages)))
        for lang, (lo, hi) in cfg.languages.items():
            # share >= lo: at least lo of the values are `lang`; share <= hi: at least 1-hi are not.
            if lo > 0:
                exps.append(gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=[lang], mostly=lo))
            if hi < 1:
                exps.append(gxe.ExpectColumnValuesToNotBeInSet(column="lang", value_set=[lang], mostly=1 - hi))
    return exps


def describe(kind: str, r: Any) -> str:
    cfg = r.expectation_config
    args = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",) and v is not None}
    res = r.result or {}
    seen = res.get("partial_unexpected_list") or res.get("observed_value")
    detail = f"{res.get('unexpected_count')} unexpected" if "unexpected_count" in res else f"observed {seen!r:.120}"
    example = f", e.g. {str(seen[0])[:80]!r}" if isinstance(seen, list) and seen else ""
    return f"{kind}: {cfg.type}({args}) -> {detail}{example}"


# --- the stage -------------------------------------------------------------------------------


def run(cfg: ValidateConfig, paths: Paths, clean: CleanConfig) -> dict[str, Any]:
    """Validate `paths.dedup`; the longest corpus document allowed is `clean.max_chars`."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    source = ctx.data_sources.add_pandas("llm_forge")
    report, failures, counts = {}, [], {}
    evaluated = 0
    for kind in KINDS:
        records = read_records(paths.dedup, kind)
        counts[kind] = len(records)
        if not records and kind != "corpus":
            continue  # a pipeline without SFT or preference data has nothing to check there
        df = text_columns(kind, records)
        batch = source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe("all")
        expectations = build_suite(kind, cfg, list(df.columns), clean.max_chars)
        suite = ctx.suites.add(gx.ExpectationSuite(name=kind, expectations=expectations))
        definition = ctx.validation_definitions.add(gx.ValidationDefinition(name=kind, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": df})
        report[kind] = result.to_json_dict()
        evaluated += len(result.results)
        failures += [describe(kind, r) for r in result.results if not r.success]
        log.info("%s: %d rows, %d expectations, %d failed", kind, len(df), len(result.results),
                 sum(not r.success for r in result.results))

    out = paths.report_dir("validate")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    lines = [f"# Validation of {paths.dedup}", "", f"{evaluated} expectations, {len(failures)} failed.", ""]
    lines += [f"- FAILED {f}" for f in failures] or ["All expectations passed."]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if failures:
        raise StageError(f"{len(failures)} of {evaluated} expectations failed (report: {out / 'report.json'}): "
                         + "; ".join(failures))
    total = sum(counts.values())
    # What tokenize depends on: it says only that this data passed, so a rerun of validate that
    # passes again (metrics.json holds timings) does not make every later stage stale.
    write_json(out / "verdict.json", {"success": True, "rows": counts, "expectations": evaluated})
    return {"docs_in": total, "docs_out": total, "dropped": {}, "rows": counts,
            "expectations": evaluated, "failed": 0, "success": True}


def main(argv: list[str] | None = None) -> int:
    return run_stage("validate", ValidateConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
