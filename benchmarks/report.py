"""Markdown report and PNG chart from the JSON that ``benchmarks.run`` writes.

    python -m benchmarks.report RESULTS.json [--md OUT.md] [--png OUT.png] [--note TEXT]

The report (RESULTS.md next to RESULTS.json unless --md says otherwise) has one table row per
case: the median IOPS of each side, the ratio ours/qsd of the medians, the spread of the
interleaved runs (min..max of each side, and min..max of the per-pair ratios), the daemons'
CPU, IOPS per daemon CPU-second of each side and their ratio, and how much CPU other processes
took meanwhile; then the machine, the date, the daemons' configurations, the CPU pinning and
the command line of the run.  The chart (RESULTS.png) shows, per case, a bar for each side's
median IOPS with min..max error bars and the ratio printed above the pair, and below it the
same for IOPS per daemon CPU-second.  It needs matplotlib (the
``bench`` extra); without it only the Markdown is written and one line says how to install it.
``benchmarks.run --json OUT`` calls :func:`write_reports` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from benchmarks.run import BUSY_OTHER_PCT, SIDES

#: a load average above this at the start makes the whole run noisy (as benchmarks.run warns)
BUSY_LOADAVG = 0.7
INSTALL_HINT = ("matplotlib is not installed, so no chart was drawn; install it with "
                ".venv/bin/pip install -e '.[bench]'")
SPREAD_TEXT = "error bars: min..max of each side's runs"
#: ratios within 1 +- this are drawn grey: run-to-run noise here is about that large
EQUAL_BAND = 0.2

Results = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SideStats:
    """One side of one case: median IOPS of its good runs and their range."""

    median: float
    lo: float
    hi: float
    runs: int
    failed: int
    daemon_cpu: float | None
    #: requests per daemon CPU-second: median of the runs and their range (None: not measured)
    per_cpu: float | None = None
    per_cpu_lo: float | None = None
    per_cpu_hi: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One case of the report."""

    case: str
    label: str
    ours: SideStats | None
    qsd: SideStats | None
    #: ours median / qsd median, or None if a side has no good run
    ratio: float | None
    #: ours/qsd of each pair (same repetition) in which both runs succeeded
    pair_ratios: list[float]
    #: most CPU (percent of one core) used by other processes during any run of the case
    other_cpu: float | None
    #: what the qsd side ran when it is not the same backend as ours
    qsd_backend_note: str = ""
    #: ours/qsd of the median IOPS per daemon CPU-second
    cpu_ratio: float | None = None


def _side_stats(entry: dict[str, Any], side: str) -> SideStats | None:
    summary = entry.get(side)
    if not summary or summary.get("iops_median") is None:
        return None
    median = float(summary["iops_median"])
    # iops_all is rounded to integers, the median is not: keep lo <= median <= hi
    values = [float(v) for v in summary.get("iops_all") or []] + [median]
    per_cpu = summary.get("iops_per_cpu_median")
    pc_values = [float(v) for v in summary.get("iops_per_cpu_all") or []]
    if per_cpu is not None:
        pc_values.append(float(per_cpu))
    return SideStats(median=median, lo=min(values), hi=max(values),
                     runs=int(summary.get("runs_ok", len(values))),
                     failed=int(summary.get("runs_failed", 0)),
                     daemon_cpu=summary.get("daemon_cpu_pct_mean"),
                     per_cpu=None if per_cpu is None else float(per_cpu),
                     per_cpu_lo=min(pc_values) if pc_values else None,
                     per_cpu_hi=max(pc_values) if pc_values else None)


def _good_iops_by_rep(runs: Iterable[dict[str, Any]]) -> dict[int, float]:
    return {int(r["rep"]): float(r["iops"]) for r in runs
            if "error" not in r and r.get("iops") and "rep" in r}


def rows(data: Results) -> list[Row]:
    """The report's rows, one per case of `data` (as written by benchmarks.run)."""
    out = []
    for entry in data.get("cases", []):
        ours, qsd = _side_stats(entry, "ours"), _side_stats(entry, "qsd")
        ratio = ours.median / qsd.median if ours and qsd and qsd.median else None
        o_reps = _good_iops_by_rep(entry.get("ours_runs", []))
        q_reps = _good_iops_by_rep(entry.get("qsd_runs", []))
        pairs = [o_reps[k] / q_reps[k] for k in sorted(o_reps.keys() & q_reps.keys())]
        others = [s.get("other_cpu_pct_max") for s in (entry.get("ours"), entry.get("qsd"))
                  if s and s.get("other_cpu_pct_max") is not None]
        note = ("qsd: null-co" if entry.get("backend") == "memory" and qsd is not None else "")
        cpu_ratio = (ours.per_cpu / qsd.per_cpu
                     if ours and qsd and ours.per_cpu and qsd.per_cpu else None)
        out.append(Row(case=entry["case"], label=entry.get("label", entry["case"]),
                       ours=ours, qsd=qsd, ratio=ratio, pair_ratios=pairs,
                       other_cpu=max(others) if others else None, qsd_backend_note=note,
                       cpu_ratio=cpu_ratio))
    return out


