"""`smix report RUN_DIR … --out DIR`: paper-style tables and plots from run folders.

Reads only `metrics.json` (schema `smix.metrics/1`, written by every stage through
`smix.io.RunDir`) and `log.jsonl`; it knows nothing of the stages' code. Every row names
the run folder(s) it came from, so each cell can be traced back.

Odd input: a metrics.json that is not a toolkit record (unreadable, not UTF-8 JSON, not an
object, another format, `results` not an object) stops the report with one line naming the
file; a well-formed record lacking a value shows "–" in its cell, and log lines lacking a
plotted value are left out of the plot.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from smix.errors import UserError
from smix.io import (METRICS_FORMAT, RunDir, atomic_save, atomic_write, distinct_names,
                      read_json, write_json)

KEY_PARAMS = ("mode", "scheme", "pairing", "saliency", "detector")


@dataclasses.dataclass
class Run:
    path: Path
    metrics: dict[str, Any]

    @property
    def kind(self) -> str:
        return f"{self.metrics.get('stage')}/{self.metrics.get('kind')}"

    @property
    def results(self) -> dict[str, Any]:
        return self.metrics.get("results") or {}


def method_label(method: Any) -> str:
    """`saliencymix(mode=sample)`: the mixer name plus the parameters that change the method."""
    if not isinstance(method, dict):
        return str(method or "?")
    if method.get("title"):  # written by the mixer: name + the parameters off their defaults
        return str(method["title"])
    extra = [f"{k}={method[k]}" for k in KEY_PARAMS if k in method]
    return f"{method.get('name', '?')}" + (f"({', '.join(extra)})" if extra else "")


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every folder holding a metrics.json, at or below the given paths."""
    runs, seen = [], set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise UserError(f"{root}: no such run folder")
        files = [root / "metrics.json"] if (root / "metrics.json").is_file() else \
            sorted(root.rglob("metrics.json"))
        for f in files:
            if f.resolve() in seen:
                continue
            seen.add(f.resolve())
            m = read_json(f)
            if not isinstance(m, dict):
                raise UserError(f"{f}: not a toolkit metrics.json (a JSON {type(m).__name__}, "
                                "not an object)")
            if m.get("format") != METRICS_FORMAT:
                raise UserError(f"{f}: not a toolkit metrics.json (format {m.get('format')!r})")
            if not isinstance(m.get("results") or {}, dict):
                raise UserError(f"{f}: its `results` is not an object")
            runs.append(Run(f.parent, m))
    if not runs:
        raise UserError("no metrics.json found under the given folders")
    return runs


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


@dataclasses.dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.note:
            out += [self.note, ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns)
        w.writerows(self.rows)
        return buf.getvalue()


# The training settings that change what a run measures (the seed aside): runs differing in
# any of them are different experiments, never averaged together. Read from metrics.json's
# `config` (the resolved TrainConfig); a run without one is grouped by its epochs alone.
RECIPE_KEYS = ("preset", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
               "milestones", "gamma", "warmup_epochs", "input_size", "resize", "crop",
               "train_aug", "mean", "std", "arch_kwargs", "limit_train", "limit_val")


def recipe(r: Run) -> tuple:
    """(epochs, (key, value) …): what must match, besides dataset/arch/method, to average runs."""
    config = r.metrics.get("config") if isinstance(r.metrics.get("config"), dict) else {}
    return (r.results.get("epochs"),
            *((k, json.dumps(config[k], sort_keys=True)) for k in RECIPE_KEYS if k in config))


def incomplete_epochs(results: dict[str, Any]) -> str:
    """'' for a finished run, else ' (incomplete: k of n epochs)': metrics.json is rewritten
    every epoch, so a running or crashed run's numbers are not the recipe's result."""
    done, total = results.get("epochs_done"), results.get("epochs")
    if isinstance(done, int) and isinstance(total, int) and done < total:
        return f" (incomplete: {done} of {total} epochs)"
    return ""


