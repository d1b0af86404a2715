"""The vision tower: one or two transformers vision encoders whose patch features are fused on channels."""

import torch
from torch import nn
from transformers import AutoModel

from ._compat import unwrap_vision_model
from .configuration_mlmamba import MLMambaVisionConfig


class MLMambaVisionTower(nn.Module):
    """Runs each encoder on its own 3 channels of `pixel_values` and concatenates the patch features.

    pixel_values: (n, 3 * n_encoders, image_size, image_size) -> (n, num_image_tokens, sum of hidden sizes)

    The features are the output of one encoder layer (`feature_layer` indexes the hidden states,
    embeddings first, as `output_hidden_states` would), read with a forward hook: transformers 4
    and 5 return hidden states from different module levels, a hook on the layer works in both.
    """

    def __init__(self, config: MLMambaVisionConfig):
        super().__init__()
        encoders = [AutoModel.from_config(c) for c in config.encoder_configs()]
        self.encoders = nn.ModuleList([unwrap_vision_model(e) for e in encoders])
        self.feature_layer = config.feature_layer
        self.num_patches = config.num_image_tokens
        self.image_size = config.image_size

    def _feature_layer(self, encoder: nn.Module) -> nn.Module:
        layers = encoder.encoder.layers if hasattr(encoder.encoder, "layers") else encoder.encoder.layer
        return layers[self.feature_layer % (len(layers) + 1) - 1]  # hidden_states[k] = output of layer k - 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3 * len(self.encoders), self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(3 channels per vision encoder, resized to {self.image_size}x{self.image_size}); got "
                f"{tuple(pixel_values.shape)}. Prepare images with MLMambaProcessor."
            )
        features = []
        for i, encoder in enumerate(self.encoders):
            captured = []
            hook = self._feature_layer(encoder).register_forward_hook(
                lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
            trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
            dtype = next(encoder.parameters()).dtype
            try:
                with torch.set_grad_enabled(trainable):
                    encoder(pixel_values=pixel_values[:, 3 * i : 3 * i + 3].to(dtype))
            finally:
                hook.remove()
            # Prefix tokens (CLS, registers) come first; keep the patch grid.
            features.append(captured[-1][:, -self.num_patches :])
        return torch.cat(features, dim=-1)
