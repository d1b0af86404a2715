"""The vision tower: one or two transformers vision encoders whose patch features are fused on channels."""

import torch
from torch import nn
from transformers import AutoModel
from transformers.utils import logging

from ._compat import install_output_capturing_hooks, unwrap_vision_model
from .configuration_mlmamba import MLMambaVisionConfig

logger = logging.get_logger(__name__)


class MLMambaVisionTower(nn.Module):
    """Runs each encoder on its own 3 channels of `pixel_values` and concatenates the patch features.

    pixel_values: (n, 3 * n_encoders, image_size, image_size) -> (n, num_image_tokens, sum of hidden sizes)

    The features are the output of one encoder layer: `feature_layer` indexes the encoder's hidden states,
    embeddings first, as LLaVA reads them. Nothing is kept on the module between calls, so concurrent calls
    (threads serving one model) do not see each other's images.
    """

    def __init__(self, config: MLMambaVisionConfig):
        super().__init__()
        # attn_implementation reaches the vision config (a sub-config); pass it on to each encoder.
        impl = {"attn_implementation": config._attn_implementation} if config._attn_implementation else {}
        encoders = [AutoModel.from_config(c, **impl) for c in config.encoder_configs()]
        # The models as built, called for the features and asked for their initialisation: under transformers 4,
        # SigLIP's and CLIP's inner module returns hidden states only when its model calls it. Not submodules: the
        # weights are those of `encoders`, which the models share.
        self.__dict__["encoder_models"] = encoders
        self.encoders = nn.ModuleList([unwrap_vision_model(e) for e in encoders])
        self.feature_layer = config.feature_layer
        self.num_patches = config.num_image_tokens
        self.image_size = config.image_size
        for encoder in encoders:  # at build: installed at the first call, they would break a compiled graph
            install_output_capturing_hooks(encoder)

    def encoder_model_of(self, module: nn.Module):
        """The encoder model (transformers' own `PreTrainedModel`) that `module` is part of, None for other modules:
        its `_initialize_weights` draws weights missing from a checkpoint as in a fresh encoder."""
        owners = self.__dict__.get("_owners")
        if owners is None:  # built once: {id(module): its encoder model}
            owners = self.__dict__["_owners"] = {
                id(m): model for model, encoder in zip(self.encoder_models, self.encoders) for m in encoder.modules()
            }
        return owners.get(id(module))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False):
        """(fused features, hidden states or None, attentions or None). The hidden states are per layer (embeddings
        first) the encoders' patch tokens fused on channels, as the features are; when the encoders differ in depth,
        each encoder's hidden states one after the other. The attentions are the encoders' one after the other."""
        expected = (3 * len(self.encoders), self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(3 channels per vision encoder, resized to {self.image_size}x{self.image_size}); got "
                f"{tuple(pixel_values.shape)}. Prepare images with MLMambaProcessor."
            )
        outputs = []
        for i, (encoder, model) in enumerate(zip(self.encoders, self.encoder_models)):
            trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
            dtype = next(encoder.embeddings.parameters()).dtype  # no Linear there: quantization keeps it
            with torch.set_grad_enabled(trainable):
                outputs.append(
                    model(
                        pixel_values=pixel_values[:, 3 * i : 3 * i + 3].to(dtype),
                        output_hidden_states=True,
                        output_attentions=output_attentions,
                    )
                )
        # Prefix tokens (CLS, registers) come first; keep the patch grid.
        per_encoder = [[h[:, -self.num_patches :] for h in out.hidden_states] for out in outputs]
        features = torch.cat([layers[self.feature_layer] for layers in per_encoder], dim=-1)
        hidden = attentions = None
        if output_hidden_states:
            if len({len(layers) for layers in per_encoder}) == 1:
                hidden = tuple(torch.cat(layer, dim=-1) for layer in zip(*per_encoder))
            else:
                hidden = tuple(h for layers in per_encoder for h in layers)
        if output_attentions and all(out.attentions for out in outputs):  # sdpa gives none
            attentions = tuple(a for out in outputs for a in out.attentions)
        elif output_attentions:
            logger.warning_once(
                "the vision encoders return attention maps only with attn_implementation='eager' (they use "
                f"{self.encoders[0].config._attn_implementation!r}); attentions is None"
            )
        return features, hidden, attentions
