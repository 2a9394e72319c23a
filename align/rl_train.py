"""`hibari ppo` / `hibari grpo`: reinforcement learning from a reward, rollouts sampled in jit.

    task = rl_task(config, workdir)        # then train.loop.train(config, workdir, task)

One loop step is one rollout batch (`config.data.batch_size` prompts):
  1. rollout, one jitted function: the policy samples up to `config.rollout.max_new_tokens`
     tokens per prompt (GRPO: `config.grpo.group_size` samples per prompt) with
     `model.decode.sample_tokens`; then the log-probs of the sampled tokens under the policy
     and the frozen reference, the values (PPO) and, when the reward is a model, its scores.
  2. a programmatic reward (align/rewards.py, by name) scores the decoded responses on the host.
  3. update, one jitted function: per-token rewards −β·(log π − log π_ref) plus the score on
     the last response token and GAE (PPO), or group-normalised advantages (GRPO); then
     `epochs` passes over `minibatches` shuffled minibatches of clipped-surrogate updates; the
     adaptive KL coefficient (Ziegler et al. 2019) when configured.
The generic loop (train/loop.py) does the rest: resume (the sampler's key is the state's rng,
the KL coefficient is the state's `extra`), checkpoints, metrics.jsonl/TensorBoard, signals.

Parameters (one mesh, one set of logical-axis rules):
  trained  {"policy": Transformer, "value": head}           PPO, config.ppo.value = "head"
           {"policy": Transformer, "critic": reward model}  PPO, config.ppo.value = "critic"
           {"policy": Transformer}                          GRPO
  frozen   {"ref": Transformer, "reward": reward model (only when the reward is a model)}
A "head" is a scalar linear head on the policy's final hidden state (its value loss trains the
shared trunk too, weighted by vf_coef); a "critic" is a separate transformer + head,
initialised from the reward model when there is one, else from the policy with a fresh head.

Sequences are [prompt left-padded to config.data.prompt_len | response of max_new_tokens]; the
response mask covers the generated tokens up to and including the end-of-sequence token. Log-
probs use the sampling temperature (logits / T), as the tokens were sampled from it.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hibari.align import reward as reward_model
from hibari.align import rl
from hibari.align.data import AlignDataError, SegmentEncoder, Skipped, read_records
from hibari.align.preference import preference_loader, prompt_segments
from hibari.align.rewards import get_reward, score_responses
from hibari.align.templates import END, TemplateError, get_template
from hibari.base.stats import mean_stderr
from hibari.model import ModelConfig, hidden, param_axes, unembed
from hibari.model.decode import left_pad, sample_tokens
from hibari.model.logprobs import token_log_probs
from hibari.train.loop import Task, TrainConfigError
from hibari.train.lora import lora_config_of
from hibari.train.sharding import batch_sharding, replicated, sharding_context
from hibari.train.step import apply_gradients

log = logging.getLogger(__name__)

ALGORITHMS = ("ppo", "grpo")
VALUE_KINDS = ("head", "critic")
MODEL_REWARD = "model"


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

class Prompt(NamedTuple):
    id: str
    tokens: np.ndarray  # [bos] + templated prompt, no eos
    record: dict


def prompt_of(record: dict) -> Any:
    """The prompt of a record: its "prompt" (string, {instruction, input} or chat messages),
    or the instruction and input of an SFT-style record."""
    if "prompt" in record:
        return record["prompt"]
    if "instruction" in record:
        return {"instruction": record["instruction"], "input": record.get("input", "")}
    raise TemplateError("field 'prompt' (or 'instruction') is missing")


def load_prompts(paths, encoder: SegmentEncoder, template, prompt_len: int,
                 skipped: Skipped | None = None) -> tuple[list[Prompt], Skipped]:
    """Prompts of JSONL records, tokenized as training templates them (longer than
    `prompt_len` tokens: skipped and counted with file:line)."""
    def convert(record):
        segments, _ = prompt_segments(prompt_of(record), template)
        tokens, _ = encoder.encode(segments, add_eos=False)
        if len(tokens) > prompt_len:
            raise AlignDataError(f"prompt longer than config.data.prompt_len={prompt_len} "
                                 "tokens")
        return Prompt(str(record.get("id")), tokens, record)
    return read_records(paths, convert, skipped)


def prompt_rows(prompts: list[Prompt], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """tokens/segment_ids [n, width] left-padded (segment 0 = padding), index [n, 1]: the rows
    `preference.preference_loader` batches (shuffled per epoch for train)."""
    tokens, segments = left_pad([p.tokens for p in prompts], width, pad_id)
    return {"tokens": tokens, "segment_ids": segments,
            "index": np.arange(len(prompts), dtype=np.int32)[:, None]}


# ---------------------------------------------------------------------------------------------
# The pieces of a step (pure, traced inside the step's two jitted functions)
# ---------------------------------------------------------------------------------------------

class Spec(NamedTuple):
    """Everything static about a run's step (hashable: it shapes the compiled functions)."""
    algorithm: str
    cfg: ModelConfig
    critic_cfg: ModelConfig | None  # PPO with a critic
    reward_cfg: ModelConfig | None  # a reward model
    value: str  # "head" | "critic" | "" (GRPO)
    prompt_len: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    eos_ids: tuple[int, ...]
    pad_id: int
    group_size: int
    epochs: int
    minibatches: int
    clip_eps: float
    value_clip_eps: float
    gamma: float
    lam: float
    vf_coef: float
    entropy_coef: float
    whiten_rewards: bool
    whiten_advantages: bool
    adaptive_kl: bool
    kl_target: float
    kl_horizon: float
    missing_eos_penalty: float
    score_clip: float
    normalize_scores: bool
    lora: Any = None  # hibari.train.lora.LoraView when config.lora trains the policy's adapters


