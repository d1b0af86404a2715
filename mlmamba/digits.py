"""The digits task: scikit-learn's 8x8 handwritten digits, upscaled, and "Which digit is this?".

A small real task that checks that training works: a random mlmamba-tiny learns it from scratch offline
(scikit-learn ships the images), so tests, examples and the demo can train and measure a model quickly.

    digits_dataset(split, image_size)        the digits as conversational image data for SFTTrainer
    digits_accuracy(model, processor, data)  greedy answers to "Which digit is this?", and their accuracy
    DIGITS_RECIPE                            SFTConfig fields that train a random mlmamba-tiny on it

The dataset has the format TRL documents for vision-language models (see `mlmamba.training`). datasets
and scikit-learn are imported where they are used, so importing this module needs neither of them.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Training a random mlmamba-tiny from scratch: a fine-tuning learning rate would take thousands of steps;
# this one, with large batches, reads held-out digits far above chance after a few hundred. At 3e-3 the
# result hung on the seed and the CPU's arithmetic (8% to 92%, docs/TESTING.md); 1e-3 learned every time.
DIGITS_RECIPE = dict(
    learning_rate=1e-3,
    weight_decay=0.1,
    warmup_steps=0.03,
    lr_scheduler_type="cosine",
    max_steps=400,
    per_device_train_batch_size=32,
)

DIGITS_QUESTION = "Which digit is this?"
# sklearn's 1797 digits, shuffled once with this seed: the first 1500 train, the other 297 are held out.
_DIGITS_SEED = 0
_DIGITS_TRAIN = 1500


def digit_image(pixels: np.ndarray, image_size: int = 42) -> Image.Image:
    """An 8x8 digit (values 0-16, ink high) -> an RGB image of image_size x image_size, dark ink on white
    paper, upscaled with nearest-neighbour sampling (block pixels, no blur)."""
    gray = (255 - np.asarray(pixels, dtype=np.float32) * (255 / 16)).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((image_size, image_size), Image.NEAREST).convert("RGB")


def digits_messages(answer: int | str | None = None, question: str = DIGITS_QUESTION) -> list[dict]:
    """The conversation for one digit: the image and the question, then the answer when given."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    return messages


def digits_dataset(split: str = "train", image_size: int = 42, limit: int | None = None):
    """scikit-learn's digits (shipped with the package, no download) as a `datasets.Dataset` for SFTTrainer.

    Columns: `images` (one PIL image per row), `messages` (user: image + "Which digit is this?", assistant:
    the digit, e.g. "7") and `label` (the digit as an int). `split` is "train" (1500 images) or "test" (297
    held-out images); the split is fixed. `limit` keeps the first rows only.
    """
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; use 'train' or 'test'")
    digits = load_digits()
    order = np.random.RandomState(_DIGITS_SEED).permutation(len(digits.target))
    order = order[:_DIGITS_TRAIN] if split == "train" else order[_DIGITS_TRAIN:]
    if limit is not None:
        order = order[:limit]
    rows = {
        "images": [[digit_image(digits.images[i], image_size)] for i in order],
        "messages": [digits_messages(int(digits.target[i])) for i in order],
        "label": [int(digits.target[i]) for i in order],
    }
    message = {"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}
    features = Features({"images": List(ImageFeature()), "messages": List(message), "label": Value("int64")})
    return Dataset.from_dict(rows, features=features)


@torch.no_grad()
def digits_answers(model, processor, dataset, batch_size: int = 64, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers of `model` to the dataset's questions (the assistant turns are dropped)."""
    was_training = model.training
    model.eval()
    prompt = processor.apply_chat_template(digits_messages(), add_generation_prompt=True)
    answers = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            images = [row[0] for row in rows["images"]]
            inputs = processor(images=images, text=[prompt] * len(images), padding=True).to(model.device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]


def digits_accuracy(model, processor, dataset, **kwargs) -> tuple[float, list[str]]:
    """(fraction of exactly right answers, the answers) on a `digits_dataset`."""
    answers = digits_answers(model, processor, dataset, **kwargs)
    correct = sum(answer == str(label) for answer, label in zip(answers, dataset["label"]))
    return correct / len(answers), answers
