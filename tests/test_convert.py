"""Released-layout checkpoints -> model folders: strict accounting and equality with references.

The synthetic checkpoints below use the key layout of ML-Mamba's `latest-checkpoint.pt`, of
state-spaces `mamba2-*` folders and of transformers' Mamba2ForCausalLM, filled with the tiny
model's tensors (or random ones)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import chat_inputs, make_image
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, Mamba2Config, Mamba2ForCausalLM

from mlmamba import MLMambaForConditionalGeneration
from mlmamba.convert import main as convert_main
from mlmamba.convert_release import CheckpointError
from mlmamba.convert_vision import load_vision_encoder


def release_checkpoint(model) -> dict:
    """The tiny model's weights in ML-Mamba's release layout."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def sub(prefix, new_prefix=""):
        return {new_prefix + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    llm = sub("model.language_model.", "backbone.")
    llm["lm_head.weight"] = sd["lm_head.weight"]
    return {
        "model": {
            "llm_backbone": llm,
            "mlp": sub("model.connector.mlp."),
            "bidirectional_mamba": sub("model.connector.msc."),
            "projector": sub("model.connector.projector.", "projector."),
        }
    }


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    model, processor = tiny
    root = tmp_path_factory.mktemp("release")
    ckpt = release_checkpoint(model)
    parts = ckpt["model"]
    # spot-check that the layout is the released one
    assert "backbone.layers.0.mixer.in_proj.weight" in parts["llm_backbone"]
    assert (
        "layers.1.mixer.conv1d_b.weight" in parts["bidirectional_mamba"]
        and "norm_f.bias" in parts["bidirectional_mamba"]
    )
    assert set(parts["mlp"]) == {"0.weight", "0.bias"} and "projector.4.bias" in parts["projector"]
    torch.save(ckpt, root / "latest-checkpoint.pt")
    dino, siglip = model.model.vision_tower.encoders
    dino.save_pretrained(root / "dino")
    siglip.save_pretrained(root / "siglip")
    processor.tokenizer.save_pretrained(root / "tokenizer")
    return root


def _convert(sources, out, *extra):
    convert_main(
        [
            "--checkpoint",
            str(sources / "latest-checkpoint.pt"),
            "--vision",
            str(sources / "dino"),
            "--vision",
            str(sources / "siglip"),
            "--tokenizer",
            str(sources / "tokenizer"),
            "--image-size",
            "42",
            "--output",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    _convert(sources, out)
    return out


@torch.no_grad()
def test_converted_release_equals_the_source_model(tiny, converted):
    model, processor = tiny
    files = {p.name for p in converted.iterdir()}
    assert {"config.json", "README.md", "chat_template.jinja", "modeling_mlmamba.py", "tokenizer.json"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    loaded = MLMambaForConditionalGeneration.from_pretrained(converted).eval()
    inputs = chat_inputs(processor, "Which digit is this?", make_image(1))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=1e-6, rtol=1e-6)
    assert loaded.config.connector_config.num_layers == 2 and loaded.config.text_config.n_layer == 2


@torch.no_grad()
def test_converted_language_model_equals_transformers_mamba2_on_the_release_tensors(sources, converted):
    """Independent reference: transformers' Mamba2ForCausalLM reading the released llm_backbone keys itself."""
    llm = torch.load(sources / "latest-checkpoint.pt", weights_only=True)["model"]["llm_backbone"]
    n_heads, head_dim = llm["backbone.layers.0.mixer.A_log"].shape[0], 16
    vocab, d = llm["backbone.embedding.weight"].shape
    reference = Mamba2ForCausalLM(
        Mamba2Config(
            num_heads=n_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            hidden_size=d,
            state_size=16,
            num_hidden_layers=2,
            n_groups=1,
            expand=2,
            conv_kernel=4,
            chunk_size=16,
            tie_word_embeddings=True,
            layer_norm_epsilon=1e-5,
        )
    ).eval()
    reference.load_state_dict(llm)  # the released names; transformers renames embedding -> embeddings itself
    ours = MLMambaForConditionalGeneration.from_pretrained(converted).eval()
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_dinov2_position_table_is_resized_like_transformers_interpolates(tmp_path):
    """A DINOv2 released for a larger grid (here 5x5, as 518 px -> 37x37) converted to a 3x3 grid gives the
    features transformers' own model computes when it interpolates the table at run time."""
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=70,
        num_register_tokens=4,
    )
    original = Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        original.embeddings.position_embeddings.normal_()  # a table with structure to interpolate
    original.save_pretrained(tmp_path / "dino")
    vision_config, state, dropped, _ = load_vision_encoder(str(tmp_path / "dino"), image_size=42)
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 9, 32) and vision_config["image_size"] == 42
    converted = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**vision_config)).eval()
    converted.load_state_dict(state)
    pixels = torch.randn(2, 3, 42, 42)
    torch.testing.assert_close(
        converted(pixels).last_hidden_state, original(pixels).last_hidden_state, atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------- strictness


def _tamper(sources, tmp_path, edit):
    ckpt = torch.load(sources / "latest-checkpoint.pt", weights_only=True)
    edit(ckpt["model"])
    path = tmp_path / "tampered"
    path.mkdir()
    for name in ("dino", "siglip", "tokenizer"):
        (path / name).symlink_to(sources / name)
    torch.save(ckpt, path / "latest-checkpoint.pt")
    return path


def test_left_over_tensors_stop_the_conversion(sources, tmp_path):
    src = _tamper(
        sources, tmp_path, lambda m: m["bidirectional_mamba"].__setitem__("layers.0.extra.weight", torch.zeros(3))
    )
    with pytest.raises(
        CheckpointError, match=r"bidirectional_mamba: 1 tensor\(s\) were not used:\n  layers.0.extra.weight \(3,\)"
    ):
        _convert(src, tmp_path / "out")


def test_missing_tensors_stop_the_conversion(sources, tmp_path):
    src = _tamper(sources, tmp_path, lambda m: m["projector"].pop("projector.2.bias"))
    with pytest.raises(CheckpointError, match="projector: missing tensor 'projector.2.bias'"):
        _convert(src, tmp_path / "out")


def test_mis_shaped_tensors_stop_the_conversion(sources, tmp_path):
    src = _tamper(
        sources, tmp_path, lambda m: m["llm_backbone"].__setitem__("backbone.layers.1.mixer.D", torch.zeros(7))
    )
    with pytest.raises(CheckpointError, match=r"'backbone.layers.1.mixer.D' has shape \(7,\), expected \(8,\)"):
        _convert(src, tmp_path / "out")


def test_untied_head_is_refused(sources, tmp_path):
    src = _tamper(sources, tmp_path, lambda m: m["llm_backbone"]["lm_head.weight"].add_(1.0))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the embedding"):
        _convert(src, tmp_path / "out")


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickles_that_need_code_are_never_executed(sources, tmp_path):
    ckpt = torch.load(sources / "latest-checkpoint.pt", weights_only=True)
    ckpt["extra"] = Payload()
    src = _tamper(sources, tmp_path, lambda m: None)
    torch.save(ckpt, src / "latest-checkpoint.pt")
    with pytest.raises(CheckpointError, match="would execute pickled code"):
        _convert(src, tmp_path / "out")


def test_dtype_is_kept_or_cast_on_request(sources, tmp_path):
    _convert(sources, tmp_path / "bf16", "--dtype", "bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = MLMambaForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------- text model


def _hf_mamba2(vocab=528, d=64, layers=2):
    torch.manual_seed(1)
    config = Mamba2Config(
        num_heads=8,
        head_dim=16,
        vocab_size=vocab,
        hidden_size=d,
        state_size=16,
        num_hidden_layers=layers,
        n_groups=1,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
        tie_word_embeddings=True,
    )
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("layout", ["transformers", "state-spaces"])
def test_text_model_becomes_the_language_model(sources, tmp_path, layout):
    reference = _hf_mamba2()
    folder = tmp_path / "lm"
    if layout == "transformers":
        reference.save_pretrained(folder)
    else:  # mamba_ssm's MambaLMHeadModel.save_pretrained: config.json + pytorch_model.bin, `backbone.embedding`
        folder.mkdir()
        sd = {k.replace("embeddings.", "embedding."): v for k, v in reference.state_dict().items()}
        torch.save(sd, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "d_model": 64,
                    "n_layer": 2,
                    "vocab_size": 528,
                    "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16},
                    "rms_norm": True,
                    "residual_in_fp32": True,
                    "fused_add_norm": True,
                    "pad_vocab_size_multiple": 8,
                    "tie_embeddings": True,
                }
            )
        )
    out = tmp_path / "out"
    convert_main(
        [
            "--text-model",
            str(folder),
            "--preset",
            "mlmamba-tiny",
            "--tokenizer",
            str(sources / "tokenizer"),
            "--output",
            str(out),
        ]
    )
    ours = MLMambaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.randint(0, 500, (2, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert "connector is randomly initialised" in (out / "README.md").read_text()


# ------------------------------------------------------------------------------- model card


def test_model_card_metadata_and_snippet_runs_offline(converted):
    card = (converted / "README.md").read_text()
    header = card.split("---")[1]
    for line in (
        "license: mit",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "huangwenjun1994/ML-Mamba",
    ):
        assert line in header, line
    assert "arxiv.org/abs/2407.19832" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    snippet = re.sub(r'MODEL = ".*?"', f"MODEL = {str(converted)!r}", snippet)
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]


@torch.no_grad()
def test_full_siglip_checkpoint_gives_its_vision_tower_and_reports_the_rest(tmp_path):
    """google/siglip-* folders hold a whole SiglipModel: the text tower and heads are dropped by name and reported."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    torch.manual_seed(0)
    full = SiglipModel(
        SiglipConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=42,
                patch_size=14,
            ),
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
            ),
        )
    ).eval()
    full.save_pretrained(tmp_path / "siglip")
    vision_config, state, dropped, _ = load_vision_encoder(str(tmp_path / "siglip"), image_size=42)
    assert dropped and all(k.startswith(("text_model.", "logit_", "vision_model.head.")) for k in dropped)
    assert any(k.startswith("text_model.") for k in dropped)
    vision = SiglipVisionModel(type(full.config.vision_config)(**vision_config)).eval()
    vision.load_state_dict(state)
    pixels = torch.randn(1, 3, 42, 42)
    expected = full.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(vision(pixels, output_hidden_states=True).hidden_states[-2], expected)
    # In a converted model SigLIP computes exact GELU, as timm did when ML-Mamba and Cobra were trained.
    from mlmamba.convert import load_vision_tower

    assert full.config.vision_config.hidden_act == "gelu_pytorch_tanh"
    vision_fields, _, notes = load_vision_tower([str(tmp_path / "siglip")], 42, None)
    assert vision_fields["encoders"][0]["hidden_act"] == "gelu"
    assert any("replaced by exact gelu" in n for n in notes)
