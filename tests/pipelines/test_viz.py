"""``kedro viz build`` (what ``make viz`` runs) on a copy of the project: the static site's pipeline data holds every
registered pipeline and every node of each, and building it reaches no network.

The build writes ``build/`` into the working directory (it has no output option), so it runs in a throw-away copy of
the project under tmp. kedro-viz writes ``build/api/main`` (the default pipeline, and the list of all of them) and
``build/api/pipelines/<id>`` per pipeline; the test reads those JSON files as the site's page does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kedro.framework.project import configure_project
from kedro.pipeline import Pipeline

from eva_pipeline.pipeline_registry import register_pipelines

pytestmark = pytest.mark.slow  # a Kedro session in a subprocess: about 10 s

# `kedro viz build` with every socket refused and recorded (AF_UNIX excepted): the build must not need the network.
# kedro-viz builds in a forked child process, which inherits the patched module.
KEDRO_OFFLINE = """
import socket, sys
log = sys.argv.pop(1)
def refuse(what, target):
    with open(log, "a") as fh:
        fh.write(f"{what} {target!r}\\n")
    raise OSError(f"network access refused by the test: {what} {target!r}")
connect = socket.socket.connect
def guarded_connect(self, address):
    if self.family == socket.AF_UNIX:
        return connect(self, address)
    refuse("connect", address)
socket.socket.connect = guarded_connect
socket.socket.connect_ex = lambda self, address: refuse("connect_ex", address)
socket.create_connection = lambda address, *a, **k: refuse("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: refuse("getaddrinfo", host)
from kedro.framework.cli import main
sys.argv = ["kedro", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def registry() -> dict[str, Pipeline]:
    configure_project("eva_pipeline")
    return register_pipelines()


@pytest.fixture(scope="module")
def built(tmp_path_factory, pl) -> dict:
    project = pl.write_project(tmp_path_factory.mktemp("viz") / "project")
    attempts = project.parent / "network_attempts.log"
    repo_build_before = pl.file_listing(pl.PROJECT_ROOT / "build")
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",  # as the Makefile sets them
        "DO_NOT_TRACK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": os.pathsep.join([str(pl.PROJECT_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", KEDRO_OFFLINE, str(attempts), "viz", "build"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {
        "result": result,
        "api": project / "build" / "api",
        "site": project / "build",
        "attempts": attempts.read_text() if attempts.exists() else "",
        "repo_build_unchanged": pl.file_listing(pl.PROJECT_ROOT / "build") == repo_build_before,
    }


def _read(path: Path) -> dict:
    assert path.is_file(), f"kedro viz build wrote no {path}"
    return json.loads(path.read_text())


def _task_names(response: dict) -> set[str]:
    return {node["name"] for node in response["nodes"] if node["type"] == "task"}


def test_the_build_succeeds_offline_without_telemetry(built) -> None:
    result = built["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Success! Kedro-Viz build files have been added to the `build` directory" in result.stdout
    assert built["attempts"] == "", f"kedro viz build tried the network:\n{built['attempts']}"
    index = (built["site"] / "index.html").read_text()
    assert "heap" not in index.lower()  # no analytics injected into the page with telemetry off
    assert built["repo_build_unchanged"], "the build wrote into the repository's build/"


def test_the_site_lists_every_registered_pipeline(built, registry) -> None:
    main = _read(built["api"] / "main")
    assert {p["id"] for p in main["pipelines"]} == set(registry)
    assert main["selected_pipeline"] == "__default__"
    assert _task_names(main) == {node.name for node in registry["__default__"].nodes}


def test_each_pipelines_data_holds_every_node_of_it(built, registry) -> None:
    for pipeline_id, pipeline in registry.items():
        response = _read(built["api"] / "pipelines" / pipeline_id)
        assert response["selected_pipeline"] == pipeline_id
        assert _task_names(response) == {node.name for node in pipeline.nodes}, pipeline_id
        datasets = {n["name"] for n in response["nodes"] if n["type"] in ("data", "parameters")}
        used = {name for node in pipeline.nodes for name in (*node.inputs, *node.outputs)}
        assert used <= datasets, f"{pipeline_id}: datasets missing from the site: {sorted(used - datasets)}"


def test_every_node_has_its_detail_page(built) -> None:
    main = _read(built["api"] / "main")
    tasks = [node for node in main["nodes"] if node["type"] == "task"]
    for node in tasks:
        detail = _read(built["api"] / "nodes" / node["id"])
        assert detail.get("code"), f"no code shown for node {node['name']}"
