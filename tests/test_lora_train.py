"""LoRA training (config.lora, hibari.train.lora) on 8 simulated CPU devices: the wrapped loss
and its gradients equal the merged model's (an independent path: apply_lora then the task's
own loss); the optimizer state covers the adapters only and the base never changes; DPO's
reference is the base itself; reward heads stay trainable; GRPO and continued pretraining
run; sharded equals one device; the run loads as its merged model and exports to PEFT."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_align_e2e import tiny_config

from hibari.align import tasks
from hibari.align.reward import load_reward_model
from hibari.base.resources import resource_path
from hibari.configs.base import align_config
from hibari.model import init
from hibari.model.lora import LoraConfigError, apply_lora, count_lora_params, lora_params
from hibari.model.lora_cli import lora_main
from hibari.model.params_io import LORA_RUN, load_params, save_params
from hibari.train.loop import TrainConfigError, build, model_config, train
from hibari.train.sharding import global_batch

ROOT = Path(__file__).parent.parent


SEQ = 128


def small_config(tmp_path, steps, **fields):
    """test_align_e2e's tiny model and preference pairs at sequence length SEQ."""
    c = tiny_config(tmp_path, steps=steps, **fields)
    c.data.seq_len = c.model.max_seq_len = SEQ
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A params export of a small model: the frozen base every LoRA run here adapts."""
    path = tmp_path_factory.mktemp("base") / "export"
    cfg = model_config(small_config(tmp_path_factory.mktemp("cfg"), steps=1))
    save_params(path, cfg, init(cfg, jax.random.key(7)))
    return str(path)


def lora_config(tmp_path, base, steps=2, sft=False, **fields):
    """A LoRA run on `base`: preference pairs, or (sft) the bundled instruction data."""
    c = small_config(tmp_path, steps=steps, **fields)
    if sft:
        c.data.update(train_path=str(resource_path("hibari.align", "assets", "seed_sft.jsonl")),
                      eval_path="")
    c.init_from = base
    c.lora.update(enabled=True, rank=4, alpha=8.0,
                  targets=("attn/q", "attn/v", "attn/o", "mlp/up", "mlp/down"))
    return c


def _perturb(trainable, scale=0.05):
    """Non-zero B everywhere (a fresh adapter's B = 0 would hide a wrong product)."""
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                  for x, k in zip(leaves, keys)])


