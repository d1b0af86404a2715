"""The Mamba-2 and Mamba-1 language models against transformers' own Mamba2ForCausalLM / MambaForCausalLM
holding the same weights."""

import pytest
import torch
from conftest import spread_weights
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mlmamba.convert import random_model


def _reference_config(model):
    """transformers' Mamba2Config / MambaConfig of our language model."""
    t = model.config.text_config
    shared = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.d_model,
        state_size=t.d_state,
        num_hidden_layers=t.n_layer,
        layer_norm_epsilon=t.norm_epsilon,
        expand=t.expand,
        conv_kernel=t.d_conv,
        use_bias=t.bias,
        use_conv_bias=t.conv_bias,
        residual_in_fp32=t.residual_in_fp32,
        tie_word_embeddings=True,
    )
    if t.ssm_layer == "Mamba1":
        return MambaForCausalLM, MambaConfig(
            time_step_rank=model.model.language_model.layers[0].mixer.dt_rank, **shared
        )
    d_inner = t.expand * t.d_model
    config = Mamba2Config(
        num_heads=d_inner // t.headdim, head_dim=t.headdim, n_groups=t.ngroups, chunk_size=t.chunk_size, **shared
    )
    return Mamba2ForCausalLM, config


def to_transformers(model):
    """transformers' Mamba2ForCausalLM or MambaForCausalLM holding our language model's weights (same names
    but `embeddings` and the `backbone.` prefix)."""
    cls, config = _reference_config(model)
    reference = cls(config).eval()
    ours = model.model.language_model.state_dict()
    theirs = {"backbone." + k.replace("embedding.", "embeddings."): v for k, v in ours.items()}
    theirs["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = reference.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return reference


@pytest.fixture(scope="module", params=["mlmamba-tiny", "cobra-tiny"])  # Mamba-2, Mamba-1
def pair(request):
    """A tiny model with every language-model weight redrawn at unit scale (initial weights are so small that
    the logits barely depend on the mixers), and transformers' model holding the same weights."""
    model, _ = random_model(request.param, seed=0)
    spread_weights(model.model.language_model)
    model.eval()
    return model, to_transformers(model)


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 40])  # below, at and above the Mamba-2 chunk size (16)
def test_logits_equal_transformers(pair, length):
    model, reference = pair
    ids = torch.randint(0, 500, (2, length), generator=torch.Generator().manual_seed(length))
    ours = model(input_ids=ids).logits
    theirs = reference(input_ids=ids).logits
    assert ours.std() > 0.2  # the comparison is only meaningful if the logits carry signal
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_state_cache_decoding_equals_transformers_generate(pair):
    model, reference = pair
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = model.generate(input_ids=ids, **kwargs)
    assert len(set(ours[0, 12:].tolist())) > 1  # not one repeated token
    torch.testing.assert_close(ours, reference.generate(input_ids=ids, **kwargs))
