"""Fit and plot for benchmarks/compounding_error.py: the growth exponent of error against horizon, with intervals,
and one log-log panel per setting. Pure numpy/matplotlib; knows nothing of the experiment's world."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# method key -> (legend label, colour); the order is the legend's
METHODS = {"bc": ("behaviour cloning", "C3"),
           "il": ("online IRL (demos only, learned reward)", "C0"),
           "dagger": ("DAgger (queries the expert)", "C2")}


def fit_exponent(horizons: list[int] | np.ndarray, errors: np.ndarray) -> dict:
    """Least-squares fit of log(error) = a + b log(T).

    errors [seeds, len(horizons)] (or [len(horizons)]). Returns b, a, b's 95% t-interval over every point, and a
    95% interval from resampling seeds (percentile bootstrap of the seed-mean curve; None for one seed)."""
    t = np.asarray(horizons, dtype=np.float64)
    e = np.atleast_2d(np.asarray(errors, dtype=np.float64))
    if e.shape[1] != t.size or t.size < 2:
        raise ValueError(f"errors has shape {e.shape}; it needs [seeds, {t.size}] with at least 2 horizons")
    if not np.all(e > 0) or not np.all(t > 0):
        raise ValueError("fit_exponent takes logs: every horizon and error must be > 0 "
                         f"(got min error {e.min():.3g}); raise eval_rollouts or drop the zero points")
    x, y = np.tile(np.log(t), e.shape[0]), np.log(e).ravel()
    b, a = np.polyfit(x, y, 1)
    n = x.size
    if n > 2:
        resid = y - (a + b * x)
        se = math.sqrt(resid @ resid / (n - 2) / ((x - x.mean()) @ (x - x.mean())))
        half = _t975(n - 2) * se
        ci = [float(b - half), float(b + half)]
    else:
        ci = [float(b), float(b)]
    boot = None
    if e.shape[0] > 1:
        rng = np.random.default_rng(0)
        idx = rng.integers(0, e.shape[0], size=(2000, e.shape[0]))
        slopes = [np.polyfit(np.log(t), np.log(e[i].mean(0)), 1)[0] for i in idx]
        boot = [float(q) for q in np.percentile(slopes, [2.5, 97.5])]
    return {"exponent": float(b), "intercept": float(a), "ci": ci, "ci_seed_bootstrap": boot}


def _t975(df: int) -> float:
    """97.5% quantile of Student's t (table to 30 degrees of freedom, then the normal's 1.96 plus a 1/df term)."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]
    return table[df - 1] if df <= len(table) else 1.96 + 2.4 / df


def summarize(horizons: tuple[int, ...], per_seed: np.ndarray, step_error: list, name: str) -> dict:
    """The JSON keys of one method in one setting: mean, s.e., per-seed errors, the fit and local slopes."""
    fit = fit_exponent(horizons, per_seed)
    n = per_seed.shape[0]
    return {
        f"{name}_error": per_seed.mean(0).tolist(),
        f"{name}_error_sem": (per_seed.std(0, ddof=1) / math.sqrt(n)).tolist() if n > 1 else [0.0] * len(horizons),
        f"{name}_error_per_seed": per_seed.tolist(),
        f"{name}_step_error_per_seed": step_error,
        f"{name}_exponent": fit["exponent"], f"{name}_intercept": fit["intercept"],
        f"{name}_exponent_ci": fit["ci"], f"{name}_exponent_ci_seed_bootstrap": fit["ci_seed_bootstrap"],
        f"{name}_local_exponents": (np.diff(np.log(per_seed.mean(0))) / np.diff(np.log(horizons))).tolist(),
    }


def plot(report: dict, path: Path) -> None:
    """One log-log panel per setting in report["by_setting"]: mean ± s.e. per method and its fitted a·T^b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = report["by_setting"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (setting, r) in zip(axes[0], panels.items()):
        t = np.array(r["horizons"], dtype=np.float64)
        for name, (label, color) in METHODS.items():
            b, lo, hi = r[f"{name}_exponent"], *r[f"{name}_exponent_ci"]
            ax.errorbar(t, r[f"{name}_error"], yerr=r[f"{name}_error_sem"], fmt="o", color=color, capsize=3,
                        label=f"{label}: T^{b:.2f} [{lo:.2f}, {hi:.2f}]")
            ax.plot(t, np.exp(r[f"{name}_intercept"]) * t ** b, "-", color=color, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("horizon T (tokens)")
        ax.set_ylabel("expected steps off the expert's token")
        primary = " (primary)" if setting == report["primary_setting"] else ""
        ax.set_title(f"{setting}{primary}: {r['state']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"compounding error, {len(report['seeds'])} seeds (mean ± s.e.), fitted a·T^b, 95% t-interval",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
