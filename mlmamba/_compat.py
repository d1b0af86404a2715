"""Every switch between transformers 4.x and 5.x, in one place.

Delete this module (and inline the 5.x side of each switch) when support for transformers 4.x ends:
each name below says which 4.x behaviour it bridges. Saved folders copy this file with the model code,
so it must stay importable with torch and transformers alone.
"""

import json
from pathlib import Path

import torch
import transformers
from torch import nn

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

try:  # transformers 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4: torch's own
    from torch.nn import init

try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:  # transformers 4
    _ALL_CACHE_NAMES = ()

# The name generate() keeps the state cache under in its model kwargs: "cache" since transformers 5.24,
# "cache_params" before (4.x and early 5.x). The model takes both names and returns `.cache`.
GENERATE_CACHE_KEY = "cache" if "cache" in _ALL_CACHE_NAMES else "cache_params"
OLD_CACHE_KEY = "cache_params"


def take_cache_argument(cache, kwargs: dict):
    """`cache`, or `cache_params` (its name before transformers 5.24) taken out of `kwargs`."""
    old = kwargs.pop(OLD_CACHE_KEY, None)
    if old is not None and cache is not None and old is not cache:
        raise ValueError("got two state caches: pass it once, as `cache` (`cache_params` is its old name)")
    return cache if cache is not None else old


class CacheParamsAlias:
    """`output.cache_params`: the name transformers' Mamba models gave the state cache before 5.24."""

    @property
    def cache_params(self):
        return self.cache


def tied_weights_keys(head: str, embedding: str):
    """`_tied_weights_keys`: a {head: embedding} mapping in 5.x, a list of head names in 4.x."""
    return {head: embedding} if TRANSFORMERS_5 else [head]


# The 4.x name of the image-text-to-text Auto class (5.x keeps it only as a deprecated alias, if at all).
AutoModelForVision2Seq = getattr(transformers, "AutoModelForVision2Seq", None)

# Auto classes a saved folder maps besides the one it was registered for: `AutoModelForVision2Seq` is
# the 4.x name of the image-text-to-text task.
EXTRA_AUTO_MAP = {
    "AutoModel": "modeling_mlmamba.MLMambaModel",
    "AutoModelForVision2Seq": "modeling_mlmamba.MLMambaForConditionalGeneration",
}


def unwrap_vision_model(encoder: nn.Module) -> nn.Module:
    """The vision transformer inside an `AutoModel`: transformers 4 wraps SigLIP's and CLIP's in
    `.vision_model`, transformers 5 does not. Taking the inner module gives the same weight names
    (and checkpoints) under both."""
    return getattr(encoder, "vision_model", encoder)


def processor_class_attributes() -> dict:
    """Class attributes a `ProcessorMixin` subclass needs in 4.x (5.x reads the classes from `__init__`)."""
    if TRANSFORMERS_5:
        return {}
    return {"image_processor_class": "AutoImageProcessor", "tokenizer_class": "AutoTokenizer"}


def rewrite_tokenizer_class(save_directory) -> None:
    """transformers 5 writes `tokenizer_class: "TokenizersBackend"`, which 4.x does not know; both read
    "PreTrainedTokenizerFast". Rewrites the saved `tokenizer_config.json` in place."""
    tok_config = Path(save_directory) / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_config.write_text(json.dumps(data, indent=2) + "\n")


def _torch_copy(tensor, value):
    with torch.no_grad():
        return tensor.copy_(value)


# `init.copy_` where transformers 5 has it (it skips weights loaded from a checkpoint); torch has none.
init_copy = getattr(init, "copy_", _torch_copy)
