"""Image processing for ML-Mamba.

MLMambaImageProcessor: each image is made square and resized (bicubic, no crop) to image_size x
    image_size, scaled to [0, 1] and normalised once per vision encoder with that encoder's mean/std;
    the results are stacked on channels -> pixel_values (n, 3 * n_encoders, S, S). Squaring, as
    prismatic's `image_resize_strategy` names it: "resize-naive" (ML-Mamba and Cobra as released)
    stretches the image; "letterbox" (LLaVA's "pad", which VL-Mamba builds on) first pads it to a square
    with the first encoder's mean colour, centred (`letterbox_resize`).

Images are PIL images, numpy arrays or torch tensors, channels first or last (transformers'
`infer_channel_dimension_format`; `input_data_format` settles an ambiguous shape), or strings: a file
path, a `file://`, `http(s)://` or `data:` URL, or base64 data.

It is built on transformers' slow (PIL / numpy) `BaseImageProcessor` and its functions (`resize`,
`rescale`, `normalize`), which transformers 4.x and 5.x share; there is no fast (torchvision) variant,
as the released models were trained on PIL's resampling.

Saved folders name this module in their image processor's `auto_map`, and transformers loads it on its
own, so it imports nothing from the package.
"""

import base64
import binascii
import io
import math
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import normalize, rescale, resize, to_channel_dimension_format
from transformers.image_utils import (
    ChannelDimension,
    PILImageResampling,
    infer_channel_dimension_format,
    is_valid_image,
    to_numpy_array,
)

RESIZE_STRATEGIES = ("resize-naive", "letterbox")
IMAGE_TYPES = (
    "PIL images, numpy arrays or torch tensors ((H, W), (H, W, C) or (C, H, W), C in 1, 3, 4), or strings: "
    "a file path, a file://, http(s):// or data: URL, or base64 data"
)
URL_TIMEOUT_S = 60
# Half-width of PIL's resampling filters, in source pixels at scale 1 (PIL's `support` of each filter).
_FILTER_SUPPORT = {
    PILImageResampling.NEAREST: 1.0,
    PILImageResampling.BOX: 0.5,
    PILImageResampling.BILINEAR: 1.0,
    PILImageResampling.HAMMING: 1.0,
    PILImageResampling.BICUBIC: 2.0,
    PILImageResampling.LANCZOS: 3.0,
}
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _describe(source: str) -> str:
    return repr(source if len(source) <= 80 else source[:77] + "...")


