"""Configuration of ML-Mamba style models: vision encoder(s) -> connector -> Mamba language model.

    MLMambaConfig
      vision_config     MLMambaVisionConfig     one or two transformers vision encoders, fused on channels
      connector_config  MLMambaConnectorConfig  "msc" (mlp -> Mamba-2 scan connector -> projector) or "mlp"
      text_config       MLMambaTextConfig       the Mamba-2 language model (mamba_ssm's MambaConfig fields)

The number of image tokens is derived from the vision geometry ((image_size // patch_size) ** 2),
never stored separately. Every value is checked when the config is built; a wrong one raises a
ValueError that says what is accepted.
"""

from transformers import AutoConfig, PretrainedConfig

# model_type of the transformers vision configs the vision tower can hold
SUPPORTED_VISION_ENCODERS = ("siglip_vision_model", "dinov2_with_registers", "clip_vision_model")
CONNECTOR_TYPES = ("msc", "mlp")
MSC_SCANS = ("bidirectional",)

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
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,  # the attention-pool head is not used by ML-Mamba
)



def _mixer_fields(config) -> dict:
    """The Mamba2Mixer arguments that the text and connector configs share, by the mixer's names."""
    return dict(
        d_state=config.d_state,
        d_conv=config.d_conv,
        expand=config.expand,
        headdim=config.headdim,
        ngroups=config.ngroups,
        chunk_size=config.chunk_size,
        conv_bias=config.conv_bias,
        bias=config.bias,
        norm_eps=config.norm_epsilon,
    )


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(allowed)}")


class MLMambaTextConfig(PretrainedConfig):
    """The Mamba-2 language model. Field names follow mamba_ssm's `MambaConfig` / `ssm_cfg`.

    `vocab_size` is the size of the embedding matrix (already padded, e.g. 50277 -> 50288).
    """

    model_type = "mlmamba_text"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    def __init__(
        self,
        d_model: int = 2560,
        n_layer: int = 64,
        vocab_size: int = 50288,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        conv_bias: bool = True,
        bias: bool = False,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range=(1, 16),
        dt_limit=None,
        initializer_range: float = 0.02,
        rescale_prenorm_residual: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_layer = n_layer
        self.vocab_size = vocab_size
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.conv_bias = conv_bias
        self.bias = bias
        self.norm_epsilon = norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.dt_min = dt_min
        self.dt_max = dt_max
        self.dt_init_floor = dt_init_floor
        self.A_init_range = list(A_init_range)
        # None = no clamp, mamba_ssm's (0, inf); stored so because JSON has no infinity
        self.dt_limit = list(dt_limit) if dt_limit is not None and tuple(dt_limit) != (0.0, float("inf")) else None
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        d_inner = expand * d_model
        if d_inner % headdim or (d_inner // headdim) % ngroups:
            raise ValueError(
                f"expand * d_model = {d_inner} must split into heads of headdim={headdim}, "
                f"and the number of heads into ngroups={ngroups}"
            )

    def mixer_kwargs(self) -> dict:
        """Keyword arguments for `Mamba2Mixer`."""
        return dict(
            _mixer_fields(self),
            dt_min=self.dt_min,
            dt_max=self.dt_max,
            dt_init_floor=self.dt_init_floor,
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
    """

    model_type = "mlmamba_vision"

    def __init__(self, encoders=None, feature_layer: int = -2, image_mean=None, image_std=None, **kwargs):
        if encoders is None:  # as released: DINOv2-L/14 with registers + SigLIP-SO400M/14, at 384 px
            encoders = [DINOV2_L14_REG4_384, SIGLIP_SO400M_14_384]
            image_mean = image_mean or [IMAGENET_MEAN, SIGLIP_MEAN]
            image_std = image_std or [IMAGENET_STD, SIGLIP_STD]
        if not encoders:
            raise ValueError("MLMambaVisionConfig needs `encoders`: a list of one or two vision config dicts")
        self.encoders = [e.to_dict() if isinstance(e, PretrainedConfig) else dict(e) for e in encoders]
        self.feature_layer = feature_layer
        self.image_mean = [list(m) for m in image_mean] if image_mean is not None else [[0.5, 0.5, 0.5]] * len(self.encoders)
        self.image_std = [list(s) for s in image_std] if image_std is not None else [[0.5, 0.5, 0.5]] * len(self.encoders)
        super().__init__(**kwargs)
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
                f"fused encoders must share image_size and patch_size to concatenate their patch grids; got {sorted(sizes)}"
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
    """Maps fused vision features (vision hidden size) to language-model embeddings.

    connector_type="msc" (ML-Mamba as released):
        mlp: Linear(vision -> hidden_size) + GELU
        MSC: `num_layers` x [x + BiMamba2(x); x + SwiGLU(LayerNorm(x))], then LayerNorm `norm_f`
        projector: Linear(hidden -> 4 hidden) GELU Linear(4 hidden -> d_model) GELU Linear(d_model -> d_model)
    connector_type="mlp" (Cobra): projector only, from the vision hidden size.

    `hidden_size` defaults to the language model width. Mixer fields as in MLMambaTextConfig.
    """

    model_type = "mlmamba_connector"

    def __init__(
        self,
        connector_type: str = "msc",
        hidden_size: int | None = None,
        num_layers: int = 2,
        scan: str = "bidirectional",
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        conv_bias: bool = True,
        bias: bool = False,
        norm_epsilon: float = 1e-5,
        layer_norm_epsilon: float = 1e-5,
        projector_expand: int = 4,
        **kwargs,
    ):
        self.connector_type = connector_type
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.scan = scan
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.conv_bias = conv_bias
        self.bias = bias
        self.norm_epsilon = norm_epsilon
        self.layer_norm_epsilon = layer_norm_epsilon
        self.projector_expand = projector_expand
        super().__init__(**kwargs)
        _one_of("connector_type", connector_type, CONNECTOR_TYPES)
        _one_of("scan", scan, MSC_SCANS)

    def mixer_kwargs(self) -> dict:
        return _mixer_fields(self)


class MLMambaConfig(PretrainedConfig):
    """ML-Mamba: vision encoder(s) -> connector -> Mamba-2 language model. The defaults are the released
    ML-Mamba ("mlmamba+3b"): DINOv2 + SigLIP at 384 px, the MSC connector, Mamba-2 2.7B.

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
        self.vision_config = self._sub(MLMambaVisionConfig, vision_config, "vision_config")
        self.connector_config = self._sub(MLMambaConnectorConfig, connector_config, "connector_config")
        self.text_config = self._sub(MLMambaTextConfig, text_config, "text_config")
        if self.connector_config.hidden_size is None:
            self.connector_config.hidden_size = self.text_config.d_model
        self.image_token_id = image_token_id
        self.freeze_vision_tower = freeze_vision_tower
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if not 0 <= image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_id={image_token_id} must index the embedding matrix (vocab_size={self.text_config.vocab_size})"
            )

    @staticmethod
    def _sub(cls, value, name):
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
        return self.text_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text_config.d_model
