"""``mlx-tuner fuse``: fold trained adapters into the base model and save it so that
``mlx_lm.load`` loads it (mlx_lm.fuse's flags). The model is written to a temporary
folder beside ``--save-path`` and renamed into place, so a crash never leaves a
half-written model there."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

GGUF_MODEL_TYPES = ("llama", "mixtral", "mistral")


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse trained adapters into the base model",
                       description="Fuse fine-tuned adapters into the base model.")
    p.add_argument("--model", default="mlx_model",
                   help="local model folder or Hugging Face repo (default: mlx_model)")
    p.add_argument("--save-path", default="fused_model",
                   help="folder for the fused model; an existing one is replaced once the "
                        "new model is completely written (default: fused_model)")
    p.add_argument("--adapter-path", default="adapters",
                   help="folder with adapters.safetensors and adapter_config.json")
    p.add_argument("--hf-path", default=None,
                   help="the original Hugging Face model, named in the model card")
    p.add_argument("--upload-repo", default=None,
                   help="Hugging Face repo to upload the fused model to")
    p.add_argument("--dequantize", "--de-quantize", dest="dequantize", action="store_true",
                   help="save a dequantized (dense) model")
    p.add_argument("--export-gguf", action="store_true",
                   help=f"also export GGUF weights ({', '.join(GGUF_MODEL_TYPES)} only)")
    p.add_argument("--gguf-path", default="ggml-model-f16.gguf",
                   help="GGUF file name inside --save-path (default: ggml-model-f16.gguf)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom code of the model/tokenizer")
    p.set_defaults(func=run)


def fuse_adapters(model, dequantize: bool = False):
    """Replace every adapter layer of ``model`` by its fused base layer, in place."""
    from mlx.utils import tree_unflatten

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if hasattr(m, "fuse") and name]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an old ``dst`` goes only afterwards."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from mlx.utils import tree_flatten
    from mlx_lm import utils as lm

    from ..utils import load_adapters

    save_path = Path(args.save_path).resolve()
    if args.export_gguf:
        from mlx_lm.gguf import convert_to_gguf

    print("Loading pretrained model")
    model, tokenizer, config = lm.load(args.model, return_config=True,
                                       trust_remote_code=args.trust_remote_code)
    if args.export_gguf and config.get("model_type") not in GGUF_MODEL_TYPES:
        raise SystemExit(f"[fuse] --export-gguf supports model types {GGUF_MODEL_TYPES} "
                         f"but the model is {config.get('model_type')!r}.")
    if args.export_gguf and config.get("quantization") and not args.dequantize:
        raise SystemExit("[fuse] --export-gguf needs a dense model: the model is quantized, "
                         "add --dequantize.")
    load_adapters(model, args.adapter_path)
    model.eval()
    fuse_adapters(model, dequantize=args.dequantize)
    if args.dequantize:
        print("Dequantizing model")
        model = lm.dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_path.name}.tmp-", dir=save_path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick
        lm.save(tmp, args.model, model, tokenizer, config, donate_model=False)
        if args.hf_path is not None:
            lm.create_model_card(tmp, args.hf_path)
        if args.export_gguf:
            weights = dict(tree_flatten(model.parameters()))
            convert_to_gguf(tmp, weights, config, str(tmp / args.gguf_path))
        _replace_dir(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Saved the fused model to {save_path}")

    if args.upload_repo is not None:
        lm.upload_to_hub(str(save_path), args.upload_repo)
    return 0
