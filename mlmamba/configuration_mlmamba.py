"""Configuration of ML-Mamba style models: vision encoder(s) -> connector -> Mamba language model.

    MLMambaConfig
      vision_config     MLMambaVisionConfig     one or two transformers vision encoders, fused on channels
      connector_config  MLMambaConnectorConfig  ML-Mamba's MSC, Cobra's MLP projector, VL-Mamba's VSS variants
      text_config       MLMambaTextConfig       the Mamba-2 (ML-Mamba) or Mamba-1 (Cobra, VL-Mamba) language
                                                model, with mamba_ssm's MambaConfig field names

The number of image tokens is derived from the vision geometry ((image_size // patch_size) ** 2),
never stored separately. Every value is checked when the config is built; a wrong one raises a
ValueError that says what is accepted.
"""

from transformers import AutoConfig, PretrainedConfig

# model_type of the transformers vision configs the vision tower can hold
SUPPORTED_VISION_ENCODERS = ("siglip_vision_model", "dinov2_with_registers", "clip_vision_model")
# "msc": ML-Mamba; "mlp": Cobra's fused projector; "mlp2x", "vss-mlp", "vss-l2": VL-Mamba's three connectors.
CONNECTOR_TYPES = ("msc", "mlp", "mlp2x", "vss-mlp", "vss-l2")
# Scans of the connectors that scan the image (MSC and VSS): BSM ("bidirectional") and CSM ("cross").
CONNECTOR_SCANS = ("bidirectional", "cross")
SSM_LAYERS = ("Mamba2", "Mamba1")  # mamba_ssm's ssm_cfg["layer"]

# The released ML-Mamba's vision encoders (the defaults of MLMambaVisionConfig).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

# Vision encoders as released (transformers config fields), resized to 384 px (27 x 27 patches).
DINOV2_L14_REG4_384 = dict(
    model_type="dinov2_with_registers",
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    mlp_ratio=4,
    patch_size=14,
    image_size=384,
    num_register_tokens=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
    use_swiglu_ffn=False,
)
SIGLIP_SO400M_14_384 = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
    layer_norm_eps=1e-6,
    # exact GELU: ML-Mamba and Cobra ran timm 0.9.10's SigLIP, which computes it so (google's config and
    # transformers' say the tanh approximation; the two differ by up to 4.7e-4 per activation)
    hidden_act="gelu",
    vision_use_head=False,  # the attention-pool head is not used by ML-Mamba
)

# The mixer fields the text and connector configs share, with mamba_ssm's defaults for a Mamba-2 mixer
# (the Mamba-1 presets set d_state=16 and dt_rank). Both configs take them as keyword arguments.
MIXER_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    chunk_size=256,
    conv_bias=True,
    bias=False,
    norm_epsilon=1e-5,
    dt_rank="auto",
)


def _set_mixer_fields(config, kwargs: dict) -> None:
    """Set every `MIXER_DEFAULTS` field on `config` from `kwargs` (popped) or its default."""
    for name, default in MIXER_DEFAULTS.items():
        setattr(config, name, kwargs.pop(name, default))


def _mixer_fields(config) -> dict:
    """The mixer arguments that the text and connector configs share, by the mixer's names:
    `Mamba2Mixer`'s or `Mamba1Mixer`'s, as `config.ssm_layer` says."""
    fields = dict(
        d_state=config.d_state,
        d_conv=config.d_conv,
        expand=config.expand,
        conv_bias=config.conv_bias,
        bias=config.bias,
    )
    if config.ssm_layer == "Mamba1":
        return dict(fields, dt_rank=config.dt_rank)
    return dict(
        fields,
        headdim=config.headdim,
        ngroups=config.ngroups,
        chunk_size=config.chunk_size,
        norm_eps=config.norm_epsilon,
    )


