"""BIG-bench tasks (`task.json`, or a folder of them) as instructions and preference pairs.

Instructions take each example's input and its best target; preferences pair the best-scored
answer of `target_scores` with each lower-scored one. A task that is also a benchmark (`holdout`)
gives only its training part: the examples whose `evaluate.holdout.key` field (the evaluation set's
records carry the same field) the shared salted hash does not keep for evaluation.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

from stages.common.benchmarks import HELD_OUT, Holdout
from stages.common.config import StageError
from stages.common.io import Drop
from stages.readers.base import Item, Source, existing
from stages.readers.safe import files_of, load


class BigBenchSource(Source):
    type: Literal["bigbench"]
    prompt_template: str = "{input}"
    """How the task input becomes the user's prompt (`{input}` is replaced)."""
    holdout: bool = False
    """The task is also a benchmark: keep only the examples `evaluate.holdout` leaves for training."""


def examples(src: BigBenchSource, where: str, stats: Counter[str],
             holdout: Holdout | None) -> Iterator[tuple[str, dict[str, Any]] | Drop]:
    """(`task/index`, example) for every example of the task (or of every task under a folder),
    without those `holdout` keeps for evaluation (counted in `stats`); a task file that is a
    symlink out of the folder, or over the size cap, is dropped."""
    path = existing(src, where)
    for file in files_of(path, "**/task.json"):
        if isinstance(file, Drop):
            yield file
            continue
        data = load(file, src.max_file_bytes)
        if isinstance(data, Drop):
            yield data
            continue
        try:
            task = json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StageError(f"{where}: {file} is not a BIG-bench task file ({err})") from None
        if "examples" not in task:
            if path.is_dir():
                continue  # a parent task: its subtasks' files hold the examples
            raise StageError(f"{where}: {file} is not a BIG-bench task file (no 'examples')")
        for i, ex in enumerate(task["examples"]):
            ex_id = f"{file.parent.name}/{i}"
            # an example without the key is not an evaluation item: it goes on to be dropped as malformed
            if src.holdout and holdout is not None and isinstance(ex.get(holdout.key), str) \
                    and holdout.for_evaluation(ex):
                stats[f"{HELD_OUT}.{src.name}"] += 1  # collect reports it per kind
                continue
            yield ex_id, ex


def ranked_answers(ex: dict[str, Any]) -> list[tuple[float, str]]:
    """(score, answer) of `target_scores`, best first."""
    scores = ex.get("target_scores")
    if isinstance(scores, dict):
        return sorted(((float(s), a) for a, s in scores.items()), key=lambda t: -t[0])
    return []


def read_instructions(src: BigBenchSource, where: str, stats: Counter[str],
                      holdout: Holdout | None = None) -> Iterator[Item]:
    for item in examples(src, where, stats, holdout):
        if isinstance(item, Drop):
            yield item
            continue
        ex_id, ex = item
        target = ex.get("target")
        answer = target[0] if isinstance(target, list) and target else target
        if not isinstance(answer, str):
            ranked = ranked_answers(ex)
            answer = ranked[0][1] if ranked else None
        if not isinstance(ex.get("input"), str) or not isinstance(answer, str):
            yield Drop("no_answer", f"{src.path}#{ex_id}")
            continue
        prompt = src.prompt_template.replace("{input}", ex["input"])
        yield {"id": ex_id, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def read_preferences(src: BigBenchSource, where: str, stats: Counter[str],
                     holdout: Holdout | None = None) -> Iterator[Item]:
    for item in examples(src, where, stats, holdout):
        if isinstance(item, Drop):
            yield item
            continue
        ex_id, ex = item
        ranked = ranked_answers(ex)
        if len(ranked) < 2 or not isinstance(ex.get("input"), str):
            yield Drop("no_pair", f"{src.path}#{ex_id}")
            continue
        best_score, best = ranked[0]
        for j, (score, worse) in enumerate(ranked[1:], 1):
            if score < best_score:
                yield {"id": f"{ex_id}/{j}", "prompt": src.prompt_template.replace("{input}", ex["input"]),
                       "chosen": best, "rejected": worse}
