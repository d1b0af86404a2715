"""Mamba-1 sources: Cobra's released checkpoint layout, and Mamba-1 language models under the cobra / vlmamba presets.

Cobra saves prismatic's trainable modules of its finetune stage, each module's state dict under its name
(`cobra/training/strategies/fsdp.py`): {"model": {"projector": {projector.{0,2,4}.*}, "llm_backbone":
{llm.backbone.*, llm.lm_head.weight}}} - `llm_backbone` is a wrapper whose `.llm` is the MambaForCausalLM.
The synthetic checkpoints below use that layout, filled with a tiny model's tensors. The independent
reference for the language model is transformers' MambaForCausalLM holding the same tensors."""

import json

import pytest
import torch
from conftest import chat_inputs, make_image
from transformers import MambaConfig, MambaForCausalLM

from mlmamba import MLMambaForConditionalGeneration
from mlmamba.convert import main as convert_main
from mlmamba.convert import random_model
from mlmamba.convert_release import CheckpointError
from mlmamba.presets import get_preset


def cobra_checkpoint(model) -> dict:
    """The tiny model's weights in Cobra's release layout."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    llm = {
        "llm.backbone." + k[len("model.language_model.") :]: v
        for k, v in sd.items()
        if k.startswith("model.language_model.")
    }
    llm["llm.lm_head.weight"] = sd["lm_head.weight"]
    projector = {
        "projector." + k[len("model.connector.projector.") :]: v
        for k, v in sd.items()
        if k.startswith("model.connector.projector.")
    }
    assert len(projector) + len(llm) == len(sd) - sum(k.startswith("model.vision_tower.") for k in sd)
    return {"model": {"projector": projector, "llm_backbone": llm}}


@pytest.fixture(scope="module")
def cobra(tmp_path_factory):
    """A random tiny Cobra, its released-layout checkpoint, vision encoders and tokenizer on disk."""
    model, processor = random_model("cobra-tiny", seed=3)
    root = tmp_path_factory.mktemp("cobra")
    ckpt = cobra_checkpoint(model)
    assert "llm.backbone.layers.1.mixer.x_proj.weight" in ckpt["model"]["llm_backbone"]
    assert set(ckpt["model"]["projector"]) == {f"projector.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    torch.save(ckpt, root / "latest-checkpoint.pt")
    for i, encoder in enumerate(model.model.vision_tower.encoders):
        encoder.save_pretrained(root / f"vision{i}")
    processor.tokenizer.save_pretrained(root / "tokenizer")
    return model, processor, root


@pytest.fixture(scope="module")
def converted(cobra, tmp_path_factory):
    out = tmp_path_factory.mktemp("cobra-converted")
    _convert(cobra[2], out)
    return out


def _convert(root, out, checkpoint="latest-checkpoint.pt", *extra):
    convert_main(
        [
            "--checkpoint",
            str(root / checkpoint),
            "--vision",
            str(root / "vision0"),
            "--vision",
            str(root / "vision1"),
            "--tokenizer",
            str(root / "tokenizer"),
            "--image-size",
            "42",
            "--output",
            str(out),
            *extra,
        ]
    )


def _hf_mamba(llm: dict, prefix: str = "") -> MambaForCausalLM:
    """transformers' MambaForCausalLM reading mamba_ssm-named tensors itself (it renames embedding -> embeddings)."""
    vocab, d = llm[prefix + "backbone.embedding.weight"].shape
    d_inner, d_state = llm[prefix + "backbone.layers.0.mixer.A_log"].shape
    layers = len({k[len(prefix) :].split(".")[2] for k in llm if k.startswith(prefix + "backbone.layers.")})
    model = MambaForCausalLM(
        MambaConfig(
            vocab_size=vocab,
            hidden_size=d,
            state_size=d_state,
            num_hidden_layers=layers,
            expand=d_inner // d,
            conv_kernel=4,
            time_step_rank=llm[prefix + "backbone.layers.0.mixer.dt_proj.weight"].shape[1],
            use_conv_bias=True,
            use_bias=False,
            layer_norm_epsilon=1e-5,
            residual_in_fp32=True,
            tie_word_embeddings=True,
        )
    ).eval()
    model.load_state_dict({k[len(prefix) :]: v for k, v in llm.items()})
    return model


