"""`torch.compile(model, fullgraph=True)` captures a whole prefill as one graph, and it computes what eager does.

For each family (Mamba-2 + MSC, Mamba-1 + MLP, Mamba-1 + VSS), with weights at unit scale:

* an image prompt's prefill (pixel_values, attention_mask, use_cache=True) compiles with `fullgraph=True`, which
  raises at any graph break: no data-dependent check, cache bookkeeping or hook installation breaks the graph.
  Its logits equal eager's, and the cache it returns (made inside the graph) continues greedy decoding with the
  tokens and logits the eager prefill's cache gives;
* a text-only prefill (use_cache=False) compiles the same way and equals eager;
* the validation checks are still in the compiled graph: an image token without an image raises there too;
* a model compiled before any eager call is one graph too: the vision encoders' output hooks, which transformers 5
  installs behind a lock at the first call, are installed when the model is built.

The backend is "aot_eager": dynamo captures the graph it captures for inductor, and AOTAutograd functionalizes the
in-place state updates as on inductor's path, without inductor's C++ code generation, which is slow on a CPU.
`MLMAMBA_COMPILE_BACKEND=inductor` runs the same tests through inductor.
"""

import os

import pytest
import torch
from conftest import FAMILIES, chat_inputs, make_image

from mlmamba.convert import random_model

BACKEND = os.environ.get("MLMAMBA_COMPILE_BACKEND", "aot_eager")
DECODE_STEPS = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its family's model anew: graphs of another model or test would only add recompiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model):
    return torch.compile(model, fullgraph=True, backend=BACKEND, dynamic=False)


def greedy_continuation(model, logits, cache, steps=DECODE_STEPS):
    """Eager greedy decoding from a prefill's last logits and cache: the tokens, and the logits of the last step."""
    tokens = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
    return torch.cat(tokens, 1), logits


@torch.no_grad()
def test_compiled_image_prefill_is_one_graph_and_its_cache_decodes_as_eager(family):
    model, processor = family
    inputs = dict(chat_inputs(processor, "Which digit is this?", make_image(3)))
    assert "pixel_values" in inputs and "attention_mask" in inputs

    eager = model(**inputs, use_cache=True)
    out = compiled(model)(**inputs, use_cache=True)
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert out.cache is not None and out.cache is not eager.cache
    assert out.cache.get_seq_length() == eager.cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert torch.equal(out.cache.token_ids, eager.cache.token_ids)

    eager_tokens, eager_last = greedy_continuation(model, eager.logits, eager.cache)
    tokens, last = greedy_continuation(model, out.logits, out.cache)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(last, eager_last, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_text_prefill_is_one_graph_and_keeps_its_checks(family):
    model, processor = family
    inputs = dict(chat_inputs(processor, "Name a digit."))
    assert "pixel_values" not in inputs

    run = compiled(model)
    out = run(**inputs, use_cache=False)
    assert out.cache is None
    torch.testing.assert_close(out.logits, model(**inputs, use_cache=False).logits, atol=1e-5, rtol=1e-5)

    # An image token without an image: a ValueError in eager calls, a failed runtime check in the compiled graph
    # (the same shapes: the graph above runs again).
    stray = inputs["input_ids"].clone()
    stray[0, 1] = model.config.image_token_id
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(**{**inputs, "input_ids": stray}, use_cache=False)
    with pytest.raises(RuntimeError):
        run(**{**inputs, "input_ids": stray}, use_cache=False)


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_a_fresh_vision_tower_compiles_as_one_graph(name):
    model, processor = random_model(name, seed=0)  # not the session's model: no eager call has run on it
    tower = model.model.vision_tower
    pixel_values = chat_inputs(processor, "Which digit is this?", make_image(4))["pixel_values"]
    features = compiled(tower)(pixel_values)
    torch.testing.assert_close(features, tower(pixel_values), atol=1e-5, rtol=1e-5)
