"""Folders written by mlmamba 0.1.0's converter (tests/data/legacy-0.1.0, weights at unit scale, code files
removed) load into this version's classes with every weight accounted for, and give the logits and greedy
tokens they gave when they were written."""

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import mlmamba  # noqa: F401  (registers the classes with the Auto classes)

LEGACY = Path(__file__).parent / "data" / "legacy-0.1.0"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_folder_from_0_1_0_loads_and_answers_as_it_did(family):
    folder = LEGACY / family
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert type(model).__module__.startswith("mlmamba.")
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    AutoProcessor.from_pretrained(folder)  # the processor files load too
    expected = load_file(folder / "expected.safetensors")
    inputs = {"input_ids": expected["input_ids"], "pixel_values": expected["pixel_values"]}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, expected["logits"], atol=1e-5, rtol=1e-5)
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(generated, expected["generated"], atol=0, rtol=0)
