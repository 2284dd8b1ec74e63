"""The reproduce flow: rebuild a registered model version from its record, and say whether the
same commit, params and data gave the same bytes.

    python -m flows.reproduce MODEL_URI [--from STAGE] [--keep DIR]

`MODEL_URI` as MLflow writes it: `models:/llm-forge/3`, `models:/llm-forge@champion`. The version's
record (`stages/register.py`, `stages/common/lineage.py`) names the git commit, whether the working
tree was clean, and carries `params.yaml` and `dvc.lock` as artifacts. The flow checks that commit
out into a temporary git worktree (`git worktree add`; the project's checkout is never touched),
writes the recorded params and `dvc.lock` into it, and reruns, with `dvc repro --force
--single-item` (DVC's run cache is skipped: every stage really runs), the stages that made the
model, read from the recorded `dvc.lock` (the model folder's producer and, recursively, the
producers of what it read). `--from STAGE` reruns STAGE and the stages after it only; what they
read of the stages before it is pulled from the DVC remote by its recorded hash (an output DVC does
not cache, a report such as validate's verdict, is rebuilt by rerunning its stage). The worktree
shares the project's DVC cache and remote, and the stages log to the project's MLflow store, each
run nested under this flow's `reproduce` run.

It prints one line per output of the stages it reran: the recorded hash, the rebuilt hash, and
`same` or `differs` (dvc.lock's metrics and plots are listed after the table, not compared: they
hold the run's timings by design). Exit code 0: every output the same; 1: at least one differs,
each named; 2: the version cannot be rebuilt, in one sentence: it was made from uncommitted code
(`git.clean` false), its commit is not in this repository, its data is missing from the remote, a
source is no longer readable (a stage stopped on bad input), or its record lacks what a rebuild
needs.

A Prefect flow like the others: a flow run with the log of every stage, and a markdown artifact
`reproduce` with the table. The MLflow run `reproduce` is tagged with the version it checked
(`reproduce.model`, `reproduce.version`) and the verdict, and holds the table as an artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# as in flows/pipeline.py: the flow's temporary Prefect server migrates a fresh database first
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402

from flows.pipeline import dvc_command, dvc_repro, stage_env  # noqa: E402
from stages.common import lineage, tracking  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")
# What the record holds beside the model (stages/register.py logs them as the model's artifacts).
RECORD_FILES = ("params.yaml", "dvc.lock", "lineage.json")
SAME, DIFFERS = "same", "differs"
TABLE_KEY = "reproduce"  # the Prefect artifact's key: one history of checks


class CannotRebuild(RuntimeError):
    """The version cannot be rebuilt here; the message is one sentence saying why."""


# --- the record -----------------------------------------------------------------------------------


@dataclass
class Version:
    """A registered model version and what its record says."""

    name: str
    version: str
    tags: dict[str, str]

    @property
    def label(self) -> str:
        return f"version {self.version} of {self.name}"

    @property
    def commit(self) -> str:
        return self.tags.get(lineage.COMMIT_TAG, "")

    @property
    def folder(self) -> str:
        return self.tags.get("llm_forge.folder", "")


def resolve(uri: str) -> Version:
    """The version `uri` names, from the registry; CannotRebuild when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    found = URI.match(uri)
    if not found:
        raise CannotRebuild(f"{uri} is not a registered model URI (models:/<name>/<version> or "
                            "models:/<name>@<alias>)")
    tracking.setup(ROOT)
    client = mlflow.MlflowClient()
    try:
        if found["version"]:
            v = client.get_model_version(found["name"], found["version"])
        else:
            v = client.get_model_version_by_alias(found["name"], found["alias"])
    except MlflowException as err:
        raise CannotRebuild(f"{uri} is not in the registry at {tracking.tracking_uri_shown()} "
                            f"({str(err).splitlines()[0][:200]})") from None
    return Version(v.name, str(v.version), dict(v.tags or {}))


