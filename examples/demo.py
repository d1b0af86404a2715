"""Train an ML-Mamba model to read handwritten digits, offline, then ask it about one it has never seen.

    python examples/demo.py                                  # a few minutes on two CPU cores
    python examples/demo.py --steps 100 --output my-digits   # shorter training, keep the model folder

The whole path runs here, with no download:
  1. build a random-weight `mlmamba-tiny` model (what `python -m mlmamba.convert --random` writes);
  2. fine-tune it with TRL's SFTTrainer on 1500 of scikit-learn's handwritten digits, in TRL's
     vision-language format ("Which digit is this?" -> "7"), loss on the answers only;
  3. save the model folder and load it back the way users load any model
     (AutoModelForImageTextToText / AutoProcessor, trust_remote_code=True);
  4. ask "Which digit is this?" about a held-out digit, and measure the accuracy on all 297 held-out digits.

To chat with the trained folder, or any other model, afterwards: `mlmamba-chat FOLDER --image FILE`.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer


def load(path, device: str, dtype: torch.dtype):
    """A model folder or Hub id, loaded the way users load it."""
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model, processor


def ask(model, processor, image: Image.Image, question: str, max_new_tokens: int) -> str:
    """Print the question, stream the greedy answer, and return it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)

    print(f"Q: {question}\nA: ", end="", flush=True)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def ascii_digit(image: Image.Image) -> str:
    """The digit as text: back to its 8 x 8 grid, ink shaded from ' ' (none) to '@' (full)."""
    ink = 255 - np.asarray(image.convert("L").resize((8, 8), Image.NEAREST), dtype=np.float32)
    shades = " .:-=+*#%@"
    return "\n".join("    " + "".join(shades[int(v / 256 * len(shades))] * 2 for v in row) for row in ink)


def train_and_ask(args) -> None:
    from trl import SFTTrainer

    from mlmamba.convert import random_model, save_folder
    from mlmamba.digits import DIGITS_QUESTION, DIGITS_RECIPE, digits_accuracy, digits_dataset
    from mlmamba.training import sft_config

    start = time.perf_counter()
    model, processor = random_model("mlmamba-tiny", seed=args.seed)
    size = sum(p.numel() for p in model.parameters())
    print(f"1. built a random-weight mlmamba-tiny: {size / 1e6:.2f}M parameters, answers are noise so far")

    image_size = processor.image_processor.image_size
    train, test = digits_dataset("train", image_size), digits_dataset("test", image_size)
    recipe = dict(DIGITS_RECIPE, max_steps=args.steps)
    print(
        f"2. fine-tuning it with TRL's SFTTrainer on {len(train)} of scikit-learn's digits ({image_size} px): "
        f"{args.steps} steps of {recipe['per_device_train_batch_size']}, lr {recipe['learning_rate']:g}, "
        "loss on the answers only",
        flush=True,
    )
    output = args.output or tempfile.mkdtemp(prefix="mlmamba-digits-")
    config = sft_config(
        output,
        **recipe,
        save_strategy="no",
        logging_steps=max(1, args.steps // 5),
        seed=args.seed,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=processor)
    trained_at = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - trained_at

    save_folder(trainer.model, processor, output)
    print(f"3. trained in {train_s:.0f} s; saved the model folder to {output}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load(output, device, torch.float32)
    print("   and loaded it back: AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)")

    row = test[args.index]
    image, label = row["images"][0], row["label"]
    print(f"\n4. held-out digit #{args.index} (of {len(test)} never used in training):\n{ascii_digit(image)}")
    answer = ask(model, processor, image, DIGITS_QUESTION, max_new_tokens=3)
    print(f"true digit: {label}  ({'right' if answer == str(label) else 'wrong'})")

    accuracy, _ = digits_accuracy(model, processor, test)
    print(f"\nheld-out accuracy: {accuracy:.1%} of {len(test)} digits answered right (chance: 10%)")
    print(f"total time: {time.perf_counter() - start:.0f} s")
    print(f'chat with it: mlmamba-chat {output} --image IMAGE --question "{DIGITS_QUESTION}"')


def main(argv=None):
    from mlmamba.digits import DIGITS_RECIPE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=DIGITS_RECIPE["max_steps"], help="training steps (default: %(default)s)"
    )
    parser.add_argument("--output", help="where to save the trained model folder (default: a new temporary folder)")
    parser.add_argument("--index", type=int, default=0, help="which held-out digit to ask about (0-296)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the training order")
    train_and_ask(parser.parse_args(argv))


if __name__ == "__main__":
    main()
