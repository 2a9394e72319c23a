"""model/lora.py, model/peft.py and `hibari lora`: B = 0 is the base model; the merged model
equals the adapter forward (scanned, unscanned, remat); gradients through the adapter forward
equal those through the merged model and reach only the adapters; sharded = one device; the PEFT
export loads in transformers + peft with hibari's logits and imports back; `hibari lora merge`
writes a checkpoint load_params reads."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.base.errors import UserError
from hibari.model import ModelConfig, apply, init, unembed
from hibari.model.lora import (
    LORA_RANK,
    LoraConfig,
    LoraConfigError,
    apply_lora,
    lora_apply,
    lora_axes,
    lora_config_from_dict,
    lora_hidden,
    lora_params,
)
from hibari.model.lora_cli import lora_main
from hibari.model.params_io import (
    CheckpointError,
    load_adapters,
    load_params,
    save_adapters,
    save_params,
)
from hibari.model.peft import PeftFormatError, export_peft, import_peft

TINY = ModelConfig(vocab_size=97, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                   d_ff=24, max_seq_len=32)
ALL = LoraConfig(rank=3, alpha=5.0, targets=("*",))


def _random_b(adapters, seed=3, std=0.2):
    """Adapters with B (and A) replaced by normal noise, so the update is not zero."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def _tokens(b=2, t=8, seed=2):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY.vocab_size)


# ------------------------------------------------------------------------ config
def test_config_validation_names_the_field():
    assert lora_config_from_dict({}) == LoraConfig()
    assert LoraConfig().modules == ("attn/q", "attn/v")  # PEFT's Llama default
    cfg = lora_config_from_dict({"rank": 4, "alpha": 8, "targets": ["attn/*", "up"]},
                                where="config.lora")
    assert cfg.modules == ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up")
    assert cfg.scale == 2.0
    assert hash(cfg) == hash(lora_config_from_dict(cfg.to_dict()))
    bad = [({"rank": 0}, "config.lora.rank"), ({"alpha": -1}, "config.lora.alpha"),
           ({"dropout": 1.0}, "config.lora.dropout"), ({"targets": ["lm_head"]},
                                                        "config.lora.targets"),
           ({"rnak": 4}, "unknown field(s) ['rnak']"), ({"init": "xavier"}, "config.lora.init")]
    for d, expected in bad:
        with pytest.raises(LoraConfigError, match=expected.replace("[", r"\[").replace(
                "(", r"\(").replace(")", r"\)")):
            lora_config_from_dict(d, where="config.lora")


def test_fresh_adapters_shapes_init_and_axes():
    ad = lora_params(TINY, ALL, jax.random.key(1))
    attn, mlp = ad["layers"]["attn"], ad["layers"]["mlp"]
    assert attn["q"]["a"].shape == (2, 16, 3) and attn["q"]["b"].shape == (2, 3, 4, 4)
    assert attn["o"]["a"].shape == (2, 4, 4, 3) and attn["o"]["b"].shape == (2, 3, 16)
    assert mlp["down"]["a"].shape == (2, 24, 3) and mlp["down"]["b"].shape == (2, 3, 16)
    for node in (attn["q"], attn["o"], mlp["down"]):
        assert not np.any(node["b"])
        fan_in = np.prod(node["a"].shape[1:-1])  # PEFT's kaiming-uniform: U(+-1/sqrt(in))
        assert 0.8 / np.sqrt(fan_in) < np.abs(node["a"]).max() <= 1 / np.sqrt(fan_in)
    axes = lora_axes(TINY, ALL)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
                              ) == jax.tree.structure(ad)
    assert tuple(axes["layers"]["attn"]["o"]["a"]) == ("layers", "heads", "head_dim", LORA_RANK)
    assert tuple(axes["layers"]["attn"]["k"]["b"]) == ("layers", LORA_RANK, "kv_heads",
                                                       "head_dim")
    plain = lora_params(TINY.replace(scan_layers=False), LoraConfig(), jax.random.key(1))
    assert sorted(plain) == ["layers_0", "layers_1"]
    assert sorted(plain["layers_1"]["attn"]) == ["q", "v"] and "mlp" not in plain["layers_1"]


# ------------------------------------------------------------------------ forward and merge
@pytest.mark.parametrize("changes", [
    {}, pytest.param({"scan_layers": False}, marks=pytest.mark.slow), {"remat": "full"}],
    ids=["scanned", "unscanned", "remat"])