def _n(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def test_lora_sft_loss_and_gradients_equal_the_merged_model(tmp_path, base):
    config = lora_config(tmp_path, base, sft=True)
    run = build(config, None, tasks.sft_task(config), devices=jax.devices()[:1])
    view = run.task.lora
    trainable = _perturb(jax.device_get(run.state.params))
    frozen = run.state.frozen
    batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
    rng = jax.random.key(0)
    plain = tasks.sft_task(config).loss_fn  # the task's own loss on a full tree

    def via_lora(t):
        return run.task.loss_fn(t, batch, rng, frozen=frozen)[0]

    def via_merge(t):
        return plain(apply_lora(frozen["base"][""], t, view.lora_cfg), batch, rng)[0]

    (l1, g1), (l2, g2) = jax.value_and_grad(via_lora)(trainable), \
        jax.value_and_grad(via_merge)(trainable)
    assert float(l1) == pytest.approx(float(l2), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_lora_sft_run_trains_adapters_only_and_loads_merged(tmp_path, base):
    config = lora_config(tmp_path, base, steps=3, sft=True)
    workdir = tmp_path / "run"
    summary = train(config, workdir, tasks.sft_task(config))
    run = build(config, workdir, tasks.sft_task(config))  # the saved state, restored
    cfg, base_params = load_params(base)
    expected = lora_params(cfg, run.task.lora.lora_cfg, jax.random.key(0))
    assert jax.tree.structure(run.state.params) == jax.tree.structure(expected)
    n = count_lora_params(run.state.params)
    assert n < 0.2 * _n(base_params)
    # AdamW: two moments per adapter entry, nothing for the base
    moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n
    # the base is held once, unchanged
    assert set(run.state.frozen) == {"base"}
    for a, b in zip(jax.tree.leaves(run.state.frozen["base"][""]), jax.tree.leaves(base_params)):
        np.testing.assert_array_equal(a, b)
    assert any(float(jnp.abs(x["b"]).max()) > 0 for x in
               jax.tree.leaves(run.state.params, is_leaf=lambda x: isinstance(x, dict)
                               and "b" in x))
    # resuming it with another LoRA config (or without LoRA) is refused, naming the fields
    changed = lora_config(tmp_path, base, steps=3, sft=True)
    changed.lora.rank = 8
    with pytest.raises(TrainConfigError, match=r"different lora config \(fields \['rank'\]"):
        train(changed, workdir, tasks.sft_task(changed))
    changed.lora.enabled, changed.lora.rank = False, 4
    with pytest.raises(TrainConfigError, match=r"different lora config \(fields \['enabled'\]"):
        train(changed, workdir, tasks.sft_task(changed))
    # the run reads back as base + adapters, merged
    record = json.loads((workdir / LORA_RUN).read_text())
    assert record["bases"][""]["checkpoint"] == str(Path(base).absolute())
    _, merged = load_params(workdir)
    adapters = jax.device_put(jax.device_get(run.state.params), jax.devices()[0])
    want = apply_lora(base_params, adapters, run.task.lora.lora_cfg)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(jax.tree.leaves(summary["params"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # `hibari lora merge --checkpoint RUN` without --adapters: the same merged model
    assert lora_main(["merge", "--checkpoint", str(workdir), "--out", str(tmp_path / "m")]) == 0
    _, again = load_params(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_lora_dpo_reference_is_the_base(tmp_path, base):
    config = lora_config(tmp_path, base)
    run = build(config, None, tasks.preference_task(config, tmp_path))
    assert set(run.state.frozen) == {"base"}  # no second copy of the model as the reference
    batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
    state, metrics = run.step_fn(run.state, batch)
    # B = 0 at step 0: the policy is its reference, so DPO's loss is log 2 exactly
    assert float(metrics["loss"]) == pytest.approx(np.log(2.0), rel=1e-5)
    state, metrics = run.step_fn(state, batch)
    assert float(metrics["loss"]) != pytest.approx(np.log(2.0), rel=1e-4)


def test_lora_reward_model_trains_adapters_and_head(tmp_path, base):
    config = lora_config(tmp_path, base)
    run = build(config, None, tasks.reward_task(config))
    params = run.state.params
    assert set(params) == {"transformer", "head"} and "embed" not in params["transformer"]
    head = np.asarray(jax.device_get(params["head"]["kernel"]))
    batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
    state, metrics = run.step_fn(run.state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert not np.allclose(np.asarray(jax.device_get(state.params["head"]["kernel"])), head)
    # a trained LoRA reward run loads as base + merged adapters with its own head
    train(config, tmp_path / "rm", tasks.reward_task(config))
    run = build(config, tmp_path / "rm", tasks.reward_task(config))
    cfg, loaded = load_reward_model(tmp_path / "rm")
    _, base_params = load_params(base)
    adapters = jax.device_put(jax.device_get(run.state.params["transformer"]), jax.devices()[0])
    want = apply_lora(base_params, adapters, run.task.lora.lora_cfg)
    for a, b in zip(jax.tree.leaves(loaded["transformer"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(loaded["head"]["kernel"],
                                  jax.device_get(run.state.params["head"]["kernel"]))


@pytest.mark.slow
def test_lora_sharded_step_equals_single_device(tmp_path, base):
    results = []
    for devices, fsdp in ((jax.devices(), 2), (jax.devices()[:1], 1)):
        config = lora_config(tmp_path, base, sft=True)
        config.mesh.fsdp = fsdp
        run = build(config, None, tasks.sft_task(config), devices=devices)
        batch = global_batch(next(iter(run.loader)), run.mesh, run.rules)
        state, metrics = run.step_fn(run.state, batch)
        state, metrics = run.step_fn(state, batch)
        results.append((float(metrics["loss"]),
                        [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]))
    (l8, p8), (l1, p1) = results
    assert l8 == pytest.approx(l1, rel=1e-5)
    for a, b in zip(p8, p1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.02 * 3e-3)


@pytest.mark.slow
def test_lora_grpo_and_continued_pretraining_run(tmp_path, base):
    from hibari.align.rl_train import rl_task
    from hibari.configs.rl.grpo import get_config as grpo_config
    c = grpo_config("tiny")
    c.init_from = base
    c.data.prompt_len = SEQ - c.rollout.max_new_tokens
    c.data.batch_size = 8
    c.data.tokenizer = small_config(tmp_path, 1).data.tokenizer
    c.lora.update(enabled=True, rank=4)
    c.update(steps=2, log_every=1, eval_every=0, checkpoint_every=0, async_checkpoint=False)
    summary = train(c, tmp_path / "grpo", rl_task(c, tmp_path / "grpo", "grpo"))
    assert np.isfinite(summary["loss"]) and summary["step"] == 2
    run = build(c, tmp_path / "grpo", rl_task(c, tmp_path / "grpo", "grpo"))
    assert set(run.state.frozen) == {"base", "task"} and "ref" not in run.state.frozen["task"]
    assert "embed" not in run.state.params["policy"]

    # continued pretraining from the base on synthetic tokens: adapters only
    from hibari.configs.pretrain.llama import get_config as pretrain_config
    p = pretrain_config("tiny")
    p.update(steps=2, log_every=1, eval_every=0, checkpoint_every=0, async_checkpoint=False)
    p.data.update(seq_len=SEQ, batch_size=8)
    p.init_from = base
    p.lora.update(enabled=True)
    summary = train(p, tmp_path / "cpt")
    assert np.isfinite(summary["loss"])
    assert p.model.d_model == model_config(small_config(tmp_path, 1)).d_model

    # ... with Rho-1 token selection (the base as its own reference): the recipe's model is
    # replaced by init_from's before the reference's vocabulary is checked against it
    from hibari.train.cli import token_selection_task
    r = pretrain_config("tiny")
    r.update(steps=2, log_every=1, eval_every=0, checkpoint_every=0, async_checkpoint=False)
    r.data.update(seq_len=SEQ, batch_size=8)
    r.init_from = base
    r.lora.update(enabled=True)
    r.loss.token_selection.update(enabled=True, reference=base, keep_ratio=0.5)
    task = token_selection_task(r)
    summary = train(r, tmp_path / "cpt-rho1", task)
    assert np.isfinite(summary["loss"]) and summary["kept_share"] == pytest.approx(0.5, abs=0.01)


def test_lora_without_a_base_is_a_one_line_error(tmp_path):
    c = align_config("t", steps=1)
    c.lora.enabled = True
    with pytest.raises(LoraConfigError, match="config.init_from"):
        build(c, None, tasks.sft_task(c))
    c.init_from, c.lora.rank = "", 0
    with pytest.raises(Exception, match="config.lora.rank"):
        build(c, None, tasks.sft_task(c))


def test_weight_decay_reaches_adapters_not_norms():
    from hibari.train.optim import decay_mask
    mask = decay_mask({"layers": {"attn": {"q": {"a": 1, "b": 2}}}, "norm": {"scale": 3}})
    assert mask == {"layers": {"attn": {"q": {"a": True, "b": True}}},
                    "norm": {"scale": False}}


@pytest.mark.slow
def test_lora_run_exports_to_peft_with_hibari_logits(tmp_path, base):
    """The contract: `hibari lora export --checkpoint RUN --out DIR` on a LoRA training run;
    peft.PeftModel on the HF export of its base gives the run's (merged) logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    from hibari.model import apply
    config = lora_config(tmp_path, base, steps=3, sft=True)
    config.optim.lr = 3e-2  # B far from 0 after three steps
    workdir = tmp_path / "run"
    train(config, workdir, tasks.sft_task(config))
    assert lora_main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "peft"),
                      "--hf-base", str(tmp_path / "hf")]) == 0
    cfg, merged = load_params(workdir)
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, cfg.vocab_size)
    ours = np.asarray(apply(cfg, merged, tokens))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(torch.tensor(np.asarray(tokens))).logits.numpy()
        model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
        theirs = model(torch.tensor(np.asarray(tokens))).logits.numpy()
    assert np.abs(plain - ours).max() > 1e-3  # the trained adapters change the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
