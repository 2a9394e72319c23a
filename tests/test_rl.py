"""align/rl and align/rewards: the PPO / GRPO formulas vs per-token numpy loops written from the
papers (GAE also vs the discounted-sum definition), jit == eager, and the programmatic rewards
on hand-counted strings. No model; a few seconds."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.align import rl
from hibari.align.rewards import (
    REWARDS,
    get_reward,
    register_reward,
    score_responses,
)
from hibari.base.errors import UsageError

# --- batches: [b, t] with contiguous response runs at varied offsets, one empty row -----------


def make_mask(rng, b, t):
    """Row 0 empty, row 1 full, row 2 only the last token, row 3 only the first, then runs of
    random start and length."""
    mask = np.zeros((b, t), np.float32)
    mask[1], mask[2, -1], mask[3, 0] = 1.0, 1.0, 1.0
    for i in range(4, b):
        start = int(rng.integers(0, t))
        mask[i, start:start + int(rng.integers(1, t - start + 1))] = 1.0
    return mask


@pytest.fixture(scope="module")
def batch():
    b, t = 9, 12
    rng = np.random.default_rng(0)
    normal = lambda scale: rng.normal(0.0, scale, (b, t)).astype(np.float32)  # noqa: E731
    logp = -np.abs(normal(2.0))
    return {"mask": make_mask(rng, b, t), "rewards": normal(1.0), "values": normal(1.0),
            "old_values": normal(1.0), "returns": normal(1.5), "logp": logp,
            "old_logp": logp + normal(0.6),  # ratios well outside [0.8, 1.2]: the clip is hit
            "ref_logp": logp + normal(0.3), "adv_tok": normal(1.0),
            "scores": rng.normal(0.0, 2.0, b).astype(np.float32)}


def tokens(mask):
    """(b, t) of the masked tokens, in order."""
    return [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]


def span(row_mask):
    idx = [j for j, m in enumerate(row_mask) if m]
    return (idx[0], idx[-1]) if idx else None


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, np.float64), rtol=tol, atol=tol)


# --- numpy transcriptions -----------------------------------------------------------------------

def np_mean(x, mask):
    vals = [float(x[i, j]) for i, j in tokens(mask)]
    return sum(vals) / len(vals) if vals else 0.0


def np_whiten(x, mask, shift_mean):
    vals = np.array([x[i, j] for i, j in tokens(mask)], np.float64)
    out = np.zeros(x.shape)
    if len(vals) == 0:
        return out
    mean = vals.mean()
    var = vals.var(ddof=1) if len(vals) > 1 else 0.0
    for i, j in tokens(mask):
        out[i, j] = (x[i, j] - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
    return out


def np_gae_recursion(r, v, m, gamma, lam):
    """Schulman et al. 2016 eq. 16 as a backward loop, stopping at the response's end."""
    b, t = r.shape
    adv = np.zeros((b, t))
    for i in range(b):
        next_adv = next_value = next_mask = 0.0
        for j in reversed(range(t)):
            delta = r[i, j] + gamma * next_value * next_mask - v[i, j]
            a = delta + gamma * lam * next_mask * next_adv
            adv[i, j] = a * m[i, j]
            next_adv, next_value, next_mask = a, v[i, j], m[i, j]
    return adv, (adv + v) * m


