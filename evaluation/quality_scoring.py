"""The perplexity scorer of the data room's quality stage (CCNet-style, Wenzek et al. 2020): bits
per UTF-8 byte of each document's beginning under a checkpoint, on the evaluation room's scoring
(`load_lm`, `rolling_windows`, `token_scores`: the forward pass and log-probabilities every task
uses). `hibari.data` knows no models; `hibari data prepare` (hibari/data_cli.py) hands it this.

    score = CheckpointScorer()("runs/quickstart/pretrain", "runs/quickstart/data/tokenizer.model", 256)
    bits_per_byte = score(texts)                      # float64 [n]

What is scored, with T = min(max_tokens, the model's max_seq_len): one window of T tokens, the
start token (BOS for hibari's SentencePiece models) followed by the document's first T - 1 tokens
(`encode(text, bos=False)`, no dummy-prefix change), each of those T - 1 tokens predicted from the
ones before it; the summed negative log-probability in bits is divided by the UTF-8 bytes of the
text those tokens decode to (the whole text when it has at most T - 1 tokens). An empty document
scores 0. Scores do not depend on the batch beyond float32 rounding (~1e-7 relative).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def prefix_bits_per_byte(lm, texts: Sequence[str], max_tokens: int) -> np.ndarray:
    """Bits per byte of each text's first `max_tokens - 1` tokens after the start token, under
    `lm` (a `hibari.evaluation.lm.LanguageModel`); see the module docstring. float64 [n]."""
    from hibari.evaluation.loglikelihood import rolling_windows, token_scores
    from hibari.evaluation.tokenizer import utf8_len
    tok = lm.tokenizer
    window = min(max_tokens, lm.max_len)
    requests, owner, nbytes = [], [], []
    for i, text in enumerate(texts):
        ids = tok.encode(text, bos=False)
        scored = ids[:window - 1]
        nbytes.append(max(1, utf8_len(text if len(scored) == len(ids) else tok.decode(scored))))
        for request in rolling_windows(scored, tok.start_id, window):  # one window (or none)
            requests.append(request)
            owner.append(i)
    nll = np.zeros(len(texts))
    for i, (log_p, _) in zip(owner, token_scores(lm.cfg, lm.params, requests, lm.batch_size,
                                                 window, tok.pad_id)):
        nll[i] -= log_p.sum()
    return nll / math.log(2) / np.asarray(nbytes, np.float64)


@dataclass(frozen=True)
class CheckpointScorer:
    """`hibari.data.quality.PerplexityScoring` on hibari checkpoints: `weights_path(checkpoint)`
    names the weights' folder (the quality stage fingerprints its files), and
    `scorer(checkpoint, tokenizer, max_tokens)` loads the model (`load_lm`, which also refuses a
    tokenizer other than the one the run recorded) and returns `prefix_bits_per_byte` on it."""
    batch_size: int = 16

    def weights_path(self, checkpoint: str) -> str:
        from hibari.model.params_io import resolve_checkpoint
        return str(resolve_checkpoint(checkpoint)[1])

    def __call__(self, checkpoint: str, tokenizer: str, max_tokens: int
                 ) -> Callable[[Sequence[str]], np.ndarray]:
        from hibari.evaluation.lm import load_lm
        lm = load_lm(checkpoint, tokenizer, batch_size=self.batch_size)

        def bits_per_byte(texts: Sequence[str]) -> np.ndarray:
            return prefix_bits_per_byte(lm, texts, max_tokens)
        return bits_per_byte