@torch.no_grad()
def test_cobra_release_converts_and_equals_the_source_model(cobra, converted):
    model, processor, root = cobra
    loaded = MLMambaForConditionalGeneration.from_pretrained(converted).eval()
    config = loaded.config
    assert (
        config.text_config.ssm_layer == "Mamba1"
        and config.text_config.dt_rank == 4
        and config.text_config.d_state == 16
    )
    assert config.connector_config.connector_type == "mlp" and config.connector_config.projector_expand == 4
    inputs = chat_inputs(processor, "Which digit is this?", make_image(2))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_cobra_language_model_equals_transformers_mamba_on_the_release_tensors(cobra, converted):
    """Independent reference: transformers' MambaForCausalLM holding the released llm_backbone tensors."""
    _, _, root = cobra
    llm = torch.load(root / "latest-checkpoint.pt", weights_only=True)["model"]["llm_backbone"]
    reference = _hf_mamba(llm, prefix="llm.")
    ours = MLMambaForConditionalGeneration.from_pretrained(converted).eval()
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_cobra_model_card_names_cobra(cobra, converted):
    card = (converted / "README.md").read_text()
    header = card.split("---")[1]
    for line in ("license: mit", "han1997/cobra", "arxiv:2403.14520", "- cobra"):
        assert line in header, line
    assert "huangwenjun1994" not in header and str(cobra[2]) not in card
    assert "# Cobra 3B" in card and "arxiv.org/abs/2403.14520" in card and "arxiv.org/abs/2407.19832" in card


@torch.no_grad()
def test_cobra_siglip_gelu_mlp_projector_converts_to_mlp2x(tmp_path):
    """cobra-siglip+3b's "no-align+gelu-mlp": projector.{0,2}, Linear(v -> d) GELU Linear(d -> d)."""
    from mlmamba.convert import build_model

    config = get_preset("cobra-tiny", connector_config=dict(connector_type="mlp2x"))
    model = build_model(config, torch.float32, seed=4).eval()
    _, processor = random_model("cobra-tiny")
    ckpt = cobra_checkpoint(model)
    assert set(ckpt["model"]["projector"]) == {
        "projector.0.weight",
        "projector.0.bias",
        "projector.2.weight",
        "projector.2.bias",
    }
    torch.save(ckpt, tmp_path / "latest-checkpoint.pt")
    for i, encoder in enumerate(model.model.vision_tower.encoders):
        encoder.save_pretrained(tmp_path / f"vision{i}")
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    _convert(tmp_path, tmp_path / "out")
    loaded = MLMambaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.connector_config.connector_type == "mlp2x"
    inputs = chat_inputs(processor, "Which digit is this?", make_image(3))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)


def _tampered(root, tmp_path, edit):
    ckpt = torch.load(root / "latest-checkpoint.pt", weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, tmp_path / "tampered.pt")
    return tmp_path / "tampered.pt"  # absolute: root / it is it


