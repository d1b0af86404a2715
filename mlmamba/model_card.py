"""The model card (README.md) of a converted folder: Hub metadata, the family's paper, usage, conversion notes."""

from pathlib import Path

PAPERS = {
    "mlmamba": ("ML-Mamba", "Huang & Hu", "2407.19832"),
    "cobra": ("Cobra", "Zhao et al.", "2403.14520"),
    "vlmamba": ("VL-Mamba", "Qiao et al.", "2403.13600"),
}
FAMILY_SUMMARY = {
    "mlmamba": "a Mamba-2 language model that sees images through DINOv2 + SigLIP features and the Mamba-2 Scan "
    "Connector (MSC). It builds on Cobra and VL-Mamba.",
    "cobra": "a Mamba-1 language model (Mamba-2.8B-Zephyr) that sees images through DINOv2 + SigLIP features and a "
    "fused MLP projector. ML-Mamba builds on it with a Mamba-2 language model.",
    "vlmamba": "a Mamba-1 language model that sees images through a Vision Selective Scan (VSS) connector. VL-Mamba "
    "released neither code nor weights: this architecture is the mlmamba package's reading of the paper.",
}
FAMILY_TAGS = {"mlmamba": ["mamba2", "ml-mamba"], "cobra": ["cobra"], "vlmamba": ["vl-mamba"]}
RELEASES = {"mlmamba": ("ML-Mamba 3B", "huangwenjun1994/ML-Mamba"), "cobra": ("Cobra 3B", "han1997/cobra")}


def _paper(family: str) -> str:
    name, authors, arxiv = PAPERS[family]
    return f"{name} ({authors}, [arXiv:{arxiv}](https://arxiv.org/abs/{arxiv}))"


def write_model_card(
    output: Path,
    title: str,
    base_models: list[str],
    notes: list[str],
    license: str = "mit",
    family: str = "mlmamba",
    name: str | None = None,
) -> None:
    """README.md in `output` with Hub metadata: license, base models (Hub ids only), the family's paper and tags.
    The usage snippet loads `name` (default: the folder's name; a folder written under a temporary name gives
    its final one)."""
    from huggingface_hub import ModelCard, ModelCardData

    base_models = [b for b in base_models if not Path(b).exists()]  # Hub ids only, never local paths
    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_models or None,
        tags=["mamba", *FAMILY_TAGS[family], "state-space-model", "custom_code", f"arxiv:{PAPERS[family][2]}"],
    )
    snippet = f'''```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

MODEL = "{name or Path(output).name}"  # this folder, or its Hub id
model = AutoModelForImageTextToText.from_pretrained(MODEL, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(MODEL, trust_remote_code=True)

image = Image.new("RGB", (384, 384), (200, 30, 30))
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt)
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```'''
    body = "\n".join(
        [
            "---",
            data.to_yaml(),
            "---",
            f"# {title}",
            "",
            f"{_paper(family)}: {FAMILY_SUMMARY[family]} Converted with the mlmamba package into a transformers model "
            "(`trust_remote_code=True`). Related: " + ", ".join(_paper(f) for f in PAPERS if f != family) + ".",
            "",
            "## Usage",
            "",
            snippet,
            "",
            "Generation keeps a constant-size state cache (no KV cache). Prompts follow the Zephyr format of the "
            "chat template; images go before the text, as in training.",
            "",
            "## Conversion notes",
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    ModelCard(body).save(Path(output) / "README.md")
