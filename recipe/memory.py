"""Peak memory of a training step measured as live tensor bytes, on any device, CPU included.

CUDA's caching allocator reports ``max_memory_allocated``; the CPU allocator reports
nothing, and the process RSS mixes in the interpreter, the libraries and freed-but-kept
pages. What a capacity planner predicts is the bytes of the tensors alive at the worst
moment of a step, so that is what :class:`LiveTensorMemory` measures: the sum of
``nbytes`` of every live tensor *storage* (views share one, so each counts once), per
device, and its peak.

How: a ``TorchDispatchMode`` sees every tensor an aten operator returns, including the
local tensors under DTensor (the mode lets DTensor unwrap first) and the buffers of
collectives; a ``weakref.finalize`` on each new storage removes it when it dies, wherever
that happens (a saved activation released by the autograd engine, a buffer dropped by
FSDP). FSDP2 allocates and frees its all-gather buffers with ``UntypedStorage.resize_``,
which is no operator, so ``resize_`` is wrapped while the mode is active. Storages that
exist before the step (parameters, optimizer state, the batch) never pass through an
operator during it: on entry the garbage collector's view of live tensors is swept
once so they count from the start. That sweep sees every tensor of the process, so
measure in a process that holds nothing else (the tests and benches start fresh ones).

Every storage is tagged with the phase that created it - ``state`` (alive before the
step), ``forward``, ``backward`` (inside the autograd engine) or ``optimizer`` (between
an optimizer's step pre- and post-hook) - or, for the parameters passed in, ``gradient``
once autograd stores it as a ``.grad``. The breakdown at the peak is kept, which says
what the peak is made of (e.g. forward activations still saved for the backward pass
plus the loss's gradients), and so is the peak of ``forward + backward`` alone: the
activation memory of the step (saved tensors and the backward's temporaries, gradients
of the given parameters excluded).

On a GPU the numbers match ``torch.cuda.max_memory_allocated`` but for the CUDA
allocator's 512-byte rounding and memory a kernel or a collective library allocates
without handing out a tensor (``bench/gpu_memory.py``: 40.98 against 41.04 GiB on an
8B-shaped step).
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MIB = 2**20
# A gradient is recognised (by its parameter's hook) a few operators after the one that
# allocated it; activation sums stay open to correction for this many operators.
_GRADIENT_WINDOW = 64
PHASES: tuple[str, ...] = ("state", "forward", "backward", "optimizer", "gradient")


@dataclass
class PeakMemory:
    """Result of one measured region, per device: peak live bytes and what it consisted of."""

    peak: dict[str, int] = field(default_factory=dict)  # device -> bytes
    at_peak: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> phase -> bytes
    phase_peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> phase -> peak while in it
    start: dict[str, int] = field(default_factory=dict)  # device -> bytes alive on entry
    activations: dict[str, int] = field(default_factory=dict)  # device -> peak of forward + backward bytes
    peak_op: dict[str, str] = field(default_factory=dict)  # device -> the operator that reached the peak

    def device(self, name: str = "cpu") -> int:
        """Peak bytes on ``name`` (0 when nothing lived there)."""
        return self.peak.get(name, 0)


def _storages(value: Any) -> list[torch.UntypedStorage]:
    """Untyped storages behind a tensor, looking through wrapper subclasses (DTensor)."""
    if not isinstance(value, torch.Tensor):
        return []
    if hasattr(value, "__tensor_flatten__") and type(value) is not torch.nn.Parameter:
        inner, _ = value.__tensor_flatten__()
        return [s for name in inner for s in _storages(getattr(value, name))]
    if value.device.type == "meta" or getattr(value, "fake_mode", None) is not None:
        return []
    try:
        return [value.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return []


class LiveTensorMemory(TorchDispatchMode):
    """Track live tensor bytes per device while active; ``result`` holds the peak.

    Use around exactly the region to measure, e.g. one training step after a warm-up step
    (so AdamW's state already exists and is counted as ``state``)::

        with LiveTensorMemory(model.parameters()) as tracker:
            train_step()
        print(tracker.result.device("cpu") / 2**20, "MiB")
    """

    def __init__(self, params: Iterable[torch.Tensor] = ()) -> None:
        """``params``: parameters whose ``.grad`` counts as ``gradient`` (those autograd accumulates)."""
        super().__init__()
        self._params = list(params)
        self._live: dict[int, tuple[str, str, int, int]] = {}  # storage key -> (device, kind, bytes, born at)
        self._now: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(PHASES, 0))
        self._total: dict[str, int] = defaultdict(int)
        self._clock = 0  # operators seen so far
        self._recent: deque[list[Any]] = deque()  # [clock, device, forward + backward bytes], still correctable
        self._peak_clock: dict[str, int] = {}
        self._in_optimizer = 0
        self._hooks: list[Any] = []
        self._finalizers: list[weakref.finalize] = []
        self._orig_resize: Any = None
        self._op: Any = "entry"
        self._peak_op: dict[str, Any] = {}
        self.result = PeakMemory()

    # -- bookkeeping

    def _phase(self) -> str:
        if self._in_optimizer:
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def _add(self, storage: torch.UntypedStorage, kind: str) -> None:
        key = storage._cdata
        if key in self._live:
            return
        device, nbytes = str(storage.device), storage.nbytes()
        self._live[key] = (device, kind, nbytes, self._clock)
        self._now[device][kind] += nbytes
        self._total[device] += nbytes
        self._finalizers.append(weakref.finalize(storage, self._remove, key))
        self._update_peak(device)

    def _remove(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            device, kind, nbytes, _ = entry
            self._now[device][kind] -= nbytes
            self._total[device] -= nbytes

    def _resized(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key not in self._live:
            self._add(storage, self._phase())
            return
        device, kind, old, born = self._live[key]
        new = storage.nbytes()
        if old == 0:  # freed before the step, allocated again now (FSDP's unsharded parameters)
            kind, born = self._phase(), self._clock
        self._live[key] = (device, kind, new, born)
        self._now[device][kind] += new - old
        self._total[device] += new - old
        self._update_peak(device)

    def _retag(self, tensor: torch.Tensor | None, kind: str) -> None:
        for storage in _storages(tensor):
            entry = self._live.get(storage._cdata)
            if entry is None or entry[1] == kind:
                continue
            device, old, nbytes, born = entry
            self._live[storage._cdata] = (device, kind, nbytes, born)
            self._now[device][old] -= nbytes
            self._now[device][kind] += nbytes
            # Amend what was recorded since the storage appeared: it was never an activation.
            for record in self._recent:
                if record[0] >= born and record[1] == device and old in ("forward", "backward"):
                    record[2] -= nbytes
            if self._peak_clock.get(device, -1) >= born:
                self.result.at_peak[device][old] -= nbytes
                self.result.at_peak[device][kind] += nbytes

    def _settle(self, keep: int = _GRADIENT_WINDOW) -> None:
        while len(self._recent) > keep:
            _, device, value = self._recent.popleft()
            self.result.activations[device] = max(self.result.activations.get(device, 0), value)

    def _update_peak(self, device: str) -> None:
        total, now, result = self._total[device], self._now[device], self.result
        if total > result.peak.get(device, -1):
            result.peak[device] = total
            result.at_peak[device] = dict(now)
            self._peak_clock[device] = self._clock
            self._peak_op[device] = self._op
        phases = result.phase_peaks.setdefault(device, dict.fromkeys(PHASES, 0))
        phase = self._phase()
        phases[phase] = max(phases[phase], total)
        self._recent.append([self._clock, device, now["forward"] + now["backward"]])
        self._settle()

    def _tick(self, op: Any) -> None:
        self._clock += 1
        self._op = op

    # -- entry and exit

    def __enter__(self) -> LiveTensorMemory:
        with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for tensor in tensors:
            for storage in _storages(tensor):
                self._add(storage, "state")
        del tensors
        self.result.start = dict(self._total)

        def pre(*_: Any) -> None:
            self._in_optimizer += 1

        def post(*_: Any) -> None:
            self._in_optimizer -= 1

        self._hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        self._hooks += [p.register_post_accumulate_grad_hook(lambda p: self._retag(p.grad, "gradient"))
                        for p in self._params if p.requires_grad]
        self._orig_resize = orig = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = orig(storage, size)
            tracker._tick("UntypedStorage.resize_")
            tracker._resized(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for finalizer in self._finalizers:  # the storages outlive the measurement
            finalizer.detach()
        self._finalizers = []
        self._settle(keep=0)
        self.result.peak_op = {device: str(op) for device, op in self._peak_op.items()}
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # Let tensor subclasses (DTensor) unwrap first: their local operators come back
        # through this mode with plain tensors, which is where the memory is.
        if any(t is not torch.Tensor and t is not torch.nn.Parameter for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        self._tick(func)
        phase = self._phase()
        for value in tree_flatten(out)[0]:
            for storage in _storages(value):
                self._add(storage, phase)
        return out

    @property
    def current(self) -> dict[str, int]:
        """Live bytes per device right now."""
        return dict(self._total)


def measure(fn: Any, *args: Any, params: Iterable[torch.Tensor] = (), **kwargs: Any) -> tuple[Any, PeakMemory]:
    """``fn(*args, **kwargs)`` under a fresh :class:`LiveTensorMemory` (gradients of ``params``
    told apart); its result and the peak."""
    gc.collect()
    with LiveTensorMemory(params) as tracker:
        out = fn(*args, **kwargs)
    return out, tracker.result