def _recipe_label(key: tuple, varying: set[str]) -> str:
    """The preset and batch, plus every other recipe setting that differs between rows."""
    shown = {k: v.strip('"') for k, v in key[1:]}
    return ", ".join(f"{k}={shown[k]}" for k in RECIPE_KEYS
                     if k in shown and (k in ("preset", "batch_size") or k in varying)) or "–"


def _number(value: Any, default: float = 0) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _err(r: Run, which: str, field: str) -> Any:
    """results[which][field], None ("–") where the record lacks it."""
    value = r.results.get(which)
    return value.get(field) if isinstance(value, dict) else None


def _per_seed(by_seed: dict[str, list[Run]], which: str, field: str) -> list[float | None]:
    """One value per seed: the mean of that seed's runs (a rerun or a copied run folder of one
    seed is a repeat, not another sample: counted twice it would shrink the std)."""
    out = []
    for rs in by_seed.values():
        vals = [v for v in (_err(r, which, field) for r in rs)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]
        out.append(statistics.mean(vals) if vals else None)
    return out


def _runs_cell(g: list[Run], by_seed: dict[str, list[Run]]) -> str:
    if len(g) == 1:
        return "1"
    seeds = sorted((str(r.results.get("seed")) for r in g), key=lambda s: (len(s), s))
    repeats = " (repeats of a seed count once)" if len(by_seed) < len(g) else ""
    return f"{len(g)} (seeds {','.join(seeds)}){repeats}"


def classification_table(runs: list[Run]) -> Table | None:
    cls = [r for r in runs if r.kind == "pretrain/classification" and r.results.get("best")]
    if not cls:
        return None
    # one group per setting and recipe; an unfinished run is a group (a row) of its own
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in cls:
        res = r.results
        groups[(res.get("dataset"), res.get("arch"), method_label(res.get("method")),
                recipe(r), r.path.name if incomplete_epochs(res) else "")].append(r)
    per_epoch = {k: statistics.mean(_number(r.results.get("train_time_s")) /
                                    max(_number(r.results.get("epochs_done"), 1), 1)
                                    for r in g) for k, g in groups.items()}
    varying = {k for k in RECIPE_KEYS if len({dict(key[3][1:]).get(k) for key in groups}) > 1}
    rows = []
    for key in sorted(groups, key=lambda k: (str(k[0]), str(k[1]), str(k[3]), k[2] != "none",
                                             k[2], k[4])):
        g = groups[key]
        base = per_epoch.get((key[0], key[1], "none", key[3], ""))
        overhead = "–" if not base else f"{100 * (per_epoch[key] - base) / base:+.1f}%"
        by_seed: dict[str, list[Run]] = defaultdict(list)
        for r in g:
            by_seed[str(r.results.get("seed"))].append(r)
        part = incomplete_epochs(g[0].results)
        rows.append([str(key[0]), str(key[1]), key[2], fmt(key[3][0]), _recipe_label(key[3], varying),
                     _runs_cell(g, by_seed),
                     *(mean_std(_per_seed(by_seed, which, field)) + part
                       for which, field in (("best", "top1_err"), ("best", "top5_err"),
                                            ("last", "top1_err"), ("last", "top5_err"))),
                     f"{per_epoch[key]:.1f}", overhead, ", ".join(r.path.name for r in g)])
    return Table("Classification (top-1 / top-5 error, %)",
                 ["dataset", "arch", "method", "epochs", "recipe", "runs", "best top-1 err",
                  "top-5 err @best", "last top-1 err", "last top-5 err", "s / epoch",
                  "aug. overhead", "run folders"],
                 rows, "Best = the epoch with the highest top-1 (what the papers report), with its "
                       "top-5; overhead = (T_method − T_none) / T_none per epoch (GuidedMixup, Table 2). "
                       "Several runs of one setting and recipe: mean ± std over seeds (runs of "
                       "one seed, repeats rather than samples, are averaged first); runs whose "
                       "recipe differs are separate rows. 'incomplete: k of n epochs': a run not "
                       "finished (still running or stopped), shown alone and never averaged.")


