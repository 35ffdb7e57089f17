"""Top-1 accuracy against epsilon, one line per checkpoint (matplotlib Agg, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from smix.io import atomic_save


def _label(model: Mapping[str, Any]) -> str:
    ref = model["checkpoint"]
    method = (ref.get("method") or {}).get("name", "?")
    return f"{Path(ref['path']).stem} ({model['architecture']}, {method})"


def plot_accuracy_vs_eps(path: Path, results: Mapping[str, Any]) -> None:
    """ε = 0 is the clean accuracy, then one point per attacked ε (in /255 units)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    order = sorted(range(len(results["eps"])), key=lambda i: results["eps"][i])
    for model in results["models"]:
        keys = [f"{results['eps'][i]:g}" for i in order]
        xs = [0.0] + [results["eps"][i] for i in order]
        ys = [model["clean"]["top1"]] + [model["adversarial"][k]["top1"] for k in keys]
        ax.plot(xs, ys, marker="o", label=_label(model))
    ax.set_xlabel("ε (/255, L∞)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{results['attack'].upper()} on {results['dataset']} "
                 f"({results['n_images']} images)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
