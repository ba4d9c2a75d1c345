"""Large outputs of mlx-tuner's CPU kernels are asked into transparent huge pages.

MLX's CPU allocator caches at most 32 MB of freed memory, so a larger output (a KL
gradient of 64 x 131,072 float32 is 32 MiB) comes fresh from the OS at every call and was
faulted in 4 KiB at a time: 8,193 page faults a call, 10.8 ms against 6.5 ms with huge
pages on the CI machine. Runs where Linux offers THP on request (madvise or always)."""

from __future__ import annotations

import pathlib
import resource
import sys

import mlx.core as mx
import pytest

from mlx_tuner import losses
from mlx_tuner.ops import _extension

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_on_request() -> bool:
    try:
        mode = THP.read_text()
    except OSError:
        return False
    return "[madvise]" in mode or "[always]" in mode


pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _thp_on_request()
    or "cpu" not in _extension.kernel_devices("divergence"),
    reason="needs Linux with transparent huge pages on request, and the CPU kernels",
)


def test_large_gradient_is_not_faulted_in_4k_pages():
    rows, vocab = 64, 131072  # 32 MiB a gradient: above MLX's CPU cache limit
    with mx.stream(mx.cpu):
        q = mx.random.normal((rows, vocab))
        p = mx.random.normal((rows, vocab))
        mx.eval(q, p)
        grad = mx.grad(lambda a: losses.kl_div_loss(a, p).sum())
        old = mx.set_cache_limit(0)  # every call's gradient fresh from the OS
        try:
            mx.eval(grad(q))
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                mx.eval(grad(q))
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
        finally:
            mx.set_cache_limit(old)
    pages_4k = rows * vocab * 4 // 4096
    # In 4 KiB pages the gradient alone is 8,192 faults a call; in 2 MiB pages, its head
    # and tail outside the aligned interior plus 16: a few hundred.
    assert faults < pages_4k / 4, f"{faults:.0f} page faults a call for {pages_4k} pages"