# --------------------------------------------------------------------------
# Markdown


def fmt_iops(v: float | None) -> str:
    """123456 -> '123.5K', as benchmarks.run prints IOPS."""
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}K"
    return f"{v:.0f}"


def _range(s: SideStats | None) -> str:
    if s is None:
        return "-"
    failed = f" ({s.failed} failed)" if s.failed else ""
    return f"{fmt_iops(s.lo)}–{fmt_iops(s.hi)} (n={s.runs}){failed}"


def _cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def noise_notes(data: Results, table: Sequence[Row]) -> list[str]:
    """Sentences saying why the numbers may be noisy, from what the run measured."""
    meta = data.get("meta", {})
    notes = []
    load = meta.get("loadavg_at_start")
    if load is not None and load > BUSY_LOADAVG:
        notes.append(f"The load average was {load:.2f} when the run started: the machine was "
                     "not idle.")
    busy = [r for r in table if r.other_cpu is not None and r.other_cpu > BUSY_OTHER_PCT]
    if busy:
        worst = max(r.other_cpu or 0.0 for r in busy)
        notes.append(f"Other processes used more than {BUSY_OTHER_PCT:.0f}% of a core during "
                     f"runs of {len(busy)} of {len(table)} cases (up to {worst:.0f}%); those "
                     "rows are marked *busy* and are not trustworthy.")
    return notes