def np_gae_sum(r, v, m, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over the row's response span (eq. 14)."""
    adv = np.zeros(r.shape)
    for i in range(r.shape[0]):
        s = span(m[i])
        if s is None:
            continue
        first, last = s
        delta = {j: r[i, j] + (gamma * v[i, j + 1] if j < last else 0.0) - v[i, j]
                 for j in range(first, last + 1)}
        for j in range(first, last + 1):
            adv[i, j] = sum((gamma * lam) ** k * delta[j + k] for k in range(last - j + 1))
    return adv, (adv + v) * m


def np_ppo_policy(lp, old, adv, m, eps):
    losses, clipped, kl, k3 = [], [], [], []
    for i, j in tokens(m):
        rho = math.exp(lp[i, j] - old[i, j])
        a = -adv[i, j] * rho
        c = -adv[i, j] * min(max(rho, 1 - eps), 1 + eps)
        losses.append(max(a, c))
        clipped.append(float(c > a))
        kl.append(0.5 * (lp[i, j] - old[i, j]) ** 2)
        k3.append(rho - 1 - math.log(rho))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(losses), {"clip_fraction": mean(clipped), "approx_kl": mean(kl),
                          "approx_kl_k3": mean(k3)}


def np_ppo_value(v, old, ret, m, eps):
    losses, clipped = [], []
    for i, j in tokens(m):
        unclipped = (v[i, j] - ret[i, j]) ** 2
        vc = old[i, j] + min(max(v[i, j] - old[i, j], -eps), eps)
        c = (vc - ret[i, j]) ** 2
        losses.append(max(unclipped, c))
        clipped.append(float(c > unclipped))
    n = max(len(losses), 1)
    return 0.5 * sum(losses) / n, sum(clipped) / n


def np_kl_rewards(scores, lp, ref, m, beta):
    out = np.zeros(lp.shape)
    for i in range(lp.shape[0]):
        last = None
        for j in range(lp.shape[1]):
            if m[i, j]:
                out[i, j] = -beta * (lp[i, j] - ref[i, j])
                last = j
        if last is not None:
            out[i, last] += scores[i]
    return out


def np_grpo_advantages(scores, g, eps):
    out = []
    for k in range(0, len(scores), g):
        group = np.asarray(scores[k:k + g], np.float64)
        out += [(s - group.mean()) / (np.std(group, ddof=1) + eps) for s in group]
    return out


def np_grpo_loss(lp, old, ref, adv, m, eps, beta):
    row_means = []
    for i in range(lp.shape[0]):
        terms = []
        for j in range(lp.shape[1]):
            if not m[i, j]:
                continue
            a = adv[i] if np.ndim(adv) == 1 else adv[i, j]
            rho = math.exp(lp[i, j] - old[i, j])
            surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            x = ref[i, j] - lp[i, j]
            terms.append(-surrogate + beta * (math.exp(x) - x - 1))
        if terms:
            row_means.append(sum(terms) / len(terms))
    return sum(row_means) / len(row_means) if row_means else 0.0


def np_explained_variance(v, ret, m):
    rs = [ret[i, j] for i, j in tokens(m)]
    errs = [ret[i, j] - v[i, j] for i, j in tokens(m)]
    if not rs or np.var(rs) <= 1e-12 * np.mean(np.square(rs)):
        return 0.0
    return 1 - np.var(errs) / np.var(rs)


# --- rl.py ---------------------------------------------------------------------------------------

def test_masked_mean_and_whiten(batch):
    x, m = batch["rewards"], batch["mask"]
    close(rl.masked_mean(x, m), np_mean(x, m))
    close(rl.masked_mean(x, m, axis=1), [np_mean(x[i:i + 1], m[i:i + 1]) for i in range(len(m))])
    close(rl.masked_var(x, m), np.var([x[i, j] for i, j in tokens(m)], ddof=1))
    for shift in (True, False):
        close(rl.masked_whiten(x, m, shift_mean=shift), np_whiten(x, m, shift), tol=1e-4)
    assert float(rl.masked_mean(x, np.zeros_like(m))) == 0.0
    assert not np.any(rl.masked_whiten(x, np.zeros_like(m)))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 0.0)])
def test_gae_matches_recursion_and_discounted_sum(batch, gamma, lam):
    args = (batch["rewards"], batch["values"], batch["mask"], gamma, lam)
    adv, ret = rl.gae(*args)
    want_adv, want_ret = np_gae_sum(*args)
    close(adv, want_adv, 1e-4)
    close(ret, want_ret, 1e-4)
    rec_adv, rec_ret = np_gae_recursion(*args)
    close(adv, rec_adv, 1e-4)
    close(ret, rec_ret, 1e-4)
    assert not np.any(np.asarray(adv)[batch["mask"] == 0])


