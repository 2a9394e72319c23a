"""Knowledge probing with the SliCK categories (Gekhman et al., 2024, "Does Fine-Tuning LLMs on
New Knowledge Encourage Hallucinations?").

For a fact (q, a), P_Correct(q, a; M, T) is the fraction of correct answers the model gives
over N_ex few-shot prompts (each with different random exemplars; the paper uses N_ex = 10
prompts of 4 exemplars), with greedy decoding (T = 0, one answer per prompt) and with
temperature sampling (T > 0; the paper samples 16 answers per prompt at T = 0.5). Correct means
an exact match with a gold answer after normalisation. Categories:
  HighlyKnown   P_Correct(T=0) = 1
  MaybeKnown    0 < P_Correct(T=0) < 1
  WeaklyKnown   P_Correct(T=0) = 0 and P_Correct(T>0) > 0
  Unknown       P_Correct(T=0) = 0 and P_Correct(T>0) = 0
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from hibari.evaluation.metrics import exact_match

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def slick_category(greedy_correct: Sequence[bool], sampled_correct: Sequence[bool]) -> str:
    """The category from the outcomes of greedy answers (one per prompt) and of sampled ones."""
    if not greedy_correct:
        raise ValueError("SliCK needs at least one greedy answer")
    p_greedy = sum(map(bool, greedy_correct)) / len(greedy_correct)
    if p_greedy == 1.0:
        return "HighlyKnown"
    if p_greedy > 0.0:
        return "MaybeKnown"
    return "WeaklyKnown" if any(sampled_correct) else "Unknown"


def fewshot_prompts(fact: dict, pool: Sequence[dict], n_prompts: int = 10, k: int = 4,
                    seed: int = 0, template: str = "Q: {question}\nA:") -> list[str]:
    """N_ex prompts, each with k exemplars (not the fact itself) drawn by Random(seed:id:i)."""
    others = [f for f in pool if f["question"] != fact["question"]]
    prompts = []
    for i in range(n_prompts):
        shots = random.Random(f"{seed}:{fact['id']}:{i}").sample(others, k)
        parts = [template.format(question=s["question"]) + " " + s["answers"][0] for s in shots]
        prompts.append("\n\n".join(parts + [template.format(question=fact["question"])]))
    return prompts


def probe_facts(lm, facts: Sequence[dict], pool: Sequence[dict] | None = None, *,
                n_prompts: int = 10, k: int = 4, samples: int = 16, temperature: float = 0.5,
                max_new_tokens: int = 16, seed: int = 0) -> list[dict]:
    """Classify each {id, question, answers} fact with `lm` (a LanguageModel)."""
    pool = list(pool if pool is not None else facts)
    out = []
    for fact in facts:
        prompts = fewshot_prompts(fact, pool, n_prompts, k, seed)
        greedy = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=["\n"])
        sampled = []
        for i, prompt in enumerate(prompts):  # one batch per prompt: independent of batching
            sampled += lm.generate([prompt] * samples, max_new_tokens=max_new_tokens,
                                   stop=["\n"], temperature=temperature,
                                   seed=seed * 100_003 + i, batch_size=samples)
        g_ok = [bool(exact_match(a, fact["answers"])) for a in greedy]
        s_ok = [bool(exact_match(a, fact["answers"])) for a in sampled]
        out.append({"id": fact["id"], "question": fact["question"],
                    "category": slick_category(g_ok, s_ok),
                    "p_correct_greedy": sum(g_ok) / len(g_ok),
                    "p_correct_sampled": sum(s_ok) / max(len(s_ok), 1),
                    "greedy_answers": greedy})
    return out


def category_counts(records: Sequence[dict]) -> dict[str, int]:
    counts = Counter(r["category"] for r in records)
    return {c: counts.get(c, 0) for c in CATEGORIES}