def response_hidden(cfg: ModelConfig, params, tokens, segment_ids, width: int, length: int):
    """Final hidden states at the positions that predict each response token: h[b, T, d]."""
    h = hidden(cfg, params, tokens, segment_ids)
    return h[:, width - 1:width - 1 + length]


def response_logits(spec: Spec, params, h, temperature=None):
    """Logits of the distribution the tokens were sampled from: logits / T (T = 0, greedy: the
    plain logits). `temperature` (traced) defaults to the rollout's."""
    logits = unembed(spec.cfg, params, h)
    t = spec.temperature if temperature is None else temperature
    return logits / jnp.where(t > 0, t, 1.0)


def head_values(head, h):
    """A scalar head on hidden states: v[...] in fp32."""
    return (h.astype(jnp.float32) @ head["kernel"])[..., 0] + head["bias"][0]


def values_of(spec: Spec, params, h_policy, tokens, segment_ids):
    if spec.value == "head":
        return head_values(params["value"], h_policy)
    critic = params["critic"]
    h = response_hidden(spec.critic_cfg, critic["transformer"], tokens, segment_ids,
                        spec.prompt_len, spec.max_new_tokens)
    return head_values(critic["head"], h)


def rollout(spec: Spec, params, frozen, rng, batch, temperature):
    """Sample responses at `temperature` (a traced scalar, so held-out greedy decoding reuses
    the compiled function) and everything the update needs about them, [B, T] per token."""
    if spec.lora is not None:  # the adapters on the frozen base; the reference is the base
        params, frozen = spec.lora.params(params, frozen), spec.lora.task_frozen(frozen)
    _, sample_key, _ = jax.random.split(jax.random.wrap_key_data(rng), 3)
    prompt, prompt_seg, index = batch["tokens"], batch["segment_ids"], batch["index"]
    if spec.group_size > 1:
        prompt, prompt_seg, index = (jnp.repeat(x, spec.group_size, axis=0)
                                     for x in (prompt, prompt_seg, index))
    out = sample_tokens(spec.cfg, params["policy"], prompt, prompt_seg, sample_key,
                        max_new_tokens=spec.max_new_tokens, temperature=temperature,
                        top_k=spec.top_k, top_p=spec.top_p, eos_ids=spec.eos_ids,
                        pad_id=spec.pad_id)
    response, mask = out["tokens"], out["mask"]
    tokens = jnp.concatenate([prompt, response], axis=1)
    segment_ids = jnp.concatenate([prompt_seg, mask], axis=1)
    width, length = spec.prompt_len, spec.max_new_tokens
    h = response_hidden(spec.cfg, params["policy"], tokens, segment_ids, width, length)
    logits = response_logits(spec, params["policy"], h, temperature)
    logp, _ = token_log_probs(logits, response)
    h_ref = response_hidden(spec.cfg, frozen["ref"], tokens, segment_ids, width, length)
    ref_logp, _ = token_log_probs(response_logits(spec, frozen["ref"], h_ref, temperature),
                                  response)
    ended = jnp.any((mask > 0) & jnp.isin(response, jnp.asarray(spec.eos_ids)), axis=1)
    ro = {"tokens": tokens, "segment_ids": segment_ids, "response": response, "mask": mask,
          "index": index, "logp": logp, "ref_logp": ref_logp, "ended": ended,
          "entropy": rl.entropy_from_logits(logits)}
    if spec.value:
        ro["values"] = values_of(spec, params, h, tokens, segment_ids)
    if spec.reward_cfg is not None:
        ro["scores"] = reward_model.segment_rewards(
            spec.reward_cfg, frozen["reward"],
            {"tokens": tokens, "segment_ids": segment_ids})[:, 0]
    return ro


