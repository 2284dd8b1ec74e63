"""Rebuilding a registered model from its record (`flows/reproduce.py`), and deterministic stages.

The tiny profile's session project (`tiny_project`: a git commit, then the pipeline flow) is the
first of two fresh checkouts; its DVC outputs go to a local remote (`dvc push`). A fresh `git
clone` with the same remote and the same MLflow registry is the second: there `flows.reproduce`
rebuilds `models:/llm-forge/1` from the sources, and the stages it does not need (quantize,
evaluate, register) then run in the kept worktree, so that every output of `dvc.lock` is compared
between the two. That is the one extra pipeline run these tests pay; `--from sft` reruns three
stages. The refusals (uncommitted code, a commit the repository lacks) are tested where a model is
registered (tests/stages/test_register.py).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from flows.reproduce import CannotRebuild, Graph, plan, read_graph
from stages.common.lineage import upstream
from stages.common.training import RUN_KEYS, model_metrics
from tests.conftest import git_in, project_env, run_in

# --- what to rerun (unit level: inline dvc.lock and graph) ------------------------------------------


def lock_of(stages: dict[str, tuple[list[str], list[str]]]) -> dict:
    return {s: {"deps": [{"path": d, "md5": f"{d}-md5"} for d in deps],
                "outs": [{"path": o, "md5": f"{o}-md5"} for o in outs]} for s, (deps, outs) in stages.items()}


STAGES = {  # stage -> (deps, outs); `check` writes a report that `tok` reads, as validate's verdict
    "collect": (["stages/collect.py"], ["data/raw"]),
    "check": (["data/raw"], ["reports/check/verdict.json", "reports/check/metrics.json"]),
    "base": ([], ["models/base"]),
    "tok": (["data/raw", "models/base", "reports/check/verdict.json"], ["data/tok"]),
    "sft": (["data/tok", "models/base"], ["models/sft", "reports/sft/metrics.json"]),
    "ppo": (["models/sft", "data/raw"], ["models/ppo"]),
    "quant": (["models/ppo"], ["models/quant"]),
    "evaluate": (["models/ppo", "models/quant"], ["reports/evaluate/metrics.json"]),
}
ORDER = list(STAGES)


def downstream(stage: str) -> set[str]:
    """The stages that read `stage`'s outputs, directly or not."""
    found = {s for s, (deps, _) in STAGES.items() if set(deps) & set(STAGES[stage][1])}
    return found.union(*(downstream(s) for s in found))


GRAPH = Graph(order=ORDER, deps={s: d for s, (d, _) in STAGES.items()}, outs={s: o for s, (_, o) in STAGES.items()},
              cached={o for _, outs in STAGES.values() for o in outs if not o.startswith("reports/")},
              reports={"reports/check/metrics.json", "reports/sft/metrics.json", "reports/evaluate/metrics.json"},
              downstream={s: downstream(s) for s in STAGES})


def test_the_rebuild_is_the_models_chain_read_from_dvc_lock() -> None:
    lock = lock_of(STAGES)
    whole = plan(lock, "models/ppo", GRAPH, None)
    assert whole.chain == whole.rerun == ["collect", "check", "base", "tok", "sft", "ppo"]  # not quant, evaluate
    assert whole.pull == []
    compared = {o.path: o.report for o in whole.outputs}
    assert compared["reports/sft/metrics.json"] is True and compared["reports/check/verdict.json"] is False
    assert {o.recorded for o in whole.outputs if o.path == "models/ppo"} == {"models/ppo-md5"}
    # a variant's chain goes through the stage that made it
    assert plan(lock, "models/quant/int8", GRAPH, None).rerun[-1] == "quant"


