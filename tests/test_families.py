"""The three families in one model class: ML-Mamba (Mamba-2 + MSC), Cobra (Mamba-1 + MLP projector) and
VL-Mamba (Mamba-1 + VSS). Generation, remote code and transformers 4.x run for every family in their own
test files (the `family` fixture); here: the connectors' scans, fine-tuning, and configuration errors."""

import copy

import pytest
import torch
from conftest import FAMILIES, make_image, spread_weights

from mlmamba import MLMambaConfig
from mlmamba.configuration_mlmamba import MLMambaConnectorConfig
from mlmamba.convert import random_model
from mlmamba.modeling_mlmamba import MLMambaConnector
from mlmamba.presets import get_preset


def _connector(grid=(4, 4), vision=24, d_model=32, **config) -> MLMambaConnector:
    config = MLMambaConnectorConfig(hidden_size=32, num_layers=1, d_state=8, headdim=16, chunk_size=8, **config)
    torch.manual_seed(0)
    connector = MLMambaConnector(config, vision, d_model, grid).eval()
    return spread_weights(connector)  # unit-scale weights: the default init leaves the scans nearly silent


def _route_swap(module: torch.nn.Module, pairs: dict[str, str]) -> torch.nn.Module:
    """A copy of `module` whose per-route mixer parameters are exchanged between the suffixes in `pairs`."""
    swapped = copy.deepcopy(module)
    state = module.state_dict()
    new = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition("mixer.")
        target = key
        for a, b in pairs.items():
            for base in ("conv1d", "x_proj", "dt_proj", "dt_bias", "A_log", "D"):
                for tail in ("", ".weight", ".bias"):
                    if leaf == base + a + tail:
                        target = f"{head}mixer.{base}{b}{tail}"
        new[target] = value
    swapped.load_state_dict(new, strict=True)
    return swapped