def shaped_scores(spec: Spec, scores, ended):
    """Scores as the update uses them: minus the missing-EOS penalty, clipped, normalised."""
    s = scores.astype(jnp.float32) - spec.missing_eos_penalty * (1.0 - ended.astype(jnp.float32))
    if spec.score_clip > 0:
        s = jnp.clip(s, -spec.score_clip, spec.score_clip)
    if spec.normalize_scores:
        s = (s - s.mean()) / (s.std() + 1e-8)
    return s


def policy_terms(spec: Spec, params, mb):
    """(log p[b, T], entropy[b, T], hidden[b, T, d]) of the minibatch's responses."""
    h = response_hidden(spec.cfg, params["policy"], mb["tokens"], mb["segment_ids"],
                        spec.prompt_len, spec.max_new_tokens)
    logits = response_logits(spec, params["policy"], h)
    logp, _ = token_log_probs(logits, mb["response"])
    return logp, rl.entropy_from_logits(logits), h


def ppo_loss(spec: Spec, params, mb):
    mask = mb["mask"].astype(jnp.float32)
    logp, entropy, h = policy_terms(spec, params, mb)
    pg = rl.ppo_policy_loss(logp, mb["logp"], mb["advantages"], mask, spec.clip_eps)
    values = values_of(spec, params, h, mb["tokens"], mb["segment_ids"])
    vl = rl.ppo_value_loss(values, mb["values"], mb["returns"], mask, spec.value_clip_eps)
    ent = rl.masked_mean(entropy, mask)
    loss = pg + spec.vf_coef * vl - spec.entropy_coef * ent
    stats = rl.ppo_policy_stats(logp, mb["logp"], mb["advantages"], mask, spec.clip_eps)
    stats.update(rl.ppo_value_stats(values, mb["values"], mb["returns"], mask,
                                    spec.value_clip_eps))
    stats.update(policy_loss=pg, value_loss=vl, policy_entropy=ent)
    return loss, stats


def grpo_loss(spec: Spec, beta, params, mb):
    mask = mb["mask"].astype(jnp.float32)
    logp, entropy, _ = policy_terms(spec, params, mb)
    loss = rl.grpo_loss(logp, mb["logp"], mb["ref_logp"], mb["advantages"], mask, spec.clip_eps,
                        beta)
    stats = rl.ppo_policy_stats(logp, mb["logp"], mb["advantages"][:, None] * mask, mask,
                                spec.clip_eps)
    stats.update(policy_loss=loss, policy_entropy=rl.masked_mean(entropy, mask))
    return loss, stats


