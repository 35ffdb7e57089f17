"""`smix demo [--out DIR] [--quick]`: the whole pipeline on freshly generated shapes data.

shapes data -> audit (what each mixer does to the objects and labels; which saliency detector
finds the objects) -> pretrain (none, cutmix, saliencymix) -> detection transfer (detectron2
when installed, else torchvision) -> FGSM sweep -> CAM grid + localisation -> report. Every step
is a real `smix` command run through the same dispatcher a user types, so the demo is also the
integration test of the command lines. Sized for ≤ 8 minutes on a 2-core CPU (`--quick`: a
smoke run for tests).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex
import time
from pathlib import Path

from tqdm import tqdm

from smix.errors import UserError

METHODS = ("none", "cutmix", "saliencymix")
# The demo's SaliencyMix detector. The audit (the demo's first step, and the report's first
# table) measures why: on this data frequency_tuned's argmax lies in the object's box in ~99%
# of images, while fine_grained's falls *below* chance (13% against 18% on the 64 px shapes).
DETECTOR = "frequency_tuned"
AUDIT_METHODS = ("none,cutout,mixup,cutmix,saliencymix:detector=fine_grained,"
                 f"saliencymix:detector={DETECTOR},guidedmixup")


@dataclasses.dataclass(frozen=True)
class DemoSize:
    classes: int
    per_class: int
    size: int
    epochs: int
    det_iters: int
    fgsm_limit: int
    audit_pairs: int


# 80 px, not 64: ResNet-18's layer4 is then 3×3 instead of 2×2, which CAM localisation needs
# (measured on the `none` backbone: best box accuracy over thresholds 26% at 64 px, 61% at 80).
FULL = DemoSize(classes=4, per_class=150, size=80, epochs=3, det_iters=80, fgsm_limit=0,
                audit_pairs=512)
QUICK = DemoSize(classes=3, per_class=8, size=32, epochs=1, det_iters=4, fgsm_limit=12,
                 audit_pairs=8)
# A 3×3 CAM upsampled to the image is blurry: at CAM's usual 0.2 of the maximum the region is
# most of the image. 0.5 is the threshold of the best box accuracy (MaxBoxAcc, which the
# localisation table also reports over a sweep) for the `none` backbone on this data.
CAM_THRESHOLD = 0.5
# The demo's data: large objects on a mild texture, one colour per class, so that three CPU
# epochs train a backbone (see smix.shapes).
SHAPES_ARGS = ["--radius", "0.25,0.4", "--texture", "0.15", "--class-colours"]


def method_args(method: str) -> list[str]:
    return [f"method.detector={DETECTOR}"] if method == "saliencymix" else []


def steps(out: Path, s: DemoSize, detectron2: bool = False, backend: str = "auto"
          ) -> list[tuple[str, list[str]]]:
    """The demo as a list of (title, smix argv). Detection uses `--backend auto` (detectron2
    when installed, else torchvision) unless `backend` names one; `detectron2` is unused (kept
    for callers)."""
    data, runs = out / "data", out / "runs"
    quick = s is QUICK
    fast = ["workers=0", "progress=false"] if quick else []
    plan: list[tuple[str, list[str]]] = [
        ("generate shapes data", ["data", "shapes", str(data), "--classes", str(s.classes),
                                  "--per-class", str(s.per_class), "--size", str(s.size),
                                  *SHAPES_ARGS]),
        ("audit: saliency detectors and mixers on the data's boxes", [
            "audit", "--data", str(data), "--out", str(runs / "audit"), "--size", str(s.size),
            "--pairs", str(s.audit_pairs), "--batch-size", "32" if not quick else "4",
            "--methods", AUDIT_METHODS, "--no-progress"]),
    ]
    for m in METHODS:
        plan.append((f"pretrain resnet18 with {m}", [
            "pretrain", "--preset", "shapes-resnet18", "--data", str(data), "--method", m,
            "--out", str(runs / f"pretrain-{m}"), "--epochs", str(s.epochs),
            f"input_size={s.size}", f"resize={s.size}", f"crop={s.size}", *method_args(m),
            *fast]))
    ckpts = [str(runs / f"pretrain-{m}" / "backbone.safetensors") for m in METHODS]
    for m, ck in zip(METHODS, ckpts):
        plan.append((f"detection transfer from the {m} backbone", [
            "transfer", "--ckpt", ck, "--voc-root", str(data), "--out",
            str(runs / f"transfer-{m}"), "--backend", backend, "--arch", "fpn",
            "--classes", "auto", "--iters", str(s.det_iters), "--resume",
            *demo_detection_overrides(s)]))
    limit = ["--limit", str(s.fgsm_limit)] if s.fgsm_limit else []
    plan.append(("FGSM sweep", ["robustness", "fgsm", *sum((["--ckpt", c] for c in ckpts), []),
                                "--data", str(data / "val"), "--out", str(runs / "fgsm"),
                                "--eps", "1,2,4,8", *limit]))
    plan.append(("CAM figure grid", ["cam", "export", *sum((["--ckpt", c] for c in ckpts), []),
                                     "--images", *cam_images(data, s), "--out",
                                     str(runs / "cam-export")]))
    for m, ck in zip(METHODS, ckpts):
        plan.append((f"CAM localisation ({m})", [
            "cam", "localize", "--ckpt", ck, "--voc-root", str(data), "--out",
            str(runs / f"cam-loc-{m}"), "--cam-threshold", str(CAM_THRESHOLD)]))
    plan.append(("report", ["report", str(runs), "--out", str(out / "report")]))
    return plan


def why_detector(audit_dir: Path) -> str:
    """One line from the audit's numbers: why the demo's SaliencyMix uses DETECTOR."""
    from smix.io import read_json

    dets = read_json(audit_dir / "metrics.json")["results"]["detectors"]
    chosen, chance = dets[DETECTOR], dets[DETECTOR]["chance"]
    others = ", ".join(f"{n} {100 * d['hit_rate']:.0f}%" for n, d in dets.items() if n != DETECTOR)
    return (f"saliencymix uses detector={DETECTOR}: on this data its saliency argmax lies in the "
            f"object's box in {100 * chosen['hit_rate']:.0f}% of images (a random point: "
            f"{100 * chance:.0f}%; {others})")


def demo_detection_overrides(s: DemoSize) -> list[str]:
    """Detector sized to the tiny images and a CPU: input at the image size, small anchors,
    fewer proposals and RoIs per image than the VOC recipe (which is for 800 px photos)."""
    return [f"min_size={s.size}", f"max_size={s.size}", "batch=4", "lr=0.02",
            "anchor_sizes=16,32,64,128,256", "roi_batch=64", "rpn_post_nms_train=300",
            "rpn_post_nms_test=100", "workers=0"]


def cam_images(data: Path, s: DemoSize) -> list[str]:
    """One validation image per class (known names: the generator's own layout)."""
    from smix.shapes import SHAPES
    return [str(data / "val" / c / f"val_{c}_00000.jpg") for c in SHAPES[: s.classes]]


def _out_of(argv: list[str]) -> Path | None:
    for flag in ("--out",):
        if flag in argv:
            return Path(argv[argv.index(flag) + 1])
    return Path(argv[2]) if argv[:2] == ["data", "shapes"] else None


def resolve_step(argv: list[str]) -> list[str] | None:
    """What to run so that an interrupted demo continues: None when the step is complete,
    `--resume` for a pretraining run that was killed part-way, else the step itself."""
    out = _out_of(argv)
    if out is None:
        return argv
    marker = out / ("shapes.json" if argv[0] == "data" else "metrics.json")
    if not marker.is_file():
        return argv
    if argv[0] != "pretrain":
        return None  # (an unfinished transfer has no metrics.json and runs with --resume)
    from smix.io import read_json
    res = read_json(marker).get("results", {})
    if res.get("epochs_done") == res.get("epochs"):
        return None
    return ["pretrain", "--resume", str(out)]


def check_demo_size(out: Path, s: DemoSize) -> None:
    """Continue only a demo of the same size: its steps are skipped when their outputs exist,
    so a full demo in a `--quick` demo's folder would report the smoke run's numbers. The size
    is recorded in out/demo.json; a folder from before that record is judged by its data."""
    from smix.io import read_json, write_json

    record, shapes = out / "demo.json", out / "data" / "shapes.json"
    wanted = dataclasses.asdict(s)
    if record.is_file():
        recorded = read_json(record)
        found = recorded.get("size") if isinstance(recorded, dict) else None
        same = found == wanted
    elif shapes.is_file():
        data = read_json(shapes)
        found = {k: data.get(k) for k in ("classes", "size")} if isinstance(data, dict) else None
        same = found is not None and found["size"] == s.size and \
            isinstance(found["classes"], list) and len(found["classes"]) == s.classes
    else:
        same = True
    if not same:
        kind = "--quick" if s is QUICK else "full"
        raise UserError(f"{out} holds a demo of another size than this {kind} one ({found}); "
                        "pass another --out, or delete that folder to start over")
    write_json(record, {"size": wanted})


def run_demo(out: Path, quick: bool = False, backend: str = "auto", threads: int = 1) -> Path:
    """Run (or continue) the demo on `threads` torch intra-op threads. One by default: its
    tensors are small (64 px, detection batches of 4), and when anything else runs on a 2-core
    machine two threads wait on each other (measured, detection transfer: 4 s/iteration on
    two threads against 0.7 s on one while another job held a core)."""
    import torch

    from smix.cli import run

    if threads < 1:
        raise UserError("--threads must be at least 1")
    torch.set_num_threads(threads)

    detectron2 = importlib.util.find_spec("detectron2") is not None
    check_demo_size(out, QUICK if quick else FULL)
    plan = steps(out, QUICK if quick else FULL, detectron2, backend)
    chosen = backend if backend != "auto" else (
        "detectron2" if detectron2 else "torchvision; detectron2 not installed")
    print(f"demo: {len(plan)} steps into {out} (detection: {chosen})")
    start = time.perf_counter()
    for i, (title, argv) in enumerate(tqdm(plan, desc="demo", unit="step"), 1):
        todo = resolve_step(argv)
        if todo is None:
            tqdm.write(f"[{i}/{len(plan)}] {title}: already done, skipped")
            continue
        tqdm.write(f"\n[{i}/{len(plan)}] {title}\n  $ smix {shlex.join(todo)}")
        t0 = time.perf_counter()
        if run(todo[0], todo[1:]) != 0:
            raise UserError(f"demo step {i} ({title}) failed; see the message above")
        tqdm.write(f"  done in {time.perf_counter() - t0:.0f} s")
        if todo[0] == "audit":
            tqdm.write("  " + why_detector(out / "runs" / "audit"))
    report = out / "report" / "report.md"
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; report: {report}")
    return report


def main(argv: list[str]) -> int:
    from smix.cli import ArgParser

    p = ArgParser(prog="smix demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (for tests)")
    p.add_argument("--detection-backend", default="auto",
                   choices=("auto", "detectron2", "torchvision"),
                   help="auto (default): detectron2 when installed, else torchvision")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a = p.parse_args(argv)
    run_demo(a.out, a.quick, a.detection_backend, a.threads)  # an existing --out continues where it stopped
    return 0
