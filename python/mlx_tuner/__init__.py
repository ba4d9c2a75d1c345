"""mlx-tuner: LoRA, DoRA and QLoRA fine-tuning on MLX with fused kernels.

A drop-in for ``mlx_lm.tuner``: the modules ``lora``, ``dora``, ``trainer``,
``datasets``, ``losses``, ``utils`` and ``callbacks`` mirror it name for name.
Importing the package does no work: the compiled extension is loaded on first use.
"""

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
