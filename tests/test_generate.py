"""generate() with the state cache: equal to recomputing everything, batch equal to one by one.

Every test runs for each model family (`family` in conftest): ML-Mamba (Mamba-2 + MSC), Cobra (Mamba-1 +
MLP projector) and VL-Mamba (Mamba-1 + VSS with the cross scan)."""

import torch
from conftest import chat_inputs, make_image, unit_scale_model


def _prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


GREEDY = dict(max_new_tokens=12, do_sample=False, eos_token_id=None)


@torch.no_grad()
def test_cached_greedy_equals_recomputing_the_whole_sequence(family):
    model, processor = family
    inputs = chat_inputs(processor, "Which digit is this?", make_image(0))
    cached = model.generate(**inputs, **GREEDY)
    uncached = model.generate(**inputs, **GREEDY, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 12
    torch.testing.assert_close(cached, uncached)


@torch.no_grad()
def test_cached_sampling_equals_uncached_with_the_same_seed(family):
    model, processor = family
    inputs = chat_inputs(processor, "Describe the image.", make_image(1))
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=50, top_p=0.95, eos_token_id=None)
    torch.manual_seed(3)
    cached = model.generate(**inputs, **kwargs)
    torch.manual_seed(3)
    uncached = model.generate(**inputs, **kwargs, use_cache=False)
    torch.testing.assert_close(cached, uncached)


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(family):
    model, processor = family
    questions = ["Which digit is this?", "What?", "Describe the image in detail, please."]
    images = [make_image(i) for i in range(3)]
    prompts = [_prompt(processor, q) for q in questions]
    batch = processor(images=images, text=prompts, padding=True)
    assert (batch["attention_mask"] == 0).any()
    generated = model.generate(**batch, **GREEDY)
    width = batch["input_ids"].shape[1]
    for i in range(3):
        alone = processor(images=images[i], text=prompts[i])
        expected = model.generate(**alone, **GREEDY)[0, alone["input_ids"].shape[1] :]
        torch.testing.assert_close(generated[i, width:], expected)


@torch.no_grad()
def test_beam_search_with_cache_equals_without(family):
    model, processor = family
    inputs = chat_inputs(processor, "Which digit is this?", make_image(4))
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    torch.testing.assert_close(model.generate(**inputs, **kwargs), model.generate(**inputs, **kwargs, use_cache=False))


@torch.no_grad()
def test_the_state_cache_is_constant_in_sequence_length(family):
    model, processor = family
    caches = []
    for n_words in (2, 60):
        inputs = chat_inputs(processor, " ".join(["word"] * n_words), make_image(5))
        caches.append(model(**inputs, use_cache=True).cache)
    short, long = caches
    assert long.seqlen_offset > 3 * short.seqlen_offset
    assert short.nbytes() == long.nbytes() > 0
    assert [s.shape for s in short.conv_states + short.ssm_states] == [
        s.shape for s in long.conv_states + long.ssm_states
    ]


@torch.no_grad()
def test_images_are_used_at_prefill_only(family, monkeypatch):
    model, processor = family
    calls = []
    original = model.model.vision_tower.encode
    monkeypatch.setattr(
        model.model.vision_tower, "encode", lambda pv, *args: calls.append(pv.shape) or original(pv, *args)
    )
    inputs = chat_inputs(processor, "Which digit is this?", make_image(6))
    model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert len(calls) == 1


@torch.no_grad()
def test_prefix_reuse_equals_full_recomputation(family, monkeypatch):
    """Prefill image + system prompt once; answer several questions from copies of that state."""
    model, processor = family
    image = make_image(7)
    system = [{"role": "system", "content": "You answer questions about one picture."}]
    prefix_text = processor.apply_chat_template(
        system + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ""}]}]
    )
    prefix_text = prefix_text[: prefix_text.index("<|user|>")]  # "<image><|system|>\n...<|endoftext|>\n"
    prefix = processor(images=image, text=prefix_text)
    cache = model(**prefix, use_cache=True).cache

    vision_calls = []
    original = model.model.vision_tower.forward
    monkeypatch.setattr(model.model.vision_tower, "forward", lambda pv: vision_calls.append(1) or original(pv))
    for question in ["Which digit is this?", "What color is it?", "Is it large?"]:
        full_text = prefix_text + f"<|user|>\n{question}<|endoftext|>\n<|assistant|>\n"
        assert full_text.startswith(prefix_text)
        full = processor(images=image, text=full_text)
        reused = model.generate(
            input_ids=full["input_ids"], attention_mask=full["attention_mask"], cache=cache.copy(), **GREEDY
        )
        assert not vision_calls  # neither the image nor the prefix ran again
        monkeypatch.setattr(model.model.vision_tower, "forward", original)
        recomputed = model.generate(**full, **GREEDY)
        monkeypatch.setattr(model.model.vision_tower, "forward", lambda pv: vision_calls.append(1) or original(pv))
        torch.testing.assert_close(reused, recomputed)
    # the prefix state itself was never modified by the answers
    again = model(**prefix, use_cache=True).cache
    for a, b in zip(cache.ssm_states, again.ssm_states):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_right_padded_prefill_leaves_each_rows_state_as_alone(family):
    model, processor = family
    processor_right = type(processor)(
        processor.image_processor, processor.tokenizer, chat_template=processor.chat_template
    )
    texts = ["<image>Which digit is this?", "<image>What?"]
    images = [make_image(8), make_image(9)]
    old_side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        batch = processor_right(images=images, text=texts, padding=True)
    finally:
        processor.tokenizer.padding_side = old_side
    assert (batch["attention_mask"][:, -1] == 0).any()
    cache = model(**batch, use_cache=True).cache
    for i in range(2):
        alone = model(**processor(images=images[i], text=texts[i]), use_cache=True).cache
        for layer in range(len(cache.conv_states)):
            # float rounding of batched vs single-row matmuls, relative to the states' magnitude
            conv, ssm = alone.conv_states[layer][0], alone.ssm_states[layer][0]
            torch.testing.assert_close(cache.conv_states[layer][i], conv, atol=1e-6 * conv.abs().max(), rtol=1e-5)
            torch.testing.assert_close(cache.ssm_states[layer][i], ssm, atol=1e-5 * ssm.abs().max(), rtol=1e-5)


