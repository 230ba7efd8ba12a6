"""Architecture suite: a zoo of tiny random-init float64 models and loop references for the
per-instance route (``m=1``, ``m=2``) and the exact Gram rule (``GramWeights(score="gram", weights="linear")``).

Every zoo entry is a callable returning ``(model, batch, per_sample_loss)``: ``per_sample_loss(batch)`` gives the
[B] per-instance losses with the model's current parameters. Models are built from tiny configs (nothing is
downloaded), in float64, eval mode, every dropout 0, so one step is a deterministic function of the weights.

The references know nothing of the library: they loop over instances (or groups) with plain autograd, perturbing
the live parameters in place and restoring them bit for bit. :func:`run_case` runs the library's one step
(``DeltaSAM`` over ``torch.optim.SGD``, lr 1, no momentum: the weight change *is* the descent gradient) and
classifies the outcome:

- ``equal``: the step equals the loop to ``TOLERANCE`` (relative, over all trainable parameters);
- ``refused``: the library raised ValueError/TypeError/RuntimeError/NotImplementedError from its own code
  (the traceback's last frame is in ``lightning_deltasam/``) with a message naming a submodule or parameter;
- ``vague``: the library raised from its own code, but the wrong type or without naming any part of the model;
- ``silent``: no error, and the step differs from the loop by more than ``TOLERANCE``;
- ``crash``: an exception whose last frame is outside the library (transformers, torch, ...).

``equal`` and ``refused`` pass; the others fail.
"""

from __future__ import annotations

import inspect
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RHO = 0.05
RIDGE = 1e-3  # the exact Gram rule's default gram_ridge
# Relative, over all trainable parameters. Float64 models agree with the loop to ~1e-15, except that transformers'
# RMSNorm (Llama, Gemma, Qwen, Phi-3, ...) normalizes in float32 even in a float64 model: ~1e-7 there (1.4e-7 at
# most measured; with the norm patched to float64 the route matches to 4e-16).
TOLERANCE = 1e-6
PAD, BOS, EOS = 0, 1, 2
VOCAB, HIDDEN, LAYERS, HEADS, FFN, LABELS = 64, 16, 2, 2, 32, 3

Built = tuple[nn.Module, Any, Callable[[Any], Tensor]]

# SAMConfig.from_dict's options of each mode (the library step adds rho)
MODES: dict[str, dict[str, Any]] = {
    "m1": {"m": 1},
    "m2": {"m": 2},
    "exact": {"reweight": {"name": "gram", "score": "gram", "weights": "linear"}},
}