def test_from_a_stage_reruns_it_and_what_follows_and_pulls_what_they_read() -> None:
    lock = lock_of(STAGES)
    from_sft = plan(lock, "models/ppo", GRAPH, "sft")
    assert from_sft.rerun == ["sft", "ppo"]
    assert from_sft.pull == ["collect", "base", "tok"]  # data/raw (ppo), models/base and data/tok (sft)
    assert {o.stage for o in from_sft.outputs} == {"sft", "ppo"}
    # the remote holds no report: tok reads check's verdict, so check reruns, on pulled data/raw
    from_tok = plan(lock, "models/ppo", GRAPH, "tok")
    assert from_tok.rerun == ["check", "tok", "sft", "ppo"] and from_tok.pull == ["collect", "base"]
    with pytest.raises(CannotRebuild, match=r"--from quant: no stage of that name made models/ppo \(its stages: "
                                            r"collect, check, base, tok, sft, ppo\)"):
        plan(lock, "models/ppo", GRAPH, "quant")


# --- two fresh checkouts, the registry, the remote ----------------------------------------------------

NAME = "llm-forge"


@pytest.fixture(scope="module")
def remote(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_project's data and models `dvc push`ed to a local remote (a user's `dvc push` after
    `make run`); tiny_project's own config is left as it was."""
    remote = tmp_path_factory.mktemp("dvc-remote")
    run_in(tiny_project, "-m", "dvc", "remote", "add", "--local", "-d", "reproduce-tests", str(remote))
    try:
        run_in(tiny_project, "-m", "dvc", "push", "-q")
    finally:
        run_in(tiny_project, "-m", "dvc", "remote", "remove", "--local", "reproduce-tests")
    return remote


def fresh_clone(tiny_project: Path, dest: Path, remote: Path | None) -> Path:
    """`git clone` of tiny_project with `make setup`'s assets and, when given, the DVC remote."""
    subprocess.run(["git", "clone", "-q", str(tiny_project), str(dest)], check=True, capture_output=True)
    (dest / "assets").symlink_to(tiny_project / "assets", target_is_directory=True)
    (dest / ".git" / "info" / "exclude").write_text("/assets\n")
    if remote is not None:
        run_in(dest, "-m", "dvc", "remote", "add", "--local", "-d", "store", str(remote))
    return dest


