"""The model side of training: device and precision, LoRA or full, and the
forward pass that yields the logits over the rating scale at each answer position.

Only the rating tokens' logits are computed: the decoder runs over the batch,
the final hidden state is gathered at each example's answer position, and the
output head is applied to those rows only (a full-vocabulary head over every
position of a 4k-token packed row would cost ~0.8 GB per row for SmolLM2's
49k vocabulary). This assumes logits = lm_head(final hidden state), true for the
Llama/Qwen/Mistral families (not for models with logit soft-capping).
"""

from __future__ import annotations

import logging
from pathlib import Path

from siren_batch.backends.device import cpu_has_bf16, is_cuda
from siren_batch.config import TrainConfig

logger = logging.getLogger(__name__)


def use_bf16(dtype: str, device: str) -> bool:
    """bf16 autocast: dtype=bfloat16, or dtype=auto on CUDA and on CPUs with native bf16.
    Master weights, optimizer state and the loss stay fp32 either way."""
    if dtype == "bfloat16":
        return True
    if dtype == "float32":
        return False
    return is_cuda(device) or cpu_has_bf16()


def autocast(device: str, bf16: bool):
    import torch

    return torch.autocast(device_type="cuda" if is_cuda(device) else "cpu",
                          dtype=torch.bfloat16, enabled=bf16)


def build_model(cfg: TrainConfig, path: str, device: str):
    """fp32 model with LoRA adapters on cfg.lora_targets (only they train), or every
    weight trainable (method=full); with cfg.gradient_checkpointing each decoder layer
    recomputes its activations in backward (non-reentrant: frozen inputs need no grad hook)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)   # LoRA A matrices are drawn here: same seed, same start
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    model.config.use_cache = False
    return model.to(device).train()


def trainable_params(model) -> dict:
    """name -> parameter for every parameter that trains, in a stable order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def core_model(model):
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mask_kind(model) -> str | None:
    """How a packed batch's 4D mask must be given: bool for SDPA, additive for eager;
    None when the attention implementation takes no custom 4D mask (packing off)."""
    impl = getattr(core_model(model).config, "_attn_implementation", "eager") or "eager"
    return {"sdpa": "bool", "eager": "additive"}.get(impl)


def head_logits(core, hidden, rating_ids: list[int]):
    """float32 logits of the rating tokens from final hidden states [n, H], autocast or not
    (a bf16 head rounds SmolLM2's rating logits, ~27, to steps of 0.125), from the head's five
    rating rows only. A head that is not a plain Linear (one LoRA wraps) runs as it is,
    upcast after."""
    import torch

    head = core.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return head(hidden)[:, rating_ids].float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = hidden.float() @ head.weight[rating_ids].float().T
        return logits if head.bias is None else logits + head.bias[rating_ids].float()


def rating_logits(model, batch, rating_ids: list[int]):
    """Logits over the rating scale [n, 5] at each example's answer position (batch order)."""
    core = core_model(model)
    hidden = core.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False).last_hidden_state
    return head_logits(core, hidden[batch.gather_row, batch.gather_col], rating_ids)


def answer_states(model, batch, rating_ids: list[int]):
    """(states [n, L, H], rating logits [n, 5]) at each example's answer position: the
    output of every decoder layer (l = 1..L; the last one after the final norm, as
    transformers returns it) and the logits over the rating scale. Stage 2's teacher
    and student both read here, so their states are taken the same way."""
    import torch

    core = core_model(model)
    out = core.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False, output_hidden_states=True)
    states = torch.stack([h[batch.gather_row, batch.gather_col] for h in out.hidden_states[1:]], dim=1)
    return states, head_logits(core, states[:, -1], rating_ids)


def save_model(model, tokenizer, folder: Path, method: str) -> None:
    """LoRA: the adapter only (peft format, `score.adapter=<folder>`); full: a plain HF
    folder with the tokenizer (`score.model=<folder>`)."""
    model.save_pretrained(folder)
    if method == "full":
        tokenizer.save_pretrained(folder)
