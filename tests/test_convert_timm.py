"""timm state dicts as vision sources, checked against timm itself.

The reference is the real timm model holding the same random tensors, loaded the way the originals loaded
their encoders (prismatic / Cobra / ML-Mamba, timm 0.9.10): `timm.create_model(name, img_size=...)` with the
released weights passed through timm's own `checkpoint_filter_fn`, which resizes DINOv2's position table;
features from `get_intermediate_layers(x, n={depth - 2})` (second-to-last block, prefix tokens dropped).
`nox -s timm` installs timm without its torchvision dependency (see timm_reference.py); without timm these tests
skip.
"""

import json
import os

import pytest
import torch
from timm_reference import import_timm
from transformers import AutoConfig, AutoModel

from mlmamba import MLMambaForConditionalGeneration
from mlmamba.convert import main as convert_main
from mlmamba.convert_release import CheckpointError
from mlmamba.convert_vision import load_vision_encoder, resize_position_grid, timm_vision_state

timm = import_timm()
if timm is None:
    if os.environ.get("MLMAMBA_REQUIRE_TIMM"):  # set by `nox -s timm`: there a missing timm is a failure
        raise ImportError("MLMAMBA_REQUIRE_TIMM is set but timm does not import")
    pytest.skip("timm is not installed here: `nox -s timm` runs these tests beside it", allow_module_level=True)

TINY = {  # the tiny preset's encoders (widths 32 and 48, 3 blocks, 2 heads), as timm models
    "dino": ("vit_large_patch14_reg4_dinov2", dict(embed_dim=32, depth=3, num_heads=2)),
    "siglip": ("vit_so400m_patch14_siglip_384", dict(embed_dim=48, depth=3, num_heads=2, mlp_ratio=2)),
    "clip": ("vit_large_patch14_clip_quickgelu_336", dict(embed_dim=32, depth=3, num_heads=2, num_classes=16)),
}


def _timm_model(kind: str, img_size: int, seed: int = 0):
    arch, args = TINY[kind]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, **args).eval()
    with torch.no_grad():  # away from the init values (zero biases, 1e-5 layer scales): every tensor matters
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _as_loaded_by_the_original(kind: str, state: dict, img_size: int):
    """timm.create_model(name, pretrained=True, img_size=...) on `state`: timm's filter resizes what it must."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch, args = TINY[kind]
    model = timm.create_model(arch, pretrained=False, img_size=img_size, **args).eval()
    model.load_state_dict(checkpoint_filter_fn(dict(state), model))
    return model


def _timm_features(model, pixels):
    return model.get_intermediate_layers(pixels, n={len(model.blocks) - 2})[0]


def _save_timm_folder(model, folder, kind):
    """timm's own Hub folder format (config.json with architecture and model_args, model.safetensors)."""
    from timm.models import save_for_hf

    arch, args = TINY[kind]
    save_for_hf(
        model, folder, model_args={k: v for k, v in args.items() if k != "num_classes"}, safe_serialization=True
    )
    assert json.loads((folder / "config.json").read_text())["architecture"] == arch
    return folder


def _transformers_encoder(config: dict, state: dict):
    config = dict(config)
    model = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model = getattr(model, "vision_model", model).eval()
    model.load_state_dict(state)
    return model


def _features(encoder, pixels, n_patches):
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, -n_patches:]


@torch.no_grad()
@pytest.mark.parametrize("kind", ["dino", "siglip", "clip"])
def test_timm_encoder_gives_timms_second_to_last_block_features(kind, tmp_path):
    """DINOv2 is released for a larger grid (here 5x5, as 518 px -> 37x37) and used on a 3x3 one."""
    released = _timm_model(kind, img_size=70 if kind == "dino" else 42)
    folder = _save_timm_folder(released, tmp_path / kind, kind)
    config, state, dropped, notes = load_vision_encoder(str(folder), image_size=42)
    reference = _as_loaded_by_the_original(kind, released.state_dict(), img_size=42)
    pixels = torch.randn(2, 3, 42, 42)
    expected = _timm_features(reference, pixels)
    assert expected.shape == (2, 9, released.embed_dim) and expected.abs().mean() > 0.1
    torch.testing.assert_close(
        _features(_transformers_encoder(config, state), pixels, 9), expected, atol=1e-5, rtol=1e-5
    )
    assert config["image_size"] == 42 and config["num_attention_heads"] == 2
    assert (
        dropped
        == {
            "dino": [],
            "siglip": sorted(k for k in released.state_dict() if k.startswith("attn_pool.")),
            "clip": ["head.bias", "head.weight"],
        }[kind]
    )
    assert config["hidden_act"] == {"dino": "gelu", "siglip": "gelu", "clip": "quick_gelu"}[kind]  # what timm ran


