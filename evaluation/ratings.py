"""Ratings of models from pairwise battles: Bradley-Terry, online Elo, bootstrap intervals.

A battle is `(model_a, model_b, outcome)` with outcome "a" (model_a won), "b" (model_b won)
or "tie", e.g. one pairwise verdict of an LLM judge. Both ratings live on the Elo scale:
a difference of d points means an expected score (win probability, ties counted half) of
`1 / (1 + base ** (-d / scale))` for the higher-rated model; 400 points = 10:1 odds.

- Bradley-Terry (`bradley_terry`): P(i beats j) = p_i / (p_i + p_j). The strengths p are the
  maximum-likelihood estimate over all battles at once, found by Hunter's (2004) MM iteration
  p_i <- W_i / sum_j n_ij / (p_i + p_j) (W_i: i's wins, n_ij: battles between i and j), and
  reported as `anchor + scale * log_base(p_i)` with the mean rating equal to `anchor`. The
  estimate does not depend on the order of the battles; it is the rating to quote.
- Elo (`elo`): Chatbot Arena's original online update, battle by battle in the order given:
  r_a += k * (s_a - E_a), r_b += k * (E_a - s_a), E_a = expected_score(r_a, r_b), all models
  starting at `init`. It depends on the order and, with a small k, lags the evidence; it is
  reported beside Bradley-Terry as the familiar number, not as the estimate.
- Ties count as half a win to each side (score 0.5) in both, and in the win rate.
- Prior (Bradley-Terry only): `prior` pseudo-ties are added between every pair of models that
  met. This shrinks ratings slightly toward each other and keeps them finite when a model lost
  every battle (or won every one), where the plain MLE (`prior=0`) does not exist; with
  `prior=0` such input raises `RatingError` naming the model. Models whose comparison graph
  is not connected (two groups that never met) cannot be placed on one scale at any prior.
- Intervals (`bootstrap_intervals`): percentile intervals of a rating over resamples of the
  battles with replacement (Chatbot Arena's bootstrap); for Elo each resample is also put in a
  fresh random order.

    battles = [("m1", "m2", "a"), ("m2", "m3", "tie"), ("m3", "m1", "b"), ...]
    rows = rating_table(battles, rounds=1000, seed=0)   # one dict per model, best first
    print(win_matrix_markdown(battles))                 # "W/T/L" of row model vs column model

`rating_table` rows hold `model, bt, bt_lo, bt_hi, elo, elo_lo, elo_hi, battles, wins, ties,
losses, win_rate, win_rate_stderr` (the standard error of the mean per-battle score).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from hibari.base.errors import UsageError
from hibari.base.stats import mean_stderr

Battle = tuple[str, str, str]  # (model_a, model_b, outcome), outcome in {"a", "b", "tie"}
OUTCOMES = ("a", "b", "tie")
_SCORE_A = {"a": 1.0, "b": 0.0, "tie": 0.5}


class RatingError(UsageError):
    """Battles from which the asked-for ratings cannot be computed (malformed battles, a model
    with no win or tie under prior=0, models that never met, ...)."""


# ---------------------------------------------------------------------------------- counting

def _models(battles: Sequence[Battle], models: Sequence[str] | None) -> list[str]:
    """`models` as given (checked for duplicates), else the order of first appearance."""
    if models is not None:
        models = [str(m) for m in models]
        if len(set(models)) != len(models):
            dup = next(m for m in models if models.count(m) > 1)
            raise RatingError(f"model {dup!r} is listed twice in `models`; list each model once")
        return models
    seen: dict[str, None] = {}
    for b in battles:
        if len(b) != 3:
            break  # _encode reports it
        seen.setdefault(b[0], None)
        seen.setdefault(b[1], None)
    return list(seen)


def _encode(battles: Sequence[Battle], models: Sequence[str]):
    """Battles as index arrays (a[m], b[m]) and score of a (1 / 0.5 / 0), validated."""
    index = {m: i for i, m in enumerate(models)}
    a = np.empty(len(battles), np.int64)
    b = np.empty(len(battles), np.int64)
    s = np.empty(len(battles), np.float64)
    for k, battle in enumerate(battles):
        try:
            ma, mb, outcome = battle
        except (TypeError, ValueError):
            raise RatingError(f"battle {k} is {battle!r}; a battle is (model_a, model_b, outcome) "
                              f"with outcome one of {OUTCOMES}") from None
        if outcome not in _SCORE_A:
            raise RatingError(f"battle {k} has outcome {outcome!r}; use one of {OUTCOMES}")
        if ma == mb:
            raise RatingError(f"battle {k} pits model {ma!r} against itself; drop it")
        for m in (ma, mb):
            if m not in index:
                raise RatingError(f"battle {k} names model {m!r}, which is not in `models` "
                                  f"{list(models)}; add it or drop the battle")
        a[k], b[k], s[k] = index[ma], index[mb], _SCORE_A[outcome]
    return a, b, s


def _count(a, b, s, n: int):
    """wins[i, j] (i beat j) and ties[i, j] (symmetric) as float matrices."""
    wins = np.zeros((n, n))
    ties = np.zeros((n, n))
    np.add.at(wins, (a[s == 1.0], b[s == 1.0]), 1.0)
    np.add.at(wins, (b[s == 0.0], a[s == 0.0]), 1.0)
    tie = s == 0.5
    np.add.at(ties, (a[tie], b[tie]), 1.0)
    return wins, ties + ties.T


def win_matrix(battles: Sequence[Battle], models: Sequence[str] | None = None) -> dict:
    """{"models", "wins", "ties", "losses", "battles"}: n x n lists of ints, wins[i][j] = times
    models[i] beat models[j], ties symmetric, losses[i][j] = wins[j][i], battles = their sum.
    `models` defaults to the order of first appearance in the battles."""
    models = _models(battles, models)
    wins, ties = _count(*_encode(battles, models), len(models))
    as_int = lambda m: [[int(v) for v in row] for row in m]  # noqa: E731
    return {"models": models, "wins": as_int(wins), "ties": as_int(ties),
            "losses": as_int(wins.T), "battles": as_int(wins + wins.T + ties)}


def win_matrix_markdown(battles: Sequence[Battle], models: Sequence[str] | None = None) -> str:
    """A Markdown table, cell (row, column) = "W/T/L" of the row model against the column model
    ("-" on the diagonal)."""
    wm = win_matrix(battles, models)
    ms = wm["models"]
    lines = ["| vs | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for i, m in enumerate(ms):
        cells = ["-" if i == j else f"{wm['wins'][i][j]}/{wm['ties'][i][j]}/{wm['losses'][i][j]}"
                 for j in range(len(ms))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- Bradley-Terry

def _components(adj: np.ndarray) -> list[list[int]]:
    """Connected components of an undirected graph given by a boolean adjacency matrix."""
    n = len(adj)
    label = [-1] * n
    comps = []
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = len(comps)
        stack, comp = [start], []
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in np.flatnonzero(adj[i]):
                if label[j] < 0:
                    label[j] = len(comps)
                    stack.append(j)
        comps.append(sorted(comp))
    return comps


def _reach(adj: np.ndarray, start: int) -> np.ndarray:
    """Boolean mask of the nodes reachable from `start` along directed edges adj[i, j]."""
    seen = np.zeros(len(adj), bool)
    seen[start] = True
    stack = [start]
    while stack:
        i = stack.pop()
        for j in np.flatnonzero(adj[i] & ~seen):
            seen[j] = True
            stack.append(j)
    return seen


def _check_mle_exists(models, met: np.ndarray, beat: np.ndarray) -> None:
    """The BT MLE exists iff the comparison graph is connected and, for prior=0, every split of
    the models into two groups has a win (or tie) each way: the directed graph i -> j when i
    won or tied against j is strongly connected (Zermelo 1929, Ford 1957)."""
    n = len(models)
    comps = _components(met)
    if len(comps) > 1:
        alone = [models[c[0]] for c in comps if len(c) == 1 and not met[c[0]].any()]
        if alone:
            raise RatingError(f"model {alone[0]!r} has no battles; it cannot be rated (drop it "
                              "from `models` or give it battles)")
        groups = " | ".join(", ".join(repr(models[i]) for i in c) for c in comps)
        raise RatingError(f"the models fall into groups that never met ({groups}); ratings of "
                          "different groups are not comparable: add battles between the groups")
    if beat is None:
        return
    for i in range(n):
        if not beat[i].any():
            raise RatingError(f"model {models[i]!r} has no win or tie, so its plain "
                              "Bradley-Terry rating is -infinity; use prior > 0")
        if not beat[:, i].any():
            raise RatingError(f"model {models[i]!r} has no loss or tie, so its plain "
                              "Bradley-Terry rating is +infinity; use prior > 0")
    down = _reach(beat, 0)  # models that models[0] beat or tied, transitively
    if not down.all():
        group = [models[i] for i in np.flatnonzero(down)]
        raise RatingError(f"models {group} never won or tied against the other models, so the "
                          "plain Bradley-Terry MLE does not exist; use prior > 0")
    up = _reach(beat.T, 0)  # models that beat or tied models[0], transitively
    if not up.all():
        group = [models[i] for i in np.flatnonzero(up)]
        raise RatingError(f"models {group} never lost or tied against the other models, so the "
                          "plain Bradley-Terry MLE does not exist; use prior > 0")


def _bt_strengths(wins: np.ndarray, ties: np.ndarray, prior: float, tol: float,
                  max_iter: int) -> np.ndarray:
    """log-strengths (mean 0) by Hunter's MM iteration; ties half a win each side, `prior`
    pseudo-ties per pair that met."""
    n_pair = wins + wins.T + ties
    met = n_pair > 0
    n_pair = n_pair + prior * met
    w = wins.sum(1) + 0.5 * ties.sum(1) + 0.5 * prior * met.sum(1)
    p = np.ones(len(w))
    for _ in range(max_iter):
        denom = (n_pair / (p[:, None] + p[None, :])).sum(1)
        new = w / denom
        new /= math.exp(np.log(new).mean())
        delta = np.abs(np.log(new) - np.log(p)).max()
        p = new
        if delta < tol:
            break
    return np.log(p)


def bradley_terry(battles: Sequence[Battle], models: Sequence[str] | None = None, *,
                  prior: float = 0.5, scale: float = 400.0, base: float = 10.0,
                  anchor: float = 1000.0, tol: float = 1e-10,
                  max_iter: int = 10000) -> dict[str, float]:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale, mean = `anchor`.

    Ties count half a win to each side; `prior` pseudo-ties are added between every pair that
    met (0 = plain MLE, which raises `RatingError` naming the model when it does not exist).
    Iterates until the largest change of a log-strength is below `tol` (or `max_iter`)."""
    if not prior >= 0:
        raise RatingError(f"prior is {prior}; it must be >= 0 (pseudo-ties per pair)")
    models = _models(battles, models)
    if len(models) < 2:
        _encode(battles, models)
        return {m: float(anchor) for m in models}
    wins, ties = _count(*_encode(battles, models), len(models))
    met = (wins + wins.T + ties) > 0
    _check_mle_exists(models, met, None if prior > 0 else (wins + ties) > 0)
    logp = _bt_strengths(wins, ties, float(prior), tol, max_iter)
    ratings = anchor + scale * logp / math.log(base)
    return {m: float(r) for m, r in zip(models, ratings)}


