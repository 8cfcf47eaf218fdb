"""Shared fixtures: real simulator processes and private Redis servers."""
from __future__ import annotations

import os
import sys

import pytest

from tests.support.procs import RedisServer, SimProcess, free_port

# Apps made in this process (create_app) and processes started without a LOG_DIR of their own log
# to the console only, never into the repository's var/logs (fleets set theirs: tests/support/fleet.py).
os.environ.setdefault("LOG_DIR", "")


@pytest.fixture
def sim_factory(tmp_path):
    """Start simulators: `sim_factory("--step-seconds", "0.05")` → a running SimProcess."""
    started: list[SimProcess] = []

    def make(*args: str, wait: bool = True, env: dict | None = None) -> SimProcess:
        sim = SimProcess(port=free_port(), args=list(args), workdir=tmp_path, env=env or {})
        started.append(sim)
        return sim.start(wait=wait)

    yield make
    for sim in started:
        sim.kill()


@pytest.fixture
def sim(sim_factory) -> SimProcess:
    """One simulator with fast sampler steps."""
    return sim_factory("--step-seconds", "0.02")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(port=free_port(), workdir=tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def fleet_factory(tmp_path, request):
    """Build a test fleet: `fleet = fleet_factory()`, then add_sim/add_worker/start_api."""
    from tests.support.fleet import Fleet

    fleets = []

    def make(**extra_env) -> "Fleet":
        fleet = Fleet(workdir=tmp_path / f"fleet{len(fleets)}",
                      redis=RedisServer(port=free_port(), workdir=tmp_path).start(), extra_env=extra_env)
        fleet.workdir.mkdir(parents=True, exist_ok=True)
        fleets.append(fleet)
        return fleet

    yield make
    report = getattr(request.node, "rep_call", None)
    for fleet in fleets:
        if report is not None and report.failed:  # show every process's log tail beside the failure
            sys.__stderr__.write(f"\n---- fleet logs of {request.node.nodeid}\n{fleet.logs()}\n")
        fleet.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback: moto in server mode."""
    import subprocess

    import requests

    from tests.support.procs import wait_until

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url, timeout=1).status_code < 500, 20, what="moto S3 server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