def _check_mixer_fields(config, d_model: int) -> None:
    """Check the mixer fields of `config` for a mixer of width `d_model`."""
    _one_of("ssm_layer", config.ssm_layer, SSM_LAYERS)
    if config.ssm_layer == "Mamba1":
        if config.dt_rank != "auto" and not (isinstance(config.dt_rank, int) and config.dt_rank > 0):
            raise ValueError(f"dt_rank={config.dt_rank!r}: use 'auto' (ceil(d_model / 16)) or a positive int")
        return
    d_inner = config.expand * d_model
    if d_inner % config.headdim or (d_inner // config.headdim) % config.ngroups:
        raise ValueError(
            f"expand * d_model = {d_inner} must split into heads of headdim={config.headdim}, "
            f"and the number of heads into ngroups={config.ngroups}"
        )


def _check_positive(config, names) -> None:
    """Sizes and counts must be positive integers (a layer count of -1 would build a model without layers)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(allowed)}")


class MLMambaTextConfig(PretrainedConfig):
    """The Mamba language model. Field names follow mamba_ssm's `MambaConfig` / `ssm_cfg`.

    `ssm_layer` picks the mixer: "Mamba2" (SSD; ML-Mamba's Mamba-2 2.7B) or "Mamba1" (selective scan;
    Cobra's and VL-Mamba's Mamba-2.8B-Zephyr). The mixer fields shared with the connector config are keyword
    arguments with `MIXER_DEFAULTS`. headdim, ngroups, chunk_size, A_init_range and dt_limit are Mamba-2
    fields; dt_rank, dt_init and dt_scale are Mamba-1 fields; the others are shared.
    `vocab_size` is the size of the embedding matrix (already padded, e.g. 50277 -> 50288).

    `max_prefill_tokens` is an inference setting, not architecture: with a state cache and no autograd,
    a longer prompt goes through the layers in pieces of at most this many tokens, the state carried
    from piece to piece (chunked prefill). The result is the same; the activation memory stops growing
    with the prompt and, on a CPU, a layer's activations stay in cache. None picks per device
    (`default_max_prefill_tokens`); 0 never splits.
    """

    model_type = "mlmamba_text"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    def __init__(
        self,
        d_model: int = 2560,
        n_layer: int = 64,
        vocab_size: int = 50288,
        residual_in_fp32: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range=(1, 16),
        dt_limit=None,
        initializer_range: float = 0.02,
        rescale_prenorm_residual: bool = True,
        tie_word_embeddings: bool = True,
        ssm_layer: str = "Mamba2",
        dt_init: str = "random",
        dt_scale: float = 1.0,
        max_prefill_tokens: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        self.ssm_layer = ssm_layer
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 0):
            raise ValueError(
                f"max_prefill_tokens={max_prefill_tokens!r}: use a number of tokens, 0 to never split prompts, "
                "or None for the device's default"
            )
        self.max_prefill_tokens = max_prefill_tokens
        self.use_cache = use_cache
        _set_mixer_fields(self, kwargs)
        self.dt_init = dt_init
        self.dt_scale = dt_scale
        self.d_model = d_model
        self.n_layer = n_layer
        self.vocab_size = vocab_size
        self.residual_in_fp32 = residual_in_fp32
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.A_init_range = list(A_init_range)
        # None = no clamp, mamba_ssm's (0, inf); stored so because JSON has no infinity
        self.dt_limit = list(dt_limit) if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")) else None
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        _check_positive(self, ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim"))
        _check_positive(self, ("ngroups", "chunk_size"))
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        _check_mixer_fields(self, d_model)
        _one_of("dt_init", dt_init, ("random", "constant"))

    @property
    def layer_types(self) -> list[str]:
        """Every layer keeps a recurrent state: transformers' caches (`DynamicCache(config=...)`) then hold
        linear-attention layers, as for transformers' Mamba2."""
        return ["linear_attention"] * self.n_layer

    def mixer_kwargs(self) -> dict:
        """Keyword arguments for `Mamba2Mixer` or `Mamba1Mixer` (as `ssm_layer` says)."""
        init = dict(dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor)
        if self.ssm_layer == "Mamba1":
            return dict(_mixer_fields(self), **init, dt_init=self.dt_init, dt_scale=self.dt_scale)
        return dict(
            _mixer_fields(self),
            **init,
            A_init_range=tuple(self.A_init_range),
            dt_limit=tuple(self.dt_limit) if self.dt_limit is not None else (0.0, float("inf")),
        )


class MLMambaVisionConfig(PretrainedConfig):
    """One or more transformers vision encoders whose patch features are concatenated on channels.

    Args:
        encoders: list of transformers vision config dicts (each with its `model_type`: one of
            SUPPORTED_VISION_ENCODERS). All must see the same image size and patch grid.
        feature_layer: which hidden state to take (python index into `hidden_states`; -2 = the
            output of the second-to-last block, as released). Prefix tokens (CLS, registers) are dropped.
        image_mean, image_std: per encoder, the normalisation its weights were trained with.
        image_resize_strategy: how the processor makes images square, "resize-naive" (stretch; ML-Mamba and
            Cobra as released) or "letterbox" (pad with the mean colour first; LLaVA's "pad").
    """

    model_type = "mlmamba_vision"

    def __init__(
        self,
        encoders=None,
        feature_layer: int = -2,
        image_mean=None,
        image_std=None,
        image_resize_strategy: str = "resize-naive",
        **kwargs,
    ):
        if encoders is None:  # as released: DINOv2-L/14 with registers + SigLIP-SO400M/14, at 384 px
            encoders = [DINOV2_L14_REG4_384, SIGLIP_SO400M_14_384]
            image_mean = image_mean or [IMAGENET_MEAN, SIGLIP_MEAN]
            image_std = image_std or [IMAGENET_STD, SIGLIP_STD]
        if not encoders:
            raise ValueError("MLMambaVisionConfig needs `encoders`: a list of one or two vision config dicts")
        self.encoders = [e.to_dict() if isinstance(e, PretrainedConfig) else dict(e) for e in encoders]
        self.feature_layer = feature_layer
        self.image_resize_strategy = image_resize_strategy
        self.image_mean = (
            [list(m) for m in image_mean] if image_mean is not None else [[0.5, 0.5, 0.5]] * len(self.encoders)
        )
        self.image_std = (
            [list(s) for s in image_std] if image_std is not None else [[0.5, 0.5, 0.5]] * len(self.encoders)
        )
        super().__init__(**kwargs)
        _one_of("image_resize_strategy", image_resize_strategy, ("resize-naive", "letterbox"))
        for enc in self.encoders:
            _one_of("vision encoder model_type", enc.get("model_type"), SUPPORTED_VISION_ENCODERS)
        if not (len(self.image_mean) == len(self.image_std) == len(self.encoders)):
            raise ValueError(
                f"image_mean and image_std need one entry per encoder ({len(self.encoders)}); "
                f"got {len(self.image_mean)} and {len(self.image_std)}"
            )
        configs = self.encoder_configs()
        sizes = {(c.image_size, c.patch_size) for c in configs}
        if len(sizes) != 1:
            raise ValueError(
                "fused encoders must share image_size and patch_size to concatenate their patch grids; "
                f"got {sorted(sizes)}"
            )
        for c in configs:
            n = c.num_hidden_layers
            if not -(n + 1) <= feature_layer <= n or feature_layer % (n + 1) == 0:
                raise ValueError(
                    f"feature_layer={feature_layer} does not select a layer output among the {n + 1} hidden states "
                    f"of {c.model_type} (index 0 / -{n + 1} are the embeddings)"
                )

    def encoder_configs(self) -> list[PretrainedConfig]:
        return [AutoConfig.for_model(**enc) for enc in self.encoders]

    @property
    def image_size(self) -> int:
        return self.encoders[0]["image_size"]

    @property
    def patch_size(self) -> int:
        return self.encoders[0]["patch_size"]

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def hidden_size(self) -> int:
        """Channels of the fused feature map (sum over encoders)."""
        return sum(enc["hidden_size"] for enc in self.encoders)


class MLMambaConnectorConfig(PretrainedConfig):
    """Maps fused vision features (n, grid * grid, vision hidden size) to language-model embeddings.

    connector_type="msc" (ML-Mamba as released):
        mlp: Linear(vision -> hidden_size) + GELU
        MSC: `num_layers` x [x + Mamba2(x); x + SwiGLU(LayerNorm(x))], then LayerNorm `norm_f`
        projector: Linear(hidden -> 4 hidden) GELU Linear(4 hidden -> d_model) GELU Linear(d_model -> d_model)
    connector_type="mlp" (Cobra): that projector only, from the vision hidden size.
    VL-Mamba's MultiModal Connectors (no code was released; this is our reading of the paper):
        "mlp2x":   Linear(vision -> d_model) GELU Linear(d_model -> d_model)
        "vss-mlp": VSS on the vision features (at the vision width), then the "mlp2x" layers
        "vss-l2":  mlp: Linear(vision -> hidden_size) + GELU, VSS (at hidden_size),
                   projector: Linear(hidden -> d_model):
                   the VSS sits between the two linear layers
        VSS (Vision Selective Scan): `num_layers` x [x + Mixer(LayerNorm(x))], then LayerNorm `norm_f`.

    `scan`: how MSC and VSS mixers visit the patch grid: "bidirectional" (BSM: the flattened grid forward
    and backward, as ML-Mamba released) or "cross" (CSM: rows and columns, each both ways).
    `ssm_layer`: the scan's mixer, "Mamba2" (MSC always) or "Mamba1" (VL-Mamba's VSS). The other mixer fields
    are keyword arguments with `MIXER_DEFAULTS`, as in MLMambaTextConfig. `hidden_size` defaults to the
    language model width.
    """

    model_type = "mlmamba_connector"

    def __init__(
        self,
        connector_type: str = "msc",
        hidden_size: int | None = None,
        num_layers: int = 2,
        scan: str = "bidirectional",
        layer_norm_epsilon: float = 1e-5,
        projector_expand: int = 4,
        ssm_layer: str = "Mamba2",
        **kwargs,
    ):
        self.ssm_layer = ssm_layer
        _set_mixer_fields(self, kwargs)
        self.connector_type = connector_type
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.scan = scan
        self.layer_norm_epsilon = layer_norm_epsilon
        self.projector_expand = projector_expand
        super().__init__(**kwargs)
        _one_of("connector_type", connector_type, CONNECTOR_TYPES)
        _one_of("scan", scan, CONNECTOR_SCANS)
        _one_of("ssm_layer", ssm_layer, SSM_LAYERS)
        if connector_type == "msc" and ssm_layer != "Mamba2":
            raise ValueError(
                'the MSC is a Mamba-2 scan connector: use ssm_layer="Mamba2", or connector_type="vss-l2" / "vss-mlp" '
                "for a Mamba-1 scan"
            )

    @property
    def scans_image(self) -> bool:
        """Whether the connector has a scan module (MSC or VSS), and so mixer parameters."""
        return self.connector_type in ("msc", "vss-mlp", "vss-l2")

    def scan_width(self, vision_hidden: int) -> int:
        """Channels the scan runs at: the vision features' for "vss-mlp", `hidden_size` otherwise."""
        return vision_hidden if self.connector_type == "vss-mlp" else self.hidden_size

    def mixer_kwargs(self) -> dict:
        return dict(_mixer_fields(self), scan=self.scan)


class MLMambaConfig(PretrainedConfig):
    """Vision encoder(s) -> connector -> Mamba language model: ML-Mamba, Cobra and VL-Mamba (see `presets`).
    The defaults are the released ML-Mamba ("mlmamba+3b"): DINOv2 + SigLIP at 384 px, the MSC connector,
    Mamba-2 2.7B.

    Args:
        vision_config, connector_config, text_config: dicts or config objects (see the classes above).
        image_token_id: id of the `<image>` placeholder; each image fills `num_image_tokens` of them.
        freeze_vision_tower: keep the vision encoders frozen (requires_grad=False), as released.
    """

    model_type = "mlmamba"
    sub_configs = {
        "vision_config": MLMambaVisionConfig,
        "connector_config": MLMambaConnectorConfig,
        "text_config": MLMambaTextConfig,
    }

    def __init__(
        self,
        vision_config=None,
        connector_config=None,
        text_config=None,
        image_token_id: int = 50277,
        freeze_vision_tower: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vision_config = self._sub_config(MLMambaVisionConfig, vision_config, "vision_config")
        self.connector_config = self._sub_config(MLMambaConnectorConfig, connector_config, "connector_config")
        self.text_config = self._sub_config(MLMambaTextConfig, text_config, "text_config")
        if self.connector_config.hidden_size is None:
            self.connector_config.hidden_size = self.text_config.d_model
        self.image_token_id = image_token_id
        self.freeze_vision_tower = freeze_vision_tower
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # generate() and Trainer read special tokens from the text config (`get_text_config()`): mirror them.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is not None and getattr(self.text_config, name, None) is None:
                setattr(self.text_config, name, getattr(self, name))
        if self.connector_config.scans_image:
            _check_mixer_fields(
                self.connector_config, self.connector_config.scan_width(self.vision_config.hidden_size)
            )
        if not 0 <= image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={image_token_id} must index the embedding matrix "
                f"(vocab_size={self.text_config.vocab_size})"
            )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config (it names its `model_type`) must hold all three parts: a missing one would silently
        become the released 2.7B part and then fail to load the weights."""
        if config_dict.get("model_type") == cls.model_type:
            missing = [name for name in cls.sub_configs if not config_dict.get(name)]
            if missing:
                raise ValueError(
                    f"this MLMamba config.json has no {' and no '.join(missing)}: it is incomplete or not an MLMamba "
                    "config. Write folders with `python -m mlmamba.convert` or `save_pretrained`"
                )
        return super().from_dict(config_dict, **kwargs)

    @staticmethod
    def _sub_config(cls, value, name):
        if value is None:
            return cls()  # the released ML-Mamba's part
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")}
            return cls(**value)
        raise TypeError(f"{name} must be a dict or a {cls.__name__}, got {type(value).__name__}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_image_tokens

    @property
    def vocab_size(self) -> int:
        """The language model's vocabulary (`text_config.vocab_size`); setting it sets that."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.text_config.vocab_size = value

    @property
    def use_cache(self) -> bool:
        """Whether forward() keeps a state cache when a call does not say (`text_config.use_cache`)."""
        return self.text_config.use_cache

    @use_cache.setter
    def use_cache(self, value: bool) -> None:
        self.text_config.use_cache = value

    @property
    def hidden_size(self) -> int:
        return self.text_config.d_model
