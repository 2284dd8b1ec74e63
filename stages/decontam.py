"""decontam: remove every training record that shares a run of tokens with an evaluation item.

Reads the shards of `data/clean/` and the evaluation sets `evaluate` scores (`evaluate.tasks`);
writes the kept records to the same shards of `data/decontam/`, the removed ones, with the
benchmark and items they overlap, to `data/contaminated/` (README: "The data stages").

    python -m stages.decontam [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from stages.common import benchmarks
from stages.common.benchmarks import EvaluationSets
from stages.common.config import Paths, StageConfig
from stages.common.datastage import DataStage, write_verdicts
from stages.common.io import Drop, record_text, write_jsonl
from stages.common.runner import run_stage
from stages.common.shards import DataConfig, ShardTask, read_shard

log = logging.getLogger("llm_forge.decontam")

READS = {"evaluate": EvaluationSets,  # the evaluation sets are the ones evaluate scores
         "data": DataConfig}  # how the shards run (no dvc.yaml param: it never changes the output)


class DecontamConfig(StageConfig):
    samples: int = Field(ge=0)
    """Removed records written to `reports/decontam/samples_dropped.jsonl`."""


def reason(task: str) -> str:
    return f"overlaps_{task}"


def evaluation_sets(evaluate: EvaluationSets) -> tuple[dict[str, list[benchmarks.Item]], dict[str, str]]:
    """task -> the items a model may be scored on, and task -> why it has none."""
    manager = benchmarks.task_manager(evaluate.task_dir, evaluate.tasks)
    built, skipped = benchmarks.load_tasks(manager, evaluate.tasks, evaluate.task_dir)
    sets = {name: benchmarks.items(name, tasks, evaluate.holdout if evaluate.tasks[name].holdout else None)
            for name, tasks in built.items()}
    return sets, skipped


def check(text: str, index: dict[int, set[str]], n: int, tasks: list[str]) -> Drop | None:
    """A Drop naming the benchmark (the first of `tasks` it overlaps) and the items, or None."""
    hits: set[str] = set()
    for gram in benchmarks.ngrams(text, n):
        hits |= index.get(gram, set())
    if not hits:
        return None
    task = next(t for t in tasks if any(h.startswith(f"{t}/") for h in hits))
    shown = sorted(hits)
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return Drop(reason(task), f"shares a {n}-token run with {', '.join(shown[:3])}{more}")


@dataclass(frozen=True)
class Sets:
    """What every worker checks against: the evaluation items, indexed by each worker itself
    (the index holds Python's string hashes, which differ from process to process)."""

    sets: dict[str, list[benchmarks.Item]]
    n: int
    key: str
    samples: int

    def index(self) -> dict[int, set[str]]:
        if self.key not in _INDEX:
            _INDEX.clear()
            _INDEX[self.key] = benchmarks.item_index(self.sets, self.n)
        return _INDEX[self.key]


_INDEX: dict[str, dict[int, set[str]]] = {}


def decontam_shard(task: ShardTask, sets: Sets) -> dict[str, Any]:
    """One shard into its `decontam` and `contaminated` outputs; returns its tally and the first
    samples."""
    index, tasks = sets.index(), list(sets.sets)
    records = read_shard(task.source).to_pylist()
    verdicts = [check(record_text(task.kind, r), index, sets.n, tasks) or r for r in records]
    sorted_ = write_verdicts(task, records, verdicts, "decontam", "contaminated")
    samples = [{"kind": task.kind, **{k: v for k, v in row.items() if k != "record"},
                "text": record_text(task.kind, record)[:500]} for record, row in sorted_.dropped[: sets.samples]]
    return {**sorted_.tally.as_metrics(), "samples": samples}


def run(cfg: DecontamConfig, paths: Paths, evaluate: EvaluationSets, data: DataConfig) -> dict[str, Any]:
    started = time.perf_counter()
    n = evaluate.contamination_ngram
    sets, skipped = evaluation_sets(evaluate)
    unchecked = {name: sum(1 for item in found if len(benchmarks.tokens(item.text)) < n)
                 for name, found in sets.items()}
    items = sorted((name, item.id, item.text) for name, found in sets.items() for item in found)
    key = json.dumps([cfg.model_dump(mode="json"), n, items], ensure_ascii=False)
    context = Sets(sets, n, hashlib.sha256(key.encode()).hexdigest(), cfg.samples)
    log.info("evaluation items: %s (%d distinct %d-token runs)", {k: len(v) for k, v in sets.items()},
             len(context.index()), n)
    stage = DataStage("decontam", paths.clean, {"decontam": paths.decontam, "contaminated": paths.contaminated}, data)
    results = stage.run(decontam_shard, context, key=key)
    tallies = stage.tallies(results)
    for kind, tally in tallies.items():
        log.info("decontam %s: %d in, %d out, dropped %s", kind, tally.docs_in, tally.docs_out, dict(tally.dropped))
    stage.publish()
    samples = stage.samples(results, "samples", cfg.samples)[None]
    write_jsonl(paths.report_dir("decontam") / "samples_dropped.jsonl", samples)
    metrics = stage.metrics(tallies)
    return {**metrics, "ngram": n, "eval_items": {name: len(found) for name, found in sets.items()},
            "unchecked_items": unchecked, "skipped": skipped,
            "docs_per_second": round(metrics["docs_in"] / max(time.perf_counter() - started, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    return run_stage("decontam", DecontamConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
