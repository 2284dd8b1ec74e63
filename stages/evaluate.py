"""evaluate: every model the pipeline made, scored on the same benchmarks, in one table.

Reads the model folder of each row in `evaluate.models` (a `paths` key; a folder of model
folders, like `models/quantized/`, gives one row per model inside: `quantized/<method>`), the val
split of `data/tokenized`, and the lm-eval task YAMLs in `evaluate.task_dir` (`configs/lm_eval/`:
BIG-bench hhh_alignment, truthful_qa multiple choice, arithmetic, and HumanEval with a sandboxed
test runner, over the sets `make setup` wrote into `assets/lm_eval/`; lm-eval's own tasks can be
named too, where the hub serves their data). Each model is loaded once and handed to the
lm-evaluation-harness (`HFLM`), one task at a time, so that each task keeps its own `limit`.

Each scored benchmark item is also checked against the training data (`data/dedup/`: corpus,
instructions, preferences) for a shared run of `contamination_ngram` words, the n-gram overlap
test of the GPT-3 paper: `contamination` counts the items a model may have seen in training, and
the table marks those cells, because a score on trained-on items measures memory, not skill.

Writes `reports/evaluate/`: `metrics.json` (models x benchmarks, the DVC metrics, so
`dvc metrics diff` compares two commits; `folders` names each row's model folder, which is how
`register` finds a model's scores), `table.md`, `chart.png` (one panel per benchmark),
`results/<model>.json` (lm-eval's full results). A model that does not load, a task file that is
missing or malformed, a task that fails on one model: a one-line reason in `skipped`, the cell
left empty, and every other cell still evaluated.

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import write_json
from stages.common.runner import run_stage

log = logging.getLogger("llm_forge.evaluate")

PERPLEXITY = "perplexity"


class TaskConfig(StageConfig):
    limit: int | None = Field(ge=1)
    """Examples scored (the first ones of the set; null: all of them)."""
    max_new_tokens: int | None = Field(ge=1)
    """Generated tokens at most, for generative tasks (null: the task YAML's `max_gen_toks`)."""


class EvaluateConfig(StageConfig):
    models: list[str]
    """Table rows, in order: `paths` keys whose model folder is scored (a folder of model folders,
    such as `quantized`, gives a row per model inside; `quantized/<method>` names one of them)."""
    task_dir: Path
    """Folder of lm-eval task YAMLs (`TaskManager(include_path=...)`)."""
    tasks: dict[str, TaskConfig]
    """lm-eval task name -> its limits; the table's benchmark columns, in this order."""
    perplexity_blocks: int | None = Field(ge=1)
    """Val blocks of `data/tokenized` for held-out perplexity (null: all of them)."""
    batch_size: int = Field(ge=1)
    """Requests per forward pass in lm-eval, and blocks per perplexity batch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Dtype every unquantized row runs in, so rows compare like with like (auto: as stored);
    quantized rows run as their quantization config says."""
    contamination_ngram: int = Field(ge=4)
    """Words in a run an evaluated item must share with the training data to count as seen."""

    @field_validator("models")
    @classmethod
    def _paths_keys(cls, models: list[str]) -> list[str]:
        unknown = [m for m in models if m.partition("/")[0] not in Paths.model_fields]
        if unknown:
            raise ValueError(f"{unknown} are not `paths` keys (choose from {list(Paths.model_fields)})")
        if len(set(models)) != len(models):
            raise ValueError(f"{models} names a row twice")
        return models


# ---------------------------------------------------------------------------------------------
# rows and columns


def model_rows(cfg: EvaluateConfig, paths: Paths) -> dict[str, Path]:
    """Row name -> model folder, in the order of `evaluate.models`. A folder without a
    config.json that holds folders (`models/quantized/`: one per method) gives the row
    `<name>/<subfolder>` for each; an empty one gives no row. `<name>/<subfolder>` names one."""
    rows: dict[str, Path] = {}
    for name in cfg.models:
        key, _, sub = name.partition("/")
        folder = Path(getattr(paths, key)) / sub if sub else Path(getattr(paths, key))
        inner = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() and not (folder / "config.json").exists() else None
        if inner is None:
            rows[name] = folder
        elif not inner:
            log.warning("%s holds no model folder: no %s rows", folder, name)
        rows.update({f"{name}/{p.name}": p for p in inner or []})
    return rows


def task_manager(cfg: EvaluateConfig) -> Any:
    from lm_eval.tasks import TaskManager

    if not Path(cfg.task_dir).is_dir():
        raise StageError(f"task_dir {cfg.task_dir} is not a folder of lm-eval task YAMLs")
    return TaskManager(include_path=str(cfg.task_dir))


def check_tasks(cfg: EvaluateConfig, manager: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Each configured task built once (its YAML parsed, its data loaded), or the reason it
    cannot be: a missing or malformed task file skips that column, not the stage."""
    built, skipped = {}, {}
    for name in cfg.tasks:
        if name not in manager.all_tasks:
            skipped[name] = (f"no lm-eval task named {name!r} in {cfg.task_dir} or lm-eval's own tasks "
                             "(a missing or unparsable YAML)")
            continue
        try:
            built[name] = manager.load([name])["tasks"]
        except Exception as err:  # a YAML that names missing data, bad Jinja, a bad !function
            skipped[name] = f"task {name} does not load: {type(err).__name__}: {str(err)[:300]}"
            log.debug("task %s", name, exc_info=True)
    for reason in skipped.values():
        log.warning("%s", reason)
    return built, skipped


def score(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    """(metric, value) of `task`'s first declared metric in lm-eval's results: keys there are
    `<metric>,<filter>` beside `<metric>_stderr,<filter>`, `sample_len` and `alias`."""
    metrics = results.get("higher_is_better", {}).get(task, {})
    for key, value in results.get("results", {}).get(task, {}).items():
        if key.split(",")[0] in metrics and isinstance(value, (int, float)):
            return key.split(",")[0], float(value)
    return None


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int) -> set[int]:
    w = words(text)
    return {hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


def training_ngrams(paths: Paths, n: int) -> set[int]:
    """Every n-gram of words in the training data the pipeline's models saw."""
    from stages.common.io import KINDS, read_records, record_text

    seen: set[int] = set()
    for kind in KINDS:
        for record in read_records(paths.dedup, kind):
            seen |= ngrams(record_text(kind, record), n)
    return seen


def item_text(task: Any, doc: dict[str, Any]) -> str:
    """What a model would have memorised of an item: its prompt and its gold answer."""
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    return f"{task.doc_to_text(doc)}\n{target}"


def contamination(tasks: dict[str, Any], cfg: EvaluateConfig, seen: set[int]) -> dict[str, dict[str, int]]:
    """task -> {checked, seen}: of the items scored (the first `limit`), how many share an
    n-gram with the training data."""
    out = {}
    for name, built in tasks.items():
        checked = hits = 0
        for task in built.values():  # one task, or each task of an lm-eval group
            docs = list(task.eval_docs)[:cfg.tasks[name].limit]
            checked += len(docs)
            hits += sum(1 for d in docs if ngrams(item_text(task, d), cfg.contamination_ngram) & seen)
        out[name] = {"checked": checked, "seen": hits}
        if hits:
            log.warning("%s: %d of %d scored items share a %d-word run with the training data",
                        name, hits, checked, cfg.contamination_ngram)
    return out


# ---------------------------------------------------------------------------------------------
# one model


def evaluate_model(name: str, folder: Path, cfg: EvaluateConfig, paths: Paths, manager: Any, tasks: dict[str, Any],
                   blocks: Any, report: Path) -> tuple[dict[str, float], dict[str, str], dict[str, str]]:
    """(scores, metric names, skipped reasons) of one row; raises StageError if it does not load."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from stages.common.lm import load_causal_lm, load_tokenizer, perplexity, read_config

    quantized = "quantization_config" in read_config(folder)
    model = load_causal_lm(folder, **({} if quantized or cfg.dtype == "auto" else {"dtype": cfg.dtype}))
    tokenizer = load_tokenizer(folder, fallback=Path(paths.tokenized) / "tokenizer")
    scores: dict[str, float] = {}
    metric_names: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if blocks is not None:
        try:
            scores[PERPLEXITY] = perplexity(model, blocks, cfg.batch_size)
            metric_names[PERPLEXITY] = "token perplexity"
        except StageError as err:
            skipped[f"{name}/{PERPLEXITY}"] = str(err)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None))
    except Exception as err:  # lm-eval cannot drive this model: its task cells are skips, not a crash
        for task in tasks:
            skipped[f"{name}/{task}"] = f"lm-eval cannot run this model: {type(err).__name__}: {str(err)[:300]}"
        tasks = {}
    full: dict[str, Any] = {}
    for task, built in tasks.items():
        limits = cfg.tasks[task]
        started = time.perf_counter()
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(built.values()), task_manager=manager, limit=limits.limit, log_samples=False,
                gen_kwargs={"max_gen_toks": limits.max_new_tokens} if limits.max_new_tokens else None,
                confirm_run_unsafe_code=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0)
        except Exception as err:  # one task failing on one model is a cell, not the table
            skipped[f"{name}/{task}"] = f"{type(err).__name__}: {str(err)[:300]}"
            log.warning("%s / %s failed: %s", name, task, skipped[f"{name}/{task}"], exc_info=True)
            continue
        found = score(out or {}, task)
        if found is None:
            skipped[f"{name}/{task}"] = "lm-eval returned no score"
            continue
        metric_names[task], scores[task] = found
        full[task] = {k: v for k, v in out["results"][task].items() if k != "alias"}
        log.info("%-18s %-20s %s = %.4f (%.0fs)", name, task, found[0], found[1],
                 time.perf_counter() - started)
    write_json(report / "results" / f"{name.replace('/', '_')}.json", {"model": str(folder), "results": full})
    return scores, metric_names, skipped


# ---------------------------------------------------------------------------------------------
# the table


def markdown(table: dict[str, dict[str, float]], columns: list[str], metric_names: dict[str, str],
             skipped: dict[str, str], seen: dict[str, dict[str, int]] | None = None) -> str:
    seen = {t: s for t, s in (seen or {}).items() if s["seen"]}
    head = "| model | " + " | ".join(f"{c} ({metric_names.get(c, '-')}){' †' if c in seen else ''}"
                                     for c in columns) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    for row, scores in table.items():
        cells = []
        for col in columns:
            if col in scores:
                cells.append(f"{scores[col]:.2f}" if col == PERPLEXITY else f"{scores[col]:.3f}")
            else:
                cells.append("skipped" if f"{row}/{col}" in skipped or row in skipped or col in skipped else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if seen:
        lines += ["", "† items found in the training data (a shared run of words): "
                  + ", ".join(f"{t} {s['seen']} of {s['checked']}" for t, s in seen.items())]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict[str, dict[str, float]], columns: list[str], out: Path) -> None:
    """One panel per benchmark (their scales differ: perplexity is not a share), a bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, col in zip(axes[0], columns):
        values = [table[r].get(col, math.nan) for r in rows]
        ax.bar(range(len(rows)), values, color=[colors[i % len(colors)] for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), rows, rotation=45, ha="right", fontsize=8)
        ax.set_title(col + (" (lower is better)" if col == PERPLEXITY else ""), fontsize=9)
        if col != PERPLEXITY:
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the stage


def run(cfg: EvaluateConfig, paths: Paths) -> dict[str, Any]:
    from stages.common.lm import val_blocks

    report = paths.report_dir("evaluate")
    rows = model_rows(cfg, paths)
    manager = task_manager(cfg) if cfg.tasks else None
    built, skipped = check_tasks(cfg, manager) if cfg.tasks else ({}, {})
    try:
        blocks = val_blocks(paths.tokenized, cfg.perplexity_blocks)
    except StageError as err:
        blocks, skipped[PERPLEXITY] = None, str(err)
    seen = contamination(built, cfg, training_ngrams(paths, cfg.contamination_ngram))
    columns = [PERPLEXITY, *cfg.tasks]
    table: dict[str, dict[str, float]] = {}
    metric_names: dict[str, str] = {}
    for name, folder in rows.items():
        started = time.perf_counter()
        try:
            scores, names, cell_skips = evaluate_model(name, folder, cfg, paths, manager, built, blocks, report)
        except StageError as err:
            skipped[name] = str(err)
            log.warning("row %s skipped: %s", name, err)
            continue
        table[name], skipped = scores, {**skipped, **cell_skips}
        metric_names.update(names)
        log.info("%s done in %.0fs", name, time.perf_counter() - started)
    if not table:
        raise StageError(f"no model could be evaluated: {json.dumps(skipped)[:500]}")
    (report / "table.md").write_text(markdown(table, columns, metric_names, skipped, seen))
    bar_chart(table, columns, report / "chart.png")
    log.info("\n%s", (report / "table.md").read_text())
    return {
        "models": table,
        "folders": {name: str(folder) for name, folder in rows.items()},
        "metric": {c: metric_names[c] for c in columns if c in metric_names},
        "limits": {t: c.limit for t, c in cfg.tasks.items()},
        "contamination": seen,
        "skipped": skipped,
        "cells": sum(len(v) for v in table.values()),
        "cells_skipped": len(rows) * len(columns) - sum(len(v) for v in table.values()),
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
