"""benchmarks.report: Markdown table and PNG chart from a synthetic benchmarks.run result."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from benchmarks import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _side(iops: list[float], cpu: float, other: float = 3.0, failed: int = 0) -> dict[str, Any]:
    """A per-side summary shaped like benchmarks.run.summarize(); a run's daemon used
    `cpu` percent of a core, so IOPS per daemon CPU-second is iops * 100 / cpu."""
    s = sorted(iops)
    per_cpu = sorted(round(v * 100 / cpu) for v in iops)
    return {"runs_ok": len(iops), "runs_failed": failed, "iops_median": s[len(s) // 2],
            "iops_min": s[0], "iops_max": s[-1],
            "iops_all": [round(v) for v in iops], "lat_mean_us": 30.0,
            "iops_per_cpu_median": per_cpu[len(per_cpu) // 2], "iops_per_cpu_all": per_cpu,
            "daemon_cpu_pct_mean": cpu, "client_cpu_pct_mean": 40.0,
            "other_cpu_pct_max": other}


def _runs(side: str, case: str, iops: list[float | None]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rep, v in enumerate(iops):
        if v is None:
            out.append({"side": side, "case": case, "rep": rep, "error": "client status 1"})
        else:
            out.append({"side": side, "case": case, "rep": rep, "iops": v})
    return out


def _case(name: str, backend: str, ours: list[float | None] | None,
          qsd: list[float | None] | None, other: float = 3.0) -> dict[str, Any]:
    entry: dict[str, Any] = {"case": name, "label": name, "backend": backend, "rw": "randread",
                             "iodepth": 32, "queues": 1, "bs": 4096, "variant": ""}
    for side, vals in (("ours", ours), ("qsd", qsd)):
        good = [v for v in vals or [] if v is not None]
        entry[f"{side}_attempted"] = vals is not None
        entry[side] = (_side(good, 80.0 if side == "ours" else 95.0, other,
                             failed=len(vals or []) - len(good)) if good else None)
        entry[f"{side}_runs"] = _runs(side, name, vals or [])
    o, q = entry["ours"], entry["qsd"]
    entry["ratio_iops"] = o["iops_median"] / q["iops_median"] if o and q else None
    return entry


@pytest.fixture
def results() -> dict[str, Any]:
    return {
        "meta": {"date": "2026-01-02T03:04:05+00:00", "host": "benchhost", "kernel": "6.6.0",
                 "cpus": 2, "cpu_model": "Test CPU", "loadavg_at_start": 0.1,
                 "runtime_s": 2.0, "pairs": 3, "sides": ["ours", "qsd"],
                 "command_line": "python -m benchmarks.run --pairs 3 --runtime 2",
                 "commands": {"ours": ["pyvhost-blk"], "qsd": ["qemu-storage-daemon"]},
                 "pinning": "client pinned to CPU 0, daemon to CPU 1 (taskset -c)",
                 "configs": ["qsd: --object iothread,id=io0 and the export's iothread=io0"],
                 "perf": "perf not installed: no cycles per request",
                 "notes": []},
        "cases": [
            # medians 200K / 100K -> 2.00; pair ratios 1.5/1.0=..., see below
            _case("null-randread-qd32-1q", "null",
                  [150_000.0, 200_000.0, 260_000.0], [100_000.0, 90_000.0, 130_000.0]),
            # medians 30K / 40K -> 0.75; busy neighbour
            _case("file-randread-qd1-1q", "file",
                  [30_000.0, 29_000.0, 31_000.0], [40_000.0, 41_000.0, 39_000.0], other=60.0),
            # ours failed once; qsd not run at all
            _case("memory-randread-qd32-1q", "memory", [500_000.0, None, 520_000.0], None),
        ],
    }


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].split("`")[1]] = cells
    return rows


def test_rows_compute_medians_ratios_and_pairs(results: dict[str, Any]) -> None:
    r = {row.case: row for row in report.rows(results)}
    null = r["null-randread-qd32-1q"]
    assert null.ours is not None and null.qsd is not None
    assert (null.ours.median, null.ours.lo, null.ours.hi) == (200_000, 150_000, 260_000)
    assert null.ratio == pytest.approx(2.0)
    assert null.pair_ratios == pytest.approx([1.5, 200 / 90, 2.0])
    assert r["file-randread-qd1-1q"].ratio == pytest.approx(0.75)
    mem = r["memory-randread-qd32-1q"]
    assert mem.ratio is None and mem.qsd is None and mem.pair_ratios == []
    assert mem.ours is not None and mem.ours.failed == 1 and mem.ours.runs == 2
    # IOPS per daemon CPU-second: ours 200K at 80% -> 250K, qsd 100K at 95% -> 105.3K
    assert null.ours.per_cpu == 250_000 and null.qsd.per_cpu == round(100_000 / 0.95)
    assert (null.ours.per_cpu_lo, null.ours.per_cpu_hi) == (187_500, 325_000)
    assert null.cpu_ratio == pytest.approx(250_000 / round(100_000 / 0.95))
    assert mem.cpu_ratio is None


def test_markdown_table(results: dict[str, Any]) -> None:
    md = report.markdown(results, png_name="latest.png")
    rows = _table_rows(md)
    assert set(rows) == {"null-randread-qd32-1q", "file-randread-qd1-1q",
                         "memory-randread-qd32-1q"}
    # case | ours | qsd | ratio | ours spread | qsd spread | pair ratios | CPU
    # | ours IOPS/CPU | qsd IOPS/CPU | IOPS/CPU ratio | others
    assert rows["null-randread-qd32-1q"][1:11] == [
        "200.0K", "100.0K", "**2.00**", "150.0K–260.0K (n=3)", "90.0K–130.0K (n=3)",
        "1.50–2.22", "80/95", "250.0K", "105.3K", "**2.38**"]
    assert rows["file-randread-qd1-1q"][1:4] == ["30.0K", "40.0K", "**0.75**"]
    assert rows["file-randread-qd1-1q"][11] == "60 *busy*"
    mem = rows["memory-randread-qd32-1q"]
    assert mem[2:4] == ["-", "-"] and "(1 failed)" in mem[4]
    assert "![median IOPS per case, ours vs qsd](latest.png)" in md
    assert "`python -m benchmarks.run --pairs 3 --runtime 2`" in md
    assert "host `benchhost`" in md and "Test CPU" in md and "2026-01-02T03:04:05" in md
    assert "1 of 3 cases" in md  # the busy case is called out in the notes
    assert "- CPU pinning: client pinned to CPU 0, daemon to CPU 1" in md
    assert "- qsd: --object iothread,id=io0 and the export's iothread=io0" in md
    assert "- perf: perf not installed" in md


def test_png_and_markdown_files(results: dict[str, Any], tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    assert report.main([str(src), "--note", "synthetic data"]) == 0
    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    md = (tmp_path / "results.md").read_text()
    assert "](results.png)" in md and "synthetic data" in md


def test_without_matplotlib_only_markdown(results: dict[str, Any], tmp_path: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    def no_matplotlib(*_args: object, **_kwargs: object) -> None:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(report, "draw_chart", no_matplotlib)
    md, png = report.report_paths(tmp_path / "r.json")
    written = report.write_reports(results, md, png)
    assert written == [md] and md.exists() and not png.exists()
    assert "](" not in md.read_text()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [report.INSTALL_HINT] and "pip install -e '.[bench]'" in err[0]


def test_report_paths() -> None:
    assert report.report_paths("out/latest.json") == (pathlib.Path("out/latest.md"),
                                                      pathlib.Path("out/latest.png"))
    assert report.report_paths("res") == (pathlib.Path("res.md"), pathlib.Path("res.png"))