def detection_table(runs: list[Run]) -> Table | None:
    det = [r for r in runs if r.kind == "transfer/detection"]
    if not det:
        return None

    def setting(r: Run) -> tuple:
        res = r.results
        return (res.get("backend"), res.get("preset"), res.get("arch"), res.get("iters"),
                res.get("test_set"), res.get("metric"))

    def backbone_method(r: Run) -> str:
        return method_label((r.results.get("checkpoint") or {}).get("method"))

    baselines: dict[tuple, list[float]] = defaultdict(list)
    for r in det:
        if backbone_method(r) == "none" and r.results.get("AP50") is not None:
            baselines[setting(r)].append(r.results["AP50"])
    rows = []
    for r in sorted(det, key=lambda r: (str(setting(r)), backbone_method(r) != "none", backbone_method(r))):
        res = r.results
        base = baselines.get(setting(r))
        delta = "–" if not base or res.get("AP50") is None else \
            f"{res['AP50'] - statistics.mean(base):+.2f}"
        rows.append([backbone_method(r), str((res.get("checkpoint") or {}).get("arch", "?")),
                     str(res.get("backend")), str(res.get("preset")), str(res.get("arch")),
                     fmt(res.get("iters")), f"{res.get('test_set', '?')} {res.get('metric', '?')}",
                     fmt(res.get("AP50")), fmt(res.get("AP")),
                     fmt(res.get("AP75")), delta, r.path.name])
    return Table("Detection transfer (Faster R-CNN on Pascal VOC, %)",
                 ["backbone method", "backbone", "backend", "preset", "detector", "iters",
                  "test set / AP", "AP50", "AP", "AP75", "ΔAP50 vs none", "run folder"], rows,
                 "AP50 is AP at IoU 0.5 as the test set's devkit computes it (VOC2007: 11-point, "
                 "voc07-11point; VOC2010+: area, voc12-area); Δ against the `none` backbone of the "
                 "same backend, preset, detector, iterations, test set and metric.")


def _models(runs: list[Run], kind: str) -> list[tuple[Run, dict[str, Any]]]:
    return [(r, m) for r in runs if r.kind == kind for m in r.results.get("models") or []
            if isinstance(m, dict)]


def _eps_key(e: Any) -> str:
    return f"{float(e):g}"


