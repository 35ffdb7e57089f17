"""The detectron2 backend: converted weights, detectron2's model, solver, launcher and evaluator.

The trainer is a small `TrainerBase` built from detectron2's public pieces (as its docs advise
for anything beyond `DefaultTrainer`'s defaults) so that: (1) the model is wrapped in DDP without
GPU device ids on CPU, letting the gloo path run; (2) checkpoints are written atomically;
(3) losses go to the run's log.jsonl; (4) an iteration runs in micro-batches with gradient
accumulation (detectron2 has none: `AccumTrainer`, a subclass of its AMPTrainer, which also gives
`amp=bf16|fp16` on CUDA), the RPN/RoI sampling seeded per image. Datasets are registered from
the toolkit's VOC reader.
Evaluation: detectron2's `PascalVOCDetectionEvaluator` gives AP/AP50/AP75 (over the classes with
ground truth, as the toolkit's means); on the very same (text-rounded) detections the toolkit's
evaluator gives the per-class APs and a cross-check.
Both read the same test images: detectron2's gets the toolkit's ids in a split file of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
import weakref
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader)
from detectron2.engine import AMPTrainer, SimpleTrainer, TrainerBase, hooks, launch
from detectron2.evaluation import PascalVOCDetectionEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import (CommonMetricPrinter, EventStorage, EventWriter,
                                     get_event_storage)
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from smix.amp import amp_dtype, autocast, grad_scaler
from smix.checkpoint import BackboneMeta, read_checkpoint
from smix.dist import pick_device
from smix.errors import UserError
from smix.io import RunDir, atomic_save, atomic_write, read_json, write_json
from smix.voc import VOCRecord
from transfer.config import Settings, TransferConfig
from transfer.convert import Conversion, save_detectron2_weights, to_detectron2
from transfer.d2_config import build_d2_config
from transfer.data import VOCSplits
from transfer.micro import (ImageSeeds, MicroChoice, all_proposals, announce, choose,
                            largest_train_size, oom_error, split)
from transfer.voc_eval import Detections, VOCResult, evaluate_voc, year_metric

TRAIN_NAME, TEST_NAME = "smix_transfer_train", "smix_transfer_test"


def to_d2_dicts(records: Sequence[VOCRecord], class_names: Sequence[str]) -> list[dict]:
    """detectron2 dataset dicts; boxes 0-based (VOC xmin-1, ymin-1) exactly as its loader does."""
    index = {n: i for i, n in enumerate(class_names)}
    return [{"file_name": str(r.image_path), "image_id": r.image_id, "height": r.height,
             "width": r.width,
             "annotations": [{"category_id": index[o.name], "bbox": list(o.box0),
                              "bbox_mode": BoxMode.XYXY_ABS} for o in r.objects]}
            for r in records]


def register(name: str, records: Sequence[VOCRecord], class_names: Sequence[str],
             dirname: Path | None = None, split: str | None = None, year: str = "2007") -> None:
    """(Re-)register a dataset; the test set carries what the VOC evaluator reads."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    dicts = to_d2_dicts(records, class_names)
    DatasetCatalog.register(name, lambda: dicts)
    meta: dict[str, Any] = {"thing_classes": list(class_names)}
    if dirname is not None:
        meta.update(dirname=str(dirname), split=split, year=int(year))  # 2007: 11-point AP
    MetadataCatalog.get(name).set(**meta)


def d2_evaluator_problem(dirname: Path, ids: Sequence[str]) -> str | None:
    """Why detectron2's evaluator could not parse these annotations (it wants <pose>,
    <truncated>, <difficult> and integer box corners), or None when it can."""
    for image_id in ids:
        xml = dirname / "Annotations" / f"{image_id}.xml"
        for obj in ET.parse(xml).getroot().findall("object"):
            for tag in ("name", "pose", "truncated", "difficult", "bndbox/xmin", "bndbox/ymin",
                        "bndbox/xmax", "bndbox/ymax"):
                node = obj.find(tag)
                if node is None or node.text is None:
                    return f"{xml}: <object> has no <{tag}>"
                if tag not in ("name", "pose"):
                    try:
                        int(node.text)
                    except ValueError:
                        return f"{xml}: <{tag}> is not an integer ({node.text!r})"
    return None


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer whose files (and `last_checkpoint` tag) are written atomically."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(),
                **{k: obj.state_dict() for k, obj in self.checkpointables.items()}, **kwargs}
        path = Path(self.save_dir) / f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_save(path, lambda tmp: torch.save(data, tmp))
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(Path(self.save_dir) / "last_checkpoint", last_filename_basename)