@pytest.mark.parametrize("b,t,seed", [(2, 1, 1), (16, 33, 3)])
def test_gae_random_shapes(b, t, seed):
    rng = np.random.default_rng(seed)
    r, v = rng.normal(size=(2, b, t)).astype(np.float32)
    m = make_mask(rng, max(b, 4), t)[-b:]  # the 2-row case: the last-token and first-token rows
    adv, ret = rl.gae(r, v, m, 0.99, 0.9)
    want_adv, want_ret = np_gae_sum(r, v, m, 0.99, 0.9)
    close(adv, want_adv, 1e-4)
    close(ret, want_ret, 1e-4)


def test_gae_hand_case():
    """One 3-token response after a prompt pad: only the last token is rewarded."""
    r = np.array([[0.0, 0.0, 0.0, 1.0, 5.0]])
    v = np.array([[9.0, 0.5, 0.25, 0.75, 9.0]])
    m = np.array([[0, 1, 1, 1, 0]])
    adv, ret = rl.gae(r, v, m, gamma=1.0, lam=1.0)  # lam = 1: A_t = sum of rewards - V_t
    close(adv, [[0, 1 - 0.5, 1 - 0.25, 1 - 0.75, 0]])
    close(ret, [[0, 1, 1, 1, 0]])


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_ppo_policy_loss_and_stats(batch, eps):
    lp, old, adv, m = batch["logp"], batch["old_logp"], batch["adv_tok"], batch["mask"]
    want, want_stats = np_ppo_policy(lp, old, adv, m, eps)
    close(rl.ppo_policy_loss(lp, old, adv, m, eps), want, 1e-4)
    got_stats = rl.ppo_policy_stats(lp, old, adv, m, eps)
    assert set(got_stats) == set(want_stats)
    for k, v in want_stats.items():
        close(got_stats[k], v, 1e-4)
    assert 0.2 < want_stats["clip_fraction"] < 0.8  # both branches of the max occur


def test_ppo_policy_gradient_vanishes_on_clipped_tokens(batch):
    lp, old, adv, m = batch["logp"], batch["old_logp"], batch["adv_tok"], batch["mask"]
    grad = np.asarray(jax.jit(jax.grad(rl.ppo_policy_loss))(lp, old, adv, m, 0.2))
    rho = np.exp(lp.astype(np.float64) - old)
    clipped = -adv * np.clip(rho, 0.8, 1.2) > -adv * rho
    assert not np.any(grad[clipped | (m == 0)])
    live = ~clipped & (m > 0)
    close(grad[live], (-adv * rho)[live] / max(m.sum(), 1), 1e-4)


def test_ppo_value_loss_both_branches(batch):
    v, old, ret, m = batch["values"], batch["old_values"], batch["returns"], batch["mask"]
    want, want_frac = np_ppo_value(v, old, ret, m, 0.2)
    close(rl.ppo_value_loss(v, old, ret, m, 0.2), want, 1e-4)
    close(rl.ppo_value_stats(v, old, ret, m, 0.2)["value_clip_fraction"], want_frac)
    assert 0.2 < want_frac < 0.8
    # hand case: V moved 1.0 from V_old = 0 towards R = 2 (clipped term larger) / past R = 0.5
    close(rl.ppo_value_loss([[1.0]], [[0.0]], [[2.0]], [[1]], 0.2), 0.5 * 1.8 ** 2)
    close(rl.ppo_value_loss([[1.0]], [[0.0]], [[0.5]], [[1]], 0.2), 0.5 * 0.5 ** 2)


def test_kl_penalized_rewards(batch):
    s, lp, ref, m = batch["scores"], batch["logp"], batch["ref_logp"], batch["mask"]
    got = rl.kl_penalized_rewards(s, lp, ref, m, 0.05)
    close(got, np_kl_rewards(s, lp, ref, m, 0.05), 1e-5)
    assert not np.any(np.asarray(got)[0])  # the empty row gets neither penalty nor score
    hand = rl.kl_penalized_rewards([3.0], [[-1.0, -1.0, -2.0, 0.0]], [[-1.5, -1.0, -1.0, 0.0]],
                                   [[0, 1, 1, 0]], 0.5)
    close(hand, [[0.0, 0.0, 0.5 + 3.0, 0.0]])


