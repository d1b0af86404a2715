"""ML-Mamba, Cobra and VL-Mamba as one transformers model: the composite, glue only.

    pixel_values (n_images, 3 * n_encoders, H, W)
      -> MLMambaVisionTower     transformers' SiglipVisionModel / Dinov2WithRegistersModel / CLIPVisionModel,
                                hidden state `feature_layer`, prefix tokens dropped, fused on channels
                                -> (n_images, num_image_tokens, vision_hidden)                vision_tower.py
      -> MLMambaConnector       "msc" (ML-Mamba): mlp -> MSC (Mamba-2 scan connector) -> projector
                                "mlp" (Cobra): projector
                                "mlp2x" / "vss-mlp" / "vss-l2" (VL-Mamba): linear layers and a VSS
                                -> (n_images, num_image_tokens, d_model)                      connectors.py
      -> replaces the `<image>` placeholder embeddings in the text
      -> MLMambaLanguageModel   Mamba-2 or Mamba-1 blocks (mamba_ssm layout: embedding, layers.N.{norm,mixer},
                                norm_f)                                                       language_model.py
      -> lm_head (tied to the embedding) -> logits

Decoding keeps an `MLMambaCache` (cache.py): per layer a conv state and an SSM state, constant in length.
The mixers are mamba2_mixer.py and mamba1_mixer.py over ssm_ops.py, with optional GPU kernels in
kernels.py. Every helper module is imported here directly: transformers 4.x copies only the direct
imports of the file `auto_map` names into a remote-code folder's module cache.
"""

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput, is_torchdynamo_compiling

from ._compat import (
    EXTRA_AUTO_MAP,
    GENERATE_CACHE_KEY,
    OLD_CACHE_KEY,
    TRANSFORMERS_5,
    CacheParamsAlias,
    image_features_output,
    init,
    init_copy,
    take_cache_argument,
    tied_weights_keys,
    torch_compilable_check,
)
from .cache import DecodeGraph, DecodeGraphs, MLMambaCache, as_state_cache, check_cache_fits
from .configuration_mlmamba import MLMambaConfig
from .connectors import MLMambaConnector
from .kernels import get_kernels  # noqa: F401  (each helper module is imported here, see above)
from .language_model import (
    MLMambaBlock,
    MLMambaLanguageModel,
    causal_lm_loss,
    packed_sequence_index,
    unpack_sequences,
)
from .mamba1_mixer import Mamba1Mixer  # noqa: F401
from .mamba2_mixer import Mamba2Mixer  # noqa: F401
from .ssm_ops import RMSNorm, RMSNormGated, ScanMixer
from .vision_tower import MLMambaVisionTower


