"""Fixtures shared by every test directory: servers that are slow to start are started once
per session and shared (the Ceph cluster serves the rbd integration and guest tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph_cluster import CephCluster, CephError


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A one-node Ceph cluster (tests/ceph_cluster.py), started on first use."""
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        pytest.fail("librbd's Python binding is missing: 'apt-get install python3-rbd "
                    "python3-rados' (the venv must see system site-packages)")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
    except CephError as e:
        cluster.stop()
        pytest.fail(f"could not start the test Ceph cluster: {e}")
    print(f"\nCeph cluster start-up: {cluster.timings}")
    yield cluster
    cluster.stop()
