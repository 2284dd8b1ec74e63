"""The retraining flow: a fresh snapshot of the sources, the pipeline, and the champion gate.

One run, under the project lock (`flows.pipeline.project_lock`):

1. Snapshot: the stages in `retrain.snapshot` (collect) rerun even when DVC finds them up to date,
   because what they read changes outside the repository (a folder that receives files, a URL, a
   hub dataset). If their outputs' hashes did not move, DVC has nothing stale (`dvc status`), and
   the registered `candidate` already carries a gate decision, the run ends early and says so.
2. The pipeline flow (`flows.pipeline`): DVC reruns only what the new data changed; register
   points `candidate` at the final model.
3. The gate: the registry's `candidate` and `champion` are downloaded into `paths.gate` and scored
   by the evaluate stage in one run, on the same items and by the same judge, this run's, which
   neither was optimized against (`reports/retrain/evaluate/`); the rule in `flows.gate` decides with
   `retrain.gate` (and cannot decide when that judge is no better than chance on the test pairs).
   A promoted candidate becomes `champion`, and the old champion keeps `previous-champion` for rollback
   (`client.set_registered_model_alias(name, "champion", <previous-champion's version>)`).
   The decision, each metric's values, improvement, interval and threshold go to
   `reports/retrain/gate.json`, to tags on the candidate's model version and on the pipeline's
   MLflow run, and to a Prefect artifact (`gate`).
4. `dvc push` to the project's default remote (`retrain.push`), so the data and models of the new
   `dvc.lock` are stored; `dvc.lock` and `gate.json` are left for the commit.

The decision is also a Prefect event (`flows.notify`): a promotion reaches the team as a message
when `retrain.notify` names a notification block. The deployment (a work pool and its worker, or
one serving process) is `flows.deploy`.

    python -m flows.retrain [--params FILE] [--force]   # one run now, in this terminal
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from pydantic import Field

from flows import gate, notify
from flows.gate import GateConfig
from flows.pipeline import ROOT, dvc_command, exit_code, pipeline, prepare, project_lock, repro
from stages.common import tracking
from stages.common.config import Paths, StageConfig, load_section
from stages.common.io import write_json
from stages.common.scores import PAIRWISE, SCORERS
from stages.common.sections import Bootstrapping, RegisteredModel

FLOW = "llm-forge-retrain"
DEPLOYMENT = "scheduled"
CHAMPION, PREVIOUS = "champion", "previous-champion"
TAG = "gate"  # model version and run tags: gate.decision, gate.reason, gate.<metric>.<field>


class RetrainConfig(StageConfig):
    """The `retrain` section: the scheduled retraining flow and its champion gate."""

    schedule: str = Field(min_length=9)
    """Cron of the deployment (`make deploy`, `make serve`), e.g. `0 3 * * 1`: Mondays at 03:00."""
    timezone: str = Field(min_length=1)
    """The schedule's time zone (an IANA name, e.g. `UTC`, `Europe/Paris`)."""
    work_pool: str = Field(min_length=1)
    """The Prefect work pool (process type) `make deploy` deploys to and `make worker` takes runs from."""
    notify: str | None = Field(pattern=r"^[\w-]+/.+$")
    """The Prefect notification block that sends the messages (a run failed, `champion` moved), as
    `<block type>/<name>`, e.g. `slack-webhook/llm-forge` (null: no messages)."""
    snapshot: list[str] = Field(min_length=1)
    """`dvc.yaml` stages that read the sources: rerun on every run, their outputs' hashes say
    whether the data changed."""
    gate: GateConfig
    push: bool
    """`dvc push` the run's data and models to the project's default DVC remote."""