# ----------------------------------------------------------------------------------------------------- batches
def token_batch(b: int, t: int, seed: int = 0, pad: bool = True, type_ids: bool = False) -> dict[str, Tensor]:
    """Right-padded token ids: content in [3, VOCAB), the last real token EOS, PAD (mask 0) after it.

    Every sequence ends with exactly one EOS (BART / T5 classification heads read it); lengths vary when
    ``pad`` (the first sequence is always full, one is always as short as 3); a token is shared across
    instances 0 and 1 (embedding rows touched by two instances)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    lengths = torch.full((b,), t)
    if pad:
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        lengths[0], lengths[-1] = t, 3
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[torch.arange(b), lengths - 1] = EOS
    ids = ids.masked_fill(mask == 0, PAD)
    ids[1, 0] = ids[0, 0]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (b,), generator=g)}
    if type_ids:
        batch["token_type_ids"] = ((torch.arange(t) >= t // 2).long().expand(b, t) * mask).clone()
    return batch


def image_batch(b: int, size: int, channels: int = 3, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(b, channels, size, size, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, LABELS, (b,), generator=g),
    }


# ----------------------------------------------------------------------------------------- Hugging Face models
# A tiny value for every size-like config key a model type may have (only keys its config has are passed).
TINY: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "d_model": HIDDEN,
    "n_embd": HIDDEN,
    "dim": HIDDEN,
    "embedding_size": HIDDEN,
    "embed_dim": HIDDEN,
    "num_hidden_layers": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_key_value_heads": 1,  # grouped-query attention where the model has it
    "intermediate_size": FFN,
    "ffn_dim": FFN,
    "hidden_dim": FFN,  # distilbert's FFN width
    "encoder_ffn_dim": FFN,
    "decoder_ffn_dim": FFN,
    "d_ff": FFN,
    "d_kv": HIDDEN // HEADS,
    "head_dim": HIDDEN // HEADS,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "n_ctx": 64,
    "type_vocab_size": 2,
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "sep_token_id": EOS,
    "cls_token_id": BOS,
    "decoder_start_token_id": EOS,
    "num_labels": LABELS,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": FFN,
    "shared_expert_intermediate_size": FFN,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "global_attn_every_n_layers": 2,
    "local_attention": 4,
    "attention_window": 4,
    "num_buckets": 8,  # t5 relative attention
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}

# Per model type: config overrides on top of TINY (the reason in a comment), forward keywords to pass.
HF_EXTRA: dict[str, dict[str, Any]] = {
    "deberta": {"relative_attention": True, "max_relative_positions": 8, "pos_att_type": ["c2p", "p2c"]},
    "deberta-v2": {  # v3 style: relative attention with log buckets, shared key, c2p + p2c
        "relative_attention": True,
        "position_buckets": 4,
        "max_relative_positions": 16,
        "pos_att_type": ["p2c", "c2p"],
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "position_biased_input": False,
    },
    "gpt2": {"n_inner": FFN},
    "albert": {"embedding_size": 8, "num_hidden_groups": 1},  # factorized embedding, shared layer
    "electra": {"embedding_size": 8},  # embedding projection
    "funnel": {"block_sizes": [1, 1], "num_decoder_layers": 1, "d_head": 8, "d_inner": FFN},
    "longformer": {"attention_window": [4, 4]},
    "big_bird": {"attention_type": "original_full"},
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [4, 2], "axial_pos_embds_dim": [8, 8]},
    "xlnet": {"d_inner": FFN},
    "gemma2": {"query_pre_attn_scalar": 8},
    "phi": {"partial_rotary_factor": 0.5},
    "t5": {"decoder_start_token_id": PAD},
    "mpnet": {"relative_attention_num_buckets": 32},  # the bucket function's own default
    "xlm": {"emb_dim": HIDDEN},
    "flaubert": {"emb_dim": HIDDEN},
    "luke": {"entity_vocab_size": 16, "entity_emb_size": 8},
    "ctrl": {"dff": FFN},
    "gptj": {"rotary_dim": 4},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # head_dim: the rotary part's width; one expert group
    "deepseek_v3": {"num_key_value_heads": HEADS, "head_dim": 4, "n_group": 1, "topk_group": 1},
    "axk1": {"num_key_value_heads": HEADS, "head_dim": 4, "n_group": 1, "topk_group": 1},
    "roc_bert": {
        "pronunciation_vocab_size": 16,
        "shape_vocab_size": 16,
        "pronunciation_embed_dim": 8,
        "shape_embed_dim": 8,
    },
    "canine": {"downsampling_rate": 2, "num_hash_buckets": 64, "local_transformer_stride": 4},
    "mobilebert": {"intra_bottleneck_size": 8, "true_hidden_size": 8, "num_feedforward_networks": 2},
    "qwen3_next": {"full_attention_interval": 2},
    "qwen3_5_text": {"full_attention_interval": 2},
    **{  # multi-head latent attention and differential attention: no grouped-query heads
        mt: {"num_key_value_heads": HEADS}
        for mt in ("deepseek_v2", "minicpm3", "mistral4", "axk2", "diffllama", "esmc")
    },
}

TYPE_IDS = {"bert", "albert", "electra", "mpnet", "deberta", "deberta-v2", "megatron-bert", "roberta"}


def _dropout_free(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg_dict.items():
        if re.search(r"drop", key) and (isinstance(value, float) or (key.startswith("classifier") and value is None)):
            out[key] = 0.0
    return out


def hf_config(model_type: str, **extra: Any) -> Any:
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    kw = {k: v for k, v in TINY.items() if k in defaults}
    kw.update(_dropout_free(defaults))
    kw["num_labels"] = LABELS  # not a key of to_dict() (id2label is)
    kw["experts_implementation"] = "eager"  # grouped_mm takes no float64
    kw.update(HF_EXTRA.get(model_type, {}))
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def _forward_names(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def hf_classifier(model_type: str, b: int = 4, t: int = 7, pad: bool = True, **extra: Any) -> Callable[[], Built]:
    """A tiny ``AutoModelForSequenceClassification`` of ``model_type``; loss: CE of its logits per instance."""

    def build() -> Built:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        cfg = hf_config(model_type, **extra)
        model = AutoModelForSequenceClassification.from_config(cfg).double().eval()
        names = _forward_names(model)
        batch = token_batch(b, t, pad=pad, type_ids="token_type_ids" in names and model_type in TYPE_IDS)

        def loss(bt: dict[str, Tensor]) -> Tensor:
            inputs = {k: v for k, v in bt.items() if k != "labels"}
            return F.cross_entropy(model(**inputs).logits, bt["labels"], reduction="none")

        return model, batch, loss

    return build


def causal_lm(model_type: str, b: int = 4, t: int = 7, **extra: Any) -> Callable[[], Built]:
    """A tiny causal LM with ``tie_word_embeddings=True``; loss: mean next-token CE over each sequence's tokens."""

    def build() -> Built:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = hf_config(model_type, tie_word_embeddings=True, **extra)
        model = AutoModelForCausalLM.from_config(cfg).double().eval()
        batch = token_batch(b, t)

        def loss(bt: dict[str, Tensor]) -> Tensor:
            logits = model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits[:, :-1]
            target, keep = bt["input_ids"][:, 1:], bt["attention_mask"][:, 1:].to(logits.dtype)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            return (ce.view_as(keep) * keep).sum(1) / keep.sum(1)

        return model, batch, loss

    return build


