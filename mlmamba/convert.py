"""Write complete, Hub-ready model folders (also installed as `mlmamba-convert`).

Random weights of a named configuration (offline):
    python -m mlmamba.convert --random --preset mlmamba-tiny --output DIR

The released ML-Mamba checkpoint, with the vision encoders' own releases and the tokenizer:
    python -m mlmamba.convert --checkpoint latest-checkpoint.pt \\
        --vision timm/vit_large_patch14_reg4_dinov2.lvd142m --vision timm/vit_so400m_patch14_siglip_384.webli \\
        --tokenizer xiuyul/mamba-2.8b-zephyr --output ml-mamba-3b

Cobra's released checkpoint (han1997/cobra, cobra+3b/checkpoints/latest-checkpoint.pt) the same way:
    python -m mlmamba.convert --checkpoint latest-checkpoint.pt --vision ... --vision ... \\
        --tokenizer xiuyul/mamba-2.8b-zephyr --output cobra-3b

A pretrained Mamba-2 or Mamba-1 language model under a random connector (to train a new model from it):
    python -m mlmamba.convert --text-model state-spaces/mamba2-2.7b --preset mlmamba-3b \\
        --vision ... --vision ... --tokenizer ... --output DIR
    python -m mlmamba.convert --text-model xiuyul/mamba-2.8b-zephyr --preset cobra-3b (or vlmamba-3b) ...

Each folder holds config.json, model.safetensors (sharded at 5 GB), the processor and tokenizer,
chat_template.jinja, the code files and a model card (README.md), and loads with
`AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`, with or without this package installed.
--vision, --tokenizer and --text-model take local folders or Hub ids (Hub ids need the network
once; local folders never do). --vision also takes timm state dict files (.safetensors, .pth, .bin) and
timm or open_clip folders: the weights the originals loaded through timm; transformers folders and Hub
ids such as facebook/dinov2-with-registers-large and google/siglip-so400m-patch14-384 hold the same weights.
Conversion is strict: every source tensor is used exactly once.
"""

from argparse import ArgumentParser, RawTextHelpFormatter
from pathlib import Path

import torch

from . import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaImageProcessor, MLMambaProcessor
from .convert_release import (
    CheckpointError,
    load_tensors,
    mamba_lm_from_folder,
    release_language_model,
    split_release,
    take_cobra_projector,
    take_connector,
)
from .convert_vision import load_vision_encoder
from .model_card import PAPERS, RELEASES, write_model_card
from .presets import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    SIGLIP_MEAN,
    SIGLIP_STD,
    TOKENIZER_VOCAB,
    get_preset,
)
from .tokenizer_offline import IMAGE, build_tokenizer

CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# normalisation each encoder family was trained with (as in the released image transform)
NORMALIZATION = {
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD),
    "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
}


def build_processor(config, tokenizer) -> MLMambaProcessor:
    """The processor that matches `config`'s vision geometry and normalisation."""
    vision = config.vision_config
    image_processor = MLMambaImageProcessor(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
        resize_strategy=vision.image_resize_strategy,
    )
    return MLMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(config: MLMambaConfig, dtype: torch.dtype, seed: int = 0) -> MLMambaForConditionalGeneration:
    """A randomly initialised model of `config`, in `dtype`, reproducible by `seed`."""
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return MLMambaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)


def model_and_processor(model, tokenizer) -> tuple[MLMambaForConditionalGeneration, MLMambaProcessor]:
    """`model` in eval mode with the tokenizer's eos and pad as its generation defaults, and its processor."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), build_processor(model.config, tokenizer)


def _special_token_ids(tokenizer) -> dict:
    return dict(
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _config_for(tokenizer, vision_config: dict, connector_config: dict, text_config: dict) -> MLMambaConfig:
    """The model config of these parts, with the tokenizer's `<image>`, eos and pad ids."""
    return MLMambaConfig(
        vision_config=vision_config,
        connector_config=connector_config,
        text_config=text_config,
        **_special_token_ids(tokenizer),
    )


def random_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight model of a named configuration and its processor (offline tokenizer)."""
    tokenizer = build_tokenizer(TOKENIZER_VOCAB[preset])
    config = get_preset(preset, **_special_token_ids(tokenizer))
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the embedding only {config.text_config.vocab_size}"
        )
    return model_and_processor(build_model(config, dtype, seed), tokenizer)


def load_tokenizer(source: str, vocab_size: int):
    """A tokenizer folder or Hub id, with `<image>` added as a special token when it lacks one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]}, replace_additional_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens (with {IMAGE}) but the embedding only {vocab_size} rows"
        )
    return tokenizer