def advantages(spec: Spec, ro, scores, kl_coef):
    """The update's per-row data: advantages (and returns for PPO) from the shaped scores."""
    mask = ro["mask"].astype(jnp.float32)
    out = {}
    if spec.algorithm == "grpo":
        out["advantages"] = rl.grpo_advantages(scores, spec.group_size)
        return out
    rewards = rl.kl_penalized_rewards(scores, ro["logp"], ro["ref_logp"], mask, kl_coef)
    if spec.whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False) * mask
    adv, returns = rl.gae(rewards, ro["values"], mask, spec.gamma, spec.lam)
    if spec.whiten_advantages:
        adv = rl.masked_whiten(adv, mask) * mask
    out.update(advantages=adv, returns=returns)
    return out


def update(spec: Spec, optimizer, mesh, rules, state, ro):
    """PPO / GRPO epochs over minibatches of one rollout batch -> (state, metrics)."""
    rng, _, shuffle_key = jax.random.split(jax.random.wrap_key_data(state.rng), 3)
    kl_coef = state.extra["kl_coef"]
    mask = ro["mask"].astype(jnp.float32)
    scores = shaped_scores(spec, ro["scores"], ro["ended"])
    data = {k: ro[k] for k in ("tokens", "segment_ids", "response", "mask", "logp")}
    data.update({k: ro[k] for k in (("values",) if spec.value else ("ref_logp",))})
    derived = advantages(spec, ro, scores, kl_coef)
    data["advantages"] = derived["advantages"]
    if "returns" in derived:
        data["returns"] = derived["returns"]

    n = ro["mask"].shape[0]
    size = n // spec.minibatches
    order = jnp.stack([jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)
                       for e in range(spec.epochs)]).reshape(spec.epochs * spec.minibatches, size)
    loss_fn = (functools.partial(ppo_loss, spec) if spec.algorithm == "ppo"
               else functools.partial(grpo_loss, spec, kl_coef))
    task_loss = loss_fn

    def loss_fn(p, mb, key):  # with LoRA: gradients reach the adapters (and heads) only
        return task_loss(p if spec.lora is None else spec.lora.params(p, state.frozen, key), mb)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    drop_keys = jax.random.split(jax.random.fold_in(shuffle_key, 1), len(order))

    def minibatch(carry, xs):
        params, opt_state = carry
        idx, key = xs
        mb = {k: jax.lax.with_sharding_constraint(
            v[idx], batch_sharding(mesh, rules, v.ndim)) for k, v in data.items()}
        (loss, stats), grads = grad_fn(params, mb, key)
        params, opt_state, grad_norm, finite = apply_gradients(optimizer, params, opt_state,
                                                               loss, grads)
        stats = dict(stats, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return (params, opt_state), stats

    (params, opt_state), stats = jax.lax.scan(minibatch, (state.params, state.opt_state),
                                              (order, drop_keys))
    metrics = {k: v.mean() for k, v in stats.items() if k != "finite"}
    metrics["finite"] = (stats["finite"].min() > 0).astype(jnp.int32)

    seq_kl = ((ro["logp"] - ro["ref_logp"]) * mask).sum(-1)  # per-response KL estimate
    kl = seq_kl.mean()
    lengths = mask.sum(-1)
    metrics.update(
        reward=ro["scores"].astype(jnp.float32).mean(),
        reward_std=ro["scores"].astype(jnp.float32).std(),
        shaped_score=scores.mean(), kl=kl, kl_coef=kl_coef,
        entropy=rl.masked_mean(ro["entropy"], mask), response_length=lengths.mean(),
        eos_fraction=ro["ended"].astype(jnp.float32).mean())
    if spec.algorithm == "ppo":
        metrics.update(
            non_score_reward=(-kl_coef * seq_kl).mean(),
            explained_variance=rl.explained_variance(ro["values"], derived["returns"], mask),
            value_mean=rl.masked_mean(ro["values"], mask),
            return_mean=rl.masked_mean(derived["returns"], mask))
    new_coef = kl_coef
    if spec.adaptive_kl:
        new_coef = rl.adaptive_kl_update(kl_coef, kl, spec.kl_target, spec.kl_horizon, n)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng),
                              extra=dict(state.extra, kl_coef=jnp.float32(new_coef)))
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Host side: decoding and programmatic rewards, moving rows between hosts
# ---------------------------------------------------------------------------------------------