@dataclass
class MLMambaModelOutput(CacheParamsAlias, ModelOutput):
    """
    last_hidden_state: (batch, seq, d_model) after the final norm.
    cache: the updated `MLMambaCache` when `use_cache`.
    hidden_states: per layer outputs (embeddings first) when `output_hidden_states`.
    image_hidden_states: (n_images, num_image_tokens, d_model) connector outputs when images were given.
    attentions: with `output_attentions`, the vision encoders' attention maps when images were given (the Mamba
        layers compute none).
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: MLMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MLMambaCausalLMOutput(CacheParamsAlias, ModelOutput):
    """
    loss: mean next-token cross-entropy over labels != -100 (when `labels` are given).
    logits: (batch, seq or logits_to_keep, vocab).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: MLMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # FSDP / accelerate shard units: each Mamba block, each scan-connector layer, each vision encoder layer.
    _no_split_modules = [
        "MLMambaBlock",
        "MSCLayer",
        "VSSLayer",
        "SiglipEncoderLayer",
        "Dinov2WithRegistersLayer",
        "CLIPEncoderLayer",
    ]
    _is_stateful = True
    _supports_sdpa = True  # the vision encoders use it; the Mamba parts have no attention

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, strict for this model's own weights: a language-model, connector or
        head weight missing from the checkpoint, or one the model has no place for, raises (naming them) instead
        of loading as random. Vision encoder weights may be missing (they are drawn as in a fresh encoder).
        `output_loading_info=True` (the caller reads the missing keys) and a given `state_dict` load as
        transformers does."""
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except NotImplementedError as error:
            if "aten.equal" not in str(error):
                raise
            raise NotImplementedError(
                "this folder holds torchao-quantized weights for both the input embedding and the output layer "
                "tied to it (as saved from a model loaded with mlmamba.quantization.int8_weight_only_config()); "
                "transformers cannot load that back (its tied-weights check calls torch.equal, which torchao's "
                "quantized tensors do not implement). Load the unquantized folder with "
                "quantization_config=int8_weight_only_config() instead: it quantizes as it loads."
            ) from error
        # Asking for the loading info, or handing over the weights (`state_dict`), means the caller looks at them.
        if not wants_info and kwargs.get("state_dict") is None:
            check_loaded_weights(info, ignore_mismatched=kwargs.get("ignore_mismatched_sizes", False))
        model.freeze_vision_tower_if_configured()  # loading re-creates parameters with requires_grad=True
        return (model, info) if wants_info else model

    def freeze_vision_tower_if_configured(self) -> None:
        """Freeze the vision encoders when `config.freeze_vision_tower` (default True), as released."""
        if getattr(self.config, "freeze_vision_tower", True):
            for module in self.modules():
                if isinstance(module, MLMambaVisionTower):
                    module.requires_grad_(False)

    @torch.no_grad()
    def initialize_weights(self):
        # transformers' traversal (children first), but each vision encoder's modules take their own model's init,
        # and nothing is skipped as remote code: transformers 5 skips remote code's modules that have no parameters
        # of their own (SigLIP's and CLIP's attention and MLP, which their init sets), unsure that such code
        # initialises through `init`, as ours does.
        towers = [m for m in self.modules() if isinstance(m, MLMambaVisionTower)]

        def initialize(module):
            for child in module.children():
                initialize(child)
            encoders = [t.encoder_model_of(module) for t in towers]
            owner = next((encoder for encoder in encoders if encoder is not None), self)
            owner._initialize_weights(module)

        initialize(self)

    @torch.no_grad()
    def _init_weights(self, module):
        text = self.config.text_config
        std = text.initializer_range
        if isinstance(module, ScanMixer):
            # after the generic Linear init of its children below (modules are initialised children first)
            module.reset_ssm_parameters(copy=init_copy)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, RMSNormGated, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        if isinstance(module, MLMambaBlock) and text.rescale_prenorm_residual:
            # GPT-2 style: scale the residual branch's output projection by 1/sqrt(n_layer).
            init.normal_(module.mixer.out_proj.weight, mean=0.0, std=std / text.n_layer**0.5)


def check_loaded_weights(info: dict, ignore_mismatched: bool = False) -> None:
    """Raise for weights of the language model, connector or head that a checkpoint lacked, or had extra."""
    own = re.compile(r"(^|\.)(language_model|connector|lm_head)\.")
    problems = {
        "missing from the checkpoint": [k for k in info.get("missing_keys", []) if own.search(k)],
        "in the checkpoint but not in the model": [k for k in info.get("unexpected_keys", []) if own.search(k)],
    }
    if not ignore_mismatched:
        problems["of another shape in the checkpoint"] = [str(k) for k in info.get("mismatched_keys", [])]
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(
            f"{len(keys)} {what}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
            for what, keys in problems.items()
        )
        raise ValueError(
            f"the checkpoint does not match the model's language model / connector weights ({listed}). "
            "Check that config.json belongs to these weights (layer counts, sizes, connector_type)"
        )


class MLMambaModel(MLMambaPreTrainedModel):
    """Vision tower + connector + Mamba language model, without the LM head."""

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.vision_tower = MLMambaVisionTower(config.vision_config)
        grid = (config.vision_config.grid_size,) * 2
        self.connector = MLMambaConnector(
            config.connector_config, config.vision_config.hidden_size, config.text_config.d_model, grid
        )
        self.language_model = MLMambaLanguageModel(config.text_config)
        self.freeze_vision_tower_if_configured()
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embedding

    def set_input_embeddings(self, value):
        self.language_model.embedding = value

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ):
        """(n_images, 3 * n_encoders, H, W) -> image embeddings (n_images, num_image_tokens, d_model).

        As transformers 5's VLMs: a `BaseModelOutputWithPooling` whose `pooler_output` is the image embeddings
        and `last_hidden_state` the fused vision features (a tuple with `return_dict=False`). Under 4.x, as
        LLaVA there, the image embeddings tensor itself. `hidden_states` and `attentions` are the vision tower's
        (`MLMambaVisionTower.encode`). Flags left as None come from the config.
        """
        config = self.config
        if return_dict is None and TRANSFORMERS_5:
            return_dict = config.return_dict
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        features, hidden, attentions = self.vision_tower.encode(
            pixel_values, bool(output_hidden_states), bool(output_attentions)
        )
        embeddings = self.connector(features.to(self.get_input_embeddings().weight.dtype))
        return image_features_output(features, embeddings, return_dict, hidden, attentions)

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features) -> torch.Tensor:
        """(b, l) bool mask of the image tokens, from `input_ids` or else from `inputs_embeds` (positions equal to
        the image token's embedding), checked to hold exactly one image's worth per image."""
        if input_ids is not None:
            mask = input_ids == self.config.image_token_id
        else:
            image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            mask = (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)
        n_tokens = mask.sum()
        n_images, per_image = image_features.shape[:2]

        def message():
            n = int(n_tokens)
            return (
                f"Got {n_images} image(s), which need {n_images * per_image} image tokens ({per_image} each), "
                f"but the input holds {n} image tokens ({n / per_image:g} images' worth). Put one "
                "<image> in the text per image and let MLMambaProcessor expand it."
            )

        torch_compilable_check(n_tokens == n_images * per_image, message)
        return mask

    def _check_input_ids(self, input_ids: torch.LongTensor, images_given: bool, prefill: bool) -> None:
        # Checks that are ValueErrors in eager calls and runtime checks, not graph breaks, under torch.compile.
        vocab = self.get_input_embeddings().num_embeddings
        torch_compilable_check(
            (input_ids >= 0) & (input_ids < vocab),
            lambda: (
                f"input_ids must be token ids in [0, {vocab}); got values from {int(input_ids.min())} to "
                f"{int(input_ids.max())}. Tokenize the text with this model's processor."
            ),
        )
        if not images_given and prefill:
            image_tokens = input_ids == self.config.image_token_id
            torch_compilable_check(
                ~image_tokens,
                lambda: (
                    f"input_ids hold {int(image_tokens.sum())} image tokens but no pixel_values were given; pass "
                    "the images (MLMambaProcessor does both), or remove the image tokens"
                ),
            )

    @property
    def default_use_cache(self) -> bool:
        """`use_cache` when a call does not say: the config's (`from_pretrained(..., use_cache=False)` sets it)."""
        return self.config.text_config.use_cache

    def _prepare_cache(self, cache, use_cache, inputs_embeds, packed: bool = False):
        """The cache this call reads and advances, or None (training with checkpointing, and packed sequences
        unless asked for one, take none)."""
        batch_size = inputs_embeds.shape[0]
        if use_cache is None:
            use_cache = cache is not None or (not self.training and not packed and self.default_use_cache)
        if use_cache and self.training and self.is_gradient_checkpointing:
            use_cache = False
        if not use_cache:
            return None
        if cache is None:
            return MLMambaCache(
                self.config.text_config, batch_size, dtype=inputs_embeds.dtype, device=inputs_embeds.device
            )
        cache = as_state_cache(cache, self.config.text_config, batch_size, inputs_embeds.dtype, inputs_embeds.device)
        check_cache_fits(cache, self.config.text_config, batch_size)
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: MLMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> MLMambaModelOutput | tuple:
        """Arguments as in `MLMambaForConditionalGeneration.forward`; `seq_idx` (b, l) marks packed sequences
        (see `packed_sequence_index`): each runs as if alone, from a zero state."""
        cache = take_cache_argument(cache, kwargs)
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        output_attentions = kwargs.pop("output_attentions", None)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            prefill = not isinstance(cache, MLMambaCache) or cache.get_seq_length() == 0
            self._check_input_ids(input_ids, pixel_values is not None, prefill)
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if inputs_embeds.shape[1] == 0:
            raise ValueError("the input holds no tokens: give at least one (the prompt was empty)")

        # 1. Images replace their placeholder tokens.
        image_features = vision_attentions = None
        if pixel_values is not None:
            image_output = self.get_image_features(
                pixel_values, return_dict=True, output_hidden_states=False, output_attentions=output_attentions
            )
            image_features, vision_attentions = image_output.pooler_output, image_output.attentions
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], image_features.to(inputs_embeds.dtype))

        # 2. A mask of all ones is no mask.
        if attention_mask is not None:
            if attention_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the input is "
                    f"{tuple(inputs_embeds.shape[:2])}"
                )
            if not is_torchdynamo_compiling() and bool(attention_mask.all()):
                attention_mask = None  # compiled, the mixers take it as it is: an all-ones mask changes nothing

        # 3. The language model, reading and advancing the state cache.
        cache = self._prepare_cache(cache, use_cache, inputs_embeds, packed=seq_idx is not None)
        hidden_states, all_hidden = self.language_model(
            inputs_embeds, attention_mask, cache, output_hidden_states=bool(output_hidden_states), seq_idx=seq_idx
        )
        if cache is not None:
            cache.record(input_ids, inputs_embeds.shape[1])
        output = MLMambaModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=select_hidden_states(all_hidden, output_hidden_states),
            image_hidden_states=image_features,
            attentions=vision_attentions,
        )
        return output if return_dict else output.to_tuple()


