"""Social-bias metrics against hand-computed values, and the readers on the vendored samples."""
import pytest

from hibari.evaluation.bias import bias_metrics
from hibari.evaluation.tasks import load_task


def _rec(lp, tokens=None, gold=0, **meta):
    return {"loglikelihoods": lp, "tokens": tokens or [1] * len(lp), "gold": gold, "meta": meta}


def test_bbq_metrics_by_hand():
    records = [  # unknown option is index 0 everywhere
        _rec([-1.0, -2.0, -3.0], gold=0, unknown=0, context="ambiguous"),       # says unknown
        _rec([-3.0, -1.0, -2.0], gold=0, unknown=0, context="ambiguous"),       # stereotype
        _rec([-3.0, -1.5, -1.0], gold=2, unknown=0, context="disambiguated"),   # right
        _rec([-1.0, -1.5, -2.0], gold=2, unknown=0, context="disambiguated"),   # says unknown
        _rec([-2.0, -1.0, -5.0], gold=1, unknown=0, context="disambiguated"),   # right
    ]
    m, se = bias_metrics("bbq", records)
    assert m == pytest.approx({"acc_ambiguous": 0.5, "acc_disambiguated": 2 / 3,
                               "non_unknown_rate_ambiguous": 0.5})
    assert se["acc_ambiguous"] == pytest.approx(0.5)  # sd([1, 0]) / sqrt(2)
    assert se["acc_disambiguated"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)


def test_crows_pairs_and_winobias_rates_by_hand():
    records = [_rec([-10.0, -12.0], bias_type="age"), _rec([-5.0, -4.0], bias_type="age"),
               _rec([-3.0, -3.5], bias_type="gender"), _rec([-7.0, -9.0], bias_type="gender")]
    m, _ = bias_metrics("crows_pairs", records)
    assert m == pytest.approx({"stereotype_rate": 0.75, "stereotype_rate/age": 0.5,
                               "stereotype_rate/gender": 1.0})
    m, se = bias_metrics("winobias", [_rec([-1.0, -2.0]), _rec([-2.0, -1.0])])
    assert m == {"pro_stereotype_rate": 0.5} and se["pro_stereotype_rate"] == pytest.approx(0.5)
    # per-token scoring: [-6 over 3 tokens] beats [-4 over 1 token]
    m, _ = bias_metrics("winobias", [_rec([-6.0, -4.0], tokens=[3, 1])], score="per_token")
    assert m["pro_stereotype_rate"] == 1.0


def test_stereoset_ss_lms_icat_by_hand():
    # columns: stereotype, anti-stereotype, unrelated
    records = [_rec([-1.0, -2.0, -3.0]),   # stereo > anti; both beat unrelated
               _rec([-2.0, -1.0, -3.0]),   # anti > stereo; both beat unrelated
               _rec([-1.0, -2.0, -1.5]),   # stereo > anti; anti loses to unrelated
               _rec([-1.0, -3.0, -2.0])]   # stereo > anti; anti loses to unrelated
    m, se = bias_metrics("stereoset", records)
    ss, lms = 75.0, 100.0 * 6 / 8
    assert m == pytest.approx({"ss": ss, "lms": lms, "icat": lms * min(ss, 100 - ss) / 50})
    assert m["icat"] == pytest.approx(37.5)
    assert se["ss"] == pytest.approx(100 * 0.5 / 2)  # sd([1,0,1,1]) = 0.5, n = 4
    assert se["icat"] > 0


def test_bias_task_files_read_the_vendored_samples():
    bbq = load_task("bbq_sample").examples()
    assert len(bbq) == 203 and not bbq.stats.bad
    for e in bbq:  # ambiguous exactly when the gold answer is the unknown option
        assert (e["meta"]["context"] == "ambiguous") == (e["gold"] == e["meta"]["unknown"])
        assert "Please choose" not in e["question"]
    crows = load_task("crows_pairs_sample").examples()
    assert len(crows) == 204
    for e in crows:
        more, less = e["choices"]
        head, tail = e["sentence"].split("[MASK]")
        assert more.startswith(head) and more.endswith(tail) and less.startswith(head)
    intra = load_task("stereoset_intrasentence_sample").examples()
    inter = load_task("stereoset_intersentence_sample").examples()
    assert (len(intra), len(inter)) == (101, 102)
    assert all("BLANK" in e["context"] and len(e["choices"]) == 3 for e in intra)
    wino = load_task("winobias_sample").examples()
    assert len(wino) == 191
    for e in wino:
        pro, anti = e["choices"]
        assert "[" not in pro and "[MASK]" not in pro and pro != anti
        assert e["meta"]["pro"] in pro.lower().split() or \
            e["meta"]["pro"] in pro.lower().replace(".", " ").split()
