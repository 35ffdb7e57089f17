"""Every Triton kernel, as its first-use check launches it, compiled for an H100/H200 (sm_90)
without a GPU. The CPU tests run the kernels in Triton's interpreter, which cannot see what
only the compiler decides: a construct the compiler rejects (then the GPU falls back to tensor
ops, and the mixers lose the kernels' speed), Triton's float32 `/` (the approximate
`div.full.f32` on a GPU, IEEE in the interpreter: the kernels use `tl.div_rn`) and fused
multiply-adds (each launch turns contraction off, to round as the tensor ops do).

The launches are recorded in the interpreter while each `CheckedKernels` runs its check (the
dtypes, layouts and sizes it checks are those the GPU specialises on first use); each is then
specialised as `JITFunction.run` would on the GPU (Triton's own binder: pointer dtypes,
integers equal to 1 made constant, divisibility by 16) and compiled to PTX here."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from tests.conftest import RUNTIME_LOOPS, interpreted

pytest.importorskip("triton")

KERNEL_MODULES = ("pretrain.greedy_triton", "pretrain.saliency_triton",
                  "pretrain.mixers.boxes_triton", "pretrain.mixers.guided_triton")

RECORD = RUNTIME_LOOPS + r"""
import json
import torch
from pretrain import greedy, saliency
from pretrain.mixers import boxes, guidedmixup
torch.set_num_threads(1)
launches = []


def described(v):
    if isinstance(v, torch.Tensor):
        return {"dtype": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, (bool, int, float)):
        return v
    raise TypeError(f"a launch argument of type {type(v).__name__}")


class Recorder:
    def __init__(self, kernel):
        self.kernel, self.name = kernel, f"{kernel.fn.__module__}.{kernel.fn.__name__}"

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launches.append([self.name, [described(a) for a in args],
                             {k: described(v) for k, v in kwargs.items()}])
            return self.kernel[grid](*args, **kwargs)
        return launch


class Recorded:
    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        value = getattr(self.module, name)
        return Recorder(value) if hasattr(value, "fn") else value


for kernels in (greedy.WALK, saliency.FINE_GRAINED_KERNELS, saliency.SPECTRAL_KERNELS,
                guidedmixup.BLEND_KERNELS, boxes.BOX_KERNELS):
    loaded = kernels.load()
    kernels.kernels = Recorder(loaded) if hasattr(loaded, "fn") else Recorded(loaded)
    assert kernels.get("cpu") is not None, kernels.failed  # runs the first-use check
print(json.dumps(launches))
"""


def _argument(described):
    if isinstance(described, dict):  # a tensor: its dtype and its pointer's alignment count
        t = torch.empty(8, dtype=getattr(torch, described["dtype"]))
        return t if described["aligned"] else t[1:]
    return described


def _sm90_builds(launches):
    """[(kernel, {constant: value}, PTX)] for the distinct specialisations launched."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        pytest.skip(f"this Triton ({triton.__version__}) specialises differently: {e}")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    builds = {}
    for name, args, kwargs in launches:
        module, fn_name = name.rsplit(".", 1)
        fn = getattr(importlib.import_module(module), fn_name)
        args = [_argument(a) for a in args]
        kwargs = {k: _argument(v) for k, v in kwargs.items()}
        try:  # JITFunction.run's own steps, less the device
            bind = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = bind(*args, **kwargs)
            options, signature, constants, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, options)
        except (AttributeError, TypeError) as e:
            pytest.skip(f"this Triton ({triton.__version__}) specialises differently: {e}")
        key = (name, repr(signature), repr(constants), repr(attrs))
        if key not in builds:
            source = ASTSource(fn, signature, constants, attrs)
            ptx = triton.compile(source, target=target, options=options.__dict__).asm["ptx"]
            names = list(signature)
            builds[key] = (fn_name, {names[i]: v for (i, *_), v in constants.items()}, ptx)
    return list(builds.values())


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_with_ieee_division_and_no_fma():
    launches = interpreted(RECORD)
    # every kernel a module launches (its public @triton.jit functions) is among the checks'
    public = {f"{m}.{n}" for m in KERNEL_MODULES
              for n, v in vars(importlib.import_module(m)).items()
              if hasattr(v, "fn") and not n.startswith("_")}
    assert {name for name, _, _ in launches} == public
    # each launch turns contraction off itself: where it reads pixels, a fused multiply-add
    # would round otherwise than the tensor ops; elsewhere Triton 3.9 warns at a launch that
    # leaves it to the default (which 3.10 changes)
    assert all(kwargs.get("enable_fp_fusion") is False for _, _, kwargs in launches)
    for kernel, constants, ptx in _sm90_builds(launches):
        assert ".target sm_90" in ptx
        # IEEE division only: Triton's float32 `/` would be div.full.f32, and Triton 3.5 (torch
        # 2.9) compiled `tl.div_rn` to div.rn.ftz.f32 (subnormals flushed to zero)
        assert not re.search(r"\b(?:div\.full|div\.approx|div\.rn\.ftz|rcp\.approx)", ptx), \
            (kernel, constants)
        assert not re.search(r"\bfma\.", ptx), (kernel, constants)
