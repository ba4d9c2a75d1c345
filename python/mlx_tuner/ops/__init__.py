"""Fused ops, each beside its pure-MLX reference ``<op>_reference``.

The reference is the test oracle and the fallback wherever no kernel exists (extension
not built or not usable, a device or dtype without a kernel). ``backend_info()`` says,
for every op, which devices have a compiled kernel and, where none, why.
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from .cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .divergence import js_div, js_div_reference, kl_div, kl_div_reference
from .dora import dora_linear, dora_linear_reference, dora_weight_sq_norm
from .lora import lora_linear, lora_linear_reference
from .lora_switch import BACKEND_NOTE as _LORA_SWITCH_NOTE
from .lora_switch import GPU_MISSING as _LORA_SWITCH_GPU
from .lora_switch import lora_switch_linear, lora_switch_linear_reference
from .qlora import BACKEND_NOTE as _QLORA_NOTE
from .qlora import qlora_linear, qlora_linear_reference

# op -> kernel family (the file stem at every layer: csrc/ops/<family>.cpp, ...)
FUSED_OPS: dict[str, str] = {
    "kl_div": "divergence",
    "js_div": "divergence",
    "lora_linear": "lora",
    "qlora_linear": "qlora",
    "dora_linear": "dora",
    "linear_cross_entropy": "cross_entropy",
    "lora_switch_linear": "lora_switch",
}

# op -> what backend_info() adds as "note": limits of a kernel beyond its devices.
# Why a family's CUDA kernel is left out of the default CUDA build (CMakeLists.txt).
CUDA_LEFT_OUT_WHY: dict[str, str] = {}  # none left out by default

# op -> {device: why} for devices no build of the op's family has a kernel for.
NO_KERNEL_WHY: dict[str, dict[str, str]] = {
    "lora_switch_linear": {"gpu": _LORA_SWITCH_GPU},
}

OP_NOTES: dict[str, str] = {
    "qlora_linear": _QLORA_NOTE,
    "lora_switch_linear": _LORA_SWITCH_NOTE,
    # What a "gpu" kernel covers where it is not the whole op:
    "lora_linear": "GPU: fused forward and backward (dx, dA, dB, dx_d as kernels of ours); "
    "on CUDA the rank-r products are tensor-core kernels of ours for r <= 16, float16 / "
    "bfloat16 and widths that are multiples of 16 (MLX_TUNER_LOWRANK=0: cuBLASLt), "
    "cuBLASLt GEMMs otherwise; on Hopper (sm_90), bfloat16, y = x W^T + s xa B and "
    "dx = dy W + s g A^T are each one GEMM of ours with the rank-r term as one more k step, "
    "xa and g made by that GEMM when there is no dropout (MLX_TUNER_LORA_GEMM=0: the base "
    "GEMM is cuBLASLt's; MLX_TUNER_RANK_IN_GEMM=0: xa and g from a kernel of their own); "
    "dW and dbias, when asked for (W or the bias trained), are MLX's GEMM and sum",
    "dora_linear": "CUDA, dense W with x in W's dtype and ranks up to 32, and affine-"
    "quantized W (any bits) with x in the scales' dtype (float16 / bfloat16), ranks up to 16 and widths "
    "that are multiples of 16: one primitive each way (DoRALinear / DoRALinearVJP: W A with "
    "the low-rank norm identity in its epilogue, then LoRA's GEMMs with m/n in the bf16 "
    "GEMM's epilogue on Hopper, or QLoRA's with m/n folded into W's dequantized blocks; dm "
    "from one pass over dy and y; MLX_TUNER_DORA_FUSED=0 composes as below). Other quantized "
    "cases on CUDA, and Metal: the fused LoRA / QLoRA primitive, the fused row-norm kernel, "
    "1/n (DoRAInvNorm, ranks up to 32, on CUDA with W A from the 4-bit codes for float16 / "
    "bfloat16 scales and ranks up to 16; MLX ops above) and the m/n column scale with its "
    "one-pass backward (DoRAScale) as kernels of ours, W A otherwise from MLX's (quantized) "
    "matmul, the scale a pass of its own. The Metal kernels are checked in the emulator, not "
    "yet timed on a Mac",
    "linear_cross_entropy": "CUDA: chunked over the vocabulary on cuBLASLt; "
    "grad_in_forward=True (the trainer's step, frozen head) computes dh in the forward, 2 "
    "GEMMs of N*V*d, bf16 logit chunks for bf16 inputs: on the H200 1/13 of the "
    "materialized path's memory at 0.94-0.98x its time (BENCHMARKS.md); dW recomputes the "
    "logits (3 GEMMs, 1.47x the materialized path's time); the trainer's fused=False / "
    "MLX_TUNER_FUSED_CE=0 turns it off",
}


def _gpu_name(ext) -> str | None:
    backend = getattr(ext, "gpu_backend", "cpu")
    return None if backend == "cpu" else backend


def backend_info() -> dict:
    """Which devices run a compiled kernel for each fused op, and why not where none.

    Returns ``{"extension": {...}, "ops": {op: {"kernels": [devices], "missing":
    {device: reason}, "note": str}}}`` where devices are ``"cpu"`` and ``"gpu"``; "note"
    (only for ops in ``OP_NOTES``) says which inputs a kernel still sends to the reference.
    """
    st = _extension.status()
    ext = st.module
    gpu = _gpu_name(ext) if ext is not None else None
    info = {
        "extension": {
            "loaded": st.loaded,
            "reason": st.reason,
            "built_against_mlx": st.built_against,
            "installed_mlx": mx.__version__,
            "gpu_backend": gpu,
        },
        "ops": {},
    }
    for op, family in FUSED_OPS.items():
        have = sorted(_extension.kernel_devices(family))
        missing = {}
        for dev in ("cpu", "gpu"):
            if dev in have:
                continue
            if ext is None:
                missing[dev] = st.reason
            elif dev == "gpu" and family in getattr(ext, "cuda_left_out", "").split(","):
                missing[dev] = (f"the '{family}' CUDA kernel is left out of this build "
                                f"(MLX_TUNER_CUDA_DISABLED): {CUDA_LEFT_OUT_WHY.get(family, '')}")
            elif dev in NO_KERNEL_WHY.get(op, {}):
                missing[dev] = NO_KERNEL_WHY[op][dev]
            elif dev == "gpu" and gpu is None:
                missing[dev] = "this build has no GPU backend (MLX without Metal or CUDA)"
            else:
                missing[dev] = f"no {dev} kernel for the '{family}' family in this build"
        info["ops"][op] = {"kernels": have, "missing": missing}
        if op in OP_NOTES:
            info["ops"][op]["note"] = OP_NOTES[op]
    return info


def clear_cuda_cache() -> None:
    """Gives the device buffers mlx-tuner's CUDA kernels keep for reuse back to CUDA (as
    ``mx.clear_cache()`` does for MLX's own). A no-op without the CUDA build."""
    ext = _extension.extension()
    if ext is not None and hasattr(ext, "clear_cuda_cache"):
        ext.clear_cuda_cache()


__all__ = [
    "FUSED_OPS",
    "OP_NOTES",
    "backend_info",
    "clear_cuda_cache",
    "dora_linear",
    "dora_linear_reference",
    "dora_weight_sq_norm",
    "js_div",
    "js_div_reference",
    "kl_div",
    "kl_div_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "lora_linear",
    "lora_linear_reference",
    "lora_switch_linear",
    "lora_switch_linear_reference",
    "qlora_linear",
    "qlora_linear_reference",
]
