"""Charts of the main job (matplotlib, the optional ``[bench]`` extra).

* ``<prefix>.<family>.png``: the family's sweep, time and peak memory against the size
  axis, one line per provider, log-log, the fitted exponent in the legend;
* ``<prefix>.summary.png``: the speed-up of every op over its baseline
  (forward+backward where measured, else forward), log scale, 1x marked.
"""

from __future__ import annotations

import os

from mmkernels.bench.report import summary_rows


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def family_chart(name: str, suite_res: dict, path: str) -> bool:
    """Write the family's sweep chart to ``path``; False (nothing written) without a
    sweep of at least two sizes."""
    scaling = suite_res["scaling"]
    if not any(len(e["time"]["points"]) >= 2 for e in scaling.values()):
        return False
    sizes = sorted({x for e in scaling.values() for x, _ in e["time"]["points"]})
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for prov, e in scaling.items():
        for ax, metric, scale in ((ax_t, "time", 1.0), (ax_m, "memory", 2.0 ** -20)):
            pts = sorted(e[metric]["points"])
            if not pts:
                continue
            exp = e[metric]["exponent"]
            label = prov if exp is None else f"{prov} (~size^{exp:.2f})"
            ax.plot([s for s, _ in pts], [v * scale for _, v in pts], marker="o", label=label)
    for ax, ylabel in ((ax_t, f"{suite_res['sweep_mode']} median (ms)"),
                       (ax_m, f"peak memory, {suite_res['sweep_memory_mode']} (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(suite_res["size_axis"])
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{name}: time and peak memory against {suite_res['size_axis']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def summary_chart(results: dict, path: str) -> bool:
    """Write the speed-up summary to ``path``; False when no op has a speed-up."""
    bars = []
    for r in summary_rows(results):
        mode = "forward+backward" if r["speedup"].get("forward+backward") else "forward"
        sp = r["speedup"].get(mode)
        if sp:
            short = "fwd+bwd" if mode == "forward+backward" else "fwd"
            bars.append((f"{r['case']} vs {r['baseline']} ({short})", sp))
    if not bars:
        return False
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(9, 0.34 * len(bars) + 1.2), dpi=110)
    labels = [b[0] for b in bars][::-1]
    values = [b[1] for b in bars][::-1]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(labels, values, color=colors)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up over the baseline (baseline time / mmkernels time)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"mmkernels {results['mmkernels']} on {results['device']} "
                 f"({results['threads']} threads)" if results.get("threads") else
                 f"mmkernels {results['mmkernels']} on {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_charts(results: dict, prefix: str) -> list[str]:
    """Every chart of ``results``, named ``<prefix>.<family>.png`` and
    ``<prefix>.summary.png``; returns the paths written ([] without matplotlib)."""
    if not available():
        return []
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    written = []
    for name, suite_res in results["suites"].items():
        path = f"{prefix}.{name}.png"
        if family_chart(name, suite_res, path):
            written.append(path)
    path = f"{prefix}.summary.png"
    if summary_chart(results, path):
        written.append(path)
    return written