def _image_loss(model: nn.Module) -> Callable[[Any], Tensor]:
    return lambda bt: F.cross_entropy(model(pixel_values=bt["pixel_values"]).logits, bt["labels"], reduction="none")


def vit(b: int = 4) -> Callable[[], Built]:
    def build() -> Built:
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        cfg = ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=LABELS,
        )
        model = ViTForImageClassification(cfg).double().eval()
        return model, image_batch(b, 8), _image_loss(model)

    return build


def resnet(b: int = 4) -> Callable[[], Built]:
    """transformers' ResNet (Conv2d + BatchNorm2d, eval mode: running statistics, per-instance losses)."""

    def build() -> Built:
        from transformers import ResNetConfig, ResNetForImageClassification

        torch.manual_seed(0)
        cfg = ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=LABELS
        )
        model = ResNetForImageClassification(cfg).double().eval()
        return model, image_batch(b, 16), _image_loss(model)

    return build


# Every model type with a sequence-classification head in transformers 5.24 (AutoModelForSequenceClassification)
# that builds from TINY + HF_EXTRA in float64, runs on CPU and gives finite losses.
HF_TYPES = [
    # encoders
    "bert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
    "ernie", "megatron-bert", "ibert", "rembert", "roc_bert", "distilbert", "albert", "electra", "convbert",
    "deberta", "deberta-v2", "mpnet", "esm", "esmc", "nomic_bert", "gte", "jina_embeddings_v3", "eurobert",
    "ultrabert", "modernbert", "roformer", "squeezebert", "mobilebert", "funnel", "longformer", "big_bird",
    "nystromformer", "yoso", "fnet", "xlm", "flaubert", "xlnet", "luke", "layoutlm", "markuplm", "tapas",
    # decoders
    "gpt2", "gpt-sw3", "openai-gpt", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "ctrl", "opt", "bloom",
    "falcon", "mpt", "biogpt", "llama", "arcee", "mistral", "ministral", "ministral3", "qwen2", "qwen3",
    "seed_oss", "smollm3", "helium", "hunyuan_v1_dense", "gemma", "gemma2", "gemma3_text", "glm", "glm4",
    "phi", "phi3", "persimmon", "stablelm", "starcoder2", "nemotron", "olmo", "olmo2", "olmo3", "exaone4",
    "doge", "diffllama", "modernbert-decoder", "minicpm3",
    # mixture of experts, latent attention, hybrids
    "mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "gpt_oss", "hunyuan_v1_moe", "minimax", "jetmoe",
    "deepseek_v2", "deepseek_v3", "mistral4", "axk1", "axk2", "jamba",
    # encoder-decoders
    "t5", "mt5", "umt5", "bart", "mbart", "plbart", "mvp", "bigbird_pegasus",
]  # fmt: skip

