"""``heft plot RUN_DIR``: one PNG with what people look at first, drawn from metrics.jsonl.

Panels: training loss (and held-out loss), per-domain training loss, per-domain sample weight and
realised fraction of the batch, the effective sample size of the weights, the domain mixture (each
domain's target weight and the fraction drawn), and the time steps waited for data. Panels whose metrics
the run did not log (no reweighting, no evaluation) say so instead of staying blank.
"""

from __future__ import annotations

from pathlib import Path

from heft.launcher.metrics import records


def read_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records); the file must exist, be intact and hold a training record."""
    log = records.read(run_dir)
    if not log.exists:
        raise FileNotFoundError(f"{log.path} not found: {run_dir} is not a heft run directory (no metrics.jsonl)")
    log.check_intact()
    if not log.train:
        raise ValueError(f"{log.path} has no training records yet; plot after the first log line")
    return log.train, log.evals


def _domains(records: list[dict], suffix: str, prefix: str = "domain_") -> list[str]:
    names = []
    for record in records:
        for key in record:
            if key.startswith(prefix) and key.endswith(suffix):
                name = key[len(prefix):-len(suffix)]
                if name not in names:
                    names.append(name)
    return names


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_records(run_dir)
    out = Path(out) if out else run_dir / "plots.png"
    fig, axes = plt.subplots(3, 2, figsize=(12, 12), constrained_layout=True)
    fig.suptitle(f"heft run {run_dir}")

    ax = axes[0][0]
    ax.plot(*_series(train, "loss"), label="train")
    if evals:
        ax.plot(*_series(evals, "eval_loss"), "o-", label="held-out")
    ax.set(title="loss", xlabel="step", ylabel="token-mean loss")
    ax.legend()

    ax = axes[0][1]
    for name in _domains(train, "_loss"):
        ax.plot(*_series(train, f"domain_{name}_loss"), label=name)
    ax.set(title="training loss per domain", xlabel="step")
    ax.legend()

    ax = axes[1][0]
    weighted = _domains(train, "_weight")
    for i, name in enumerate(_domains(train, "_fraction")):
        color = f"C{i}"
        ax.plot(*_series(train, f"domain_{name}_fraction"), color=color, linestyle="--",
                label=f"{name} fraction")
        if name in weighted:
            ax.plot(*_series(train, f"domain_{name}_weight"), color=color, label=f"{name} mean weight")
    ax.set(title="per-domain mean sample weight (solid) and batch fraction (dashed)", xlabel="step")
    ax.legend(fontsize="small")

    ax = axes[1][1]
    steps, ess = _series(train, "ess_fraction")
    if steps:
        ax.plot(steps, ess)
        ax.set_ylim(0, 1.05)
    else:
        ax.text(0.5, 0.5, "no reweighting in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="effective sample size / batch size", xlabel="step")

    ax = axes[2][0]
    for i, name in enumerate(_domains(train, "_target", prefix="mixture_")):
        ax.plot(*_series(train, f"mixture_{name}_target"), color=f"C{i}", label=f"{name} target")
        ax.plot(*_series(train, f"mixture_{name}_realised"), color=f"C{i}", linestyle="--",
                label=f"{name} drawn")
    ax.set(title="domain mixture: target weight (solid) and fraction drawn (dashed)", xlabel="step")
    ax.legend(fontsize="small")

    ax = axes[2][1]
    steps, waits = _series(train, "data_wait_s")
    ax.plot(steps, [1000 * w for w in waits])
    ax.set(title="time a step waited for its batch", xlabel="step", ylabel="ms")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
