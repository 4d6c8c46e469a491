"""Shared fixtures: free loopback ports and subprocess environments."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Machines are shared and noisy: no per-example time limit, which would fail
# a correct test on a slow moment.  Examples stay small, so runs stay short.
settings.register_profile("mqmq", deadline=None, print_blob=True)
settings.load_profile("mqmq")

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on loopback that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def bin_path(name: str) -> str:
    """A console script installed beside this Python (twistd, mqmq)."""
    return str(Path(sys.executable).parent / name)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for entry points run as subprocesses, using this checkout.

    The checkout goes first on PYTHONPATH, so ``mqmq`` and ``twistd`` (which
    scans ``twisted/plugins`` on sys.path) run the code under test.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env