def load_image_source(source: str, timeout: float | None = URL_TIMEOUT_S) -> PIL.Image.Image:
    """The image a string names: a file path, a `file://`, `http(s)://` or `data:` URL, or base64 data; upright
    (its EXIF orientation applied), in its own mode. transformers' `load_image` reads the same sources but not
    `file://` URLs, and converts to RGB at once, which clips 16-bit images to white."""
    if source.startswith(("http://", "https://", "file://", "data:")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:  # noqa: S310 (the schemes above)
                data = response.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ValueError(f"could not read the image at {_describe(source)}: {error}") from error
        where = f"the image at {_describe(source)}"
    elif os.path.isfile(source):
        with open(source, "rb") as file:
            data = file.read()
        where = f"the file {_describe(source)}"
    else:
        try:
            data = base64.b64decode("".join(source.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"images: {_describe(source)} is not an existing file, a URL (file://, http(s)://, data:) or base64 "
                "image data"
            ) from None
        where = "the base64 image data"
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"{where} is not an image PIL can read: {error}") from error
    return PIL.ImageOps.exif_transpose(image)


def _integer_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """0-255 values as they are, 16-bit (uint16) ones scaled to 0-255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array / 257.0).astype(np.uint8)
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 255:
        raise ValueError(
            f"{what} holds integers in [{low}, {high}]; pass uint8 for 0-255 values, uint16 for 16-bit images, or "
            "floats in [0, 1]"
        )
    return array.astype(np.uint8)


def to_rgb_uint8(image, input_data_format=None) -> np.ndarray:
    """One image -> (H, W, 3) uint8 RGB: what PIL's `convert("RGB")` gives for 8-bit images (alpha dropped, as the
    original `Image.open(...).convert("RGB")` does); 16-bit images scaled to 8 bits; floats in [0, 1] rounded."""
    if isinstance(image, PIL.Image.Image):
        if image.mode in _HIGH_BIT_MODES:  # PIL's convert("RGB") clips these at 255
            gray = np.asarray(image)
            if gray.dtype != np.uint16 and gray.size and int(gray.max()) > 255:  # mode "I": 16-bit data
                if int(gray.min()) < 0 or int(gray.max()) > 65535:
                    raise ValueError(f"a mode {image.mode!r} image holds values beyond 16 bits; scale it to 0-65535")
                gray = gray.astype(np.uint16)
            return np.repeat(_integer_to_uint8(gray, "the image")[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"))
    if not is_valid_image(image):
        raise TypeError(f"images must be {IMAGE_TYPES}; got {type(image).__name__}")
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.dtype != torch.float64:
        image = image.float()  # numpy has no bfloat16; to_numpy_array would fail on it
    array = to_numpy_array(image)
    if array.ndim == 2:
        array, input_data_format = array[..., None], ChannelDimension.LAST
    elif array.ndim != 3:
        raise ValueError(f"an image array must have shape (H, W), (H, W, C) or (C, H, W); got {array.shape}")
    if input_data_format is None:
        try:
            input_data_format = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
        except ValueError:
            raise ValueError(
                f"an image array must have 1, 3 or 4 channels, first or last; got shape {array.shape}"
            ) from None
    array = to_channel_dimension_format(array, ChannelDimension.LAST, input_data_format)
    if array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must have 1, 3 or 4 channels; got shape {array.shape} ({input_data_format})")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image holds NaN or infinite values")
        if array.size and (array.min() < 0 or array.max() > 1):
            raise ValueError("a float image must hold values in [0, 1]; pass uint8 for 0-255 values")
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = _integer_to_uint8(array, "the image")
    else:
        raise TypeError(f"an image array must hold integers, floats or booleans; got dtype {array.dtype}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _affected(start: int, stop: int, scale: float, support: float, size: int) -> tuple[int, int]:
    """Output pixels [first, last) of a resize by 1/`scale` whose filter window reaches source pixels [start, stop)."""
    first = math.floor((start - support) / scale - 0.5) - 1
    last = math.ceil((stop + support) / scale - 0.5) + 2
    return max(0, first), min(size, last)


def _resize_1d(image: np.ndarray, axis: int, start: int, stop: int, side: int, size: int, fill, resample):
    """The pass of PIL's two-pass resize along `axis` (1: horizontal, 0: vertical) of a canvas of `side` pixels
    along that axis, filled with `fill` except for `image` at [start, stop): only the output pixels the image
    reaches, and only the canvas pixels their filter windows read, are made.
    Returns (the output pixels [first, last) along the axis, first)."""
    scale = side / size
    support = _FILTER_SUPPORT.get(resample, 3.0) * max(scale, 1.0)
    first, last = _affected(start, stop, scale, support, size)
    lo = max(0, math.floor(first * scale - support) - 2)
    hi = min(side, math.ceil(last * scale + support) + 2)
    other = image.shape[1 - axis]
    # Rows (or columns) are resampled independently, so a long image is done in pieces of about 16 MB.
    piece = max(1, (1 << 24) // ((hi - lo) * 3))
    out = []
    for p in range(0, other, piece):
        part = image[p : p + piece] if axis == 1 else image[:, p : p + piece]
        n = part.shape[1 - axis]
        band = np.empty((n, hi - lo, 3) if axis == 1 else (hi - lo, n, 3), dtype=np.uint8)
        band[:] = fill
        if axis == 1:
            band[:, start - lo : stop - lo] = part
            box, shape = (first * scale - lo, 0, last * scale - lo, n), (last - first, n)
        else:
            band[start - lo : stop - lo] = part
            box, shape = (0, first * scale - lo, n, last * scale - lo), (n, last - first)
        out.append(np.asarray(PIL.Image.fromarray(band).resize(shape, resample=resample, box=box)))
    return np.concatenate(out, axis=1 - axis), first


def letterbox_resize(image: np.ndarray, size: int, fill, resample=PILImageResampling.BICUBIC) -> np.ndarray:
    """`resize(pad_to_square(image, fill), (size, size))` (LLaVA's "pad", then a PIL resize) of an (H, W, 3) uint8
    image, without the max(H, W)^2 canvas: PIL resamples horizontally, then vertically, and each pass only mixes
    the image with the fill near the image's edges, so only those pixels are computed; the rest is `fill`.
    Memory grows with the image, not with the square of its long side."""
    h, w = image.shape[:2]
    side = max(h, w)
    if h == w:
        return resize(image, (size, size), resample=resample, input_data_format=ChannelDimension.LAST)
    fill = np.asarray(fill, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    rows, c0 = _resize_1d(image, 1, left, left + w, side, size, fill, resample)  # (h, c1 - c0, 3)
    block, r0 = _resize_1d(rows, 0, top, top + h, side, size, fill, resample)  # (r1 - r0, c1 - c0, 3)
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = fill
    out[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
    return out


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in _flatten(item)]
    if getattr(images, "ndim", 0) == 4:  # a batch of images, as transformers' processors take it
        return list(images)
    return [images]


class MLMambaImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 384,
        patch_size: int = 14,
        image_mean=None,
        image_std=None,
        resample: int = PILImageResampling.BICUBIC,
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

    def fetch_images(self, images):
        """transformers' `fetch_images` (strings become images, others pass through, nesting kept), with
        `load_image_source` for strings and a clear error for anything that is not an image."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(item) for item in images]
        if isinstance(images, str):
            return load_image_source(images)
        if isinstance(images, os.PathLike):
            return load_image_source(os.fspath(images))
        if not is_valid_image(images):
            raise TypeError(f"images must be {IMAGE_TYPES}; got {type(images).__name__}")
        return images

    def preprocess(self, images, return_tensors="pt", input_data_format=None, **kwargs) -> BatchFeature:
        """images: one image, a list, or a list of lists (flattened in reading order); a 4-D array is a batch.
        input_data_format: "channels_first" or "channels_last" for arrays whose shape leaves it open."""
        unknown = {k for k, v in kwargs.items() if v is not None} - {"data_format"}
        if unknown or kwargs.get("data_format") not in (None, "channels_first", ChannelDimension.FIRST):
            raise ValueError(
                f"MLMambaImageProcessor does not take {sorted(unknown or ['data_format'])}: its resize and "
                "normalisation follow the vision encoders (image_size, image_mean, image_std, resize_strategy)"
            )
        images = _flatten(self.fetch_images(images))
        if not images:
            raise ValueError("no images given")
        fill = tuple(int(255 * m) for m in self.image_mean[0])  # as LLaVA's expand2square / pad_to_square
        size = (self.image_size, self.image_size)
        out = []
        for image in images:
            array = to_rgb_uint8(image, input_data_format)
            if self.resize_strategy == "letterbox":
                array = letterbox_resize(array, self.image_size, fill, self.resample)
            else:
                array = resize(array, size, resample=self.resample, input_data_format=ChannelDimension.LAST)
            array = rescale(array, 1 / 255, input_data_format=ChannelDimension.LAST)
            per_encoder = [
                normalize(array, mean, std, input_data_format=ChannelDimension.LAST)
                for mean, std in zip(self.image_mean, self.image_std)
            ]
            out.append(np.concatenate(per_encoder, axis=-1).transpose(2, 0, 1))  # (3 * E, S, S)
        return BatchFeature({"pixel_values": np.stack(out)}, tensor_type=return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)