def markdown(data: Results, png_name: str | None = None,
             extra_notes: Sequence[str] = ()) -> str:
    """The Markdown report of `data`; `png_name` (relative to the report) is embedded."""
    meta = data.get("meta", {})
    table = rows(data)
    pairs = meta.get("pairs", "?")
    runtime = meta.get("runtime_s")
    lines = ["# pyvhost-blk vs qemu-storage-daemon", ""]
    notes = [*noise_notes(data, table), *meta.get("notes", []), *extra_notes]
    if notes:
        lines += [f"> **Note:** {n}" if i == 0 else f"> {n}" for i, n in enumerate(notes)]
        band = f"{1 - EQUAL_BAND:g}–{1 + EQUAL_BAND:g}"
        lines += [">", "> Runs are interleaved in pairs of alternating order (ours then qsd, "
                  "qsd then ours, ...) so drift hits both sides; "
                  f"still, treat ratios within ~{band} as equal.", ""]
    if png_name:
        lines += [f"![median IOPS per case, ours vs qsd]({png_name})", ""]
    lines += [
        f"IOPS: median of {pairs} interleaved runs per side"
        + (f", {runtime:g} s each" if runtime else "")
        + " (libblkio client, `benchmarks/blkio_client.c`).  **ours/qsd**: ratio of the "
        "medians.  **spread**: min–max IOPS of each side's runs (the chart's error bars) and "
        "min–max of the per-pair ratios.  **daemon CPU %**: utime+stime over the run "
        "(/proc/PID/stat), 100 = one core, ours/qsd.  **IOPS/CPU**: requests per second of "
        "daemon CPU time (median of the runs, min–max in the JSON), ours and qsd, and their "
        "ratio.  **others %**: most CPU other processes took during a run of the case.",
        "",
        "| case | ours IOPS | qsd IOPS | ours/qsd | ours spread | qsd spread | pair ratios "
        "| daemon CPU % | ours IOPS/CPU | qsd IOPS/CPU | IOPS/CPU ours/qsd | others % |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        ratio = f"**{r.ratio:.2f}**" if r.ratio is not None else "-"
        pr = (f"{min(r.pair_ratios):.2f}–{max(r.pair_ratios):.2f}" if len(r.pair_ratios) > 1
              else f"{r.pair_ratios[0]:.2f}" if r.pair_ratios else "-")
        cpu = (f"{_cpu(r.ours and r.ours.daemon_cpu)}/{_cpu(r.qsd and r.qsd.daemon_cpu)}"
               if r.ours or r.qsd else "-")
        other = _cpu(r.other_cpu)
        if r.other_cpu is not None and r.other_cpu > BUSY_OTHER_PCT:
            other += " *busy*"
        case = f"`{r.case}`" + (f" ({r.qsd_backend_note})" if r.qsd_backend_note else "")
        cratio = f"**{r.cpu_ratio:.2f}**" if r.cpu_ratio is not None else "-"
        lines.append(f"| {case} | {fmt_iops(r.ours and r.ours.median)} | "
                     f"{fmt_iops(r.qsd and r.qsd.median)} | {ratio} | {_range(r.ours)} | "
                     f"{_range(r.qsd)} | {pr} | {cpu} | {fmt_iops(r.ours and r.ours.per_cpu)} | "
                     f"{fmt_iops(r.qsd and r.qsd.per_cpu)} | {cratio} | {other} |")
    lines += ["", "## Run", ""]
    machine = ", ".join(x for x in (
        meta.get("host") and f"host `{meta['host']}`",
        meta.get("cpu_model"),
        meta.get("cpus") and f"{meta['cpus']} CPUs",
        meta.get("kernel") and f"Linux {meta['kernel']}",
        meta.get("python") and f"Python {meta['python']}",
    ) if x)
    lines += [
        f"- date: {meta.get('date', 'unknown')}",
        f"- machine: {machine or 'unknown'}",
        f"- load average at start: {_fmt_load(meta.get('loadavg_at_start'))}",
        f"- command: `{meta.get('command_line') or 'not recorded'}`",
    ]
    if meta.get("git_commit"):
        lines.append(f"- source tree (benchmarks, and ours unless --ours says otherwise): "
                     f"`{meta['git_commit']}`")
    if meta.get("qsd_version"):
        lines.append(f"- qsd version: {meta['qsd_version']}")
    for side, cmd in meta.get("commands", {}).items():
        lines.append(f"- {side} command: `{' '.join(cmd)}`")
    for key, value in meta.get("blockdev", {}).items():
        lines.append(f"- blockdev {key}: `{value}`")
    for text in meta.get("configs", []):
        lines.append(f"- {text}")
    if "pinning" in meta:
        lines.append(f"- CPU pinning: {meta['pinning'] or 'none (--no-pin)'}")
    if meta.get("perf"):
        lines.append(f"- perf: {meta['perf']}")
    if meta.get("client_poll"):
        lines.append("- client busy-polls for completions (`--client-poll`)")
    return "\n".join(lines) + "\n"


def _fmt_load(v: float | None) -> str:
    return "unknown" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------
# chart


def _ratio_color(ratio: float) -> str:
    """Green if ours is clearly faster, red if clearly slower, grey within the noise."""
    if ratio >= 1 + EQUAL_BAND:
        return "#2a7d2a"
    if ratio <= 1 - EQUAL_BAND:
        return "#b22222"
    return "#555555"


def _tick(v: float) -> str:
    """Axis label for an IOPS tick: 2000 -> '2K', 1500000 -> '1.5M'."""
    for scale, unit in ((1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _bar_panel(ax: Any, table: Sequence[Row], metric: str, ylabel: str) -> None:
    """One panel of the chart: per case a bar per side (median, min..max error bars) and the
    ratio ours/qsd above the pair.  `metric` is "iops" or "per_cpu"."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def get(s: SideStats | None) -> tuple[float, float, float] | None:
        if s is None:
            return None
        if metric == "iops":
            return s.median, s.lo, s.hi
        if s.per_cpu is None:
            return None
        return s.per_cpu, s.per_cpu_lo or s.per_cpu, s.per_cpu_hi or s.per_cpu

    width = 0.38
    colors = {"ours": "#1f77b4", "qsd": "#ff7f0e"}
    names = {"ours": "ours (pyvhost-blk)", "qsd": "qemu-storage-daemon"}
    lows, tops = [], []
    for k, side in enumerate(SIDES):
        xs, med, err_lo, err_hi = [], [], [], []
        for i, r in enumerate(table):
            v = get(getattr(r, side))
            if v is None:
                continue
            m, lo, hi = v
            xs.append(i + (k - 0.5) * width)
            med.append(m)
            err_lo.append(max(0.0, m - lo))
            err_hi.append(max(0.0, hi - m))
            lows.append(max(lo, 1.0))
            tops.append(hi)
        if xs:
            ax.bar(xs, med, width, color=colors[side], label=names[side],
                   yerr=[err_lo, err_hi], capsize=2.5, error_kw={"elinewidth": 1})
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick(v)))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: _tick(v)))
    if tops:
        # headroom for the ratios and the legend above the tallest error bar
        ax.set_ylim(min(lows) / 2.5, max(tops) * 4.5)
    for i, r in enumerate(table):
        o, q = get(r.ours), get(r.qsd)
        if o is None or q is None or not q[0]:
            continue
        ratio = o[0] / q[0]
        ax.text(i, max(o[2], q[2]) * 1.15, f"{ratio:.2f}", ha="center", va="bottom",
                fontsize=8, fontweight="bold", color=_ratio_color(ratio))
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(loc="upper left", ncol=2, fontsize=8, framealpha=0.9)


def draw_chart(data: Results, path: str | os.PathLike[str]) -> None:
    """Draw the grouped-bar chart of `data` to the PNG file `path`: IOPS, and below it IOPS
    per daemon CPU-second when the run measured it.

    Raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(data)
    meta = data.get("meta", {})
    per_cpu = any(s is not None and s.per_cpu for r in table for s in (r.ours, r.qsd))
    fig_w = max(8.0, 1.0 + 0.62 * len(table))
    fig, axes = plt.subplots(2 if per_cpu else 1, 1, figsize=(fig_w, 9.6 if per_cpu else 5.6),
                             dpi=90, squeeze=False)
    try:
        ax = axes[0][0]
        _bar_panel(ax, table, "iops", "IOPS (log scale)")
        if per_cpu:
            _bar_panel(axes[1][0], table, "per_cpu", "IOPS per daemon CPU-second (log)")
        labels = [r.case + (" *" if r.qsd_backend_note else "") for r in table]
        for row in axes:
            row[0].set_xticks(range(len(table)))
            row[0].set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
        pairs = meta.get("pairs", "?")
        runtime = meta.get("runtime_s")
        title = (f"median IOPS of {pairs} interleaved runs per side"
                 + (f" ({runtime:g} s each)" if runtime else "")
                 + f"\n{SPREAD_TEXT}; number above a pair = ours/qsd of the medians\n"
                 f"(grey: within {1 - EQUAL_BAND:g}..{1 + EQUAL_BAND:g}, i.e. noise)")
        sub = ", ".join(x for x in (str(meta.get("date", ""))[:16].replace("T", " "),
                                    meta.get("host") and f"host {meta['host']}",
                                    meta.get("cpus") and f"{meta['cpus']} CPUs",
                                    meta.get("pinning") and "client/daemon pinned") if x)
        if noise_notes(data, table):
            sub += " — machine was busy: numbers are noisy"
        if any(r.qsd_backend_note for r in table):
            sub += "   (* qsd side: null-co)"
        ax.set_title(f"pyvhost-blk vs qemu-storage-daemon: {title}\n{sub}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# files


def report_paths(json_path: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """(Markdown, PNG) paths next to the JSON file: RESULTS.json -> RESULTS.md, RESULTS.png."""
    p = pathlib.Path(json_path)
    base = p.with_suffix("") if p.suffix == ".json" else p
    return base.with_name(base.name + ".md"), base.with_name(base.name + ".png")


def write_reports(data: Results, md_path: str | os.PathLike[str],
                  png_path: str | os.PathLike[str] | None,
                  extra_notes: Sequence[str] = (), out: TextIO | None = None
                  ) -> list[pathlib.Path]:
    """Write the chart (if matplotlib is there) and the Markdown; return the files written.

    Without matplotlib one line (to `out`, default stderr) says how to install it."""
    md = pathlib.Path(md_path)
    written = []
    png_ref = None
    if png_path is not None:
        png = pathlib.Path(png_path)
        try:
            draw_chart(data, png)
        except ImportError:
            print(INSTALL_HINT, file=out or sys.stderr)
        else:
            written.append(png)
            png_ref = os.path.relpath(png.resolve(), md.resolve().parent)
    md.write_text(markdown(data, png_ref, extra_notes))
    written.insert(0, md)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Redraw the Markdown report and PNG chart of a benchmarks.run JSON file.")
    p.add_argument("json", metavar="RESULTS.json", help="written by benchmarks.run --json")
    p.add_argument("--md", metavar="OUT", help="Markdown file (default: RESULTS.md)")
    p.add_argument("--png", metavar="OUT", help="PNG file (default: RESULTS.png)")
    p.add_argument("--no-png", action="store_true", help="write only the Markdown")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a sentence to add to the report's notes (repeatable)")
    args = p.parse_args(argv)
    try:
        data = json.loads(pathlib.Path(args.json).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"benchmarks.report: cannot read {args.json}: {exc}", file=sys.stderr)
        return 1
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        print(f"benchmarks.report: {args.json} is not a benchmarks.run result "
              "(no 'cases' list)", file=sys.stderr)
        return 1
    md_default, png_default = report_paths(args.json)
    png = None if args.no_png else (args.png or png_default)
    for path in write_reports(data, args.md or md_default, png, args.note):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