# The other model types of the mapping, and why they are not in the zoo.
NOT_IN_ZOO = {
    "gemma3": "composite config (text_config + vision_config): the tiny sizes do not reach the sub-configs; "
    "gemma3_text is in",
    "t5gemma": "composite encoder/decoder sub-configs: default sizes, does not fit in memory",
    "t5gemma2": "composite encoder/decoder + vision sub-configs: default sizes, does not fit in memory",
    "qwen3_5": "composite config (text + vision): default sizes (a 4 GB embedding); qwen3_5_text builds",
    "modernvbert": "composite config (text + vision): 250M parameters at default sizes, 19 s to build",
    "ultravbert": "composite config (text + vision): default sizes, does not fit in memory",
    "perceiver": "multimodal latent-array model: default latent sizes do not fit in memory",
    "qwen3_5_text": "builds, but its gated-delta-net fallback (no CUDA kernel) takes 0.5 s per pass: too slow",
    "qwen3_next": "builds, but its gated-delta-net fallback (no CUDA kernel) takes 0.5 s per pass: too slow",
    "canine": "builds, but NaN losses with a padded batch (character downsampling)",
    "cohere_compass_text": "KeyError 'full_attention' inside its modeling code with tiny layer_types",
    "layoutlmv2": "needs detectron2 (not installed)",
    "layoutlmv3": "its text-only forward fails (visual embedding sized to the default 768)",
    "lilt": "layout embedding widths (channel_shrink_ratio) do not fit a 16-wide hidden size",
    "mra": "custom kernel path mixes float32 and float64 (no float64 support)",
    "reformer": "refuses a backward in eval mode (asserts model.train()); LSH attention is random in train mode",
    "xmod": "needs a language adapter chosen (set_default_language) before any forward",
    "zamba": "hybrid mamba config: layer_types does not follow num_hidden_layers",
    "zamba2": "hybrid mamba config: layer_types does not follow num_hidden_layers",
}

T_EQUALS_B = [  # the T == B cases (B = T = 5): a spread of families, where batch and sequence axes can be confused
    "bert", "distilbert", "albert", "deberta-v2", "modernbert", "gpt2", "opt", "bloom", "falcon", "llama",
    "gemma2", "phi", "mixtral", "t5", "bart", "xlnet", "funnel", "longformer",
]  # fmt: skip


def build_zoo() -> dict[str, Callable[[], Built]]:
    zoo: dict[str, Callable[[], Built]] = {}
    for mt in HF_TYPES:
        zoo[mt] = hf_classifier(mt)
    for mt in T_EQUALS_B:
        zoo[f"{mt}/T=B"] = hf_classifier(mt, b=5, t=5)
    zoo["gpt2-lm-tied"] = causal_lm("gpt2")
    zoo["llama-lm-tied"] = causal_lm("llama")
    zoo["llama-lm-tied/T=B"] = causal_lm("llama", b=5, t=5)
    zoo["vit"] = vit()
    zoo["resnet"] = resnet()
    return zoo


ZOO = build_zoo()


