"""Named configurations.

mlmamba-3b    the released ML-Mamba ("mlmamba+3b"): DINOv2-L/14-reg4 + SigLIP-SO400M/14 at 384 px,
              MSC connector (2 bidirectional Mamba-2 layers, width 2560), Mamba-2 2.7B.
mlmamba-tiny  the same architecture at a few MB, for tests and downstream CI.
"""

from .configuration_mlmamba import (
    DINOV2_L14_REG4_384,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_SO400M_14_384,
    SIGLIP_STD,
    MLMambaConfig,
)

MAMBA2_2_7B = dict(
    d_model=2560, n_layer=64, vocab_size=50288, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256
)


def _mlmamba_3b() -> dict:
    return dict(
        vision_config=dict(
            encoders=[DINOV2_L14_REG4_384, SIGLIP_SO400M_14_384],
            feature_layer=-2,
            image_mean=[IMAGENET_MEAN, SIGLIP_MEAN],
            image_std=[IMAGENET_STD, SIGLIP_STD],
        ),
        connector_config=dict(connector_type="msc", num_layers=2, d_state=128, headdim=64, expand=2, chunk_size=256),
        text_config=MAMBA2_2_7B,
        image_token_id=50277,
    )


def _mlmamba_tiny() -> dict:
    # 42 px / 14 px patches -> a 3 x 3 grid = 9 image tokens; vocab from the offline tokenizer (512 + specials).
    return dict(
        vision_config=dict(
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
            feature_layer=-2,
            image_mean=[IMAGENET_MEAN, SIGLIP_MEAN],
            image_std=[IMAGENET_STD, SIGLIP_STD],
        ),
        connector_config=dict(connector_type="msc", num_layers=2, d_state=16, headdim=16, expand=2, chunk_size=8),
        text_config=dict(
            d_model=64, n_layer=2, vocab_size=528, d_state=16, d_conv=4, expand=2, headdim=16, ngroups=1, chunk_size=16
        ),
        image_token_id=512,
    )


PRESETS = {"mlmamba-3b": _mlmamba_3b, "mlmamba-tiny": _mlmamba_tiny}
# Tokenizer vocabulary (before specials) that `--random` builds for each preset.
TOKENIZER_VOCAB = {"mlmamba-3b": 8192, "mlmamba-tiny": 512}


def get_preset(name: str, **overrides) -> MLMambaConfig:
    """The MLMambaConfig of a named configuration; keyword overrides replace top-level fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MLMambaConfig(**{**PRESETS[name](), **overrides})
