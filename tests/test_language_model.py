"""The Mamba-2 and Mamba-1 language models against transformers' own Mamba2ForCausalLM / MambaForCausalLM
holding the same weights."""

import copy

import pytest
import torch
from conftest import spread_weights
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from mlmamba.convert import random_model


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
    """The tiny model with every language-model weight redrawn at unit scale."""
    model = copy.deepcopy(tiny[0])
    spread_weights(model.model.language_model)
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


# --------------------------------------------------------------------------------------
# Mamba-1 (Cobra, VL-Mamba) against transformers' MambaForCausalLM
# --------------------------------------------------------------------------------------


def to_transformers_mamba(model) -> MambaForCausalLM:
    t = model.config.text_config
    mixer = model.model.language_model.layers[0].mixer
    config = MambaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.d_model,
        state_size=t.d_state,
        num_hidden_layers=t.n_layer,
        layer_norm_epsilon=t.norm_epsilon,
        expand=t.expand,
        conv_kernel=t.d_conv,
        use_bias=t.bias,
        use_conv_bias=t.conv_bias,
        time_step_rank=mixer.dt_rank,
        residual_in_fp32=t.residual_in_fp32,
        tie_word_embeddings=True,
    )
    reference = MambaForCausalLM(config).eval()
    ours = model.model.language_model.state_dict()
    theirs = {"backbone." + k.replace("embedding.", "embeddings."): v for k, v in ours.items()}
    theirs["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = reference.load_state_dict(theirs, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return reference


@pytest.fixture(scope="module")
def spread_mamba1():
    model, _ = random_model("cobra-tiny", seed=0)
    assert model.config.text_config.ssm_layer == "Mamba1"
    spread_weights(model.model.language_model)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("length", [1, 7, 40])
def test_mamba1_logits_equal_transformers_mamba(spread_mamba1, length):
    model = spread_mamba1
    reference = to_transformers_mamba(model)
    ids = torch.randint(0, 500, (2, length), generator=torch.Generator().manual_seed(length))
    ours = model(input_ids=ids).logits
    theirs = reference(input_ids=ids).logits
    assert ours.std() > 0.2
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_mamba1_state_cache_decoding_equals_transformers_mamba_generate(spread_mamba1):
    model = spread_mamba1
    reference = to_transformers_mamba(model)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = model.generate(input_ids=ids, **kwargs)
    assert len(set(ours[0, 12:].tolist())) > 1  # not one repeated token
    torch.testing.assert_close(ours, reference.generate(input_ids=ids, **kwargs))
