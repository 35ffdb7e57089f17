"""Moving small host values to the device without making the host wait for it.

A blocking host-to-device copy (`tensor.to("cuda")`, `torch.tensor(..., device="cuda")`)
synchronises the host with the device's stream: the CPU waits until the GPU has drained every
queued kernel, so the next step's kernels are queued late. Random draws made on the host (a
mixer's λ, permutation and boxes) and constants (normalisation, filter taps) reach the device
here instead: from pinned memory with `non_blocking=True`, which only enqueues the copy.

What remains after that is host-side launch overhead of chains of small kernels; `GraphCache`
replays such a chain as one CUDA graph.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from smix.errors import UserError

T = TypeVar("T")

def upload(t: torch.Tensor, device: torch.device | str,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (and in `dtype`), enqueued without a host-device synchronisation.

    Values are those of `t.to(device, dtype)`; on CUDA the host tensor is first copied into
    pinned memory, whose reuse the caching host allocator defers until the copy has run."""
    device = torch.device(device)
    if dtype is not None:
        t = t.to(dtype)  # converted where it is: a cross-device cast would stage unpinned
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        # pin_memory refuses views whose elements share storage (expand, broadcast)
        t = t.contiguous().pin_memory()
    return t.to(device, non_blocking=True)


_capture = threading.local()  # .reads: a list while a GraphCache warms up or captures


