"""A loaded model with its tokenizer: the text-level API the tasks use.

    lm = load_lm("runs/small")                     # run/step/params/HF dir or a .gguf file
    lm.loglikelihood([("Question: ...\\nAnswer:", " Paris")])  # [(logp, greedy, n_tokens)]
    lm.generate(["The capital of France is"], max_new_tokens=8, stop=["\\n"])
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hibari.evaluation.loglikelihood import rolling_windows, token_scores
from hibari.evaluation.tokenizer import (
    EvalTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_for_checkpoint,
)
from hibari.model import ModelConfig
from hibari.model.decode import generate as generate_tokens

if TYPE_CHECKING:
    from hibari.base.progress import Progress


@dataclasses.dataclass
class LanguageModel:
    cfg: ModelConfig
    params: Any
    tokenizer: EvalTokenizer
    batch_size: int = 8
    max_len: int | None = None
    tokenizer_mismatch: dict | None = None  # load_lm(allow_tokenizer_mismatch=True): what differs

    def __post_init__(self):
        self.max_len = self.max_len or self.cfg.max_seq_len
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise TokenizerError(f"tokenizer {self.tokenizer.name} has {self.tokenizer.vocab_size} "
                                 f"ids but the model only {self.cfg.vocab_size}; pass the "
                                 "tokenizer the model was trained with (--tokenizer)")

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None
                      ) -> list[tuple[float, bool, int]]:
        """[(sum log p(continuation | context), greedy, continuation tokens), ...].
        `progress` (all three methods): its total grows by the requests, advanced per batch."""
        requests = [self.tokenizer.encode_pair(c, x) for c, x in pairs]
        scores = token_scores(self.cfg, self.params, requests, self.batch_size, self.max_len,
                              self.tokenizer.pad_id, on_batch=_on_batch(progress, len(requests)))
        return [(float(lp.sum()), bool(g.all()), len(lp)) for lp, g in scores]

    def rolling_loglikelihood(self, texts: Sequence[str], window: int | None = None,
                              stride: int | None = None, progress: Progress | None = None
                              ) -> list[tuple[float, int]]:
        """[(log p(text), tokens), ...]: every token predicted once, in overlapping windows."""
        window = min(window or self.max_len, self.max_len)
        requests, owner, counts = [], [], []
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text, bos=False)
            counts.append(len(ids))
            for r in rolling_windows(ids, self.tokenizer.start_id, window, stride):
                requests.append(r)
                owner.append(i)
        totals = [0.0] * len(texts)
        scores = token_scores(self.cfg, self.params, requests, self.batch_size, window,
                              self.tokenizer.pad_id, on_batch=_on_batch(progress, len(requests)))
        for i, (lp, _) in zip(owner, scores):
            totals[i] += float(lp.sum())
        return list(zip(totals, counts))

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32,
                 stop: Sequence[str] = (), temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int | None = None,
                 progress: Progress | None = None) -> list[str]:
        """Completions cut before the first stop string. Greedy results do not depend on
        the batch; sampled ones depend on (seed, batch composition)."""
        tok = self.tokenizer
        batch_size = batch_size or self.batch_size
        keep = max(1, self.max_len - max_new_tokens)
        encoded = [tok.encode(p)[-keep:] for p in prompts]
        eos = [i for i in (tok.eos_id,) if i is not None]
        out: list[str] = []
        advance = _on_batch(progress, len(encoded))
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]

            def stop_fn(row, ids):
                return bool(stop) and any(s in tok.decode(ids) for s in stop)

            new = generate_tokens(self.cfg, self.params, chunk, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed + start, eos_ids=eos, pad_id=tok.pad_id,
                                  stop=stop_fn if stop else None)
            out.extend(cut_at_stop(tok.decode(ids), stop) for ids in new)
            if advance is not None:
                advance(len(chunk))
        return out


def _on_batch(progress: Progress | None, requests: int):
    """`progress.advance` after its total grew by `requests`, or None without a progress."""
    if progress is None:
        return None
    progress.add_total(requests)
    return progress.advance


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def load_lm(checkpoint: str | Path, tokenizer: str | Path | None = None, *,
            batch_size: int = 8, max_len: int | None = None, prefix: str = "auto",
            allow_tokenizer_mismatch: bool = False) -> LanguageModel:
    """Parameters from any checkpoint kind `hibari.model.params_io.load_params` reads, or a llama
    GGUF file (`model.gguf`); the tokenizer from `tokenizer` or found beside the checkpoint;
    `prefix`: what goes before each context (`hibari.evaluation.tokenizer.PREFIX_MODES`).

    A hibari run that recorded its tokenizer (tokenizer_record.json) is refused with a tokenizer
    of another content hash (`hibari.data.tokenizer.TokenizerMismatch`), unless
    `allow_tokenizer_mismatch`: then one warning, and `lm.tokenizer_mismatch` says what differs."""
    checkpoint = Path(checkpoint)
    mismatch = None
    if checkpoint.suffix == ".gguf":
        from hibari.model.gguf import import_gguf
        cfg, params = import_gguf(checkpoint)
        tok = load_tokenizer(tokenizer) if tokenizer else tokenizer_for_checkpoint(checkpoint)
    else:
        from hibari.data.tokenizer import check_tokenizer_record
        from hibari.model.params_io import load_params, resolve_checkpoint
        resolve_checkpoint(checkpoint)  # a wrong path is named as such, before the tokenizer
        tok = load_tokenizer(tokenizer) if tokenizer else tokenizer_for_checkpoint(checkpoint)
        # the tokenizer is checked against the run's record before the parameters are read
        mismatch = check_tokenizer_record(checkpoint, tok.name, allow=allow_tokenizer_mismatch)
        cfg, params = load_params(checkpoint)
    tok.set_prefix(prefix)
    return LanguageModel(cfg, params, tok, batch_size=batch_size, max_len=max_len,
                         tokenizer_mismatch=mismatch)
