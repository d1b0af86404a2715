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
    """`cache`, or its other names taken out of `kwargs`: `cache_params` (transformers' Mamba models before
    5.24) and `past_key_values` (transformers' general name, deprecated for `cache` in 5.24)."""
    for name in (OLD_CACHE_KEY, "past_key_values"):
        old = kwargs.pop(name, None)
        if old is not None and cache is not None and old is not cache:
            raise ValueError(f"got two state caches: pass it once, as `cache` (`{name}` is another name for it)")
        cache = cache if cache is not None else old
    return cache


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
    "AutoModelForMultimodalLM": "modeling_mlmamba.MLMambaForConditionalGeneration",  # where 5.x maps LLaVA
}
AutoModelForMultimodalLM = getattr(transformers, "AutoModelForMultimodalLM", None)


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


# --------------------------------------------------------------------------------------
# The state cache's base: under transformers 5 a `Cache` of linear-attention layers (as transformers' own
# Mamba2 keeps its states), so that cache utilities and `past_key_values=DynamicCache()` work; under 4.x a
# plain object holding the same tensors.
# --------------------------------------------------------------------------------------

try:
    from transformers.cache_utils import Cache as _Cache
    from transformers.cache_utils import LinearAttentionLayer
except ImportError:  # transformers 4.x (and 5.x before linear-attention cache layers)
    _Cache, LinearAttentionLayer = None, None


class StateCacheBase(_Cache if LinearAttentionLayer is not None else object):
    layers = None  # 4.x: the states live in `_states`

    @property
    def num_layers(self) -> int:
        return len(self.layers) if self.layers is not None else len(self._states)

    def layer_states(self, i: int):
        """(conv state, SSM state) of layer `i`, the tensors the mixers update in place."""
        if self.layers is not None:
            return self.layers[i].conv_states[0], self.layers[i].recurrent_states[0]
        return self._states[i]


def init_state_layers(cache, conv_states: list, ssm_states: list, layers: list | None = None) -> None:
    """Give `cache` one layer per (conv, SSM) state pair, holding those values (5.x: in `LinearAttentionLayer`s,
    `layers` if given, else new ones)."""
    if LinearAttentionLayer is None:
        cache._states = list(zip(conv_states, ssm_states))
        return
    layers = layers if layers is not None else [LinearAttentionLayer() for _ in conv_states]
    for layer, conv, ssm in zip(layers, conv_states, ssm_states):
        layer.lazy_initialization(conv_states=conv, recurrent_states=ssm)
        layer.conv_states[0].copy_(conv)
        layer.recurrent_states[0].copy_(ssm)
    _Cache.__init__(cache, layers=layers)


def mark_consumed(cache, consumed: bool = True) -> None:
    """Tell 5.x's cache layers whether they hold a previous state (`Cache.has_previous_state`)."""
    if cache.layers is not None:
        for layer in cache.layers:
            layer.has_previous_state[0] = consumed


def image_features_output(vision_features, image_embeddings, return_dict, hidden_states=None, attentions=None):
    """What `get_image_features` returns: as LLaVA in 5.x a `BaseModelOutputWithPooling` (`pooler_output` the
    image embeddings, `last_hidden_state` the fused vision features), a tuple with `return_dict=False`; as
    LLaVA in 4.x, the image embeddings themselves unless `return_dict=True` asks for the output."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if return_dict is None:
        return_dict = TRANSFORMERS_5
    output = BaseModelOutputWithPooling(
        last_hidden_state=vision_features,
        pooler_output=image_embeddings,
        hidden_states=hidden_states,
        attentions=attentions,
    )
    if not return_dict:
        return output.to_tuple() if TRANSFORMERS_5 else image_embeddings
    return output


# --------------------------------------------------------------------------------------
# torch.compile: checks and hooks that keep a compiled forward one graph.
# --------------------------------------------------------------------------------------

try:  # transformers 5: a ValueError in eager calls, a runtime check (no graph break) under torch.compile
    from transformers.utils import torch_compilable_check
except ImportError:  # transformers 4.x: the same helper, written out
    from transformers.utils import is_torchdynamo_compiling

    def torch_compilable_check(cond, msg, error_type: type[Exception] = ValueError) -> None:
        if is_torchdynamo_compiling():  # a hint and runtime check for the compiler; the message may not trace
            if isinstance(cond, torch.Tensor):
                torch._check_tensor_all(cond)
            else:
                torch._check(cond)
            return
        message = msg if callable(msg) else (lambda: msg)
        if callable(cond):
            cond = cond()
        if isinstance(cond, torch.Tensor):
            torch._check_tensor_all_with(error_type, cond, message)
        else:
            torch._check_with(error_type, cond, message)


try:  # transformers 5 records a model's hidden states by hooks installed at its first such call
    from transformers.utils.output_capturing import maybe_install_capturing_hooks as _install_capturing_hooks
except ImportError:  # transformers 4.x records them without hooks
    _install_capturing_hooks = None


def install_output_capturing_hooks(model: nn.Module) -> None:
    """Install now the hooks transformers 5 would install on `model`'s first call asking for hidden states: that
    installation takes a lock, which breaks a compiled graph (transformers' backbones install them at build too)."""
    if _install_capturing_hooks is not None:
        _install_capturing_hooks(model)
