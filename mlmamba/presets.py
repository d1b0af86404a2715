"""Named configurations.

mlmamba-3b    the released ML-Mamba ("mlmamba+3b"): DINOv2-L/14-reg4 + SigLIP-SO400M/14 at 384 px,
              MSC connector (2 bidirectional Mamba-2 layers, width 2560), Mamba-2 2.7B.
cobra-3b      Cobra ("cobra+3b"): the same vision encoders, the fused MLP projector, Mamba-2.8B-Zephyr (Mamba-1).
vlmamba-3b    VL-Mamba: CLIP ViT-L/14-336, the VSS-L2 connector with the cross scan (CSM) on Mamba-1
              mixers, Mamba-2.8B-Zephyr (Mamba-1). No weights were released.
*-tiny        the same architectures at a few MB, for tests and downstream CI.
"""

import copy

from .configuration_mlmamba import (
    DINOV2_L14_REG4_384,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_SO400M_14_384,
    SIGLIP_STD,
    MLMambaConfig,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# openai/clip-vit-large-patch14-336, VL-Mamba's vision encoder (24 x 24 = 576 patches).
CLIP_L14_336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
    projection_dim=768,
)

MAMBA2_2_7B = dict(
    d_model=2560, n_layer=64, vocab_size=50288, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256
)
# state-spaces/mamba-2.8b (-slimpj), and xiuyul/mamba-2.8b-zephyr fine-tuned from it: vocab 50277 padded to 50280.
MAMBA1_2_8B = dict(
    ssm_layer="Mamba1", d_model=2560, n_layer=64, vocab_size=50280, d_state=16, d_conv=4, expand=2, dt_rank=160
)

DINOSIGLIP_384 = dict(
    encoders=[DINOV2_L14_REG4_384, SIGLIP_SO400M_14_384],
    feature_layer=-2,
    image_mean=[IMAGENET_MEAN, SIGLIP_MEAN],
    image_std=[IMAGENET_STD, SIGLIP_STD],
)
# 42 px / 14 px patches -> a 3 x 3 grid = 9 image tokens.
DINOSIGLIP_TINY = dict(
    DINOSIGLIP_384,
    encoders=[
        dict(DINOV2_L14_REG4_384, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=42),
        dict(
            SIGLIP_SO400M_14_384,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=42,
        ),
    ],
)
# Vocabulary of the offline tokenizer of the tiny presets: 512 + specials (<image> = 512), padded to 528.
TINY_TEXT = dict(d_model=64, n_layer=2, vocab_size=528, d_state=16, d_conv=4, expand=2)


def _mlmamba_3b() -> dict:
    return dict(
        vision_config=DINOSIGLIP_384,
        connector_config=dict(connector_type="msc", num_layers=2, d_state=128, headdim=64, expand=2, chunk_size=256),
        text_config=MAMBA2_2_7B,
        image_token_id=50277,
    )


def _mlmamba_tiny() -> dict:
    return dict(
        vision_config=DINOSIGLIP_TINY,
        connector_config=dict(connector_type="msc", num_layers=2, d_state=16, headdim=16, expand=2, chunk_size=8),
        text_config=dict(TINY_TEXT, headdim=16, ngroups=1, chunk_size=16),
        image_token_id=512,
    )


def _cobra_3b() -> dict:
    # prismatic's FusedMLPProjector: 2176 -> 8704 -> 2560 -> 2560
    return dict(
        vision_config=DINOSIGLIP_384,
        connector_config=dict(connector_type="mlp", projector_expand=4),
        text_config=MAMBA1_2_8B,
        image_token_id=50277,
    )


def _cobra_tiny() -> dict:
    return dict(
        vision_config=DINOSIGLIP_TINY,
        connector_config=dict(connector_type="mlp", projector_expand=4),
        text_config=dict(TINY_TEXT, ssm_layer="Mamba1"),
        image_token_id=512,
    )


def _vlmamba_3b() -> dict:
    # VSS-L2 with CSM at the LM width; Mamba-1 scan mixers as VMamba's SS2D (d_state 16, expand 2).
    return dict(
        vision_config=dict(
            encoders=[CLIP_L14_336],
            feature_layer=-2,
            image_mean=[CLIP_MEAN],
            image_std=[CLIP_STD],
            image_resize_strategy="letterbox",  # LLaVA-1.5's "pad", which VL-Mamba trains with
        ),
        connector_config=dict(
            connector_type="vss-l2", scan="cross", ssm_layer="Mamba1", num_layers=1, d_state=16, expand=2
        ),
        text_config=MAMBA1_2_8B,
        image_token_id=50277,
    )


def _vlmamba_tiny() -> dict:
    # 56 px / 14 px patches -> a 4 x 4 grid, so that rows and columns differ in the cross scan.
    clip = dict(
        CLIP_L14_336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56
    )
    return dict(
        vision_config=dict(
            encoders=[clip],
            feature_layer=-2,
            image_mean=[CLIP_MEAN],
            image_std=[CLIP_STD],
            image_resize_strategy="letterbox",
        ),
        connector_config=dict(
            connector_type="vss-l2", scan="cross", ssm_layer="Mamba1", num_layers=1, d_state=8, expand=2
        ),
        text_config=dict(TINY_TEXT, ssm_layer="Mamba1"),
        image_token_id=512,
    )


def _fresh(preset):
    """Each call returns new dicts: callers may change them without touching the shared parts above."""
    return lambda: copy.deepcopy(preset())


PRESETS = {
    "mlmamba-3b": _fresh(_mlmamba_3b),
    "mlmamba-tiny": _fresh(_mlmamba_tiny),
    "cobra-3b": _fresh(_cobra_3b),
    "cobra-tiny": _fresh(_cobra_tiny),
    "vlmamba-3b": _fresh(_vlmamba_3b),
    "vlmamba-tiny": _fresh(_vlmamba_tiny),
}
# Tokenizer vocabulary (before specials) that `--random` builds for each preset.
TOKENIZER_VOCAB = {name: 512 if name.endswith("-tiny") else 8192 for name in PRESETS}


def get_preset(name: str, **overrides) -> MLMambaConfig:
    """The MLMambaConfig of a named configuration; keyword overrides replace top-level fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MLMambaConfig(**{**PRESETS[name](), **overrides})
