"""What MLX_TUNER_LEAN_SWIGLU=1 saves in mlx-tuner's training step (a diagnostic, not a
benchmark row): the MLX peak of 4 steps of a bf16 Qwen3-style model (256 wide,
intermediate 1024, vocabulary 1000, rank-8 LoRA, batch 2 x 256 tokens of bench_train's
learnable rows) with 2 and 6 layers, so that the per-layer figure leaves out what does
not grow with the layers; and the loss curves, which must agree.

    cd bench && PYTHONPATH=../python python probe_swiglu.py
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def one(layers: int) -> None:  # in a fresh process per setting: the peak is per process
    os.environ["MLX_TUNER_BENCH_TRAIN"] = "qwen3"
    import bench_train as bt

    bt.SHAPE = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=layers,
                    intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, vocab_size=1000, tie_word_embeddings=True,
                    max_position_embeddings=4096, rope_theta=1e6)
    bt.BATCH, bt.SEQ = 2, 256
    curve, _, peak, _ = bt._train("lora", "fused", Path(tempfile.mkdtemp()), iters=4, score=False)
    print(f"RESULT {peak} " + " ".join(f"{c:.4f}" for c in curve))


def main() -> None:
    rows = {}
    for lean in ("0", "1"):
        for layers in (2, 6):
            env = {**os.environ, "MLX_TUNER_LEAN_SWIGLU": lean}
            out = subprocess.run([sys.executable, __file__, str(layers)], env=env,
                                 capture_output=True, text=True, check=True).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
            peak, *curve = line.split()[1:]
            rows[lean, layers] = (int(peak), curve)
    for lean in ("0", "1"):
        per_layer = (rows[lean, 6][0] - rows[lean, 2][0]) / 4 / 2**20
        print(f"MLX_TUNER_LEAN_SWIGLU={lean}: {per_layer:.1f} MiB a layer; "
              f"losses (6 layers) {' '.join(rows[lean, 6][1])}")


if __name__ == "__main__":
    one(int(sys.argv[1])) if len(sys.argv) > 1 else main()
