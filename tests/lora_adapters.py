"""Random, non-zero LoRA adapters for the demo model, built offline with ``peft`` (PEFT's format).

``init_lora_weights=False`` draws both LoRA matrices at random (PEFT's default zeroes B, which leaves
the output unchanged), so each adapter visibly changes greedy output.
"""

from __future__ import annotations

from pathlib import Path


def build_adapter(
    base: Path,
    out: Path,
    seed: int,
    rank: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """Write a PEFT LoRA adapter for the model at ``base`` into ``out``; return ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # scaled up so that a tiny random model's greedy output surely changes
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(str(out))
    return out