# ------------------------------------------------------------------------------------- Elo

def expected_score(r_a: float, r_b: float, scale: float = 400.0, base: float = 10.0) -> float:
    """Expected score of a against b: 1 / (1 + base ** ((r_b - r_a) / scale))."""
    return 1.0 / (1.0 + base ** ((r_b - r_a) / scale))


def elo(battles: Sequence[Battle], models: Sequence[str] | None = None, *, k: float = 4.0,
        scale: float = 400.0, base: float = 10.0, init: float = 1000.0) -> dict[str, float]:
    """Online Elo over the battles in the order given (tie = 0.5 to each side)."""
    models = _models(battles, models)
    a, b, s = _encode(battles, models)
    r = [float(init)] * len(models)
    for i, j, score in zip(a.tolist(), b.tolist(), s.tolist()):
        e = 1.0 / (1.0 + base ** ((r[j] - r[i]) / scale))
        r[i] += k * (score - e)
        r[j] += k * (e - score)
    return dict(zip(models, r))


# ------------------------------------------------------------------------------- intervals

def bootstrap_intervals(battles: Sequence[Battle],
                        rate: Callable[[list[Battle]], dict[str, float]], *,
                        rounds: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `rate(resample)` over `rounds` resamples of the battles with
    replacement (numpy Generator seeded by `seed`), central `level` mass.

    A model missing from a resample (or from its ratings) is skipped for that round; a round
    whose `rate` raises RatingError (e.g. a plain MLE that does not exist for that resample) is
    skipped for every model, which conditions the interval on the estimate existing: prefer a
    prior > 0. A model rated in no round gets (nan, nan)."""
    if not 0 < level < 1:
        raise RatingError(f"level is {level}; it must lie strictly between 0 and 1")
    if rounds < 1:
        raise RatingError(f"rounds is {rounds}; it must be >= 1")
    battles = list(battles)
    models = _models(battles, None)
    samples: dict[str, list[float]] = {m: [] for m in models}
    rng = np.random.default_rng(seed)
    n = len(battles)
    for _ in range(rounds):
        idx = rng.integers(0, n, n) if n else np.zeros(0, np.int64)
        try:
            ratings = rate([battles[i] for i in idx])
        except RatingError:
            continue
        for m, v in ratings.items():
            if m in samples:
                samples[m].append(v)
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    out = {}
    for m in models:
        if samples[m]:
            lo, hi = np.percentile(np.asarray(samples[m]), q)
            out[m] = (float(lo), float(hi))
        else:
            out[m] = (math.nan, math.nan)
    return out


def rating_table(battles: Sequence[Battle], models: Sequence[str] | None = None, *,
                 rounds: int = 1000, seed: int = 0, prior: float = 0.5,
                 k: float = 4.0) -> list[dict]:
    """One row per model, sorted by Bradley-Terry rating (best first): model, bt, bt_lo, bt_hi,
    elo, elo_lo, elo_hi, battles, wins, ties, losses, win_rate (ties half), win_rate_stderr
    (mean_stderr of the per-battle scores 1 / 0.5 / 0). Intervals are 95% bootstrap intervals
    over `rounds` resamples; for Elo each resample is also shuffled (Elo depends on order)."""
    battles = list(battles)
    models = _models(battles, models)
    a, b, s = _encode(battles, models)
    bt = bradley_terry(battles, models, prior=prior)
    el = elo(battles, models, k=k)
    bt_ci = bootstrap_intervals(battles, lambda bs: bradley_terry(bs, prior=prior),
                                rounds=rounds, seed=seed)
    order_rng = np.random.default_rng([seed, 1])

    def shuffled_elo(bs: list[Battle]) -> dict[str, float]:
        return elo([bs[i] for i in order_rng.permutation(len(bs))], k=k)

    elo_ci = bootstrap_intervals(battles, shuffled_elo, rounds=rounds, seed=seed)
    rows = []
    for i, m in enumerate(models):
        scores = np.concatenate([s[a == i], 1.0 - s[b == i]])
        nan2 = (math.nan, math.nan)
        rows.append({
            "model": m, "bt": bt[m], "bt_lo": bt_ci.get(m, nan2)[0], "bt_hi": bt_ci.get(m, nan2)[1],
            "elo": el[m], "elo_lo": elo_ci.get(m, nan2)[0], "elo_hi": elo_ci.get(m, nan2)[1],
            "battles": int(len(scores)), "wins": int((scores == 1.0).sum()),
            "ties": int((scores == 0.5).sum()), "losses": int((scores == 0.0).sum()),
            "win_rate": float(scores.mean()) if len(scores) else math.nan,
            "win_rate_stderr": mean_stderr(scores.tolist()),
        })
    rows.sort(key=lambda row: -row["bt"])
    return rows

