"""The CUDA kernel path equals the torch path (run on a GPU machine; skipped elsewhere).

On CUDA the mixers call mamba_ssm's Triton kernels (and causal_conv1d where it imports);
MLMAMBA_DISABLE_KERNELS=1 sends the same tensors through the torch code. Both must give the same
logits at prefill and at every cached decoding step, for the Mamba-2 (ML-Mamba) and Mamba-1
(Cobra, VL-Mamba) families.
"""

import pytest
import torch
from conftest import chat_inputs, make_image, spread_weights

from mlmamba.convert import random_model
from mlmamba.kernels import load_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# the kernel each family cannot do without on a GPU
NEEDED = {"mlmamba-tiny": "ssd_chunk_scan", "cobra-tiny": "selective_step", "vlmamba-tiny": "selective_step"}


@pytest.fixture(params=list(NEEDED))
def cuda_family(request):
    kernels = load_kernels()
    if kernels is None or getattr(kernels, NEEDED[request.param]) is None:
        pytest.skip(f"mamba_ssm's kernels for {request.param} do not import here")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare kernels, not matmul precisions
    torch.backends.cudnn.allow_tf32 = False
    model, processor = random_model(request.param, seed=0)
    spread_weights(model.model.language_model, seed=1)
    spread_weights(model.model.connector, seed=2)
    return model.cuda().eval(), processor


def _run(model, inputs, monkeypatch, kernels: bool):
    monkeypatch.setenv("MLMAMBA_DISABLE_KERNELS", "0" if kernels else "1")
    with torch.no_grad():
        prefill = model(**inputs).logits
        out = model.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return prefill, out.sequences, torch.stack(out.logits, dim=1)


def test_kernels_equal_the_torch_path(cuda_family, monkeypatch):
    model, processor = cuda_family
    questions = ["Which digit is this?", "Describe the image in detail, please."]
    images = [make_image(20), make_image(21)]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    batch = processor(images=images, text=prompts, padding=True)  # left padding: the masked kernel path too
    for inputs in (chat_inputs(processor, questions[0], images[0]), batch):
        inputs = {k: v.cuda() for k, v in inputs.items()}
        torch_prefill, torch_ids, torch_steps = _run(model, inputs, monkeypatch, kernels=False)
        kernel_prefill, kernel_ids, kernel_steps = _run(model, inputs, monkeypatch, kernels=True)
        torch.testing.assert_close(kernel_prefill, torch_prefill, atol=2e-3, rtol=2e-3)
        # the first step where the greedy tokens could part is compared; afterwards inputs may differ
        same = int((kernel_ids == torch_ids).all(0).long().cumprod(0).sum()) - inputs["input_ids"].shape[1]
        assert same >= 1
        torch.testing.assert_close(kernel_steps[:, :same], torch_steps[:, :same], atol=2e-3, rtol=2e-3)


def test_decode_graphs_equal_the_plain_path(cuda_family):
    """Decoding steps replayed from a CUDA graph give the eager steps' logits and tokens (greedy and beams)."""
    model, processor = cuda_family
    inputs = {k: v.cuda() for k, v in chat_inputs(processor, "Which digit is this?", make_image(22)).items()}
    kwargs = dict(
        max_new_tokens=12, do_sample=False, eos_token_id=None, output_logits=True, return_dict_in_generate=True
    )
    beams = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        plain, plain_beams = model.generate(**inputs, **kwargs), model.generate(**inputs, **beams)
        model.enable_decode_graphs()
        try:
            graphed, graphed_beams = model.generate(**inputs, **kwargs), model.generate(**inputs, **beams)
            assert model._decode_graph is not None and model._decode_graph.graph is not None  # really captured
        finally:
            model.enable_decode_graphs(False)
    torch.testing.assert_close(torch.stack(graphed.logits, 1), torch.stack(plain.logits, 1), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(graphed.sequences, plain.sequences)
    torch.testing.assert_close(graphed_beams, plain_beams)