@torch.no_grad()
def test_dinov2_own_release_layout_converts_like_timm_reads_it(tmp_path):
    """DINOv2's own files (dinov2_vit*_reg4_pretrain.pth: register_tokens, mask_token, a class position)."""
    g = torch.Generator().manual_seed(3)
    timm_state = _timm_model("dino", img_size=70).state_dict()
    original = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    original.update(
        cls_token=torch.randn(1, 1, 32, generator=g),
        pos_embed=torch.randn(1, 1 + 25, 32, generator=g),
        register_tokens=torch.randn(1, 4, 32, generator=g),
        mask_token=torch.randn(1, 32, generator=g),
    )
    torch.save(original, tmp_path / "dinov2_reg4_pretrain.pth")
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "vit_large_patch14_reg4_dinov2", "model_args": {"num_heads": 2}})
    )
    config, state, dropped, notes = load_vision_encoder(str(tmp_path), image_size=42)
    assert torch.equal(state["embeddings.mask_token"], original["mask_token"]) and not dropped
    reference = _as_loaded_by_the_original("dino", original, img_size=42)  # timm's _convert_dinov2 + resize
    pixels = torch.randn(2, 3, 42, 42)
    torch.testing.assert_close(
        _features(_transformers_encoder(config, state), pixels, 9),
        _timm_features(reference, pixels),
        atol=1e-5,
        rtol=1e-5,
    )


@torch.no_grad()
def test_open_clip_siglip_file_gives_its_timm_trunk_and_reports_the_rest():
    """timm 0.9.10 loaded vit_so400m_patch14_siglip_384.webli from open_clip's file: the timm ViT under
    `visual.trunk.`, beside the text tower and the logit scale and bias (dropped by name, and reported)."""
    siglip = _timm_model("siglip", img_size=42)
    g = torch.Generator().manual_seed(5)
    open_clip = {"visual.trunk." + k: v for k, v in siglip.state_dict().items()}
    open_clip.update(
        {
            "text.token_embedding.weight": torch.randn(100, 48, generator=g),
            "text.positional_embedding": torch.randn(16, 48, generator=g),
            "logit_scale": torch.ones([]),
            "logit_bias": torch.zeros([]),
        }
    )
    config, state, dropped, notes = timm_vision_state(
        open_clip, image_size=42, arch="vit_so400m_patch14_siglip_384", model_args={"num_heads": 2}
    )
    assert dropped[:4] == ["logit_bias", "logit_scale", "text.positional_embedding", "text.token_embedding.weight"]
    assert all(k.startswith("attn_pool.") for k in dropped[4:]) and len(dropped) > 4
    reference = _as_loaded_by_the_original("siglip", open_clip, img_size=42)  # timm strips visual.trunk. itself
    pixels = torch.randn(2, 3, 42, 42)
    torch.testing.assert_close(
        _features(_transformers_encoder(config, state), pixels, 9),
        _timm_features(reference, pixels),
        atol=1e-5,
        rtol=1e-5,
    )


