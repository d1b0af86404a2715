"""Image + text processing for ML-Mamba.

MLMambaProcessor: transformers' processor for an image-placeholder model, as `LlavaProcessor` is: the image
    processor (MLMambaImageProcessor, in image_processing_mlmamba.py) plus a GPT-NeoX-style tokenizer. Each
    `<image>` in the text is expanded to `num_image_tokens` placeholder tokens, which the model replaces with
    the image's embeddings. What differs from LLaVA's processor lives here: the expansion (a fixed number of
    tokens per image), images grouped per text checked against that text's `<image>` markers, errors that
    say what to pass, and the truncation guard (image tokens are never cut).

The chat template (chat_template.jinja) escapes special tokens typed in messages, so user text cannot end a
turn or place an image; `apply_chat_template(..., escape_special_tokens=False)` turns that off.

Saved folders carry this file with the model code, and transformers' remote-code loader copies only the
modules it imports directly: import package modules here as `from .module import ...`, never through
another module of the package.
"""

import bisect

from transformers import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from ._compat import TRANSFORMERS_5, processor_class_attributes, rewrite_tokenizer_class
from .image_processing_mlmamba import MLMambaImageProcessor

__all__ = ["IMAGE_TOKEN", "MLMambaImageProcessor", "MLMambaProcessor"]

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<image>"
ESCAPE = "\u200b"  # what the chat template puts after the first character of a special token typed in a message
# _compat candidate: read by the chat template; transformers 4's apply_chat_template passes them on to __call__ too.
TEMPLATE_ONLY_KWARGS = ("escape_special_tokens",)


# Defaults under the caller's arguments: tensors unless asked otherwise, the chat template's own special tokens.
TEXT_DEFAULTS = {"return_tensors": "pt", "add_special_tokens": False, "return_token_type_ids": False}
IMAGES_DEFAULTS = {"return_tensors": "pt"}


class MLMambaProcessorKwargs(ProcessingKwargs, total=False):
    # transformers up to 5.23 and 4.x read defaults from here only (5.24 also from the processor's class attributes)
    _defaults = {"text_kwargs": TEXT_DEFAULTS, "images_kwargs": IMAGES_DEFAULTS}


