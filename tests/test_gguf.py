"""GGUF import on a small synthetic file written with the `gguf` package's own writer.

A random tiny Llama (transformers' LlamaForCausalLM, GQA) is written out the way llama.cpp's
converter does it: tensor names mapped, q/k rows permuted to the interleaved RoPE layout, 2-D
weights optionally quantized with `gguf.quants.quantize` (as in the SmolLM2 file: Q8_0 token
embedding, Q4_1 matrices, F32 norms). `import_gguf` must give logits equal to the torch model
holding the unpermuted weights - the originals for F32, `gguf.quants.dequantize(quantize(w))`
for quantized files.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hibari.model import apply  # noqa: E402
from hibari.model.gguf import import_gguf  # noqa: E402

torch.set_num_threads(2)
Q = gguf.GGMLQuantizationType
VOCAB, TOL, ROPE_THETA = 64, 1e-4, 50000.0
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24), dtype=np.int32)
HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `LlamaModel.permute`: rotate-half rows -> interleaved rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model.eval()


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = hf_name.split(".")  # model.layers.{i}.<module>.weight
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(rest[:-1])]}.weight"


def _qtype(gguf_name: str, quantized: bool):
    if not quantized or gguf_name.endswith("norm.weight"):
        return Q.F32
    return Q.Q8_0 if gguf_name == "token_embd.weight" else Q.Q4_1


def write_gguf(model: LlamaForCausalLM, path, quantized: bool) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; returns the HF-layout weights the file holds (the
    originals, or their quantize -> dequantize round trip)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    # No llama.vocab_size: the importer falls back to the token list, as for older files.
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    held = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.numpy().astype(np.float32)
        name = _gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        qtype = _qtype(name, quantized)
        if qtype == Q.F32:
            w.add_tensor(name, data)
            stored = data
        else:
            packed = quantize(data, qtype)
            w.add_tensor(name, packed, raw_dtype=qtype)
            stored = dequantize(packed, qtype)
        # Undo the permutation on what the file holds: the reference's weights.
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            n = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            order = llama_cpp_permute(np.arange(data.shape[0])[:, None], n)[:, 0]
            stored = stored[np.argsort(order)]
        held[hf_name] = stored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("quantized,tied", [(False, False), (True, False), (True, True)],
                         ids=["f32", "q4_1+q8_0", "q4_1+q8_0-tied"])
def test_import_gguf_matches_the_unpermuted_reference(tmp_path, quantized, tied):
    model = _tiny_llama(tied)
    held = write_gguf(model, tmp_path / "tiny.gguf", quantized)
    original = _torch_logits(model)
    if quantized:  # the reference holds exactly what the file holds, dequantized by gguf
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(held[name]))
    reference = _torch_logits(model)

    cfg, params = import_gguf(tmp_path / "tiny.gguf")
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
            cfg.head_dim, cfg.d_ff, cfg.tie_embeddings, cfg.rope_theta) == (
        VOCAB, 32, 2, 4, 2, 8, 64, tied, ROPE_THETA)
    ours = np.asarray(jax.jit(apply, static_argnums=0)(cfg, params, jnp.asarray(TOKENS)))
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)
    if quantized:  # the quantization really happened: Q4_1 moves the logits visibly
        assert np.max(np.abs(ours - original)) > 1e-2


def test_skipping_the_row_reorder_is_caught(tmp_path, monkeypatch):
    """Control: an importer that kept llama.cpp's q/k row order would miss the reference."""
    model_ = _tiny_llama(tied=False)
    write_gguf(model_, tmp_path / "tiny.gguf", quantized=False)
    monkeypatch.setattr("hibari.model.gguf.unpermute_rope_rows", lambda w, n_heads: w)
    cfg, params = import_gguf(tmp_path / "tiny.gguf")
    ours = np.asarray(jax.jit(apply, static_argnums=0)(cfg, params, jnp.asarray(TOKENS)))
    assert np.max(np.abs(ours - _torch_logits(model_))) > 1e-2
