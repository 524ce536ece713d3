"""The Hugging Face Transformers integration (``attention_variants.hf``) on small random models.

Each model is built once per module from a small config (no downloads), in float64, and run with
Transformers' own ``sdpa`` implementation as the ground truth. Outputs are compared on real
(non-padded) tokens only.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attention_variants import hf  # noqa: E402

N = 12  # prompt length; every window below is smaller
TOL = 1e-9  # float64 throughout: differences are rounding only
GEN_TOL = 1e-6  # generate() hands out its logits in float32
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
DECODER = {**SMALL, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0}


def _configs() -> dict:
    t = transformers
    return {
        "llama": t.LlamaConfig(**DECODER),
        # Mistral's window W: W keys including the token itself.
        "mistral": t.MistralConfig(**DECODER, sliding_window=5),
        # Qwen2: layer 0 full, layer 1 sliding with 4 keys.
        "qwen2": t.Qwen2Config(**DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "bert": t.BertConfig(**SMALL, vocab_size=128, max_position_embeddings=64, pad_token_id=0),
        # ModernBERT: layer 0 global, layer 1 local with local_attention=4 (2 keys each side).
        "modernbert": t.ModernBertConfig(
            **SMALL,
            vocab_size=128,
            max_position_embeddings=64,
            local_attention=4,
            global_attn_every_n_layers=2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
            cls_token_id=2,
            sep_token_id=1,
        ),
    }


DECODERS = ("llama", "mistral", "qwen2")
ENCODERS = ("bert", "modernbert")
WINDOWED = ("mistral", "qwen2", "modernbert")


@pytest.fixture(scope="module")
def models() -> dict:
    hf.register()
    torch.manual_seed(0)
    out = {}
    for name, cfg in _configs().items():
        cls = transformers.AutoModelForCausalLM if name in DECODERS else transformers.AutoModel
        out[name] = cls.from_config(cfg, attn_implementation="sdpa", dtype=torch.float64).eval()
    return out


@contextlib.contextmanager
def implementation(model, name: str):
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation("sdpa")


def batch(padding: str, n: int = N, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids ``(b, n)`` and a 2-D attention mask: row 0 unpadded, rows 1.. padded on ``padding``'s side."""
    ids = torch.randint(3, 128, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    for row, pad in zip(range(1, b), (3, 5), strict=False):
        if padding == "left":
            mask[row, :pad] = 0
        elif padding == "right":
            mask[row, n - pad :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def outputs(model, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference over the largest reference magnitude."""
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def rel_err_real(a: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """:func:`rel_err` over the real (non-padded) tokens."""
    real = mask.bool()
    return rel_err(a[real], ref[real])


CASES = [(m, "av_full", p) for m in DECODERS for p in ("none", "left", "right")]
CASES += [(m, "av_full", p) for m in ENCODERS for p in ("none", "right")]
CASES += [(m, "av_sliding_window", p) for m in ("mistral", "qwen2") for p in ("none", "left", "right")]
CASES += [("modernbert", "av_sliding_window", p) for p in ("none", "right")]


@pytest.mark.parametrize(("model_name", "impl", "padding"), CASES)
def test_forward_matches_sdpa(models, model_name: str, impl: str, padding: str) -> None:
    model = models[model_name]
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = outputs(model, ids, mask)
        with implementation(model, impl):
            out = outputs(model, ids, mask)
    assert out.shape == ref.shape
    assert rel_err_real(out, ref, mask) < TOL


def test_sliding_window_option_is_the_mistral_window(models) -> None:
    """``av_sliding_window`` with ``window = W - 1`` on a model without windows computes what
    Mistral's sdpa computes with ``sliding_window = W`` (same weights)."""
    cfg = _configs()["mistral"]
    cfg.sliding_window = None
    cfg.av_options = {"window": 4}
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float64).eval()
    ref_model = models["mistral"]
    model.load_state_dict(ref_model.state_dict())
    ids, mask = batch("left")
    with torch.no_grad():
        ref = outputs(ref_model, ids, mask)
        full = outputs(model, ids, mask)
        with implementation(model, "av_sliding_window"):
            out = outputs(model, ids, mask)
    assert rel_err_real(out, ref, mask) < TOL
    assert rel_err_real(full, ref, mask) > 1e-3  # the window matters here


@pytest.mark.parametrize(("model_name", "padding"), [("llama", "left"), ("bert", "right"), ("modernbert", "right")])
def test_gradients_match_sdpa(models, model_name: str, padding: str) -> None:
    model = models[model_name]
    ids, mask = batch(padding)
    weights = torch.randn(*ids.shape, 1, dtype=torch.float64) * mask[..., None]

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (outputs(model, ids, mask) * weights).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref = grads()
    with implementation(model, "av_full"):
        got = grads()
    model.zero_grad(set_to_none=True)
    assert len(got) == len(ref) > 0
    # Relative to the largest gradient: some gradients are exactly zero in exact arithmetic (the key
    # bias: softmax ignores a shift shared by all keys) and rounding noise in both.
    scale = max(r.abs().max().item() for r in ref)
    errs = [(g - r).abs().max().item() for g, r in zip(got, ref, strict=True)]
    assert max(errs) < TOL * scale, errs


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int = 6):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize(
    ("model_name", "impl", "padding"),
    [
        ("llama", "av_full", "none"),
        ("llama", "av_full", "left"),
        ("qwen2", "av_full", "left"),
        ("mistral", "av_sliding_window", "none"),
        ("mistral", "av_sliding_window", "left"),
    ],
)
def test_generate_matches_sdpa(models, model_name: str, impl: str, padding: str) -> None:
    """Greedy decoding with the KV cache gives sdpa's tokens, and the decoding steps' logits equal
    sdpa's to rounding (Mistral: prompt + new tokens exceed its window)."""
    model = models[model_name]
    ids, mask = batch(padding)
    with torch.no_grad():
        ref = greedy(model, ids, mask)
        with implementation(model, impl):
            got = greedy(model, ids, mask)
    assert torch.equal(got.sequences, ref.sequences)
    assert rel_err(torch.stack(got.logits), torch.stack(ref.logits)) < GEN_TOL


def test_performer_forward_backward_generate(models) -> None:
    """``av_performer``: finite outputs and gradients; decoding with the cache (one query against
    all cached keys) equals the causal forward of the whole sequence without a cache."""
    model = models["llama"]
    ids, mask = batch("left")
    with implementation(model, "av_performer"):
        out = outputs(model, ids, mask)
        assert torch.isfinite(out).all()
        out[mask.bool()].square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        assert grads and all(torch.isfinite(g).all() for g in grads)
        with torch.no_grad():
            gen = greedy(model, ids, mask)
            full_mask = torch.cat([mask, torch.ones(mask.shape[0], gen.sequences.shape[1] - N, dtype=mask.dtype)], 1)
            # generate() numbers the real tokens from 0; the Performer, unlike softmax attention, is
            # not invariant to a shift of all rotary positions, so give the same positions here.
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            whole = outputs(model, gen.sequences, full_mask, positions)
    steps = torch.stack(gen.logits, dim=1)  # (B, new, V): logits at positions N-1 .. N+new-2
    expect = whole[:, N - 1 : N - 1 + steps.shape[1]]
    assert rel_err(steps, expect) < GEN_TOL


def test_performer_approximates_full_attention(models) -> None:
    """With many features the Performer's model output is close to exact attention's (loosely:
    a Monte-Carlo approximation), and much closer than with few features."""
    model = models["llama"]
    ids, mask = batch("right")
    errs = {}
    with torch.no_grad():
        ref = outputs(model, ids, mask)
        for m in (8, 2048):
            model.config.av_options = {"num_features": m, "seed": 1}
            try:
                with implementation(model, "av_performer"):
                    errs[m] = rel_err_real(outputs(model, ids, mask), ref, mask)
            finally:
                del model.config.av_options
    assert errs[2048] < 0.05
    assert errs[2048] < errs[8] / 4


def test_mask_function_returns_key_padding() -> None:
    """The mask function returns the (B, Nk) padding of the keys in view, None when nothing is padded."""
    am = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert hf.key_padding_mask(2, 6, 6, attention_mask=am[1:]) is None
    assert hf.key_padding_mask(2, 6, 6, attention_mask=None) is None
    assert torch.equal(hf.key_padding_mask(2, 6, 6, attention_mask=am), am)
    # a sliding-window cache keeps the last keys: offset 2, 4 keys
    assert torch.equal(hf.key_padding_mask(2, 1, 4, q_offset=5, kv_offset=2, attention_mask=am), am[:, 2:])
    assert hf.key_padding_mask(2, 1, 3, q_offset=5, kv_offset=3, attention_mask=am) is None
    # a static cache of 10 slots, 6 written: the padding covers the written ones
    assert torch.equal(hf.key_padding_mask(2, 1, 10, q_offset=5, attention_mask=am), am)
    assert hf.key_padding_mask(2, 1, 10, q_offset=5, attention_mask=am[1:]).shape == (1, 6)
    with pytest.raises(ValueError, match="custom mask pattern"):
        hf.key_padding_mask(2, 6, 6, attention_mask=am, use_vmap=True)
    chunked = transformers.LlamaConfig(**DECODER)
    chunked.attention_chunk_size = 4
    with pytest.raises(ValueError, match="chunked"):
        hf.key_padding_mask(2, 6, 6, attention_mask=am, config=chunked)


def test_static_cache_generate(models) -> None:
    model = models["llama"]
    ids, mask = batch("left")
    with torch.no_grad():
        ref = greedy(model, ids, mask)
        with implementation(model, "av_full"):
            got = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
            )
    assert torch.equal(got, ref.sequences)


