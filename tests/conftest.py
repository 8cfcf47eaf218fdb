"""Shared fixtures: real simulator processes and private Redis servers."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.procs import RedisServer, SimProcess, free_port

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TRANSCRIPTS = Path(__file__).resolve().parent / "transcripts"


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


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the shared protocol material is not beside the repo ({SHARED})")
    return SHARED
