"""Test setup: 8 host CPU devices for the sharding tests (must precede the first jax import)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _hopper_available():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return False
    return any("H100" in d.device_kind or "H200" in d.device_kind or "H800" in d.device_kind
               or "H20" in d.device_kind or "GH200" in d.device_kind for d in gpus)


HOPPER = _hopper_available()


def pytest_collection_modifyitems(config, items):
    import fa3_jax
    reason = None
    if not HOPPER:
        reason = "needs a Hopper GPU (none visible to JAX)"
    elif not fa3_jax.cuda_built():
        reason = "this fa3_jax build has no CUDA kernels"
    if reason:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