def test_cobra_checkpoint_strictness(cobra, tmp_path):
    _, _, root = cobra
    cases = [
        (
            lambda m: m["llm_backbone"].__setitem__("llm.backbone.layers.0.mixer.extra", torch.zeros(2)),
            r"llm_backbone: 1 tensor\(s\) were not used:\n  llm.backbone.layers.0.mixer.extra \(2,\)",
        ),
        (
            lambda m: m["llm_backbone"].__setitem__("llm.backbone.layers.1.mixer.x_proj.weight", torch.zeros(35, 128)),
            r"'llm.backbone.layers.1.mixer.x_proj.weight' has shape \(35, 128\), expected \(36, 128\)",
        ),
        (lambda m: m["llm_backbone"]["llm.lm_head.weight"].add_(1.0), "llm.lm_head.weight differs from the embedding"),
        (lambda m: m["projector"].pop("projector.4.bias"), "projector: missing tensor 'projector.4.bias'"),
        (
            lambda m: m["projector"].__setitem__("projector.6.weight", torch.zeros(1)),
            r"projector layers \['0', '2', '4', '6'\]",
        ),
        (lambda m: m.__setitem__("vision_backbone", {}), "not an ML-Mamba or Cobra checkpoint"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            _convert(root, tmp_path / f"out{i}", _tampered(root, tmp_path, edit))


# ------------------------------------------------------------------------------- Mamba-1 language models


def _hf_mamba1(vocab=528, d=64, layers=2):
    torch.manual_seed(5)
    model = MambaForCausalLM(
        MambaConfig(
            vocab_size=vocab,
            hidden_size=d,
            state_size=16,
            num_hidden_layers=layers,
            expand=2,
            conv_kernel=4,
            time_step_rank=4,
            use_conv_bias=True,
            use_bias=False,
            tie_word_embeddings=True,
        )
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3) if "A_log" not in name else p.uniform_(-1, 1.5)
    return model


def _save_mamba1(reference, folder, layout):
    if layout == "transformers":
        reference.save_pretrained(folder)
        return
    # mamba_ssm's MambaLMHeadModel.save_pretrained: config.json + pytorch_model.bin; no "layer" in ssm_cfg = Mamba1
    folder.mkdir()
    torch.save(
        {k.replace("embeddings.", "embedding."): v for k, v in reference.state_dict().items()},
        folder / "pytorch_model.bin",
    )
    (folder / "config.json").write_text(
        json.dumps(
            {
                "d_model": 64,
                "n_layer": 2,
                "vocab_size": 528,
                "ssm_cfg": {},
                "rms_norm": True,
                "residual_in_fp32": True,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": 8,
                "tie_embeddings": True,
            }
        )
    )


@pytest.mark.parametrize("layout,preset", [("state-spaces", "cobra-tiny"), ("transformers", "vlmamba-tiny")])
def test_mamba1_text_model_becomes_the_language_model(cobra, tmp_path, layout, preset):
    _, processor, root = cobra
    reference = _hf_mamba1()
    _save_mamba1(reference, tmp_path / "lm", layout)
    out = tmp_path / "out"
    convert_main(
        [
            "--text-model",
            str(tmp_path / "lm"),
            "--preset",
            preset,
            "--tokenizer",
            str(root / "tokenizer"),
            "--output",
            str(out),
        ]
    )
    ours = MLMambaForConditionalGeneration.from_pretrained(out).eval()
    assert ours.config.text_config.ssm_layer == "Mamba1"
    assert ours.config.connector_config.connector_type == get_preset(preset).connector_config.connector_type
    ids = torch.randint(0, 500, (2, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    card = (out / "README.md").read_text()
    arxiv = {"cobra-tiny": "2403.14520", "vlmamba-tiny": "2403.13600"}[preset]
    assert f"arxiv:{arxiv}" in card.split("---")[1] and "connector is randomly initialised" in card
    assert str(tmp_path) not in card


def test_language_model_kind_must_match_the_preset(cobra, tmp_path):
    _, _, root = cobra
    _save_mamba1(_hf_mamba1(), tmp_path / "lm", "state-spaces")
    with pytest.raises(
        CheckpointError, match="is a Mamba1 language model, but preset 'mlmamba-tiny' is built on Mamba2"
    ):
        convert_main(
            [
                "--text-model",
                str(tmp_path / "lm"),
                "--preset",
                "mlmamba-tiny",
                "--tokenizer",
                str(root / "tokenizer"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
    config = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**config, "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(CheckpointError, match="config.json says Mamba2, but the tensors are a Mamba1 model"):
        convert_main(
            [
                "--text-model",
                str(tmp_path / "lm"),
                "--preset",
                "cobra-tiny",
                "--tokenizer",
                str(root / "tokenizer"),
                "--output",
                str(tmp_path / "out"),
            ]
        )


def test_random_model_cards_name_each_family(tmp_path):
    for preset, arxiv, phrase in (
        ("cobra-tiny", "2403.14520", "Mamba-1 language model (Mamba-2.8B-Zephyr)"),
        ("vlmamba-tiny", "2403.13600", "released neither code nor weights"),
        ("mlmamba-tiny", "2407.19832", "Mamba-2 Scan Connector"),
    ):
        convert_main(["--random", "--preset", preset, "--output", str(tmp_path / preset)])
        card = (tmp_path / preset / "README.md").read_text()
        assert f"arxiv:{arxiv}" in card.split("---")[1] and phrase in card, preset