def refuse(v: Version, root: Path = ROOT) -> None:
    """CannotRebuild when the record says no rebuild can match: no commit, uncommitted code, a
    lineage dvc.lock does not vouch for, a commit this repository lacks."""
    if not re.fullmatch(r"[0-9a-f]{40}", v.commit):
        raise CannotRebuild(f"{v.label} records no git commit ({v.commit or 'no git.commit tag'}): "
                            "it was not made from a git checkout, so no commit holds its code")
    if v.tags.get(lineage.CLEAN_TAG) != "true":
        raise CannotRebuild(f"{v.label} was made from a working tree with uncommitted code "
                            f"({lineage.CLEAN_TAG}: {v.tags.get(lineage.CLEAN_TAG, 'missing')}; its lineage.json "
                            "names the files): no commit holds the code that made it")
    if v.tags.get(lineage.LINEAGE_TAG) != lineage.VERIFIED:
        raise CannotRebuild(f"{v.label} has no dvc.lock that describes its folder "
                            f"({lineage.LINEAGE_TAG}: {v.tags.get(lineage.LINEAGE_TAG, 'missing')})")
    if not v.folder:
        raise CannotRebuild(f"{v.label} does not name its model folder (no llm_forge.folder tag)")
    known = subprocess.run(["git", "cat-file", "-e", f"{v.commit}^{{commit}}"], cwd=root, capture_output=True)
    if known.returncode != 0:
        raise CannotRebuild(f"{v.label} was made from commit {v.commit[:12]}, which this repository does not "
                            "have (fetch the branch that holds it)")


def fetch_record(v: Version, dest: Path) -> dict[str, Path]:
    """The record's files (params.yaml, dvc.lock, lineage.json) downloaded into `dest`."""
    import mlflow

    files = {}
    for name in RECORD_FILES:
        try:
            uri = f"models:/{v.name}/{v.version}/artifacts/{name}"
            files[name] = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dest)))
        except Exception as err:
            raise CannotRebuild(f"{v.label} holds no {name} beside its model ({tracking.describe(err)[:200]}): "
                                "it was registered before versions carried their record") from None
    return files


# --- what to rerun --------------------------------------------------------------------------------


@dataclass
class Output:
    stage: str
    path: str
    recorded: str
    rebuilt: str | None = None
    report: bool = False
    """A metrics or plots file: it holds the run's timings, so it is listed, not compared."""
    files: list[str] = field(default_factory=list)
    """For a folder that differs: the files inside it that differ (added, removed or changed)."""

    @property
    def verdict(self) -> str:
        return SAME if self.rebuilt == self.recorded else DIFFERS


@dataclass
class Plan:
    chain: list[str]
    """The stages that made the model, in graph order."""
    rerun: list[str]
    """The stages to run, in graph order."""
    pull: list[str]
    """Stages whose recorded outputs are pulled from the remote (what the rerun reads of them)."""
    outputs: list[Output] = field(default_factory=list)


@dataclass
class Graph:
    """The worktree's dvc.yaml, as DVC reads it: stage -> deps, outs, which outs DVC caches and
    which are reports (metrics, plots); and each stage's downstream stages."""

    order: list[str]
    deps: dict[str, list[str]]
    outs: dict[str, list[str]]
    cached: set[str]
    reports: set[str]
    downstream: dict[str, set[str]]


def read_graph(tree: Path) -> Graph:
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(tree)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in reversed(list(nx.topological_sort(graph))) if getattr(s, "name", None)]
        return Graph(
            order=[s.name for s in stages],
            deps={s.name: [str(d.def_path) for d in s.deps] for s in stages},
            outs={s.name: [str(o.def_path) for o in s.outs] for s in stages},
            cached={str(o.def_path) for s in stages for o in s.outs if o.use_cache},
            reports={str(o.def_path) for s in stages for o in s.outs if o.metric or o.plot},
            downstream={s.name: {a.name for a in nx.ancestors(graph, s)} for s in stages})


