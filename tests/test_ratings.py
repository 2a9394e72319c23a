"""Bradley-Terry, Elo and bootstrap ratings against hand computations and a brute-force
maximisation of the Bradley-Terry likelihood written here."""
import math

import numpy as np
import pytest

from hibari.base.errors import UserError
from hibari.evaluation.ratings import (
    RatingError,
    bootstrap_intervals,
    bradley_terry,
    elo,
    expected_score,
    rating_table,
    win_matrix,
    win_matrix_markdown,
)


def _battles(table):
    """Battles from {(a, b): (a's wins, ties, b's wins)}, interleaved so order is mixed."""
    out = []
    for (a, b), (w, t, lo) in table.items():
        out += [(a, b, "a")] * w + [(a, b, "tie")] * t + [(b, a, "a")] * lo
    return out


# Four models, hand-written results (every pair met; D wins a few, ties included).
FOUR = {("A", "B"): (6, 2, 3), ("A", "C"): (7, 1, 2), ("A", "D"): (9, 0, 1),
        ("B", "C"): (4, 3, 4), ("B", "D"): (5, 1, 2), ("C", "D"): (3, 2, 2)}


def _brute_force_bt(battles, models, prior=0.0):
    """Maximise sum over battles of s*log sigma(x_a - x_b) + (1-s)*log sigma(x_b - x_a) (ties
    s = 1/2) plus `prior` pseudo-ties per pair that met, over log-strengths x with sum 0, by
    plain gradient ascent; ratings 1000 + 400 log10 exp(x)."""
    idx = {m: i for i, m in enumerate(models)}
    score = {"a": 1.0, "b": 0.0, "tie": 0.5}
    rows = [(idx[a], idx[b], score[o], 1.0) for a, b, o in battles]
    pairs = {tuple(sorted((idx[a], idx[b]))) for a, b, _ in battles}
    rows += [(i, j, 0.5, prior) for i, j in pairs if prior]
    ia, ib, s, wt = (np.array(c) for c in zip(*rows))
    x = np.zeros(len(models))
    for _ in range(20000):
        p = 1.0 / (1.0 + np.exp(x[ib] - x[ia]))
        g = np.zeros_like(x)
        np.add.at(g, ia, wt * (s - p))
        np.add.at(g, ib, -wt * (s - p))
        x += 0.02 * g
        x -= x.mean()
        if np.abs(g).max() < 1e-12:
            break
    return {m: 1000.0 + 400.0 * x[i] / math.log(10.0) for m, i in idx.items()}


def test_two_models_three_wins_one_loss_exact():
    battles = [("x", "y", "a"), ("y", "x", "b"), ("x", "y", "a"), ("x", "y", "b")]
    r = bradley_terry(battles, prior=0)
    # p_x / p_y = 3 (MLE of 3 wins in 4): difference 400 log10 3, mean at the anchor.
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000.0, abs=1e-9)
    assert expected_score(r["x"], r["y"]) == pytest.approx(0.75, abs=1e-9)


@pytest.mark.parametrize("prior", [0.0, 0.5])
def test_four_models_match_brute_force_maximum(prior):
    battles = _battles(FOUR)
    models = ["A", "B", "C", "D"]
    r = bradley_terry(battles, prior=prior)
    ref = _brute_force_bt(battles, models, prior)
    for m in models:
        assert r[m] == pytest.approx(ref[m], abs=1e-5)
    assert np.mean(list(r.values())) == pytest.approx(1000.0)
    assert r["A"] > r["B"] > r["C"] > r["D"]


def test_score_equations_hold_at_the_mle():
    battles = _battles(FOUR)
    r = bradley_terry(battles, prior=0)
    wm = win_matrix(battles)
    ms = wm["models"]
    for i, m in enumerate(ms):
        expected = sum(wm["battles"][i][j] * expected_score(r[m], r[o])
                       for j, o in enumerate(ms) if j != i)
        observed = sum(wm["wins"][i]) + sum(wm["ties"][i]) / 2
        assert expected == pytest.approx(observed, abs=1e-7)


