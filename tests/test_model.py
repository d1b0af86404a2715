"""MLMambaForConditionalGeneration: image placement, vision features, loss, gradients, batching, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import chat_inputs, make_image

from mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
from mlmamba.presets import IMAGENET_MEAN, IMAGENET_STD, PRESETS, get_preset

# The original transform resizes PIL images (torchvision's Resize on a PIL image calls PIL), so the
# reference is transformers' PIL image processors: named *Pil in transformers 5, the default in 4.x.
CLIPImageProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
SiglipImageProcessor = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)


def test_image_tokens_follow_the_vision_geometry(tiny):
    model, processor = tiny
    assert model.config.num_image_tokens == (42 // 14) ** 2 == processor.num_image_tokens
    assert get_preset("mlmamba-3b").num_image_tokens == 729


def test_processor_pixels_equal_transformers_image_processors(tiny):
    """resize-naive (bicubic, no crop) + per-encoder mean/std, checked against transformers' processors."""
    _, processor = tiny
    image = make_image(0, size=(70, 50))
    ours = processor.image_processor(image)["pixel_values"]
    assert ours.shape == (1, 6, 42, 42)
    dino = CLIPImageProcessor(
        size={"height": 42, "width": 42},
        do_center_crop=False,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=3,
    )(image, return_tensors="pt")["pixel_values"]
    siglip = SiglipImageProcessor(size={"height": 42, "width": 42}, resample=3)(image, return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(ours[:, :3], dino, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, 3:], siglip, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vision_features_are_second_to_last_layer_patches_fused_on_channels(tiny):
    model, processor = tiny
    pixels = processor.image_processor([make_image(1), make_image(2)])["pixel_values"]
    dino, siglip = model.model.vision_tower.encoders
    h_dino = dino(pixel_values=pixels[:, :3], output_hidden_states=True).hidden_states
    h_siglip = siglip(pixel_values=pixels[:, 3:], output_hidden_states=True).hidden_states
    assert h_dino[-2].shape[1] == 1 + 4 + 9 and h_siglip[-2].shape[1] == 9  # CLS + 4 registers dropped
    expected = torch.cat([h_dino[-2][:, 5:], h_siglip[-2]], dim=-1)
    torch.testing.assert_close(model.model.vision_tower(pixels), expected)


@torch.no_grad()
@pytest.mark.parametrize("position", ["first", "middle"])
def test_image_embeddings_replace_the_image_tokens_where_they_stand(tiny, position):
    model, processor = tiny
    text = "<image>Which digit?" if position == "first" else "Look: <image> Which digit?"
    inputs = processor(images=make_image(3), text=text)
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids).clone()
    is_image = ids[0] == model.config.image_token_id
    embeds[0, is_image] = model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    expected = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(**inputs).logits, expected)
    # The image really matters: another image gives other logits.
    other = processor(images=make_image(4), text=text)
    assert not torch.allclose(model(**other).logits, expected)


@torch.no_grad()
def test_text_only_input(tiny):
    model, processor = tiny
    inputs = processor(text="Hello there")
    assert "pixel_values" not in inputs
    logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_batch_with_left_padding_equals_one_by_one(tiny):
    model, processor = tiny
    questions = ["Which digit is this?", "What?", "Describe the image in detail please."]
    images = [make_image(i) for i in range(3)]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    batch = processor(images=images, text=prompts, padding=True)
    assert processor.tokenizer.padding_side == "left"
    batched = model(**batch).logits
    for i in range(3):
        alone = model(**processor(images=images[i], text=prompts[i])).logits[0]
        torch.testing.assert_close(batched[i, -alone.shape[0] :], alone, atol=1e-5, rtol=1e-5)


def test_loss_is_shifted_cross_entropy_over_answer_tokens(tiny):
    model, processor = tiny
    inputs = chat_inputs(processor, "Which digit is this?", make_image(5), answer="seven")
    labels = inputs["input_ids"].clone()
    labels[:, :20] = -100
    out = model(**inputs, labels=labels)
    targets = labels[:, 1:].clone()
    targets[inputs["input_ids"][:, 1:] == model.config.image_token_id] = -100
    expected = F.cross_entropy(out.logits[0, :-1], targets[0], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # image token positions never carry loss, even when the labels do not mask them
    plain = model(**inputs, labels=inputs["input_ids"]).loss
    keep = inputs["input_ids"][:, 1:] != model.config.image_token_id
    expected_plain = F.cross_entropy(out.logits[0, :-1][keep[0]], inputs["input_ids"][0, 1:][keep[0]])
    torch.testing.assert_close(plain, expected_plain)


def test_gradients_reach_connector_and_lm_but_not_frozen_vision(tiny):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    inputs = chat_inputs(processor, "Which digit is this?", make_image(6), answer="seven")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in (
        "model.connector.mlp.",
        "model.connector.msc.",
        "model.connector.projector.",
        "model.language_model.",
    ):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), prefix
    # every MSC mixer parameter of both directions is trained
    for n, g in grads.items():
        if ".msc.layers.0.mixer." in n:
            assert g is not None and g.abs().sum() > 0, n
    vision = [n for n in grads if n.startswith("model.vision_tower.")]
    assert vision and all(grads[n] is None for n in vision)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    processor = tiny[1]
    inputs = chat_inputs(processor, "Which digit is this?", make_image(7), answer="seven")
    results = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny[0]).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], atol=1e-6, rtol=1e-5)


