"""Folders saved under transformers 5 load and generate under the last 4.x line (AutoModelForVision2Seq).

Runs when MLMAMBA_TRANSFORMERS4_PYTHON names the python of a virtual environment with
transformers 4.57, as `nox -s transformers4` does; skipped otherwise."""

import json
import subprocess
import textwrap

import pytest
import torch
from conftest import TRANSFORMERS4_PYTHON, chat_inputs, make_image

_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from transformers import AutoModelForVision2Seq, AutoProcessor
    folder, inputs_path, out_path = sys.argv[1:4]
    model = AutoModelForVision2Seq.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = torch.load(inputs_path, weights_only=True)
    again = processor(images=inputs.pop("image_array"), text=inputs.pop("prompt"))
    with torch.no_grad():
        result = {
            "logits": model(**inputs).logits,
            "same_processing": torch.equal(again["input_ids"], inputs["input_ids"])
            and torch.allclose(again["pixel_values"], inputs["pixel_values"]),
            "cached": model.generate(**inputs, max_new_tokens=8, do_sample=False),
            "uncached": model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False),
            "beams": model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False),
        }
    torch.save(result, out_path)
    print(json.dumps({"transformers": transformers.__version__}))
    """
)


@pytest.mark.transformers4
def test_transformers4_loads_and_generates_the_same(family, family_folder, tmp_path):
    model, processor = family
    image = make_image(12)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}],
        add_generation_prompt=True,
    )
    inputs = dict(chat_inputs(processor, "Which digit is this?", image))
    import numpy as np

    torch.save(
        {**inputs, "image_array": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), "prompt": prompt},
        tmp_path / "inputs.pt",
    )
    (tmp_path / "run.py").write_text(_SCRIPT)
    run = subprocess.run(
        [
            TRANSFORMERS4_PYTHON,
            str(tmp_path / "run.py"),
            str(family_folder),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["transformers"].startswith("4.")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["same_processing"]
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(**inputs).logits, atol=0, rtol=0)
        torch.testing.assert_close(out["cached"], model.generate(**inputs, max_new_tokens=8, do_sample=False))
    torch.testing.assert_close(out["cached"], out["uncached"])
    assert out["beams"].shape[1] == inputs["input_ids"].shape[1] + 6