def test_prior_is_pseudo_ties_between_pairs_that_met():
    battles = _battles({("A", "B"): (3, 0, 1), ("B", "C"): (2, 1, 0)})  # A and C never met
    with_prior = bradley_terry(battles, prior=1.0)
    explicit = bradley_terry(battles + [("A", "B", "tie"), ("B", "C", "tie")], prior=0)
    assert with_prior == pytest.approx(explicit, abs=1e-7)


def test_single_tie_gives_equal_ratings():
    for prior in (0.0, 0.5):
        r = bradley_terry([("p", "q", "tie")], prior=prior)
        assert r == pytest.approx({"p": 1000.0, "q": 1000.0})


def test_all_losses_model_finite_with_prior_and_error_without():
    battles = _battles({("A", "B"): (3, 1, 2), ("A", "Z"): (3, 0, 0), ("B", "Z"): (2, 0, 0)})
    r = bradley_terry(battles, prior=0.5)
    assert all(math.isfinite(v) for v in r.values())
    assert r["Z"] < min(r["A"], r["B"])
    with pytest.raises(RatingError, match="'Z' has no win or tie") as e:
        bradley_terry(battles, prior=0)
    assert isinstance(e.value, UserError)
    with pytest.raises(RatingError, match="'A' has no loss or tie"):
        bradley_terry(_battles({("A", "B"): (2, 0, 0), ("B", "C"): (1, 0, 1)}), prior=0)


def test_mle_needs_strongly_connected_wins_and_connected_graph():
    # {A, B} beat {C, D} every time, though each group's members won and lost: no plain MLE.
    split = _battles({("A", "B"): (1, 0, 1), ("C", "D"): (1, 0, 1), ("A", "C"): (2, 0, 0),
                      ("B", "D"): (1, 0, 0)})
    with pytest.raises(RatingError, match="never"):
        bradley_terry(split, prior=0)
    assert math.isfinite(bradley_terry(split, prior=0.5)["D"])
    apart = [("A", "B", "a"), ("B", "A", "a"), ("C", "D", "tie")]
    with pytest.raises(RatingError, match="groups that never met"):
        bradley_terry(apart, prior=0.5)
    with pytest.raises(RatingError, match="'E' has no battles"):
        bradley_terry([("A", "B", "a")], models=["A", "B", "E"], prior=0.5)


def test_malformed_battles_are_user_errors():
    with pytest.raises(RatingError, match="battle 1 has outcome 'win'"):
        win_matrix([("A", "B", "a"), ("A", "B", "win")])
    with pytest.raises(RatingError, match="battle 0 pits model 'A' against itself"):
        elo([("A", "A", "tie")])
    with pytest.raises(RatingError, match="'C', which is not in `models`"):
        bradley_terry([("A", "C", "a")], models=["A", "B"])


def test_elo_two_battles_by_hand():
    r = elo([("A", "B", "a"), ("B", "A", "tie")], k=4)
    # 1: E_A = 0.5, A wins: A = 1000 + 4 * 0.5 = 1002, B = 998.
    # 2: B vs A tie; E_B = 1 / (1 + 10 ** ((1002 - 998) / 400)) = 1 / (1 + 10 ** 0.01)
    #    = 1 / 1.0232929922807541 = 0.4942437915888551;  B += 4 * (0.5 - E_B) = +0.0230248336.
    assert r["B"] == pytest.approx(998.0230248336, abs=1e-9)
    assert r["A"] == pytest.approx(1001.9769751664, abs=1e-9)
    assert list(r) == ["A", "B"]


