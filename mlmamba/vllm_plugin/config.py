"""The configs vLLM needs: the language model in transformers' Mamba names, and the engine-config hook.

vLLM's `Mamba2ForCausalLM` / `MambaForCausalLM` read transformers' `Mamba2Config` / `MambaConfig` fields
(hidden_size, num_heads, head_dim, state_size, n_groups, conv_kernel, ...); a saved folder's `text_config`
has mamba_ssm's names (d_model, headdim, d_state, ngroups, d_conv, ...). `language_model_config` translates.
`MLMambaEngineConfig` is the architecture's entry in vLLM's `MODELS_CONFIG_MAP`: vLLM asks it to set up the
Mamba cache (`mamba_block_size`) of an attention-free model, and it refuses folders vLLM cannot run, in the
process that builds the engine config, so the error reaches the caller of `LLM(...)` or `vllm serve`.
"""

import math

import torch
from transformers import Mamba2Config, MambaConfig, PretrainedConfig
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, MambaModelConfig
from vllm.transformers_utils import config as vllm_hf_configs

from ..configuration_mlmamba import MLMambaConfig


def package_config(hf_config: PretrainedConfig) -> MLMambaConfig:
    """This package's `MLMambaConfig` of the config vLLM loaded: `MLMambaConfigForVllm` is one, an instance of a
    folder's copy of the class (remote code) is converted. The plugin builds this package's modules from it."""
    if isinstance(hf_config, MLMambaConfig):
        return hf_config
    return MLMambaConfig.from_dict(hf_config.to_dict())


def language_model_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model of an MLMamba config as transformers' `Mamba2Config` (ssm_layer "Mamba2") or
    `MambaConfig` ("Mamba1"), the configs vLLM's Mamba models are built from."""
    config = package_config(config)
    text = config.text_config
    # transformers 5 configs hold special token ids only where they were set: the text config, or the top one
    tokens = {
        name: next((v for v in (getattr(text, name, None), getattr(config, name, None)) if v is not None), None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    common = dict(
        vocab_size=text.vocab_size,
        hidden_size=text.d_model,
        num_hidden_layers=text.n_layer,
        state_size=text.d_state,
        expand=text.expand,
        conv_kernel=text.d_conv,
        use_bias=text.bias,
        use_conv_bias=text.conv_bias,
        layer_norm_epsilon=text.norm_epsilon,
        hidden_act="silu",
        residual_in_fp32=text.residual_in_fp32,
        tie_word_embeddings=text.tie_word_embeddings,
        **tokens,
    )
    if text.ssm_layer == "Mamba1":
        dt_rank = math.ceil(text.d_model / 16) if text.dt_rank == "auto" else text.dt_rank
        lm = MambaConfig(intermediate_size=text.expand * text.d_model, time_step_rank=dt_rank, **common)
        lm.architectures = ["MambaForCausalLM"]
    else:
        lm = Mamba2Config(
            num_heads=text.expand * text.d_model // text.headdim,
            head_dim=text.headdim,
            n_groups=text.ngroups,
            chunk_size=text.chunk_size,
            **common,
        )
        lm.architectures = ["Mamba2ForCausalLM"]
    lm.dtype = getattr(config, "dtype", None) or torch.float32
    return lm


def mamba1_scan_available() -> bool:
    """Whether this vLLM build has Mamba-1's selective scan (its CUDA/ROCm and XPU builds; the CPU build has
    only the single-step state update)."""
    from vllm.platforms import current_platform

    if current_platform.is_xpu():
        return True
    try:
        import vllm._custom_ops  # noqa: F401  (loads the build's compiled ops into torch.ops._C)
    except ImportError:
        return False
    return hasattr(torch.ops._C, "selective_scan_fwd")


def check_servable(config: PretrainedConfig) -> None:
    """Raise a ValueError that says why, for a folder vLLM's Mamba layers cannot run exactly."""
    config = package_config(config)
    text = config.text_config
    if text.ssm_layer == "Mamba1" and not mamba1_scan_available():
        from vllm.platforms import current_platform

        raise ValueError(
            "this folder's language model is a Mamba-1 (text_config.ssm_layer='Mamba1': Cobra, VL-Mamba), and "
            f"this vLLM build ({current_platform.device_name or current_platform.device_type}) has no Mamba-1 "
            "selective-scan kernel: vLLM's CPU build runs only Mamba-2. Serve Mamba-1 families with a GPU build "
            "of vLLM, or run them here with transformers (AutoModelForImageTextToText, trust_remote_code=True)"
        )
    if text.ssm_layer == "Mamba2" and text.dt_limit is not None:
        raise ValueError(
            f"text_config.dt_limit={text.dt_limit}: vLLM's Mamba-2 kernels clamp no step size (dt_limit None, "
            "as every released Mamba-2), so this folder would give other results under vLLM"
        )


class MLMambaConfigForVllm(MLMambaConfig):
    """This package's `MLMambaConfig`, which vLLM loads for model_type "mlmamba" in place of the folder's copy
    (`register_config_class`): its text config answers vLLM's question for attention heads, which vLLM asks of
    every multimodal model's text config. A Mamba has none: 0, which vLLM reads as "no attention"."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_config.num_attention_heads = 0


def register_config_class() -> None:
    """Make vLLM load folders of model_type "mlmamba" as `MLMambaConfigForVllm` (vLLM's registry of config
    classes, which it prefers to remote code; the processor and tokenizer still load from the folder)."""
    vllm_hf_configs._CONFIG_REGISTRY[MLMambaConfig.model_type] = MLMambaConfigForVllm


class MLMambaEngineConfig(MambaModelConfig):
    """vLLM's Mamba engine settings (cache mode, `mamba_block_size`), after refusing what cannot run."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        check_servable(vllm_config.model_config.hf_config)
        super().verify_and_update_config(vllm_config)


def register_engine_config(architecture: str) -> None:
    """Add the architecture to vLLM's `MODELS_CONFIG_MAP`: an out-of-tree attention-free model is not in it, and
    the engine then asserts on an unset `mamba_block_size`."""
    MODELS_CONFIG_MAP[architecture] = MLMambaEngineConfig