def test_b_zero_is_base_and_merge_equals_adapter_forward(changes):
    cfg = TINY.replace(**changes)
    params = init(cfg, jax.random.key(0))
    tokens = _tokens()
    fresh = lora_params(cfg, ALL, jax.random.key(1))
    base = apply(cfg, params, tokens)
    np.testing.assert_array_equal(lora_apply(cfg, params, fresh, ALL, tokens), base)
    ad = _random_b(fresh)
    forward = lora_apply(cfg, params, ad, ALL, tokens)
    merged = apply(cfg, apply_lora(params, ad, ALL), tokens)
    assert np.abs(forward - base).max() > 1e-2  # the adapters do change the model
    np.testing.assert_allclose(forward, merged, atol=1e-5, rtol=0)
    if not changes:  # the hidden-state entry point losses use, with the (never adapted) unembed
        h = lora_hidden(cfg, params, ad, ALL, tokens)
        np.testing.assert_allclose(unembed(cfg, params, h), forward, atol=1e-6, rtol=0)


def test_merged_kernel_by_hand():
    """o has two input dims: W[h, hd, d] + alpha/r * (A[h*hd, r] @ B[r, d]) reshaped."""
    params = init(TINY, jax.random.key(0))
    ad = _random_b(lora_params(TINY, ALL, jax.random.key(1)))
    merged = apply_lora(params, ad, ALL)
    a = np.asarray(ad["layers"]["attn"]["o"]["a"][1]).reshape(16, 3)
    b = np.asarray(ad["layers"]["attn"]["o"]["b"][1])
    w = np.asarray(params["layers"]["attn"]["o"]["kernel"][1])
    expect = w + 5 / 3 * np.einsum("ir,rj->ij", a, b).reshape(w.shape)
    np.testing.assert_allclose(merged["layers"]["attn"]["o"]["kernel"][1], expect, atol=1e-6)
    for name in ("embed", "final_norm", "lm_head"):  # untargeted parameters are untouched
        jax.tree.map(np.testing.assert_array_equal, merged[name], params[name])


def _nll(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_gradients_reach_only_adapters_and_equal_merged_model():
    params = init(TINY, jax.random.key(0))
    tokens = _tokens()
    lc = LoraConfig(rank=3, alpha=5.0, targets=("attn/q", "attn/o", "mlp/down"))
    fresh = lora_params(TINY, lc, jax.random.key(1))

    def loss(ad, p):
        return _nll(lora_apply(TINY, p, ad, lc, tokens), tokens)

    def merged_loss(ad, p):
        return _nll(apply(TINY, apply_lora(p, ad, lc), tokens), tokens)

    # at B = 0 only B learns (dL/dA = dL/dDelta @ B^T = 0), as in the LoRA paper
    g0 = jax.grad(loss)(fresh, params)
    assert jax.tree.structure(g0) == jax.tree.structure(fresh)
    for node in jax.tree.leaves(g0["layers"], is_leaf=lambda x: "a" in x):
        assert not np.any(node["a"]) and np.abs(node["b"]).max() > 0
    ad = _random_b(fresh, std=0.1)
    g, g_ref = jax.grad(loss)(ad, params), jax.grad(merged_loss)(ad, params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-4), g, g_ref)


def test_dropout_needs_rng_and_scales_kept_inputs():
    params = init(TINY, jax.random.key(0))
    tokens = _tokens()
    lc = LoraConfig(rank=3, alpha=5.0, dropout=0.5, targets=("mlp/down",))
    ad = _random_b(lora_params(TINY, lc, jax.random.key(1)))
    no_drop = lora_apply(TINY, params, ad, lc, tokens)  # evaluation: no rng, no dropout
    np.testing.assert_allclose(no_drop, apply(TINY, apply_lora(params, ad, lc), tokens),
                               atol=1e-5)
    d1 = lora_apply(TINY, params, ad, lc, tokens, rng=jax.random.PRNGKey(7))  # raw keys too
    d2 = lora_apply(TINY, params, ad, lc, tokens, rng=jax.random.key(7))
    d3 = lora_apply(TINY, params, ad, lc, tokens, rng=jax.random.key(8))
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - no_drop).max() > 1e-3 and np.abs(d1 - d3).max() > 1e-3
    # dropout only on the adapter branch: with B = 0 the base is unchanged
    fresh = lora_params(TINY, lc, jax.random.key(1))
    np.testing.assert_array_equal(
        lora_apply(TINY, params, fresh, lc, tokens, rng=jax.random.key(7)),
        apply(TINY, params, tokens))


