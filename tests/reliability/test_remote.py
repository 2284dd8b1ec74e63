"""Promise: data and runs can live off this machine. `make setup DVC_REMOTE=s3://bucket/path
DVC_REMOTE_ENDPOINT=http://...` points DVC at an S3 API, and `dvc push` / `dvc pull` move the bytes
there and back; with `MLFLOW_TRACKING_URI=http://...` a stage logs to a running `mlflow server`
whose artifact store is that S3. Credentials come from the environment only and are written
nowhere. The S3 API is moto's server on loopback (any key pair is accepted); the credentials are
the CANARIES that every scratch project's environment carries, so a leak is found by searching."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CANARIES, ROOT, make_project, project_env

BUCKET = "llm-forge-test"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, what: str, seconds: float) -> None:
    """Until `url` answers at all (any HTTP status); fails the test if `proc` dies first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"{what} did not start")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and any worker it forked
    proc.wait()


@pytest.fixture
def s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port with the bucket BUCKET made: its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(f"{endpoint}/moto-api/", proc, "moto_server", 30)
    try:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop(proc)


def s3_client(endpoint: str):
    import boto3

    # the keys the scratch projects carry; moto takes any
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=CANARIES["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CANARIES["AWS_SECRET_ACCESS_KEY"])


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def env_for(project: Path) -> dict[str, str]:
    """The scratch project's environment (CANARIES as the AWS keys), for DVC and make."""
    env = project_env(project)
    env["AWS_DEFAULT_REGION"] = "us-east-1"
    env["DVC_NO_ANALYTICS"] = "1"
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # boto never looks for keys off this machine
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DVC_REMOTE", "DVC_REMOTE_ENDPOINT"):
        env.pop(name, None)  # a `make test` around this run passes its own settings down
    return env


def run(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=project, env=env_for(project), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def make_remote(project: Path, *variables: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    """The Makefile's own `.dvc/config.local` rule (what `make setup` runs for the remote), run in
    `project` with this venv's tools; `-o` keeps make from setting up a venv there."""
    return run(project, "make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "-o", ".venv/.installed",
               f"BIN={BIN}", *(["-n"] if dry_run else []), ".dvc/config.local", *variables)


def assert_no_credential_in(project: Path, *outputs: str) -> None:
    files = [p for p in project.rglob("*") if p.is_file() and "cache" not in p.relative_to(project).parts]
    assert project / ".dvc/config.local" in files
    found = [f"{name} in {p.relative_to(project)}" for p in files for name, value in CANARIES.items()
             if value.encode() in p.read_bytes()]
    found += [f"{name} in the output" for text in outputs for name, value in CANARIES.items() if value in text]
    assert not found, found


def test_dvc_push_and_pull_through_an_s3_remote(tmp_path: Path, s3: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    run(project, str(BIN / "dvc"), "init", "--no-scm", "-q")
    data = bytes(range(256)) * 40 + "¿dónde? 数据\n".encode()
    (project / "data").mkdir()
    (project / "data/corpus.bin").write_bytes(data)
    (project / "data/notes.txt").write_text("second file\n")
    run(project, str(BIN / "dvc"), "add", "-q", "data")

    made = make_remote(project, f"DVC_REMOTE=s3://{BUCKET}/dvc", f"DVC_REMOTE_ENDPOINT={s3}")
    config = (project / ".dvc/config.local").read_text()
    assert f"url = s3://{BUCKET}/dvc" in config and f"endpointurl = {s3}" in config
    assert "remote = store" in config
    assert not list(project.glob("s3*")), "a URL is no local folder to create"

    pushed = run(project, str(BIN / "dvc"), "push")
    keys = bucket_keys(s3, "dvc/")
    # DVC 3's layout: files/md5/<2 chars>/<rest>; the folder's manifest (.dir) and both files
    assert len(keys) == 3 and all(k.startswith("dvc/files/md5/") for k in keys), keys
    assert sum(k.endswith(".dir") for k in keys) == 1

    # a fresh machine: no cache, no data, only the .dvc file
    shutil.rmtree(project / ".dvc/cache")
    shutil.rmtree(project / "data")
    pulled = run(project, str(BIN / "dvc"), "pull")
    assert (project / "data/corpus.bin").read_bytes() == data
    assert (project / "data/notes.txt").read_text() == "second file\n"

    assert_no_credential_in(project, *(d.stdout + d.stderr for d in (made, pushed, pulled)))


def test_a_plain_setup_keeps_the_remote_a_user_chose(tmp_path: Path, s3: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    run(project, str(BIN / "dvc"), "init", "--no-scm", "-q")
    make_remote(project, f"DVC_REMOTE=s3://{BUCKET}/dvc", f"DVC_REMOTE_ENDPOINT={s3}")
    chosen = (project / ".dvc/config.local").read_text()
    # `make run` sets up first, without DVC_REMOTE: the remote stays
    assert "is up to date" in make_remote(project, dry_run=True).stdout
    assert (project / ".dvc/config.local").read_text() == chosen
    # another remote given replaces it whole (the old endpoint goes with it)
    make_remote(project, f"DVC_REMOTE={tmp_path / 'local-remote'}")
    config = (project / ".dvc/config.local").read_text()
    assert f"url = {tmp_path / 'local-remote'}" in config and "endpointurl" not in config
    assert (tmp_path / "local-remote").is_dir()


def test_a_stage_logs_to_a_tracking_server_that_keeps_artifacts_in_s3(tmp_path: Path, s3: str) -> None:
    import mlflow

    from stages.common.tracking import EXPERIMENT, OFFLINE_FILE

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_env = env_for(tmp_path)  # the server, not the stage, holds the S3 keys it needs
    server_env["MLFLOW_S3_ENDPOINT_URL"] = s3
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(f"{uri}/health", server, "mlflow server", 150)
        project = make_project(tmp_path / "project")
        env = project_env(project)
        env["MLFLOW_TRACKING_URI"] = uri
        env["DVC_NO_ANALYTICS"] = "1"
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name)  # artifacts go through the server: the stage needs no S3 keys
        done = subprocess.run([sys.executable, "-m", "stages.collect"], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (project / "reports/collect" / OFFLINE_FILE).exists(), done.stderr[-3000:]

        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        (run_,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'collect'")
        metrics = json.loads((project / "reports/collect/metrics.json").read_text())
        assert run_.info.status == "FINISHED"
        assert run_.data.params["limit"] == "60"
        assert run_.data.metrics["docs_in"] == metrics["docs_in"] > 0
        assert run_.data.tags["dvc.outs.data/raw"]  # lineage, read from the scratch project's DVC
        # the report folder is in the bucket, under the run's own place
        prefix = f"mlartifacts/{exp.experiment_id}/{run_.info.run_id}/artifacts/collect/"
        keys = bucket_keys(s3, prefix)
        assert prefix + "metrics.json" in keys, keys
        body = s3_client(s3).get_object(Bucket=BUCKET, Key=prefix + "metrics.json")["Body"].read()
        assert json.loads(body) == metrics
        # and the server hands them back to a client that has no S3 keys
        assert "collect/metrics.json" in [a.path for a in client.list_artifacts(run_.info.run_id, "collect")]
        assert not any(value in done.stdout + done.stderr for value in CANARIES.values())
    finally:
        stop(server)