class RunLogWriter(EventWriter):
    """Training scalars (losses, lr, times) into the run folder's log.jsonl."""

    def __init__(self, run: RunDir, window: int = 20):
        self.run, self.window, self._last = run, window, -1

    def write(self) -> None:
        latest = get_event_storage().latest_with_smoothing_hint(self.window)
        it = max((i for _, i in latest.values()), default=-1)
        if it <= self._last:  # detectron2 writes once more after training: nothing new
            return
        self._last = it
        self.run.log({"iter": it + 1, **{k: float(v) for k, (v, _) in latest.items()}})


def d2_rounded(image_id: str, boxes: np.ndarray, scores: Sequence[float], classes: Sequence[int]
               ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """The detections as detectron2's VOC evaluator sees them: written as text with +1 on
    xmin/ymin (float32), 1 decimal for boxes, 3 for scores, then parsed back."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, :2] += np.float32(1.0)
    rounded = np.array([[float(f"{v:.1f}") for v in row] for row in b]).reshape(-1, 4)
    return (image_id, rounded, np.array([float(f"{s:.3f}") for s in scores]),
            np.asarray(classes, np.int64))


class VOCEvaluator(PascalVOCDetectionEvaluator):
    """detectron2's VOC evaluator plus the toolkit's evaluator on the same detections."""

    def __init__(self, dataset_name: str, records: Sequence[VOCRecord], run_d2: bool,
                 metric: str = "voc07", image_set: Path | None = None):
        super().__init__(dataset_name)
        self._records, self._run_d2, self._metric = list(records), run_d2, metric
        if image_set is not None:
            # detectron2's voc_eval re-reads the split file with its own parser (a blank line
            # becomes image "", `000005  1` an unknown image); give it the toolkit's ids instead
            self._image_set_path = str(image_set)

    def reset(self) -> None:
        super().reset()
        self._raw: list[tuple] = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        super().process(inputs, outputs)
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._raw.append(d2_rounded(inp["image_id"], inst.pred_boxes.tensor.numpy(),
                                        inst.scores.tolist(), inst.pred_classes.tolist()))

    def evaluate(self) -> dict:
        d2 = self._d2_evaluate() if self._run_d2 else None
        gathered = comm.gather(self._raw, dst=0)
        if not comm.is_main_process():
            return {}
        dets = Detections.concat([p for part in gathered for p in part], one_based=True)
        toolkit = evaluate_voc(self._records, dets, self._class_names, self._metric)
        return {"detectron2": None if d2 is None else {k: float(v) for k, v in d2["bbox"].items()},
                "toolkit": dataclasses.asdict(toolkit), "detections": len(dets.scores)}

    def _d2_evaluate(self) -> dict | None:
        """detectron2's evaluation over the classes with (non-difficult) ground truth only: its
        means would count a class without any as AP 0 (11-point) or NaN (area), where the
        toolkit's leave it out (`classes_without_ground_truth`); None when no class has any.
        Every process computes the same classes, so all of them enter the gather or none."""
        names, predictions = self._class_names, self._predictions
        positives = {o.name for r in self._records for o in r.objects if not o.difficult}
        kept = [i for i, name in enumerate(names) if name in positives]
        if not kept:
            return None
        self._class_names = [names[i] for i in kept]
        self._predictions = defaultdict(list, {new: predictions[old] for new, old
                                               in enumerate(kept) if old in predictions})
        try:
            return super().evaluate()
        finally:
            self._class_names, self._predictions = names, predictions


def seed_sampling(model: torch.nn.Module) -> ImageSeeds:
    """Per-image seeds for the RPN's anchor and the RoI heads' proposal sampling (both are
    per-image methods of detectron2's modules, wrapped on the instance)."""
    seeds = ImageSeeds()
    rpn, roi = model.proposal_generator, model.roi_heads
    rpn._subsample_labels = seeds.wrap("rpn", rpn._subsample_labels)
    roi._sample_proposals = seeds.wrap("roi", roi._sample_proposals)
    return seeds


class AccumTrainer(AMPTrainer):
    """detectron2's AMPTrainer step, split into micro-batches with gradient accumulation.

    The loader yields the process's whole batch; each micro-batch's loss is weighted by its share
    of it, gradients accumulate (DDP synchronises on the last pass only), the optimiser steps
    once: the big batch's step (`transfer.micro`). `precision` None trains in fp32, and the
    loss scaler is active for fp16 only.
    """

    def __init__(self, model: torch.nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer,
                 *, precision: torch.dtype | None, device: torch.device, seed: int,
                 micro_batch: int, seeds: ImageSeeds):
        super().__init__(model, data_loader, optimizer, precision=precision,
                         grad_scaler=grad_scaler(device, precision))
        self.device, self.seed, self.micro_batch, self.seeds = device, seed, micro_batch, seeds

    def run_step(self) -> None:
        assert self.model.training, "[AccumTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        self.optimizer.zero_grad()
        try:
            loss_dict = self._accumulate(data)
        except torch.cuda.OutOfMemoryError:
            raise oom_error(self.micro_batch, self.iter) from None
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def _accumulate(self, data: list[dict]) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches; returns the batch's (weighted) losses."""
        parts, totals = split(len(data), self.micro_batch), {}
        rank = comm.get_rank()
        for i, part in enumerate(parts):
            weight = (part.stop - part.start) / len(data)
            last = i == len(parts) - 1
            no_sync = (self.model.no_sync() if isinstance(self.model, DistributedDataParallel)
                       and not last else contextlib.nullcontext())
            keys = [(self.iter, rank, k) for k in range(part.start, part.stop)]
            with no_sync:
                with self.seeds.images(self.seed, keys, self.device), \
                        autocast(self.device, self.precision):
                    loss_dict = self.model(data[part])
                losses = sum(v.float() for v in loss_dict.values())
                self.grad_scaler.scale(losses * weight).backward()
            for k, v in loss_dict.items():
                totals[k] = totals.get(k, 0.0) + weight * v.detach().float()
        return totals

    def load_state_dict(self, state_dict: dict) -> None:
        SimpleTrainer.load_state_dict(self, state_dict)
        if state_dict.get("grad_scaler"):  # absent in runs written before AMP support
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def probe_step(model: torch.nn.Module, cfg: CfgNode, precision: torch.dtype | None
               ) -> tuple[Callable[[], None], tuple[int, int]]:
    """One training forward/backward on one synthetic image of the largest training size (for
    `micro_batch=auto`), on the model before DDP wraps it; gradients dropped, RNG untouched."""
    h, w = largest_train_size(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN)
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    inst = Instances((h, w), gt_boxes=Boxes(torch.tensor([[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])),
                     gt_classes=torch.tensor([0]))
    data = [{"image": image, "instances": inst, "height": h, "width": w}]
    device = torch.device(cfg.MODEL.DEVICE)

    def step() -> None:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                EventStorage(), all_proposals(model.proposal_generator), \
                autocast(device, precision):  # (the heads log their sample counts)
            loss_dict = model(data)
        sum(v.float() for v in loss_dict.values()).backward()
        model.zero_grad(set_to_none=True)
    return step, (h, w)


def choose_micro_batch(model: torch.nn.Module, cfg: CfgNode, setting: int | None,
                       precision: torch.dtype | None) -> MicroChoice:
    """The micro-batch of every process: each probes its own device; all use the smallest."""
    per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
    choice = choose(setting, per_process, torch.device(cfg.MODEL.DEVICE),
                    *probe_step(model, cfg, precision), sharing=comm.get_local_size())
    smallest = min(comm.all_gather(choice), key=lambda c: c.micro_batch)
    if comm.is_main_process():
        announce(smallest)
    return smallest


class Trainer(TrainerBase):
    """AccumTrainer + LR schedule + periodic atomic checkpoints + logging, resumable."""

    def __init__(self, cfg: CfgNode, run: RunDir, log_period: int, micro_batch: int | None,
                 amp: str):
        super().__init__()
        model = build_model(cfg)
        self.optimizer = build_optimizer(cfg, model)
        loader = build_detection_train_loader(cfg)
        device = torch.device(cfg.MODEL.DEVICE)
        precision = amp_dtype(amp, device, allow_cpu=False)
        seeds = seed_sampling(model)
        self.micro = choose_micro_batch(model, cfg, micro_batch, precision)
        if comm.get_world_size() > 1:
            on_gpu = cfg.MODEL.DEVICE.startswith("cuda")
            model = DistributedDataParallel(
                model, device_ids=[comm.get_local_rank()] if on_gpu else None,
                broadcast_buffers=False)
        self.model = model
        self._trainer = AccumTrainer(model, loader, self.optimizer, precision=precision,
                                     device=device, seed=cfg.SEED,
                                     micro_batch=self.micro.micro_batch, seeds=seeds)
        self.max_iter = cfg.SOLVER.MAX_ITER
        # --iters 0 evaluates the untrained detector; detectron2's schedulers need >= 1 update.
        self.scheduler = build_lr_scheduler(cfg, self.optimizer) if self.max_iter else None
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.cfg = cfg
        steps: list[hooks.HookBase | None] = [hooks.IterationTimer()]
        if self.scheduler is not None:
            steps.append(hooks.LRScheduler())
        if comm.is_main_process():
            steps.append(hooks.PeriodicCheckpointer(self.checkpointer,
                                                    cfg.SOLVER.CHECKPOINT_PERIOD))
            steps.append(hooks.PeriodicWriter(
                [CommonMetricPrinter(self.max_iter), RunLogWriter(run)], period=log_period))
        self.register_hooks(steps)

    def resume_or_load(self, resume: bool) -> None:
        """The last checkpoint of this run folder when resuming, else the converted backbone."""
        self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1

    def run_step(self) -> None:
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "_trainer": self._trainer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._trainer.load_state_dict(state_dict["_trainer"])


@dataclasses.dataclass(frozen=True)
class D2Job:
    """Everything a (possibly spawned) worker needs; picklable."""

    cfg: CfgNode
    train: tuple[VOCRecord, ...]
    test: tuple[VOCRecord, ...]
    class_names: tuple[str, ...]
    test_dir: Path
    test_split: str
    test_year: str
    run: Path
    resume: bool
    log_period: int
    run_d2_evaluator: bool
    micro_batch: int | None = None  # None: auto
    amp: str = "off"
    image_set: Path | None = None  # the test ids, one a line, for detectron2's evaluator


def fresh_d2_logger(log_file: Path) -> None:
    """detectron2's logger writing to this run's log only. `setup_logger` adds handlers on every
    new output path, so several runs in one process (the demo) would print each line once per
    run so far; drop the previous runs' handlers and its call cache first."""
    logger = logging.getLogger("detectron2")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    setup_logger.cache_clear()
    setup_logger(str(log_file), distributed_rank=comm.get_rank(), name="detectron2")
    for handler in logger.handlers:  # its console lines are progress: stderr, as every stage's;
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)  # stdout carries the result's JSON line alone


def worker(job: D2Job) -> None:
    """One process of the job (all of it when not distributed): register, train, evaluate."""
    out = Path(job.cfg.OUTPUT_DIR)
    fresh_d2_logger(out / "log.txt")
    seed_all_rng(job.cfg.SEED + comm.get_rank())
    register(TRAIN_NAME, [r for r in job.train if r.objects], job.class_names)
    register(TEST_NAME, job.test, job.class_names, job.test_dir, job.test_split, job.test_year)
    run = RunDir(job.run)
    # a user error raised inside detectron2's loop (CUDA OOM) ends in its one line, no traceback
    logging.getLogger("detectron2.engine.train_loop").addFilter(
        lambda rec: not (rec.exc_info and isinstance(rec.exc_info[1], UserError)))
    trainer = Trainer(job.cfg, run, job.log_period, job.micro_batch, job.amp)
    trainer.resume_or_load(job.resume)
    start = trainer.start_iter
    if job.resume and comm.is_main_process():  # drop what a killed run logged after the checkpoint
        run.write_log([r for r in run.read_log() if r.get("iter", 0) <= start])
    trainer.train(start, trainer.max_iter)
    if comm.is_main_process() and not (out / "model_final.pth").exists():
        trainer.checkpointer.save("model_final")  # e.g. --iters 0: the untrained detector
    evaluator = VOCEvaluator(TEST_NAME, job.test, job.run_d2_evaluator,
                             year_metric(job.test_year), job.image_set)
    loader = build_detection_test_loader(job.cfg, TEST_NAME)
    results = inference_on_dataset(trainer.model, loader, evaluator)
    if comm.is_main_process():
        write_json(out / "eval.json", {**results, "start_iter": start,
                                       "micro_batch": dataclasses.asdict(trainer.micro)})
    comm.synchronize()
    logging.getLogger("detectron2").info("transfer worker done")


def _result(ev: dict) -> VOCResult:
    """Headline AP/AP50/AP75 from detectron2's evaluator, per class from the toolkit's."""
    tk = ev["toolkit"]
    tk["classes_without_ground_truth"] = tuple(tk["classes_without_ground_truth"])
    toolkit = VOCResult(**tk)
    d2 = ev.get("detectron2")
    return toolkit if d2 is None else dataclasses.replace(
        toolkit, AP=d2["AP"], AP50=d2["AP50"], AP75=d2["AP75"])


def run_detectron2(cfg: TransferConfig, s: Settings, splits: VOCSplits, run: RunDir,
                   ckpt_sha: str) -> tuple[VOCResult | None, dict[str, Any]]:
    """Convert, configure, launch (detectron2's launcher), and read rank 0's evaluation."""
    meta, conv, weights = convert_checkpoint(cfg.ckpt, run, ckpt_sha)
    out = run.file("detectron2")
    d2cfg = build_d2_config(meta, cfg.arch, splits.class_names, s, weights=weights,
                            output_dir=out, train=[TRAIN_NAME], test=[TEST_NAME],
                            device=pick_device(cfg.device).type)
    atomic_write(out / "config.yaml", d2cfg.dump())
    problem = d2_evaluator_problem(splits.test_dir, [r.image_id for r in splits.test])
    if problem:
        print(f"smix transfer: detectron2's VOC evaluator cannot read the test annotations "
              f"({problem}); AP comes from the toolkit's evaluator", file=sys.stderr)
    image_set = out / "test_ids.txt"  # the ids the toolkit read, as detectron2's evaluator reads
    atomic_write(image_set, "".join(f"{r.image_id}\n" for r in splits.test))
    job = D2Job(d2cfg, splits.train, splits.test, splits.class_names, splits.test_dir,
                splits.test_set.split("/", 1)[1], splits.test_year, run.path, cfg.resume,
                s.log_period, problem is None, s.micro_batch, s.amp, image_set)
    (out / "eval.json").unlink(missing_ok=True)
    launch(worker, cfg.num_gpus, num_machines=cfg.num_machines, machine_rank=cfg.machine_rank,
           dist_url=cfg.dist_url, args=(job,))
    facts = {"weights": "detectron2/model_final.pth", "detectron2_config": "detectron2/config.yaml",
             "conversion": {"converted": len(conv.mapping), "unconverted": list(conv.unconverted),
                            "dropped_counters": conv.dropped_counters},
             "world_size": cfg.num_gpus * cfg.num_machines}
    if cfg.machine_rank != 0:
        return None, facts
    ev = read_json(out / "eval.json")
    result = _result(ev)
    toolkit = ev["toolkit"]
    facts.update(start_iter=ev["start_iter"], detections=ev["detections"],
                 micro_batch=ev["micro_batch"], amp=s.amp,
                 evaluator="detectron2.PascalVOCDetectionEvaluator" if problem is None
                 else "toolkit (detectron2's could not read the annotations)",
                 toolkit_evaluator={k: toolkit[k] for k in ("AP", "AP50", "AP75")})
    return result, facts


def convert_checkpoint(ckpt: Path, run: RunDir, ckpt_sha: str
                       ) -> tuple[BackboneMeta, Conversion, Path]:
    """Write the converted backbone pickle into the run folder and report what was left out."""
    state, meta = read_checkpoint(ckpt)
    conv = to_detectron2(state)
    path = run.file("detectron2") / "backbone_d2.pkl"
    save_detectron2_weights(path, conv, author=f"smix-toolkit {meta.arch} sha256:{ckpt_sha}")
    run.log({"event": "converted", "converted": len(conv.mapping),
             "unconverted": list(conv.unconverted), "dropped_counters": conv.dropped_counters})
    if conv.unconverted:
        print(f"smix transfer: not converted (no detectron2 counterpart): "
              f"{', '.join(conv.unconverted)}", file=sys.stderr)
    return meta, conv, path
