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

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ._compat import (
    EXTRA_AUTO_MAP,
    GENERATE_CACHE_KEY,
    OLD_CACHE_KEY,
    CacheParamsAlias,
    init,
    init_copy,
    take_cache_argument,
    tied_weights_keys,
)
from .cache import DecodeGraph, DecodeGraphs, MLMambaCache
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
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: MLMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


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
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_vision_tower_if_configured()  # loading re-creates parameters with requires_grad=True
        return loaded

    def freeze_vision_tower_if_configured(self) -> None:
        """Freeze the vision encoders when `config.freeze_vision_tower` (default True), as released."""
        if getattr(self.config, "freeze_vision_tower", True):
            for module in self.modules():
                if isinstance(module, MLMambaVisionTower):
                    module.requires_grad_(False)

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

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3 * n_encoders, H, W) -> (n_images, num_image_tokens, d_model)."""
        features = self.vision_tower(pixel_values)
        connector_dtype = next(self.connector.parameters()).dtype
        return self.connector(features.to(connector_dtype))

    def get_placeholder_mask(self, input_ids: torch.LongTensor, image_features: torch.Tensor) -> torch.Tensor:
        """(b, l) bool mask of the image tokens, checked to hold exactly one image's worth per image."""
        mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        n_images, per_image = image_features.shape[:2]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"Got {n_images} image(s), which need {n_images * per_image} image tokens ({per_image} each), "
                f"but input_ids hold {n_tokens} image tokens ({n_tokens / per_image:g} images' worth). Put one "
                "<image> in the text per image and let MLMambaProcessor expand it."
            )
        return mask

    def _check_no_image_tokens(self, input_ids: torch.LongTensor) -> None:
        n_tokens = int((input_ids == self.config.image_token_id).sum())
        if n_tokens:
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens but no pixel_values were given; pass the images "
                "(MLMambaProcessor does both), or remove the image tokens"
            )

    def _prepare_cache(self, cache, use_cache, inputs_embeds):
        """The cache this call reads and advances, or None (training with checkpointing takes none)."""
        batch_size = inputs_embeds.shape[0]
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and self.training and self.is_gradient_checkpointing:
            use_cache = False
        if not use_cache:
            return None
        if cache is None:
            return MLMambaCache(
                self.config.text_config, batch_size, dtype=inputs_embeds.dtype, device=inputs_embeds.device
            )
        if cache.batch_size != batch_size:
            raise ValueError(f"cache holds {cache.batch_size} rows but the input has {batch_size}")
        return cache

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: MLMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        """Arguments as in `MLMambaForConditionalGeneration.forward`; `seq_idx` (b, l) marks packed sequences
        (see `packed_sequence_index`): each runs as if alone, from a zero state."""
        cache = take_cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embedding(input_ids)

        # 1. Images replace their placeholder tokens.
        image_features = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError(
                    "pixel_values need input_ids with <image> placeholder tokens to mark where the images go; "
                    "with inputs_embeds, merge the image features (get_image_features) yourself"
                )
            image_features = self.get_image_features(pixel_values)
            mask = self.get_placeholder_mask(input_ids, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], image_features.to(inputs_embeds.dtype))
        elif input_ids is not None and (cache is None or cache.seqlen_offset == 0):
            self._check_no_image_tokens(input_ids)

        # 2. A mask of all ones is no mask.
        if attention_mask is not None:
            if attention_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the input is "
                    f"{tuple(inputs_embeds.shape[:2])}"
                )
            if bool(attention_mask.all()):
                attention_mask = None

        # 3. The language model, reading and advancing the state cache.
        cache = self._prepare_cache(cache, use_cache, inputs_embeds)
        hidden_states, all_hidden = self.language_model(
            inputs_embeds, attention_mask, cache, output_hidden_states=bool(output_hidden_states), seq_idx=seq_idx
        )
        if cache is not None:
            cache.seqlen_offset += inputs_embeds.shape[1]
        return MLMambaModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden,
            image_hidden_states=image_features,
        )


