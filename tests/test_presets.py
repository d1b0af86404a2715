"""Named configurations: the released sizes, built on the meta device (no memory), and the tiny one's folder."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES

from mlmamba import MLMambaForConditionalGeneration
from mlmamba.presets import get_preset

MAMBA1_2_8B_LAYER = {  # state-spaces/mamba-2.8b's (and mamba-2.8b-zephyr's) block, mamba_simple names
    "model.language_model.layers.63.mixer.in_proj.weight": (2 * 5120, 2560),
    "model.language_model.layers.63.mixer.conv1d.weight": (5120, 1, 4),
    "model.language_model.layers.63.mixer.conv1d.bias": (5120,),
    "model.language_model.layers.63.mixer.x_proj.weight": (160 + 2 * 16, 5120),
    "model.language_model.layers.63.mixer.dt_proj.weight": (5120, 160),
    "model.language_model.layers.63.mixer.dt_proj.bias": (5120,),
    "model.language_model.layers.63.mixer.A_log": (5120, 16),
    "model.language_model.layers.63.mixer.D": (5120,),
    "model.language_model.layers.63.mixer.out_proj.weight": (2560, 5120),
    "model.language_model.layers.63.norm.weight": (2560,),
    "model.language_model.embedding.weight": (50280, 2560),
    "model.language_model.norm_f.weight": (2560,),
}


def _assert_shapes(shapes: dict, expected: dict) -> None:
    wrong = {name: (shapes.get(name), shape) for name, shape in expected.items() if shapes.get(name) != shape}
    assert not wrong, wrong  # name: (built, expected)


def _shapes_on_meta(name):
    with torch.device("meta"):
        model = MLMambaForConditionalGeneration(get_preset(name))
    return model, {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_mlmamba_3b_has_the_released_shapes():
    model, shapes = _shapes_on_meta("mlmamba-3b")
    expected = {
        # language model, mamba_ssm names under model.language_model
        "model.language_model.embedding.weight": (50288, 2560),
        "model.language_model.layers.63.mixer.in_proj.weight": (2 * 5120 + 2 * 128 + 80, 2560),
        "model.language_model.layers.63.mixer.conv1d.weight": (5120 + 2 * 128, 1, 4),
        "model.language_model.layers.63.mixer.conv1d.bias": (5376,),
        "model.language_model.layers.63.mixer.dt_bias": (80,),
        "model.language_model.layers.63.mixer.A_log": (80,),
        "model.language_model.layers.63.mixer.D": (80,),
        "model.language_model.layers.63.mixer.norm.weight": (5120,),
        "model.language_model.layers.63.mixer.out_proj.weight": (2560, 5120),
        "model.language_model.layers.63.norm.weight": (2560,),
        "model.language_model.norm_f.weight": (2560,),
        # mlp, MSC (Bidirectional_Mamba) and projector
        "model.connector.mlp.0.weight": (2560, 2176),
        "model.connector.msc.layers.1.mixer.conv1d_b.weight": (5376, 1, 4),
        "model.connector.msc.layers.1.mixer.dt_bias_b": (80,),
        "model.connector.msc.layers.1.mixer.A_log_b": (80,),
        "model.connector.msc.layers.1.mixer.D_b": (80,),
        "model.connector.msc.layers.1.norm.bias": (2560,),
        "model.connector.msc.layers.1.mlp.w1.weight": (2560, 2560),
        "model.connector.msc.layers.1.mlp.w3.bias": (2560,),
        "model.connector.msc.norm_f.weight": (2560,),
        "model.connector.projector.0.weight": (10240, 2560),
        "model.connector.projector.2.weight": (2560, 10240),
        "model.connector.projector.4.weight": (2560, 2560),
        # vision encoders: DINOv2-L/14 with 4 registers (27 x 27 position grid) and SigLIP-SO400M/14
        "model.vision_tower.encoders.0.embeddings.position_embeddings": (1, 1 + 27 * 27, 1024),
        "model.vision_tower.encoders.0.embeddings.register_tokens": (1, 4, 1024),
        "model.vision_tower.encoders.1.embeddings.position_embedding.weight": (729, 1152),
    }
    _assert_shapes(shapes, expected)
    assert not any(n.startswith("model.connector.msc.layers.2.") for n in shapes)
    lm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model."))
    assert 2.6e9 < lm < 2.8e9, lm  # "mamba2-2.7b"
    assert model.config.num_image_tokens == 729


def test_cobra_3b_has_the_released_shapes():
    model, shapes = _shapes_on_meta("cobra-3b")
    expected = dict(
        MAMBA1_2_8B_LAYER,
        **{  # prismatic's FusedMLPProjector from the fused DINOv2 + SigLIP features
            "model.connector.projector.0.weight": (8704, 2176),
            "model.connector.projector.2.weight": (2560, 8704),
            "model.connector.projector.4.weight": (2560, 2560),
            "model.vision_tower.encoders.0.embeddings.position_embeddings": (1, 1 + 27 * 27, 1024),
        },
    )
    _assert_shapes(shapes, expected)
    assert not any(n.startswith(("model.connector.mlp", "model.connector.msc", "model.connector.vss")) for n in shapes)
    lm = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model."))
    assert 2.7e9 < lm < 2.8e9, lm  # "mamba-2.8b"
    assert model.config.num_image_tokens == 729


def test_vlmamba_3b_has_the_paper_shapes():
    model, shapes = _shapes_on_meta("vlmamba-3b")
    expected = dict(
        MAMBA1_2_8B_LAYER,
        **{
            # CLIP ViT-L/14 at 336 px: 24 x 24 patches + CLS
            "model.vision_tower.encoders.0.embeddings.position_embedding.weight": (577, 1024),
            # VSS-L2: Linear + GELU, VSS (CSM: four routes of Mamba-1 parameters) at the LM width, Linear
            "model.connector.mlp.0.weight": (2560, 1024),
            "model.connector.vss.layers.0.norm.weight": (2560,),
            "model.connector.vss.layers.0.mixer.in_proj.weight": (2 * 5120, 2560),
            "model.connector.vss.layers.0.mixer.x_proj_c_b.weight": (160 + 2 * 16, 5120),
            "model.connector.vss.layers.0.mixer.A_log_c": (5120, 16),
            "model.connector.vss.layers.0.mixer.conv1d_b.weight": (5120, 1, 4),
            "model.connector.vss.norm_f.weight": (2560,),
            "model.connector.projector.weight": (2560, 2560),
        },
    )
    _assert_shapes(shapes, expected)
    assert model.config.num_image_tokens == 576
    assert len(model.model.vision_tower.encoders) == 1


@pytest.mark.parametrize("preset", FAMILIES)
def test_convert_command_writes_a_loadable_folder(preset, tmp_path):
    out = tmp_path / "tiny"
    run = subprocess.run(
        [sys.executable, "-m", "mlmamba.convert", "--random", "--preset", preset, "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mlmamba" and config["image_token_id"] == 512
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "chat_template.jinja").read_text().startswith("{#- Zephyr")
    assert sum(f.stat().st_size for f in out.iterdir()) < 8e6  # "a few MB"
    model = MLMambaForConditionalGeneration.from_pretrained(out)
    assert model.config.vocab_size == 528
