"""evaluate: every model the pipeline made, scored on the same held-out items, each score with its error.

Reads the model folder of each row in `evaluate.models`, the judge and the proxy, the val blocks of
`data/tokenized`, the instructions sft held out (`reports/sft/held_out.jsonl`), the `test` part of the
preference data in `data/dedup/` and the lm-eval tasks of `evaluate.task_dir`. Writes
`reports/evaluate/`: `metrics.json` (models x metrics, `stderr`, `comparisons`, `folders`, `skipped`,
`contamination`), `table.md`, `chart.png`, `items/<row>.json`, `answers/<row>.json`, `results/<row>.json`.
README's "Evaluation, quantization and the registry" says what each metric is and how rows are compared.

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import benchmarks, sandbox, stats
from stages.common.benchmarks import EvaluationSets
from stages.common.cells import Cell, compare_rows, mean_cell, pairwise_cell, perplexity_cell, scored
from stages.common.config import Paths, StageConfig, StageError
from stages.common.held_out import Held, PreferenceConfig, held_out
from stages.common.io import write_json
from stages.common.runner import run_stage
from stages.common.scores import (
    INSTRUCTION_LOSS,
    JUDGE_SCORE,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    PAIRWISE,
    PERPLEXITY,
    PROXY_REWARD,
    SCORERS,
)
from stages.common.sections import Bootstrapping

log = logging.getLogger("llm_forge.evaluate")


class EvaluateConfig(EvaluationSets, Bootstrapping, StageConfig):
    """The `evaluate` section: the evaluation sets (stages/common/benchmarks.py), the bootstrap
    (stages/common/sections.py) and these."""

    models: list[str]
    """Table rows, in order: `paths` keys whose model folder is scored (a folder of model folders,
    such as `quantized`, gives a row per model inside; `quantized/<method>` names one of them)."""
    perplexity_blocks: int | None = Field(ge=2)
    """Val blocks of `data/tokenized` for held-out perplexity (null: all of them)."""
    instruction_items: int | None = Field(ge=2)
    """Instructions sft held out that the instruction loss is measured on (null: all of them)."""
    preferences: PreferenceConfig | None
    """The test pairs and prompts of `judge_score`, `proxy_reward` and the scorers' rows (null: none of them)."""
    against: dict[str, str]
    """Row -> the row it is compared with, where not the one before it (an aligned model against the sft
    model it started from); a pair of which a row is not in the table is left out."""
    batch_size: int = Field(ge=1)
    """Items per forward pass (lm-eval requests, blocks, instructions, answers)."""
    dtype: Literal["hardware", "auto", "float32", "bfloat16", "float16"]
    """Dtype every unquantized row runs in, so rows compare like with like (hardware: bfloat16 where
    this machine computes it natively, else float32; auto: as each folder stores it); quantized rows
    run as their quantization config says, but for one thing: where the rows run in float32, what a
    folder stores in bfloat16 beside its quantized weights (torchao's embedding and norms) loads in
    float32 too, as a machine without bf16 would otherwise emulate it (bitsandbytes' loader keeps its
    stored dtype). The dtype used is in the metrics (`dtype`)."""
    code_sandbox: sandbox.Sandbox
    """Where model-written programs (HumanEval's) run: `bwrap`, in bubblewrap's sandbox (where it
    cannot start, their cells are skipped with the reason); `unsafe_no_sandbox`, as this user with
    the filesystem open (a warning in the metrics and the MLflow run)."""

    @field_validator("models")
    @classmethod
    def _paths_keys(cls, models: list[str]) -> list[str]:
        unknown = [m for m in models if m.partition("/")[0] not in Paths.model_fields]
        if unknown:
            raise ValueError(f"{unknown} are not `paths` keys (choose from {list(Paths.model_fields)})")
        if len(set(models)) != len(models):
            raise ValueError(f"{models} names a row twice")
        scorers = [m for m in models if m.partition("/")[0] in {key for key, _ in SCORERS.values()}]
        if scorers:
            raise ValueError(f"{scorers}: the judge and the proxy reward model are scored in rows of their own, "
                             f"{list(SCORERS)} (pairwise accuracy)")
        return models

    @field_validator("against")
    @classmethod
    def _against_paths_keys(cls, against: dict[str, str]) -> dict[str, str]:
        unknown = sorted({m for pair in against.items() for m in pair if m.partition("/")[0] not in Paths.model_fields})
        if unknown:
            raise ValueError(f"{unknown} are not `paths` keys (choose from {list(Paths.model_fields)})")
        return against


