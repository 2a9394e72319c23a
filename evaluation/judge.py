"""LLM-as-a-judge: pairwise comparison in both orders, single-answer grading, and the bias report.

    verdicts = judge_pairs(preference_fn, [(question, answer_x, answer_y), ...])
    summary = summarize(verdicts)

`preference_fn(question, first, second) -> P(first is better)` is any judge; `lm_judge(lm)`
makes one from a loaded model by comparing the log-likelihoods of " A" and " B" after a
judging prompt. Each pair is judged as (x, y) and as (y, x); x wins only if preferred in both
orders (p_xy > 0.5 and p_yx < 0.5), y likewise, otherwise the pair is a tie that the position
decided (an inconsistency). Averaging P(x better) over both orders cancels a constant position
bias. The length report says how often the longer answer won among decided pairs.

Batched judging (what `hibari judge`, evaluation/arena.py, runs): a `Judge` answers many
requests at once --

    judge.prefer([PairRequest(question, first, second, reference), ...]) -> [P(first better)]
    judge.grade([GradeRequest(question, answer, reference), ...], low, high) -> [[p_low..p_high]]

`LMJudge` renders MT-bench-style judging instructions (with a "Reference answer:" block for
reference-guided grading) through the judge model's template, appends a primer ("The better
answer is Answer" / "Rating:") and reads the verdict from the log-likelihoods of the labels
(" A" / " B"; " 1" ... " 5"): constrained decoding over the valid labels, one scored
continuation per label. `option_logprobs(lm, contexts, options)` scores all the labels of a
context in one forward pass when each label is one token (the usual case), else one
`lm.loglikelihood` request per (context, label).

The bias report reads the judged records: `position_report` (consistency under the swap,
first-position rate), `verbosity_report` (originals vs `pad_with_repetition` copies),
`self_enhancement_report` (the judge's own answers), `grading_accuracy_report` (pairs where
exactly one answer is correct), `single_report` (score means, histograms, kurtosis). Every rate
comes with its standard error and n (`rate`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Iterable, Protocol, Sequence

from hibari.base.stats import mean_se, rate

JUDGE_TEMPLATE = (
    "You are comparing two answers to the same question. Reply with the letter of the better "
    "answer.\n\nQuestion: {question}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\n"
    "The better answer is Answer")

PreferenceFn = Callable[[str, str, str], float]


def lm_judge(lm, template: str = JUDGE_TEMPLATE) -> PreferenceFn:
    """P(first better) = softmax over the log-likelihoods of " A" and " B"."""

    def prefer(question: str, first: str, second: str) -> float:
        ctx = template.format(question=question, first=first, second=second)
        (lp_a, _, _), (lp_b, _, _) = lm.loglikelihood([(ctx, " A"), (ctx, " B")])
        return 1.0 / (1.0 + math.exp(lp_b - lp_a))
    return prefer


def pair_verdict(p_xy: float, p_yx: float) -> str:
    """"x", "y" or "tie" from P(x better | x shown first) and P(y better | y shown first): a
    side wins only when preferred in both orders."""
    if p_xy > 0.5 and p_yx < 0.5:
        return "x"
    if p_xy < 0.5 and p_yx > 0.5:
        return "y"
    return "tie"


def judge_pairs(prefer: PreferenceFn, pairs: Sequence[tuple[str, str, str]]) -> list[dict]:
    out = []
    for question, x, y in pairs:
        p_xy = float(prefer(question, x, y))  # x shown first
        p_yx = float(prefer(question, y, x))  # y shown first
        out.append({"question": question, "p_x_first": p_xy, "p_y_first": p_yx,
                    "p_x_better": (p_xy + (1.0 - p_yx)) / 2, "winner": pair_verdict(p_xy, p_yx),
                    "first_position_won": [p_xy > 0.5, p_yx > 0.5],
                    "len_x": len(x), "len_y": len(y)})
    return out


def summarize(verdicts: Sequence[dict]) -> dict:
    """Win rate of x (ties count half), consistency, first-position preference, length bias."""
    n = len(verdicts)
    if not n:
        raise ValueError("no verdicts to summarize")
    wins = sum(v["winner"] == "x" for v in verdicts)
    ties = sum(v["winner"] == "tie" for v in verdicts)
    first = [w for v in verdicts for w in v["first_position_won"]]
    decided = [v for v in verdicts if v["winner"] != "tie" and v["len_x"] != v["len_y"]]
    longer_won = sum((v["winner"] == "x") == (v["len_x"] > v["len_y"]) for v in decided)
    return {"pairs": n, "win_rate_x": (wins + 0.5 * ties) / n,
            "mean_p_x_better": sum(v["p_x_better"] for v in verdicts) / n,
            "consistency": 1.0 - ties / n,
            "first_position_rate": sum(first) / len(first),
            "longer_answer_win_rate": longer_won / len(decided) if decided else None,
            "decided_pairs_with_length_difference": len(decided)}


# ---------------------------------------------------------------------------------------------
# Batched judges
# ---------------------------------------------------------------------------------------------

PAIRWISE_INSTRUCTION = (
    "Please act as an impartial judge and decide which of the two answers below answers the "
    "question better. Prefer the answer that is correct, helpful and relevant; the order of the "
    "answers and their length must not influence you.\n\nQuestion: {question}\n\n{reference}"
    "Answer A: {first}\n\nAnswer B: {second}\n\nReply with A or B.")
SINGLE_INSTRUCTION = (
    "Please act as an impartial judge and rate the answer to the question below on a scale of "
    "{low} to {high}, where {low} is a wrong or useless answer and {high} a correct, helpful "
    "one.\n\nQuestion: {question}\n\n{reference}Answer: {answer}\n\nReply with the rating.")
REFERENCE_BLOCK = "Reference answer: {reference}\n\n"
PAIRWISE_PRIMER = "The better answer is Answer"
SINGLE_PRIMER = "Rating:"
PAIR_LABELS = (" A", " B")


@dataclasses.dataclass(frozen=True)
class PairRequest:
    question: str
    first: str
    second: str
    reference: str | None = None  # given: reference-guided judging


@dataclasses.dataclass(frozen=True)
class GradeRequest:
    question: str
    answer: str
    reference: str | None = None


class Judge(Protocol):
    """What the pipeline needs from a judge (a model, or a scripted judge in tests)."""

    def prefer(self, requests: Sequence[PairRequest]) -> list[float]:
        """P(first better) per request."""

    def grade(self, requests: Sequence[GradeRequest], low: int, high: int) -> list[list[float]]:
        """The distribution over the scores low..high per request (each sums to 1)."""


# contexts, options -> log p(option | context) per context and option
OptionScorer = Callable[[Sequence[str], Sequence[str]], list[list[float]]]


def softmax(logps: Sequence[float]) -> list[float]:
    top = max(logps)
    exps = [math.exp(x - top) for x in logps]
    total = sum(exps)
    return [e / total for e in exps]


def score_labels(low: int, high: int) -> list[str]:
    if not (isinstance(low, int) and isinstance(high, int)) or low >= high:
        raise ValueError(f"score range low={low!r}, high={high!r}: need integers low < high")
    return [f" {k}" for k in range(low, high + 1)]


@dataclasses.dataclass
class LMJudge:
    """A judge model behind an `OptionScorer`; `render(instruction) -> prompt text` applies the
    judge's own template (its assistant opener last), the primer follows."""
    score: OptionScorer
    render: Callable[[str], str] = lambda text: text
    pairwise_primer: str = PAIRWISE_PRIMER
    single_primer: str = SINGLE_PRIMER

    def pairwise_context(self, r: PairRequest) -> str:
        ref = REFERENCE_BLOCK.format(reference=r.reference) if r.reference is not None else ""
        return self.render(PAIRWISE_INSTRUCTION.format(
            question=r.question, first=r.first, second=r.second, reference=ref)
        ) + self.pairwise_primer

    def single_context(self, r: GradeRequest, low: int, high: int) -> str:
        ref = REFERENCE_BLOCK.format(reference=r.reference) if r.reference is not None else ""
        return self.render(SINGLE_INSTRUCTION.format(
            question=r.question, answer=r.answer, reference=ref, low=low, high=high)
        ) + self.single_primer

    def prefer(self, requests: Sequence[PairRequest]) -> list[float]:
        contexts = [self.pairwise_context(r) for r in requests]
        return [softmax(lp)[0] for lp in self.score(contexts, list(PAIR_LABELS))]

    def grade(self, requests: Sequence[GradeRequest], low: int, high: int) -> list[list[float]]:
        labels = score_labels(low, high)
        contexts = [self.single_context(r, low, high) for r in requests]
        return [softmax(lp) for lp in self.score(contexts, labels)]


