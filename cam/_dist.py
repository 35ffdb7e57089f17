"""The bits of torchrun plumbing `cam` needs beyond `backbone.dist`."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

import torch.distributed as dist

from backbone.dist import DistInfo, cleanup, init_distributed
from backbone.errors import UserError

T = TypeVar("T")


@contextlib.contextmanager
def distributed(device: str) -> Iterator[DistInfo]:
    """Join the torchrun group for one command; leave it only if this command joined it."""
    owned = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owned:
            cleanup()


def gather_lists(local: list[Any]) -> list[Any]:
    """Concatenate every rank's list in rank order (picklable items; small metadata only)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def agree(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` on every rank; when it raises a `UserError` on any rank, raise it on all of
    them, so that no rank is left waiting in a collective for one that has failed."""
    try:
        result, error = fn(*args), None
    except UserError as e:
        result, error = None, str(e)
    errors = gather_lists([error] if error is not None else [])
    if errors:
        raise UserError(errors[0])
    return result  # type: ignore[return-value]
