"""The evaluation sets, as the stages that keep them apart from training see them.

evaluate scores the lm-eval tasks of `evaluate.tasks` (YAMLs in `evaluate.task_dir`); decontam
removes every training record that shares a run of `evaluate.contamination_ngram` tokens with one of their items
(the n-gram overlap test of the GPT-3 paper), and evaluate repeats the check on what it scores.
A source that feeds both training and evaluation (hhh_alignment: its preferred answers are SFT
targets and reward-model pairs, and it is a benchmark) is split once by a salted hash of the item
field both sides hold (`evaluate.holdout.key`: the prompt, so that items asking the same question
land on the same side): collect keeps the training part, evaluate scores the evaluation part.

Tokens are lowercased words, and each CJK character is a token of its own (CJK text has no spaces),
so a run of `ngram` tokens is that many words, or that many characters of Chinese.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common.config import SectionPart, StageConfig, StageError
from stages.common.io import is_val
from stages.common.text import CJK

log = logging.getLogger("llm_forge.benchmarks")

HELD_OUT = "held_out_for_evaluation"
"""collect's metric (per kind and source) of the examples a benchmark source kept for evaluation."""

TOKEN = re.compile(rf"[{CJK}]|(?:(?![{CJK}])\w)+")


class Holdout(StageConfig):
    """How a source shared by training and evaluation is split (`evaluate.holdout`)."""

    key: str
    """The item field hashed: the source's examples and the evaluation set's records both hold it
    (the prompt: items that ask the same question stay on one side)."""
    salt: str
    """Salt of the hash; collect and evaluate use the same one."""
    eval_fraction: float = Field(gt=0.0, lt=1.0)
    """Share of the items kept for evaluation (never trained on)."""

    def for_evaluation(self, item: dict[str, Any]) -> bool:
        """Whether `item` (a source example or an evaluation record) is on the evaluation side; one
        without the key is a StageError naming it."""
        value = item.get(self.key)
        if not isinstance(value, str):
            raise StageError(f"evaluate.holdout.key: the item {str(item)[:120]} has no text field {self.key!r}")
        return is_val(" ".join(value.split()), self.salt, self.eval_fraction)


class TaskConfig(StageConfig):
    limit: int | None = Field(ge=1)
    """Items scored (the first ones of the set, or of its evaluation part; null: all of them)."""
    max_new_tokens: int | None = Field(ge=1)
    """Generated tokens at most, for generative tasks (null: the task YAML's `max_gen_toks`)."""
    holdout: bool
    """The set is also a training source (collect reads it with `holdout: true`): score only the
    items `evaluate.holdout` keeps for evaluation."""


class EvaluationSets(SectionPart):
    """The part of the `evaluate` section that says what the evaluation sets are: evaluate scores
    them, decontam keeps them out of training, collect trains on a shared source's other part."""

    task_dir: Path
    """Folder of lm-eval task YAMLs (`TaskManager(include_path=...)`)."""
    tasks: dict[str, TaskConfig]
    """lm-eval task name -> its limits; the table's benchmark columns, in this order."""
    holdout: Holdout
    """How a set marked `holdout` splits into a training and an evaluation part (collect uses the same)."""
    contamination_ngram: int = Field(ge=4)
    """Tokens (words; a CJK character counts as one) in a run that an item shares with a training
    record to count as seen: decontam removes such records, evaluate counts what is left."""


# --- n-grams --------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    """Lowercased words, each CJK character one token."""
    return TOKEN.findall(text.lower())


def ngrams(text: str, n: int) -> set[int]:
    """Hashes of every run of `n` tokens in `text` (none when it is shorter)."""
    t = tokens(text)
    return {hash(" ".join(t[i:i + n])) for i in range(len(t) - n + 1)}


# --- the evaluation sets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One evaluation item: its task, its id in the set, its index among the task's docs, and what a
    model would memorise of it (prompt and gold answer)."""

    task: str
    id: str
    index: int
    text: str


def task_manager(task_dir: Path, names: Iterable[str] = ()) -> Any:
    """lm-eval's TaskManager over `task_dir`; lm-eval's own task index (slow to build) only when a
    name in `names` is not in the folder."""
    from lm_eval import utils
    from lm_eval.tasks import TaskManager

    # lm-eval compiles a task's Jinja template anew for every item it renders, which is most of
    # the time decontam and evaluate spend reading the sets; a template string compiles to the
    # same template each time, so it is compiled once.
    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=1024)(utils.env.from_string)
    if not Path(task_dir).is_dir():
        raise StageError(f"task_dir {task_dir} is not a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    if any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=str(task_dir))
    return manager


def load_tasks(manager: Any, names: Iterable[str], task_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """name -> lm-eval's built tasks (its YAML parsed, its data loaded), and name -> why one cannot be
    built: a missing or malformed task file costs its column, not the stage."""
    built, skipped = {}, {}
    for name in names:
        if name not in manager.all_tasks:
            skipped[name] = (f"no lm-eval task named {name!r} in {task_dir} or lm-eval's own tasks "
                             "(a missing or unparsable YAML)")
            continue
        try:
            built[name] = manager.load([name])["tasks"]
        except Exception as err:  # a YAML that names missing data, bad Jinja, a bad !function
            skipped[name] = f"task {name} does not load: {type(err).__name__}: {str(err)[:300]}"
            log.debug("task %s", name, exc_info=True)
            continue
        if not any(len(list(task.eval_docs)) for task in built[name].values()):
            del built[name]
            skipped[name] = f"task {name} has no items (an empty evaluation set)"
    for reason in skipped.values():
        log.warning("%s", reason)
    return built, skipped


def doc_id(doc: dict[str, Any], index: int) -> str:
    """An item's id: the set's own (`id`, HumanEval's `task_id`), else its position."""
    return str(doc.get("id") or doc.get("task_id") or index)


def item_text(task: Any, doc: dict[str, Any]) -> str:
    """What a model would have memorised of an item: its prompt and its gold answer."""
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    return f"{task.doc_to_text(doc)}\n{target}"


def docs(built: dict[str, Any], holdout: Holdout | None) -> Iterator[tuple[str, Any, int, dict[str, Any]]]:
    """(task name, task, index, doc) of every item of `built` (the tasks of one lm-eval name, one
    or a group's) a model may be scored on: all of them, or with `holdout` the evaluation part."""
    for task_name, task in built.items():
        for index, doc in enumerate(task.eval_docs):
            if holdout is None or holdout.for_evaluation(doc):
                yield task_name, task, index, doc


def items(name: str, built: dict[str, Any], holdout: Holdout | None) -> list[Item]:
    """The items of task `name` a model may be scored on (see `docs`), with their texts."""
    return [Item(task_name if len(built) > 1 else name, doc_id(doc, index), index, item_text(task, doc))
            for task_name, task, index, doc in docs(built, holdout)]


def item_index(sets: dict[str, list[Item]], n: int) -> dict[int, set[str]]:
    """n-gram hash -> the `task/item id`s whose text holds it."""
    index: dict[int, set[str]] = {}
    for name, found in sets.items():
        for item in found:
            for gram in ngrams(item.text, n):
                index.setdefault(gram, set()).add(f"{name}/{item.id}")
    return index
