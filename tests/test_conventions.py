"""The model behaves as transformers' built-in models do: config defaults, tuples, generation flags and inputs,
LLaVA's multimodal methods, caches, Auto classes, quantization. Each family (`family` in conftest) has weights at
unit scale, so that the images and the text matter."""

import json

import pytest
import torch
import transformers
from conftest import chat_inputs, make_image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, DynamicCache

from mlmamba import MLMambaConfig
from mlmamba._compat import TRANSFORMERS_5

GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


def _inputs(processor, question="Which digit is this?", seed=0):
    return dict(chat_inputs(processor, question, make_image(seed)))


@torch.no_grad()
def test_config_defaults_are_read_as_built_in_models_read_them(family):
    model, processor = family
    inputs = _inputs(processor)
    model.config.output_hidden_states = True
    try:
        out = model(**inputs)
    finally:
        model.config.output_hidden_states = False
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.text_config.n_layer + 1
    assert out.cache is not None  # use_cache defaults to the config's (True) outside training
    assert model(**inputs, use_cache=False).cache is None


def test_from_pretrained_flags_reach_the_forward(family, family_folder):
    loaded = AutoModelForImageTextToText.from_pretrained(family_folder, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        out = loaded(**_inputs(family[1]))
    assert out.hidden_states is not None and out.cache is None


@torch.no_grad()
def test_return_dict_false_returns_the_standard_tuple(family):
    model, processor = family
    inputs = _inputs(processor)
    as_dict = model(**inputs, labels=inputs["input_ids"], use_cache=False)
    loss, logits, *rest = model(**inputs, labels=inputs["input_ids"], use_cache=False, return_dict=False)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    torch.testing.assert_close(loss, as_dict.loss)
    torch.testing.assert_close(logits, as_dict.logits)
    (hidden,) = model.model(**inputs, use_cache=False, return_dict=False)[:1]
    torch.testing.assert_close(hidden, model.model(**inputs, use_cache=False).last_hidden_state)


@torch.no_grad()
def test_hidden_states_as_a_list_of_layer_indices(family):
    """As transformers does: the full-length tuple, None except at the listed layers (negative from the end)."""
    model, processor = family
    inputs = _inputs(processor)
    every = model(**inputs, output_hidden_states=True).hidden_states
    picked = model(**inputs, output_hidden_states=[0, -1]).hidden_states
    assert len(picked) == len(every)
    torch.testing.assert_close(picked[0], every[0])
    torch.testing.assert_close(picked[-1], every[-1])
    assert all(h is None for h in picked[1:-1])


@torch.no_grad()
def test_generate_returns_hidden_states_of_every_step(family):
    model, processor = family
    inputs = _inputs(processor)
    out = model.generate(**inputs, **GREEDY, output_hidden_states=True, return_dict_in_generate=True)
    assert len(out.hidden_states) == 6 and all(step is not None for step in out.hidden_states)
    prefill = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden_states[0][-1], prefill[-1])
    assert out.hidden_states[1][-1].shape[1] == 1  # later steps see one new token


@torch.no_grad()
def test_generate_from_embeddings_uses_them_at_prefill(family):
    """Embeddings of prompt B with the ids of prompt A (same length) generate what prompt B does; embeddings alone
    too. Images merged into the embeddings beforehand give the answer the pixel values give."""
    model, processor = family
    b = _inputs(processor, "Which digit is that?", 1)
    gen = torch.Generator().manual_seed(0)
    a = {"input_ids": torch.randint(0, model.config.image_token_id, b["input_ids"].shape, generator=gen)}
    merged = _merged_embeddings(model, b)
    expected = model.generate(**b, **GREEDY)[:, b["input_ids"].shape[1] :]
    mask = b["attention_mask"]
    with_ids = model.generate(input_ids=a["input_ids"], inputs_embeds=merged, attention_mask=mask, **GREEDY)
    alone = model.generate(inputs_embeds=merged, attention_mask=mask, **GREEDY)
    torch.testing.assert_close(with_ids[:, a["input_ids"].shape[1] :], expected)
    torch.testing.assert_close(alone[:, -6:], expected)
    assert not torch.equal(expected, model.generate(**a, **GREEDY)[:, a["input_ids"].shape[1] :])


def _merged_embeddings(model, inputs):
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    mask = inputs["input_ids"] == model.config.image_token_id
    return embeds.masked_scatter(mask[..., None], features)


@torch.no_grad()
def test_get_image_features_follows_llava(family):
    model, processor = family
    pixels = _inputs(processor)["pixel_values"]
    out = model.get_image_features(pixels)
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (1, model.config.num_image_tokens, model.config.text_config.d_model)
    assert out.last_hidden_state.shape[:2] == (1, model.config.num_image_tokens)
    features, embeddings = model.get_image_features(pixels, return_dict=False)
    torch.testing.assert_close(embeddings, out.pooler_output)


