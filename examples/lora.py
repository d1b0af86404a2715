"""LoRA fine-tuning of an ML-Mamba model with TRL's SFTTrainer and PEFT, then merge and save.

    python examples/lora.py                      # a random mlmamba-tiny on scikit-learn's digits, offline
    python examples/lora.py --model PATH_OR_HUB_ID --dataset HF_DATASET --output_dir my-lora

Adapters go on the Mamba-2 mixers' in_proj / out_proj (language model and scan connector) and the
connector's linears; the projector into the language model trains fully (`modules_to_save`); the
depthwise convs, embeddings and the frozen vision tower are left alone (`mlmamba.training.default_lora_config`).
After training, the adapters are merged into the base weights and written as an ordinary model folder
(`<output_dir>/merged`) that loads with `trust_remote_code=True` and no peft. Flags: those of sft.py plus
--lora_r, --lora_alpha, --lora_dropout.
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, HfArgumentParser
from trl import SFTTrainer

from mlmamba.digits import digits_accuracy
from mlmamba.training import default_lora_config, merge_and_save

# isort: split
# sft.py, next to this script: `python examples/lora.py` puts examples/ first on sys.path
from sft import load_model_and_data, parse_args


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "adapter rank"})
    lora_alpha: int = field(default=32, metadata={"help": "adapter scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05)


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else argv
    lora_parser = HfArgumentParser(LoraArguments)
    lora_args, rest = lora_parser.parse_known_args(argv)
    (lora,) = lora_parser.parse_dict(vars(lora_args))
    script, config = parse_args(rest)
    model, processor, train, test = load_model_and_data(script)

    peft_config = default_lora_config(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout)
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train, processing_class=processor, peft_config=peft_config
    )
    trainer.model.print_trainable_parameters()
    trainer.train()
    if not trainer.is_world_process_zero():
        return
    trainer.save_model(config.output_dir)  # the adapter alone (adapter_model.safetensors)

    merged_dir = merge_and_save(trainer.model, processor, f"{config.output_dir}/merged")
    print(f"adapter saved to {config.output_dir}, merged model folder to {merged_dir}")
    if test is not None:
        merged = AutoModelForImageTextToText.from_pretrained(merged_dir, trust_remote_code=True).eval()
        accuracy, _ = digits_accuracy(merged, processor, test)
        print(f"merged model, held-out digits: {accuracy:.1%} answered right (chance: 10%)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
