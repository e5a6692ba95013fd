"""Fixtures shared by every test directory: servers that are slow to start are started once
per session and shared (the Ceph cluster serves the rbd integration and guest tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ceph_cluster import CephCluster, CephError


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A one-node Ceph cluster (tests/ceph_cluster.py), started on first use."""
    from blocklayer.ceph import CephUnavailable, load

    try:
        load()  # librados/librbd, as the rbd driver loads them
    except CephUnavailable as e:
        pytest.fail(str(e))
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
    except CephError as e:
        cluster.stop()
        pytest.fail(f"could not start the test Ceph cluster: {e}")
    print(f"\nCeph cluster start-up: {cluster.timings}")
    yield cluster
    cluster.stop()