def test_sharded_equals_one_device():
    from hibari.model.transformer import param_axes
    from hibari.train.sharding import DEFAULT_RULES, logical_shardings, make_mesh, normalize_rules
    assert jax.device_count() == 8  # tests/conftest.py
    params = init(TINY, jax.random.key(0))
    ad = _random_b(lora_params(TINY, ALL, jax.random.key(1)))
    tokens = _tokens()
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    rules = normalize_rules(DEFAULT_RULES)
    p_sh = logical_shardings(param_axes(TINY), jax.eval_shape(lambda: params), mesh, rules)
    a_sh = logical_shardings(lora_axes(TINY, ALL), jax.eval_shape(lambda: ad), mesh, rules)
    placed_p, placed_a = jax.device_put(params, p_sh), jax.device_put(ad, a_sh)
    q = placed_a["layers"]["attn"]["q"]
    kernel = placed_p["layers"]["attn"]["q"]["kernel"]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # rank: none
    assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert tuple(kernel.sharding.spec)[:2] == (None, "fsdp")
    one = lora_apply(TINY, params, ad, ALL, tokens)
    many = lora_apply(TINY, placed_p, placed_a, ALL, tokens)
    np.testing.assert_allclose(many, one, atol=1e-5, rtol=0)
    merged = apply_lora(placed_p, placed_a, ALL)
    assert merged["layers"]["attn"]["q"]["kernel"].sharding.is_equivalent_to(kernel.sharding, 4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-7),
                 jax.device_get(merged), apply_lora(params, ad, ALL))


# ------------------------------------------------------------------------ files and commands
def test_save_load_adapters_across_layouts(tmp_path):
    ad = _random_b(lora_params(TINY, ALL, jax.random.key(1)))
    save_adapters(tmp_path / "ad", TINY, ALL, ad)
    lc, back = load_adapters(tmp_path / "ad", TINY)
    assert lc == ALL
    jax.tree.map(np.testing.assert_array_equal, back, ad)
    _, plain = load_adapters(tmp_path / "ad", TINY.replace(scan_layers=False))
    np.testing.assert_array_equal(plain["layers_1"]["mlp"]["up"]["b"],
                                  ad["layers"]["mlp"]["up"]["b"][1])
    with pytest.raises(CheckpointError, match="d_ff=24 vs 32"):
        load_adapters(tmp_path / "ad", TINY.replace(d_ff=32))
    with pytest.raises(CheckpointError, match="already exists"):
        save_adapters(tmp_path / "ad", TINY, ALL, ad)
    with pytest.raises(UserError, match="no lora_config.json"):
        load_adapters(tmp_path, TINY)


def test_merge_command_writes_a_loadable_checkpoint(tiny_export, tmp_path):
    base_dir, cfg = tiny_export
    _, params = load_params(base_dir)
    lc = LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "mlp/*"))
    ad = _random_b(lora_params(cfg, lc, jax.random.key(5)), std=0.05)
    save_adapters(tmp_path / "ad", cfg, lc, ad)
    out = tmp_path / "merged"
    assert lora_main(["merge", "--checkpoint", str(base_dir), "--adapters",
                      str(tmp_path / "ad"), "--out", str(out)]) == 0
    cfg2, merged = load_params(out)
    assert cfg2 == cfg and (out / "tokenizer.model").is_file()
    jax.tree.map(np.testing.assert_array_equal, merged, apply_lora(params, ad, lc))
    with pytest.raises(UserError, match="already holds"):
        lora_main(["merge", "--checkpoint", str(base_dir), "--adapters", str(tmp_path / "ad"),
                   "--out", str(out)])
    save_params(tmp_path / "other", TINY, init(TINY, jax.random.key(0)))
    with pytest.raises(CheckpointError, match="different model"):
        lora_main(["merge", "--checkpoint", str(tmp_path / "other"), "--adapters",
                   str(tmp_path / "ad"), "--out", str(tmp_path / "m2")])


