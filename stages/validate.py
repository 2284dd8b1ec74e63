"""validate: check the deduplicated data with a Great Expectations suite before any model sees it.

Reads `data/dedup/` (corpus, instructions, preferences) and runs one suite per kind: schema,
non-null fields, unique ids, text length bounds, no PII or secret left unredacted (the same
patterns `clean` redacts), and the corpus's language mix within the configured bounds. The suite
runs shard by shard, one Great Expectations batch per shard on the `data` section's executor, so
memory stays that of a shard however large the corpus; the shards' results are merged into one
verdict per expectation (counts summed, so a `mostly` share such as the language mix holds for the
whole kind), ids are checked unique across shards by a 64-bit hash of each, and the row count is
the kind's. Writes `reports/validate/report.json` (each expectation's merged result, and the
shards where it failed), `summary.md` and `verdict.json` (what tokenize depends on); the stage
fails, naming each failed expectation, when any expectation fails, so DVC and the flow stop.
The longest corpus document allowed is the limit
`clean` drops at, `clean.max_chars` (one key for one value: the runner hands validate that section).

    python -m stages.validate [--params params.yaml]
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import KINDS, SCHEMAS, write_json
from stages.common.pii import PATTERNS as PII_PATTERNS
from stages.common.runner import run_stage
from stages.common.sections import CleanLimits
from stages.common.shards import DataConfig, ShardTask, parts_dir, read_shard, run_shards, tasks_for, write_array

log = logging.getLogger("llm_forge.validate")

# the longest document allowed is the one clean lets through; `data`: how the shards run (no
# dvc.yaml param: it never changes the verdict)
READS = {"clean": CleanLimits, "data": DataConfig}


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
    """The expectations every shard of `kind` is checked against (the row count is the kind's,
    checked on the merged count: `row_count_expectation`)."""
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


@dataclass(frozen=True)
class Check:
    """What every shard is checked with."""

    cfg: ValidateConfig
    max_chars: int


_DEFINITIONS: dict[tuple[str, str, int, tuple[str, ...]], Any] = {}


def _definition(kind: str, check: Check, columns: tuple[str, ...]) -> Any:
    """The kind's suite as a Great Expectations validation definition over a pandas batch, made
    once per worker process (each shard's frame is handed to `run`)."""
    import great_expectations as gx

    key = (kind, check.cfg.model_dump_json(), check.max_chars, columns)
    if key not in _DEFINITIONS:
        ctx, name = _context(), f"{kind}-{len(_DEFINITIONS)}"  # names are unique in a context
        batch = ctx.data_sources.get("llm_forge").add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=build_suite(
            kind, check.cfg, list(columns), check.max_chars)))
        _DEFINITIONS[key] = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    return _DEFINITIONS[key]


@functools.cache
def _context() -> Any:
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.data_sources.add_pandas("llm_forge")
    return ctx


