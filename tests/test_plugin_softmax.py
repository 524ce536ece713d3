"""A plug-in that is a softmax under a mask and declares nothing but its mask predicate gets the rest
for free: a decoding state (a KV cache read through the mask), context parallelism (the exact
all-gather fallback) and a Hugging Face implementation (``av_<name>``). Each checked against a
masked softmax written out here in float64."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

DILATED = '''
import attention_variants as av


@av.register_variant("dilated")
class DilatedAttention(av.AttentionVariant):
    """Query i sees the keys at an even distance from it (causal: at or before it)."""

    softmax = True

    def mask_mod(self, nq, nk, causal, device="cpu"):
        off = nk - nq
        return lambda qi, ki: ((qi + off - ki) % 2 == 0) & ((ki <= qi + off) | (not causal))
'''


def dilated_loop(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the keys at an even distance, query by query, float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for hi in range(h):
        kh = hi // (h // hk)
        for i in range(nq):
            p = i + nk - nq
            seen = [j for j in range(nk) if (p - j) % 2 == 0 and (not causal or j <= p)]
            if seen:
                s = q[:, hi, i : i + 1] @ k[:, kh, seen].transpose(-1, -2) / d**0.5
                out[:, hi, i] = (s.softmax(-1) @ v[:, kh, seen])[:, 0]
    return out


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The plug-in as a file, registered in this process for this module."""
    import attention_variants.base as base
    import attn_bench.core.plugins as plugins
    from attn_bench.core.plugins import load_plugin

    path = tmp_path_factory.mktemp("plugin") / "dilated.py"
    path.write_text(DILATED)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "_VARIANTS", dict(base._VARIANTS))
        mp.setattr(plugins, "_LOADED", dict(plugins._LOADED))
        load_plugin(str(path))
        yield path


def test_it_declares_what_the_jobs_need(plugin: Path) -> None:
    import attention_variants as av
    from attention_variants import hf
    from attention_variants.distributed import strategy_of

    var = av.get_variant("dilated")
    assert [var.lacks(n) for n in av.NEEDS] == [None] * len(av.NEEDS)
    assert strategy_of(var) == "all-gather" and "av_dilated" in hf.implementations()
    q = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    assert var.resolve_backend("auto", q) == "reference"  # no torch backend: its reference runs
    for causal in (False, True):
        torch.testing.assert_close(var(q, q, q, causal=causal), dilated_loop(q, q, q, causal))


def test_it_decodes_from_a_kv_cache_read_through_its_mask(plugin: Path) -> None:
    import attention_variants as av

    var = av.get_variant("dilated")
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 12, 8, generator=g),
        torch.randn(2, 2, 12, 8, generator=g),
        torch.randn(2, 2, 12, 8, generator=g),
    )
    out, state = var.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    outs = [out, var.step(q[:, :, 5:7], k[:, :, 5:7], v[:, :, 5:7], state)[0]]  # two tokens in one step
    outs += [var.step(*(x[:, :, i : i + 1] for x in (q, k, v)), state)[0] for i in range(7, 12)]
    assert isinstance(state, av.KVCache) and state.length == 12
    torch.testing.assert_close(torch.cat(outs, 2).double(), dilated_loop(q, k, v, True), rtol=1e-5, atol=1e-5)


def test_it_runs_context_parallel_through_the_all_gather_fallback(plugin: Path, tmp_path: Path) -> None:
    from attn_bench.cli import app

    out = tmp_path / "cp"
    args = ["cp", "--plugin", str(plugin), "--ranks", "2", "--n", "16", "--variants", "dilated", "--dtype", "float64"]
    args += ["--heads", "2", "--kv-heads", "1", "--head-dim", "8", "--repeats", "1", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["strategy"] for r in rows} == {"all-gather"}
    assert all(r["status"] == "ok" and float(r["max_err"]) <= float(r["err_bound"]) < 1e-8 for r in rows), rows
    sent = [r for r in rows if float(r["fwd_bytes_analytic_max"]) > 0]
    assert sent and all(float(r["bytes_ratio"]) == pytest.approx(1.0) for r in sent)


def test_it_is_a_hugging_face_attention_implementation(plugin: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from attention_variants import hf

    def truth(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = dilated_loop(query, key, value, causal=True)  # the module's scaling is D^-1/2 too
        return out.transpose(1, 2).to(query.dtype), None

    hf.register()
    AttentionInterface.register("test_dilated_truth", truth)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 11))
    logits = {}
    for impl in ("av_dilated", "test_dilated_truth", "sdpa"):
        cfg._attn_implementation = impl
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).double().eval()
        with torch.no_grad():
            logits[impl] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["av_dilated"], logits["test_dilated_truth"], rtol=1e-10, atol=1e-10)
    assert (logits["av_dilated"] - logits["sdpa"]).abs().max() > 1e-3  # the layers did run the plug-in