@pytest.fixture(scope="module")
def clone(tiny_project: Path, remote: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_clone(tiny_project, tmp_path_factory.mktemp("clone") / "llm-forge", remote)


def reproduce(clone: Path, registry: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m flows.reproduce *args` in `clone`, against the MLflow store of `registry`."""
    env = {**project_env(clone), "MLFLOW_TRACKING_URI": f"sqlite:///{registry / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "flows.reproduce", *args], cwd=clone, env=env,
                          capture_output=True, text=True)
    log = clone.parent / f"reproduce-{len(list(clone.parent.glob('reproduce-*')))}.log"
    log.write_text(done.stdout + done.stderr)  # kept beside the clone, for a failure's post-mortem
    return done


def table_rows(stdout: str) -> dict[str, tuple[str, str, str]]:
    """The printed table: output -> (recorded, rebuilt, verdict)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:4] == ["output", "recorded", "rebuilt", "verdict"])
    rows = {}
    for line in lines[start + 1:]:
        parts = line.split(maxsplit=4)  # a folder that differs names its files after the verdict
        if len(parts) < 4 or parts[3] not in ("same", "differs"):
            break
        rows[parts[0]] = (parts[1], parts[2], parts[3])
    return rows


def outs(project: Path) -> dict[str, str]:
    """path -> md5 of every output in `project`'s dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for entry in lock.values() for o in entry.get("outs") or []}


def without_run_figures(path: Path) -> object:
    """A report's content less what describes the run (timings, rates, threads: `RUN_KEYS`)."""
    if path.suffix == ".json":
        return model_metrics(json.loads(path.read_text()))
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        return [{k: v for k, v in row.items() if not RUN_KEYS.search(k)} for row in rows]
    return path.read_bytes()


def test_a_fresh_clone_rebuilds_the_registered_model_from_the_sources_to_the_same_bytes(
        tiny_project: Path, clone: Path, tmp_path: Path) -> None:
    """The done-when of issue 22, and the two-checkout determinism test: every output of dvc.lock."""
    import mlflow

    kept = tmp_path / "rebuilt"
    done = reproduce(clone, tiny_project, f"models:/{NAME}/1", "--keep", str(kept))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())["stages"]
    chain = upstream(lock, "models/ppo")  # the stages that made it, from collect on
    assert chain[0] == "collect" and chain[-1] == "ppo" and "quantize" not in chain
    reports = read_graph(tiny_project).reports
    expected = {o["path"] for s in chain for o in lock[s]["outs"] if o["path"] not in reports}
    assert set(rows) == expected  # one line per output of the chain, reports (metrics, plots) listed apart
    assert all(verdict == "same" and recorded == rebuilt for recorded, rebuilt, verdict in rows.values()), rows
    assert f"all {len(expected)} outputs are the same" in done.stdout

    # the MLflow run that checked it, and the stage runs of the rebuild nested under it
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tiny_project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm-forge")
    (check,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'reproduce'")
    assert check.data.tags["reproduce.model"] == NAME and check.data.tags["reproduce.version"] == "1"
    assert check.data.tags["reproduce.verdict"] == "same" and check.data.metrics["outputs_differ"] == 0
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{check.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == sorted(chain)
    # the Prefect artifact with the table
    import sqlite3

    with sqlite3.connect(clone / ".prefect/prefect.db") as db:
        (markdown,) = [json.loads(d) if d.startswith('"') else d
                       for (d,) in db.execute("select data from artifact where key = 'reproduce'")]
    assert "| `models/ppo` |" in markdown and "| same |" in markdown and "differs" not in markdown

    # the rest of the pipeline in the kept checkout (its own registry): every output of dvc.lock
    run_in(kept, "-m", "dvc", "repro")
    first, second = outs(tiny_project), outs(kept)
    assert set(first) == set(second)
    reports = {p for p in first if p.startswith("reports/") and p.endswith(("metrics.json", ".csv"))}
    assert {p: first[p] for p in set(first) - reports} == {p: second[p] for p in set(first) - reports}
    for path in reports:  # a report differs only by the run's timings
        assert without_run_figures(tiny_project / path) == without_run_figures(kept / path), path
    # the evaluation's per-item scores too
    items = sorted((tiny_project / "reports/evaluate/items").glob("*.json"))
    assert items and all(p.read_text() == (kept / "reports/evaluate/items" / p.name).read_text() for p in items)
    git_in(clone, "worktree", "remove", "--force", str(kept))


def test_from_sft_reruns_sft_and_what_follows_and_names_what_changed_params_changed(
        tiny_project: Path, clone: Path) -> None:
    """A record whose params were changed by hand (ppo's learning rate, in the params.yaml logged
    with the model): `--from sft` pulls what sft and later stages read, reruns sft, reward and
    ppo, finds sft's and reward's outputs (the proxy and the judge) the same and names models/ppo as
    the output that differs."""
    import mlflow

    uri = f"sqlite:///{tiny_project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version(NAME, "1")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    params_file = Path(urlparse(logged.artifact_location).path) / "artifacts" / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["ppo"]["learning_rate"] = params["ppo"]["learning_rate"] * 10
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = reproduce(clone, tiny_project, f"models:/{NAME}/1", "--from", "sft")
    finally:
        params_file.write_text(original)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    verdicts = {p: v[2] for p, v in rows.items()}
    assert verdicts == {"models/sft": "same", "reports/sft/held_out.jsonl": "same", "models/judge": "same",
                        "models/reward": "same", "models/ppo": "differs"}
    (ppo,) = [line for line in done.stdout.splitlines() if line.startswith("models/ppo ")]
    assert "model.safetensors" in ppo  # the files of the folder that differ
    assert "1 output(s) differ from the record: models/ppo" in done.stderr
    assert "changed after it was registered" in done.stdout + done.stderr  # the params digest says so
    exp = client.get_experiment_by_name("llm-forge")
    checks = client.search_runs([exp.experiment_id], "attributes.run_name = 'reproduce' and "
                                "tags.`reproduce.from` = 'sft'")
    (check,) = checks
    assert check.data.tags["reproduce.verdict"] == "differs"
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{check.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["ppo", "reward", "sft"]  # nothing before sft ran
    # nothing left behind: the worktree is gone, from git's list and from the disk
    listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=clone, capture_output=True, text=True)
    assert listed.stdout.count("worktree ") == 1, listed.stdout


def test_data_missing_from_the_remote_is_one_sentence(tmp_path: Path) -> None:
    """What `--from` pulls, through real DVC: outputs on the remote arrive; an output that is in
    neither the cache nor the remote is named, with its hash."""
    from flows.reproduce import pull_outputs
    from tests.reliability.test_tracking import LINEAGE_DVC

    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    (project / "dvc.yaml").write_text(LINEAGE_DVC.split("  use:")[0])  # its first stage: data/raw
    for args in (["init", "--no-scm", "-q"], ["repro", "-q"], ["remote", "add", "-d", "store", str(remote)],
                 ["push", "-q"]):
        run_in(project, "-m", "dvc", *args)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    (raw,) = lock["make"]["outs"]
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    pull_outputs(project, ["make"], lock, {"data/raw"})
    assert (project / "data/raw/a.txt").read_text() == "a\n"  # from the remote
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(remote)
    remote.mkdir()
    with pytest.raises(CannotRebuild, match=rf"^data missing from the remote: data/raw \({raw['md5']}\), recorded by "
                                            r"dvc.lock but neither in the DVC cache nor on the remote"):
        pull_outputs(project, ["make"], lock, {"data/raw"})


def test_a_source_that_is_gone_stops_the_rebuild_before_any_stage(tmp_path: Path) -> None:
    """The recorded params name a source this machine no longer has: one sentence naming it."""
    from flows.reproduce import check_params
    from tests.conftest import make_project

    project = make_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["collect"]["sources"][1]["path"] = str(tmp_path / "gone" / "news.txt")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    gone = r"^the recorded params cannot run at this commit: .*sources\.1\.path: .*gone/news\.txt does not exist"
    with pytest.raises(CannotRebuild, match=gone):
        check_params.fn(project)


# --- dvc exp and MLflow name the same experiment ---------------------------------------------------


def test_a_stage_run_started_by_dvc_exp_run_carries_the_experiments_name(tmp_path: Path) -> None:
    """`dvc exp run -n NAME` in a git project: the stage's MLflow run is tagged with NAME and its
    baseline commit, and `dvc exp show` lists the experiment under the same NAME."""
    import mlflow

    from tests.reliability.test_tracking import LINEAGE_DVC, LINEAGE_STAGE, env_for

    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text(LINEAGE_DVC)
    (project / "use.py").write_text(LINEAGE_STAGE)
    (project / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n/reports/\n")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    env = env_for(project, uri)
    git_in(project, "init", "-q")
    for args in (["init", "-q"], ["exp", "run", "-n", "more-data"]):
        if args[0] == "exp":
            git_in(project, "add", "-A")
            git_in(project, "commit", "-q", "-m", "a two-stage project")
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    head = git_in(project, "rev-parse", "HEAD").stdout.strip()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("llm-forge").experiment_id],
                                "attributes.run_name = 'use'")
    assert run.data.tags["dvc.experiment"] == "more-data" and run.data.tags["dvc.experiment_baseline"] == head
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=300)
    names = {exp.get("name") for rev in json.loads(shown.stdout) for exp in rev.get("experiments") or []}
    assert "more-data" in names, shown.stdout[-2000:]