def select_hidden_states(all_hidden, output_hidden_states):
    """All hidden states, or (as transformers does for a list of layer indices) a tuple of the same length with
    None except at the positions listed; negative indices count from the end, embeddings are index 0."""
    if all_hidden is None or isinstance(output_hidden_states, bool):
        return all_hidden
    keep = {i % len(all_hidden) for i in output_hidden_states}
    return tuple(h if i in keep else None for i, h in enumerate(all_hidden))


# Arguments generic callers (generate, Trainer) pass that this model does not read.
UNUSED_KWARGS = {"cache_position", "token_type_ids", "is_first_iteration"}
# Passed on to the composite: the vision encoders' attentions (the Mamba layers have none).
VISION_KWARGS = {"output_attentions"}
# Read for padding-free (packed) batches: `position_ids` and what TRL's padding-free collator adds
# (see `packed_sequence_index`), and the Trainer's loss normaliser.
PACKING_KWARGS = {"position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
LOSS_KWARGS = {"num_items_in_batch", "shift_labels", "ignore_index"}  # transformers' ForCausalLMLoss


def _check_extra_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - UNUSED_KWARGS - PACKING_KWARGS - LOSS_KWARGS - VISION_KWARGS)
    if unknown:
        raise TypeError(f"MLMambaForConditionalGeneration.forward() got unexpected arguments {unknown}")


