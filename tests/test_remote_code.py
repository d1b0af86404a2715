"""A saved folder loads with trust_remote_code=True in a process where `mlmamba` cannot be imported,
through the Auto classes and transformers' pipeline, and gives identical results."""

import json
import subprocess
import sys
import textwrap

import torch
from conftest import chat_inputs, make_image

# Runs in a fresh interpreter that refuses to import mlmamba, as on a machine without the package.
_LOADER = textwrap.dedent(
    """
    import sys
    class _NoMLMamba:
        def find_spec(self, name, path=None, target=None):
            if name == "mlmamba" or name.startswith("mlmamba."):
                raise ImportError("mlmamba is hidden in this process")
    sys.meta_path.insert(0, _NoMLMamba())

    import json
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder, inputs_path, out_path = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert "mlmamba" not in sys.modules
    inputs = torch.load(inputs_path, weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    # pipeline with a chat message and an image
    from PIL import Image
    image = Image.open(sys.argv[4])
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    question = {"type": "text", "text": "Which digit is this?"}
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, question]}]
    answer = pipe(text=messages, max_new_tokens=6, do_sample=False, return_full_text=False)
    torch.save({"logits": logits, "generated": generated}, out_path)
    classes = [type(model).__module__, type(processor).__module__]
    print(json.dumps({"classes": classes, "answer": answer[0]["generated_text"]}))
    """
)


def test_folder_loads_without_the_package(family, family_folder, tmp_path):
    model, processor = family
    files = {p.name for p in family_folder.iterdir()}
    code = {
        "configuration_mlmamba.py",
        "modeling_mlmamba.py",
        "vision_tower.py",
        "connectors.py",
        "language_model.py",
        "cache.py",
        "ssm_ops.py",
        "kernels.py",
        "mamba2_mixer.py",
        "mamba1_mixer.py",
        "_compat.py",
        "processing_mlmamba.py",
        "image_processing_mlmamba.py",
    }
    assert {p.name for p in family_folder.glob("*.py")} == code  # every module the code imports, nothing else
    for name in ("config.json", "model.safetensors", "chat_template.jinja", "tokenizer.json", "processor_config.json"):
        assert name in files, name
    auto_map = json.loads((family_folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == auto_map["AutoModelForVision2Seq"]

    image = make_image(11)
    image_path = tmp_path / "digit.png"
    image.save(image_path)
    inputs = dict(chat_inputs(processor, "Which digit is this?", image))
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            str(family_folder),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
            str(image_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(m.startswith("transformers_modules.") for m in report["classes"]), report

    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(**inputs).logits, atol=0, rtol=0)
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(remote["generated"], generated)
    # the pipeline answered with exactly what generate() produces for the same chat
    expected = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert report["answer"] == expected