# ---------------------------------------------------------------------------------------------
# rows


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


# ---------------------------------------------------------------------------------------------
# one row


def environment_once() -> None:
    """Make lm-eval gather the machine's environment once per process. Every `simple_evaluate`
    adds it to its result (torch's `collect_env`: `pip list` and a dozen more subprocesses, about a
    second), and evaluate calls it once per model and task; what it adds is the same each time
    (and the table does not read it)."""
    from lm_eval import evaluator

    gather = evaluator.add_env_info
    if getattr(gather, "once", False):
        return
    found: dict[str, Any] = {}

    def add_env_info(storage: dict[str, Any]) -> None:
        if not found:
            gather(found)
        storage.update(found)

    add_env_info.once = True  # type: ignore[attr-defined]
    evaluator.add_env_info = add_env_info


def lm_eval_cells(name: str, model: Any, tokenizer: Any, cfg: EvaluateConfig, manager: Any,
                  built: dict[str, Any], report: Path) -> tuple[dict[str, Cell], dict[str, str], dict[str, str]]:
    """(cells, metric names, skipped) of the lm-eval tasks for one model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    environment_once()

    cells, names, skipped, full = {}, {}, {}, {}
    chat = bool(getattr(tokenizer, "chat_template", None))
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
                  max_length=getattr(model.config, "max_position_embeddings", None))
    except Exception as err:  # lm-eval cannot drive this model: its task cells are skips, not a crash
        return {}, {}, {f"{name}/{t}": f"lm-eval cannot run this model: {type(err).__name__}: {str(err)[:300]}"
                        for t in built}
    for task, tasks in built.items():
        limits = cfg.tasks[task]
        started = time.perf_counter()
        chosen = {t: [index for *_, index, _ in benchmarks.docs({t: tasks[t]}, cfg.holdout)][: limits.limit]
                  for t in tasks} if limits.holdout else None
        try:
            with sandbox.using(cfg.code_sandbox):  # where a code task's programs run (run() skipped any it cannot)
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=list(tasks.values()), task_manager=manager, log_samples=True,
                    limit=None if chosen else limits.limit, samples=chosen, apply_chat_template=chat,
                    gen_kwargs={"max_gen_toks": limits.max_new_tokens} if limits.max_new_tokens else None,
                    confirm_run_unsafe_code=True, bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed,
                    numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        except Exception as err:  # one task failing on one model is a cell, not the table
            skipped[f"{name}/{task}"] = f"{type(err).__name__}: {str(err)[:300]}"
            log.warning("%s / %s failed: %s", name, task, skipped[f"{name}/{task}"], exc_info=True)
            continue
        found = score(out or {}, task)
        if found is None:
            skipped[f"{name}/{task}"] = "lm-eval returned no score"
            continue
        metric, value = found
        items = {f"{t}/{s['doc_id']}" if len(tasks) > 1 else str(s["doc_id"]): float(s[metric])
                 for t, samples in out["samples"].items() for s in samples if metric in s}
        stderr = next((v for k, v in out["results"][task].items() if k.split(",")[0] == f"{metric}_stderr"), None)
        cells[task] = Cell(value, float(stderr) if isinstance(stderr, (int, float)) else
                           stats.mean_stderr(list(items.values()))[1], items)
        names[task] = metric
        full[task] = {k: v for k, v in out["results"][task].items() if k != "alias"}
        log.info("%-18s %-20s %s = %.4f ± %.4f (%.0fs)", name, task, metric, value, cells[task].stderr,
                 time.perf_counter() - started)
    write_json(report / "results" / f"{name.replace('/', '_')}.json",
               {"chat_template": chat, "results": full})
    return cells, names, skipped


def evaluate_model(name: str, folder: Path, dtype: str | None, cfg: EvaluateConfig, paths: Paths, manager: Any,
                   built: dict[str, Any], held: Held, report: Path
                   ) -> tuple[dict[str, Cell], dict[str, str], dict[str, str]]:
    """(cells, metric names, skipped reasons) of one row, unquantized in `dtype` (None: as stored);
    raises StageError if it does not load."""
    from stages.common.lm import (
        answer_losses,
        block_losses,
        greedy,
        load_causal_lm,
        load_tokenizer,
        read_config,
        stored_dtype,
    )

    config = read_config(folder)
    if "quantization_config" in config:  # computes as its quantization config says, in fp32 where the rows do
        dtype = dtype if dtype == "float32" and stored_dtype(config) == "bfloat16" else None
    model = load_causal_lm(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder, fallback=Path(paths.tokenized) / "tokenizer")
    cells: dict[str, Cell] = {}
    skipped: dict[str, str] = {}
    chat = bool(getattr(tokenizer, "chat_template", None))
    if held.blocks is not None:
        try:
            cells[PERPLEXITY] = perplexity_cell(block_losses(model, held.blocks, cfg.batch_size))
        except StageError as err:
            skipped[f"{name}/{PERPLEXITY}"] = str(err)
    if held.instructions and not chat:
        skipped[f"{name}/{INSTRUCTION_LOSS}"] = f"{folder} has no chat template"
    elif held.instructions:
        losses = answer_losses(model, tokenizer, held.instructions, cfg.batch_size)
        cells[INSTRUCTION_LOSS] = mean_cell({ex["id"]: v for ex, v in zip(held.instructions, losses)})
    if held.scorers and not chat:
        skipped.update({f"{name}/{SCORERS[row][1]}": f"{folder} has no chat template to answer the prompts with"
                        for row in held.scorers})
    elif held.scorers:
        conversations = [m for _, m in held.prompts]
        answers = greedy(model, tokenizer, conversations, cfg.preferences.answer_tokens, batch_size=cfg.batch_size)
        scores = {row: scored(scorer, conversations, answers) for row, scorer in held.scorers.items()}
        for row, found in scores.items():
            cells[SCORERS[row][1]] = mean_cell({pid: v for (pid, _), v in zip(held.prompts, found)})
        write_json(report / "answers" / f"{name.replace('/', '_')}.json",
                   [{"id": pid, "prompt": m[-1]["content"], "answer": a,
                     **{SCORERS[row][1]: found[i] for row, found in scores.items()}}
                    for i, ((pid, m), a) in enumerate(zip(held.prompts, answers))])
    task_cells, names, task_skips = lm_eval_cells(name, model, tokenizer, cfg, manager, built, report)
    return {**cells, **task_cells}, names, {**skipped, **task_skips}


# ---------------------------------------------------------------------------------------------
# contamination


def training_ngrams(paths: Paths, n: int) -> set[int]:
    """Every run of `n` tokens in the training data the pipeline's models saw."""
    from stages.common.io import KINDS, read_records, record_text

    seen: set[int] = set()
    for kind in KINDS:
        for record in read_records(paths.dedup, kind):
            seen |= benchmarks.ngrams(record_text(kind, record), n)
    return seen


