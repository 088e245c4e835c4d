"""Shared fixtures: tiny models and data, the toy defense plugin, the shared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

TOY_PLUGIN = str(Path(__file__).parent / "plugins" / "toy_defenses.py")
TOY_ATTACK = str(Path(__file__).parent / "plugins" / "toy_attack.py")
TOY_SHIFT = str(Path(__file__).parent / "plugins" / "toy_shift.py")


#: The longest tests, started first so that pytest-xdist's other worker runs the rest meanwhile.
FIRST = ("test_smoke_grid.py",)


def pytest_collection_modifyitems(config, items):
    """Put the longest tests at the front of the collection (xdist hands out tests in order)."""
    items.sort(key=lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1] not in FIRST)


@pytest.fixture(scope="session", autouse=True)
def _registries():
    """Load built-in plugins and the toy plugin once (as `--plugin` would)."""
    from harness.core.plugins import load_builtin, load_plugin

    # one torch thread unless HARNESS_TEST_THREADS says otherwise: the suite must pass with 1 and with 2
    # (HARNESS_TEST_THREADS=2 python -m pytest ...); tests whose fixtures were computed with one thread pin it (one_thread)
    torch.set_num_threads(int(os.environ.get("HARNESS_TEST_THREADS", "1")))
    load_builtin()
    for plugin in (TOY_PLUGIN, TOY_ATTACK, TOY_SHIFT):
        load_plugin(plugin)


class TinyCNN(nn.Module):
    """A tiny classifier with normalisation inside, like every harness classifier."""

    def __init__(self, channels: int = 1, classes: int = 10, hw: int = 8):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.5).view(1, 1, 1, 1))
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8 * hw * hw, classes)

    def forward(self, x):
        h = torch.tanh(self.conv(x - self.mean))
        return self.fc(h.flatten(1))


@pytest.fixture
def tiny_clf():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def images01():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 8, 8, generator=g)


@pytest.fixture
def labels():
    return torch.tensor([0, 1, 2, 3, 4, 5])


@pytest.fixture
def one_thread():
    """One torch thread: the reference fixtures were computed so, and summation order moves float32 results."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """$HARNESS_SHARED (CI sets it to ../shared); tests needing it skip only when unset."""
    v = os.environ.get("HARNESS_SHARED")
    return Path(v) if v else None


def _missing(reason: str):
    """Skip a test that needs something this machine lacks; under CI (``CI`` set, as `.ci/run` runs) fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run this test: `make test` runs tests/install_postgres.sh)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session (tests/pgserver.py); skipped only where no server binary exists."""
    from tests.pgserver import PgServer, find_binaries

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("psycopg (3) is not installed: pip install -e '.[postgres]'")
    bindir = find_binaries()
    if bindir is None:
        _missing("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin: "
                 "sh tests/install_postgres.sh installs Debian's postgresql")
    server = PgServer(bindir).start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's server (user, password, 127.0.0.1, its port)."""
    return pg_server.database()
