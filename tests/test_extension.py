"""The import contract: importing never fails because of the extension, backend_info()
says what is compiled where, and an extension built against another mlx is not used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mlx.core as mx

import mlx_tuner
from mlx_tuner import ops
from mlx_tuner.ops import _extension


def test_backend_info_lists_every_fused_op():
    info = ops.backend_info()
    assert info["extension"]["installed_mlx"] == mx.__version__
    assert set(info["ops"]) == set(ops.FUSED_OPS)
    for op, entry in info["ops"].items():
        # every device is either a kernel or has a reason
        assert set(entry["kernels"]) | set(entry["missing"]) == {"cpu", "gpu"}, op
        assert all(isinstance(v, str) and v for v in entry["missing"].values())


def test_extension_is_built_and_loaded():
    # The test suite runs against an installed wheel: the extension must be there.
    info = ops.backend_info()["extension"]
    assert info["loaded"], info["reason"]
    assert info["built_against_mlx"] == mx.__version__


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_mismatched_mlx_version_warns_once_and_uses_references():
    # Pretend the installed mlx differs from the one the extension was built against.
    code = """
        import warnings
        import mlx.core as mx
        mx.__version__ = "0.0.1"
        import mlx_tuner
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            info = mlx_tuner.ops.backend_info()
            mlx_tuner.ops.backend_info()
            q = mx.random.normal((4, 33)); p = mx.random.normal((4, 33))
            out = mlx_tuner.ops.kl_div(q, p)
            ref = mlx_tuner.ops.kl_div_reference(q, p)
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "built against mlx" in msgs[0] and "0.0.1" in msgs[0], msgs[0]
        assert "pip install mlx==" in msgs[0], msgs[0]
        assert not info["extension"]["loaded"]
        assert all(not e["kernels"] for e in info["ops"].values())
        assert mx.allclose(out, ref).item()
        print("ok")
    """
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_disable_env_turns_kernels_off():
    code = """
        import mlx_tuner
        info = mlx_tuner.ops.backend_info()
        assert not info["extension"]["loaded"]
        assert "MLX_TUNER_DISABLE_KERNELS" in info["extension"]["reason"]
        print("ok")
    """
    r = _run(code, MLX_TUNER_DISABLE_KERNELS="1")
    assert r.returncode == 0, r.stderr


def test_import_does_not_load_the_extension():
    code = """
        import sys
        import mlx_tuner
        assert "mlx_tuner._ext" not in sys.modules, "extension loaded at import"
        print("ok")
    """
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_missing_extension_falls_back(monkeypatch):
    # Simulate a build without the extension: the loader reports why, ops still work.
    monkeypatch.setitem(sys.modules, "mlx_tuner._ext", None)
    _extension.reset()
    try:
        st = _extension.status()
        assert not st.loaded and "not available" in st.reason
        q = mx.random.normal((2, 5))
        assert ops.kl_div(q, q).shape == (2,)
    finally:
        monkeypatch.delitem(sys.modules, "mlx_tuner._ext")
        _extension.reset()


def test_version():
    assert isinstance(mlx_tuner.__version__, str)


def test_clear_cuda_cache_is_safe_anywhere():
    # Empties mlx-tuner's CUDA buffer cache; elsewhere (CPU, Metal, no extension) a no-op.
    ops.clear_cuda_cache()
    ops.clear_cuda_cache()
