"""Mixing methods, by name. Importing this package registers every built-in mixer."""

from pretrain.mixers.base import (MixContext, Mixer, MixOutput, MixParams, get_mixer,
                                  list_mixers, register_mixer)
from pretrain.mixers import basic  # noqa: F401  (registers none, cutout, mixup, cutmix)
from pretrain.mixers import guidedmixup, saliencymix  # noqa: F401  (and pairing greedy)

__all__ = ["MixContext", "Mixer", "MixOutput", "MixParams", "get_mixer", "list_mixers",
           "register_mixer"]
