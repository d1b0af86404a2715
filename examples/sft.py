"""Fine-tune an ML-Mamba model with TRL's SFTTrainer (full fine-tuning; see lora.py for LoRA).

    python examples/sft.py                       # a random mlmamba-tiny learns scikit-learn's digits, offline
    python examples/sft.py --model PATH_OR_HUB_ID --dataset HF_DATASET --output_dir my-model

Every `trl.SFTConfig` field is a flag (--learning_rate, --per_device_train_batch_size, --max_steps,
--gradient_accumulation_steps, --bf16, ...). Defaults: the released recipe (lr 2e-5, weight decay 0.1,
3% warmup, cosine), loss on assistant replies only, gradient checkpointing, bf16 where supported. Without
--model a random tiny model is trained from scratch, with a learning rate and step count that suit it.

The dataset has TRL's vision-language format: an `images` column (a list of images per row) and a
`messages` column whose user turns hold `{"type": "image"}` placeholders; `--dataset digits` (the
default) builds one from scikit-learn's handwritten digits. The vision tower stays frozen unless the
model's config says `freeze_vision_tower: false`.

Several processes (DDP, FSDP) go through accelerate, unchanged:

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/sft.py --model PATH ...
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/sft.py --model PATH ...
"""

import sys
import tempfile
from dataclasses import dataclass, field

from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from mlmamba.digits import DIGITS_RECIPE, digits_accuracy, digits_dataset
from mlmamba.training import RELEASED_RECIPE, bf16_supported, checkpointing_field


@dataclass
class ScriptArguments:
    model: str | None = field(
        default=None, metadata={"help": "model folder or Hub id; default: a random mlmamba-tiny"}
    )
    dataset: str = field(
        default="digits", metadata={"help": "'digits', or a datasets name / folder with images + messages"}
    )
    dataset_split: str = field(default="train", metadata={"help": "split of --dataset to train on"})


def build_tiny_model() -> str:
    """A random-weight mlmamba-tiny folder (what `python -m mlmamba.convert --random` writes)."""
    from mlmamba.convert import random_model, save_folder

    path = tempfile.mkdtemp(prefix="mlmamba-tiny-")
    save_folder(*random_model("mlmamba-tiny"), path)
    return path


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    from_scratch = "--model" not in argv and not any(a.startswith("--model=") for a in argv)
    parser.set_defaults(
        output_dir="mlmamba-sft",
        assistant_only_loss=True,
        bf16=bf16_supported(),
        report_to="none",
        save_strategy="no",
        logging_steps=25,
        **(DIGITS_RECIPE if from_scratch else RELEASED_RECIPE),
        **{checkpointing_field(): True},
    )
    return parser.parse_args_into_dataclasses(args=argv)


def load_model_and_data(script: ScriptArguments):
    """(model, processor, train, test) for the script's --model and --dataset. `test` is the held-out digits
    for `--dataset digits` (sized to the model's images) and None for any other dataset."""
    path = script.model or build_tiny_model()
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    if script.dataset == "digits":
        image_size = processor.image_processor.image_size
        return model, processor, digits_dataset("train", image_size), digits_dataset("test", image_size)
    from datasets import load_dataset

    return model, processor, load_dataset(script.dataset, split=script.dataset_split), None


def main(argv=None):
    script, config = parse_args(argv)
    model, processor, train, test = load_model_and_data(script)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor)
    trainer.train()
    trainer.save_model(config.output_dir)  # weights, processor and code files: loads with trust_remote_code=True
    state = trainer.accelerator.state
    if not trainer.is_world_process_zero():
        return
    wrapped = type(trainer.model_wrapped).__name__
    processes = f"{state.num_processes} process(es), {state.distributed_type.value} ({wrapped})"
    print(f"trained with {processes}; saved to {config.output_dir}")
    if test is not None:  # the saved folder, loaded as users load it
        saved = AutoModelForImageTextToText.from_pretrained(config.output_dir, trust_remote_code=True)
        accuracy, _ = digits_accuracy(saved, processor, test)
        print(f"held-out digits: {accuracy:.1%} answered right (chance: 10%)")


if __name__ == "__main__":
    main()
