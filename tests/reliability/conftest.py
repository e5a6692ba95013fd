"""Fixtures of the reliability tests: one daemon (Harness) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability import Harness


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    h.start()
    yield h
    h.stop()


@pytest.fixture
def env(harness: Harness) -> Harness:
    """The module's daemon, checked healthy and with a fresh baseline for this test."""
    harness.begin()
    return harness