def test_layer_variant_rule(models) -> None:
    llama, mistral, modernbert = models["llama"].config, models["mistral"].config, models["modernbert"].config
    hf.register(window=7, num_features=32)
    try:
        assert hf.layer_variant("av_sliding_window", None, llama)[0].window == 7
        assert hf.layer_variant("av_sliding_window", 5, mistral)[0].window == 4
        assert hf.layer_variant("av_full", 5, mistral)[0].window == 4  # the model's window is the model's
        assert hf.layer_variant("av_sliding_window", None, modernbert)[0].name == "full"  # a global layer
        # ModernBERT passes local_attention // 2 + 1 = 3 on its local layers: 2 keys each side
        assert hf.layer_variant("av_sliding_window", 3, modernbert)[0].window == 2
        assert hf.layer_variant("av_performer", None, llama)[0].num_features == 32
        assert hf.layer_variant("av_full", None, llama)[0].name == "full"
    finally:
        hf.register()


def test_bad_options_and_inputs(models) -> None:
    with pytest.raises(ValueError, match="window"):
        hf.register(window=-1)
    with pytest.raises(ValueError, match="backend"):
        hf.register(backend="cuda")
    with pytest.raises(ValueError, match="num_features"):
        hf.register(num_features=0)
    hf.register()
    cfg = models["llama"].config
    cfg.av_options = {"windw": 3}
    try:
        with pytest.raises(ValueError, match="windw"):
            hf.layer_variant("av_sliding_window", None, cfg)
    finally:
        del cfg.av_options
    with pytest.raises(ValueError, match="implementation"):
        hf.layer_variant("av_flash", None, cfg)
    attn = models["llama"].model.layers[0].self_attn
    q, k = torch.randn(1, 4, 3, 16, dtype=torch.float64), torch.randn(1, 2, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dropout"):
        hf.attention_forward("av_full", attn, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="4-D"):
        hf.attention_forward("av_full", attn, q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_training_with_attention_dropout_raises(models) -> None:
    model = models["bert"]  # BERT's attention dropout defaults to 0.1
    ids, mask = batch("right")
    with implementation(model, "av_full"):
        model.train()
        try:
            with pytest.raises(ValueError, match="dropout"):
                outputs(model, ids, mask)
        finally:
            model.eval()


def test_register_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install '\.\[hf\]'"):
        hf.register()
