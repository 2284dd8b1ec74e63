"""evaluate: every model the pipeline made, scored on the same held-out items, each score with its error.

Reads the model folder of each row in `evaluate.models` (a `paths` key; a folder of model folders,
like `models/quantized/`, gives one row per model inside: `quantized/<method>`), the judge
(`models/judge/`) and the proxy reward model (`models/reward/`), the val split of `data/tokenized`,
the training data (`data/dedup/`, whose preference pairs of the `test` part no model trained on) and
the lm-eval task YAMLs in `evaluate.task_dir` (`configs/lm_eval/`: BIG-bench hhh_alignment,
truthful_qa multiple choice, arithmetic, and HumanEval with a sandboxed test runner, over the sets
`make setup` wrote into `assets/lm_eval/`). Every cell is a mean over held-out items, so it comes
with its standard error, and the per-item values of each row are kept, so that two rows compare item
by item:

- `perplexity`: of the val blocks of `data/tokenized` (pretrain's own metric);
- `instruction_loss`: loss on the answer tokens of the instructions sft held out
  (`reports/sft/held_out.jsonl`, as sft rendered them), through the chat template (sft's own metric);
- `judge_score`: the judge's score of the row's greedy answers to the prompts of the preference
  data's `test` part: what we believe of an aligned model, since no model was optimized against the
  judge; in `comparisons`, `judge_win_rate`, the paired share of prompts whose answer the judge
  prefers to the other row's;
- `proxy_reward`: the proxy reward model's score of the same answers: what RL pushed (`proxy_win_rate`
  in `comparisons`); never evidence that a model it trained is better;
- `pairwise_accuracy`, rows `judge` and `proxy`: the share of the `test` part's pairs whose chosen
  answer the model scores above the rejected one (chance is 0.5): how far each can be believed;
- each lm-eval task, through the chat template where the row's tokenizer has one, with lm-eval's
  standard error; a task marked `holdout` is scored on its evaluation part only (collect trained on
  the rest), and only its first `limit` items.

`comparisons` holds, for each row against another, the difference on every metric both have, with
its paired-bootstrap interval (`stages.common.stats`): a row named in `evaluate.against` against the
row it names there (an aligned model against sft), a `quantized/<method>` row against the row it was
quantized from (the last row outside `quantized`), any other row against the row before it; the
judge and the proxy against chance. Each scored item is also checked against the training data for a
shared run of `contamination_ngram` tokens (decontam removed such records before training; this is
the second line of defence): `contamination` counts them.

Writes `reports/evaluate/`: `metrics.json` (models x metrics, `stderr` the same shape, the DVC
metrics; `folders` names each row's model folder, which is how `register` finds a model's scores),
`table.md` (value ± error, then the comparisons), `chart.png` (the comparisons: per metric, each
row's difference from the row it is set against, with its interval), `items/<row>.json` (every
per-item value) and `results/<row>.json` (lm-eval's results). A model that does not load, a task
file that is missing, malformed or empty, a metric a row cannot produce (no chat template, no
judge), a task that runs model-written code where no sandbox can start (`evaluate.code_sandbox`,
`stages/common/sandbox.py`): a one-line reason in `skipped`, the cell left empty, and every other
cell still evaluated.

    python -m stages.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from stages.common import benchmarks, sandbox, stats
from stages.common.benchmarks import EvaluationSets
from stages.common.config import Paths, StageConfig, StageError
from stages.common.io import read_records, write_json
from stages.common.preferences import SPLIT, TEST, normalize_prompt, pair_messages
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
    WIN_RATE,
)

log = logging.getLogger("llm_forge.evaluate")


class PreferenceConfig(StageConfig):
    """The preference data's `test` part (no model trained on it), taken round robin over its sources."""

    prompts: int | None = Field(ge=2)
    """Distinct test prompts each row answers, scored by the judge and the proxy (null: all of them)."""
    pairs: int | None = Field(ge=2)
    """Test pairs the judge's and the proxy's pairwise accuracy are measured on (null: all of them)."""
    answer_tokens: int = Field(ge=1)
    """Greedy tokens of each answer."""


