"""Detection transfer: a toolkit checkpoint -> Faster R-CNN fine-tuned on Pascal VOC -> VOC07 mAP.

Two backends: detectron2 (when importable; converted weights, its trainer, launcher and VOC
evaluator) and torchvision (always available). `transfer.voc_eval` is the toolkit's own VOC07
evaluator, usable on any detections.
"""

import warnings

# Upstream's deprecations, not the user's to act on (set here, before any backend is imported,
# in launched workers too): fvcore, imported by detectron2, scripts two functions with
# `torch.jit.script` at import, deprecated since torch 2.14; detectron2's anchor generator calls
# `torch.meshgrid` without `indexing` (this toolkit always passes it).
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message="torch.meshgrid: in an upcoming release",
                        category=UserWarning)
