"""The fields every training recipe has: model, mesh and axis rules, optimizer, loop. Recipe files
extend it (configs/pretrain/llama.py, configs/sft, configs/dpo, configs/reward) with their shape,
data and any fields of their own."""
import ml_collections

from hibari.train.sharding import DEFAULT_RULES

# Sequences of mesh axes as lists, as config.json and --config.rules write them.
RULES = [[axis, list(mesh) if isinstance(mesh, tuple) else mesh] for axis, mesh in DEFAULT_RULES]


def base_config(name: str, steps: int, *, shape: dict, data: dict, lr: float,
                weight_decay: float, accelerator: bool = False) -> ml_collections.ConfigDict:
    """`shape`: vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, max_seq_len;
    `data`: the recipe's data fields; `accelerator`: bf16 compute, cuDNN attention and remat."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.seed = 0  # fixes the initialisation and the data order
    c.steps = steps  # optimizer steps (warmup, eval and checkpoint intervals follow it)

    c.model = ml_collections.ConfigDict(dict(
        **shape, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, param_dtype="float32",
        compute_dtype="bfloat16" if accelerator else "float32", init_std=0.02,
        norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False, qkv_bias=False,
        qk_norm=False, attention="cudnn" if accelerator else "xla", scan_layers=True,
        remat="dots_no_batch" if accelerator else "none"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.rules = RULES  # logical axis -> mesh axes (docs/running.md)

    c.optim = ml_collections.ConfigDict(dict(
        lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay,
        clip_norm=1.0, schedule="cosine", warmup_steps=0,
        min_lr_ratio=0.1, decay_fraction=0.2, decay_embeddings=False))
    # schedule: cosine | wsd | constant; min_lr_ratio: the floor of the decay; decay_fraction:
    # wsd's final decay share of the steps; decay_embeddings: weight decay on embeddings/norms
    # Fields derived from `steps` are references, so --config.steps=N rescales them
    # (an explicit override of the field itself wins).
    steps_ref = c.get_ref("steps")
    c.optim.warmup_steps = steps_ref // 20 if steps // 20 <= 2000 else 2000

    c.data = ml_collections.ConfigDict(data)

    c.grad_accum = 1  # micro-batches per step (same global batch, less memory)
    c.z_loss = 0.0  # weight of the PaLM z-loss, log(Z)^2
    c.logits_chunk = 0  # >0: compute logits in sequence chunks of this size (memory)
    c.nan_policy = "stop"  # stop | skip
    c.nan_max_skips = 10  # nan_policy=skip: this many skipped steps in a row stop the run

    c.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    c.eval_every = steps_ref // 5  # also evaluated at the final step
    c.eval_batches = 4  # held-out batches per evaluation
    c.checkpoint_every = steps_ref // 5  # 0 = only the final step
    c.keep_checkpoints = 3  # newest checkpoints kept
    c.async_checkpoint = True  # write checkpoints in the background

    c.init_from = ""  # run/step dir, params export or HF dir to start from; "" = fresh model
    c.lora = lora_config()
    return c


def lora_config() -> ml_collections.ConfigDict:
    """config.lora: train low-rank adapters on the frozen init_from model instead of every
    weight (hibari.train.lora; docs/lora.md). Off by default."""
    return ml_collections.ConfigDict(dict(
        enabled=False,  # train adapters on the frozen init_from model, not every weight
        rank=8,  # r, the adapters' rank
        alpha=16.0,  # the update is scaled by alpha / rank (PEFT's lora_alpha)
        dropout=0.0,  # on the adapters' input while training
        targets=("attn/q", "attn/v"),  # attn/q|k|v|o, mlp/gate|up|down; fnmatch patterns
        init="kaiming",  # A's init: kaiming (PEFT's default) | gaussian; B starts at 0
    ))


def loss_config() -> ml_collections.ConfigDict:
    """config.loss of pretraining recipes (configs/pretrain): Rho-1's selective language
    modelling (hibari.train.losses.selective_lm_loss_fn), off by default."""
    return ml_collections.ConfigDict(dict(token_selection=ml_collections.ConfigDict(dict(
        enabled=False,  # train only on the tokens of highest excess loss over a reference model
        keep_ratio=0.6,  # in (0, 1]: each batch keeps its ⌈keep_ratio·n⌉ tokens of most excess
        reference="",  # same-vocab model: run/step dir, params export, HF dir, .gguf file
        mode="live",  # live: held beside the model, scores each batch | cached: packed rows once
        cache="",  # mode=cached: the cache directory; "" = <workdir>/reference_token_losses
    ))))


def align_config(name: str, steps: int, seq_len: int = 512, batch_size: int = 8,
                 lr: float = 1e-3) -> ml_collections.ConfigDict:
    """The fields shared by configs/sft, configs/dpo and configs/reward: a tiny CPU model by
    default; with `init_from` the model config comes from the checkpoint."""
    c = base_config(
        name, steps, lr=lr, weight_decay=0.0,
        shape=dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=16, d_ff=192, max_seq_len=seq_len),
        data=dict(tokenizer="align/assets/seed_sp.model",
                  train_path="align/assets/seed_sft.jsonl", eval_path="", eval_fraction=0.1,
                  template="alpaca_en", seq_len=seq_len, batch_size=batch_size))
    return c  # init_from "" = a fresh tiny model


RL_VARIANTS = ("tiny", "sft")


def rl_config(algorithm: str, variant: str, *, batch_size: int) -> ml_collections.ConfigDict:
    """The fields of configs/rl (PPO and GRPO): align_config's model and data, plus the
    rollout, the reward, the KL penalty and each algorithm's update settings. Variants: `tiny`
    (a fresh tiny policy, programmatic reward, minutes on a CPU) and `sft` (a trained policy:
    set init_from, the tokenizer and the reward)."""
    if variant not in RL_VARIANTS:
        raise ValueError(f"configs/rl/{algorithm}.py: unknown variant {variant!r}; choose "
                         f"from {RL_VARIANTS}")
    tiny = variant == "tiny"
    prompt_len, max_new_tokens = (128, 16) if tiny else (192, 48)
    c = align_config(f"{algorithm}-{variant}", 100 if tiny else 200,
                     seq_len=prompt_len + max_new_tokens, batch_size=batch_size,
                     lr=1e-3 if tiny else 1e-5)
    c.algorithm = algorithm  # the command that runs this config: ppo | grpo
    c.data.prompt_len = prompt_len  # prompts are left-padded to this many tokens (longer: skipped)
    # data.train_path: JSONL records with "prompt" (string, {instruction, input} or chat
    # messages) or SFT-style "instruction"/"input", plus any fields a reward reads ("answer")
    c.optim.schedule = "constant"
    c.optim.clip_norm = 1.0
    c.optim.b2 = 0.999
    c.eval_batches = 1  # unused: held-out prompts are all scored at each evaluation
    c.rollout = ml_collections.ConfigDict(dict(
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0))
    c.reward = ml_collections.ConfigDict(dict(
        name="japanese_share",  # a reward registered in hibari.align.rewards, or "model"
        model="",  # with name="model": the run directory of `hibari reward`
        args={},  # keyword arguments of the programmatic reward
        missing_eos_penalty=0.0,  # subtracted from the score of a response with no eos
        clip=0.0,  # > 0: clip scores to [-clip, clip]
        normalize=False))  # whiten the scores over each rollout batch
    c.kl = ml_collections.ConfigDict(dict(
        beta=0.05,  # KL(pi || pi_ref) coefficient (PPO: per-token penalty; GRPO: in the loss)
        adaptive=False, target=6.0, horizon=10000))  # PPO: Ziegler et al.'s controller
    c.ppo = ml_collections.ConfigDict(dict(
        epochs=4, minibatches=2, clip_eps=0.2, value_clip_eps=0.2, gamma=1.0, lam=0.95,
        vf_coef=0.1, entropy_coef=0.0, whiten_rewards=False, whiten_advantages=True,
        value="head"))  # value: "head" on the policy trunk | "critic" (a separate model)
    c.grpo = ml_collections.ConfigDict(dict(
        group_size=4, epochs=1, minibatches=1, clip_eps=0.2))
    c.eval = ml_collections.ConfigDict(dict(temperature=0.0))  # held-out prompts' decoding
    if not tiny:
        c.reward.missing_eos_penalty = 1.0
    c.log_every = 1
    c.eval_every = c.get_ref("steps") // 4
    c.checkpoint_every = c.get_ref("steps") // 4
    return c