def fetch(x) -> np.ndarray:
    """A global array as a numpy array on every host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_global(x: np.ndarray, sharding) -> jax.Array:
    """An array every host holds whole, placed on `sharding`."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def decode_responses(encoder: SegmentEncoder, eos_ids, response: np.ndarray,
                     mask: np.ndarray) -> list[str]:
    """The text of each response (its masked tokens without end tokens)."""
    eos = set(int(e) for e in eos_ids)
    out = []
    for tokens, m in zip(response, mask):
        ids = [int(t) for t in tokens[m > 0] if int(t) not in eos and t < encoder.vocab_size]
        out.append(encoder.decode(ids).replace(END, "").strip())
    return out


# ---------------------------------------------------------------------------------------------
# The runner: what the loop calls (step, held-out evaluation)
# ---------------------------------------------------------------------------------------------

PROMPT_FIELDS = ("tokens", "segment_ids", "index")


class Runner:
    """Holds a run's static parts and its compiled functions; `make_step` and `on_eval` are
    the Task hooks."""

    def __init__(self, config, workdir, spec: Spec, encoder: SegmentEncoder,
                 train_prompts: list[Prompt], eval_prompts: list[Prompt]):
        self.config, self.workdir, self.spec, self.encoder = config, Path(workdir), spec, encoder
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.eval_rows = prompt_rows(eval_prompts, spec.prompt_len, spec.pad_id)
        self.reward_name = config.reward.name
        self.reward_args = dict(config.reward.args or {})
        if self.reward_name != MODEL_REWARD:
            get_reward(self.reward_name)  # an unknown name fails before anything is compiled
        self.mesh = self.rules = self.optimizer = self.state_shardings = None
        self.compiled: dict[Any, Any] = {}

    @property
    def host_reward(self) -> bool:
        return self.reward_name != MODEL_REWARD

    def host_scores(self, ro, prompts: list[Prompt]) -> tuple[np.ndarray, list[str]]:
        """(scores[n], texts) of a rollout's responses; scores from the programmatic reward,
        or those the reward model gave inside the rollout."""
        response, mask = fetch(ro["response"]), fetch(ro["mask"])
        texts = decode_responses(self.encoder, self.spec.eos_ids, response, mask)
        if not self.host_reward:
            return fetch(ro["scores"]), texts
        records = [prompts[int(i)].record for i in fetch(ro["index"])[:, 0]]
        return score_responses(self.reward_name, texts, records, self.reward_args), texts

    # -- compiled functions ---------------------------------------------------------------

    def _rollout(self, spec: Spec, params, frozen, rng, prompts, temperature: float):
        """The jitted rollout for `spec` (compiled once per spec and prompt shape)."""
        key = ("rollout", spec, prompts["tokens"].shape)
        temperature = jnp.float32(temperature)
        if key not in self.compiled:
            mesh, rules = self.mesh, self.rules

            def fn(params, frozen, rng, batch, temperature):
                with sharding_context(mesh, rules):
                    return rollout(spec, params, frozen, rng, batch, temperature)

            abstract = jax.eval_shape(fn, params, frozen, rng, prompts, temperature)
            self.compiled[key] = jax.jit(
                fn, in_shardings=(self.state_shardings.params, self.state_shardings.frozen,
                                  replicated(mesh), self._row_shardings(prompts),
                                  replicated(mesh)),
                out_shardings=self._row_shardings(abstract))
        return self.compiled[key](params, frozen, rng, prompts, temperature)

    def _row_shardings(self, tree):
        return {k: batch_sharding(self.mesh, self.rules, v.ndim) for k, v in tree.items()}

    def _update(self, state, ro):
        if "update" not in self.compiled:
            mesh, rules, optimizer, spec = self.mesh, self.rules, self.optimizer, self.spec

            def fn(state, ro):
                with sharding_context(mesh, rules):
                    return update(spec, optimizer, mesh, rules, state, ro)

            self.compiled["update"] = jax.jit(
                fn, in_shardings=(self.state_shardings, self._row_shardings(ro)),
                out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=(0,))
        return self.compiled["update"](state, ro)

    # -- Task hooks -----------------------------------------------------------------------

    def make_step(self, *, optimizer, schedule, mesh, rules, state_shardings, lora=None):
        del schedule
        self.spec = self.spec._replace(lora=lora)
        self.optimizer, self.mesh, self.rules = optimizer, mesh, rules
        self.state_shardings = state_shardings
        return self.step

    def step(self, state, batch):
        """One rollout batch: sample, score, update -> (state, metrics)."""
        prompts = {k: batch[k] for k in PROMPT_FIELDS}
        ro = self._rollout(self.spec, state.params, state.frozen, state.rng, prompts,
                           self.spec.temperature)
        if self.host_reward:
            scores, _ = self.host_scores(ro, self.train_prompts)
            ro = dict(ro, scores=to_global(scores, batch_sharding(self.mesh, self.rules, 1)))
        return self._update(state, ro)

    def on_eval(self, step, params, frozen=None):
        """Held-out prompts: mean score (± standard error) of the policy's responses at
        config.eval.temperature and their summed log-ratio to the reference (`eval_kl`: a KL
        estimate at temperature 1; greedy responses can give a negative one); the responses
        go to <workdir>/samples/<step>.jsonl."""
        if not self.eval_prompts or frozen is None or self.mesh is None:
            return {}
        from hibari.train.sharding import global_batch
        spec = self.spec._replace(group_size=1)
        loader = preference_loader(self.eval_rows, batch_size=self.config.data.batch_size //
                                   jax.process_count(), seed=self.config.seed, split="eval")
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(self.config.seed), 4))
        records = []
        for local in loader:
            batch = global_batch({k: local[k] for k in PROMPT_FIELDS}, self.mesh, self.rules)
            ro = self._rollout(spec, params, frozen, rng, batch,
                               float(self.config.eval.temperature))
            scores, texts = self.host_scores(ro, self.eval_prompts)
            mask, index = fetch(ro["mask"]), fetch(ro["index"])
            seq_kl = ((fetch(ro["logp"]) - fetch(ro["ref_logp"])) * mask).sum(1)
            real = fetch(batch["segment_ids"]).sum(1) > 0  # the last batch is padded
            for i in np.flatnonzero(real):
                records.append({"id": self.eval_prompts[int(index[i, 0])].id,
                                "response": texts[i], "score": float(scores[i]),
                                "kl": float(seq_kl[i]), "length": int(mask[i].sum())})
        if jax.process_index() == 0:
            out = self.workdir / "samples" / f"{step}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                           encoding="utf-8")
        scores = np.array([r["score"] for r in records])
        n = len(scores)
        return {"eval_reward": float(scores.mean()),
                "eval_reward_stderr": mean_stderr(scores),
                "eval_kl": float(np.mean([r["kl"] for r in records])), "eval_prompts": n}


