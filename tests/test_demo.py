"""examples/demo.py, the README's demo command: build, train (a few steps here), save, reload, ask, measure."""

import importlib.util
import re
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("mlmamba_demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_trains_saves_reloads_and_answers(demo, tmp_path, capsys):
    out = tmp_path / "digits"
    demo.main(["--steps", "3", "--output", str(out), "--index", "5"])
    printed = capsys.readouterr().out
    # every stage reports, in order: build, train, save + reload, the question about one held-out digit, accuracy
    stages = [
        r"1\. built a random-weight mlmamba-tiny: [\d.]+M parameters",
        r"2\. fine-tuning it with TRL's SFTTrainer on 1500 of scikit-learn's digits \(42 px\): 3 steps of 32",
        rf"3\. trained in \d+ s; saved the model folder to {re.escape(str(out))}",
        r"4\. held-out digit #5 \(of 297 never used in training\):\n(    [ .:\-=+*#%@]{16}\n){8}",
        r"Q: Which digit is this\?\nA: .*\ntrue digit: \d  \((right|wrong)\)",
        r"held-out accuracy: \d+\.\d% of 297 digits answered right \(chance: 10%\)",
        r"total time: \d+ s",
    ]
    position = 0
    for stage in stages:
        match = re.compile(stage).search(printed, position)
        assert match, f"missing or out of order: {stage!r}\n{printed}"
        position = match.end()
    # a complete folder, loadable the way the demo loaded it
    assert (out / "model.safetensors").exists() and (out / "modeling_mlmamba.py").exists()
    assert (out / "chat_template.jinja").exists() or (out / "processor_config.json").exists()
    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
