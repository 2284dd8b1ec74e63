"""The skeleton of a data stage, in the spirit of datatrove's `BaseFilter`: a stage says what it does
to one shard and what it tallies; `DataStage` owns the rest (tasks, executor and resume through
`shards.run_shards`, per-kind tallies, capped samples, publishing the outputs whole, clean-up).
A filtering stage's shard function hands its verdicts to `write_verdicts`, which counts and writes
what is kept and what is dropped, so no stage counts a record itself."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.io import KINDS, Drop, Tally, atomic_dir, quarantine_row, quarantine_table, records_table
from stages.common.shards import DataConfig, Fn, ShardTask, parts_dir, run_shards, shard_path, tasks_for, write_table


@dataclass
class Verdicts:
    """One shard's records sorted by their verdicts, in record order: (record, kept record) and
    (record, quarantine row)."""

    tally: Tally
    kept: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    dropped: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)


def write_verdicts(task: ShardTask, records: Sequence[dict[str, Any]], verdicts: Sequence[dict[str, Any] | Drop],
                   kept: str, dropped: str) -> Verdicts:
    """Each record's verdict (the record to keep, or a Drop): the kept ones to the task's output
    `kept`, the dropped ones as quarantine rows to its output `dropped`; returns them, counted."""
    out = Verdicts(Tally())
    for record, verdict in zip(records, verdicts, strict=True):
        if isinstance(verdict, Drop):
            out.tally.drop(verdict.reason)
            out.dropped.append((record, quarantine_row(record, verdict)))
        else:
            out.kept.append((record, verdict))
    out.tally.docs_in, out.tally.docs_out = len(records), len(out.kept)
    extra = ("lang",) if task.kind == "corpus" else ()
    write_table(task.out(kept), records_table(task.kind, [r for _, r in out.kept], extra=extra))
    write_table(task.out(dropped), quarantine_table([row for _, row in out.dropped]))
    return out


class DataStage:
    """Stage `name` over the shards of `kinds` in `source`, writing the folders of `outputs`
    (shard output name -> final folder): every shard's output N goes to shard N of its folder.
    A stage whose shards make one output together (tokenize packs them into one dataset) writes
    it itself and calls `clean_up`."""

    def __init__(self, name: str, source: Path, outputs: Mapping[str, Path], data: DataConfig,
                 kinds: Sequence[str] = KINDS) -> None:
        self.name, self.outputs, self.data, self.kinds = name, dict(outputs), data, tuple(kinds)
        self.parts = parts_dir(next(iter(self.outputs.values())))
        self.tasks = tasks_for(source, self.parts, self.kinds)

    def run(self, fn: Fn, context: Any, key: str, tasks: list[ShardTask] | None = None,
            step: str | None = None) -> list[dict[str, Any]]:
        """`fn(task, context)` over every task (or `tasks`), resumed from an earlier run under
        the same `key`; the results in task order. A stage of several steps names each `step`."""
        tasks = self.tasks if tasks is None else tasks
        return run_shards(f"{self.name} {step}" if step else self.name, fn, tasks, self.data, context, key=key)

    def tallies(self, results: Sequence[Mapping[str, Any]]) -> dict[str, Tally]:
        """Kind -> the tally of its shards' results (`Tally.as_metrics` of each)."""
        out = {kind: Tally() for kind in self.kinds}
        for task, result in zip(self.tasks, results, strict=True):
            out[task.kind].merge(Tally.from_metrics(result))
        return out

    def metrics(self, tallies: Mapping[str, Tally], **per_kind: Mapping[str, Any]) -> dict[str, Any]:
        """The stage's tally metrics: the total, each kind's (with its `per_kind` figures), the shards."""
        total = Tally()
        for tally in tallies.values():
            total.merge(tally)
        kinds = {kind: {**tally.as_metrics(), **per_kind.get(kind, {})} for kind, tally in tallies.items()}
        return {**total.as_metrics(), "kinds": kinds, "shards": len(self.tasks)}

    def samples(self, results: Sequence[Mapping[str, Any]], name: str, cap: int,
                by_kind: bool = False) -> dict[Any, list[dict[str, Any]]]:
        """The samples each result holds under `name` (a list, or group -> list), at most `cap` a
        group (by kind too when `by_kind`), taken in shard order: the same whichever worker
        finished first."""
        out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for task, result in zip(self.tasks, results, strict=True):
            found = result[name]
            for group, rows in found.items() if isinstance(found, dict) else [(None, found)]:
                taken = out[(task.kind, group) if by_kind else group]
                taken.extend(rows[: cap - len(taken)])
        return out

    @staticmethod
    def counts(results: Sequence[Mapping[str, Any]], name: str) -> Counter[str]:
        """The sum of the counters each result holds under `name`."""
        total: Counter[str] = Counter()
        for result in results:
            total.update(result[name])
        return total

    def publish(self) -> None:
        """Every output folder whole from the shards in the parts folder (`io.atomic_dir`), then
        the parts folder removed."""
        with contextlib.ExitStack() as stack:
            for name, final in self.outputs.items():
                tmp = stack.enter_context(atomic_dir(final))
                for task in self.tasks:
                    dest = shard_path(tmp, task.kind, task.index)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(task.out(name), dest)  # every finished task wrote it: a missing one is a bug, raised
        self.clean_up()

    def clean_up(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)


def checked(tallies: Mapping[str, Tally], written: Mapping[str, Tally], where: str) -> None:
    """A stage that decides its drops apart from writing them: the records each kind's shards
    wrote (`written`) must be those its decision kept (`tallies`)."""
    for kind, tally in tallies.items():
        got = written[kind]
        if (got.docs_in, got.docs_out) != (tally.docs_in, tally.docs_out):
            raise AssertionError(f"{where} {kind}: the shards read {got.docs_in} records and wrote {got.docs_out}, "
                                 f"where the decision counted {tally.docs_in} in and {tally.docs_out} kept")