class MLMambaProcessor(ProcessorMixin):
    """Wraps MLMambaImageProcessor and a tokenizer; `processor(images=..., text=...)` gives the model inputs.

    images: an image or a list of images that fill the `<image>` markers of all texts in reading order, or a list
        of lists, one per text, each filling that text's markers. An image is a PIL image, a numpy array or torch
        tensor, or a string (a path, a file://, http(s):// or data: URL, or base64 data).
    text: a string or a list of strings (prompts, e.g. from `apply_chat_template`), one `<image>` per image.
    Tokenizer arguments work as in any transformers processor: padding (on `padding_side`), truncation with
    max_length (only text is cut: a row whose image tokens would be cut raises), return_tensors ("pt" unless
    given), return_offsets_mapping.
    """

    attributes = ["image_processor", "tokenizer"]
    locals().update(processor_class_attributes())  # the class namespace: 4.x's image_processor_class etc.
    valid_processor_kwargs = MLMambaProcessorKwargs
    text_kwargs, images_kwargs = TEXT_DEFAULTS, IMAGES_DEFAULTS  # where transformers 5.24 reads them

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = IMAGE_TOKEN, **kwargs
    ):
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token")

    @property
    def num_image_tokens(self) -> int:
        return self.image_processor.num_image_tokens

    # ------------------------------------------------------------------ hooks of ProcessorMixin.__call__ (5.x)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _refuse_other_modalities(videos, audio)
        text = self._checked_text(text)
        images, text, videos, audio = super().prepare_inputs_layout(
            images=images, text=text, videos=videos, audio=audio, **kwargs
        )
        return _layout(images, _channels_last(kwargs)), text, videos, audio

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if text is not None:
            self._check_images_fill_markers(images, [text] if isinstance(text, str) else text)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _check_special_mm_tokens(self, text, text_inputs, modalities):
        """transformers' check that no placeholder token was lost, with the truncation guard's message."""
        try:
            super()._check_special_mm_tokens(text, text_inputs, modalities)
        except ValueError as error:
            ids = text_inputs["input_ids"]
            ids = ids.tolist() if hasattr(ids, "tolist") else ids
            cut = [
                i
                for i, row in enumerate(ids)
                if list(row).count(self.image_token_id) < text[i].count(self.image_token)
            ]
            if not cut:
                raise
            i = cut[0]
            raise ValueError(
                f"text {i} is longer than max_length={len(ids[i])} tokens (each image counts "
                f"{self.num_image_tokens}), and truncating it would cut image tokens; raise max_length (in TRL: "
                "SFTConfig.max_length / --max_length) or set it to None, or shorten the text"
            ) from error

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """The number of placeholder tokens each image of the given sizes takes (as LlavaProcessor has it)."""
        vision_data = {}
        if image_sizes is not None:
            vision_data.update(
                num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
            )
        return MultiModalData(**vision_data)

    # ------------------------------------------------------------------ checks

    def _checked_text(self, text):
        """`text` as given when it is a string or a list of non-empty strings; a clear error otherwise."""
        if text is None:
            return None
        items = text if isinstance(text, (list, tuple)) else [text]
        if any(isinstance(t, dict) or (isinstance(t, (list, tuple)) and t and isinstance(t[0], dict)) for t in items):
            raise ValueError(
                "text= got chat messages; pass them through the chat template: "
                "prompt = processor.apply_chat_template(messages, add_generation_prompt=True), then "
                "processor(images=..., text=prompt); or processor.apply_chat_template(messages, "
                "add_generation_prompt=True, tokenize=True, return_dict=True), which loads the images too"
            )
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            kinds = (
                sorted({type(t).__name__ for t in texts}) if isinstance(texts, (list, tuple)) else type(text).__name__
            )
            raise ValueError(f"text must be a string or a list of strings; got {kinds}")
        if not texts:
            raise ValueError("text is an empty list; pass a prompt (a string) or a list of prompts")
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            where = "text is empty" if isinstance(text, str) else f"text {empty[0]} is empty"
            raise ValueError(
                f"{where}; pass a prompt, e.g. processor.apply_chat_template(messages, add_generation_prompt=True)"
            )
        return text

    def _check_images_fill_markers(self, images, texts: list) -> None:
        """Flat images fill all markers in reading order; a list per text fills that text's markers."""
        counts = [t.count(self.image_token) for t in texts]
        hint = ""
        if self.image_token[0] + ESCAPE + self.image_token[1:] in "".join(texts):
            hint = (
                f"; a {self.image_token} typed in a chat message is text: give each image a {{'type': 'image'}} item "
                "of the message's content (or apply the chat template with escape_special_tokens=False)"
            )
        if images and all(isinstance(row, list) for row in images):
            if len(images) != len(texts):
                raise ValueError(
                    f"got {len(images)} lists of images for {len(texts)} text(s); give one list per text (each "
                    "filling that text's markers), or one flat list that fills all markers in reading order"
                )
            for i, (row, n_markers) in enumerate(zip(images, counts)):
                if len(row) != n_markers:
                    raise ValueError(
                        f"text {i} has {n_markers} {self.image_token} marker(s) but its list has {len(row)} "
                        f"image(s); put one {self.image_token} in text {i} for each of its images{hint}"
                    )
            return
        n_images = len(images or [])
        if n_images != sum(counts):
            raise ValueError(
                f"got {n_images} image(s) but {sum(counts)} {self.image_token} marker(s) in the text; "
                f"put one {self.image_token} in the text for each image{hint}"
            )

    # ------------------------------------------------------------------ chat template, loading, saving

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `apply_chat_template`; a tokenized result holds lists unless `return_tensors` is given,
        as tokenizers and other processors return them (TRL's template checks index into those lists). A direct
        `processor(images=..., text=...)` call still returns tensors.

        Special tokens typed in messages (`<|endoftext|>`, `<image>`, ...) are escaped by the template, so they stay
        text; pass escape_special_tokens=False to let message text hold control tokens."""
        conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
        if not conversation or any(not c for c in conversations):
            raise ValueError(
                "the conversation is empty; pass a list of messages such as "
                "[{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is this?'}]}]"
            )
        processor_kwargs = kwargs.get("processor_kwargs") or {}
        if (
            kwargs.get("tokenize")
            and kwargs.get("return_tensors", "auto") == "auto"
            and "return_tensors" not in processor_kwargs
        ):
            kwargs["return_tensors"] = None
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading of the tokenizer and image processor; `use_fast=True` (or backend="torchvision")
        gets the slow image processor and one warning, as transformers does for models with only a slow one."""
        # _compat candidate: 4.x's AutoImageProcessor raises for use_fast=True on remote code without torchvision
        use_fast, backend = kwargs.pop("use_fast", None), kwargs.pop("backend", None)
        if use_fast or backend not in (None, "pil"):
            logger.warning_once(
                "MLMambaImageProcessor has no fast (torchvision) version; using the slow (PIL) one, which gives the "
                "pixels the models were trained on"
            )
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with `tokenizer_class` written as "PreTrainedTokenizerFast": the name
        transformers 5 writes ("TokenizersBackend") does not exist in 4.x, and both read this one."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        rewrite_tokenizer_class(save_directory)
        return saved

    # ------------------------------------------------------------------ transformers 4.x

    if not TRANSFORMERS_5:  # _compat candidate: 4.x's ProcessorMixin.__call__ does not expand placeholders

        def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
            """transformers 4.57's LlavaProcessor.__call__, with 5.x's fetch_images and the checks above; token
            offsets point into the text as given (4.x's assistant masks read them so)."""
            _refuse_other_modalities(videos, audio)
            for key in TEMPLATE_ONLY_KWARGS:
                kwargs.pop(key, None)
            text = self._checked_text(text)
            if images is None and text is None:
                raise ValueError("MLMambaProcessor needs images, text or both")
            if images is not None:
                images = _layout(self.image_processor.fetch_images(images), _channels_last(kwargs))
            texts = None if text is None else [text] if isinstance(text, str) else list(text)
            if texts is not None:
                self._check_images_fill_markers(images, texts)
            output_kwargs = self._merge_kwargs(
                MLMambaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
            )
            return_tensors = output_kwargs["text_kwargs"].pop("return_tensors", None)
            data = {}
            if images:
                data.update(self.image_processor(images, **output_kwargs["images_kwargs"]))
            if texts is not None:
                expanded = [t.replace(self.image_token, self.replace_image_token({}, 0)) for t in texts]
                mm_token_type_ids = output_kwargs["text_kwargs"].pop("return_mm_token_type_ids", False)
                text_inputs = self.tokenizer(expanded, **output_kwargs["text_kwargs"], return_tensors=None)
                self._check_special_mm_tokens(expanded, text_inputs, modalities=["image"])
                if "offset_mapping" in text_inputs:
                    text_inputs["offset_mapping"] = [
                        self._offsets_in_given_text(t, row) for t, row in zip(texts, text_inputs["offset_mapping"])
                    ]
                if mm_token_type_ids:
                    text_inputs["mm_token_type_ids"] = [
                        [int(t == self.image_token_id) for t in row] for row in text_inputs["input_ids"]
                    ]
                data.update(text_inputs)
            return BatchFeature(data=data, tensor_type=return_tensors)

        def _offsets_in_given_text(self, text: str, offsets: list) -> list:
            """Offsets into the expanded text -> into `text`: each image's tokens point at its `<image>`."""
            length, extra = len(self.image_token), (self.num_image_tokens - 1) * len(self.image_token)
            starts, pos = [], text.find(self.image_token)
            while pos >= 0:
                starts.append(pos)
                pos = text.find(self.image_token, pos + length)
            expanded_starts = [s + j * extra for j, s in enumerate(starts)]
            out = []
            for start, end in offsets:
                k = bisect.bisect_right(expanded_starts, start)
                if (start, end) == (0, 0) or k == 0:
                    out.append((start, end))
                elif start < expanded_starts[k - 1] + length + extra:
                    out.append((starts[k - 1], starts[k - 1] + length))
                else:
                    out.append((start - k * extra, end - k * extra))
            return out


def _refuse_other_modalities(videos, audio) -> None:
    for name, value in (("videos", videos), ("audio", audio)):
        if value is not None:
            raise ValueError(f"MLMambaProcessor takes images and text; {name} are not supported")


def _is_batch(image) -> bool:
    return getattr(image, "ndim", 0) == 4


def _channels_last(kwargs: dict) -> bool:
    fmt = kwargs.get("input_data_format") or (kwargs.get("images_kwargs") or {}).get("input_data_format")
    return str(getattr(fmt, "value", fmt)) == "channels_last"


def _one_image(image, channels_last: bool):
    """A 2-D (grayscale) array with a channel axis, which transformers' list helpers need (first, which channel
    inference reads unambiguously, unless the caller said channels_last); other images as they are."""
    ndim = getattr(image, "ndim", 3)
    if ndim == 2:
        return image[..., None] if channels_last else image[None]
    if ndim != 3:
        raise ValueError(
            "an image array must have shape (H, W), (H, W, C) or (C, H, W) (a batch: one more leading axis); "
            f"got {tuple(image.shape)}"
        )
    return image


def _layout(images, channels_last: bool = False):
    """None, a flat list of images, or a list of lists of images (one per text); 4-D arrays split into images."""
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(row, (list, tuple)) for row in images):
        rows = []
        for row in images:
            if any(isinstance(im, (list, tuple)) for im in row):
                raise ValueError("images nest at most two levels deep: a list of images per text")
            rows.append(
                [_one_image(im, channels_last) for item in row for im in (item if _is_batch(item) else [item])]
            )
        return rows if any(rows) else None
    if any(isinstance(row, (list, tuple)) for row in images):
        raise ValueError(
            "images mix single images and lists; pass one flat list (filling all markers in reading order) or one "
            "list of images per text"
        )
    return [_one_image(im, channels_last) for item in images for im in (item if _is_batch(item) else [item])] or None