# ---------------------------------------------------------------------------------------------
# Config -> Task
# ---------------------------------------------------------------------------------------------

def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _positive_int(config, path: str) -> int:
    value = _get(config, path)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TrainConfigError(f"config.{path} must be a positive integer, got {value!r}")
    return value


def _number(config, path: str, low: float = -math.inf, high: float = math.inf,
            low_open: bool = False) -> float:
    value = _get(config, path)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise TrainConfigError(f"config.{path}={value!r} must be a finite number in {bound}")
    return float(value)


def make_spec(config, algorithm: str, cfg: ModelConfig, critic_cfg, reward_cfg, eos_ids,
              pad_id: int) -> Spec:
    """The static step description from a config, every field checked."""
    section = algorithm
    group = 1
    if algorithm == "grpo":
        group = _positive_int(config, "grpo.group_size")
        if group < 2:
            raise TrainConfigError("config.grpo.group_size must be >= 2 (advantages are "
                                   "normalised within each prompt's group)")
    value = ""
    if algorithm == "ppo":
        value = config.ppo.value
        if value not in VALUE_KINDS:
            raise TrainConfigError(f"config.ppo.value={value!r}; choose one of {VALUE_KINDS}")
    return Spec(
        algorithm=algorithm, cfg=cfg, critic_cfg=critic_cfg, reward_cfg=reward_cfg,
        value=value, prompt_len=_positive_int(config, "data.prompt_len"),
        max_new_tokens=_positive_int(config, "rollout.max_new_tokens"),
        temperature=_number(config, "rollout.temperature", 0.0),
        top_k=int(_number(config, "rollout.top_k", 0)),
        top_p=_number(config, "rollout.top_p", 0.0, 1.0, low_open=True),
        eos_ids=tuple(eos_ids), pad_id=pad_id, group_size=group,
        epochs=_positive_int(config, f"{section}.epochs"),
        minibatches=_positive_int(config, f"{section}.minibatches"),
        clip_eps=_number(config, f"{section}.clip_eps", 0.0, low_open=True),
        value_clip_eps=_number(config, "ppo.value_clip_eps", 0.0, low_open=True),
        gamma=_number(config, "ppo.gamma", 0.0, 1.0), lam=_number(config, "ppo.lam", 0.0, 1.0),
        vf_coef=_number(config, "ppo.vf_coef", 0.0),
        entropy_coef=_number(config, "ppo.entropy_coef"),
        whiten_rewards=bool(config.ppo.whiten_rewards),
        whiten_advantages=bool(config.ppo.whiten_advantages),
        adaptive_kl=bool(config.kl.adaptive) and algorithm == "ppo",
        kl_target=_number(config, "kl.target", 0.0, low_open=True),
        kl_horizon=_number(config, "kl.horizon", 0.0, low_open=True),
        missing_eos_penalty=_number(config, "reward.missing_eos_penalty"),
        score_clip=_number(config, "reward.clip", 0.0),
        normalize_scores=bool(config.reward.normalize))


