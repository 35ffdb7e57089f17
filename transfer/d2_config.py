"""detectron2 config for Faster R-CNN R50/R101 C4 and R18..R101 FPN, built in code.

Not through `detectron2.model_zoo` (it needs pkg_resources): the values of Base-RCNN-C4.yaml,
Base-RCNN-FPN.yaml and PascalVOC-Detection/faster_rcnn_R_50_C4.yaml are set here, the schedule
comes from the resolved `Settings`, and the preprocessing contract from the checkpoint:
PIXEL_MEAN/STD = mean/std x 255 (RGB), INPUT.FORMAT RGB, RESNETS.STRIDE_IN_1X1 False (torchvision
ResNets stride in the 3x3), FrozenBN with FREEZE_AT 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from detectron2.config import CfgNode, get_cfg

from smix.arch import arch_spec
from smix.checkpoint import BackboneMeta
from smix.errors import UserError
from transfer.config import Settings

FPN_FEATURES = ["res2", "res3", "res4", "res5"]


def _c4(cfg: CfgNode) -> None:
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]


def _fpn(cfg: CfgNode, depth: int) -> None:
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = list(FPN_FEATURES)
    cfg.MODEL.FPN.IN_FEATURES = list(FPN_FEATURES)
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # basic blocks: res2 has 64 channels


def _model(cfg: CfgNode, meta: BackboneMeta, arch: str, num_classes: int, s: Settings) -> None:
    depth = arch_spec(meta.arch).depth
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.PIXEL_MEAN = [255.0 * m for m in meta.mean]
    cfg.MODEL.PIXEL_STD = [255.0 * v for v in meta.std]
    cfg.INPUT.FORMAT = "RGB"
    if arch == "c4":
        _c4(cfg)
    else:
        _fpn(cfg, depth)
    sizes = [list(s.anchor_sizes)] if arch == "c4" else [[a] for a in s.anchor_sizes]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = sizes
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = s.rpn_batch
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = s.rpn_pre_nms_train
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = s.rpn_post_nms_train
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = s.rpn_pre_nms_test
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = s.rpn_post_nms_test
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = s.roi_batch
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = s.score_thresh
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = s.nms_thresh
    cfg.TEST.DETECTIONS_PER_IMAGE = s.detections_per_image


def _solver(cfg: CfgNode, s: Settings) -> None:
    cfg.SOLVER.IMS_PER_BATCH = s.batch
    cfg.SOLVER.BASE_LR = s.lr
    cfg.SOLVER.MAX_ITER = s.max_iter
    cfg.SOLVER.STEPS = tuple(s.steps)
    cfg.SOLVER.WARMUP_ITERS = s.warmup_iters
    cfg.SOLVER.WARMUP_FACTOR = s.warmup_factor
    cfg.SOLVER.GAMMA = s.gamma
    cfg.SOLVER.MOMENTUM = s.momentum
    cfg.SOLVER.WEIGHT_DECAY = s.weight_decay
    cfg.SOLVER.CHECKPOINT_PERIOD = s.checkpoint_period
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 0  # the batch/lr scaling is already in `Settings`
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(s.min_size_train)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = s.max_size_train
    cfg.INPUT.MIN_SIZE_TEST = s.min_size_test
    cfg.INPUT.MAX_SIZE_TEST = s.max_size_test
    cfg.DATALOADER.NUM_WORKERS = s.workers
    cfg.TEST.EVAL_PERIOD = 0  # evaluated once, after training, by the backend
    cfg.SEED = s.seed


def build_d2_config(meta: BackboneMeta, arch: str, class_names: Sequence[str], s: Settings, *,
                    weights: Path, output_dir: Path, train: Sequence[str], test: Sequence[str],
                    device: str) -> CfgNode:
    """The full detectron2 config of a transfer run; raw `UPPER.KEY=value` overrides last."""
    cfg = get_cfg()
    _model(cfg, meta, arch, len(class_names), s)
    _solver(cfg, s)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = device
    cfg.DATASETS.TRAIN = tuple(train)
    cfg.DATASETS.TEST = tuple(test)
    cfg.OUTPUT_DIR = str(output_dir)
    if s.d2_options:
        try:
            cfg.merge_from_list([v for kv in s.d2_options for v in kv])
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise UserError(f"detectron2 override rejected: {e}") from None
    cfg.freeze()
    return cfg