def test_grpo_advantages():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=12).astype(np.float32)
    scores[4:8] = 1.0  # a group with no spread: all advantages 0
    for g in (3, 4):
        close(rl.grpo_advantages(scores, g), np_grpo_advantages(scores, g, 1e-4), 1e-4)
    assert not np.any(np.asarray(rl.grpo_advantages(scores, 4))[4:8])
    with pytest.raises(ValueError, match=r"len\(scores\)=12 is not a multiple of group_size=5"):
        rl.grpo_advantages(scores, 5)
    with pytest.raises(ValueError, match="group_size=1"):
        rl.grpo_advantages(scores, 1)


@pytest.mark.parametrize("eps,beta", [(0.2, 0.04), (0.1, 0.0)])
def test_grpo_loss_rows_then_batch(batch, eps, beta):
    lp, old, ref, m = batch["logp"], batch["old_logp"], batch["ref_logp"], batch["mask"]
    adv = batch["scores"]
    want = np_grpo_loss(lp, old, ref, adv, m, eps, beta)
    close(rl.grpo_loss(lp, old, ref, adv, m, eps, beta), want, 1e-4)
    tok = batch["adv_tok"]
    close(rl.grpo_loss(lp, old, ref, tok, m, eps, beta),
          np_grpo_loss(lp, old, ref, tok, m, eps, beta), 1e-4)
    assert float(rl.grpo_loss(lp, old, ref, adv, np.zeros_like(m), eps, beta)) == 0.0