def test_position_table_resize_37_to_27_equals_timms():
    """The resize the original ran (timm's resample_abs_pos_embed when loading at 384 px) and ours, at the
    released sizes: the same bicubic, antialiased interpolation, bit for bit (fp32 and bf16)."""
    from timm.layers import resample_abs_pos_embed

    for dtype in (torch.float32, torch.bfloat16):
        table = torch.randn(1, 37 * 37, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
        theirs = resample_abs_pos_embed(table, new_size=(27, 27), num_prefix_tokens=0)
        ours = resize_position_grid(torch.cat([torch.zeros_like(table[:, :1]), table], 1), 1, 27)
        assert torch.equal(ours[:, 1:], theirs) and ours.shape == (1, 1 + 729, 1024)


def test_released_sizes_are_recognised_from_a_bare_state_dict():
    """A bare timm file has no config: the released encoders are recognised by their sizes (on the meta device)."""
    for arch, heads, width, grid in (
        ("vit_large_patch14_reg4_dinov2", 16, 1024, 37),
        ("vit_so400m_patch14_siglip_384", 16, 1152, 27),
        ("vit_large_patch14_clip_336", 16, 1024, 24),
    ):
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
        config, state, dropped, notes = timm_vision_state(
            model.state_dict(), image_size=378 if "dino" in arch else grid * 14
        )
        assert config["num_attention_heads"] == heads and config["hidden_size"] == width, arch
        assert arch in notes[0]
        if "dino" in arch:
            assert state["embeddings.position_embeddings"].shape == (1, 1 + 27 * 27, 1024)


def test_unknown_sizes_need_timms_config(tmp_path):
    torch.save(_timm_model("siglip", img_size=42).state_dict(), tmp_path / "siglip.pth")
    with pytest.raises(CheckpointError, match="number of attention heads cannot be read from shapes"):
        load_vision_encoder(str(tmp_path / "siglip.pth"), image_size=42)


def test_left_over_and_mis_shaped_timm_tensors_stop_the_conversion(tmp_path):
    state = _timm_model("siglip", img_size=42).state_dict()
    args = dict(image_size=42, arch="vit_so400m_patch14_siglip_384", model_args={"num_heads": 2})
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) were not used:\n  blocks.1.extra \(3,\)"):
        timm_vision_state({**state, "blocks.1.extra": torch.zeros(3)}, **args)
    with pytest.raises(CheckpointError, match=r"'blocks.2.mlp.fc2.bias' has shape \(47,\), expected \(48,\)"):
        timm_vision_state({**state, "blocks.2.mlp.fc2.bias": torch.zeros(47)}, **args)
    with pytest.raises(CheckpointError, match="missing tensor 'blocks.0.attn.qkv.bias'"):
        timm_vision_state({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.bias"}, **args)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 9, 48\); a 70 px model needs \(1, 25, 48\)"):
        timm_vision_state(state, **dict(args, image_size=70))


@torch.no_grad()
def test_release_converts_with_timm_encoders(tmp_path):
    """ML-Mamba's checkpoint with the two timm encoders: the whole vision tower equals prismatic's
    DinoSigLIPViTBackbone (both timm featurizers, patches concatenated on channels)."""
    from conftest import chat_inputs, make_image
    from test_convert import release_checkpoint

    from mlmamba.convert import random_model

    model, processor = random_model("mlmamba-tiny", seed=0)
    torch.save(release_checkpoint(model), tmp_path / "latest-checkpoint.pt")
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    dino, siglip = _timm_model("dino", img_size=70, seed=1), _timm_model("siglip", img_size=42, seed=2)
    _save_timm_folder(dino, tmp_path / "dino", "dino")
    _save_timm_folder(siglip, tmp_path / "siglip", "siglip")
    out = tmp_path / "out"
    convert_main(
        [
            "--checkpoint",
            str(tmp_path / "latest-checkpoint.pt"),
            "--vision",
            str(tmp_path / "dino"),
            "--vision",
            str(tmp_path / "siglip"),
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            "--image-size",
            "42",
            "--output",
            str(out),
        ]
    )
    converted = MLMambaForConditionalGeneration.from_pretrained(out).eval()
    pixels = chat_inputs(processor, "Which digit is this?", make_image(4))["pixel_values"]
    expected = torch.cat(
        [
            _timm_features(_as_loaded_by_the_original("dino", dino.state_dict(), 42), pixels[:, :3]),
            _timm_features(_as_loaded_by_the_original("siglip", siglip.state_dict(), 42), pixels[:, 3:]),
        ],
        dim=-1,
    )
    torch.testing.assert_close(converted.model.vision_tower(pixels), expected, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "attn_pool" in card and "vit_so400m_patch14_siglip_384" in card


def test_swapped_timm_encoders_are_refused(tmp_path):
    """timm folders identified by their tensors (register tokens: DINOv2; a patch bias and no class token: SigLIP)
    in the wrong order are refused, though their total width fits the connector."""
    from test_convert import release_checkpoint

    from mlmamba.convert import random_model

    model, processor = random_model("mlmamba-tiny", seed=0)
    torch.save(release_checkpoint(model), tmp_path / "latest-checkpoint.pt")
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    _save_timm_folder(_timm_model("dino", img_size=70, seed=1), tmp_path / "dino", "dino")
    _save_timm_folder(_timm_model("siglip", img_size=42, seed=2), tmp_path / "siglip", "siglip")
    argv = ["--checkpoint", str(tmp_path / "latest-checkpoint.pt"), "--tokenizer", str(tmp_path / "tokenizer")]
    argv += ["--vision", str(tmp_path / "siglip"), "--vision", str(tmp_path / "dino")]
    with pytest.raises(CheckpointError, match=r"given 1 SigLIP \(.*siglip\), 2 DINOv2 \(.*dino\); .* DINOv2 then"):
        convert_main([*argv, "--image-size", "42", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
