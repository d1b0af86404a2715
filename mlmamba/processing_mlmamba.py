"""Image + text processing for ML-Mamba.

MLMambaProcessor: the image processor (MLMambaImageProcessor, in image_processing_mlmamba.py) plus a
    GPT-NeoX-style tokenizer. Each `<image>` in the text is expanded to `num_image_tokens` placeholder
    tokens, which the model replaces with the image's embeddings; the number of `<image>` must equal the
    number of images.

Saved folders carry this file with the model code, and transformers' remote-code loader copies only the
modules it imports directly: import package modules here as `from .module import ...`, never through
another module of the package.
"""

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from ._compat import processor_class_attributes, rewrite_tokenizer_class
from .image_processing_mlmamba import MLMambaImageProcessor, _flatten_images

__all__ = ["IMAGE_TOKEN", "MLMambaImageProcessor", "MLMambaProcessor"]

IMAGE_TOKEN = "<image>"


class MLMambaProcessor(ProcessorMixin):
    """Wraps MLMambaImageProcessor and a tokenizer; `processor(images=..., text=...)` gives the model inputs."""

    attributes = ["image_processor", "tokenizer"]
    locals().update(processor_class_attributes())  # the class namespace: 4.x's image_processor_class etc.

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

    def __call__(self, images=None, text=None, return_tensors="pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image, a list of images, or a list of lists (one list per text); they fill the
                `<image>` markers in reading order.
            text: a string or a list of strings, each with one `<image>` per image it refers to.
            padding: False (rows must then have equal length), True / "longest", or "max_length"
                (with max_length); on `padding_side` ("left" or "right"), by default the tokenizer's.
            truncation: with max_length, rows longer than max_length tokens (images included) lose their
                last tokens, as the tokenizer's right-side truncation does. Only text may be cut: a row whose
                image tokens would be cut raises a ValueError that names max_length.
            **kwargs: passed to the tokenizer (e.g. return_offsets_mapping).

        Each `<image>` is tokenized as one token and then repeated `num_image_tokens` times, so token
        offsets (return_offsets_mapping) still point into the text as given.
        """
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"MLMambaProcessor takes images and text; {modality} are not supported")
        for key in ("images_kwargs", "text_kwargs", "common_kwargs"):
            kwargs.update(kwargs.pop(key, None) or {})
        kwargs.pop("return_text_replacement_offsets", None)  # offsets already refer to the unexpanded text
        truncation = kwargs.pop("truncation", None)
        if truncation not in (None, False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r}; use True or False (text after the images is cut)")
        truncation = truncation not in (None, False, "do_not_truncate")
        padding_side = kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
        if text is None:
            raise ValueError("MLMambaProcessor needs text (use `<image>` to place each image)")
        texts = [text] if isinstance(text, str) else list(text)
        images = _flatten_images(images)
        n_markers = sum(t.count(self.image_token) for t in texts)
        if n_markers != len(images):
            raise ValueError(
                f"got {len(images)} image(s) but {n_markers} {self.image_token} marker(s) in the text; "
                f"put one {self.image_token} in the text for each image"
            )
        padding = kwargs.pop("padding", False)
        max_length = kwargs.pop("max_length", None)
        pad_to_multiple_of = kwargs.pop("pad_to_multiple_of", None)
        kwargs.setdefault("add_special_tokens", False)
        kwargs.setdefault("return_token_type_ids", False)  # the model has none (transformers 4 adds them)
        encoded = self.tokenizer(texts, **kwargs)
        rows = self._expand_image_tokens({k: list(v) for k, v in encoded.items()})
        if truncation and max_length is not None:
            rows = self._truncate(rows, max_length)
        rows = self._pad(rows, padding, max_length, pad_to_multiple_of, padding_side, ragged_ok=return_tensors is None)
        data = dict(rows)
        if images:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_image_tokens(self, rows: dict) -> dict:
        """Repeat every `<image>` position of every per-token field num_image_tokens times."""
        n = self.num_image_tokens
        out = {k: [] for k in rows}
        for i, ids in enumerate(rows["input_ids"]):
            repeats = [n if t == self.image_token_id else 1 for t in ids]
            for key, values in rows.items():
                out[key].append([v for v, r in zip(values[i], repeats) for _ in range(r)])
        return out

    def _truncate(self, rows: dict, max_length: int) -> dict:
        """Keep the first max_length tokens of every row; refuse to cut image tokens (their image would lose
        its place, or part of it)."""
        for i, ids in enumerate(rows["input_ids"]):
            if len(ids) <= max_length:
                continue
            if self.image_token_id in ids[max_length:]:
                raise ValueError(
                    f"text {i} has {len(ids)} tokens (each image counts {self.num_image_tokens}), more than "
                    f"max_length={max_length}, and truncating it would cut image tokens; raise max_length (in TRL: "
                    "SFTConfig.max_length / --max_length) or set it to None, or shorten the text"
                )
            for values in rows.values():
                values[i] = values[i][:max_length]
        return rows

    def _pad(self, rows: dict, padding, max_length, pad_to_multiple_of, padding_side: str, ragged_ok: bool) -> dict:
        lengths = [len(ids) for ids in rows["input_ids"]]
        if padding in (False, None, "do_not_pad"):
            if len(set(lengths)) > 1 and not ragged_ok:
                raise ValueError(f"texts have different lengths {lengths}; pass padding=True to batch them")
            return rows
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            if max(lengths) > max_length:
                raise ValueError(
                    f"a text has {max(lengths)} tokens (images included), more than max_length={max_length}"
                )
            target = max_length
        else:
            raise ValueError(f"padding={padding!r}; use False, True, 'longest' or 'max_length'")
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        fill = {"input_ids": self.tokenizer.pad_token_id, "offset_mapping": (0, 0)}
        left = padding_side == "left"
        for key, values in rows.items():
            for i, row in enumerate(values):
                pad = [fill.get(key, 0)] * (target - len(row))
                values[i] = pad + row if left else row + pad
        return rows

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """transformers' `apply_chat_template`; a tokenized result holds lists unless `return_tensors` is given,
        as tokenizers and other processors return them (TRL's template checks index into those lists). A direct
        `processor(images=..., text=...)` call still returns tensors."""
        processor_kwargs = kwargs.get("processor_kwargs") or {}
        if (
            kwargs.get("tokenize")
            and kwargs.get("return_tensors", "auto") == "auto"
            and "return_tensors" not in processor_kwargs
        ):
            kwargs["return_tensors"] = None
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with `tokenizer_class` written as "PreTrainedTokenizerFast": the name
        transformers 5 writes ("TokenizersBackend") does not exist in 4.x, and both read this one."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        rewrite_tokenizer_class(save_directory)
        return saved

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]
