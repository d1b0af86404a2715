"""Fine-tuning helpers for TRL's `SFTTrainer` and PEFT.

    sft_config(output_dir, **overrides)     SFTConfig with the released recipe and loss on assistant replies only
    default_lora_config(...)                 peft.LoraConfig: LoRA on the mixers' and connector's linears,
                                             the projector trained fully (modules_to_save); never a conv
    merge_and_save(model, processor, dir)    merge a LoRA model into its base and write a model folder

A small real task to check that training works, scikit-learn's digits, is in `mlmamba.digits`.

Datasets for SFTTrainer follow the format TRL documents for vision-language models: an `images` column (a list of
images per row) and a `messages` column whose user turn holds `{"type": "image"}` placeholders. TRL's
`DataCollatorForVisionLanguageModeling` turns them into `input_ids`, `pixel_values` and `labels`; with
`assistant_only_loss=True` the labels keep only the tokens the chat template marks with `{% generation %}`:
the assistant replies and their `<|endoftext|>`.

trl and peft are imported where they are used, so importing this module needs neither of them
(`pip install "mlmamba[train]"` installs them).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

# ML-Mamba's released fine-tuning recipe (prismatic's "finetune" stage): AdamW, lr 2e-5, weight decay 0.1,
# warmup over the first 3% of steps, then cosine decay. transformers 5 takes a warmup fraction < 1 in
# `warmup_steps` (it has no `warmup_ratio`).
RELEASED_RECIPE = dict(learning_rate=2e-5, weight_decay=0.1, warmup_steps=0.03, lr_scheduler_type="cosine")


def bf16_supported() -> bool:
    """bf16 mixed precision where the hardware does it natively (CUDA with bf16); fp32 elsewhere."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def checkpointing_field() -> str:
    """The TrainingArguments field that turns on gradient checkpointing: `activation_checkpointing` since
    transformers 5.24 (where the old name warns that it is deprecated), `gradient_checkpointing` before."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def sft_config(output_dir: str, **overrides):
    """A `trl.SFTConfig` for ML-Mamba: the released recipe (`RELEASED_RECIPE`), loss on assistant replies
    only, bf16 where supported, gradient checkpointing on (TRL's default), no reporting integrations.
    Keyword arguments override any field."""
    from trl import SFTConfig

    defaults = dict(
        RELEASED_RECIPE,
        assistant_only_loss=True,
        bf16=bf16_supported(),
        report_to=[],
        **{checkpointing_field(): True},
    )
    return SFTConfig(output_dir=output_dir, **{**defaults, **overrides})


# --------------------------------------------------------------------------------------
# PEFT LoRA
# --------------------------------------------------------------------------------------

# Module names inside MLMambaForConditionalGeneration (the names PEFT matches, with or without the
# PeftModel's `base_model.model.` prefix). The mixers' depthwise conv1d / conv1d_b are never targets:
# they are (channels, 1, kernel) weights with nothing for a low-rank update to factor.
_MIXER_LINEARS = r"mixer\.(?:in_proj|out_proj)"
LORA_TARGET_MODULES = (
    r"(?:.*\.)?model\.(?:"
    rf"language_model\.layers\.\d+\.{_MIXER_LINEARS}"  # the language model's Mamba-2 / Mamba-1 mixers
    r"|connector\.mlp\.0"  # the connector's input Linear (vision features -> connector width)
    rf"|connector\.msc\.layers\.\d+\.(?:{_MIXER_LINEARS}|mlp\.w[123])"  # MSC: mixers and SwiGLUs
    rf"|connector\.vss\.layers\.\d+\.{_MIXER_LINEARS}"  # VSS: mixers
    r")"
)
LORA_PROJECTOR_TARGETS = r"|connector\.projector(?:\.[024])?"  # one Linear (VSS-L2) or a Sequential's Linears


def default_lora_config(
    r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, train_projector: bool = True, **kwargs
):
    """A `peft.LoraConfig` for ML-Mamba, Cobra and VL-Mamba.

    LoRA adapters go on the mixers' `in_proj` and `out_proj` (language model, MSC or VSS), the connector's
    input Linear and the MSC's SwiGLU Linears. Never on the depthwise convs, the
    embedding / tied `lm_head`, or the vision tower. The projector (the three Linears that map the connector
    into the language model's embedding space) is trained fully through `modules_to_save` when
    `train_projector` (the default: it is small, and it is what adapts most to new image data); otherwise it
    gets LoRA adapters like the other Linears. Keyword arguments go to `LoraConfig`.
    """
    from peft import LoraConfig

    targets = LORA_TARGET_MODULES
    modules_to_save = kwargs.pop("modules_to_save", None)
    if train_projector:
        modules_to_save = list(modules_to_save or []) + ["projector"]
    else:
        targets = targets[:-1] + LORA_PROJECTOR_TARGETS + ")"
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def lora_target_names(model, config=None) -> list[str]:
    """The module names of `model` that `config` (default: `default_lora_config()`) puts LoRA adapters on."""
    pattern = config.target_modules if config is not None else LORA_TARGET_MODULES
    if not isinstance(pattern, str):
        raise TypeError("lora_target_names expects a LoraConfig whose target_modules is a regular expression")
    return [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]


def merge_and_save(model, processor, output_dir: str | Path) -> Path:
    """Merge a PEFT LoRA model into its base weights and write a complete model folder (weights, processor,
    code files) that loads with `trust_remote_code=True`, without peft. Returns the folder."""
    from .convert import save_folder

    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    return save_folder(merged, processor, output_dir)
