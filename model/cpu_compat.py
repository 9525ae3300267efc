"""Run megatron-core on CPU (gloo) by treating "cuda" as "cpu".

Why this exists
---------------
megatron-core 0.16 assumes a CUDA device everywhere: ``torch.cuda.current_device()`` is used as a
device argument in ~60 files (rotary embeddings, the global memory buffer, TP mappings), the pipeline
schedules and optimizers allocate with ``device="cuda"``, the RNG tracker snapshots CUDA generator
state, and grad clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``. heft must build, run and
be tested on CPU-only machines with the gloo backend, with the *same* megatron-core code paths a GPU
cluster runs. Forking megatron-core is not an option, so this module remaps, in one place:

* device arguments: a ``TorchFunctionMode`` rewrites ``device="cuda"``, ``"cuda:N"``, integer device
  indices and ``Tensor.cuda()`` / ``Tensor.to("cuda")`` to the CPU;
* ``Tensor.type()`` strings: ``torch.FloatTensor`` reads as ``torch.cuda.FloatTensor`` so upstream
  type assertions written for GPUs hold for the CPU stand-in;
* ``torch.cuda.current_device`` / ``synchronize`` / stream helpers: harmless CPU answers;
* the RNG tracker: a subclass whose named states are CPU generator states (dropout and weight init
  inside ``tracker.fork()`` then draw from the CPU generator, as they would from the CUDA one);
* activation recompute: torch function modes are thread-local and autograd runs ``backward`` where
  the mode is not in effect, so megatron's checkpoint functions, which rerun the forward inside
  ``backward``, get the mode re-entered around their backward.

It is switched on by :func:`enable_if_no_cuda` and only when ``torch.cuda.is_available()`` is False;
on a GPU machine nothing here is touched. Cost on CPU: roughly 10% per op for the mode dispatch.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE_MODE: "_CudaAsCpuMode | None" = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA ordinal in torch
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _install_cpu_rng_tracker() -> None:
    """Replace megatron-core's CUDA RNG tracker by one that tracks CPU generator states."""
    from megatron.core.tensor_parallel import random as mpu_random

    class CpuRNGStatesTracker(mpu_random.CudaRNGStatesTracker):
        """Named RNG states kept as CPU default-generator states (see module doc)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mpu_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # The "cuda" RNG state that megatron-core snapshots for checkpoints is the CPU one here.
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _recompute_under_mode() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    for cls in (mpu_random.CheckpointFunction, mpu_random.CheckpointWithoutOutputFunction):
        backward = cls.backward

        def backward_with_mode(ctx, *grads, _backward=backward):
            with _CudaAsCpuMode():
                return _backward(ctx, *grads)

        cls.backward = staticmethod(backward_with_mode)


def _patch_torch_cuda_queries() -> None:
    """Answer the torch.cuda calls megatron-core makes for bookkeeping, not for compute."""
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.Event = _NullEvent


class _NullStream:
    """A CUDA stream stand-in: CPU work is already ordered, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()


class _NullEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def is_active() -> bool:
    return _ACTIVE_MODE is not None


def enable_if_no_cuda() -> bool:
    """Switch the layer on when this process has no CUDA device. Returns whether it is on.

    Must run before megatron-core builds models or process groups. Idempotent.
    """
    global _ACTIVE_MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE_MODE is None:
        _patch_torch_cuda_queries()
        _install_cpu_rng_tracker()
        _recompute_under_mode()
        _ACTIVE_MODE = _CudaAsCpuMode()
        _ACTIVE_MODE.__enter__()
        log.info("heft CPU compatibility layer active: megatron-core 'cuda' maps to CPU")
    return True