def test_resize_token_embeddings_keeps_the_head_tied(tiny):
    model = copy.deepcopy(tiny[0])
    model.resize_token_embeddings(600)
    assert model.get_input_embeddings().weight.shape[0] == 600 == model.config.text_config.vocab_size
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model(input_ids=torch.tensor([[599, 3]])).logits.shape[-1] == 600


@torch.no_grad()
def test_save_and_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    loaded = MLMambaForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = chat_inputs(processor, "Which digit is this?", make_image(8))
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    assert not any(p.requires_grad for p in loaded.model.vision_tower.parameters())


# ---------------------------------------------------------------------------------- bad input


def test_image_count_not_matching_image_tokens(tiny):
    model, processor = tiny
    inputs = processor(images=[make_image(1), make_image(2)], text="<image><image>two images")
    with pytest.raises(ValueError, match=r"1 image\(s\), which need 9 image tokens.*holds 18"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="18 image tokens but no pixel_values"):
        model(input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"got 2 image\(s\) but 1 <image> marker"):
        processor(images=[make_image(1), make_image(2)], text="<image> only one marker")
    with pytest.raises(ValueError, match=r"got 1 image\(s\) but 0 <image>"):
        processor(images=make_image(1), text="no marker")


def test_wrong_pixel_values(tiny):
    model, processor = tiny
    ids = processor(images=make_image(1), text="<image>x")["input_ids"]
    with pytest.raises(ValueError, match=r"shape \(num_images, 6, 42, 42\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 42, 42))
    with pytest.raises(ValueError, match=r"shape \(num_images, 6, 42, 42\)"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 6, 64, 64))


def test_unknown_config_values_are_refused():
    base = PRESETS["mlmamba-tiny"]()
    with pytest.raises(
        ValueError,
        match=r"connector_type='transformer' is not supported; "
        r"use one of \['msc', 'mlp', 'mlp2x', 'vss-mlp', 'vss-l2'\]",
    ):
        MLMambaConfig(**{**base, "connector_config": {"connector_type": "transformer"}})
    with pytest.raises(ValueError, match="scan='zigzag' is not supported"):
        MLMambaConfig(**{**base, "connector_config": {"scan": "zigzag"}})
    vision = copy.deepcopy(base["vision_config"])
    vision["encoders"][0]["model_type"] = "resnet"
    with pytest.raises(ValueError, match="vision encoder model_type='resnet' is not supported"):
        MLMambaConfig(**{**base, "vision_config": vision})
    vision = copy.deepcopy(base["vision_config"])
    vision["encoders"][1]["image_size"] = 56
    with pytest.raises(ValueError, match="must share image_size and patch_size"):
        MLMambaConfig(**{**base, "vision_config": vision})
    with pytest.raises(ValueError, match="feature_layer=9 does not select a layer output"):
        MLMambaConfig(**{**base, "vision_config": {**base["vision_config"], "feature_layer": 9}})
    with pytest.raises(ValueError, match="image_token_id=9999 must index the embedding"):
        MLMambaConfig(**{**base, "image_token_id": 9999})
    with pytest.raises(ValueError, match="must split into heads"):
        MLMambaConfig(**{**base, "text_config": {**base["text_config"], "headdim": 48}})
    with pytest.raises(ValueError, match=r"max_prefill_tokens=-1: use a number of tokens, 0 to never split"):
        MLMambaConfig(**{**base, "text_config": {**base["text_config"], "max_prefill_tokens": -1}})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("mlmamba-7b")


def test_unknown_forward_arguments_are_refused(tiny):
    model, processor = tiny
    inputs = processor(text="hello")
    with pytest.raises(TypeError, match=r"unexpected arguments \['pixel_value'\]"):
        model(**inputs, pixel_value=torch.zeros(1))
    assert model(**inputs, output_attentions=True).attentions is None  # no image: no vision attention either


@pytest.mark.parametrize("preset", ["mlmamba-tiny", "cobra-tiny", "vlmamba-tiny"])
def test_every_checkpointed_layer_is_a_shard_unit(preset):
    """Each layer that gradient checkpointing wraps (Mamba blocks, MSC and VSS layers, encoder layers) is in
    `_no_split_modules`, so FSDP and device maps keep it whole."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = MLMambaForConditionalGeneration(get_preset(preset))
    layers = {type(m).__name__ for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    assert layers and layers <= set(model._no_split_modules), layers - set(model._no_split_modules)


def test_text_only_input_is_the_language_model_on_the_embeddings(tiny):
    """Without images the composite is the language model and the head, nothing else."""
    model, processor = tiny
    ids = processor(text="a question without any image")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden, _ = model.model.language_model(model.model.language_model.embedding(ids))
    torch.testing.assert_close(logits, model.lm_head(hidden), atol=0, rtol=0)
