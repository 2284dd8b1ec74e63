"""The retraining deployment on a Prefect server: a work pool and its worker, or one serving process.

A team runs three things against one Prefect server (`PREFECT_API_URL`):

    prefect server start                 # the server and its UI
    python -m flows.deploy               # the work pool, the deployment and its messages (make deploy)
    python -m flows.deploy --worker      # `prefect worker start --pool <retrain.work_pool>` (make worker)

`python -m flows.deploy` makes the work pool `retrain.work_pool` (process type) when it is missing,
and deploys the retraining flow (`flows.retrain`) to it as `llm-forge-retrain/scheduled` on the
cron `retrain.schedule` in `retrain.timezone`; the worker runs each flow run as a process in this
project folder, with this project's Python. Rerun it after changing the schedule: it updates the
deployment in place. When `retrain.notify` names a notification block, it also makes the
automations of `flows.notify` (a message when a run fails or crashes, and when `champion` moves).

`python -m flows.deploy --serve` (make serve) is the one-process way: it registers the same
deployment without a work pool and runs its flow runs itself until stopped (its schedule pauses
then); the deployment belongs to one or the other, whichever registered it last.

One run at a time: the deployment has a concurrency limit of one (Prefect's, beside the project
lock of `flows.pipeline`), with the collision strategy CANCEL_NEW: a run that comes due while the
previous one still runs is cancelled before it starts, with the state message "Deployment
concurrency limit reached." in the Prefect UI. For a nightly job that is what a team wants: the
running job already retrains on a fresh snapshot, a queued duplicate (ENQUEUE) would start right
after it to redo the same work, and when runs outlast the interval the queue would only grow; the
next scheduled run takes whatever data arrived since.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flows.pipeline import ROOT, prepare
from flows.retrain import DEPLOYMENT, FLOW, RetrainConfig, retrain
from stages.common.config import ConfigError, load_section

DESCRIPTION = "Retrain on a fresh snapshot; promote the candidate only when the gate says so."


class NoServer(RuntimeError):
    """No Prefect server to deploy to."""


def server() -> str:
    """The Prefect API the deployment goes to, once it answers; NoServer names what is missing
    (without a URL, Prefect would start a temporary server that goes away with this process)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise NoServer("PREFECT_API_URL is not set: the deployment needs a running Prefect server "
                       "(`.venv/bin/prefect server start`; make deploy and make serve use http://127.0.0.1:4200/api)")
    with get_client(sync_client=True) as client:
        err = client.api_healthcheck()
    if err is not None:
        raise NoServer(f"the Prefect server at {url} does not answer ({type(err).__name__}): "
                       "start it with `.venv/bin/prefect server start`, or set PREFECT_API_URL to yours")
    return url


def options(cfg: RetrainConfig) -> dict[str, Any]:
    """What the deployment is, however it is run: name, schedule, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    return {"name": DEPLOYMENT, "schedule": Cron(cfg.schedule, timezone=cfg.timezone), "description": DESCRIPTION,
            "concurrency_limit": ConcurrencyLimitConfig(limit=1,
                                                        collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)}


def ensure_pool(name: str) -> str:
    """The work pool `name`, of the process type, made when missing; says which it was."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return f"made the work pool {name} (process)"
    if pool.type != ProcessWorker.type:
        raise ConfigError(f"retrain.work_pool: the work pool '{name}' is of type {pool.type}, not process: "
                          "name another pool, or delete it (`prefect work-pool delete`)")
    return f"work pool {name} (process)"


def deploy(cfg: RetrainConfig) -> list[str]:
    """The work pool, the deployment on it and the automations; one line per thing done."""
    from prefect.deployments.runner import EntrypointType

    done = [ensure_pool(cfg.work_pool)]
    # A module path (`flows.retrain.retrain`) run from this folder: the worker's process imports
    # the flow as `python -m flows.retrain` does, with the same Python (the worker's own).
    deployment = retrain.to_deployment(**options(cfg), entrypoint_type=EntrypointType.MODULE_PATH,
                                       work_pool_name=cfg.work_pool, job_variables={"working_dir": str(ROOT)})
    deployment_id = deployment.apply()
    done.append(f"deployment {FLOW}/{DEPLOYMENT} ({deployment_id}) on {cfg.work_pool}: "
                f"cron '{cfg.schedule}' {cfg.timezone}, one run at a time (a run due while one runs is cancelled)")
    if cfg.notify:
        from flows import notify

        try:
            made = notify.install(cfg.notify, FLOW)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        done.append(f"automations {', '.join(made)}: messages through {cfg.notify}")
    else:
        done.append("no messages: retrain.notify names no notification block")
    return done


def serve(cfg: RetrainConfig) -> None:
    """The deployment served by this process, which runs its flow runs (Ctrl-C stops it)."""
    opts = options(cfg)
    retrain.serve(name=opts["name"], schedule=opts["schedule"], description=opts["description"],
                  global_limit=opts["concurrency_limit"])


def worker(cfg: RetrainConfig) -> None:
    """Become `prefect worker start` on the work pool (this process is replaced)."""
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", cfg.work_pool, "--type", "process"]
    print(" ".join(["prefect", *command[3:]]), file=sys.stderr, flush=True)
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--serve", action="store_true", help="serve the deployment from this process instead")
    how.add_argument("--worker", action="store_true", help="start a worker of the deployment's work pool")
    args = ap.parse_args(argv)
    try:
        cfg = load_section(RetrainConfig, "retrain", prepare())
        if args.worker:  # Prefect's worker says itself when it cannot reach the server
            worker(cfg)
        url = server()
        if args.serve:
            serve(cfg)
        else:
            print(f"Prefect server {url}")
            for line in deploy(cfg):
                print(line)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NoServer as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