@torch.no_grad()
def test_chunked_prefill_equals_one_pass(family, monkeypatch):
    """A prompt fed through the layers in pieces (`text_config.max_prefill_tokens`, chunked prefill) gives the
    logits, hidden states and cache states of one pass, for a left-padded batch with images, where some pieces
    are all padding for the short row; generate() then gives the same tokens."""
    model, processor = family
    prompts = [_prompt(processor, q) for q in ("What?", "Describe the image in detail, please, every part of it.")]
    batch = processor(images=[make_image(16), make_image(17)], text=prompts, padding=True)
    length = batch["input_ids"].shape[1]
    pad = int((batch["attention_mask"][0] == 0).sum())
    piece = 7
    assert pad > piece and length > 3 * piece  # whole pieces of padding, and several pieces in all

    monkeypatch.setattr(model.config.text_config, "max_prefill_tokens", 0)  # never split
    whole = model(**batch, use_cache=True, output_hidden_states=True)
    tokens = model.generate(**batch, **GREEDY)

    monkeypatch.setattr(model.config.text_config, "max_prefill_tokens", piece)
    lm = model.model.language_model
    passes = []
    original = lm._forward_layers
    monkeypatch.setattr(
        lm, "_forward_layers", lambda embeds, *a: passes.append(embeds.shape[1]) or original(embeds, *a)
    )
    pieces = model(**batch, use_cache=True, output_hidden_states=True)
    assert passes == [piece] * (length // piece) + ([length % piece] if length % piece else [])

    def close(a, b):  # float rounding of other scan chunk boundaries, relative to the magnitude
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max(), rtol=1e-5)

    tokens_only = batch["attention_mask"].bool()  # outputs at padding positions are unspecified
    close(pieces.logits[tokens_only], whole.logits[tokens_only])
    assert len(pieces.hidden_states) == len(whole.hidden_states)
    for a, b in zip(pieces.hidden_states, whole.hidden_states):
        close(a[tokens_only], b[tokens_only])
    assert pieces.cache.seqlen_offset == whole.cache.seqlen_offset == length
    for a, b in zip(
        pieces.cache.conv_states + pieces.cache.ssm_states, whole.cache.conv_states + whole.cache.ssm_states
    ):
        close(a, b)
    torch.testing.assert_close(model.generate(**batch, **GREEDY), tokens)


@torch.no_grad()
def test_streamers_repetition_penalty_stop_strings_and_eos_lists(family):
    """The generate() options of a chat UI: cached equals uncached, and the streamers see exactly the output."""
    from threading import Thread

    from transformers import TextIteratorStreamer, TextStreamer

    model, processor = family
    inputs = chat_inputs(processor, "Describe the image.", make_image(10))
    n = inputs["input_ids"].shape[1]
    penalised = dict(GREEDY, repetition_penalty=1.5)
    out = model.generate(**inputs, **penalised)
    torch.testing.assert_close(out, model.generate(**inputs, **penalised, use_cache=False))
    text = processor.tokenizer.decode(out[0, n:], skip_special_tokens=True)

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(inputs, streamer=streamer, **penalised))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == text

    printed = []
    printer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    printer.on_finalized_text = lambda chunk, stream_end=False: printed.append(chunk)
    model.generate(**inputs, streamer=printer, **penalised)
    assert "".join(printed) == text

    # A list of eos ids: generation stops at the first of them that is produced.
    stop_id = int(out[0, n + 3])
    stopped = model.generate(**inputs, **dict(penalised, eos_token_id=[stop_id, 10**6 % model.config.vocab_size]))
    assert stopped.shape[1] <= n + 4 and int(stopped[0, -1]) == stop_id

    # A stop string: generation stops once the decoded text contains it.
    words = text.strip().split()
    if words:
        stop = words[0][:2] if len(words[0]) > 1 else words[0]
        early = model.generate(
            **inputs, **dict(penalised, max_new_tokens=40), stop_strings=[stop], tokenizer=processor.tokenizer
        )
        tail = processor.tokenizer.decode(early[0, n:], skip_special_tokens=True)
        assert stop in tail and early.shape[1] <= out.shape[1]