def plan(lock: dict[str, dict[str, Any]], folder: str, graph: Graph, start: str | None) -> Plan:
    """What to rerun to rebuild `folder` from the recorded `lock`: every stage of its chain, or
    `start` and the chain's stages after it, plus any earlier stage whose output they read and the
    remote cannot hold (not cached by DVC); the other outputs they read are pulled."""
    chain_set = set(lineage.upstream(lock, folder))
    missing = sorted(chain_set - set(graph.order))
    if missing:
        raise CannotRebuild(f"the recorded dvc.lock names stages the commit's dvc.yaml lacks: {', '.join(missing)}")
    chain = [s for s in graph.order if s in chain_set]
    if start is None:
        rerun = set(chain)
    elif start not in chain_set:
        raise CannotRebuild(f"--from {start}: no stage of that name made {folder} (its stages: {', '.join(chain)})")
    else:
        rerun = {s for s in chain if s == start or s in graph.downstream[start]}
    producers = {o: s for s in chain for o in graph.outs[s]}
    pull: set[str] = set()
    grew = True
    while grew:  # a stage the rerun reads but the remote cannot hold is rerun, and so on upstream
        grew = False
        for stage in list(rerun):
            for dep in graph.deps[stage]:
                owner = next((producers[o] for o in producers if lineage.covers(o, dep)), None)
                if owner is None or owner in rerun:
                    continue
                if any(lineage.covers(o, dep) and o not in graph.cached for o in graph.outs[owner]):
                    rerun.add(owner)
                    grew = True
                else:
                    pull.add(owner)
    pull -= rerun
    outputs = [Output(s, o["path"], lineage.hash_value(o), report=o["path"] in graph.reports)
               for s in graph.order if s in rerun for o in lock[s].get("outs") or []]
    return Plan(chain, [s for s in graph.order if s in rerun], [s for s in graph.order if s in pull], outputs)


# --- the worktree ---------------------------------------------------------------------------------


def git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


@contextlib.contextmanager
def worktree(commit: str, keep: Path | None) -> Iterator[Path]:
    """A git worktree of `commit` (detached), removed afterwards unless `keep` names where it goes."""
    base = Path(tempfile.mkdtemp(prefix="llm-forge-reproduce-"))
    tree = keep.resolve() if keep is not None else base / "tree"
    try:
        done = git("worktree", "add", "--detach", str(tree), commit)
        if done.returncode != 0:
            raise CannotRebuild(f"could not check commit {commit[:12]} out into {tree}: "
                                f"{(done.stderr.strip().splitlines() or ['git failed'])[-1]}")
        yield tree
    finally:
        if keep is None:
            git("worktree", "remove", "--force", str(tree))
            git("worktree", "prune")
        shutil.rmtree(base, ignore_errors=True)


