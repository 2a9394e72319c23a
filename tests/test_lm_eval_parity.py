"""hibari's harness equals lm-evaluation-harness on a tiny random Llama (bench/lm_eval_parity.py).

Two byte-level BPE tokenizers trained on the vendored Botchan corpus: one whose post-processor
adds BOS itself (Llama style), one that defines BOS/EOS but adds nothing (GPT-2 / SmolLM2
style). For each, the same transformers checkpoint is scored by both harnesses on
commonsense_qa_sample (multiple choice, zero-shot) and botchan_perplexity (rolling windows of
128 tokens; every document needs several). Per (document, choice) log-likelihoods agree within
1e-4 and accuracies are identical. Rolling totals agree within 1e-4 absolute or 1e-6 relative
(totals are ~ -2000 nats) except for one lm-eval convention, asserted exactly: with a
BOS-adding tokenizer lm-eval 0.4.13's loglikelihood_rolling encodes the document *with* BOS
(tok_encode adds special tokens) and get_rolling_token_windows then puts prefix_token_id (BOS)
in front again, so it scores [BOS] + ids after a BOS: an extra log P(BOS | BOS) term, every
token conditioned on a doubled BOS, and later window boundaries one token earlier. Its total
equals hibari's rolling rule applied to [BOS] + ids (computed here independently with the
transformers model); hibari scores ids after a single BOS. The request tokens are compared
too: lm-eval's _encode_pair and rolling windows against hibari's encode_pair and
rolling_windows.
"""
import gzip
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's "hf" model needs it (lm_eval[hf])
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lm_eval_parity import (  # noqa: E402
    PREFIX,
    compare,
    hibari_results,
    lm_eval_results,
    lm_eval_task_files,
    markdown_table,
    perplexity_docs,
)
from hibari.evaluation.lm import load_lm  # noqa: E402
from hibari.evaluation.loglikelihood import rolling_windows  # noqa: E402
from hibari.evaluation.runner import evaluate_task  # noqa: E402
from hibari.evaluation.tasks import load_task  # noqa: E402

pytestmark = pytest.mark.slow

MAX_LEN = 128
CHOICE_LIMIT, PPL_LIMIT = 20, 3
TASKS = ("commonsense_qa_sample", "botchan_perplexity")


