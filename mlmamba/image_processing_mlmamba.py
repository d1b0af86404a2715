"""Image processing for ML-Mamba.

MLMambaImageProcessor: each image is made square and resized (bicubic, no crop) to image_size x
    image_size, scaled to [0, 1] and normalised once per vision encoder with that encoder's mean/std;
    the results are stacked on channels -> pixel_values (n, 3 * n_encoders, S, S). Squaring, as
    prismatic's `image_resize_strategy` names it: "resize-naive" (ML-Mamba and Cobra as released)
    stretches the image; "letterbox" (LLaVA's "pad", which VL-Mamba builds on) first pads it to a square
    with the first encoder's mean colour, centred.

Saved folders name this module in their image processor's `auto_map`, and transformers loads it on its
own, so it imports nothing from the package.
"""

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

RESIZE_STRATEGIES = ("resize-naive", "letterbox")


def _to_pil(image) -> Image.Image:
    """PIL image, (H, W[, C]) numpy array, or (C, H, W) torch tensor (uint8 0-255 or float 0-1) -> RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"a torch image must have shape (3, H, W) or (1, H, W); got {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(f"a numpy image must have shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}")
        if image.dtype != np.uint8:
            if image.min() < 0 or image.max() > 1:
                raise ValueError("a float image must hold values in [0, 1]; pass uint8 for 0-255 values")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image).convert("RGB")
    raise TypeError(
        "images must be PIL.Image.Image, numpy arrays (H, W, 3) or torch tensors (3, H, W); "
        f"got {type(image).__name__}"
    )


def letterbox(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of side max(w, h) with `fill`, the image centred (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def _flatten_images(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flatten_images(item)]
    return [images]


class MLMambaImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 14,
        image_mean=None,
        image_std=None,
        resample: int = Image.BICUBIC,
        resize_strategy: str = "resize-naive",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"resize_strategy={resize_strategy!r} is not supported; use one of {list(RESIZE_STRATEGIES)}"
            )
        self.resize_strategy = resize_strategy
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_mean = [list(m) for m in (image_mean or [[0.5, 0.5, 0.5]])]
        self.image_std = [list(s) for s in (image_std or [[0.5, 0.5, 0.5]])]
        self.resample = int(resample)
        if len(self.image_mean) != len(self.image_std):
            raise ValueError("image_mean and image_std need one entry per vision encoder")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: the patch grid of the vision encoders."""
        return (self.image_size // self.patch_size) ** 2

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        images = _flatten_images(images)
        if not images:
            raise ValueError("no images given")
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, :, None, None]  # (E, 3, 1, 1)
        std = np.asarray(self.image_std, dtype=np.float32)[:, :, None, None]
        out = []
        fill = tuple(int(255 * m) for m in self.image_mean[0])  # as LLaVA's expand2square
        for image in images:
            pil = _to_pil(image)
            if self.resize_strategy == "letterbox":
                pil = letterbox(pil, fill)
            pil = pil.resize((self.image_size, self.image_size), resample=self.resample)
            x = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, S, S)
            out.append(((x[None] - mean) / std).reshape(-1, self.image_size, self.image_size))
        return BatchFeature({"pixel_values": np.stack(out)}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