def device_cache(maxsize: int) -> Callable[[Callable], Callable]:
    """`functools.lru_cache` for functions that hand out device tensors (constants, plans).

    A CUDA graph reads such a tensor by address, so it must outlive every graph that captured
    it, whatever the LRU evicts meanwhile: while a `GraphCache` captures, every value handed
    out (hit or miss) is recorded, and the graph holds on to it."""
    def decorator(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = cached(*args, **kwargs)
            reads = getattr(_capture, "reads", None)
            if reads is not None:
                reads.append(value)
            return value

        wrapper.cache_clear, wrapper.cache_info = cached.cache_clear, cached.cache_info
        return wrapper
    return decorator


@contextlib.contextmanager
def recording_cached_reads() -> Iterator[list]:
    """Collect what `device_cache` functions hand out inside the block (and tell nested
    `GraphCache`s to run eagerly: a graph cannot be captured inside another)."""
    outer = getattr(_capture, "reads", None)
    _capture.reads = reads = []
    try:
        yield reads
    finally:
        _capture.reads = outer


@device_cache(maxsize=64)
def constant(values: tuple, dtype: torch.dtype, device: torch.device | str,
             shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A small constant tensor on `device`, uploaded once per (values, dtype, device)."""
    t = torch.tensor(values, dtype=dtype)
    return upload(t if shape is None else t.view(shape), device)


def channel_constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel values as a [1,C,1,1] tensor of `like`'s dtype and device (cached)."""
    return constant(tuple(float(v) for v in values), like.dtype, like.device,
                    (1, len(values), 1, 1))


def device_name(device: torch.device | str) -> str:
    """What a benchmark ran on, for its JSON line: the card's name, or the CPU's model and
    the cores this process may use."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


# ------------------------------------------------------------------------------ CUDA graphs

_GRAPHS_ENV = "SMIX_CUDA_GRAPHS"  # "0" turns capture off (eager everywhere), e.g. to compare


def graphs_enabled() -> bool:
    """Whether `GraphCache` may capture (on unless SMIX_CUDA_GRAPHS=0)."""
    return os.environ.get(_GRAPHS_ENV, "1") != "0"


def _clone_outputs(out):
    """A replay's outputs copied out of the graph's buffers (the next replay overwrites them)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_clone_outputs(o) for o in out)


@functools.lru_cache(maxsize=None)
def _graph_pool(device: torch.device) -> tuple:
    """One memory pool for every graph on a device. Safe here: graphs replay one at a time on
    the caller's stream, their inputs are copied in and their outputs cloned out at once, and
    the static outputs stay referenced, so one graph's scratch may be another's; without
    sharing, each 224² batch of 256 would hold its own ~1 GB of detector scratch."""
    with torch.cuda.device(device):
        return torch.cuda.graph_pool_handle()


class _Captured:
    """One captured call: static inputs, the graph, its static outputs, and what it reads
    that lives outside its memory pool (kept alive as long as the graph)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.static_in = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with recording_cached_reads(), torch.cuda.stream(side):
            fn(*self.static_in, **kwargs)  # warm-up: lazy caches, cuFFT plans, constants
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: loader threads (pinning, DALI) may use CUDA meanwhile
        with recording_cached_reads() as self.keep, \
                torch.cuda.graph(self.graph, pool=_graph_pool(args[0].device),
                                 capture_error_mode="thread_local"):
            self.static_out = fn(*self.static_in, **kwargs)

    def __call__(self, args: tuple):
        for static, a in zip(self.static_in, args):
            static.copy_(a)
        self.graph.replay()
        return _clone_outputs(self.static_out)


class GraphCache:
    """Replays a deterministic function of CUDA tensors as one CUDA graph per input signature.

    A chain of many small kernels (a detector's ~100 elementwise passes, the greedy walk's n
    argmax steps) costs more in host-side launches than on the device; a graph launches them
    all at once. Per (shapes, dtypes, device, keyword values) the first call warms up and
    captures `fn` on static buffers; later calls copy the inputs in, replay, and clone the
    outputs. At most `maxsize` graphs are kept (least recently used dropped; all graphs of a
    device share one memory pool, see `_graph_pool`). Where capture fails (an op that cannot be captured), that signature runs
    eagerly from then on, with one warning per cache. CPU and other devices always run eagerly,
    so their results are untouched. `fn` must draw no randomness (a replay would repeat it),
    and every tensor it reads besides its arguments and what it allocates must come from a
    `device_cache` function (the graph keeps those alive). Inside another capture it runs
    eagerly, so graphs may nest in code (the outer one captures everything).
    """

    def __init__(self, fn: Callable, name: str, maxsize: int = 4) -> None:
        self.fn, self.name, self.maxsize = fn, name, maxsize
        self.entries: collections.OrderedDict[tuple, Callable | None] = collections.OrderedDict()
        self.warned = False

    @staticmethod
    def signature(args: tuple, kwargs: dict) -> tuple:
        """The cache key: shape, dtype and device of every tensor, plus the keyword values."""
        return (tuple((tuple(a.shape), a.dtype, a.device) for a in args),
                tuple(sorted(kwargs.items())))

    def eligible(self, args: tuple) -> bool:
        """Capture only CUDA tensors, outside another capture, when graphs are enabled."""
        return (graphs_enabled() and len(args) > 0 and getattr(_capture, "reads", None) is None
                and all(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
                and not torch.cuda.is_current_stream_capturing())

    def capture(self, args: tuple, kwargs: dict) -> Callable:
        """A replayable call for this signature (raises where `fn` cannot be captured)."""
        return _Captured(self.fn, args, kwargs)

    def __call__(self, *args: torch.Tensor, **kwargs):
        if not self.eligible(args):
            return self.fn(*args, **kwargs)
        key = self.signature(args, kwargs)
        if key in self.entries:
            self.entries.move_to_end(key)
            entry = self.entries[key]
        else:
            entry = self._new_entry(key, args, kwargs)
        return self.fn(*args, **kwargs) if entry is None else entry(args)

    def _new_entry(self, key: tuple, args: tuple, kwargs: dict) -> Callable | None:
        """Capture (None where that fails: eager for good), store, evict beyond maxsize."""
        try:
            entry = self.capture(args, kwargs)
        except Exception as e:  # an op that cannot be captured: eager is still right
            entry = None
            if not self.warned:
                self.warned = True
                warnings.warn(f"{self.name}: CUDA graph capture failed, running eagerly "
                              f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)
        self.entries[key] = entry
        while len(self.entries) > self.maxsize:
            self.entries.popitem(last=False)
        return entry


# ---------------------------------------------------------------------------- Triton kernels

_TRITON_ENV = "SMIX_TRITON"  # "0": tensor ops on CUDA too (to compare, or to rule kernels out)


class CheckedKernels:
    """Triton kernels that replace a chain of tensor ops on a device, used there only once they
    reproduce those tensor ops on it.

    `load()` imports and returns the kernels (an ImportError: Triton is not installed);
    `check(kernels, device)` runs both ways on test inputs and says why the kernels cannot be
    trusted there (None: they can). `get(device)` gives the kernels or None: switched off
    (SMIX_TRITON=0), Triton missing, or failed (a failed load, check or launch: one warning,
    then tensor ops for good, on every device: an error during the check, an out-of-memory
    included, counts as failed). The check runs once per device and process, never while a
    CUDA graph is being captured (it synchronises; the caller then uses tensor ops for that
    capture). Under TRITON_INTERPRET=1 Triton's interpreter runs kernels on CPU
    tensors, so CPU tests can check their logic."""

    def __init__(self, name: str, load: Callable[[], object],
                 check: Callable[[object, torch.device], str | None]) -> None:
        self.name, self.load, self.check = name, load, check
        self.kernels: object | None = None
        self.failed: str | None = None
        self.checked: set[torch.device] = set()

    def get(self, device: torch.device | str) -> object | None:
        if os.environ.get(_TRITON_ENV, "1") == "0" or self.failed:
            return None
        if self.kernels is None:
            try:
                self.kernels = self.load()
            except ModuleNotFoundError as e:
                if e.name != "triton" and not (e.name or "").startswith("triton."):
                    self.fail(e)
                    return None
                self.failed = "triton is not installed"  # silently: CPU-only installs
                return None
            except Exception as e:  # a broken Triton install
                self.fail(e)
                return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0": one check
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self.checked:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            try:
                why = self.check(self.kernels, device)
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            if why:
                self.fail(RuntimeError(why))
                return None
            self.checked.add(device)
        return self.kernels

    def run(self, kernels: object | None, with_kernels: Callable[[object], T],
            without: Callable[[], T]) -> T:
        """`with_kernels(kernels)`, or `without()` (the tensor ops): when `kernels` is None, or
        when the launch fails (a new specialisation that does not compile: `fail`, for good)."""
        if kernels is not None:
            try:
                return with_kernels(kernels)
            except Exception as e:
                self.fail(e)
        return without()

    def fail(self, error: Exception) -> None:
        """Tensor ops from now on, with one warning saying why."""
        self.failed = f"{type(error).__name__}: {error}"
        warnings.warn(f"{self.name}: the Triton kernel failed, using tensor ops "
                      f"({self.failed})", RuntimeWarning, stacklevel=3)


def on_device_of(t: torch.Tensor):
    """A context making `t`'s CUDA device current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@contextlib.contextmanager
def fits_on_device(batch_size: int, advice: str) -> Iterator[None]:
    """A batch the device cannot hold ends in one line naming `--batch-size` and `advice`
    (what to run next), not in a torch.OutOfMemoryError traceback (evaluation stages; the
    training steps of pretrain and transfer fit micro-batches instead)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of device memory at --batch-size {batch_size}; {advice}") from None
