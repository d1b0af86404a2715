"""ML-Mamba, Cobra and VL-Mamba as a vLLM model.

    pixel_values (n_images, 3 * n_encoders, H, W)
      -> vision_tower   this package's MLMambaVisionTower                 embed_multimodal
      -> connector      this package's MLMambaConnector (MSC, MLP, VSS)   embed_multimodal
      -> scattered over the image tokens of the prompt                    embed_input_ids (vLLM's merge)
      -> language_model vLLM's Mamba2ForCausalLM (MambaMixer2) or MambaForCausalLM (MambaMixer),
                        with vLLM's state cache and kernels

The weights load from the folder as `save_pretrained` wrote it (`model.vision_tower.`, `model.connector.`,
`model.language_model.` in mamba_ssm's names, `lm_head.`), renamed to the modules above.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree, SupportsMultiModal
from vllm.model_executor.models.mamba import MambaForCausalLM
from vllm.model_executor.models.mamba2 import Mamba2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from ..connectors import MLMambaConnector
from ..vision_tower import MLMambaVisionTower
from .config import check_servable, language_model_config, package_config
from .processing import IMAGE_TOKEN, MLMambaDummyInputsBuilder, MLMambaMultiModalProcessor, MLMambaProcessingInfo

# vLLM's language model class by `text_config.ssm_layer`.
LANGUAGE_MODELS = {"Mamba2": Mamba2ForCausalLM, "Mamba1": MambaForCausalLM}

# Saved name prefix -> module of this class. The language model's own `load_weights` then maps mamba_ssm's
# layer names (`A_log` -> `A`) to its layers.
WEIGHT_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.connector.", "connector."),
    ("model.language_model.embedding.", "language_model.backbone.embeddings."),
    ("model.language_model.", "language_model.backbone."),
    ("lm_head.", "language_model.lm_head."),
)


def vllm_weight_name(name: str) -> str:
    """A tensor's name in a saved folder -> its name in `MLMambaForConditionalGeneration`."""
    for saved, ours in WEIGHT_PREFIXES:
        if name.startswith(saved):
            return ours + name[len(saved) :]
    raise ValueError(f"the checkpoint holds {name!r}, which is not part of an MLMamba model folder")


def encoder_renamings(tower: MLMambaVisionTower) -> list[tuple[str, list, list]]:
    """Per vision encoder: its model_type, the renamings transformers applies when it loads that encoder's weights
    (transformers 5 saves some encoders under older names, e.g. DINOv2's `attention.attention.query` for
    `attention.q_proj`), as vLLM's transformers backend reads them, and the conversions that would also reshape
    tensors (DINOv2's SwiGLU variant), which this plugin does not apply."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = []
    for model, encoder in zip(tower.encoder_models, tower.encoders):
        # Only an encoder that is itself the transformers model is saved through its conversions.
        transforms = get_model_conversion_mapping(model) if encoder is model else []
        renames = [t for t in transforms if isinstance(t, WeightRenaming)]
        renamings.append((model.config.model_type, renames, [t for t in transforms if t not in renames]))
    return renamings


def rename_encoder_weight(name: str, renamings: list[tuple[str, list, list]]) -> str:
    """`encoders.I.<name as saved>` -> `encoders.I.<name of the module's parameter>`."""
    _, index, rest = name.split(".", 2)
    model_type, renames, reshapes = renamings[int(index)]
    if any(t.rename_source_key(rest)[1] is not None for t in reshapes):
        raise ValueError(
            f"vision encoder {index} ({model_type}) holds {rest!r}, which transformers reshapes when it loads it; "
            "the vLLM plugin loads encoder weights by name only"
        )
    for transform in renames:
        rest, _ = transform.rename_source_key(rest)
    return f"encoders.{index}.{rest}"


def _language_model_class(vllm_config: VllmConfig):
    return LANGUAGE_MODELS[package_config(vllm_config.model_config.hf_config).text_config.ssm_layer]


def _language_model_vllm_config(vllm_config: VllmConfig) -> VllmConfig:
    return vllm_config.with_hf_config(language_model_config(vllm_config.model_config.hf_config))


@MULTIMODAL_REGISTRY.register_processor(
    MLMambaMultiModalProcessor, info=MLMambaProcessingInfo, dummy_inputs=MLMambaDummyInputsBuilder
)
class MLMambaForConditionalGeneration(nn.Module, HasInnerState, IsAttentionFree, SupportsMultiModal):
    """Vision tower and connector (this package's) + vLLM's Mamba language model."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("MLMamba models take images and text; no other modality")

    # The Mamba state (shapes, dtypes, copies for prefix caching) is the language model's: vLLM's own classes
    # compute it from the translated language-model config.
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        lm = _language_model_class(vllm_config)
        return lm.get_mamba_state_shape_from_config(_language_model_vllm_config(vllm_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        lm = _language_model_class(vllm_config)
        return lm.get_mamba_state_dtype_from_config(_language_model_vllm_config(vllm_config))

    @classmethod
    def get_mamba_state_copy_func(cls):
        # Mamba-1's copy functions are the same pair (conv state, temporal state); the class has no config here.
        return Mamba2ForCausalLM.get_mamba_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        check_servable(hf_config)
        config = package_config(hf_config)
        self.config = config
        vision = config.vision_config
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = MLMambaVisionTower(vision)
            self.connector = MLMambaConnector(
                config.connector_config, vision.hidden_size, config.text_config.d_model, (vision.grid_size,) * 2
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=language_model_config(config),
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object):
        """(n_images, 3 * n_encoders, H, W) pixel values -> (n_images, num_image_tokens, d_model) embeddings, as
        `MLMambaModel.get_image_features` computes them."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        features = self.vision_tower(pixel_values)
        embed_dtype = self.language_model.backbone.embeddings.weight.dtype
        return self.connector(features.to(embed_dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renamings = encoder_renamings(self.vision_tower)
        # The package's modules take the engine's dtype here, as vLLM's layers cast in their own loaders.
        own_dtypes = {n: p.dtype for n, p in self.named_parameters() if n.startswith(("vision_tower.", "connector."))}

        def renamed():
            for name, tensor in weights:
                name = vllm_weight_name(name)
                if name.startswith("vision_tower."):
                    name = "vision_tower." + rename_encoder_weight(name.removeprefix("vision_tower."), renamings)
                yield name, tensor.to(own_dtypes[name]) if name in own_dtypes else tensor

        # A tied lm_head.weight (where the folder has one) is skipped by the loader as an alias of the embedding.
        return AutoWeightsLoader(self).load_weights(renamed())