def validate_shard(task: ShardTask, check: Check) -> dict[str, Any]:
    """One shard through its kind's suite: each expectation's success and counts (and a few
    unexpected values); a 64-bit hash of each id to `ids/<kind>/part-N.npy`, for uniqueness
    across shards."""
    import numpy as np

    records = read_shard(task.source).to_pylist()
    df = text_columns(task.kind, records)
    # BASIC: the counts and the first unexpected values, all that a shard's result keeps (_compact);
    # the default, SUMMARY, also counts every unexpected value and lists their row indices
    result = _definition(task.kind, check, tuple(df.columns)).run(batch_parameters={"dataframe": df},
                                                                  result_format="BASIC")
    hashes = [int.from_bytes(hashlib.blake2b(str(i).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                             "little") for i in df["id"]]
    write_array(task.out("ids").with_suffix(".npy"), np.array(hashes, np.uint64))
    return {"docs_in": len(df), "results": [_compact(r.to_json_dict()) for r in result.results]}


def _compact(r: dict[str, Any]) -> dict[str, Any]:
    res = r.get("result") or {}
    return {"type": r["expectation_config"]["type"],
            "kwargs": {k: v for k, v in r["expectation_config"]["kwargs"].items() if k != "batch_id" and v is not None},
            "success": bool(r["success"]),
            "result": {k: res[k] for k in ("element_count", "missing_count", "unexpected_count", "observed_value")
                       if k in res} | {"examples": (res.get("partial_unexpected_list") or [])[:3]}}


def merge(shards: list[list[dict[str, Any]]], duplicate_ids: int, rows: int) -> list[dict[str, Any]]:
    """One result per expectation from the shards' results (in the suite's order): counts summed
    and `mostly` applied to the sums; ids unique across shards when no two hashes agree."""
    merged = []
    for k, first in enumerate(shards[0]):
        parts = [shard[k] for shard in shards]
        failed = [i for i, p in enumerate(parts) if not p["success"]]
        result: dict[str, Any] = {"examples": [e for p in parts for e in p["result"]["examples"]][:3]}
        if all("unexpected_count" in p["result"] for p in parts):
            for key in ("element_count", "missing_count", "unexpected_count"):
                result[key] = sum(p["result"].get(key, 0) for p in parts)
            if first["type"] == "expect_column_values_to_be_unique":
                result["unexpected_count"] = duplicate_ids
            counted = result["element_count"] - result["missing_count"]
            mostly = first["kwargs"].get("mostly", 1.0)
            success = counted == 0 or (counted - result["unexpected_count"]) / counted >= mostly
        else:
            result["observed_value"] = parts[0]["result"].get("observed_value")
            success = not failed
        merged.append({"type": first["type"], "kwargs": first["kwargs"], "success": success, "result": result,
                       "failed_shards": failed})
    return merged


def row_count_expectation(rows: int, min_docs: int) -> dict[str, Any]:
    """The corpus's row count against `min_docs` (Great Expectations' expect_table_row_count_to_be_between
    over the whole kind, from the shards' row counts)."""
    return {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": min_docs},
            "success": rows >= min_docs, "result": {"observed_value": rows, "examples": []}, "failed_shards": []}


def describe(kind: str, r: dict[str, Any]) -> str:
    res = r["result"]
    seen = res.get("examples") or res.get("observed_value")
    detail = f"{res['unexpected_count']} unexpected" if "unexpected_count" in res else f"observed {seen!r:.120}"
    example = f", e.g. {str(seen[0])[:80]!r}" if isinstance(seen, list) and seen else ""
    return f"{kind}: {r['type']}({r['kwargs']}) -> {detail}{example}"


# --- the stage -------------------------------------------------------------------------------


def run(cfg: ValidateConfig, paths: Paths, clean: CleanLimits, data: DataConfig) -> dict[str, Any]:
    """Validate `paths.dedup` shard by shard; the longest corpus document allowed is `clean.max_chars`."""
    import numpy as np
    import pyarrow.parquet as pq

    out = paths.report_dir("validate")
    out.mkdir(parents=True, exist_ok=True)
    parts = parts_dir(out / "report.json")
    rows = {kind: 0 for kind in KINDS}
    tasks = tasks_for(paths.dedup, parts, KINDS)
    for t in tasks:
        rows[t.kind] += pq.ParquetFile(t.source).metadata.num_rows
    # a pipeline without SFT or preference data has nothing to check there
    tasks = [t for t in tasks if rows[t.kind] or t.kind == "corpus"]
    check = Check(cfg, clean.max_chars)
    results = run_shards("validate", validate_shard, tasks, data, check,
                         key=f"{cfg.model_dump_json()}\x00{clean.max_chars}")

    report, failures = {}, []
    evaluated = 0
    for kind in KINDS:
        mine = [(t, r) for t, r in zip(tasks, results) if t.kind == kind]
        if not mine:
            continue
        ids = np.concatenate([np.load(t.out("ids").with_suffix(".npy")) for t, _ in mine])
        _, counts = np.unique(ids, return_counts=True)
        merged = merge([r["results"] for _, r in mine], int(counts[counts > 1].sum()), rows[kind])
        del ids, counts
        if kind == "corpus":
            merged.insert(2, row_count_expectation(rows[kind], cfg.min_docs))
        report[kind] = {"success": all(r["success"] for r in merged), "shards": len(mine), "rows": rows[kind],
                        "results": merged}
        evaluated += len(merged)
        failures += [describe(kind, r) for r in merged if not r["success"]]
        log.info("%s: %d rows in %d shards, %d expectations, %d failed", kind, rows[kind], len(mine), len(merged),
                 sum(not r["success"] for r in merged))
    shutil.rmtree(parts, ignore_errors=True)

    write_json(out / "report.json", report)
    lines = [f"# Validation of {paths.dedup}", "", f"{evaluated} expectations, {len(failures)} failed.", ""]
    lines += [f"- FAILED {f}" for f in failures] or ["All expectations passed."]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if failures:
        raise StageError(f"{len(failures)} of {evaluated} expectations failed (report: {out / 'report.json'}): "
                         + "; ".join(failures))
    counts_by_kind = {kind: rows[kind] for kind in KINDS}
    total = sum(counts_by_kind.values())
    # What tokenize depends on: it says only that this data passed, so a rerun of validate that
    # passes again (metrics.json holds timings) does not make every later stage stale.
    write_json(out / "verdict.json", {"success": True, "rows": counts_by_kind, "expectations": evaluated})
    return {"docs_in": total, "docs_out": total, "dropped": {}, "rows": counts_by_kind,
            "expectations": evaluated, "failed": 0, "success": True, "shards": len(tasks)}


def main(argv: list[str] | None = None) -> int:
    return run_stage("validate", ValidateConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