def test_peft_import_round_trip_and_refusals(tmp_path):
    lc = LoraConfig(rank=3, alpha=6.0, dropout=0.05, targets=("attn/*", "mlp/down"))
    ad = _random_b(lora_params(TINY, lc, jax.random.key(1)))
    out = export_peft(TINY, lc, ad, tmp_path / "peft", "base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 6.0, "LORA")
    from safetensors.numpy import load_file
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"]
    assert a.shape == (3, 16) and b.shape == (16, 3)  # [r, heads * head_dim], [d_model, r]
    np.testing.assert_array_equal(a.T.reshape(4, 4, 3), ad["layers"]["attn"]["o"]["a"][1])
    lc2, back = import_peft(out, TINY.replace(scan_layers=False))
    assert lc2 == dataclasses.replace(lc, targets=lc.modules)  # targets: the modules present
    np.testing.assert_array_equal(back["layers_1"]["attn"]["o"]["b"],
                                  ad["layers"]["attn"]["o"]["b"][1])
    for field, value in (("use_dora", True), ("bias", "all"), ("fan_in_fan_out", True),
                         ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8}),
                         ("peft_type", "IA3")):
        bad = tmp_path / f"bad_{field}"
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes(
            (out / "adapter_model.safetensors").read_bytes())
        (bad / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(PeftFormatError, match=field):
            import_peft(bad, TINY)
    from safetensors.numpy import save_file
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp" not in k},
              str(partial / "adapter_model.safetensors"))
    with pytest.raises(PeftFormatError, match="down_proj lacks"):
        import_peft(partial, TINY)
    with pytest.raises(PeftFormatError, match="shape"):
        import_peft(out, TINY.replace(d_ff=32))
    rs = tmp_path / "rslora"  # scale alpha / sqrt(r) = (alpha * sqrt(r)) / r
    rs.mkdir()
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    (rs / "adapter_model.safetensors").write_bytes(
        (out / "adapter_model.safetensors").read_bytes())
    assert import_peft(rs, TINY)[0].scale == pytest.approx(6.0 / np.sqrt(3))


@pytest.mark.slow
def test_peft_loads_export_with_hibari_logits(tmp_path):
    """transformers LlamaForCausalLM + peft.PeftModel on `hibari lora export --hf-base` files
    give hibari's adapter-forward logits; `hibari lora import` reads them back exactly."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    params = init(TINY, jax.random.key(0))
    save_params(tmp_path / "base", TINY, params)
    lc = LoraConfig(rank=4, alpha=8.0, targets=("*",))
    ad = _random_b(lora_params(TINY, lc, jax.random.key(1)), std=0.1)
    save_adapters(tmp_path / "ad", TINY, lc, ad)
    assert lora_main(["export", "--checkpoint", str(tmp_path / "base"), "--adapters",
                      str(tmp_path / "ad"), "--out", str(tmp_path / "peft"),
                      "--hf-base", str(tmp_path / "hf")]) == 0
    tokens = _tokens(b=2, t=12)
    ours = np.asarray(lora_apply(TINY, params, ad, lc, tokens))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        base = model(torch.tensor(np.asarray(tokens))).logits.numpy()
        model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
        theirs = model(torch.tensor(np.asarray(tokens))).logits.numpy()
    assert np.abs(base - ours).max() > 1e-2  # peft really applied the adapters
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert lora_main(["import", "--checkpoint", str(tmp_path / "hf"), "--peft",
                      str(tmp_path / "peft"), "--out", str(tmp_path / "back")]) == 0
    lc2, back = load_adapters(tmp_path / "back", TINY)
    assert lc2 == dataclasses.replace(lc, targets=lc.modules)
    jax.tree.map(np.testing.assert_array_equal, back, ad)
    # rsLoRA adapters (scale alpha / sqrt(r)) import to the function peft computes
    rs = tmp_path / "rslora"
    rs.mkdir()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    (rs / "adapter_model.safetensors").write_bytes(
        (tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(model, str(rs)).eval()
        theirs = model(torch.tensor(np.asarray(tokens))).logits.numpy()
    lc_rs, ad_rs = import_peft(rs, TINY)
    np.testing.assert_allclose(theirs, lora_apply(TINY, params, ad_rs, lc_rs, tokens),
                               atol=1e-4, rtol=0)