def prepare(tree: Path, files: dict[str, Path]) -> None:
    """The worktree as a checkout of the project that ran: the installed assets (`make setup`'s,
    not in git), the DVC remote and cache of the project, the recorded params and dvc.lock."""
    from dvc.repo import Repo

    for name in ("assets",):  # what `make setup` installs beside the code (ASSETS.md), read by stages
        if (ROOT / name).exists() and not (tree / name).exists():
            (tree / name).symlink_to((ROOT / name).resolve(), target_is_directory=True)
    local = ROOT / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, tree / ".dvc" / "config.local")
    with Repo(str(ROOT)) as repo:
        cache = repo.cache.local_cache_dir
    done = subprocess.run([*dvc_command(), "cache", "dir", "--local", cache], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise CannotRebuild(f"could not point the worktree at the project's DVC cache: {done.stderr.strip()[-300:]}")
    shutil.copy2(files["params.yaml"], tree / "params.yaml")
    shutil.copy2(files["dvc.lock"], tree / "dvc.lock")


# --- the steps ------------------------------------------------------------------------------------


@task(name="check-params")
def check_params(tree: Path) -> None:
    """The recorded params against the commit's configs, source paths included: one sentence,
    before any stage runs, when a source is no longer there."""
    # a commit before params_check.py existed checks with `python -m stages.common.config check`
    command = (["stages.common.params_check"] if (tree / "stages/common/params_check.py").is_file()
               else ["stages.common.config", "check"])
    done = subprocess.run([sys.executable, "-m", *command], cwd=tree,
                          env=stage_env(None), capture_output=True, text=True)
    if done.returncode == 2:
        raise CannotRebuild(f"the recorded params cannot run at this commit: "
                            f"{last_error(done.stderr).removeprefix('error: ')}")


@task(name="dvc-pull")
def pull(tree: Path, stages: list[str], lock: dict[str, dict[str, Any]], cached: set[str]) -> None:
    get_run_logger().info("dvc pull %s", " ".join(stages))
    pull_outputs(tree, stages, lock, cached)


def pull_outputs(tree: Path, stages: list[str], lock: dict[str, dict[str, Any]], cached: set[str]) -> None:
    """The recorded outputs of `stages` that DVC caches, into the worktree from the project's DVC
    cache or its remote; CannotRebuild naming each one that is in neither."""
    done = subprocess.run([*dvc_command(), "pull", *stages], cwd=tree, env=stage_env(None),
                          capture_output=True, text=True)
    absent = [f"{o['path']} ({lineage.hash_value(o)})" for s in stages for o in lock[s].get("outs") or []
              if o["path"] in cached and not (tree / o["path"]).exists()]
    if done.returncode != 0 or absent:
        why = last_error(done.stderr + done.stdout)
        raise CannotRebuild(f"data missing from the remote: {', '.join(absent) or why}, recorded by dvc.lock but "
                            "neither in the DVC cache nor on the remote (`dvc push` it from a checkout that has it)")


@task(name="dvc-repro", task_run_name="{stage}")
def rebuild(stage: str, tree: Path, env: dict[str, str]) -> None:
    """`dvc repro --force --single-item <stage>` in the worktree: the stage runs whatever DVC's
    run cache holds."""
    code, tail = dvc_repro(stage, tree, env, force=True, keep=40)
    if code != 0:
        raise CannotRebuild(f"stage {stage} could not be rebuilt: {last_error(tail).removeprefix('error: ')}")


def last_error(text: str) -> str:
    """The last `error:` message of a command's output (a stage's own sentence, or a params check's
    list of problems, its indented lines joined to it), else its last line."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if not starts:
        return ([line.strip() for line in lines if line.strip()] or ["no output"])[-1][:500]
    message = [lines[starts[-1]].strip()]
    for line in lines[starts[-1] + 1:]:
        if not line[:1].isspace():
            break
        message.append(line.strip().removeprefix("- "))
    return " ".join(message)[:1000]


def compare(plan_: Plan, tree: Path) -> list[Output]:
    """Each planned output with the hash the rebuild's dvc.lock holds for it, and for a folder that
    differs the files inside it that differ."""
    rebuilt = lineage.read_lock(tree / "dvc.lock")
    for out in plan_.outputs:
        outs = (rebuilt.get(out.stage) or {}).get("outs") or []
        found = [lineage.hash_value(o) for o in outs if o["path"] == out.path]
        out.rebuilt = found[0] if found else None
        if not out.report and out.verdict == DIFFERS and out.recorded.endswith(".dir") and out.rebuilt:
            out.files = changed_files(tree, out.recorded, out.rebuilt)
    return plan_.outputs


def changed_files(tree: Path, recorded: str, rebuilt: str) -> list[str]:
    """The files that differ between two folders DVC hashed, from their file lists (DVC's `.dir`
    objects: the rebuilt one in the cache, the recorded one there or on the remote); empty when
    the recorded list is in neither."""
    from dvc.repo import Repo

    def listing(odbs: list[Any], md5: str) -> dict[str, str] | None:
        for odb in odbs:
            try:
                obj = odb.get(md5)
                with obj.fs.open(obj.path, "r") as f:
                    return {e["relpath"]: e["md5"] for e in json.load(f)}
            except Exception:  # not in this store: try the next
                continue
        return None

    with Repo(str(tree)) as repo:
        odbs = [repo.cache.local]
        with contextlib.suppress(Exception):  # no remote: the cache alone
            odbs.append(repo.cloud.get_remote_odb())
        before, after = listing(odbs, recorded), listing(odbs, rebuilt)
    if before is None or after is None:
        return []
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def table(v: Version, plan_: Plan, outputs: list[Output], start: str | None) -> str:
    """The check as markdown: one row per compared output, then the reports left out."""
    compared = [o for o in outputs if not o.report]
    source = f"from `{start}`" if start else "from the sources"
    lines = [f"## {v.label}: {verdict_line(compared)}", "",
             f"Commit `{v.commit[:12]}`, rebuilt {source}: {', '.join(plan_.rerun)}"
             + (f"; pulled from the DVC remote: {', '.join(plan_.pull)}" if plan_.pull else "") + ".", "",
             "| output | recorded | rebuilt | verdict |", "|---|---|---|---|"]
    lines += [f"| `{o.path}` | `{o.recorded}` | `{o.rebuilt or 'none'}` | {o.verdict}{files_note(o)} |"
              for o in compared]
    reports = [o.path for o in outputs if o.report]
    if reports:
        lines += ["", f"Not compared (metrics and plots hold the run's timings): {', '.join(reports)}."]
    return "\n".join(lines) + "\n"


def files_note(out: Output, most: int = 5) -> str:
    """` (a, b and 3 more files)`: the files of a differing folder, for the table."""
    if not out.files:
        return ""
    more = f" and {len(out.files) - most} more" if len(out.files) > most else ""
    return f" ({', '.join(out.files[:most])}{more})"


def verdict_line(compared: list[Output]) -> str:
    differ = [o.path for o in compared if o.verdict == DIFFERS]
    if differ:
        return f"{len(differ)} of {len(compared)} outputs differ: {', '.join(differ)}"
    return f"all {len(compared)} outputs are the same"


def printed(outputs: list[Output]) -> str:
    """The table for a terminal: output, recorded hash, rebuilt hash, verdict (and, for a folder
    that differs, the files that differ)."""
    head = ("output", "recorded", "rebuilt", "verdict")
    rows = [(o.path, o.recorded, o.rebuilt or "none", o.verdict + files_note(o)) for o in outputs if not o.report]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*r) for r in [head, *rows])


# --- the flow -------------------------------------------------------------------------------------


@dataclass
class Check:
    """What a reproduce run found."""

    version: str
    outputs: list[Output]
    differ: list[str]
    table: str


@flow(name="llm-forge-reproduce")
def reproduce(uri: str, start: str | None = None, keep: Path | None = None) -> Check:
    """Rebuild the model version `uri` names in a worktree of its commit and compare every output."""
    import mlflow
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    v = resolve(uri)
    refuse(v)
    started = time.perf_counter()
    experiment_id = tracking.setup(ROOT)
    tags = {"llm_forge.stage": "reproduce", "reproduce.model": v.name, "reproduce.version": v.version,
            "reproduce.uri": uri, "reproduce.commit": v.commit, "reproduce.from": start or "sources"}
    run = mlflow.start_run(experiment_id=experiment_id, run_name="reproduce", tags=tags)
    status, verdict = "FAILED", "cannot rebuild"
    try:
        with tempfile.TemporaryDirectory() as tmp, worktree(v.commit, keep) as tree:
            files = fetch_record(v, Path(tmp))
            params_md5 = lineage.dvc_hash(files["params.yaml"], Path(tmp))
            if params_md5 != v.tags.get(lineage.PARAMS_TAG):
                logger.warning("the params logged with %s (md5 %s) are not the ones it recorded (%s: %s): they were "
                               "changed after it was registered", v.label, params_md5, lineage.PARAMS_TAG,
                               v.tags.get(lineage.PARAMS_TAG))
            recorded = json.loads(files["lineage.json"].read_text()).get("machine") or {}
            logger.info("recorded on %s CPUs, %s torch threads; this machine: %s CPUs, %s threads",
                        recorded.get("cpus"), recorded.get("torch_threads"), *here())
            prepare(tree, files)
            lock = lineage.read_lock(files["dvc.lock"])
            graph = read_graph(tree)
            work = plan(lock, v.folder, graph, start)
            logger.info("%s (commit %s): rerunning %s%s", v.label, v.commit[:12], ", ".join(work.rerun),
                        f"; pulling {', '.join(work.pull)}" if work.pull else "")
            check_params(tree)
            if work.pull:
                pull(tree, work.pull, lock, graph.cached)
            env = {**stage_env(run.info.run_id), "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
            for stage in work.rerun:
                rebuild(stage, tree, env)
            outputs = compare(work, tree)
            if keep is not None:
                logger.info("the rebuilt worktree stays in %s (`git worktree remove %s` removes it)", tree, tree)
        markdown = table(v, work, outputs, start)
        differ = [o.path for o in outputs if not o.report and o.verdict == DIFFERS]
        verdict = DIFFERS if differ else SAME
        logger.info("%s\n%s", printed(outputs), verdict_line([o for o in outputs if not o.report]))
        create_markdown_artifact(key=TABLE_KEY, markdown=markdown, description=f"reproduce {uri}")
        mlflow.log_text(markdown, "reproduce/table.md")
        mlflow.log_dict({"uri": uri, "version": v.version, "commit": v.commit, "from": start, "rerun": work.rerun,
                         "pulled": work.pull, "outputs": [o.__dict__ | {"verdict": o.verdict} for o in outputs]},
                        "reproduce/table.json")
        compared = [o for o in outputs if not o.report]
        mlflow.log_metrics({"outputs_same": sum(o.verdict == SAME for o in compared), "outputs_differ": len(differ),
                            "seconds": round(time.perf_counter() - started, 1)})
        status = "FINISHED"
        return Check(v.version, outputs, differ, markdown)
    except CannotRebuild as err:
        mlflow.set_tag("reproduce.reason", str(err)[:5000])
        raise
    finally:
        with contextlib.suppress(Exception):  # the verdict is printed; the run is its record
            mlflow.set_tag("reproduce.verdict", verdict)
            mlflow.end_run(status=status)


def here() -> tuple[int | None, int]:
    import torch

    return os.cpu_count(), torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("uri", metavar="MODEL_URI", help="models:/<name>/<version> or models:/<name>@<alias>")
    ap.add_argument("--from", dest="start", metavar="STAGE",
                    help="rerun this stage and the ones after it; what they read is pulled from the DVC remote")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="rebuild in DIR and keep it (a git worktree)")
    args = ap.parse_args(argv)
    try:
        # before Prefect starts: a version that cannot be rebuilt costs a second, not a server start
        refuse(resolve(args.uri))
        check = reproduce(args.uri, args.start, args.keep)
    except CannotRebuild as err:
        print(f"error: cannot rebuild {args.uri}: {err}", file=sys.stderr)
        return 2
    print(printed(check.outputs))
    print(verdict_line([o for o in check.outputs if not o.report]))
    reports = [o.path for o in check.outputs if o.report]
    if reports:
        print(f"not compared (metrics and plots hold the run's timings): {', '.join(reports)}")
    if check.differ:
        print(f"error: {args.uri}: {len(check.differ)} output(s) differ from the record: {', '.join(check.differ)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