def contamination(built: dict[str, Any], cfg: EvaluateConfig, seen: set[int]) -> dict[str, dict[str, int]]:
    """task -> {checked, seen}: of the items scored, how many share a run with the training data."""
    out = {}
    for name, tasks in built.items():
        limits = cfg.tasks[name]
        scored = benchmarks.items(name, tasks, cfg.holdout if limits.holdout else None)[: limits.limit]
        hits = sum(1 for item in scored if benchmarks.ngrams(item.text, cfg.contamination_ngram) & seen)
        out[name] = {"checked": len(scored), "seen": hits}
        if hits:
            log.warning("%s: %d of %d scored items share a %d-token run with the training data",
                        name, hits, len(scored), cfg.contamination_ngram)
    return out


def score(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    """(metric, value) of `task`'s first declared metric in lm-eval's results: keys there are
    `<metric>,<filter>` beside `<metric>_stderr,<filter>`, `sample_len` and `alias`."""
    metrics = results.get("higher_is_better", {}).get(task, {})
    for key, value in results.get("results", {}).get(task, {}).items():
        if key.split(",")[0] in metrics and isinstance(value, (int, float)):
            return key.split(",")[0], float(value)
    return None


# ---------------------------------------------------------------------------------------------
# the stage


def run(cfg: EvaluateConfig, paths: Paths) -> dict[str, Any]:
    from stages.common.lm import free, resolve_dtype
    from stages.common.tables import comparison_chart, markdown

    report = paths.report_dir("evaluate")
    rows = model_rows(cfg, paths)
    manager = benchmarks.task_manager(cfg.task_dir, cfg.tasks) if cfg.tasks else None
    built, skipped = benchmarks.load_tasks(manager, cfg.tasks, cfg.task_dir) if cfg.tasks else ({}, {})
    for task, reason in sandbox.refusals(built, cfg.code_sandbox).items():  # no sandbox: model code never runs
        del built[task]
        skipped[task] = reason
    unsafe = sandbox.warning(built, cfg.code_sandbox)
    held = held_out(paths, cfg.perplexity_blocks, cfg.instruction_items, cfg.preferences, cfg.batch_size)
    skipped.update(held.skipped)
    overlaps = contamination(built, cfg, training_ngrams(paths, cfg.contamination_ngram))
    dtype = resolve_dtype(cfg.dtype)
    log.info("unquantized rows run in %s (evaluate.dtype: %s)", dtype or "their stored dtype", cfg.dtype)
    table: dict[str, dict[str, Cell]] = {}
    metric_names = dict(METRIC_NAMES)
    for name, folder in rows.items():
        started = time.perf_counter()
        try:
            cells, names, cell_skips = evaluate_model(name, folder, dtype, cfg, paths, manager, built, held, report)
        except StageError as err:
            skipped[name] = str(err)
            log.warning("row %s skipped: %s", name, err)
            continue
        finally:
            free()
        table[name] = cells
        skipped.update(cell_skips)
        metric_names.update(names)
        log.info("%s done in %.0fs", name, time.perf_counter() - started)
    if not table:
        raise StageError(f"no model could be evaluated: {json.dumps(skipped)[:500]}")
    for row, scorer in held.scorers.items():
        table[row] = {PAIRWISE: pairwise_cell(scorer, held.pairs)}
    columns = [c for c in (PERPLEXITY, INSTRUCTION_LOSS, JUDGE_SCORE, PROXY_REWARD, *cfg.tasks, PAIRWISE)
               if any(c in cells for cells in table.values()) or c in skipped]
    comparisons = compare_rows(table, cfg.against, cfg)
    for row, cells in table.items():
        write_json(report / "items" / f"{row.replace('/', '_')}.json", {m: c.items for m, c in cells.items()})
    values = {row: {m: round(c.value, 6) for m, c in cells.items()} for row, cells in table.items()}
    errors = {row: {m: round(c.stderr, 6) for m, c in cells.items()} for row, cells in table.items()}
    (report / "table.md").write_text(markdown(values, errors, columns, metric_names, skipped, overlaps, comparisons,
                                              lower_is_better=LOWER_IS_BETTER))
    comparison_chart(comparisons, columns, report / "chart.png", lower_is_better=LOWER_IS_BETTER)
    log.info("\n%s", (report / "table.md").read_text())
    filled = sum(len(cells) for cells in table.values())
    # every model row has each column but the scorers' rows', which have that one alone
    expected = len(rows) * len([c for c in columns if c != PAIRWISE]) + (len(SCORERS) if held.pairs else 0)
    return {
        "dtype": dtype or "auto",
        "models": values,
        "stderr": errors,
        "comparisons": comparisons,
        "folders": {name: str(folder) for name, folder in rows.items()}
                   | {row: str(getattr(paths, SCORERS[row][0])) for row in SCORERS if row in table},
        "metric": {c: metric_names[c] for c in columns if c in metric_names},
        "items": {c: max((len(cells[c].items) for cells in table.values() if c in cells), default=0)
                  for c in columns},
        "contamination": overlaps,
        "skipped": skipped,
        "cells": filled,
        "cells_skipped": expected - filled,
        **unsafe,
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