def load_vision_tower(sources: list[str], image_size: int, dtype) -> tuple[dict, dict, list[str]]:
    """(vision config fields, `model.vision_tower.encoders.N.*` tensors, notes) of the encoders, in order, each
    with the normalisation its family was trained with."""
    encoders, means, stds, state, notes = [], [], [], {}, []
    for i, source in enumerate(sources):
        config, tensors, dropped, encoder_notes = load_vision_encoder(source, image_size, dtype=dtype)
        notes.extend(encoder_notes)
        if config["model_type"] == "siglip_vision_model" and config.get("hidden_act") != "gelu":
            # ML-Mamba and Cobra were trained on timm 0.9.10's SigLIP, which computes exact GELU where
            # transformers' config says the tanh approximation (up to 4.7e-4 apart per activation).
            act = config.get("hidden_act")
            notes.append(f"{source}: SigLIP's {act} replaced by exact gelu, as timm computed it in training")
            config["hidden_act"] = "gelu"
        encoders.append(config)
        mean, std = NORMALIZATION[config["model_type"]]
        means.append(mean)
        stds.append(std)
        state.update({f"model.vision_tower.encoders.{i}.{k}": v for k, v in tensors.items()})
        if dropped:
            notes.append(
                f"{source}: not used by ML-Mamba, dropped: {len(dropped)} tensors ({_top_level_names(dropped)})"
            )
    return dict(encoders=encoders, feature_layer=-2, image_mean=means, image_std=stds), state, notes


def _top_level_names(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] for k in keys}))


def load_into(model, state: dict) -> None:
    """Load `state` into `model`; every model tensor must be given and every given tensor used."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - {"lm_head.weight"})
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:20]}, unexpected {unexpected[:20]}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit the model's {tuple(own[key].shape)}")
    model.load_state_dict({**state, "lm_head.weight": state["model.language_model.embedding.weight"]})
    model.tie_weights()


def convert_release(
    checkpoint, vision: list[str], tokenizer: str, dtype=None, ngroups: int = 1, image_size: int = 384
):
    """A released ML-Mamba or Cobra checkpoint + its vision encoders + tokenizer -> (model, processor, notes, family).
    The family ("mlmamba" or "cobra") is told by the checkpoint's parts (`mlmamba.convert_release.split_release`)."""
    family, parts = split_release(load_tensors(checkpoint))
    text, lm_state = release_language_model(family, parts, ngroups=ngroups)
    dtype = dtype or lm_state["model.language_model.embedding.weight"].dtype
    vision_config, vision_state, notes = load_vision_tower(vision, image_size=image_size, dtype=dtype)
    vision_hidden = sum(e["hidden_size"] for e in vision_config["encoders"])
    if family == "cobra":
        connector_config, connector_state = take_cobra_projector(parts["projector"], vision_hidden, text["d_model"])
    else:
        connector_config, connector_state = take_connector(parts, vision_hidden, text["d_model"])
    tok = load_tokenizer(tokenizer, text["vocab_size"])
    model = build_model(_config_for(tok, vision_config, connector_config, text), dtype)
    load_into(model, {**lm_state, **connector_state, **vision_state})
    model, processor = model_and_processor(model, tok)
    return model, processor, notes, family


def family_of(preset: str) -> str:
    """The family of a named configuration: "mlmamba", "cobra" or "vlmamba"."""
    family = preset.split("-")[0]
    return family if family in PAPERS else "mlmamba"


def convert_text_model(text_model: str, preset: str, vision: list[str], tokenizer: str, dtype=None, seed: int = 0):
    """A pretrained Mamba-2 or Mamba-1 LM (vision encoders too, if given) under a randomly initialised connector.
    The preset gives the connector and vision geometry; its language model must be of the same kind."""
    from huggingface_hub import snapshot_download

    folder = text_model if Path(text_model).is_dir() else snapshot_download(text_model)
    text, lm_state = mamba_lm_from_folder(folder)
    base = PRESETS[preset]()
    wanted = base["text_config"].get("ssm_layer", "Mamba2")
    if text["ssm_layer"] != wanted:
        raise CheckpointError(
            f"{text_model} is a {text['ssm_layer']} language model, but preset {preset!r} is built on {wanted}: "
            f"use {'an mlmamba-*' if text['ssm_layer'] == 'Mamba2' else 'a cobra-* or vlmamba-*'} preset"
        )
    dtype = dtype or lm_state["model.language_model.embedding.weight"].dtype
    image_size = base["vision_config"]["encoders"][0]["image_size"]
    if vision:
        vision_config, vision_state, notes = load_vision_tower(vision, image_size, dtype)
    else:
        vision_config, vision_state, notes = base["vision_config"], {}, []
    tok = load_tokenizer(tokenizer, text["vocab_size"])
    connector = dict(base["connector_config"])
    if connector.get("connector_type", "msc") in ("msc", "vss-l2"):
        connector["hidden_size"] = text["d_model"]
    model = build_model(_config_for(tok, vision_config, connector, text), dtype, seed)
    own = model.state_dict()
    random_parts = {k: v for k, v in own.items() if k.startswith("model.connector.")}
    if not vision:
        random_parts.update({k: v for k, v in own.items() if k.startswith("model.vision_tower.")})
    load_into(model, {**lm_state, **vision_state, **random_parts})
    notes.append("the connector is randomly initialised" + ("" if vision else ", and so are the vision encoders"))
    model, processor = model_and_processor(model, tok)
    return model, processor, notes