# The input embedding the output layer is tied to (quantization.py names it too).
TIED_EMBEDDING = "model.language_model.embedding"


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin, DecodeGraphs):
    """ML-Mamba with a language-modelling head: image(s) + text -> next-token logits, and `generate()`."""

    _tied_weights_keys = tied_weights_keys("lm_head.weight", f"{TIED_EMBEDDING}.weight")

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.d_model, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _decode_logits(self, input_ids: torch.LongTensor, cache: MLMambaCache) -> torch.Tensor:
        """One token per row with a state cache, no checks and no data-dependent branches (capturable):
        (b, 1) ids -> (b, 1, vocab) logits; the cache's states advance in place (not its seqlen_offset)."""
        hidden, _ = self.model.language_model(self.model.language_model.embedding(input_ids), None, cache)
        return self.lm_head(hidden.to(self.lm_head_dtype()))

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # Remote code: let every Auto class users reach for find the code files.
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **EXTRA_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, return_dict: bool | None = None, **kwargs):
        return self.model.get_image_features(pixel_values, return_dict=return_dict, **kwargs)

    def generate(self, *args, **kwargs):
        """transformers' `generate()`; attention outputs are refused up front (the model has no attention)."""
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
            raise ValueError("Mamba layers compute no attention weights; output_attentions=True is not supported")
        for name in ("cache", "past_key_values", OLD_CACHE_KEY):  # a transformers Cache becomes the state cache
            given = kwargs.get(name)
            if given is not None and not isinstance(given, MLMambaCache):
                inputs = kwargs.get("inputs_embeds", kwargs.get("input_ids", args[0] if args else None))
                kwargs[name] = as_state_cache(given, self.config.text_config, inputs.shape[0], self.dtype, self.device)
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state cache is created in `prepare_inputs_for_generation`

    def new_cache(self, batch_size: int) -> MLMambaCache:
        """An empty state cache for `batch_size` rows on the model's device and dtype."""
        return MLMambaCache(self.config.text_config, batch_size, dtype=self.dtype, device=self.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: MLMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        decode_graph: DecodeGraph | None = None,
        **kwargs,
    ) -> MLMambaCausalLMOutput | tuple:
        """
        Args:
            input_ids: (batch, seq) token ids, with `num_image_tokens` `<image>` ids per image.
            pixel_values: (n_images, 3 * n_encoders, H, W) from MLMambaProcessor; images fill the image
                tokens in reading order (row by row).
            attention_mask: (batch, seq), 1 for tokens, 0 for left or right padding.
            labels: (batch, seq); -100 is ignored. Image token positions never carry loss. The loss is transformers'
                `ForCausalLMLoss` (its `shift_labels`, `ignore_index` and `num_items_in_batch` are accepted), and 0
                where no label is kept (with a warning) rather than NaN.
            output_hidden_states: True for every layer's output (embeddings first), or a list of their indices.
            return_dict: False returns a tuple in the order of `MLMambaCausalLMOutput`, without its None fields.
            cache / use_cache: the state cache for decoding (see MLMambaCache).
            logits_to_keep: if > 0, only the logits of the last `logits_to_keep` positions are computed.
            decode_graph: set by `prepare_inputs_for_generation` for a plain decoding step when decode graphs
                are enabled: the step replays that graph.
            position_ids / seq_idx / cu_seq_lens_q: padding-free (packed) batches, as TRL's collator with
                `padding_free=True` or `packing=True` makes them: sequences back to back in a row, without an
                attention_mask. Each sequence is computed as if alone (its own zero state) and no loss crosses
                from one into the next. Otherwise position_ids are ignored (a Mamba has no positions).
        """
        cache = take_cache_argument(cache, kwargs)
        _check_extra_kwargs(kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if decode_graph is not None:
            logits = decode_graph.step(input_ids).clone()  # the graph's buffer is overwritten by the next step
            cache.record(input_ids, 1)
            output = MLMambaCausalLMOutput(logits=logits, cache=cache)
            return output if return_dict else output.to_tuple()

        seq_idx = packed_sequence_index(
            attention_mask, kwargs.get("position_ids"), kwargs.get("seq_idx"), kwargs.get("cu_seq_lens_q")
        )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            seq_idx=seq_idx,
            output_attentions=kwargs.get("output_attentions"),
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head_dtype()))

        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            # Image tokens, padding and the first token of a packed sequence are never predicted.
            never = torch.zeros(outputs.last_hidden_state.shape[:2], dtype=torch.bool, device=logits.device)
            if input_ids is not None:
                never |= input_ids == self.config.image_token_id
            if attention_mask is not None:
                never |= attention_mask == 0
            if seq_idx is not None:
                never |= unpack_sequences(seq_idx)[4]
            loss = causal_lm_loss(logits, labels, never, **{k: v for k, v in kwargs.items() if k in LOSS_KWARGS})

        output = MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def lm_head_dtype(self) -> torch.dtype:
        """The dtype the head computes in, from a parameter every variant keeps (a quantized Linear's `weight`
        may be a method): the embedding's, which the head is tied to."""
        return self.model.get_input_embeddings().weight.dtype

    def prepare_inputs_for_generation(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        inputs_embeds=None,
        cache: MLMambaCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        output_hidden_states=None,
        is_first_iteration: bool | None = None,
        **kwargs,
    ):
        """Prefill consumes the prompt (and the images); later steps feed only the tokens the cache has
        not seen. Without a cache the whole sequence (images included) is recomputed every step."""
        cache = take_cache_argument(cache, kwargs)
        batch_size = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        if use_cache:
            cache = as_state_cache(cache, self.config.text_config, batch_size, self.dtype, self.device)
            cache = cache if cache is not None else self.new_cache(batch_size)
        seen = cache.get_seq_length() if use_cache else 0

        if seen == 0:
            if inputs_embeds is not None:  # generation from embeddings, with or without their ids
                if not use_cache and is_first_iteration is False:
                    raise ValueError("generation from inputs_embeds needs the state cache: pass use_cache=True")
                if use_cache:
                    cache.prompt_in_embeds = True
                model_inputs = {"inputs_embeds": inputs_embeds, "input_ids": None}
            else:
                model_inputs = {"input_ids": input_ids}
            if attention_mask is not None and not bool(attention_mask[:, -1].all()):
                raise ValueError(
                    "generate() continues every row from its last position, and a right-padded row ends in padding: "
                    "pad prompts on the left (processor.tokenizer.padding_side = 'left', or padding_side='left')"
                )
        else:
            if cache.prompt_in_embeds:
                new_ids = input_ids[:, -1:]
            else:
                cache.check_continued_by(input_ids)
                new_ids = input_ids[:, seen:]
            model_inputs = {"input_ids": new_ids}
            if pixel_values is not None and not bool((new_ids == self.config.image_token_id).any()):
                pixel_values = None  # the images were consumed at prefill
            if attention_mask is not None:
                attention_mask = attention_mask[:, -new_ids.shape[1] :]
            if self.can_replay_decode_graph(new_ids, pixel_values, attention_mask, output_hidden_states, kwargs):
                model_inputs["decode_graph"] = self.decode_graph_for(cache)
        model_inputs.update(
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        if output_hidden_states is not None:
            model_inputs["output_hidden_states"] = output_hidden_states
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and several returned sequences: rows are repeated `expand_size` times, and each row's images
        with it (`pixel_values` holds images, not rows, so a plain repeat would pair rows with wrong images)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            per_row = self._images_per_row(input_ids, model_kwargs.get("inputs_embeds"))
            rows = torch.split(pixel_values, per_row.tolist())
            pixel_values = torch.cat([row for row in rows for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def _images_per_row(self, input_ids, inputs_embeds) -> torch.Tensor:
        if input_ids is not None and input_ids.shape[1] > 0:
            mask = input_ids == self.config.image_token_id
        else:
            image_token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            mask = (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)
        return mask.sum(1) // self.config.num_image_tokens

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Keep the state cache where this transformers version's generate() looks for it (beam search
        reorders it there): `GENERATE_CACHE_KEY`."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs.pop(OLD_CACHE_KEY if GENERATE_CACHE_KEY == "cache" else "cache", None)
        if outputs.cache is not None:
            model_kwargs[GENERATE_CACHE_KEY] = outputs.cache
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx):
        """Beam search under transformers 4.x (5.x calls `cache.reorder_cache` itself)."""
        cache.reorder_cache(beam_idx)
        return cache


__all__ = [
    "MLMambaCache",
    "MLMambaModel",
    "MLMambaPreTrainedModel",
    "MLMambaForConditionalGeneration",
]
