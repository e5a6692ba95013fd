"""benchmarks.run --sweep: the depth sweep's case set."""

from __future__ import annotations

import pytest

from benchmarks import run


def test_sweep_covers_every_depth_for_null_and_file() -> None:
    cases = run.sweep_cases()
    assert {(c.backend, c.iodepth, c.variant) for c in cases} == {
        (b, qd, v) for b in ("null", "file") for qd in (1, 2, 4, 8, 16, 32, 64, 128)
        for v in ("", "poll0")}
    # default settings on both sides (and our polling off): one queue, 4k randread
    assert all(c.rw == "randread" and c.bs == 4096 and c.queues == 1 for c in cases)
    assert len({c.name for c in cases}) == len(cases)


def test_sweep_option_and_bad_case_filter() -> None:
    assert run.parse_args(["--sweep", "--no-pin"]).sweep
    assert not run.parse_args(["--no-pin"]).sweep
    with pytest.raises(SystemExit) as exc:
        run.main(["--sweep", "--no-pin", "--cases", "no-such-case",
                  "--ours", "/bin/true", "--qsd", "/bin/true"])
    # the error lists the sweep's names, the set the filter was applied to
    assert "null-randread-qd128-1q" in str(exc.value)
