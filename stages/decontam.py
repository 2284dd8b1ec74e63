"""decontam: remove every training record that overlaps an evaluation set, before any model sees it.

Reads `data/clean/` (corpus, instructions, preferences) and the evaluation sets that `evaluate`
scores (the lm-eval tasks of `evaluate.tasks` in `evaluate.task_dir`; for a task marked `holdout`,
only its evaluation part, since collect kept the other part for training). A record whose text
shares a run of `evaluate.contamination_ngram` tokens (words; a CJK character counts as one) with
any evaluation item, prompt and gold answer together, is removed: the GPT-3 paper's 13-gram test,
run on the training side. Each removal is counted per benchmark under `dropped`
(`overlaps_<task>`), and the record goes to `data/contaminated/<kind>/` with the benchmark and the item it overlaps.
Writes the kept records to `data/decontam/` in the shards of `data/clean/`, shard by shard on the
`data` section's executor. An evaluation item shorter than the run cannot be matched; each set's count of
those is in `unchecked_items`. A task that is missing or empty is skipped and named in `skipped`:
its items are not checked, and the stage still runs.

    python -m stages.decontam [--params params.yaml]
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from stages.common import benchmarks
from stages.common.benchmarks import EvaluationSets
from stages.common.config import Paths, StageConfig
from stages.common.io import (
    KINDS,
    Drop,
    Tally,
    atomic_dir,
    quarantine_row,
    quarantine_table,
    record_text,
    records_table,
    write_jsonl,
)
from stages.common.runner import run_stage
from stages.common.shards import (
    DataConfig,
    ShardTask,
    parts_dir,
    publish,
    read_shard,
    run_shards,
    tasks_for,
    write_table,
)

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
    """One shard: records no evaluation item overlaps to its `decontam` output, the others to its
    `contaminated` output; returns the counts and the first samples."""
    tally, kept, removed, samples = Tally(), [], [], []
    index, tasks = sets.index(), list(sets.sets)
    for record in read_shard(task.source).to_pylist():
        tally.docs_in += 1
        drop = check(record_text(task.kind, record), index, sets.n, tasks)
        if drop is None:
            kept.append(record)
            tally.docs_out += 1
            continue
        tally.drop(drop.reason)
        removed.append(quarantine_row(record, drop))
        if len(samples) < sets.samples:
            samples.append({"kind": task.kind, **{k: v for k, v in removed[-1].items() if k != "record"},
                            "text": record_text(task.kind, record)[:500]})
    tally.check(f"decontam {task.label}")
    write_table(task.out("decontam"), records_table(task.kind, kept, extra=("lang",) if task.kind == "corpus" else ()))
    write_table(task.out("contaminated"), quarantine_table(removed))
    return {**tally.as_metrics(), "samples": samples}


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
    parts = parts_dir(paths.decontam)
    tasks = tasks_for(paths.clean, parts, KINDS)
    results = run_shards("decontam", decontam_shard, tasks, data, context, key=key)

    total, kinds = Tally(), {}
    samples: list[dict[str, Any]] = []
    for kind in KINDS:
        tally = Tally()
        for task, result in zip(tasks, results):
            if task.kind == kind:
                tally.merge(Tally.from_metrics(result))
                samples.extend(result["samples"][: cfg.samples - len(samples)])
        tally.check(f"decontam {kind}")
        kinds[kind] = tally.as_metrics()
        total.merge(tally)
        log.info("decontam %s: %d in, %d out, dropped %s", kind, tally.docs_in, tally.docs_out, dict(tally.dropped))
    total.check("decontam")
    with atomic_dir(paths.decontam) as kept_dir, atomic_dir(paths.contaminated) as removed_dir:
        publish(tasks, "decontam", kept_dir)
        publish(tasks, "contaminated", removed_dir)
    shutil.rmtree(parts, ignore_errors=True)
    write_jsonl(paths.report_dir("decontam") / "samples_dropped.jsonl", samples)
    return {**total.as_metrics(), "kinds": kinds, "shards": len(tasks), "ngram": n,
            "eval_items": {name: len(found) for name, found in sets.items()},
            "unchecked_items": unchecked, "skipped": skipped,
            "docs_per_second": round(total.docs_in / max(time.perf_counter() - started, 1e-9), 1)}


def main(argv: list[str] | None = None) -> int:
    return run_stage("decontam", DecontamConfig, run, argv, reads=READS)


if __name__ == "__main__":
    sys.exit(main())
