"""Detection transfer: a toolkit checkpoint -> Faster R-CNN fine-tuned on Pascal VOC -> VOC07 mAP.

Two backends: detectron2 (when importable; converted weights, its trainer, launcher and VOC
evaluator) and torchvision (always available). `transfer.voc_eval` is the toolkit's own VOC07
evaluator, usable on any detections.
"""