@torch.no_grad()
def test_inputs_embeds_with_pixel_values_find_the_image_tokens(family):
    model, processor = family
    inputs = _inputs(processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(from_embeds, model(**inputs).logits)


def test_attn_implementation_reaches_the_vision_encoders(family, family_folder):
    eager = AutoModelForImageTextToText.from_pretrained(family_folder, attn_implementation="eager").eval()
    assert {e.config._attn_implementation for e in eager.model.vision_tower.encoders} == {"eager"}
    sdpa = AutoModelForImageTextToText.from_pretrained(family_folder, attn_implementation="sdpa").eval()
    assert {e.config._attn_implementation for e in sdpa.model.vision_tower.encoders} == {"sdpa"}
    inputs = _inputs(family[1])
    with torch.no_grad():
        torch.testing.assert_close(eager(**inputs).logits, sdpa(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_vocab_size_can_be_set(family_folder):
    config = MLMambaConfig.from_pretrained(family_folder)
    config.vocab_size = 600
    assert config.text_config.vocab_size == 600
    assert MLMambaConfig.from_pretrained(family_folder, vocab_size=640).text_config.vocab_size == 640


@torch.no_grad()
def test_shift_labels_give_the_loss_of_labels(family):
    model, processor = family
    inputs = _inputs(processor)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    expected = model(**inputs, labels=labels).loss
    torch.testing.assert_close(model(**inputs, shift_labels=shifted).loss, expected)
    summed = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(3)).loss
    torch.testing.assert_close(summed, expected * int((shifted != -100).sum()) / 3)


def test_missing_vision_weights_are_drawn_as_in_a_fresh_encoder(family, family_folder, tmp_path):
    """A checkpoint without the vision tower loads the encoders' own initialisation (DINOv2's layer scale,
    LayerNorms at one; SigLIP's and CLIP's attention and MLP drawn at their own scale), not whatever memory held,
    and every other weight as saved. (transformers' common suite checks the draws exactly, seeded.)"""
    import shutil

    folder = tmp_path / "no-vision"
    shutil.copytree(family_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if ".vision_tower." not in k}
    assert len(kept) < len(tensors)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    fresh = type(loaded)(loaded.config).model.vision_tower
    for (name, p), (_, q) in zip(loaded.model.vision_tower.named_parameters(), fresh.named_parameters()):
        if name.endswith(("lambda1", "lambda2")) or "norm" in name:
            torch.testing.assert_close(p, q, msg=name)  # deterministic in a fresh encoder
        elif p.numel() >= 1024:  # random: drawn from the same distribution as in a fresh encoder
            assert 0.8 < float(p.std() / q.std()) < 1.25, (name, float(p.std()), float(q.std()))
        assert torch.isfinite(p).all(), name
    for name, p in loaded.named_parameters():
        if ".vision_tower." not in name and name in tensors:
            torch.testing.assert_close(p, tensors[name], msg=name)


@torch.no_grad()
def test_attention_outputs_are_the_vision_encoders(family):
    """The Mamba layers compute no attention: `output_attentions=True` returns the vision encoders' maps (one per
    encoder layer, as `get_image_features` gives them), and generate() refuses it clearly."""
    model, processor = family
    inputs = _inputs(processor)
    assert model(**inputs, output_attentions=True).attentions is None  # sdpa computes no maps: a warning says so
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
        reference = model.get_image_features(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    layers = sum(e.config.num_hidden_layers for e in model.model.vision_tower.encoders)
    assert len(out.attentions) == layers
    for a, b in zip(out.attentions, reference):
        torch.testing.assert_close(a, b)
    assert model(**inputs).attentions is None
    with pytest.raises(ValueError, match="no attention weights"):
        model.generate(**inputs, **GREEDY, output_attentions=True, return_dict_in_generate=True)


def test_image_features_carry_the_vision_hidden_states(family):
    model, processor = family
    with torch.no_grad():
        out = model.get_image_features(_inputs(processor)["pixel_values"], output_hidden_states=True)
    depth = model.model.vision_tower.encoders[0].config.num_hidden_layers
    assert len(out.hidden_states) == depth + 1
    feature_layer = model.config.vision_config.feature_layer
    torch.testing.assert_close(out.hidden_states[feature_layer], out.last_hidden_state)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 5's Cache API")
@torch.no_grad()
def test_transformers_caches_hold_the_state(family):
    """The state cache is a transformers `Cache` of linear-attention layers, and `DynamicCache()` or
    `DynamicCache(config=model.config)` given to generate() holds the same states and gives the same tokens."""
    model, processor = family
    inputs = _inputs(processor)
    expected = model.generate(**inputs, **GREEDY)
    assert isinstance(model.new_cache(1), transformers.Cache)
    for cache in (DynamicCache(), DynamicCache(config=model.config)):
        torch.testing.assert_close(model.generate(**inputs, **GREEDY, past_key_values=cache), expected)
        assert len(cache.layers) == model.config.text_config.n_layer
        assert cache.has_previous_state()
        assert cache.get_conv_state(0) is not None and cache.get_recurrent_state(0) is not None
    out = model(**inputs, past_key_values=DynamicCache(config=model.config))
    torch.testing.assert_close(out.logits, model(**inputs).logits)
    from transformers.cache_utils import DynamicLayer

    with pytest.raises(ValueError, match="recurrent state per layer"):
        model(**inputs, past_key_values=transformers.Cache(layers=[DynamicLayer()]))


def test_auto_map_names_every_auto_class_llava_has(family_folder):
    auto_map = json.loads((family_folder / "config.json").read_text())["auto_map"]
    for name in ("AutoModel", "AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForMultimodalLM"):
        assert auto_map[name].startswith("modeling_mlmamba."), name
    if hasattr(transformers, "AutoModelForMultimodalLM"):
        model = transformers.AutoModelForMultimodalLM.from_pretrained(family_folder, trust_remote_code=True)
        assert type(model).__name__ == "MLMambaForConditionalGeneration"


@torch.no_grad()
def test_dynamic_int8_quantization_runs_and_stays_close(family):
    import copy

    model, processor = family
    inputs = _inputs(processor)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    reference, logits = model(**inputs).logits, quantized(**inputs).logits
    assert torch.corrcoef(torch.stack([reference.flatten(), logits.flatten()]))[0, 1] > 0.95
    assert quantized.generate(**inputs, **GREEDY).shape[1] == inputs["input_ids"].shape[1] + 6
