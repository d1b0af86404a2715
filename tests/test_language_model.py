"""The Mamba-2 language model against transformers' own Mamba2ForCausalLM holding the same weights."""

import copy

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM


def to_transformers_mamba2(model) -> Mamba2ForCausalLM:
    t = model.config.text_config
    d_inner = t.expand * t.d_model
    config = Mamba2Config(
        num_heads=d_inner // t.headdim,
        head_dim=t.headdim,
        vocab_size=t.vocab_size,
        hidden_size=t.d_model,
        state_size=t.d_state,
        num_hidden_layers=t.n_layer,
        layer_norm_epsilon=t.norm_epsilon,
        expand=t.expand,
        conv_kernel=t.d_conv,
        n_groups=t.ngroups,
        use_bias=t.bias,
        use_conv_bias=t.conv_bias,
        residual_in_fp32=t.residual_in_fp32,
        chunk_size=t.chunk_size,
        tie_word_embeddings=True,
    )
    reference = Mamba2ForCausalLM(config).eval()
    ours = model.model.language_model.state_dict()
    theirs = {"backbone." + k.replace("embedding.", "embeddings."): v for k, v in ours.items()}
    theirs["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = reference.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return reference


@pytest.fixture(scope="module")
def spread(tiny):
    """The tiny model with every language-model weight redrawn at unit scale: initial weights are so
    small that the logits barely depend on the mixers, and a comparison would prove little."""
    model = copy.deepcopy(tiny[0])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.language_model.named_parameters():
            scale = 1 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 40])  # below, at and above the chunk size (16)
def test_logits_equal_transformers_mamba2(spread, length):
    model = spread
    reference = to_transformers_mamba2(model)
    ids = torch.randint(0, 500, (2, length), generator=torch.Generator().manual_seed(length))
    ours = model(input_ids=ids).logits
    theirs = reference(input_ids=ids).logits
    assert ours.std() > 0.2  # the comparison is only meaningful if the logits carry signal
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_state_cache_decoding_equals_transformers_mamba2_generate(spread):
    model = spread
    reference = to_transformers_mamba2(model)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.testing.assert_close(model.generate(input_ids=ids, **kwargs), reference.generate(input_ids=ids, **kwargs))