@functools.lru_cache(maxsize=None)
def _last_position_scorer():
    """A jitted (cfg, params, inputs[b, t], segments[b, t], last[b], prefix_ids[b, m],
    option_ids[b, k]) -> log p(prefix + option)[b, k]: the inputs end with the m prefix tokens
    at `last`; only the logits of the last m + 1 positions are computed."""
    import jax
    import jax.numpy as jnp

    from hibari.model import hidden, unembed

    @functools.partial(jax.jit, static_argnums=0)
    def run(cfg, params, inputs, segments, last, prefix_ids, option_ids):
        m = prefix_ids.shape[1]
        h = hidden(cfg, params, inputs, segments)
        pos = last[:, None] + jnp.arange(-m, 1)[None, :]  # predict prefix[0..m-1], option
        hs = jnp.take_along_axis(h, pos[:, :, None], axis=1)
        logp = jax.nn.log_softmax(unembed(cfg, params, hs).astype(jnp.float32), axis=-1)
        prefix = jnp.take_along_axis(logp[:, :m], prefix_ids[:, :, None], axis=-1)[..., 0]
        return prefix.sum(-1)[:, None] + jnp.take_along_axis(logp[:, m], option_ids, axis=-1)
    return run


def option_logprobs(lm, contexts: Sequence[str], options: Sequence[str],
                    width_multiple: int = 64) -> list[list[float]]:
    """log p(option | context) for every context and option, as `lm.loglikelihood` computes it
    (same tokenization, same left truncation to `lm.max_len`). When the options' tokens after
    a context differ only in their last token (" A" / " B"; " 1" ... " 9" as "▁" + digit),
    each context is one row: one forward pass over context + the shared tokens scores every
    option. Otherwise one loglikelihood request per (context, option)."""
    import numpy as np
    tok = lm.tokenizer
    rows = []
    for c in contexts:
        encoded = [tok.encode_pair(c, o) for o in options]
        ctx, first = encoded[0]
        shared = list(first[:-1])
        if any(e[0] != ctx or list(e[1][:-1]) != shared or len(e[1]) != len(first)
               for e in encoded):
            rows = None
            break
        rows.append(((list(ctx) + shared)[-lm.max_len:], shared, [e[1][-1] for e in encoded]))
    if rows is None:
        flat = lm.loglikelihood([(c, o) for c in contexts for o in options])
        k = len(options)
        return [[lp for lp, _, _ in flat[i * k:(i + 1) * k]] for i in range(len(contexts))]
    run = _last_position_scorer()
    out: list = [None] * len(rows)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ids, shared, _) in enumerate(rows):
        width = -(-len(ids) // width_multiple) * width_multiple
        groups.setdefault((width, len(shared)), []).append(i)
    b = lm.batch_size
    for (width, m), members in sorted(groups.items()):
        for start in range(0, len(members), b):
            chunk = members[start:start + b]
            inputs = np.full((b, width), tok.pad_id, np.int32)
            segments = np.zeros((b, width), np.int32)
            last = np.full((b,), m, np.int32)  # padding rows: any in-range position
            prefix_ids = np.zeros((b, m), np.int32)
            option_ids = np.zeros((b, len(options)), np.int32)
            for r, i in enumerate(chunk):
                ids, shared, opts = rows[i]
                inputs[r, :len(ids)], segments[r, :len(ids)] = ids, 1
                last[r], prefix_ids[r], option_ids[r] = len(ids) - 1, shared, opts
            logp = np.asarray(run(lm.cfg, lm.params, inputs, segments, last, prefix_ids,
                                  option_ids))
            for r, i in enumerate(chunk):
                out[i] = [float(x) for x in logp[r]]
    return out


# ---------------------------------------------------------------------------------------------
# Checkable answers and padded answers
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")


def numbers_in(text: str) -> list[float]:
    """The numbers written with digits in `text` ("1,200" is 1200; "3.5" is 3.5)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def contains_answer(answer: str, golds: Iterable[str]) -> bool:
    """NQ-open style: some gold answer, normalised (`metrics.normalize`), occurs in the
    normalised answer as whole words."""
    from hibari.evaluation.metrics import normalize
    text = f" {normalize(answer)} "
    return any(g and f" {g} " in text for g in (normalize(x) for x in golds))


def has_number(answer: str, gold: float) -> bool:
    """ASDiv style: the gold number appears as a number in the answer."""
    return any(abs(x - gold) < 1e-9 for x in numbers_in(answer))


RESTATEMENTS = ("To restate:", "In other words:", "To summarise once more:", "Once again:")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def pad_with_repetition(answer: str, times: int = 2) -> str:
    """MT-bench's "repetitive list" attack, deterministically: the answer, then `times`
    restatements of its content (its sentences rotated, each block opened by a filler phrase);
    nothing is added that the answer did not already say."""
    if times < 1:
        raise ValueError(f"times={times}: pad with at least one repetition")
    text = answer.strip()
    sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()] or [text]
    blocks = [text]
    for t in range(1, times + 1):
        k = t % len(sentences)
        rotated = sentences[k:] + sentences[:k]
        blocks.append(f"{RESTATEMENTS[(t - 1) % len(RESTATEMENTS)]} {' '.join(rotated)}".strip())
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# The bias report over judged records
# ---------------------------------------------------------------------------------------------



def _by_mode(records: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["mode"], []).append(r)
    return out


def position_report(pair_records: Sequence[dict]) -> dict:
    """Per reference mode: `consistency` = share of pairs (with two different answers) whose
    verdict survives the swap; `first_position_rate` = share of the single-order judgments
    that prefer the answer shown first (0.5 = no position bias); mean P(first better)."""
    out = {}
    for mode, recs in _by_mode(pair_records).items():
        distinct = [r for r in recs if not r["identical"]]
        first = [p > 0.5 for r in distinct for p in (r["p_a_first"], r["p_b_first"])]
        out[mode] = {"consistency": rate([r["verdict"] != "tie" for r in distinct]),
                     "first_position_rate": rate(first),
                     "mean_p_first": mean_se([p for r in distinct
                                              for p in (r["p_a_first"], r["p_b_first"])]),
                     "identical_pairs_skipped": len(recs) - len(distinct)}
    return out


def verbosity_report(verbosity_records: Sequence[dict]) -> dict:
    """Verdicts on (original, padded) pairs judged in both orders: the share the padded answer
    wins in both orders (verbosity bias; 0 for a judge that sees through the padding), the
    share the original wins, mean P(padded better) over the orders, and the mean single-score
    gap padded - original (when single grading ran)."""
    recs = list(verbosity_records)
    out = {"padded_win_rate": rate([r["verdict"] == "padded" for r in recs]),
           "original_win_rate": rate([r["verdict"] == "original" for r in recs]),
           "mean_p_padded_better": mean_se([r["p_padded_better"] for r in recs])}
    gaps = [r["score_padded"] - r["score_original"] for r in recs
            if r.get("score_padded") is not None and r.get("score_original") is not None]
    out["single_score_gap"] = mean_se(gaps)
    return out


def _points(r: dict, name: str) -> float:
    """1 when `name` won the pair record, 0 when it lost, 0.5 for a tie."""
    if r["verdict"] == "tie":
        return 0.5
    return 1.0 if r["model_" + r["verdict"]] == name else 0.0


def self_enhancement_report(pair_records: Sequence[dict], judge_contestant: str | None,
                            why_not: str = "") -> dict:
    """When the judge is also a contestant: its win rate (ties half) against each other
    contestant, and the controlled measure -- on pairs with a checkable answer where both
    answers are equally correct by the reference (both right or both wrong, not identical), the
    share the judge gives to its own answer (ties half; 0.5 = no self-preference)."""
    if not judge_contestant:
        return {"measured": False,
                "why": why_not or "the judge is not one of the contestants: it has no answers "
                "of its own to prefer"}
    out: dict = {"measured": True, "judge_contestant": judge_contestant, "modes": {}}
    for mode, recs in _by_mode(pair_records).items():
        mine = [r for r in recs if judge_contestant in (r["model_a"], r["model_b"])]
        opponents: dict[str, list[float]] = {}
        for r in mine:
            other = r["model_b"] if r["model_a"] == judge_contestant else r["model_a"]
            opponents.setdefault(other, []).append(_points(r, judge_contestant))
        equal = [r for r in mine if r["correct_a"] is not None and r["correct_b"] is not None
                 and r["correct_a"] == r["correct_b"] and not r["identical"]]
        own_p = [r["p_a_better"] if r["model_a"] == judge_contestant else 1 - r["p_a_better"]
                 for r in equal]
        out["modes"][mode] = {
            "win_rate_vs": {o: rate(v) for o, v in opponents.items()},
            "win_rate_all": rate([p for v in opponents.values() for p in v]),
            "own_pick_equally_correct": rate([_points(r, judge_contestant) for r in equal]),
            "mean_p_own_equally_correct": mean_se(own_p),
            "equally_correct_pairs": {"both_correct": sum(bool(r["correct_a"]) for r in equal),
                                      "both_wrong": sum(not r["correct_a"] for r in equal)}}
    return out


def grading_accuracy_report(pair_records: Sequence[dict]) -> dict:
    """Per reference mode and category: among pairs where exactly one answer is correct by the
    reference, the share where the judge's verdict (both orders agreeing) picks the correct
    one, the tie share, and the mean P(correct better) over both orders."""
    out: dict = {}
    for mode, recs in _by_mode(pair_records).items():
        cats: dict[str, list[dict]] = {}
        for r in recs:
            if r["correct_a"] is not None and r["correct_b"] is not None \
                    and r["correct_a"] != r["correct_b"]:
                cats.setdefault(r["category"], []).append(r)
                cats.setdefault("all", []).append(r)
        out[mode] = {}
        for cat, rs in sorted(cats.items()):
            right = ["a" if r["correct_a"] else "b" for r in rs]
            out[mode][cat] = {
                "picks_correct": rate([r["verdict"] == w for r, w in zip(rs, right)]),
                "ties": rate([r["verdict"] == "tie" for r in rs]),
                "mean_p_correct": mean_se([r["p_a_better"] if w == "a" else 1 - r["p_a_better"]
                                           for r, w in zip(rs, right)])}
    return out


def excess_kurtosis(values: Sequence[float]) -> float | None:
    """Fisher (excess) kurtosis, biased estimator (scipy.stats.kurtosis's default); None for
    fewer than 2 values or no spread."""
    import numpy as np
    x = np.asarray(values, float)
    if len(x) < 2 or float(x.std()) == 0.0:
        return None
    try:
        from scipy.stats import kurtosis
        return float(kurtosis(x))
    except ImportError:
        d = x - x.mean()
        return float((d ** 4).mean() / (d ** 2).mean() ** 2 - 3.0)


def single_report(single_records: Sequence[dict], low: int, high: int) -> dict:
    """Per reference mode and contestant: mean expected score and mean chosen (argmax) score
    with standard errors, the histogram of chosen scores over low..high and their kurtosis."""
    out: dict = {}
    for mode, recs in _by_mode(single_records).items():
        models: dict[str, list[dict]] = {}
        for r in recs:
            models.setdefault(r["model"], []).append(r)
        out[mode] = {}
        for model, rs in models.items():
            chosen = [r["score"] for r in rs]
            out[mode][model] = {
                "expected": mean_se([r["expected"] for r in rs]),
                "chosen": mean_se(chosen),
                "histogram": {str(k): chosen.count(k) for k in range(low, high + 1)},
                "kurtosis": excess_kurtosis(chosen)}
    return out
