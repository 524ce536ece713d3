"""The two models of ``attn-bench swap`` and how their attention is swapped, keeping every weight.

- ``task``: :class:`attn_bench.task.train.TaskModel` (causal, learned positions). The variant of each
  layer is an attribute of its :class:`~attention_variants.AttentionLayer` (no parameters of its
  own), so :func:`swap_attention` replaces it in place and the projections stay as trained.
- ``hf``: a Hugging Face ``LlamaForCausalLM`` built from a tiny ``LlamaConfig``, trained with
  ``attn_implementation="sdpa"``, saved with ``save_pretrained`` and reloaded with
  ``from_pretrained(..., attn_implementation="av_<variant>")`` (:mod:`attention_variants.hf`):
  the path a user takes with a checkpoint.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import Tensor, nn

import attention_variants as av
from attn_bench.swap.corpus import VOCAB
from attn_bench.task.train import TaskModel

MODELS = ("task", "hf")


def task_lm(variant: str, options: dict[str, Any], seq_len: int, d_model: int, heads: int, layers: int, conv: int):
    """A causal byte-level :class:`TaskModel` with ``variant`` in every layer."""
    return TaskModel(
        VOCAB, VOCAB, seq_len, variant=variant, options=options, d_model=d_model, heads=heads, layers=layers,
        causal=True, conv=conv,
    )  # fmt: skip


def swap_attention(model: TaskModel, variant: str, options: dict[str, Any]) -> TaskModel:
    """Replace the attention of every layer of ``model`` by ``variant`` (in place; weights kept)."""
    for block in model.blocks:
        block.attn.attn = av.get_variant(variant, **options)
    return model


class CausalLM(nn.Module):
    """A Transformers causal LM seen through :func:`attn_bench.task.train.train`'s interface:
    ``forward(ids (B, N)) -> logits (B, N, vocab)``, ``causal = True``."""

    causal = True

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids).logits


def hf_config(seq_len: int, d_model: int, heads: int, layers: int):
    """A tiny byte-level ``LlamaConfig`` (no attention dropout: the ``av_*`` implementations have none)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        attention_dropout=0.0,
    )


def hf_lm(config: Any, implementation: str = "sdpa") -> CausalLM:
    from transformers import AutoModelForCausalLM

    return CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation=implementation))


def hf_reload(model: CausalLM, variant: str, options: dict[str, Any]) -> CausalLM:
    """Save ``model`` with ``save_pretrained`` and load it back with ``attn_implementation="av_<variant>"``;
    ``options`` (the variant's, and ``backend``) go to the config's ``av_options``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from attention_variants import hf

    hf.register()
    logging.disable_progress_bar()  # a bar per save and per load would bury the run's own
    keep = {k: options[k] for k in hf.option_names() if k in options}
    model.lm.config.av_options = hf.check_options(keep, "options")
    with tempfile.TemporaryDirectory() as tmp:
        model.lm.save_pretrained(tmp)
        lm = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation=hf.PREFIX + variant, dtype=torch.float32)
    return CausalLM(lm)
