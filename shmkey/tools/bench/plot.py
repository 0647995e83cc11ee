"""``shmkey bench --plot``: latency distributions per mode and throughput
against client count, drawn with matplotlib (the optional extra
``shmkey[plot]``, imported only when a plot is asked for).
"""
from __future__ import annotations

from .report import Report, short_number


def plot(report: Report, path: str) -> None:
    """Latency distributions per mode (one panel per operation) and
    throughput against client count, as a PNG.

    Raises:
        ImportError: matplotlib is missing (``pip install 'shmkey[plot]'``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ops = list(dict.fromkeys(r.op for r in report.latency))
    panels = max(1, len(ops) + (1 if report.throughput else 0))
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    colors = {"in-process": "tab:green", "socketpair": "tab:orange", "shm": "tab:blue"}
    for ax, op in zip(axes, ops):
        for r in (x for x in report.latency if x.op == op):
            xs = r.samples_us
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, label=f"{r.mode} (p50 {short_number(r.p50_us)})", color=colors.get(r.mode))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{op}, 1 client")
        ax.set_xlabel("latency (us, log)")
        ax.set_ylabel("fraction of calls")
        ax.legend(fontsize="small")
    if report.throughput:
        ax = axes[panels - 1]
        for kind in dict.fromkeys(t.kind for t in report.throughput):
            for mode in dict.fromkeys(t.mode for t in report.throughput):
                series = sorted((t for t in report.throughput if t.kind == kind and t.mode == mode),
                                key=lambda t: t.clients)
                ax.plot([t.clients for t in series], [t.ops_per_s for t in series], marker="o",
                        linestyle="-" if kind == "processes" else "--", color=colors.get(mode),
                        label=f"{mode}, {kind}")
        ax.set_title(f"{report.throughput[0].op} throughput")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ops/s")
        ax.set_xticks(sorted({t.clients for t in report.throughput}))
        ax.legend(fontsize="small")
    fig.suptitle(f"shmkey bench, RSA-{report.meta['bits']}, {report.meta['cores']} cores, "
                 f"{report.meta['date']}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