def save_folder(model, processor, output: str | Path) -> Path:
    output = Path(output)
    model.save_pretrained(output, max_shard_size="5GB")
    processor.save_pretrained(output)
    return output


def main(argv=None):
    parser = ArgumentParser(prog="mlmamba-convert", description=__doc__, formatter_class=RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--random", action="store_true", help="random weights for a named configuration (--preset)")
    source.add_argument("--checkpoint", help="ML-Mamba's or Cobra's latest-checkpoint.pt (or a folder of its tensors)")
    text_model_help = "a Mamba-2 or Mamba-1 LM folder or Hub id (state-spaces or transformers format)"
    source.add_argument("--text-model", help=text_model_help)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (--random, --text-model)")
    vision_help = (
        "vision encoder, in order (DINOv2 first, as released): a transformers or timm folder or Hub id, "
        "or a timm state dict file"
    )
    parser.add_argument("--vision", action="append", default=[], help=vision_help)
    tokenizer_help = "tokenizer folder or Hub id (GPT-NeoX-20B style, e.g. xiuyul/mamba-2.8b-zephyr)"
    parser.add_argument("--tokenizer", help=tokenizer_help)
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    dtype_help = "cast weights (default: keep the checkpoint's; random: float32 for -tiny, else bfloat16)"
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    image_size_help = "image size of the converted model (--checkpoint; 384 as released)"
    parser.add_argument("--image-size", type=int, default=384, help=image_size_help)
    ngroups_help = "Mamba-2 ngroups of the checkpoint (shapes cannot tell; released models use 1)"
    parser.add_argument("--ngroups", type=int, default=1, help=ngroups_help)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    output = Path(args.output)

    if args.random:
        if not args.preset:
            parser.error("--random needs --preset")
        dtype = dtype or DTYPES["float32" if args.preset.endswith("-tiny") else "bfloat16"]
        model, processor = random_model(args.preset, seed=args.seed, dtype=dtype)
        save_folder(model, processor, output)
        notes = ["random weights, for tests and pipelines; not a trained model"]
        write_model_card(output, f"{args.preset} (random weights)", [], notes, family=family_of(args.preset))
    else:
        if not args.tokenizer:
            parser.error("--tokenizer is required to convert weights")
        if args.checkpoint:
            if len(args.vision) == 0:
                parser.error("--checkpoint needs the vision encoders: --vision DINO --vision SIGLIP (in this order)")
            model, processor, notes, family = convert_release(
                args.checkpoint, args.vision, args.tokenizer, dtype, args.ngroups, args.image_size
            )
            title, release = RELEASES[family]
            bases, license = [release, *args.vision], "mit"  # both releases are MIT
        else:
            if not args.preset:
                parser.error("--text-model needs --preset for the parts it does not provide")
            model, processor, notes = convert_text_model(
                args.text_model, args.preset, args.vision, args.tokenizer, dtype, args.seed
            )
            family = family_of(args.preset)
            # a model card names Hub ids, never local paths
            lm_name = Path(args.text_model).name if Path(args.text_model).exists() else args.text_model
            title = f"{PAPERS[family][0]} on {lm_name} (connector untrained)"
            bases = [args.text_model, *args.vision]
            license = "apache-2.0"  # the state-spaces Mamba language models and Mamba-2.8B-Zephyr
        save_folder(model, processor, output)
        write_model_card(output, title, bases, notes, license, family=family)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {n_params / 1e6:.1f}M parameters ({model.dtype}) to {output}")


if __name__ == "__main__":
    main()
