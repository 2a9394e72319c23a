"""Programmatic rewards, registered by name (for RL without a reward model, or beside one).

A reward is fn(responses: list[str], records: list[dict], **args) -> scores[n]: `records[i]` is
the prompt-data record the i-th response answers (a dict with "prompt" and optional fields such
as "answer"); `args` come from the config (config.reward.args). Adding one:

    from hibari.align.rewards import register_reward

    @register_reward("mentions_fuji")
    def mentions_fuji(responses, records, bonus=1.0):
        return [bonus * ("富士" in r) for r in responses]

    score_responses("mentions_fuji", responses, records, {"bonus": 2.0})  # float32[n]

Built-ins: `japanese_share`, `exact_match`, `length_band` (formulas in their docstrings).
"""
from __future__ import annotations

import inspect
import re
import unicodedata
from typing import Callable, Sequence

import numpy as np

from hibari.base.errors import UsageError

RewardFn = Callable[..., Sequence[float]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: register fn under `name` (a name registered twice raises ValueError)."""
    def register(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r}); "
                             "choose another name")
        REWARDS[name] = fn
        return fn
    return register


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise UsageError(f"config.reward.name={name!r}: unknown reward; choose one of "
                         f"{sorted(REWARDS)} or register one with "
                         "hibari.align.rewards.register_reward")
    return REWARDS[name]


def score_responses(name: str, responses: Sequence[str], records: Sequence[dict],
                    args: dict | None = None) -> np.ndarray:
    """float32[n]: the reward `name` of each response; checks the args against the reward's
    signature, and that it returns n finite numbers."""
    fn = get_reward(name)
    responses, records, args = list(responses), list(records), dict(args or {})
    if len(responses) != len(records):
        raise ValueError(f"reward {name!r}: {len(responses)} responses but {len(records)} "
                         "records (one record per response)")
    try:
        inspect.signature(fn).bind(responses, records, **args)
    except TypeError as e:
        raise UsageError(f"config.reward.args={args}: reward {name!r} does not take them "
                         f"({e})") from None
    scores = np.asarray(fn(responses, records, **args), dtype=np.float64)
    if scores.shape != (len(responses),):
        raise UsageError(f"reward {name!r} returned scores of shape {scores.shape} for "
                         f"{len(responses)} responses (one number per response)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UsageError(f"reward {name!r} returned a non-finite score {scores[bad[0]]} for "
                         f"response {bad[0]} ({bad.size} non-finite in all)")
    return scores.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------

_JAPANESE_RANGES = ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9D),
                    (0x4E00, 0x9FFF), (0x3400, 0x4DBF))
_JAPANESE_EXTRA = frozenset("々〆ヵヶー、。「」『』・")


def is_japanese_char(ch: str) -> bool:
    """Hiragana, Katakana (+ phonetic extensions, half-width), CJK ideographs (+ extension A),
    々〆ヵヶ, ー and the punctuation 、。「」『』・."""
    code = ord(ch)
    return ch in _JAPANESE_EXTRA or any(lo <= code <= hi for lo, hi in _JAPANESE_RANGES)


@register_reward("japanese_share")
def japanese_share(responses, records):
    """Japanese characters / non-whitespace characters of each response (0.0 when it has none).
    Japanese: Hiragana U+3040-309F, Katakana U+30A0-30FF and U+31F0-31FF, half-width katakana
    U+FF66-FF9D, CJK ideographs U+4E00-9FFF and U+3400-4DBF, 々〆ヵヶ, ー, 、。「」『』・. Every other
    non-whitespace character (Latin letters, digits, ASCII and full-width punctuation such as
    ！？) counts in the denominator only: "東京 Tokyo" -> 2/7. No normalisation is applied."""
    del records
    out = []
    for text in responses:
        chars = [ch for ch in text if not ch.isspace()]
        out.append(sum(map(is_japanese_char, chars)) / len(chars) if chars else 0.0)
    return out


_TRAILING = re.compile(r"[\s.。!?！？]+$")


def normalize_answer(text: str) -> str:
    """NFKC, casefold, whitespace runs -> one space, strip, then drop trailing . 。 ! ！ ? ？
    (and spaces between them)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return _TRAILING.sub("", text)


def _answers(record, index: int) -> list[str]:
    if not isinstance(record, dict) or "answer" not in record:
        raise UsageError(f"exact_match: records[{index}] has no 'answer' field (a string or a "
                         "list of acceptable strings); add it to the prompt data or choose "
                         "another reward")
    answer = record["answer"]
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    if not answers or not all(isinstance(a, (str, int)) and not isinstance(a, bool)
                              for a in answers):
        raise UsageError(f"exact_match: records[{index}]['answer']={answer!r}; expected a "
                         "string or a non-empty list of strings")
    return [str(a) for a in answers]


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


@register_reward("exact_match")
def exact_match(responses, records, first_line: bool = True):
    """1.0 when normalize_answer(response) equals normalize_answer of record["answer"] (a string,
    or a list of acceptable strings: any one matches; integers are read as their decimal
    string), else 0.0. first_line: compare only the response's first non-empty line."""
    out = []
    for i, (text, record) in enumerate(zip(responses, records)):
        answers = {normalize_answer(a) for a in _answers(record, i)}
        text = _first_line(text) if first_line else text
        out.append(float(normalize_answer(text) in answers))
    return out


@register_reward("length_band")
def length_band(responses, records, min_chars: int = 20, max_chars: int = 200):
    """n = characters of the stripped response: 1.0 for min_chars <= n <= max_chars; below,
    max(0, 1 - (min_chars - n) / max(min_chars, 1)) (0 for an empty response); above,
    max(0, 1 - (n - max_chars) / max_chars) (0 from twice max_chars on). Continuous, in [0, 1]."""
    del records
    if not 0 <= min_chars <= max_chars or max_chars < 1:
        raise UsageError(f"length_band: min_chars={min_chars}, max_chars={max_chars}; need "
                         "0 <= min_chars <= max_chars and max_chars >= 1")
    out = []
    for text in responses:
        n = len(text.strip())
        if n < min_chars:
            score = 1.0 - (min_chars - n) / max(min_chars, 1)
        elif n > max_chars:
            score = 1.0 - (n - max_chars) / max_chars
        else:
            score = 1.0
        out.append(max(0.0, score))
    return out

