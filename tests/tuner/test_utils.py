"""mlx_tuner.utils against mlx_lm.tuner.utils on tiny mlx-lm models (random weights)."""

from __future__ import annotations

import inspect
import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mixtral
from mlx_lm.tuner import trainer as mlx_trainer, utils as mlx_utils

from mlx_tuner import dora, lora, utils

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0}


def tiny_llama(layers=3, tie=False, quantize=False, seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=layers,
                           intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=50, tie_word_embeddings=tie)
    model = llama.Model(args)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def tiny_mixtral(seed=0):
    mx.random.seed(seed)
    args = mixtral.ModelArgs(model_type="mixtral", vocab_size=50, hidden_size=64,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = mixtral.Model(args)
    mx.eval(model.parameters())
    return model


def adapters_of(model):
    """(path, class name) of every adapter layer, and the adapter parameter shapes."""
    names = sorted((k, type(m).__name__) for k, m in model.named_modules()
                   if hasattr(m, "lora_a"))
    shapes = sorted((k, tuple(v.shape)) for k, v in tree_flatten(model.parameters())
                    if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m"))
    return names, shapes


@pytest.mark.parametrize("config", [
    {"name": "cosine_decay", "arguments": [1e-3, 100]},
    {"name": "cosine_decay", "arguments": [1e-3, 100, 1e-5], "warmup": 10},
    {"name": "linear_schedule", "arguments": [1e-3, 1e-4, 50], "warmup": 5,
     "warmup_init": 1e-5},
    {"name": "exponential_decay", "arguments": [1e-2, 0.9]},
])
def test_build_schedule(config):
    ours, theirs = utils.build_schedule(config), mlx_utils.build_schedule(config)
    for step in [0, 1, 4, 5, 6, 10, 11, 37, 99, 150]:
        a, b = float(mx.array(ours(step))), float(mx.array(theirs(step)))
        assert abs(a - b) <= 1e-9 + 1e-6 * abs(b), step


CASES = [
    ("llama", 2, {}, False),
    ("llama", -1, {}, False),
    ("llama", 0, {}, True),
    ("llama", 3, {"keys": ["self_attn.q_proj", "mlp.down_proj"]}, False),
    ("llama", 1, {"keys": ["self_attn.v_proj", "model.embed_tokens", "lm_head"]}, False),
    ("llama", 1, {"keys": ["self_attn.v_proj", "model.embed_tokens"]}, True),
    ("qllama", 2, {}, False),
    ("qllama", 2, {"keys": ["self_attn.q_proj", "model.embed_tokens"]}, True),
    ("mixtral", 2, {}, False),
]


def build(kind):
    return {"llama": tiny_llama, "qllama": lambda: tiny_llama(quantize=True),
            "mixtral": tiny_mixtral}[kind]()


@pytest.mark.parametrize("kind,num_layers,extra,use_dora", CASES)
def test_linear_to_lora_layers_like_mlx_lm(kind, num_layers, extra, use_dora):
    ours, theirs = build(kind), build(kind)
    config = {**LORA, **extra}
    utils.linear_to_lora_layers(ours, num_layers, config, use_dora=use_dora)
    mlx_utils.linear_to_lora_layers(theirs, num_layers, config, use_dora=use_dora)
    o_names, o_shapes = adapters_of(ours)
    t_names, t_shapes = adapters_of(theirs)
    if kind == "qllama" and use_dora:
        # mlx-lm's DoRAEmbedding takes the packed width of a quantized table for its dims.
        assert ("model.embed_tokens.lora_b", (4, 64)) in o_shapes
        assert ("model.embed_tokens.lora_b", (4, 8)) in t_shapes
        o_shapes = [s for s in o_shapes if not s[0].startswith("model.embed_tokens")]
        t_shapes = [s for s in t_shapes if not s[0].startswith("model.embed_tokens")]
    assert o_names and o_names == t_names
    assert o_shapes == t_shapes
    mods = dict(ours.named_modules())
    assert all(type(mods[k]).__module__ in (lora.__name__, dora.__name__) for k, _ in o_names)


def test_num_layers_too_large():
    model = tiny_llama(layers=3)
    with pytest.raises(ValueError, match=r"num_layers is 5 .* only 3 layers"):
        utils.linear_to_lora_layers(model, 5, LORA)
    with pytest.raises(KeyError, match="scale"):
        utils.linear_to_lora_layers(model, 1, {"rank": 4, "alpha": 16, "dropout": 0.0})


def test_dora_on_switch_layers():
    """mlx-lm refuses DoRA on MoE switch layers; mlx-tuner converts them to
    DoRASwitchLinear (m per expert and row), and a fresh model computes what it did."""
    model = tiny_mixtral()
    tokens = mx.array([[1, 5, 9, 2, 7]])
    before = model(tokens)
    utils.linear_to_lora_layers(model, 1, LORA, use_dora=True)
    names, shapes = adapters_of(model)
    switch = [k for k, cls in names if cls == "DoRASwitchLinear"]
    assert switch and all(".block_sparse_moe.switch_mlp." in k for k in switch)
    assert all(shape[0] == 4 for k, shape in shapes  # tiny_mixtral's 4 experts
               if k.rsplit(".", 1)[0] in switch)
    assert mx.allclose(model(tokens), before, atol=1e-5)
    utils.remove_lora_layers(model)
    assert not adapters_of(model)[0]


def write_adapters(path, model, num_layers, config, fine_tune_type="lora", weights=None):
    path.mkdir(parents=True, exist_ok=True)
    meta = {"fine_tune_type": fine_tune_type, "num_layers": num_layers,
            "lora_parameters": config}
    (path / "adapter_config.json").write_text(json.dumps(meta))
    if weights is None:
        weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)


def trained(model, num_layers=2, use_dora=False):
    utils.linear_to_lora_layers(model, num_layers, LORA, use_dora=use_dora)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    for k, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    return model


def test_dora_on_switch_layers_trains():
    """A few Adam steps on a DoRA'd MoE model (its experts through DoRASwitchLinear) fit a
    fixed batch: the loss falls and every expert's adapter that saw tokens moved."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    model = tiny_mixtral()
    model.freeze()
    utils.linear_to_lora_layers(model, -1, LORA, use_dora=True)
    tokens = mx.random.randint(0, 50, (4, 12), key=mx.random.key(1))

    def loss_fn(model):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=1e-2)
    start = {k: v for k, v in tree_flatten(model.trainable_parameters()) if "switch_mlp" in k}
    losses = []
    for _ in range(15):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    now = dict(tree_flatten(model.trainable_parameters()))
    assert start and all(not mx.array_equal(now[k], v) for k, v in start.items())


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_mixtral])  # mixtral: DoRASwitchLinear
def test_load_adapters_roundtrip(tmp_path, make_model):
    src = trained(make_model(), use_dora=True)
    write_adapters(tmp_path, src, 2, LORA, "dora")
    dst = utils.load_adapters(make_model(), str(tmp_path))
    x = mx.array([[1, 2, 3, 4]])
    assert mx.allclose(src(x), dst(x), atol=1e-5).item()


def test_load_adapters_errors(tmp_path):
    src = trained(tiny_llama())
    weights = dict(tree_flatten(src.trainable_parameters()))
    with pytest.raises(FileNotFoundError):
        utils.load_adapters(tiny_llama(), str(tmp_path / "nope"))

    bad = dict(weights)
    q_a = "model.layers.2.self_attn.q_proj.lora_a"
    bad[q_a.replace("lora_a", "lora_x")] = bad.pop(q_a)
    bad["model.layers.1.mlp.up_proj.lora_b"] = mx.zeros((3, 96))
    write_adapters(tmp_path / "bad", src, 2, LORA, weights=bad)
    with pytest.raises(ValueError) as e:
        utils.load_adapters(tiny_llama(), str(tmp_path / "bad"))
    msg = str(e.value)
    assert "model.layers.2.self_attn.q_proj.lora_x: not an adapter parameter" in msg
    assert "model.layers.1.mlp.up_proj.lora_b: shape (3, 96) in the file but (4, 96)" in msg
    assert "model.layers.2.self_attn.q_proj.lora_a: in the model but missing" in msg

    # Adapters for 2 layers read into a config saying 1: names not in the model.
    write_adapters(tmp_path / "layers", src, 1, LORA, weights=weights)
    with pytest.raises(ValueError, match="model.layers.1.self_attn.q_proj.lora_a: not an adapter"):
        utils.load_adapters(tiny_llama(), str(tmp_path / "layers"))

    # Rank mismatch: every lora tensor is listed.
    write_adapters(tmp_path / "rank", src, 2, {**LORA, "rank": 8}, weights=weights)
    with pytest.raises(ValueError, match=r"lora_a: shape \(64, 4\) in the file but \(64, 8\)"):
        utils.load_adapters(tiny_llama(), str(tmp_path / "rank"))

    write_adapters(tmp_path / "kind", src, 2, LORA, fine_tune_type="qlora", weights=weights)
    with pytest.raises(ValueError, match="fine_tune_type must be"):
        utils.load_adapters(tiny_llama(), str(tmp_path / "kind"))


def test_load_full_fine_tune(tmp_path):
    src = tiny_llama(seed=1)
    weights = {k: v for k, v in tree_flatten(src.parameters()) if ".layers.2." in k}
    write_adapters(tmp_path, src, 1, LORA, "full", weights)
    dst = utils.load_adapters(tiny_llama(seed=2), str(tmp_path))
    got = dict(tree_flatten(dst.parameters()))
    assert all(mx.array_equal(got[k], v).item() for k, v in weights.items())
    weights["model.layers.2.mlp.up_proj.weight"] = mx.zeros((3, 3))
    write_adapters(tmp_path, src, 1, LORA, "full", weights)
    with pytest.raises(ValueError, match=r"up_proj.weight: shape \(3, 3\)"):
        utils.load_adapters(tiny_llama(), str(tmp_path))


def test_remove_lora_layers():
    base = tiny_llama(tie=True)
    x = mx.array([[3, 1, 4, 1, 5]])
    ref = base(x)
    model = trained(tiny_llama(tie=True), 3)
    utils.linear_to_lora_layers(model, 0, {**LORA, "keys": ["model.embed_tokens"]})
    assert not mx.allclose(model(x), ref, atol=1e-4).item()
    utils.remove_lora_layers(model)
    assert not any(hasattr(m, "lora_a") for _, m in model.named_modules())
    assert mx.allclose(model(x), ref, atol=1e-5).item()


def test_print_trainable_parameters(capsys):
    model = trained(tiny_llama(quantize=True))
    mlx_utils.print_trainable_parameters(model)
    theirs = capsys.readouterr().out
    utils.print_trainable_parameters(model)
    assert capsys.readouterr().out == theirs and "Trainable parameters:" in theirs


@pytest.mark.parametrize("name", ["build_schedule", "linear_to_lora_layers", "load_adapters",
                                  "remove_lora_layers", "print_trainable_parameters"])
def test_same_api_as_mlx_lm(name):
    a = inspect.signature(getattr(utils, name)).parameters
    b = inspect.signature(getattr(mlx_utils, name)).parameters
    assert [(p.name, p.default) for p in a.values()] == [(p.name, p.default) for p in b.values()]


# --- gradient checkpointing -------------------------------------------------------------

def loss_fn(model, x):
    logits = model(x[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, x[:, 1:]).mean()


@pytest.mark.parametrize("use_dora", [False, True])
def test_grad_checkpoint_same_gradients(use_dora, monkeypatch):
    calls = []
    real = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda f: calls.append(1) or real(f))
    x = mx.random.randint(0, 50, (2, 9))
    plain = trained(tiny_llama(), 2, use_dora)
    wrapped = trained(tiny_llama(), 2, use_dora)
    wrapped.update(plain.parameters())
    names = [k for k, _ in tree_flatten(plain.trainable_parameters())]
    utils.grad_checkpoint_layers(wrapped)
    assert all(isinstance(b, utils.CheckpointedLayer) for b in wrapped.layers)
    # Same tree: same names and shapes, so saved adapters keep mlx-lm's names.
    assert [k for k, _ in tree_flatten(wrapped.trainable_parameters())] == names
    assert [k for k, _ in tree_flatten(wrapped.parameters())] == \
           [k for k, _ in tree_flatten(plain.parameters())]
    v1, g1 = nn.value_and_grad(plain, loss_fn)(plain, x)
    v2, g2 = nn.value_and_grad(wrapped, loss_fn)(wrapped, x)
    assert abs(v1.item() - v2.item()) < 1e-6
    assert len(calls) == len(wrapped.layers)  # one checkpoint per block per call
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert sorted(g1) == sorted(g2) == sorted(names)
    for k in g1:
        assert mx.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-5).item(), k
    # The model holds its own arrays afterwards, not the checkpoint's inner ones.
    after = dict(tree_flatten(wrapped.parameters()))
    assert all(mx.array_equal(after[k], v).item() for k, v in tree_flatten(plain.parameters()))


def test_grad_checkpoint_wrapper_behaves_like_the_layer(tmp_path):
    model = tiny_llama()
    block = model.layers[1]
    wrapper = utils.grad_checkpoint(block)
    assert utils.grad_checkpoint(wrapper) is wrapper
    assert wrapper.layer is block and wrapper.self_attn is block.self_attn
    assert wrapper.hidden_size == block.hidden_size == 64  # plain attributes read through
    model.layers[1] = wrapper
    # Converting after wrapping reaches the wrapped layer's modules.
    utils.linear_to_lora_layers(model, 2, {**LORA, "dropout": 0.5})
    assert isinstance(block.self_attn.q_proj, lora.LoRALinear)
    # Train/eval and freezing propagate through the wrapper.
    model.eval()
    x = mx.array([[1, 2, 3]])
    assert mx.array_equal(model(x), model(x)).item()
    # Saved from a checkpointed model, loaded by mlx-lm into a plain one: same names.
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    write_adapters(tmp_path, model, 2, {**LORA, "dropout": 0.5})
    plain = mlx_utils.load_adapters(tiny_llama(), str(tmp_path))
    plain.eval()
    assert mx.allclose(plain(x), model(x), atol=1e-5).item()


def test_mlx_lm_grad_checkpoint_still_in_trainer():
    """mlx-lm exposes its class patch from tuner.trainer; ours lives in utils."""
    assert callable(mlx_trainer.grad_checkpoint)


def test_grad_checkpoint_compiled_training_steps():
    """A compiled DoRA training loop (mlx-lm's pattern) gives the same losses wrapped."""
    import mlx.optimizers as optim

    losses = []
    for wrap in (False, True):
        model = trained(tiny_llama(), 2, use_dora=True)
        if wrap:
            utils.grad_checkpoint_layers(model)
        opt = optim.Adam(1e-2)
        state = [model.state, opt.state]

        def step(x, model=model, opt=opt):
            v, g = nn.value_and_grad(model, loss_fn)(model, x)
            opt.update(model, g)
            return v

        step = mx.compile(step, inputs=state, outputs=state)
        x = mx.random.randint(0, 50, (2, 9), key=mx.random.key(1))
        losses.append([step(x).item() for _ in range(4)])
    assert losses[0][-1] < losses[0][0]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
