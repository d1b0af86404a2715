"""No silent wrong answers: threads, beams with several images, strict loading, padding, prefix caches, bad ids,
labels that teach nothing. Each family (`family` in conftest) has weights at unit scale, so that a wrong image or
a dropped token changes the answer."""

import json
import shutil
import threading

import pytest
import torch
from conftest import chat_inputs, make_image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from mlmamba import MLMambaConfig

GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


def _two_images(processor, seeds=(0, 1)):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[make_image(s) for s in seeds], text=prompt))


@torch.no_grad()
def test_concurrent_generate_calls_see_their_own_images(family):
    """Four threads generating about four images on one model each get the logits they get alone."""
    model, processor = family
    inputs = [dict(chat_inputs(processor, "Which digit is this?", make_image(seed))) for seed in (5, 6, 7, 8)]
    kwargs = dict(GREEDY, output_logits=True, return_dict_in_generate=True)

    def logits(x):
        return torch.stack(model.generate(**x, **kwargs).logits, 1)

    alone = [logits(x) for x in inputs]
    assert not torch.allclose(alone[0][:, 0], alone[1][:, 0], atol=1e-3)  # the image matters
    results = [None] * len(inputs)

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = logits(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(results, alone):
        torch.testing.assert_close(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["beams", "samples"])
def test_beams_and_returned_sequences_see_their_rows_images(family, mode):
    """With two images in a prompt, every beam or returned sequence sees both, in order: the same as generating
    from the embeddings with the images already merged (which generate() expands row by row)."""
    model, processor = family
    inputs = _two_images(processor)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    merged = embeds.masked_scatter((inputs["input_ids"] == model.config.image_token_id)[..., None], features)
    kwargs = (
        dict(GREEDY, num_beams=2, num_return_sequences=2)
        if mode == "beams"
        else dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, eos_token_id=None)
    )
    torch.manual_seed(0)
    with_pixels = model.generate(**inputs, **kwargs)[:, -6:]
    torch.manual_seed(0)
    reference = model.generate(
        input_ids=inputs["input_ids"], inputs_embeds=merged, attention_mask=inputs["attention_mask"], **kwargs
    )[:, -6:]
    torch.testing.assert_close(with_pixels, reference)


def _folder_with(family_folder, tmp_path, edit_tensors=None, edit_config=None):
    folder = tmp_path / "edited"
    shutil.copytree(family_folder, folder)
    if edit_tensors:
        tensors = edit_tensors(load_file(folder / "model.safetensors"))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_missing_or_extra_weights_refuse_to_load(family_folder, tmp_path):
    def drop_one(tensors):
        key = next(k for k in tensors if ".language_model.layers.0.mixer.in_proj" in k)
        return {k: v for k, v in tensors.items() if k != key}

    with pytest.raises(
        ValueError, match=r"1 missing from the checkpoint: .*language_model\.layers\.0\.mixer\.in_proj"
    ):
        AutoModelForImageTextToText.from_pretrained(_folder_with(family_folder, tmp_path / "a", drop_one))
    more_layers = _folder_with(family_folder, tmp_path / "b", edit_config=lambda c: c["text_config"].update(n_layer=3))
    with pytest.raises(ValueError, match="missing from the checkpoint: .*layers.2"):
        AutoModelForImageTextToText.from_pretrained(more_layers)
    fewer = _folder_with(family_folder, tmp_path / "c", edit_config=lambda c: c["text_config"].update(n_layer=1))
    with pytest.raises(ValueError, match="in the checkpoint but not in the model: .*layers.1"):
        AutoModelForImageTextToText.from_pretrained(fewer)
    with pytest.raises(ValueError, match="n_layer=-1 must be a positive integer"):
        AutoModelForImageTextToText.from_pretrained(
            _folder_with(family_folder, tmp_path / "d", edit_config=lambda c: c["text_config"].update(n_layer=-1))
        )
    with pytest.raises(ValueError, match="no text_config"):
        AutoModelForImageTextToText.from_pretrained(
            _folder_with(family_folder, tmp_path / "e", edit_config=lambda c: c.pop("text_config"))
        )


def test_a_config_refuses_non_positive_sizes():
    with pytest.raises(ValueError, match="d_model=0"):
        MLMambaConfig(text_config={"d_model": 0})


@torch.no_grad()
def test_right_padded_generation_is_refused_with_the_fix(family):
    model, processor = family
    prompts = [
        processor.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        for q in ("a", "a longer one")
    ]
    batch = processor(text=prompts, padding=True, padding_side="right")
    with pytest.raises(ValueError, match="pad prompts on the left"):
        model.generate(**batch, **GREEDY)


@torch.no_grad()
def test_a_prefix_cache_refuses_misuse(family):
    model, processor = family
    prefix = "<image><|system|>\nYou answer questions about one picture.<|endoftext|>\n"
    image = make_image(3)
    cache = model(**processor(images=image, text=prefix), use_cache=True).cache
    full = processor(images=image, text=prefix + "<|user|>\nWhat is it?<|endoftext|>\n<|assistant|>\n")
    question_only = processor(text="<|user|>\nWhat is it?<|endoftext|>\n<|assistant|>\n")
    ids, mask = full["input_ids"], full["attention_mask"]
    first = model.generate(input_ids=ids, attention_mask=mask, cache=cache.copy(), **GREEDY)
    torch.testing.assert_close(model.generate(input_ids=ids, attention_mask=mask, cache=cache.copy(), **GREEDY), first)
    used = cache.copy()
    model.generate(input_ids=ids, attention_mask=mask, cache=used, **GREEDY)
    with pytest.raises(ValueError, match="cache.copy()"):
        model.generate(input_ids=ids, attention_mask=mask, cache=used, **GREEDY)  # reused after it moved on
    with pytest.raises(ValueError, match="prefix"):
        q = question_only
        model.generate(input_ids=q["input_ids"], attention_mask=q["attention_mask"], cache=cache.copy(), **GREEDY)


@torch.no_grad()
def test_bad_ids_and_foreign_caches_get_clear_errors(family):
    model, processor = family
    vocab = model.config.text_config.vocab_size
    with pytest.raises(ValueError, match=r"token ids in \[0, "):
        model(input_ids=torch.tensor([[1, vocab + 5]]))
    with pytest.raises(ValueError, match=r"token ids in \[0, "):
        model(input_ids=torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        model(input_ids=torch.zeros(1, 0, dtype=torch.long))
    from mlmamba.convert import random_model

    other = random_model("cobra-tiny" if model.config.text_config.ssm_layer == "Mamba2" else "mlmamba-tiny")[0]
    with pytest.raises(ValueError, match="made for another model"):
        model(input_ids=torch.tensor([[1, 2]]), cache=other.new_cache(1))


def test_labels_that_teach_nothing_give_zero_and_a_warning(family, caplog):
    model, processor = family
    inputs = dict(chat_inputs(processor, "Which digit is this?", make_image(0)))
    labels = torch.full_like(inputs["input_ids"], -100)
    model.train()
    try:
        loss = model(**inputs, labels=labels).loss
    finally:
        model.eval()
    assert torch.isfinite(loss) and float(loss) == 0.0
    loss.backward()  # still a graph: the Trainer's step works
    model.zero_grad()
    assert "1 of 1 rows carry no label" in caplog.text