# ---------------------------------------------------------------------------------------------
# the registry


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download(name: str, version: str, dest: Path) -> Path:
    """The model folder inside registered version `version` of `name`, copied to `dest`."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        spec = yaml.safe_load((local / "MLmodel").read_text())
        folder = local / spec["flavors"]["python_function"]["artifacts"]["model"]["path"]
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, dest)
    return dest


def judged(version: Any) -> bool:
    return f"{TAG}.decision" in (version.tags or {})


def decision_word(decision: gate.Decision) -> str:
    return "promoted" if decision.promote else "kept" if decision.decided else "undecided"


def decision_tags(decision: gate.Decision, champion: Any | None) -> dict[str, str]:
    """The decision as MLflow tags (values are strings; floats keep 6 significant digits)."""
    word = decision_word(decision)
    tags = {f"{TAG}.decision": word, f"{TAG}.reason": decision.reason[:4900],
            f"{TAG}.champion_version": str(champion.version) if champion is not None else "none"}
    for c in decision.checks:
        prefix = f"{TAG}.{c.role}.{c.metric}"
        tags[f"{prefix}.passed"] = str(c.passed).lower()
        for key in ("challenger", "champion", "improvement", "low", "high", "threshold"):
            value = getattr(c, key)
            if value is not None:
                tags[f"{prefix}.{key}"] = f"{value:.6g}"
    return tags


# ---------------------------------------------------------------------------------------------
# the steps


def outs_md5(stages: list[str], paths: Paths, root: Path = ROOT) -> dict[str, str]:
    """path -> md5 of every data output of `stages` as dvc.lock records them (not their reports:
    a metrics file holds the run's wall time, which moves every run)."""
    from stages.common.lineage import read_lock

    lock = read_lock(root / "dvc.lock")
    reports = Path(paths.reports)
    return {o["path"]: str(o.get("md5")) for s in stages for o in lock.get(s, {}).get("outs", [])
            if reports not in Path(o["path"]).parents}


def stale(root: Path = ROOT) -> bool:
    """Whether DVC has anything to rerun."""
    done = subprocess.run([*dvc_command(), "status", "--json"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        return True  # cannot tell: run the pipeline, DVC decides there
    return bool(json.loads(done.stdout or "{}"))


@task(name="evaluate-side-by-side")
def side_by_side(params: dict[str, Any], paths: Paths) -> Path:
    """The evaluate stage on `paths.gate/{candidate,champion}`, into `reports/retrain/evaluate/`."""
    scratch = dict(params)
    scratch["paths"] = {**params["paths"], "reports": str(Path(params["paths"]["reports"]) / "retrain")}
    # the instructions sft held out (evaluate's instruction loss), which it reads under its reports
    held_out = ROOT / paths.sft_held_out()
    if held_out.is_file():
        beside = ROOT / paths.model_copy(update={"reports": Path(scratch["paths"]["reports"])}).sft_held_out()
        beside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(held_out, beside)
    scratch["evaluate"] = {**params["evaluate"], "models": ["gate"]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=ROOT / ".dvc" / "tmp", delete=False) as f:
        yaml.safe_dump(scratch, f, sort_keys=False)
    try:
        done = subprocess.run([sys.executable, "-m", "stages.evaluate", "--params", f.name, "--no-mlflow"], cwd=ROOT)
    finally:
        Path(f.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"evaluating the candidate beside the champion failed (exit {done.returncode}): "
                           "see its error above")
    return ROOT / paths.reports / "retrain" / "evaluate"


def side_items(report: Path, row: str) -> dict[str, dict[str, float]]:
    """Per-item values (metric -> item -> value) of row `row` (`gate/<side>`, a scorer) in evaluate's report."""
    items_file = report / "items" / f"{row.replace('/', '_')}.json"
    return json.loads(items_file.read_text()) if items_file.is_file() else {}


def scorer_items(report: Path) -> dict[str, dict[str, float]]:
    """Scorer row (the judge, the proxy) -> its per-pair correctness on the test pairs, as evaluate
    measured it in the same run."""
    found = {row: side_items(report, row).get(PAIRWISE) for row in SCORERS}
    return {row: items for row, items in found.items() if items}


def gate_markdown(result: dict[str, Any]) -> str:
    d = result["decision"]
    heading = ("Promoted" if d["promote"] else "Kept the champion" if d["decided"]
               else "Cannot decide: kept the champion")
    lines = [f"## {heading}: {result['model']}",
             "", d["reason"], "",
             f"candidate: version {result['candidate']}; champion before: version {result['champion_before']}; "
             f"champion now: version {result['champion_after']}", "",
             "| check | metric | candidate | champion | improvement | interval | threshold | passed |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v: Any) -> str:
        return "" if v is None else f"{v:.4g}"

    for c in d["checks"]:
        interval = f"[{f(c['low'])}, {f(c['high'])}]" if c["low"] is not None else ""
        lines.append(f"| {c['role']} | {c['metric']} | {f(c['challenger'])} | {f(c['champion'])} | "
                     f"{f(c['improvement'])} | {interval} | {f(c['threshold'])} | {'yes' if c['passed'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def push(logger: Any) -> str:
    """`dvc push` to the default remote: 'pushed', or why not (a run's decision stands either way)."""
    done = subprocess.run([*dvc_command(), "push"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 0:
        return "pushed"
    why = (done.stderr.strip().splitlines() or ["no output"])[-1]
    logger.warning("dvc push failed: %s (the models stay in the local cache; `dvc push` retries)", why)
    return f"failed: {why}"


def judge(cfg: RetrainConfig, params: dict[str, Any], paths: Paths, parent_run_id: str | None,
          logger: Any) -> dict[str, Any]:
    """Score the registry's candidate beside its champion, decide, move the aliases, record it."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    register = load_section(RegisteredModel, "register", params)
    evaluate = load_section(Bootstrapping, "evaluate", params)
    tracking.setup(ROOT)
    client = mlflow.MlflowClient()
    name = register.name
    candidate = version_by_alias(client, name, register.alias)
    if candidate is None:
        raise RuntimeError(f"the registry has no {name}@{register.alias}: the register stage did not run")
    champion = version_by_alias(client, name, CHAMPION)
    gate_dir = ROOT / paths.gate
    if champion is not None and champion.version == candidate.version:
        decision = gate.Decision(False, f"version {candidate.version} is already the champion")
    else:
        download(name, candidate.version, gate_dir / "candidate")
        if champion is not None:
            download(name, champion.version, gate_dir / CHAMPION)
        else:
            shutil.rmtree(gate_dir / CHAMPION, ignore_errors=True)
        report = side_by_side(params, paths)
        values = json.loads((report / "metrics.json").read_text()).get("models", {}).get("gate/candidate", {})
        challenger = side_items(report, "gate/candidate")
        held = side_items(report, f"gate/{CHAMPION}") if champion is not None else None
        boot = gate.Bootstrap(evaluate.bootstrap_iters, evaluate.confidence, evaluate.seed)
        decision = gate.decide(cfg.gate, boot, challenger, values, held, scorer_items(report))
    logger.info("gate: %s", decision.reason)
    if decision.promote:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    tags = decision_tags(decision, champion)
    if not (champion is not None and champion.version == candidate.version):
        for key, value in tags.items():
            client.set_model_version_tag(name, candidate.version, key, value)
    if parent_run_id:
        for key, value in tags.items():
            client.set_tag(parent_run_id, key, value)
        client.log_metric(parent_run_id, f"{TAG}.promote", float(decision.promote))
    after = version_by_alias(client, name, CHAMPION)
    result = {"model": name, "candidate": int(candidate.version),
              "champion_before": int(champion.version) if champion is not None else None,
              "champion_after": int(after.version) if after is not None else None,
              "previous_champion": int(champion.version) if decision.promote and champion is not None else None,
              "pipeline_run": parent_run_id, "decision": decision.as_dict()}
    write_json(ROOT / paths.reports / "retrain" / "gate.json", result)
    create_markdown_artifact(key="gate", markdown=gate_markdown(result), description="The champion gate's decision")
    return result


@flow(name=FLOW, log_prints=True)
def retrain(params_file: str | None = None, force: bool = False) -> dict[str, Any]:
    """Snapshot the sources, run the pipeline, and move `champion` only if the candidate wins.
    `params_file`: run on that file's values (merged into params.yaml); `force`: judge even when
    nothing changed."""
    logger = get_run_logger()
    with project_lock():  # the command: it merges, checks and reads the params once, for every step
        params = prepare(Path(params_file) if params_file else None)
        cfg = load_section(RetrainConfig, "retrain", params)
        paths = load_section(Paths, "paths", params)
        before = outs_md5(cfg.snapshot, paths)
        for stage in cfg.snapshot:
            repro(stage, None, force=True)
        after = outs_md5(cfg.snapshot, paths)
        unchanged = before == after and bool(after)
        parent_run_id = None
        if unchanged and not force and not stale():
            import mlflow

            tracking.setup(ROOT)
            register = load_section(RegisteredModel, "register", params)
            candidate = version_by_alias(mlflow.MlflowClient(), register.name, register.alias)
            if candidate is not None and judged(candidate):
                message = (f"the data did not change ({', '.join(f'{p} {m}' for p, m in after.items())}) and "
                           f"{register.name} version {candidate.version} was already judged "
                           f"({candidate.tags[f'{TAG}.decision']}): nothing to retrain")
                logger.info(message)
                from prefect.artifacts import create_markdown_artifact

                create_markdown_artifact(key="gate", markdown=f"## Nothing to retrain\n\n{message}\n",
                                         description="The champion gate's decision")
                return {"status": "unchanged", "message": message}
            logger.info("the data did not change and DVC has nothing to rerun: judging the candidate")
        else:
            logger.info("data %s: running the pipeline", "unchanged" if unchanged else "changed")
            parent_run_id = pipeline(params).parent_run_id
        result = judge(cfg, params, paths, parent_run_id, logger)
        notify.announce(result, gate_markdown(result))
        result["status"] = "decided"
        result["push"] = push(logger) if cfg.push else "off (retrain.push)"
        return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    ap.add_argument("--params", help="run on this params file's values (merged into params.yaml)")
    ap.add_argument("--force", action="store_true", help="judge the candidate even when nothing changed")
    args = ap.parse_args(argv)

    def run() -> None:
        # the flow takes the project lock and checks the params itself: a worker runs it without this command
        result = retrain(args.params, args.force)
        print(result.get("message") or result["decision"]["reason"])

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
