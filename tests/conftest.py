import os

import numpy as np
import pytest
import torch
from PIL import Image
from references import spread_weights  # also imported from here by the test files

from mlmamba.convert import random_model, save_folder

# The python of a virtual environment with transformers 4.57, as `nox -s transformers4` sets it (absolute: the
# tests run it from other folders). Tests marked `transformers4` run against it, and skip where it is not set.
TRANSFORMERS4_PYTHON = (
    os.path.abspath(os.environ["MLMAMBA_TRANSFORMERS4_PYTHON"])
    if os.environ.get("MLMAMBA_TRANSFORMERS4_PYTHON")
    else None
)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs transformers 4.57 beside: `nox -s transformers4` runs it")
    for item in items:
        if "transformers4" in item.keywords and TRANSFORMERS4_PYTHON is None:
            item.add_marker(skip)


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


FAMILIES = ["mlmamba-tiny", "cobra-tiny", "vlmamba-tiny"]  # Mamba-2 + MSC, Mamba-1 + MLP, Mamba-1 + VSS (CSM)


def unit_scale_model(preset: str):
    """A family's tiny model (eval mode) and processor, with language model and connector weights at unit scale."""
    model, processor = random_model(preset, seed=0)
    spread_weights(model.model.language_model, seed=1)
    spread_weights(model.model.connector, seed=2)
    return model.eval(), processor


@pytest.fixture(scope="session", params=FAMILIES)
def family(request):
    """Each model family at its tiny size, with language model and connector weights at unit scale."""
    return unit_scale_model(request.param)


@pytest.fixture(scope="session")
def family_folder(family, tmp_path_factory):
    """`family` saved as a complete model folder."""
    model, processor = family
    return save_folder(model, processor, tmp_path_factory.mktemp("family"))