@torch.no_grad()
def test_decode_graph_path_equals_the_plain_path(family):
    """`enable_decode_graphs()` sends each decoding step through `DecodeGraph` (a CUDA graph on a GPU, the same
    capturable step run eagerly here, `backend=None`): greedy, beam search (the cache reordered in place under the
    graph's buffers) and a left-padded batch give the plain path's tokens, and prefill still takes the images."""
    model, processor = family
    inputs = chat_inputs(processor, "Which digit is this?", make_image(13))
    prompts = [_prompt(processor, q) for q in ("What?", "Describe the image in detail, please.")]
    batch = processor(images=[make_image(14), make_image(15)], text=prompts, padding=True)
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    plain = [model.generate(**inputs, **GREEDY), model.generate(**inputs, **beams), model.generate(**batch, **GREEDY)]
    calls = []
    try:
        model.enable_decode_graphs(backend=None)
        original = model._decode_logits
        model._decode_logits = lambda ids, cache: calls.append(ids.shape) or original(ids, cache)
        graphed = [
            model.generate(**inputs, **GREEDY),
            model.generate(**inputs, **beams),
            model.generate(**batch, **GREEDY),
        ]
    finally:
        model.enable_decode_graphs(False)
        del model._decode_logits
    assert len(calls) == 11 + 7 + 11  # every decoding step after the prefill, none of the prefills
    for a, b in zip(graphed, plain):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_compiled_decode_step_equals_the_plain_path(family):
    """Off CUDA, `enable_decode_graphs()` runs each decoding step compiled by inductor (C++ code generated for
    this CPU): greedy tokens and every step's scores equal the eager path's, for one prompt with an image and a
    left-padded batch; a second generate() with a new cache reuses the compiled step (no recompile)."""
    model, processor = family
    inputs = chat_inputs(processor, "Which digit is this?", make_image(21))
    prompts = [_prompt(processor, q) for q in ("What?", "Describe the image in detail, please.")]
    batch = processor(images=[make_image(22), make_image(23)], text=prompts, padding=True)
    scored = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
    plain = [model.generate(**inputs, **scored), model.generate(**batch, **scored)]
    torch._dynamo.reset()
    try:
        model.enable_decode_graphs()
        compiled = [model.generate(**inputs, **scored), model.generate(**batch, **scored)]
        with torch.compiler.set_stance("fail_on_recompile"):
            again = model.generate(**inputs, **scored)
    finally:
        model.enable_decode_graphs(False)
        torch._dynamo.reset()
    for a, b in zip([*compiled, again], [*plain, plain[0]]):
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(torch.stack(a.scores), torch.stack(b.scores), atol=1e-4, rtol=1e-4)
    assert len({tuple(s.tolist()) for s in plain[1].sequences}) == 2  # the rows differ: a real batch


@torch.no_grad()
def test_prepacked_decode_step_equals_the_plain_path_and_follows_new_weights():
    """`enable_decode_graphs(prepack_weights=True)` freezes the weights into the compiled step (inductor's own
    matrix kernels): the same greedy tokens and scores as eager (Mamba-2 model, weights at unit scale); after the
    weights change, enabling it again compiles the new weights in, and its tokens follow them."""
    model, processor = unit_scale_model("mlmamba-tiny")  # its own: the test changes a weight
    inputs = chat_inputs(processor, "Which digit is this?", make_image(24))
    scored = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
    out_proj = model.model.language_model.layers[-1].mixer.out_proj.weight
    sequences = []
    torch._dynamo.reset()
    try:
        for change in (False, True):
            if change:
                out_proj.mul_(-1.0)  # a different last layer: other logits, other tokens
            plain = model.generate(**inputs, **scored)
            model.enable_decode_graphs(prepack_weights=True)
            packed = model.generate(**inputs, **scored)
            model.enable_decode_graphs(False)
            assert torch.equal(packed.sequences, plain.sequences)
            torch.testing.assert_close(torch.stack(packed.scores), torch.stack(plain.scores), atol=1e-4, rtol=1e-4)
            sequences.append(plain.sequences)
    finally:
        model.enable_decode_graphs(False)
        torch._dynamo.reset()
    assert not torch.equal(*sequences)  # the changed weights mattered, and the second graph had them
