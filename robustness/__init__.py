"""Robustness of trained backbones: white-box adversarial attacks (FGSM, PGD via torchattacks,
in [0,1] pixel space, epsilon in /255 units) and common corruptions (ImageNet-C mCE, CIFAR-C mean
error). Every run writes metrics.json (stage "robustness") whose numbers trace to checkpoints."""

from robustness.adversarial import AttackConfig, run_attack
from robustness.attacks import AttackParams, get_attack, list_attacks, register_attack, register_torchattack
from robustness.corruption import CorruptionConfig, mean_corruption_error, relative_mce, run_corruption
from robustness.model import Normalized, load_for_eval

__all__ = [
    "AttackConfig", "AttackParams", "CorruptionConfig", "Normalized", "get_attack",
    "list_attacks", "load_for_eval", "mean_corruption_error", "register_attack",
    "register_torchattack", "relative_mce", "run_attack", "run_corruption",
]