def test_grpo_loss_weighs_rows_equally():
    """rho = 1, beta = 0: token loss -A. Rows of 1 and 3 tokens (A = 1, -1) and an empty row:
    row means -1 and 1 average to 0 (a token mean would give 0.5)."""
    zeros = np.zeros((3, 4))
    mask = [[1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    close(rl.grpo_loss(zeros, zeros, zeros, [1.0, -1.0, 7.0], mask, 0.2, 0.0), 0.0)


def test_entropy_from_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, (2, 3, 11)).astype(np.float32)
    want = np.zeros((2, 3))
    for idx in np.ndindex(2, 3):
        z = np.exp(logits[idx] - logits[idx].max())
        p = z / z.sum()
        want[idx] = -sum(pk * math.log(pk) for pk in p)
    close(rl.entropy_from_logits(logits), want, 1e-5)
    assert rl.entropy_from_logits(jnp.asarray(logits, jnp.bfloat16)).dtype == jnp.float32
    masked = jnp.array([0.0, 0.0, -jnp.inf])
    close(rl.entropy_from_logits(masked), math.log(2))
    assert np.all(np.isfinite(jax.jit(jax.grad(rl.entropy_from_logits))(masked)))


def test_explained_variance(batch):
    v, ret, m = batch["values"], batch["returns"], batch["mask"]
    close(rl.explained_variance(v, ret, m), np_explained_variance(v, ret, m), 1e-4)
    close(rl.explained_variance(ret, ret, m), 1.0)
    assert float(rl.explained_variance(v, np.full_like(ret, 0.1), m)) == 0.0  # constant R
    assert float(rl.explained_variance(v, ret, np.zeros_like(m))) == 0.0


@pytest.mark.parametrize("kl,n_steps", [(0.5, 256), (0.1, 256), (0.058, 64), (0.0, 10_000)])
def test_adaptive_kl_update(kl, n_steps):
    target, horizon, coef = 0.06, 10_000, 0.2
    error = min(max(kl / target - 1, -0.2), 0.2)
    close(rl.adaptive_kl_update(coef, kl, target, horizon, n_steps),
          coef * (1 + error * n_steps / horizon), 1e-6)


def calls(b):
    """{name: a call of each function on the batch `b`}."""
    return {
        "masked_whiten": lambda: rl.masked_whiten(b["rewards"], b["mask"]),
        "gae": lambda: rl.gae(b["rewards"], b["values"], b["mask"], 0.99, 0.95),
        "ppo_policy_loss": lambda: rl.ppo_policy_loss(b["logp"], b["old_logp"], b["adv_tok"],
                                                      b["mask"], 0.2),
        "ppo_policy_stats": lambda: rl.ppo_policy_stats(b["logp"], b["old_logp"], b["adv_tok"],
                                                        b["mask"], 0.2),
        "ppo_value_loss": lambda: rl.ppo_value_loss(b["values"], b["old_values"], b["returns"],
                                                    b["mask"], 0.2),
        "ppo_value_stats": lambda: rl.ppo_value_stats(b["values"], b["old_values"],
                                                      b["returns"], b["mask"], 0.2),
        "kl_penalized_rewards": lambda: rl.kl_penalized_rewards(b["scores"], b["logp"],
                                                                b["ref_logp"], b["mask"], 0.1),
        "grpo_loss": lambda: rl.grpo_loss(b["logp"], b["old_logp"], b["ref_logp"], b["scores"],
                                          b["mask"], 0.2, 0.04),
        "explained_variance": lambda: rl.explained_variance(b["values"], b["returns"], b["mask"]),
    }


def assert_same(got, want, name):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_jit_equals_eager(batch):
    more = {
        "grpo_advantages": lambda: rl.grpo_advantages(np.resize(batch["scores"], 12), 4),
        "entropy_from_logits": lambda: rl.entropy_from_logits(batch["adv_tok"]),
        "adaptive_kl_update": lambda: rl.adaptive_kl_update(0.1, batch["scores"][0] ** 2, 0.05,
                                                            1000.0, 64),
    }
    for name, call in {**calls(batch), **more}.items():
        assert_same(jax.jit(call)(), call(), name)


def test_entries_outside_the_mask_are_ignored(batch):
    outside = batch["mask"] == 0
    dirty = {k: np.where(outside, np.nan if i % 2 else np.inf, v) if np.ndim(v) == 2 else v
             for i, (k, v) in enumerate(batch.items()) if k != "mask"}
    dirty["mask"] = batch["mask"]
    clean, dirty = calls(batch), calls(dirty)
    for name in clean:
        assert_same(dirty[name](), clean[name](), name)


def test_jit_with_traced_arguments(batch):
    """The arrays as jit arguments (not closed-over constants); hyper-parameters static."""
    b = batch
    gae = jax.jit(rl.gae, static_argnums=(3, 4))
    for got, want in zip(gae(b["rewards"], b["values"], b["mask"], 0.9, 0.8),
                         rl.gae(b["rewards"], b["values"], b["mask"], 0.9, 0.8)):
        close(got, want, 1e-6)
    scores = np.resize(b["scores"], 12)
    adv = jax.jit(rl.grpo_advantages, static_argnums=1)(scores, 3)
    close(adv, rl.grpo_advantages(scores, 3), 1e-6)
    loss = jax.jit(rl.grpo_loss)(b["logp"], b["old_logp"], b["ref_logp"], b["scores"], b["mask"],
                                 0.2, 0.04)  # clip_eps and beta traced too
    close(loss, rl.grpo_loss(b["logp"], b["old_logp"], b["ref_logp"], b["scores"], b["mask"],
                             0.2, 0.04), 1e-6)


# --- rewards.py ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("日本語です", 1.0),
    ("abc", 0.0),
    ("東京 Tokyo", 2 / 7),
    ("", 0.0),
    (" \n\u3000", 0.0),                # whitespace only (the ideographic space too)
    ("今日は2024年です!", 6 / 11),      # digits and ASCII punctuation count in the denominator
    ("「カタカナ」、ひらがな。", 1.0),
    ("ｶﾀｶﾅ ｰ", 1.0),                    # half-width katakana and prolonged sound mark
    ("々〆ヵヶー・『』ㇰ㐀", 1.0),        # marks, U+31F0 block, CJK extension A
    ("ＡＢＣ！", 0.0),                  # full-width Latin and ！ are not Japanese script
    ("Hello、世界", 3 / 8),
])
def test_japanese_share(text, want):
    close(score_responses("japanese_share", [text], [{"prompt": "p"}]), [want], 1e-6)


