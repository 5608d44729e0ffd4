"""Device-side timing for benchmarks: the GPU time of the kernels a call launches.

``kernel_time_ms(fn, *args)`` runs ``fn(*args)`` a few times to compile and warm up, then times
``reps`` calls. On a CUDA build with CUPTI (the ``_fa3_jax_cupti`` extension) each timed call is
bracketed by CUPTI kernel-activity collection and its time is the sum of the durations of every
GPU kernel it launched: no launch overhead, no host/Python jitter, no idle gaps between kernels.
Kernels that overlap on different streams are each counted in full, which is what "work done"
means for single-stream XLA programs like these.

Without CUPTI (a CPU-only build, no GPU, a CUPTI of another major version, or a call that
launched no kernel, as on the CPU backend) every call is timed on the host clock instead,
from the call to ``jax.block_until_ready`` of its result. The returned ``method`` says which:
compare numbers only when it agrees.

    times, method = kernel_time_ms(jax.jit(f), x, warmup=3, reps=20)
    statistics.median(times), method   # e.g. (1.234, "cupti")

``launched_kernels(fn, *args)`` runs ``fn(*args)`` once under CUPTI and returns its result with
the ``(kernel_name, milliseconds)`` of every kernel it launched (``None`` in place of the list
where CUPTI is unavailable): where a call's GPU time goes, e.g. attention against the GEMMs of
a training step.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, NamedTuple

import jax

try:
    from fa3_jax import _fa3_jax_cupti as _cupti
except ImportError:  # CPU-only builds and toolkits without CUPTI do not ship the module
    _cupti = None

CUPTI = "cupti"
WALLCLOCK = "wallclock"


class Timing(NamedTuple):
    """Per-call milliseconds and how they were measured (``"cupti"`` or ``"wallclock"``)."""
    times_ms: list[float]
    method: str


class _CuptiUnusable(Exception):
    """CUPTI could not time this call; the caller falls back to the host clock."""


def _cupti_run(fn, args):
    """Runs ``fn(*args)`` once under CUPTI: ``(blocked result, kernel records, why)``, ``why`` a
    reason string (records None) when CUPTI gave no records after the call. Raises _CuptiUnusable,
    without calling fn, when collection cannot start; fn's own errors propagate."""
    try:
        _cupti.start()
    except RuntimeError as e:
        raise _CuptiUnusable(str(e)) from e
    try:
        out = jax.block_until_ready(fn(*args))
    except BaseException:
        # fn's own error (e.g. out of memory) is what the caller must see, not a CUPTI one.
        try:
            _cupti.stop()
        except RuntimeError:
            pass
        raise
    try:
        kernels = _cupti.stop()
    except RuntimeError as e:
        return out, None, str(e)
    if not kernels:
        return out, None, "the call launched no GPU kernel (not running on a CUDA device?)"
    return out, kernels, None


def _cupti_call_ms(fn, args) -> float:
    _, kernels, why = _cupti_run(fn, args)
    if why:
        raise _CuptiUnusable(why)
    return sum(end - start for _, start, end in kernels) * 1e-6


def launched_kernels(fn: Callable, *args):
    """``(fn(*args), [(kernel_name, ms), ...])`` in launch order, or ``(fn(*args), None)``
    without CUPTI. The call is blocked on; its errors propagate."""
    if _cupti is not None:
        try:
            out, kernels, why = _cupti_run(fn, args)
        except _CuptiUnusable:
            pass
        else:
            if why:
                return out, None
            return out, [(name, (end - start) * 1e-6)
                         for name, start, end in sorted(kernels, key=lambda k: k[1])]
    return jax.block_until_ready(fn(*args)), None


def _wallclock_call_ms(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3


def kernel_time_ms(fn: Callable, *args, warmup: int = 3, reps: int = 20) -> Timing:
    """Times ``fn(*args)``; returns ``Timing(times_ms, method)``, one entry per timed call.

    ``fn`` should be jitted: the warm-up calls (``warmup`` of them, results blocked on) then
    include its compilation. Errors raised by ``fn`` propagate. If CUPTI fails on any timed call,
    all ``reps`` calls are re-timed with the host clock (a warning says why), so the list never
    mixes the two methods.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if _cupti is not None:
        try:
            return Timing([_cupti_call_ms(fn, args) for _ in range(reps)], CUPTI)
        except _CuptiUnusable as e:
            warnings.warn(f"fa3_jax.timing: CUPTI timing unavailable ({e}); using wall-clock time",
                          RuntimeWarning, stacklevel=2)
    return Timing([_wallclock_call_ms(fn, args) for _ in range(reps)], WALLCLOCK)