# Arguments generic callers (generate, Trainer) pass that this model does not read.
UNUSED_KWARGS = {"cache_position", "token_type_ids", "output_attentions", "is_first_iteration"}
# Read for padding-free (packed) batches: `position_ids` and what TRL's padding-free collator adds
# (see `packed_sequence_index`), and the Trainer's loss normaliser.
PACKING_KWARGS = {"position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
LOSS_KWARGS = {"num_items_in_batch"}


def _check_extra_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - UNUSED_KWARGS - PACKING_KWARGS - LOSS_KWARGS)
    if unknown:
        raise TypeError(f"MLMambaForConditionalGeneration.forward() got unexpected arguments {unknown}")
    if kwargs.get("output_attentions"):
        raise ValueError("Mamba layers compute no attention weights; output_attentions=True is not supported")


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin, DecodeGraphs):
    """ML-Mamba with a language-modelling head: image(s) + text -> next-token logits, and `generate()`."""

    _tied_weights_keys = tied_weights_keys("lm_head.weight", "model.language_model.embedding.weight")

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.d_model, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _decode_logits(self, input_ids: torch.LongTensor, cache: MLMambaCache) -> torch.Tensor:
        """One token per row with a state cache, no checks and no data-dependent branches (capturable):
        (b, 1) ids -> (b, 1, vocab) logits; the cache's states advance in place (not its seqlen_offset)."""
        hidden, _ = self.model.language_model(self.model.language_model.embedding(input_ids), None, cache)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

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

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values)

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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        decode_graph: DecodeGraph | None = None,
        **kwargs,
    ) -> MLMambaCausalLMOutput:
        """
        Args:
            input_ids: (batch, seq) token ids, with `num_image_tokens` `<image>` ids per image.
            pixel_values: (n_images, 3 * n_encoders, H, W) from MLMambaProcessor; images fill the image
                tokens in reading order (row by row).
            attention_mask: (batch, seq), 1 for tokens, 0 for left or right padding.
            labels: (batch, seq); -100 is ignored. Image token positions never carry loss.
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
        if decode_graph is not None:
            logits = decode_graph.step(input_ids).clone()  # the graph's buffer is overwritten by the next step
            cache.seqlen_offset += 1
            return MLMambaCausalLMOutput(logits=logits, cache=cache)

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
            seq_idx=seq_idx,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            if seq_idx is not None:  # the first token of a packed sequence is not predicted from the one before
                labels = labels.masked_fill(unpack_sequences(seq_idx)[4], -100)
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))

        return MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        inputs_embeds=None,
        cache: MLMambaCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs,
    ):
        """Prefill consumes the prompt (and the images); later steps feed only the tokens the cache has
        not seen. Without a cache the whole sequence (images included) is recomputed every step."""
        cache = take_cache_argument(cache, kwargs)
        embeds_prompt = inputs_embeds is not None and (input_ids is None or input_ids.shape[1] == 0)
        if use_cache and cache is None:
            cache = self.new_cache(inputs_embeds.shape[0] if embeds_prompt else input_ids.shape[0])
        seen = cache.seqlen_offset if use_cache else 0

        if seen == 0:
            if embeds_prompt:
                if use_cache:
                    cache.prompt_in_embeds = True
                model_inputs = {"inputs_embeds": inputs_embeds, "input_ids": None}
            else:
                model_inputs = {"input_ids": input_ids}
        else:
            new_ids = input_ids[:, -1:] if cache.prompt_in_embeds else input_ids[:, seen:]
            if new_ids.shape[1] == 0:
                raise ValueError(f"the cache has seen {seen} positions and input_ids hold no new token after them")
            model_inputs = {"input_ids": new_ids}
            if pixel_values is not None and not bool((new_ids == self.config.image_token_id).any()):
                pixel_values = None  # the images were consumed at prefill
            if attention_mask is not None:
                attention_mask = attention_mask[:, -new_ids.shape[1] :]
            if self.can_replay_decode_graph(new_ids, pixel_values, attention_mask, kwargs):
                model_inputs["decode_graph"] = self.decode_graph_for(cache)
        model_inputs.update(
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        return model_inputs

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