def checkpoint_name(ck: dict[str, Any]) -> str:
    """A checkpoint as the CLI names it: its folder and file (`c10-smix/best.safetensors`), so
    a run's best and last, or two runs of one method, are told apart."""
    path = ck.get("path")
    if not path:
        return "–"
    p = Path(str(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def attack_table(runs: list[Run], kind: str) -> Table | None:
    models = _models(runs, f"robustness/{kind}")
    if not models:
        return None
    eps = sorted({_eps_key(e) for _, m in models for e in m.get("adversarial", {})}, key=float)
    rows = []
    for r, m in models:
        adv = {_eps_key(k): v for k, v in m.get("adversarial", {}).items()}
        ck = m.get("checkpoint") or {}
        rows.append([method_label(ck.get("method")), str(m.get("architecture", ck.get("arch"))),
                     str(r.results.get("dataset")), fmt(r.results.get("n_images")),
                     fmt((m.get("clean") or {}).get("top1"))]
                    + [fmt((adv.get(e) or {}).get("top1")) for e in eps]
                    + [checkpoint_name(ck), r.path.name])
    return Table(f"{kind.upper()} robustness (top-1 accuracy, %)",
                 ["backbone method", "arch", "dataset", "images", "clean"]
                 + [f"ε={e}/255" for e in eps] + ["checkpoint", "run folder"], rows,
                 "White-box, model in eval mode, ε in /255 pixel units, attack in [0,1] pixel space.")


def corruption_table(runs: list[Run]) -> Table | None:
    models = _models(runs, "robustness/corruption")
    if not models:
        return None
    rows = []
    for r, m in models:
        ck = m.get("checkpoint") or {}
        part = incomplete_note(r.results)
        rows.append([method_label(ck.get("method")), str(m.get("architecture", ck.get("arch"))),
                     str(r.results.get("dataset")), fmt(m.get("clean_error")),
                     # CIFAR-C has no mCE: a missing value is not an incomplete one
                     *(fmt(m.get(k)) + (part if m.get(k) is not None else "")
                       for k in ("mCE", "relative_mCE", "mean_error")),
                     checkpoint_name(ck), r.path.name])
    return Table("Corruption robustness (error, %)",
                 ["backbone method", "arch", "dataset", "clean err", "mCE", "relative mCE",
                  "mean corruption err", "checkpoint", "run folder"], rows,
                 "mCE normalised by AlexNet's published errors (ImageNet-C); CIFAR-C: mean error. "
                 "'incomplete: k of n': averaged over k of the n corruptions only, not "
                 "comparable with full-set numbers.")


def incomplete_note(results: dict[str, Any]) -> str:
    """'' for a corruption run over the full set, else ' (incomplete: k of n corruptions)':
    an mCE over a few corruptions is not comparable with the published ones."""
    if results.get("complete", True):
        return ""
    done = len(results.get("corruptions", []))
    return (f" (incomplete: {done} of {done + len(results.get('corruptions_missing', []))} "
            "corruptions)")


def localization_table(runs: list[Run]) -> Table | None:
    models = _models(runs, "cam/localization")
    if not models:
        return None
    rows = []
    for r, m in models:
        ck = m.get("checkpoint") or {}
        setting = f"{fmt(r.results.get('cam_threshold'))} / {r.results.get('geometry', 'crop')}"
        rows.append([method_label(ck.get("method")), str(ck.get("arch")), str(m.get("method")),
                     str(r.results.get("dataset")), setting, fmt(m.get("top1_cls")),
                     fmt(m.get("gt_known_loc")), fmt(m.get("top1_loc")), fmt(m.get("maxboxacc")),
                     fmt(m.get("maxboxacc_v2")), fmt(m.get("pointing_game")), r.path.name])
    return Table("Weakly supervised localisation from CAMs (%)",
                 ["backbone method", "arch", "CAM", "dataset", "threshold / geometry",
                  "top-1 cls", "GT-known Loc", "top-1 Loc", "MaxBoxAcc", "MaxBoxAccV2",
                  "pointing game", "run folder"], rows,
                 "Loc at IoU ≥ 0.5 with the box of the largest connected CAM region above the "
                 "threshold; MaxBoxAcc over a threshold sweep; MaxBoxAccV2: every region's box, the "
                 "best over the sweep at IoU 0.3, 0.5 and 0.7, averaged; energy-based pointing game. "
                 "Geometry crop: the checkpoint's resize + centre crop; square: the whole image "
                 "resized (Choe et al.'s WSOL evaluation).")


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_eps(runs: list[Run], out: Path) -> Path | None:
    models = _models(runs, "robustness/fgsm")
    if not models:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    # runs on several datasets share the axes: each curve then says which it was measured on
    several = len({str(r.results.get("dataset")) for r, _ in models}) > 1
    for r, m in models:
        adv = sorted((float(k), v["top1"]) for k, v in m.get("adversarial", {}).items()
                     if isinstance(v, dict) and v.get("top1") is not None)
        xs = [0.0] + [e for e, _ in adv]
        ys = [(m.get("clean") or {}).get("top1")] + [a for _, a in adv]
        ck = m.get("checkpoint") or {}
        label = f"{method_label(ck.get('method'))} [{r.path.name}: {checkpoint_name(ck)}]"
        if several:
            label += f" on {r.results.get('dataset')}"
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("ε (/255)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("FGSM: accuracy vs ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "fgsm_accuracy_vs_eps.png"
    _save_png(fig, path)
    plt.close(fig)
    return path


def plot_training(runs: list[Run], out: Path) -> Path | None:
    cls = [r for r in runs if r.kind == "pretrain/classification"]
    curves = [(r, RunDir(r.path, create=False).read_log()) for r in cls]
    curves = [(r, log) for r, log in curves if log]
    if not curves:
        return None
    plt = _figure()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r, log in curves:
        label = f"{method_label(r.results.get('method'))} [{r.path.name}]"
        for ax, key in ((a1, "train_loss"), (a2, "top1")):
            points = [(h["epoch"], h[key]) for h in log if isinstance(h, dict)
                      and h.get("epoch") is not None and h.get(key) is not None]
            ax.plot([e for e, _ in points], [v for _, v in points], marker=".", label=label)
    a1.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    a2.set(xlabel="epoch", ylabel="val top-1 (%)", title="Validation top-1")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a2.legend(fontsize=7)
    path = out / "training_curves.png"
    _save_png(fig, path)
    plt.close(fig)
    return path


def audit_section(runs: list[Run], out: Path) -> tuple[list[Table], list[Path]]:
    """The `smix audit` runs' tables and summary plots (they come first in the report: they
    say what the mixers do to the data before any training), plus their example figures."""
    from smix.audit import audit_tables, plot_summary

    tables, plots = [], []
    audits = [r for r in runs if r.kind == "audit/audit"]
    # runs/a/audit and runs/b/audit: the folder name alone would give both the same files
    tags = distinct_names([r.path for r in audits]) if len(audits) > 1 else [""]
    for r, tag in zip(audits, tags):
        tables += audit_tables(r.results, tag)
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", tag)
        plot = plot_summary(r.results, out / f"audit_summary{'_' + slug if slug else ''}.png")
        plots += [plot] if plot is not None else []
        plots += [r.path / m["figure"] for m in r.results.get("methods", [])
                  if (r.path / m.get("figure", "")).is_file()]
    return tables, plots


def build_report(paths: list[Path], out: Path) -> dict[str, Any]:
    """Write report.md, one CSV per table and the plots; return what was written."""
    runs = find_runs(paths)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror or e})") from e
    audit_tabs, audit_plots = audit_section(runs, out)
    tables = audit_tabs + [t for t in (classification_table(runs), detection_table(runs),
                                       attack_table(runs, "fgsm"), attack_table(runs, "pgd"),
                                       corruption_table(runs), localization_table(runs))
                           if t is not None]
    plots = audit_plots + [p for p in (plot_training(runs, out), plot_eps(runs, out))
                           if p is not None]
    md = ["# Report", "", f"{len(runs)} run folders: "
          + ", ".join(f"`{r.path.name}` ({r.kind})" for r in runs), ""]
    written = []
    for t in tables:
        md.append(t.markdown())
        # the title less its parenthesised units: an audit's run tag follows them
        # ("Audit: saliency detectors (%) — audA"), and two audits must not share a CSV
        title = re.sub(r"\s*\([^)]*\)", "", t.title)
        name = re.sub(r"[^a-z0-9_]+", "_", title.lower()).strip("_") + ".csv"
        atomic_write(out / name, t.csv())
        written.append(str(out / name))
    md += [f"![{p.stem}]({Path(os.path.relpath(p, out)).as_posix()})\n" for p in plots]
    md += ["## Run folders", ""] + [f"- `{r.path.name}`: {r.path.resolve()}" for r in runs]
    atomic_write(out / "report.md", "\n".join(md) + "\n")
    summary = {"report": str(out / "report.md"), "tables": written,
               "plots": [str(p) for p in plots], "runs": len(runs)}
    write_json(out / "report.json", summary)
    return summary


def main(argv: list[str]) -> int:
    from smix.cli import ArgParser

    p = ArgParser(prog="smix report", description="Paper-style tables and plots from run folders.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or folders holding them)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    summary = build_report(a.runs, a.out)
    print(f"report: {summary['report']} ({summary['runs']} runs, {len(summary['tables'])} tables, "
          f"{len(summary['plots'])} plots)")
    return 0