# ------------------------------------------------------------------------------------------------- references
def trainable(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name (tied parameters once, under their first name)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads(value: Tensor, params: dict[str, Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(value, list(params.values()), allow_unused=True, materialize_grads=True))


def _shifted(params: dict[str, Tensor], eps: list[Tensor]):
    """Context: the live parameters moved by ``eps`` in place, restored bit for bit on exit."""

    class _Ctx:
        def __enter__(self) -> None:
            self.saved = [p.detach().clone() for p in params.values()]
            with torch.no_grad():
                for p, e in zip(params.values(), eps):
                    p.add_(e)

        def __exit__(self, *exc: Any) -> None:
            with torch.no_grad():
                for p, s in zip(params.values(), self.saved):
                    p.copy_(s)

    return _Ctx()


def per_instance_reference(model: nn.Module, loss_fn: Callable, batch: Any, rho: float, m: int) -> dict[str, Tensor]:
    """(1/n) sum_i grad l_i(w + eps_g(i)), eps_g = rho G_g/||G_g|| (G_g: the sum of group g's gradients at w; groups
    of m consecutive instances, the last one may be smaller). The whole batch runs at every point and the group's
    losses are taken, so nothing depends on how a model treats a sliced batch."""
    params = trainable(model)
    with torch.enable_grad():
        n = loss_fn(batch).shape[0]
        total = [torch.zeros_like(p) for p in params.values()]
        for start in range(0, n, m):
            group = slice(start, min(start + m, n))
            g = _grads(loss_fn(batch)[group].sum(), params)
            norm = torch.sqrt(sum((x**2).sum() for x in g))
            with _shifted(params, [rho * x / norm for x in g]):
                g2 = _grads(loss_fn(batch)[group].sum(), params)
            for acc, x in zip(total, g2):
                acc += x / n
    return dict(zip(params, total))


def per_instance_rows(model: nn.Module, loss_fn: Callable, batch: Any) -> Tensor:
    """[B, P] per-instance gradients at w, one autograd call per instance (the whole batch run each time)."""
    params = trainable(model)
    with torch.enable_grad():
        n = loss_fn(batch).shape[0]
        rows = [torch.cat([x.reshape(-1) for x in _grads(loss_fn(batch)[i], params)]) for i in range(n)]
    return torch.stack(rows)


def exact_gram_reference(
    model: nn.Module, loss_fn: Callable, batch: Any, rho: float, ridge: float = RIDGE
) -> dict[str, Tensor]:
    """The exact Gram rule: K = R R^T of per-instance gradients, delta ∝ max((K + lambda I)^-1 diag(K)^1/2, 0)
    (lambda = ridge * mean diag K), eps = rho g_delta/||g_delta||, g_delta = delta^T R; descent: grad of the mean
    loss at w + eps (as ``lightning_deltasam.oracle.weighted_sam_update``)."""
    params = trainable(model)
    rows = per_instance_rows(model, loss_fn, batch).double()
    k = rows @ rows.t()
    diag = k.diagonal().clamp_min(0)
    coef = torch.linalg.solve(k + ridge * diag.mean() * torch.eye(k.shape[0], dtype=k.dtype), diag.sqrt())
    delta = coef.clamp_min(0) / coef.clamp_min(0).sum()
    g = (delta @ rows).to(rows.dtype)
    eps_flat = rho * g / g.norm()
    eps, offset = [], 0
    for p in params.values():
        eps.append(eps_flat[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()
    with torch.enable_grad(), _shifted(params, eps):
        return dict(zip(params, _grads(loss_fn(batch).mean(), params)))


def reference(mode: str, model: nn.Module, loss_fn: Callable, batch: Any, rho: float = RHO) -> dict[str, Tensor]:
    if mode == "m1":
        return per_instance_reference(model, loss_fn, batch, rho, 1)
    if mode == "m2":
        return per_instance_reference(model, loss_fn, batch, rho, 2)
    if mode == "exact":
        return exact_gram_reference(model, loss_fn, batch, rho)
    raise ValueError(mode)


# ------------------------------------------------------------------------------------------ library and verdict
def library_step(mode: str, model: nn.Module, loss_fn: Callable, batch: Any, rho: float = RHO) -> dict[str, Tensor]:
    """The descent gradient of DeltaSAM's one step: SGD with lr 1 and no momentum, so w_before - w_after."""
    from lightning_deltasam import DeltaSAM, SAMConfig

    params = trainable(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    sam = SAMConfig.from_dict({"rho": rho, **MODES[mode]})
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, sam, lr=1.0, momentum=0.0, module=model)
    opt.step(lambda: loss_fn(batch))
    return {n: before[n] - p.detach() for n, p in params.items()}


def rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    num = sum(((got[k] - v).double() ** 2).sum() for k, v in want.items())
    den = sum((v.double() ** 2).sum() for v in want.values())
    return float((num / den).sqrt())


REFUSAL_TYPES = (ValueError, TypeError, RuntimeError, NotImplementedError)


def library_dir() -> Path:
    """The folder of the imported lightning_deltasam (an exception whose last frame is there is the library's)."""
    import lightning_deltasam

    return Path(lightning_deltasam.__file__).resolve().parent


def model_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n}
    names |= {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return names


def names_model_part(message: str, model: nn.Module) -> str | None:
    """The longest submodule / parameter name of ``model`` the message contains, if any: a dotted name
    (``encoder.layer.0.attention``, ``classifier.weight``) as a whole word, or an undotted one followed by `` (``
    (the library's ``name (Class)`` style), so that words such as "model" or "encoder" alone do not count."""
    for name in sorted(model_names(model), key=len, reverse=True):
        word = rf"(?<![\w.]){re.escape(name)}"
        if re.search(word + (r"(?!\w)" if "." in name else r" \("), message):
            return name
    return None


@dataclass
class Outcome:
    kind: str  # equal | refused | vague | silent | crash
    rel: float | None = None
    message: str = ""
    exc_type: str = ""
    where: str = ""  # the traceback's last frame, file:line
    named: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.kind in ("equal", "refused")

    def cell(self) -> str:
        if self.kind == "equal":
            return f"equal {self.rel:.1e}"
        if self.kind == "silent":
            return f"**SILENT** {self.rel:.1e}"
        msg = " ".join(self.message.split())[:100].replace("|", "\\|")
        if self.kind == "refused":
            return f"refused: {msg}"
        if self.kind == "vague":
            return f"**VAGUE** {self.exc_type}: {msg}"
        return f"**CRASH** {self.exc_type} at {self.where}: {msg}"


def _last_frame(exc: BaseException) -> tuple[str, str]:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "", ""
    last = frames[-1]
    return last.filename, f"{_short(last.filename)}:{last.lineno}"


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("lightning_deltasam", "transformers", "torch"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return Path(filename).name


def run_case(name: str, mode: str, rho: float = RHO) -> Outcome:
    """Build zoo[name] twice (identical seeds): the loop on one, the library's step on the other; classify."""
    start = time.perf_counter()
    model, batch, loss_fn = ZOO[name]()
    try:
        got = library_step(mode, model, loss_fn, batch, rho)
    except Exception as exc:  # noqa: BLE001 - classified below
        filename, where = _last_frame(exc)
        from_library = bool(filename) and Path(filename).resolve().is_relative_to(library_dir())
        named = names_model_part(str(exc), model)
        kind = "refused" if from_library and isinstance(exc, REFUSAL_TYPES) and named else "vague"
        if not from_library:
            kind = "crash"
        return Outcome(kind, None, str(exc), type(exc).__name__, where, named, time.perf_counter() - start)
    model, batch, loss_fn = ZOO[name]()  # fresh weights: the reference must not see anything the step left
    want = reference(mode, model, loss_fn, batch, rho)
    err = rel_error(got, want)
    return Outcome("equal" if err <= TOLERANCE else "silent", err, seconds=time.perf_counter() - start)
