"""align/: loss formulas vs numpy transcriptions of the papers, templates, response-only masks,
packing, reference cache, malformed records, loaders. Tiny models, single-device jit."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hibari.align import losses, preference, reward, sft
from hibari.align.data import AlignDataError, RowLoader, SegmentEncoder
from hibari.align.templates import (
    ASSISTANT,
    END,
    TEMPLATES,
    TemplateError,
    flan_instructions,
    get_template,
)
from hibari.base.resources import resource_path
from hibari.data.tokenizer import load_tokenizer
from hibari.model import ModelConfig, apply, hidden, init
from hibari.train.losses import next_token_targets, token_log_probs

# --- numpy transcriptions of the papers' formulas ------------------------------------------------

def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_dpo(pc, pr, rc, rr, beta, eps):
    """Rafailov et al. eq. 7; cDPO: the label is flipped with probability eps."""
    logits = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * np_log_sigmoid(logits) - eps * np_log_sigmoid(-logits)


def np_ipo(pc, pr, rc, rr, tau):
    """Azar et al. eq. 17: (log-ratio difference - 1 / (2 tau))^2."""
    return (((pc - rc) - (pr - rr)) - 1 / (2 * tau)) ** 2


def np_hinge(pc, pr, rc, rr, beta):
    """SLiC-HF / RSO hinge with the reference-normalised likelihoods."""
    return np.maximum(0.0, 1.0 - beta * ((pc - rc) - (pr - rr)))


def np_kto(p, r, desirable, beta, z0, ld, lu):
    """Ethayarajh et al. eq. 8: lambda_y - v(x, y)."""
    reward = p - r
    v = np.where(desirable, ld * np_sigmoid(beta * (reward - z0)),
                 lu * np_sigmoid(beta * (z0 - reward)))
    return np.where(desirable, ld, lu) - v


@pytest.fixture(scope="module")
def logps():
    rng = np.random.default_rng(0)
    return [rng.normal(-40, 15, size=64) for _ in range(4)]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.0)])
def test_dpo_matches_paper(logps, beta, eps):
    got = losses.dpo_loss(*logps, beta, eps)
    np.testing.assert_allclose(got, np_dpo(*logps, beta, eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_and_hinge_match_papers(logps, beta):
    np.testing.assert_allclose(losses.ipo_loss(*logps, beta), np_ipo(*logps, beta), rtol=1e-5)
    np.testing.assert_allclose(losses.hinge_loss(*logps, beta), np_hinge(*logps, beta),
                               rtol=1e-5, atol=1e-5)
    assert np.any(np_hinge(*logps, beta) == 0) or beta < 1  # both hinge branches occur


def test_kto_and_bradley_terry_match_papers(logps):
    p, r = logps[0], logps[2]
    desirable = np.random.default_rng(1).random(64) < 0.5
    got = losses.kto_loss(p, r, desirable, 0.3, 1.7, desirable_weight=1.0,
                          undesirable_weight=1.33)
    np.testing.assert_allclose(got, np_kto(p, r, desirable, 0.3, 1.7, 1.0, 1.33), rtol=1e-5,
                               atol=1e-6)
    rc, rr = np.random.default_rng(2).normal(size=(2, 64)) * 3
    np.testing.assert_allclose(losses.bradley_terry_loss(rc, rr), -np_log_sigmoid(rc - rr),
                               rtol=1e-5, atol=1e-6)


def test_kto_reference_point_has_no_gradient(logps):
    g = jax.grad(lambda z: losses.kto_loss(logps[0], logps[2], logps[0] > -40, 0.5, z).sum())
    assert float(g(1.0)) == 0.0


# --- tokenizer and templates ---------------------------------------------------------------------

ASSETS = resource_path("hibari.align", "assets")


@pytest.fixture(scope="module")
def encoder():
    return SegmentEncoder(load_tokenizer(str(ASSETS / "seed_sp.model")))


def test_templates_render_and_flan_is_deterministic():
    ja = get_template("alpaca_ja").render({"instruction": "要約して", "input": "本文",
                                           "output": "要約"})
    assert "### 指示:\n要約して" in ja[0].text and "### 入力:\n本文" in ja[0].text
    assert ja[0].text.endswith("### 応答:\n") and ja[1] == ("要約", True)
    en = get_template("alpaca_en").render({"instruction": "Do it", "output": "Done"})
    assert "### Input" not in en[0].text and en[0].text.endswith("### Response:\n")
    records = [{"id": f"q{i}", "question": f"What is {i}?", "answer": str(i)} for i in range(40)]
    a = list(flan_instructions(records, "qa", seed=3))
    assert a == list(flan_instructions(records, "qa", seed=3))
    assert len({x["instruction"].replace(r["question"], "") for x, r in zip(a, records)}) >= 3
    assert all(x["output"] == r["answer"] for x, r in zip(a, records))
    assert a != list(flan_instructions(records, "qa", seed=4))
    with pytest.raises(TemplateError, match="lacks field"):
        list(flan_instructions([{"id": 1, "q": "x"}], "qa"))


def test_chat_mask_covers_every_assistant_turn_from_token_spans(encoder):
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Name two colours."},
                         {"role": "assistant", "content": "Red and green."},
                         {"role": "user", "content": "The sea?"},
                         {"role": "assistant", "content": "The sea is blue."}]}
    tokens, mask = encoder.encode(sft.render(chat, TEMPLATES["chat"]))
    sp = encoder.sp
    assistant = sp.piece_to_id(ASSISTANT)
    assert encoder.decode(tokens) == "".join(
        f"{tok}{m['content']}{END}\n" for m, tok in zip(
            chat["messages"], ("<|system|>", "<|user|>", ASSISTANT, "<|user|>", ASSISTANT)))
    # the response spans start right after each assistant role token and end with <|end|>
    starts = np.flatnonzero(tokens == assistant) + 1
    spans = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    assert [s[0] for s in spans] == list(starts)
    assert [encoder.decode(tokens[s]) for s in spans] == [f"Red and green.{END}",
                                                          f"The sea is blue.{END}"]
    assert all(tokens[s[-1]] == sp.piece_to_id(END) for s in spans)
    # an instruction triple under the chat template: one user turn, one assistant turn
    triple = {"instruction": "Name two colours.", "input": "sea", "output": "Blue."}
    tokens, mask = encoder.encode(sft.render(triple, TEMPLATES["chat"]))
    assert encoder.decode(tokens) == f"<|user|>Name two colours.\n\nsea{END}\n{ASSISTANT}Blue.{END}\n"
    assert encoder.decode(tokens[mask == 1]) == f"Blue.{END}"


# --- SFT loss: response-only, packing ------------------------------------------------------------

CFG = ModelConfig(vocab_size=1024, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=16,
                  d_ff=64, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
    return init(CFG, jax.random.key(0))


def _examples(encoder, n=6):
    tpl = get_template("minimal")
    records = [{"id": str(i), "instruction": "Name two colours." * (1 + i % 2),
                "input": "" if i % 3 else "the sea", "output": "Red and green. " * (1 + i)}
               for i in range(n)]
    return [sft.tokenize(r, encoder, tpl, 128) for r in records]


def test_sft_loss_counts_response_labels_only(encoder, params):
    batch = sft.unpacked(_examples(encoder, 2), 128)
    loss, aux = jax.jit(sft.sft_loss_fn(CFG))(params, batch, None)
    targets, weights = next_token_targets(batch)
    assert float(aux["weight"]) == float(batch["loss_mask"][:, 1:].sum())  # response + eos
    logits = apply(CFG, params, batch["tokens"], batch["segment_ids"])

    def nll(targets):
        lp, _ = token_log_probs(logits, targets)
        return float(-(lp * weights).sum() / weights.sum())

    assert nll(targets) == pytest.approx(float(loss), rel=1e-5)
    prompt_labels = np.flatnonzero((batch["loss_mask"][0, 1:] == 0)
                                   & (batch["segment_ids"][0, 1:] > 0))  # label t = token t+1
    response_labels = np.flatnonzero(weights[0])
    for t in prompt_labels[:: max(len(prompt_labels) // 8, 1)]:
        changed = np.array(targets).copy()
        changed[0, t] = (changed[0, t] + 7) % CFG.vocab_size
        assert nll(changed) == pytest.approx(float(loss), rel=1e-6)
    for t in response_labels[:3]:
        changed = np.array(targets).copy()
        changed[0, t] = (changed[0, t] + 7) % CFG.vocab_size
        assert nll(changed) != pytest.approx(float(loss), rel=1e-6)


def test_packed_sft_equals_unpacked(encoder, params):
    examples = _examples(encoder, 6)
    packed = sft.pack(examples, 128)
    single = sft.unpacked(examples, 128)
    assert len(packed["tokens"]) < len(examples)  # several examples per row
    assert packed["loss_mask"].sum() == single["loss_mask"].sum()
    fn = jax.jit(sft.sft_loss_fn(CFG))
    lp, ap = fn(params, packed, None)
    lu, au = fn(params, single, None)
    assert float(ap["weight"]) == float(au["weight"])
    np.testing.assert_allclose(float(lp), float(lu), rtol=2e-5)


# --- preference: one forward pass for both sequences, reference cache ---------------------------

def _pair_batch(encoder, n=4):
    records = [{"id": f"p{i}", "prompt": "Name two colours.", "chosen": "Red and green." * (i + 1),
                "rejected": "The sea."} for i in range(n)]
    records[1]["prompt"] = [{"role": "user", "content": "The sea?"}]
    items = [preference.tokenize_pair(r, encoder, get_template("minimal"), 128)
             for r in records]
    return items, preference.item_rows(items, 128)


def test_sequence_logps_sum_response_tokens_of_each_segment(encoder, params):
    items, rows = _pair_batch(encoder)
    got = np.asarray(jax.jit(lambda p, b: preference.sequence_logps(CFG, p, b))(params, rows))
    seqs = [s for item in items for s in (item.first, item.second)]
    alone = sft.unpacked([sft.Example(str(i), t, m) for i, (t, m) in enumerate(seqs)], 128)
    logits = np.asarray(jax.jit(lambda p, t, s: apply(CFG, p, t, s))(
        params, alone["tokens"], alone["segment_ids"]))
    for i, (tokens, mask) in enumerate(seqs):  # each sequence alone, scored by hand
        n = len(tokens)
        lp, _ = token_log_probs(logits[i, :n - 1], tokens[1:])
        want = float((np.asarray(lp) * mask[1:]).sum())
        assert got[i // 2, i % 2] == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("loss", ["dpo", "kto"])  # the paired losses share dpo's path
def test_precomputed_reference_equals_live(encoder, params, tmp_path, loss):
    items, rows = _pair_batch(encoder)
    policy = jax.tree.map(lambda x: x + 0.01 * jnp.sign(x), params)  # a policy != reference
    fn = preference.preference_loss_fn(CFG, loss, beta=0.5, label_smoothing=0.1)
    ref = np.asarray(jax.jit(lambda p, b: preference.sequence_logps(CFG, p, b))(params, rows))
    ids = [i.id for i in items]
    preference.save_reference_cache(str(tmp_path / "ref"), ids, ref)
    cached = preference.load_reference_cache(str(tmp_path / "ref"), ids[::-1])[::-1]
    np.testing.assert_array_equal(cached, ref)
    grad = jax.jit(jax.value_and_grad(fn, has_aux=True))
    (l_live, a_live), g_live = grad(policy, rows, None, frozen=params)
    (l_pre, a_pre), g_pre = grad(policy, {**rows, "ref_logps": cached}, None)
    assert float(l_live) == pytest.approx(float(l_pre), rel=1e-6)
    for k in a_live:
        assert float(a_live[k]) == pytest.approx(float(a_pre[k]), rel=1e-5, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 g_live, g_pre)
    with pytest.raises(AlignDataError, match="delete both files"):
        preference.load_reference_cache(str(tmp_path / "ref"), ids + ["other"])


def test_dpo_loss_fn_metrics_at_the_reference(encoder, params):
    _, rows = _pair_batch(encoder)
    loss, aux = preference.preference_loss_fn(CFG, "dpo", beta=0.1)(params, rows, None,
                                                                    frozen=params)
    assert float(loss) == pytest.approx(np.log(2), rel=1e-6)  # h = 0
    assert float(aux["accuracy"]) == 0.5 and float(aux["reward_margin"]) == 0.0
    assert float(aux["weight"]) == 4


# --- reward model ----------------------------------------------------------------------------------

def test_reward_reads_last_token_of_each_sequence(encoder, params):
    items, rows = _pair_batch(encoder)
    rparams = reward.init_reward_params(CFG, jax.random.key(1), params)
    got = np.asarray(jax.jit(lambda p, b: reward.segment_rewards(CFG, p, b))(rparams, rows))
    seqs = [s for item in items for s in (item.first, item.second)]
    alone = sft.unpacked([sft.Example(str(i), t, m) for i, (t, m) in enumerate(seqs)], 128)
    h = np.asarray(hidden(CFG, params, alone["tokens"], alone["segment_ids"]))
    for i, (tokens, _) in enumerate(seqs):  # each sequence alone, its last token by hand
        want = float(h[i, len(tokens) - 1] @ rparams["head"]["kernel"][:, 0]
                     + rparams["head"]["bias"][0])
        assert got[i // 2, i % 2] == pytest.approx(want, rel=1e-4, abs=1e-5)
    loss, aux = reward.reward_loss_fn(CFG)(rparams, rows, None)
    np.testing.assert_allclose(float(loss), np.mean(-np_log_sigmoid(got[:, 0] - got[:, 1])),
                               rtol=1e-5)


# --- records, loaders ------------------------------------------------------------------------------

def test_malformed_records_are_counted_with_file_and_line(encoder, tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"instruction": "Name two colours.", "output": "Red."}),
             json.dumps({"instruction": "Name two colours."}),
             json.dumps({"instruction": "Name two colours.", "output": "  "}),
             "{not json",
             json.dumps({"instruction": "Name two colours.", "output": "Red. " * 200}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
             json.dumps({"instruction": "The sea?", "output": "Blue."})]
    path.write_text("\n".join(lines) + "\n")
    examples, skipped = sft.load_examples(str(path), encoder, "alpaca_en", 128)
    assert [e.id for e in examples] == [f"{path}:1", f"{path}:7"]
    assert skipped.total == 5
    assert skipped.where["field 'output' is missing or empty"] == [f"{path}:2", f"{path}:3"]
    assert any(k.startswith("over-long") and v == [f"{path}:5"] for k, v in skipped.where.items())
    assert any(k.startswith("invalid JSON") for k in skipped.counts)
    assert any("assistant turn" in k for k in skipped.counts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[1] + "\n")
    with pytest.raises(AlignDataError, match="no usable records"):
        sft.load_examples(str(bad), encoder, "alpaca_en", 128)


def test_invalid_utf8_and_non_string_fields_are_counted_not_stringified(encoder, tmp_path):
    path = tmp_path / "sft.jsonl"
    good = {"instruction": "Name two colours.", "output": "Red."}
    lines = [json.dumps(good).encode(),
             b'{"instruction": "caf\xe9?", "output": "Yes."}',  # Latin-1, not UTF-8
             json.dumps({**good, "input": {"a": 1}}).encode(),
             json.dumps({**good, "input": 3}).encode(),
             json.dumps({**good, "output": ["Red."]}).encode(),
             json.dumps({"messages": [{"role": "user", "content": {"text": "hi"}},
                                      {"role": "assistant", "content": "Hello."}]}).encode(),
             json.dumps({**good, "input": None}).encode()]  # null input = no input
    path.write_bytes(b"\n".join(lines) + b"\n")
    examples, skipped = sft.load_examples(str(path), encoder, "minimal", 128)
    assert [e.id for e in examples] == [f"{path}:1", f"{path}:7"]
    assert skipped.where == {"invalid UTF-8 at byte 20": [f"{path}:2"],
                             "field 'input' must be a string, got dict": [f"{path}:3"],
                             "field 'input' must be a string, got int": [f"{path}:4"],
                             "field 'output' must be a string, got list": [f"{path}:5"],
                             "messages[0].content must be a string, got dict": [f"{path}:6"]}
    assert skipped.total == skipped.bad == 5  # Skipped is the data room's SourceStats
    assert f"{path}:2: invalid UTF-8 at byte 20" in skipped.bad_examples
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hi.", "chosen": "Red.", "rejected": "Sea."},
        {"prompt": "Hi.", "chosen": {"text": "Red."}, "rejected": "Sea."},
        {"prompt": 7, "chosen": "Red.", "rejected": "Sea."},
        {"prompt": {"instruction": "Hi.", "input": [1]}, "chosen": "Red.", "rejected": "Sea."}]) + "\n")
    items, skipped = preference.load_pairs(str(pairs), encoder, "minimal", 128)
    assert len(items) == 1
    assert skipped.counts == {"field 'chosen' must be a string, got dict": 1,
                              "field 'prompt' must be a string, {instruction, input} or messages, got int": 1,
                              "field 'input' must be a string, got list": 1}


def test_empty_or_unusable_align_files_are_one_line_errors(encoder, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"instruction": "Hi.", "output": "Red."}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Hi.", "output": 3}) + "\n{oops\n")
    cases = [([str(good), str(empty)], rf"{empty}: no usable records \(the file is empty\)"),
             (str(bad), rf"{bad}: no usable records \(all 2 records skipped: .*got int \(e\.g\. {bad}:1\)"),
             ([], "no data files given"),
             (str(tmp_path / "missing.jsonl"), r"missing\.jsonl: cannot read \(.*No such file")]
    for paths, message in cases:
        with pytest.raises(AlignDataError, match=message) as e:
            sft.load_examples(paths, encoder, "minimal", 128)
        assert "\n" not in str(e.value)


def _collect(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_sft_loader_resumes_and_shards_hosts(encoder):
    examples = _examples(encoder, 6) * 3
    make = lambda **kw: sft.sft_loader(examples, seq_len=128, seed=5, **kw)
    full = _collect(make(batch_size=4, shard_index=0, shard_count=1), 7)  # crosses epochs
    loader = make(batch_size=4, shard_index=0, shard_count=1)
    _collect(loader, 3)
    resumed = make(batch_size=4, shard_index=0, shard_count=1)
    resumed.set_state(json.loads(json.dumps(loader.get_state())))
    for a, b in zip(_collect(resumed, 4), full[3:]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    hosts = [_collect(make(batch_size=2, shard_index=h, shard_count=2), 7) for h in (0, 1)]
    for step in range(7):
        for k in full[step]:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][k], hosts[1][step][k]]), full[step][k])
    # eval: one ordered pass, the last batch padded with empty rows
    ev = list(make(batch_size=4, split="eval", shard_index=0, shard_count=1))
    rows = sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in ev)
    assert rows == len(sft.epoch_rows(examples, 128, 5, None)["tokens"])
    assert sum(int(b["loss_mask"].sum()) for b in ev) == sum(int(e.loss_mask.sum())
                                                             for e in examples)


def test_row_loader_finite_stream_ends_together_on_all_hosts():
    rows = lambda e: {"tokens": np.arange(5)[:, None] + 1, "segment_ids": np.ones((5, 1), int)}
    counts = [len(list(RowLoader(rows, batch_size=2, shard_index=h, shard_count=2, epochs=1)))
              for h in (0, 1)]
    assert counts == [2, 2]


def test_unpaired_records_pair_each_completion_with_another_prompt(encoder, tmp_path):
    path = tmp_path / "kto.jsonl"
    rows = [{"id": f"k{i}", "prompt": f"Name {i}.", "completion": c, "label": lab}
            for i, (c, lab) in enumerate([("Red.", True), ("Sea.", False), ("Blue.", True),
                                          ("Two.", "yes")])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items, skipped = preference.load_unpaired(str(path), encoder, "minimal", 128)
    assert [(i.id, i.label) for i in items] == [("k0", 1), ("k1", 0), ("k2", 1)]
    assert skipped.counts == {"field 'label' must be true/false, got 'yes'": 1}
    for i, item in enumerate(items):  # segment 2: own prompt, the completion 3 // 2 = 1 away
        other = rows[(i + 1) % 3]["completion"]
        assert encoder.decode(item.second[0][item.second[1] == 1]) == other
        assert encoder.decode(item.first[0][item.first[1] == 0]) == f"Name {i}.\n=> "
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text(json.dumps({"id": "p", "prompt": "Hi.", "chosen": "Red.",
                                     "rejected": "Sea."}) + "\n")
    derived, _ = preference.load_unpaired(str(pair_file), encoder, "minimal", 128)
    assert [(i.id, i.label, i.group) for i in derived] == [("p/chosen", 1, "p"),
                                                           ("p/rejected", 0, "p")]
