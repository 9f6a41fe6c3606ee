"""Peak FLOP/s per device, for MFU. Dense bf16 figures from the vendors' data sheets."""

import time

import jax
import jax.numpy as jnp

PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
    """`override_tflops` wins (set perf.peak_tflops on CPU or unlisted chips); 0 if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12
    return 0.0


def matmul_peak(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Measured FLOP/s of one large n x n matmul on the first device (the MFU denominator on
    machines no data sheet covers, e.g. CPUs); benchmarks measure it in the same run."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return reps * 2 * n ** 3 / (time.perf_counter() - start)