@pytest.mark.parametrize("response,answer,first_line,want", [
    ("Tokyo", "Tokyo", True, 1.0),
    ("tokyo.", "Tokyo", True, 1.0),
    ("  TOKYO  ! ！", "Tokyo", True, 1.0),
    ("ＴＯＫＹＯ", "tokyo", True, 1.0),          # NFKC folds full-width letters
    ("東京。", "東京", True, 1.0),
    ("New   York?", "new york", True, 1.0),
    ("Tokyo\nbecause it is the capital", "Tokyo", True, 1.0),
    ("\n\n  Tokyo\nmore", "Tokyo", True, 1.0),
    ("Tokyo\nbecause it is the capital", "Tokyo", False, 0.0),
    ("とうきょう", ["東京", "Tokyo"], True, 0.0),
    ("tokyo", ["東京", "Tokyo"], True, 1.0),
    ("Kyoto", "Tokyo", True, 0.0),
    ("Tokyo Tower", "Tokyo", True, 0.0),
    ("42", 42, True, 1.0),
    ("", "x", True, 0.0),
])
def test_exact_match(response, answer, first_line, want):
    got = score_responses("exact_match", [response], [{"prompt": "q", "answer": answer}],
                          {"first_line": first_line})
    close(got, [want])


def test_exact_match_needs_an_answer():
    records = [{"prompt": "a", "answer": "x"}, {"prompt": "b"}]
    with pytest.raises(UsageError, match=r"records\[1\] has no 'answer' field"):
        score_responses("exact_match", ["x", "y"], records)
    with pytest.raises(UsageError, match=r"records\[0\]\['answer'\]"):
        score_responses("exact_match", ["x"], [{"prompt": "a", "answer": None}])


def test_length_band():
    lengths = [0, 10, 19, 20, 100, 200, 201, 300, 400, 500]
    responses = ["x" * n for n in lengths]
    want = [0.0, 0.5, 0.95, 1.0, 1.0, 1.0, 0.995, 0.5, 0.0, 0.0]
    close(score_responses("length_band", responses, [{}] * len(lengths)), want, 1e-6)
    padded = "  \n" + "あ" * 20 + "\n  "  # characters of the stripped response
    close(score_responses("length_band", [padded], [{}], {"min_chars": 20, "max_chars": 20}),
          [1.0])
    close(score_responses("length_band", ["", "abc"], [{}, {}], {"min_chars": 0,
                                                               "max_chars": 2}), [1.0, 0.5])
    with pytest.raises(UsageError, match="min_chars=5, max_chars=3"):
        score_responses("length_band", ["x"], [{}], {"min_chars": 5, "max_chars": 3})


def test_custom_reward_by_decorator():
    try:
        @register_reward("test_mentions_fuji")
        def mentions_fuji(responses, records, bonus=1.0):
            return [bonus * ("富士" in r) for r in responses]

        assert get_reward("test_mentions_fuji") is mentions_fuji
        got = score_responses("test_mentions_fuji", ["富士山", "no"], [{}, {}], {"bonus": 2.0})
        assert got.dtype == np.float32
        close(got, [2.0, 0.0])
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_mentions_fuji")(mentions_fuji)
        with pytest.raises(UsageError, match="reward 'test_mentions_fuji' does not take them"):
            score_responses("test_mentions_fuji", ["x"], [{}], {"bonsu": 2.0})
    finally:
        REWARDS.pop("test_mentions_fuji", None)


def test_score_responses_checks_what_a_reward_returns():
    try:
        register_reward("test_bad")(lambda responses, records, out=(): list(out))
        with pytest.raises(UsageError, match=r"reward 'test_bad' returned scores of shape \(1,\) "
                                             "for 2 responses"):
            score_responses("test_bad", ["a", "b"], [{}, {}], {"out": [1.0]})
        with pytest.raises(UsageError, match="reward 'test_bad' returned a non-finite score nan "
                                             "for response 1"):
            score_responses("test_bad", ["a", "b"], [{}, {}], {"out": [1.0, float("nan")]})
        with pytest.raises(ValueError, match="2 responses but 1 records"):
            score_responses("test_bad", ["a", "b"], [{}])
    finally:
        REWARDS.pop("test_bad", None)


def test_unknown_reward_lists_the_builtins():
    with pytest.raises(UsageError) as info:
        get_reward("nope")
    message = str(info.value)
    assert message.startswith("config.reward.name='nope': unknown reward; choose one of [")
    for name in ("exact_match", "japanese_share", "length_band"):
        assert repr(name) in message
    assert "hibari.align.rewards.register_reward" in message