@torch.no_grad()
@pytest.mark.parametrize(
    "kind, ssm_layer", [("vss-l2", "Mamba1"), ("vss-l2", "Mamba2"), ("vss-mlp", "Mamba1"), ("msc", "Mamba2")]
)
def test_csm_column_routes_scan_the_columns(kind, ssm_layer):
    """Transposing the image grid and swapping the row routes' parameters with the column routes' gives the
    transposed output: the column routes really visit the grid column by column, in both directions."""
    connector = _connector(connector_type=kind, scan="cross", ssm_layer=ssm_layer)
    h = w = 4
    x = torch.randn(2, h * w, 24)
    out = connector(x)
    transposed = lambda t: t.view(t.shape[0], h, w, -1).transpose(1, 2).reshape(t.shape)  # noqa: E731
    swapped = _route_swap(connector, {"": "_c", "_c": "", "_b": "_c_b", "_c_b": "_b"})
    torch.testing.assert_close(swapped(transposed(x)), transposed(out), atol=1e-5, rtol=1e-5)
    # ... and the routes differ: without the swap the transposed image gives another result
    assert not torch.allclose(connector(transposed(x)), transposed(out), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("ssm_layer", ["Mamba1", "Mamba2"])
def test_bsm_backward_route_scans_the_reversed_sequence(ssm_layer):
    """Reversing the tokens and swapping the forward and backward parameters reverses the output."""
    connector = _connector(connector_type="vss-l2", scan="bidirectional", ssm_layer=ssm_layer)
    x = torch.randn(2, 16, 24)
    swapped = _route_swap(connector, {"": "_b", "_b": ""})
    torch.testing.assert_close(swapped(x.flip(1)), connector(x).flip(1), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bsm_with_mamba2_mixers_is_the_released_msc_scan():
    """VSS's BSM with a Mamba-2 mixer holds exactly the MSC mixer's weights (same names, as released) and
    computes the same scan: ML-Mamba's bidirectional MSC mixer dropped into a VSS block."""
    msc = _connector(connector_type="msc", scan="bidirectional")
    vss = _connector(connector_type="vss-l2", scan="bidirectional", ssm_layer="Mamba2")
    msc_mixer, vss_layer = msc.msc.layers[0].mixer, vss.vss.layers[0]
    vss_layer.mixer.load_state_dict(msc_mixer.state_dict(), strict=True)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(vss_layer(x, (4, 4)), x + msc_mixer(vss_layer.norm(x)), atol=0, rtol=0)
    # the scan is not causal: the last token changes the first output
    y = x.clone()
    y[:, -1] += 1
    assert not torch.allclose(msc_mixer(x)[:, 0], msc_mixer(y)[:, 0])


@pytest.mark.parametrize("name", ["cobra-tiny", "vlmamba-tiny"])
def test_sft_steps_train_the_connector_and_language_model_not_the_vision_tower(name, tmp_path):
    from trl import SFTTrainer

    from mlmamba.digits import digits_dataset
    from mlmamba.training import sft_config

    torch.manual_seed(0)
    model, processor = random_model(name, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = digits_dataset("train", image_size=model.config.vision_config.image_size, limit=8)
    config = sft_config(
        str(tmp_path / name),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=processor)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("model.vision_tower.") for n in changed)
    assert any(n.startswith("model.language_model.layers.") and ".mixer.x_proj" in n for n in changed)
    assert any(n.startswith("model.connector.projector") for n in changed)
    if name == "vlmamba-tiny":
        assert any(n.startswith("model.connector.vss.layers.0.mixer.conv1d_c_b") for n in changed)


def test_lora_targets_cover_every_family():
    from mlmamba.training import lora_target_names

    for name in FAMILIES:
        model, _ = random_model(name, seed=0)
        targets = lora_target_names(model)
        assert any(".language_model.layers.1.mixer.in_proj" in t for t in targets), name
        assert not any("conv1d" in t or "vision_tower" in t for t in targets), name
        if name == "vlmamba-tiny":
            assert "model.connector.vss.layers.0.mixer.out_proj" in targets


@pytest.mark.parametrize(
    "connector, text, message",
    [
        (dict(connector_type="vss"), {}, "connector_type='vss' is not supported"),
        (dict(scan="diagonal"), {}, "scan='diagonal' is not supported"),
        (dict(connector_type="msc", ssm_layer="Mamba1"), {}, "MSC is a Mamba-2 scan connector"),
        (dict(connector_type="vss-l2", ssm_layer="Mamba3"), {}, "ssm_layer='Mamba3' is not supported"),
        ({}, dict(ssm_layer="mamba1"), "ssm_layer='mamba1' is not supported"),
        ({}, dict(ssm_layer="Mamba1", dt_rank=0), "dt_rank=0"),
        (dict(connector_type="vss-mlp", ssm_layer="Mamba2", headdim=100), {}, "must split into heads of headdim=100"),
    ],
)
def test_bad_family_configs_say_what_is_accepted(connector, text, message):
    base = get_preset("vlmamba-tiny").to_dict()
    base["connector_config"].update(connector)
    base["text_config"].update(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MLMambaConfig(**base)


def test_cross_scan_needs_the_grid_it_was_built_for():
    connector = _connector(connector_type="vss-l2", scan="cross", ssm_layer="Mamba1", grid=(4, 4))
    with pytest.raises(ValueError, match="grid"):
        connector(torch.randn(1, 15, 24))


def test_letterbox_pixels_equal_transformers_llava_padding():
    """VL-Mamba's images: padded to a square with the mean colour (LLaVA's "pad"), then resized."""
    import transformers

    from mlmamba.convert import build_processor

    config = get_preset("vlmamba-tiny")
    processor = build_processor(config, random_model("vlmamba-tiny", seed=0)[1].tokenizer)
    assert processor.image_processor.resize_strategy == "letterbox"
    llava = getattr(transformers, "LlavaImageProcessorPil", transformers.LlavaImageProcessor)(
        do_pad=True,
        size={"height": 56, "width": 56},
        do_center_crop=False,
        resample=3,
        image_mean=config.vision_config.image_mean[0],
        image_std=config.vision_config.image_std[0],
    )
    for size in [(30, 56), (70, 20), (40, 40)]:  # wide, tall, square
        image = make_image(3, size=size)
        ours = processor.image_processor(image)["pixel_values"]
        theirs = llava(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="resize_strategy='crop' is not supported"):
        type(processor.image_processor)(resize_strategy="crop")