def rl_task(config: ml_collections.ConfigDict, workdir: str | Path, algorithm: str) -> Task:
    """The Task of a PPO or GRPO run (`algorithm`), built from its config."""
    from hibari.align.tasks import encoder_of, split_data, start_params
    if algorithm not in ALGORITHMS:
        raise TrainConfigError(f"algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if config.get("algorithm", algorithm) != algorithm:
        raise TrainConfigError(f"config.algorithm={config.algorithm!r}: this config is for "
                               f"`hibari {config.algorithm}`, not `hibari {algorithm}`")
    beta = _number(config, "kl.beta", 0.0)
    _number(config, "eval.temperature", 0.0)
    prompt_len = _positive_int(config, "data.prompt_len")
    max_new = _positive_int(config, "rollout.max_new_tokens")
    with config.unlocked():
        config.data.seq_len = prompt_len + max_new
    cfg, policy = start_params(config)  # checks seq_len against the policy's max_seq_len
    encoder = encoder_of(config, cfg)
    template = get_template(config.data.template)
    eos_ids = [encoder.eos_id]
    if config.data.template == "chat":  # a chat reply ends with <|end|>, then eos
        eos_ids.append(encoder.sp.piece_to_id(END))

    reward_cfg = reward_params = None
    if config.reward.name == MODEL_REWARD:
        if not config.reward.model:
            raise TrainConfigError("config.reward.name='model' needs config.reward.model: the "
                                   "run directory of `hibari reward`")
        reward_cfg, reward_params = reward_model.load_reward_model(config.reward.model)
        if reward_cfg.vocab_size < encoder.vocab_size:
            raise TrainConfigError(f"config.reward.model={config.reward.model}: its vocabulary "
                                   f"({reward_cfg.vocab_size}) is smaller than the tokenizer's "
                                   f"({encoder.vocab_size})")
        if reward_cfg.max_seq_len < prompt_len + max_new:
            raise TrainConfigError(f"config.reward.model={config.reward.model}: max_seq_len="
                                   f"{reward_cfg.max_seq_len} < prompt_len + max_new_tokens")
    critic_cfg = (reward_cfg or cfg) if algorithm == "ppo" and config.ppo.value == "critic" \
        else None
    pad_id = max(encoder.sp.pad_id(), 0)
    spec = make_spec(config, algorithm, cfg, critic_cfg, reward_cfg, eos_ids, pad_id)

    train_prompts, eval_prompts = split_data(
        config, lambda paths, skipped: load_prompts(paths, encoder, template, prompt_len,
                                                    skipped))
    rollout_rows = config.data.batch_size * spec.group_size
    if rollout_rows % spec.minibatches:
        raise TrainConfigError(
            f"the rollout batch ({rollout_rows} = config.data.batch_size x group size) must be "
            f"divisible by config.{algorithm}.minibatches={spec.minibatches}")
    runner = Runner(config, workdir, spec, encoder, train_prompts, eval_prompts)
    train_rows = prompt_rows(train_prompts, prompt_len, pad_id)

    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    params: dict[str, Any] = {"policy": policy}
    axes: dict[str, Any] = {"policy": param_axes(cfg)}
    if spec.value == "head":
        params["value"] = reward_model.init_head(cfg, key, std=0.0)
        axes["value"] = reward_model.reward_param_axes(cfg)["head"]
    elif spec.value == "critic":
        params["critic"] = (jax.tree.map(jnp.copy, reward_params) if reward_params is not None
                            else reward_model.init_reward_params(
                                cfg, key, jax.tree.map(jnp.copy, policy)))
        axes["critic"] = reward_model.reward_param_axes(critic_cfg)
    # with LoRA the reference is the frozen base itself (Task.frozen_from_start), no copy
    frozen: dict[str, Any] = {"ref": policy if lora_config_of(config) else
                              jax.tree.map(jnp.copy, policy)}
    frozen_axes: dict[str, Any] = {"ref": param_axes(cfg)}
    if reward_params is not None:
        frozen["reward"] = reward_params
        frozen_axes["reward"] = reward_model.reward_param_axes(reward_cfg)

    def make_loader(split):
        if split != "train":  # no held-out loss; on_eval scores held-out prompts instead
            return None
        return preference_loader(train_rows, batch_size=config.data.batch_size //
                                 jax.process_count(), seed=config.seed)

    return Task(base_params=params, param_axes=axes, frozen_params=frozen,
                frozen_axes=frozen_axes, make_loader=make_loader, on_eval=runner.on_eval,
                make_step=runner.make_step, updates_per_step=spec.epochs * spec.minibatches,
                tokens_per_step=rollout_rows * (prompt_len + max_new),
                init_extra=lambda: {"kl_coef": jnp.float32(beta)},
                transformers={"policy": cfg}, frozen_from_start={"ref": "policy"})


def plot_run(workdir: str | Path, title: str = "") -> Path | None:
    """<workdir>/curves.png: reward (train batches and held-out prompts) and KL per step."""
    from hibari.train.metrics import metric_series, plot_panels, read_metrics
    path = Path(workdir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return None
    records = read_metrics(path)
    out = Path(workdir) / "curves.png"
    plot_panels(out, title or str(workdir), [
        ("reward (mean score)", [("rollout batch", *metric_series(records, "reward"), "-"),
                                 ("held-out prompts", *metric_series(records, "eval_reward"),
                                  "o-")]),
        ("KL(policy || reference), nats per response",
         [("rollout batch", *metric_series(records, "kl"), "-"),
          ("held-out prompts", *metric_series(records, "eval_kl"), "o-")]),
        ("response length (tokens)", [("rollout batch",
                                       *metric_series(records, "response_length"), "-")])])
    return out