def _train_tokenizer(out: Path, adds_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = [json.loads(line) for line in
            gzip.open(ROOT / "data/assets/corpus/en.jsonl.gz", "rt", encoding="utf-8")]
    texts = [r["text"] for r in rows if r["id"].startswith("botchan")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>")
    hf.save_pretrained(out)
    assert (hf.encode("a")[0] == hf.bos_token_id) == adds_bos
    return hf


def _tiny_llama(out: Path, vocab: int, tok):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=MAX_LEN,
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


def _rolling_torch(model, ids: list[int], prefix: int, max_len: int) -> float:
    """Every token of ids predicted once: the first window from `prefix`, later windows with
    the max_len - 1 preceding tokens as context (hibari's and lm-eval's rule)."""
    seq = [prefix] + list(ids)
    total, predicted = 0.0, 0
    with torch.no_grad():
        while predicted < len(ids):
            n = min(max_len, len(ids) - predicted)
            end = predicted + n + 1                       # exclusive, in seq
            start = max(0, end - 1 - max_len)
            window = torch.tensor([seq[start:end]])
            logp = torch.log_softmax(model(window[:, :-1]).logits.double(), -1)[0]
            targets = window[0, 1:]
            picked = logp[torch.arange(len(targets)), targets]
            total += float(picked[-n:].sum())
            predicted += n
    return total


@pytest.mark.parametrize("adds_bos", [True, False], ids=["adds_bos", "no_bos"])
def test_hibari_matches_lm_eval(adds_bos, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    torch.set_num_threads(2)
    model_dir = tmp_path / "model"
    tok = _train_tokenizer(model_dir, adds_bos)
    model = _tiny_llama(model_dir, len(tok), tok)

    tasks = {name: load_task(name) for name in TASKS}
    limits = {"commonsense_qa_sample": CHOICE_LIMIT, "botchan_perplexity": PPL_LIMIT}
    names = [lm_eval_task_files(tasks[n], tmp_path / "tasks", limits[n]) for n in TASKS]

    lm = load_lm(model_dir, batch_size=8, max_len=MAX_LEN)
    ours = {PREFIX + n: hibari_results(evaluate_task(lm, tasks[n], fewshot=0, limit=limits[n]),
                                       tasks[n], limits[n]) for n in TASKS}

    hflm = HFLM(pretrained=model, tokenizer=tok, max_length=MAX_LEN, batch_size=4,
                device="cpu", dtype="float32")
    out = lm_eval.simple_evaluate(
        model=hflm, tasks=names, num_fewshot=0, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    theirs = lm_eval_results(out, names)
    rows = {r["task"]: r for r in compare(ours, theirs)}
    print(f"\nadds_bos={adds_bos}\n" + markdown_table(list(rows.values())))

    # multiple choice: the same requests, the same numbers, the same decisions
    mc = rows["commonsense_qa_sample"]
    assert mc["values"] == 5 * CHOICE_LIMIT
    assert mc["max_abs_delta_logp"] <= 1e-4, mc
    assert mc["pred_disagreements"] == 0 and mc["acc_hibari"] == mc["acc_lm_eval"], mc
    # lm-eval's acc_norm divides by target characters; hibari's targets are lm-eval's choices
    # (" bank": the space counts on both sides), so the per-character rule on hibari's
    # log-likelihoods and acc_bytes (ASCII: bytes == characters) reproduce it
    assert mc["acc_chars_hibari"] == mc["acc_norm_lm_eval"] == mc["acc_bytes_lm_eval"], mc
    assert mc["acc_bytes_hibari"] == mc["acc_bytes_lm_eval"], mc
    assert 0 < mc["acc_hibari"] < 1  # not all ties / not degenerate

    # the token requests themselves: lm-eval's _encode_pair == hibari's encode_pair
    from lm_eval import utils as lm_utils

    for d in lm_eval_results(out, names)[names[0]]["arguments"].values():
        for context, continuation in d:
            assert list(map(list, hflm._encode_pair(context, continuation))) == \
                list(map(list, lm.tokenizer.encode_pair(context, continuation)))

    # rolling perplexity
    ppl_name = PREFIX + "botchan_perplexity"
    docs = perplexity_docs(tasks["botchan_perplexity"], PPL_LIMIT)
    bos = tok.bos_token_id
    start_id = lm.tokenizer.start_id
    assert start_id == hflm.prefix_token_id == bos
    with torch.no_grad():
        bos_bos = float(torch.log_softmax(model(torch.tensor([[bos]])).logits.double(),
                                          -1)[0, 0, bos])
    for i, d in enumerate(docs):  # the transformers reference for the first document only
        ids = lm.tokenizer.encode(d["text"], bos=False)
        assert ids == tok.encode(d["text"], add_special_tokens=False)
        assert len(ids) > 2 * MAX_LEN  # several windows
        theirs_ids = hflm.tok_encode(d["text"])
        assert theirs_ids == ([bos] + ids if adds_bos else ids)
        windows = [tuple(map(list, w)) for w in map(lm_utils.make_disjoint_window,
                   lm_utils.get_rolling_token_windows(theirs_ids, bos, MAX_LEN, 1))]
        ours_windows = [tuple(map(list, w)) for w in rolling_windows(ids, start_id, MAX_LEN)]
        if not adds_bos:
            assert windows == ours_windows
        h, e = ours[ppl_name]["docs"][d["id"]], theirs[ppl_name]["docs"][d["id"]]
        # hibari: P(ids) with BOS (lm-eval's prefix_token_id) conditioning the first token
        if i == 0:
            assert h == pytest.approx(_rolling_torch(model, ids, bos, MAX_LEN), abs=1e-4,
                                      rel=1e-6)
        if adds_bos:
            # lm-eval: tok_encode(doc) already starts with BOS and get_rolling_token_windows
            # puts prefix_token_id (BOS) in front again -> it scores [BOS] + ids: the extra
            # term log P(BOS | BOS), and every later window boundary one token earlier
            assert windows == [tuple(map(list, w))
                               for w in rolling_windows([bos] + ids, bos, MAX_LEN)]
            if i == 0:
                expected = _rolling_torch(model, [bos] + ids, bos, MAX_LEN)
                assert e == pytest.approx(expected, abs=1e-4, rel=1e-6)
            assert abs(e - h) > 1e-2  # a real difference, not rounding
        else:
            assert h == pytest.approx(e, abs=1e-4, rel=1e-6)
    if adds_bos:
        # a text within one window: lm-eval scores [BOS] + ids after a BOS, i.e. log P(BOS|BOS)
        # plus every token conditioned on a doubled BOS, so the gap is not log P(BOS|BOS) alone
        from lm_eval.api.instance import Instance

        short = docs[0]["text"][:200]
        short_ids = tok.encode(short, add_special_tokens=False)
        assert len(short_ids) < MAX_LEN
        (e_short,) = hflm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (short,), 0)], disable_tqdm=True)
        ((h_short, _),) = lm.rolling_loglikelihood([short])
        doubled = _rolling_torch(model, [bos] + short_ids, bos, MAX_LEN)
        assert e_short == pytest.approx(doubled, abs=1e-4)
        assert h_short == pytest.approx(_rolling_torch(model, short_ids, bos, MAX_LEN), abs=1e-4)
        print(f"one window: lm-eval - hibari = {e_short - h_short:.4f}, "
              f"log P(BOS|BOS) = {bos_bos:.4f}")
    ppl = rows["botchan_perplexity"]
    if not adds_bos:
        assert ppl["bits_per_byte_hibari"] == pytest.approx(ppl["bits_per_byte_lm_eval"],
                                                            rel=1e-6)
        assert ppl["word_perplexity_hibari"] == pytest.approx(ppl["word_perplexity_lm_eval"],
                                                              rel=1e-6)