class EvaluateConfig(EvaluationSets, StageConfig):
    """The `evaluate` section: the evaluation sets (stages/common/benchmarks.py) plus these."""

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
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Dtype every unquantized row runs in, so rows compare like with like (auto: as stored);
    quantized rows run as their quantization config says."""
    bootstrap_iters: int = Field(ge=100)
    """Resamples of the paired bootstrap (and of lm-eval's standard errors where it bootstraps)."""
    confidence: float = Field(gt=0.5, lt=1.0)
    """Coverage of each comparison's interval."""
    seed: int
    """Seed of the bootstrap."""
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
# rows, held-out sets, cells


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


def predecessor(rows: list[str], row: str, against: dict[str, str] | None = None) -> str | None:
    """The row `row` is compared with: the one `against` names for it (when that row is in the
    table), else the one before it, or for `<group>/<name>` (a quantized variant) the last row
    before it outside its group (the model it was made from)."""
    if against and against.get(row) in rows and against[row] != row:
        return against[row]
    before = rows[: rows.index(row)]
    group = row.partition("/")[0] if "/" in row else None
    for other in reversed(before):
        if group is None or other.partition("/")[0] != group:
            return other
    return None


@dataclass
class Cell:
    """One metric of one row: the mean over items, its standard error, and the items."""

    value: float
    stderr: float
    items: dict[str, float]


@dataclass
class Held:
    """The held-out sets every row is scored on (None: the metric is skipped, `skipped` says why)."""

    blocks: Any = None
    instructions: list[dict[str, Any]] | None = None
    pairs: list[tuple[str, list[dict[str, str]], str, str]] | None = None
    prompts: list[tuple[str, list[dict[str, str]]]] | None = None
    scorers: dict[str, Any] = field(default_factory=dict)
    """Scorer row (`SCORERS`) -> its `RewardScorer`, for those that load."""
    skipped: dict[str, str] = field(default_factory=dict)


def mean_cell(items: dict[str, float]) -> Cell:
    value, stderr = stats.mean_stderr(list(items.values()))
    return Cell(value, stderr, items)


def perplexity_cell(losses: list[float]) -> Cell:
    """exp(mean block loss); its error by the delta method (d exp(x) = exp(x) dx). The items stay
    block losses, so comparisons are on log perplexity."""
    loss = mean_cell({str(i): v for i, v in enumerate(losses)})
    value = math.exp(min(loss.value, 50.0))
    return Cell(value, value * loss.stderr, loss.items)


def round_robin(groups: dict[str, list[Any]]) -> list[Any]:
    """The items of every group in turn (each group in its own order), so that a cut mixes them."""
    lists = list(groups.values())
    return [g[i] for i in range(max(map(len, lists), default=0)) for g in lists if i < len(g)]


def preference_items(cfg: PreferenceConfig, paths: Paths, held: Held) -> None:
    """The test pairs and the distinct test prompts of the preference data (collect's `test` part,
    as dedup left it), round robin over their sources, cut to `cfg.pairs` and `cfg.prompts`."""
    records = [r for r in read_records(paths.dedup, "preferences") if r.get(SPLIT) == TEST]
    if not records:
        reason = f"{paths.dedup} holds no preference pair of the {TEST} part"
        held.skipped.update({key: reason for row, (_, column) in SCORERS.items() for key in (row, column)})
        return
    pairs: dict[str, list[Any]] = {}
    prompts: dict[str, list[Any]] = {}
    asked: set[str] = set()
    for r in sorted(records, key=lambda r: r["id"]):
        messages = pair_messages(r["prompt"], r["chosen"], r["rejected"])["prompt"]
        pairs.setdefault(r["source"], []).append((r["id"], messages, r["chosen"], r["rejected"]))
        key = normalize_prompt(r["prompt"])
        if key not in asked:  # pairs that ask the same question are one prompt
            asked.add(key)
            prompts.setdefault(r["source"], []).append((r["id"], messages))
    held.pairs = round_robin(pairs)[: cfg.pairs]
    held.prompts = round_robin(prompts)[: cfg.prompts]


def load_scorers(cfg: EvaluateConfig, paths: Paths, held: Held) -> None:
    """The judge and the proxy as text scorers; one that is missing or does not load is a skip of its
    row and of its column in every model row."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.common.rl import RewardScorer

    for row, (key, column) in SCORERS.items():
        folder = Path(getattr(paths, key))
        if not (folder / "config.json").is_file():
            held.skipped[row] = held.skipped[column] = f"no {row} model in {folder}"
            continue
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1,
                                                                       dtype=torch.float32).eval()
            held.scorers[row] = RewardScorer(model, AutoTokenizer.from_pretrained(folder), cfg.batch_size)
        except (OSError, ValueError, RuntimeError) as err:  # a folder that is there but does not load
            held.skipped[row] = held.skipped[column] = (
                f"the {row} model in {folder} does not load: {type(err).__name__}: {str(err)[:200]}")


def held_out(cfg: EvaluateConfig, paths: Paths) -> Held:
    from stages.common.lm import val_blocks

    held = Held()
    try:
        held.blocks = val_blocks(paths.tokenized, cfg.perplexity_blocks)
    except StageError as err:
        held.skipped[PERPLEXITY] = str(err)
    instructions = paths.sft_held_out()
    if not instructions.is_file():
        held.skipped[INSTRUCTION_LOSS] = f"{instructions} does not exist (sft writes it: run the sft stage)"
    else:
        with instructions.open(encoding="utf-8") as f:
            val = [json.loads(line) for line in f if line.strip()][: cfg.instruction_items]
        held.instructions = val or None
        if not val:
            held.skipped[INSTRUCTION_LOSS] = "sft holds out no instruction (sft.val_fraction)"
    if cfg.preferences is not None:
        preference_items(cfg.preferences, paths, held)
    if held.pairs is not None:
        load_scorers(cfg, paths, held)
    for metric, reason in held.skipped.items():
        log.warning("%s skipped: %s", metric, reason)
    return held


# ---------------------------------------------------------------------------------------------
# one row


def scored(scorer: Any, conversations: list[list[dict[str, str]]], answers: list[str]) -> list[float]:
    """`scorer`'s score of each (conversation, answer), all in one call, shortest first, so that a
    batch is not padded to one long prompt (the scores come back in the given order)."""
    def length(i: int) -> int:
        return sum(len(m["content"]) for m in conversations[i]) + len(answers[i])

    order = sorted(range(len(answers)), key=length)
    scores = [0.0] * len(answers)
    for i, value in zip(order, scorer([conversations[i] for i in order], [answers[i] for i in order])):
        scores[i] = value
    return scores


def pairwise_cell(scorer: Any, pairs: list[tuple[str, list[dict[str, str]], str, str]]) -> Cell:
    """1 for each test pair whose chosen answer `scorer` scores above the rejected one, else 0."""
    scores = scored(scorer, [m for _, m, _, _ in pairs] * 2, [c for *_, c, _ in pairs] + [r for *_, r in pairs])
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    return mean_cell({pid: float(c > r) for (pid, *_), c, r in zip(pairs, chosen, rejected)})


def lm_eval_cells(name: str, model: Any, tokenizer: Any, cfg: EvaluateConfig, manager: Any,
                  built: dict[str, Any], report: Path) -> tuple[dict[str, Cell], dict[str, str], dict[str, str]]:
    """(cells, metric names, skipped) of the lm-eval tasks for one model."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

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


def evaluate_model(name: str, folder: Path, cfg: EvaluateConfig, paths: Paths, manager: Any, built: dict[str, Any],
                   held: Held, report: Path) -> tuple[dict[str, Cell], dict[str, str], dict[str, str]]:
    """(cells, metric names, skipped reasons) of one row; raises StageError if it does not load."""
    from stages.common.lm import answer_losses, block_losses, greedy, load_causal_lm, load_tokenizer, read_config

    quantized = "quantization_config" in read_config(folder)
    model = load_causal_lm(folder, **({} if quantized or cfg.dtype == "auto" else {"dtype": cfg.dtype}))
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
# comparisons, contamination


def compare_rows(table: dict[str, dict[str, Cell]], cfg: EvaluateConfig) -> dict[str, dict[str, Any]]:
    """row -> {against, metric -> the paired difference with its interval and verdict}; for the
    judge's and the proxy's scores also the paired win rate; the scorers' rows against chance."""
    rows, out = list(table), {}
    for row in rows:
        if row in SCORERS:
            cell = table[row].get(PAIRWISE)
            if cell:
                c = stats.compare({k: 0.5 for k in cell.items}, cell.items, iters=cfg.bootstrap_iters,
                                  seed=cfg.seed, level=cfg.confidence)
                out[row] = {"against": "chance", PAIRWISE: {**c.as_dict(), "better": c.low > 0}}
            continue
        prev = predecessor([r for r in rows if r not in SCORERS], row, cfg.against)
        if prev is None:
            continue
        found: dict[str, Any] = {"against": prev}
        for metric, cell in table[row].items():
            before = table[prev].get(metric)
            if before is None or not set(before.items) & set(cell.items):
                continue
            c = stats.compare(before.items, cell.items, iters=cfg.bootstrap_iters, seed=cfg.seed, level=cfg.confidence)
            better = c.high < 0 if metric in LOWER_IS_BETTER else c.low > 0
            found[metric] = {**c.as_dict(), "better": better}
            if metric in WIN_RATE:
                found[WIN_RATE[metric]] = stats.win_rate(before.items, cell.items, iters=cfg.bootstrap_iters,
                                                         seed=cfg.seed, level=cfg.confidence)
        out[row] = found
    return out


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
    from stages.common.lm import free
    from stages.common.tables import comparison_chart, markdown

    report = paths.report_dir("evaluate")
    rows = model_rows(cfg, paths)
    manager = benchmarks.task_manager(cfg.task_dir, cfg.tasks) if cfg.tasks else None
    built, skipped = benchmarks.load_tasks(manager, cfg.tasks, cfg.task_dir) if cfg.tasks else ({}, {})
    for task, reason in sandbox.refusals(built, cfg.code_sandbox).items():  # no sandbox: model code never runs
        del built[task]
        skipped[task] = reason
    unsafe = sandbox.warning(built, cfg.code_sandbox)
    held = held_out(cfg, paths)
    skipped.update(held.skipped)
    seen = contamination(built, cfg, training_ngrams(paths, cfg.contamination_ngram))
    table: dict[str, dict[str, Cell]] = {}
    metric_names = dict(METRIC_NAMES)
    for name, folder in rows.items():
        started = time.perf_counter()
        try:
            cells, names, cell_skips = evaluate_model(name, folder, cfg, paths, manager, built, held, report)
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
    comparisons = compare_rows(table, cfg)
    for row, cells in table.items():
        write_json(report / "items" / f"{row.replace('/', '_')}.json", {m: c.items for m, c in cells.items()})
    values = {row: {m: round(c.value, 6) for m, c in cells.items()} for row, cells in table.items()}
    errors = {row: {m: round(c.stderr, 6) for m, c in cells.items()} for row, cells in table.items()}
    (report / "table.md").write_text(markdown(values, errors, columns, metric_names, skipped, seen, comparisons,
                                              lower_is_better=LOWER_IS_BETTER))
    comparison_chart(comparisons, columns, report / "chart.png", lower_is_better=LOWER_IS_BETTER)
    log.info("\n%s", (report / "table.md").read_text())
    cells = sum(len(v) for v in table.values())
    # every model row has each column but the scorers' rows', which have that one alone
    expected = len(rows) * len([c for c in columns if c != PAIRWISE]) + (len(SCORERS) if held.pairs else 0)
    return {
        "models": values,
        "stderr": errors,
        "comparisons": comparisons,
        "folders": {name: str(folder) for name, folder in rows.items()}
                   | {row: str(getattr(paths, SCORERS[row][0])) for row in SCORERS if row in table},
        "metric": {c: metric_names[c] for c in columns if c in metric_names},
        "items": {c: max((len(cells[c].items) for cells in table.values() if c in cells), default=0)
                  for c in columns},
        "contamination": seen,
        "skipped": skipped,
        "cells": cells,
        "cells_skipped": expected - cells,
        **unsafe,
    }


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", EvaluateConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