def test_win_matrix_and_markdown():
    battles = _battles({("A", "B"): (2, 1, 0), ("B", "C"): (1, 0, 1)}) + [("C", "A", "tie")]
    wm = win_matrix(battles)
    assert wm["models"] == ["A", "B", "C"]
    assert wm["wins"] == [[0, 2, 0], [0, 0, 1], [0, 1, 0]]
    assert wm["ties"] == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert wm["losses"] == [[0, 0, 0], [2, 0, 1], [0, 1, 0]]
    md = win_matrix_markdown(battles)
    assert md.splitlines()[2] == "| A | - | 2/1/0 | 0/1/0 |"
    assert md.splitlines()[3] == "| B | 0/1/2 | - | 1/0/1 |"


def test_bootstrap_deterministic_contains_estimate_and_narrows_with_data():
    balanced = _battles({("A", "B"): (4, 2, 4), ("B", "C"): (4, 2, 4), ("A", "C"): (4, 2, 4)})
    rate = lambda bs: bradley_terry(bs, prior=0.5)  # noqa: E731
    ci = bootstrap_intervals(balanced, rate, rounds=200, seed=3)
    assert ci == bootstrap_intervals(balanced, rate, rounds=200, seed=3)
    assert ci != bootstrap_intervals(balanced, rate, rounds=200, seed=4)
    point = rate(balanced)
    for m, (lo, hi) in ci.items():
        assert point[m] == pytest.approx(1000.0)
        assert lo < point[m] < hi
    ci4 = bootstrap_intervals(balanced * 4, rate, rounds=200, seed=3)
    for m in ci:
        assert ci4[m][1] - ci4[m][0] < 0.75 * (ci[m][1] - ci[m][0])  # ~1/2 expected


def test_bootstrap_skips_missing_models():
    battles = [("A", "B", "a")] * 3 + [("A", "C", "b")]
    seen = []

    def rate(bs):
        models = {m for b in bs for m in b[:2]}
        seen.append("C" in models)
        return {m: 1.0 if m == "C" else 0.0 for m in models}
    ci = bootstrap_intervals(battles, rate, rounds=50, seed=0)
    assert not all(seen) and any(seen)
    assert ci["C"] == (1.0, 1.0) and ci["A"] == (0.0, 0.0)


def test_rating_table_counts_and_stderr_by_hand():
    battles = _battles({("A", "B"): (2, 1, 0), ("B", "C"): (1, 0, 1)}) + [("C", "A", "tie")]
    rows = rating_table(battles, rounds=100, seed=0)
    assert [r["model"] for r in rows] == ["A", "C", "B"]
    by = {r["model"]: r for r in rows}
    # A: scores 1, 1, .5, .5; B: 0, 0, .5, 1, 0; C: 0, 1, .5
    assert {k: by["A"][k] for k in ("battles", "wins", "ties", "losses")} == \
        {"battles": 4, "wins": 2, "ties": 2, "losses": 0}
    assert {k: by["B"][k] for k in ("battles", "wins", "ties", "losses")} == \
        {"battles": 5, "wins": 1, "ties": 1, "losses": 3}
    assert by["A"]["win_rate"] == pytest.approx(0.75)
    assert by["B"]["win_rate"] == pytest.approx(0.3)
    assert by["C"]["win_rate"] == pytest.approx(0.5)
    # sd(ddof=1)/sqrt(n): A sqrt(4 * .25^2 / 3 / 4); B sqrt(.8 / 4 / 5) = .2; C sqrt(.5 / 2 / 3)
    assert by["A"]["win_rate_stderr"] == pytest.approx(math.sqrt(0.25 / 3 / 4))
    assert by["B"]["win_rate_stderr"] == pytest.approx(0.2)
    assert by["C"]["win_rate_stderr"] == pytest.approx(math.sqrt(1 / 12))
    assert by["A"]["bt"] == pytest.approx(bradley_terry(battles)["A"])
    assert by["A"]["elo"] == pytest.approx(elo(battles)["A"])
    for r in rows:
        assert r["bt_lo"] <= r["bt_hi"] and r["elo_lo"] <= r["elo_hi"]
    assert rows == rating_table(battles, rounds=100, seed=0)
