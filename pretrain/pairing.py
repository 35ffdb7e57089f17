"""Pairings: which image of the batch is mixed into which.

A pairing returns `perm` with `perm[i]` = the source mixed into target i. `random` is one
permutation from the generator. Greedy pairing (GuidedMixup, Algorithm 1) registers itself here too.
"""

from __future__ import annotations

from typing import Callable

import torch

from smix.devices import upload
from smix.errors import UserError

PairingFn = Callable[..., torch.Tensor]
_PAIRINGS: dict[str, PairingFn] = {}


def register_pairing(name: str) -> Callable[[PairingFn], PairingFn]:
    def deco(fn: PairingFn) -> PairingFn:
        _PAIRINGS[name] = fn
        return fn

    return deco


def list_pairings() -> list[str]:
    return sorted(_PAIRINGS)


def get_pairing(name: str) -> PairingFn:
    if name not in _PAIRINGS:
        raise UserError(f"unknown pairing {name!r}; valid: {', '.join(list_pairings())}")
    return _PAIRINGS[name]


@register_pairing("random")
def random_pairing(batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu",
                   **_: object) -> torch.Tensor:
    """A uniformly random permutation (the official mixup/CutMix/SaliencyMix behaviour), drawn
    on the host and enqueued to the device without waiting for it."""
    return upload(torch.randperm(batch_size, generator=generator), device)
