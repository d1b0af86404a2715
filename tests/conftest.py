import numpy as np
import pytest
import torch
from PIL import Image

from mlmamba.convert import random_model, save_folder


@pytest.fixture(scope="session")
def tiny():
    """A random tiny ML-Mamba (fp32, eval mode) and its processor."""
    torch.manual_seed(0)
    model, processor = random_model("mlmamba-tiny", seed=0)
    return model, processor


@pytest.fixture(scope="session")
def tiny_folder(tiny, tmp_path_factory):
    """The tiny model saved as a complete model folder (weights, processor, code files)."""
    model, processor = tiny
    return save_folder(model, processor, tmp_path_factory.mktemp("mlmamba-tiny"))


def make_image(seed: int, size=(50, 60)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype("uint8"))


def chat_inputs(processor, question: str, image=None, answer: str | None = None, generation_prompt=True):
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
        generation_prompt = False
    prompt = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return processor(images=image, text=prompt)
