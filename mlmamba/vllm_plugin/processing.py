"""The multimodal processor vLLM runs before the engine: images -> pixel_values, `<image>` -> image tokens.

vLLM tokenizes the prompt itself and calls the folder's `MLMambaProcessor` on the images alone, for
`pixel_values` (n_images, 3 * n_encoders, H, W) with each encoder's normalisation. The prompt update then
replaces each `<image>` token by `num_image_tokens` of them, as `MLMambaProcessor` expands it for
transformers, so the two see the same token ids.
"""

from collections.abc import Mapping, Sequence

from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

IMAGE_TOKEN = "<image>"  # MLMambaProcessor's placeholder


class MLMambaProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # The image processor has a fixed geometry and its own normalisations: nothing to set per request.
        return {"text_kwargs": set(), "images_kwargs": set()}

    @property
    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_id

    @property
    def image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size

    def get_num_image_tokens(self) -> int:
        """Every image becomes one patch grid, whatever its size: (image_size // patch_size) ** 2 tokens."""
        return self.get_hf_config().num_image_tokens

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_num_image_tokens()}


class MLMambaDummyInputsBuilder(BaseDummyInputsBuilder[MLMambaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.image_size
        overrides = mm_options.get("image") if mm_options else None
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=overrides
            )
        }


class MLMambaMultiModalProcessor(BaseMultiModalProcessor[MLMambaProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id
        tokens = [image_token_id] * self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=tokens)]
