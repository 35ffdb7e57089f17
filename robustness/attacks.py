"""The attack registry: white-box L-inf attacks on a model that takes [0,1] pixels.

An attack is registered under a name and an implementation ("impl"). Every attack function has
one signature, `BatchAttack`: it receives the model (already normalising inside, see
`robustness.model.Normalized`), a batch of [0,1] images, labels, the list of epsilons (in [0,1]
units here; the CLI and configs speak /255) and the shared `AttackParams`, and returns the clean
logits if it computed them anyway plus the adversarial batch for each epsilon, lazily.

Adding a torchattacks attack is one registration:

    @register_torchattack("bim", default_eps=(4,), params=("step", "steps"))
    def bim(model, eps, p):
        return torchattacks.BIM(model, eps=eps, alpha=p.step, steps=p.steps)

FGSM has two implementations, proven equal in the tests:
- "torchattacks": `torchattacks.FGSM` per epsilon (one forward+backward per epsilon, plus a
  separate clean forward).
- "shared-grad" (default): the FGSM image for every epsilon is clip(x + eps*sign(grad), 0, 1)
  from the SAME gradient, which is exactly torchattacks' FGSM math; so one forward+backward gives
  the clean logits and the gradient, and each epsilon costs one more forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack as TorchAttack
from torch import nn

from smix.errors import UserError


@dataclasses.dataclass(frozen=True)
class AttackParams:
    """Parameters of the iterative attacks, in [0,1] pixel units (step = 1/255 means 1/255)."""

    step: float = 1 / 255
    steps: int = 10
    random_start: bool = True


@dataclasses.dataclass
class AttackOutput:
    """Clean logits when the attack computed them as a by-product, and one adversarial batch per
    epsilon (a generator, so that only one adversarial batch is alive at a time)."""

    clean_logits: torch.Tensor | None
    adversarial: Iterator[torch.Tensor]


# model, images in [0,1], labels, eps list in [0,1] units, params, seed -> output
BatchAttack = Callable[[nn.Module, torch.Tensor, torch.Tensor, Sequence[float], AttackParams, int],
                       AttackOutput]
TorchattacksFactory = Callable[[nn.Module, float, AttackParams], TorchAttack]


@dataclasses.dataclass
class AttackInfo:
    name: str
    default_eps: tuple[float, ...]  # /255 units, the CLI default
    params: tuple[str, ...]  # which AttackParams fields the attack reads (the CLI offers those)
    impls: dict[str, BatchAttack] = dataclasses.field(default_factory=dict)
    default_impl: str = ""


_ATTACKS: dict[str, AttackInfo] = {}


def _info(name: str, default_eps: Sequence[float], params: Sequence[str]) -> AttackInfo:
    info = _ATTACKS.setdefault(name, AttackInfo(name, tuple(default_eps), tuple(params)))
    for p in params:
        if p not in {f.name for f in dataclasses.fields(AttackParams)}:
            raise ValueError(f"attack {name}: unknown parameter {p!r}")
    return info


def register_attack(name: str, impl: str, *, default_eps: Sequence[float] = (8,),
                    params: Sequence[str] = (), default: bool = False
                    ) -> Callable[[BatchAttack], BatchAttack]:
    """Register a `BatchAttack` as implementation `impl` of attack `name`."""
    def deco(fn: BatchAttack) -> BatchAttack:
        info = _info(name, default_eps, params)
        info.impls[impl] = fn
        if default or not info.default_impl:
            info.default_impl = impl
        return fn

    return deco


def register_torchattack(name: str, *, default_eps: Sequence[float] = (8,),
                         params: Sequence[str] = (), default: bool = False
                         ) -> Callable[[TorchattacksFactory], TorchattacksFactory]:
    """Register a torchattacks constructor `(model, eps, params) -> Attack` as impl "torchattacks"."""
    def deco(factory: TorchattacksFactory) -> TorchattacksFactory:
        register_attack(name, "torchattacks", default_eps=default_eps, params=params,
                        default=default)(_torchattacks_batch(factory))
        return factory

    return deco


def list_attacks() -> list[str]:
    return sorted(_ATTACKS)


def attack_info(name: str) -> AttackInfo:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise UserError(f"unknown attack {name!r}; valid: {', '.join(list_attacks())}") from None


def get_attack(name: str, impl: str | None = None) -> tuple[str, BatchAttack]:
    """The implementation `impl` (or the default one) of attack `name`, with its resolved name."""
    info = attack_info(name)
    impl = impl or info.default_impl
    if impl not in info.impls:
        raise UserError(f"attack {name!r} has no implementation {impl!r}; valid: "
                        f"{', '.join(sorted(info.impls))}")
    return impl, info.impls[impl]


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torchattacks draws random starts from the global RNG; seed it for this call only, so a
    run is reproducible and the caller's RNG state is left untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _torchattacks_batch(factory: TorchattacksFactory) -> BatchAttack:
    def run(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            eps_list: Sequence[float], params: AttackParams, seed: int) -> AttackOutput:
        def adversarial() -> Iterator[torch.Tensor]:
            for eps in eps_list:
                attack = factory(model, float(eps), params)
                with seeded_global_rng(seed, images.device):
                    adv = attack(images, labels)
                yield adv

        return AttackOutput(None, adversarial())

    run.__name__ = f"torchattacks_{factory.__name__}"
    return run


# --- registrations -----------------------------------------------------------------------------

@register_torchattack("fgsm", default_eps=(1, 2, 4, 8))
def fgsm(model: nn.Module, eps: float, params: AttackParams) -> TorchAttack:
    return torchattacks.FGSM(model, eps=eps)


@register_attack("fgsm", "shared-grad", default_eps=(1, 2, 4, 8), default=True)
def fgsm_shared_grad(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     eps_list: Sequence[float], params: AttackParams, seed: int) -> AttackOutput:
    """torchattacks' FGSM for every epsilon from one forward+backward (see the module doc)."""
    x = images.clone().detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        # mean reduction as torchattacks' nn.CrossEntropyLoss(): the sign of the gradient, and
        # its exact zeros, are then bit-identical to torchattacks.FGSM
        loss = F.cross_entropy(logits, labels)
        grad = torch.autograd.grad(loss, x)[0]
    direction = grad.sign()
    clean = images.detach()

    def adversarial() -> Iterator[torch.Tensor]:
        for eps in eps_list:
            yield torch.clamp(clean + float(eps) * direction, min=0, max=1)

    return AttackOutput(logits.detach(), adversarial())


@register_torchattack("pgd", default_eps=(4,), params=("step", "steps", "random_start"))
def pgd(model: nn.Module, eps: float, params: AttackParams) -> TorchAttack:
    return torchattacks.PGD(model, eps=eps, alpha=params.step, steps=params.steps,
                            random_start=params.random_start)
