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
        --vision ... --vision ... --tokenizer xiuyul/mamba-2.8b-zephyr --output DIR
    python -m mlmamba.convert --text-model xiuyul/mamba-2.8b-zephyr --preset cobra-3b (or vlmamba-3b) ...
(the state-spaces folders hold no tokenizer, so --tokenizer is needed; Mamba-2.8B-Zephyr's own is its default)

Each folder holds config.json, model.safetensors (sharded at 5 GB), the processor and tokenizer,
chat_template.jinja, the code files and a model card (README.md), and loads with
`AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`, with or without this package installed.
--vision, --tokenizer and --text-model take local folders or Hub ids (Hub ids need the network
once; local folders never do). --vision also takes timm state dict files (.safetensors, .pth, .bin) and
timm or open_clip folders: the weights the originals loaded through timm; transformers folders and Hub
ids such as facebook/dinov2-with-registers-large and google/siglip-so400m-patch14-384 hold the same weights.
Conversion is strict: every source tensor is used exactly once. The vision encoders are identified from their
config or weights (DINOv2 by its register tokens, SigLIP, CLIP) and must come in the order the model was
trained with: DINOv2 first, then SigLIP (or CLIP), as released; a swapped order is refused.
With --text-model, the tokenizer defaults to the one in the language model's folder (when it has one).

Safe output: --output must be new or empty, or --overwrite must be given (the old folder is replaced, all
its files removed, only once the new folder is complete). An output that is, contains or lies inside a
source folder (or contains a source file) is refused, even with --overwrite. The folder is written under a
temporary name beside it (.NAME.partial-XXXX) and renamed at the end: an interrupted conversion never
leaves a folder that looks complete. Stages are printed to stderr, with progress bars on a terminal.
"""

import inspect
import secrets
import shutil
import sys
from argparse import ArgumentParser, RawTextHelpFormatter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook

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
ENCODER_NAMES = {"dinov2_with_registers": "DINOv2", "siglip_vision_model": "SigLIP", "clip_vision_model": "CLIP"}
# Files that make a folder a tokenizer folder (the language model's own, the default of --text-model's tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class OutputError(ValueError):
    """An output folder that would lose files: not empty (without overwrite), or a source's folder."""


def stage(message: str) -> None:
    """One line per stage of a conversion, on stderr (stdout keeps the one-line summary)."""
    print(f"mlmamba-convert: {message}", file=sys.stderr, flush=True)


def _progress_bar(total, desc: str):
    """huggingface_hub's tqdm (HF_HUB_DISABLE_PROGRESS_BARS turns it off) on stderr, shown on a terminal only."""
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, desc=desc, unit="", unit_scale=True, disable=None, file=sys.stderr, leave=False)


@contextmanager
def _parameters_registered(update=None):
    """Counts (and passes to `update`) the elements of every parameter registered in any module meanwhile."""
    counted = [0]

    def hook(module, name, param):
        if param is not None:
            counted[0] += param.numel()
            if update is not None:
                update(param.numel())

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield counted
    finally:
        handle.remove()


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


def build_model(
    config: MLMambaConfig, dtype: torch.dtype, seed: int = 0, progress: bool = False
) -> MLMambaForConditionalGeneration:
    """A randomly initialised model of `config`, in `dtype`, reproducible by `seed`. With `progress`, a bar
    counts the parameters as they are built and initialised (the same weights: the bar draws no random numbers)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if not progress:
            torch.manual_seed(seed)
            return MLMambaForConditionalGeneration(config)
        try:  # the total: the same construction on the meta device (no memory, no random numbers)
            with _parameters_registered() as total, torch.device("meta"):
                MLMambaForConditionalGeneration(config)
            total = total[0]
        except Exception:  # a bar without a total still shows the count
            total = None
        torch.manual_seed(seed)
        with _progress_bar(total, "parameters") as bar, _parameters_registered(bar.update):
            model = MLMambaForConditionalGeneration(config)
        return model
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


def random_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, progress: bool = False):
    """A random-weight model of a named configuration and its processor (offline tokenizer)."""
    tokenizer = build_tokenizer(TOKENIZER_VOCAB[preset])
    config = get_preset(preset, **_special_token_ids(tokenizer))
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the embedding only {config.text_config.vocab_size}"
        )
    if progress:
        stage(f"building {preset} with random weights ({str(dtype).removeprefix('torch.')})")
    return model_and_processor(build_model(config, dtype, seed, progress), tokenizer)


def add_image_token(tokenizer) -> None:
    """Add `<image>` as a special token and keep the tokenizer's other special tokens.

    transformers 5 renamed add_special_tokens' `replace_additional_special_tokens` (and the key
    `additional_special_tokens`) to `replace_extra_special_tokens` (`extra_special_tokens`); the installed
    tokenizer's signature tells which one it takes."""
    from tokenizers import AddedToken

    parameters = inspect.signature(tokenizer.add_special_tokens).parameters
    token = AddedToken(IMAGE, special=True, normalized=False)
    for key in ("extra_special_tokens", "additional_special_tokens"):  # transformers 5, 4.x
        if f"replace_{key}" in parameters:
            tokenizer.add_special_tokens({key: [token]}, **{f"replace_{key}": False})
            return
    raise TypeError(
        f"cannot add {IMAGE} to {type(tokenizer).__name__}: its add_special_tokens takes neither "
        "replace_extra_special_tokens (transformers 5) nor replace_additional_special_tokens (transformers 4), "
        f"but {list(parameters)}"
    )


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a folder holds a tokenizer (one of `TOKENIZER_FILES`)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(source: str, vocab_size: int):
    """A tokenizer folder or Hub id, with `<image>` added as a special token when it lacks one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if IMAGE not in tokenizer.get_vocab():
        add_image_token(tokenizer)
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
        stage(f"loading vision encoder {i + 1} of {len(sources)}: {source}")
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


def check_vision_order(sources: list[str], kinds: list[str], expected: list[str], expected_by: str) -> None:
    """Refuse encoders (identified as `kinds`: their model types, read from their config or weights) that are
    not in the `expected` order: a swapped DINOv2 + SigLIP has the same total width, so nothing else notices."""
    if list(kinds) == list(expected):
        return
    given = ", ".join(
        f"{i} {ENCODER_NAMES.get(kind, kind)} ({source})" for i, (source, kind) in enumerate(zip(sources, kinds), 1)
    )
    raise CheckpointError(
        f"--vision encoders in the wrong order: given {given}; {expected_by} expects "
        f"{' then '.join(ENCODER_NAMES.get(k, k) for k in expected)}: pass --vision in that order"
    )


def _released_order(kinds: list[str]) -> list[str]:
    """The released encoders' order: DINOv2 first (prismatic's fused DINOv2 + SigLIP / CLIP backbones)."""
    return sorted(kinds, key=lambda kind: kind != "dinov2_with_registers")


def _encoder_kinds(vision_config: dict) -> list[str]:
    return [encoder["model_type"] for encoder in vision_config["encoders"]]


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
    checkpoint,
    vision: list[str],
    tokenizer: str,
    dtype=None,
    ngroups: int = 1,
    image_size: int = 384,
    progress: bool = False,
):
    """A released ML-Mamba or Cobra checkpoint + its vision encoders + tokenizer -> (model, processor, notes, family).
    The family ("mlmamba" or "cobra") is told by the checkpoint's parts (`mlmamba.convert_release.split_release`).
    The encoders must come in the released order (DINOv2 first, then SigLIP)."""
    stage(f"reading {checkpoint}")
    family, parts = split_release(load_tensors(checkpoint))
    stage(f"converting the {RELEASES[family][0]} language model and connector")
    text, lm_state = release_language_model(family, parts, ngroups=ngroups)
    dtype = dtype or lm_state["model.language_model.embedding.weight"].dtype
    vision_config, vision_state, notes = load_vision_tower(vision, image_size=image_size, dtype=dtype)
    kinds = _encoder_kinds(vision_config)
    check_vision_order(vision, kinds, _released_order(kinds), f"the released {RELEASES[family][0]} checkpoint")
    vision_hidden = sum(e["hidden_size"] for e in vision_config["encoders"])
    if family == "cobra":
        connector_config, connector_state = take_cobra_projector(parts["projector"], vision_hidden, text["d_model"])
    else:
        connector_config, connector_state = take_connector(parts, vision_hidden, text["d_model"])
    stage(f"loading the tokenizer {tokenizer}")
    tok = load_tokenizer(tokenizer, text["vocab_size"])
    stage("building the model")
    model = build_model(_config_for(tok, vision_config, connector_config, text), dtype, progress=progress)
    stage("loading the converted tensors into the model")
    load_into(model, {**lm_state, **connector_state, **vision_state})
    model, processor = model_and_processor(model, tok)
    return model, processor, notes, family


def family_of(preset: str) -> str:
    """The family of a named configuration: "mlmamba", "cobra" or "vlmamba"."""
    family = preset.split("-")[0]
    return family if family in PAPERS else "mlmamba"


def convert_text_model(
    text_model: str,
    preset: str,
    vision: list[str],
    tokenizer: str | None = None,
    dtype=None,
    seed: int = 0,
    ngroups: int | None = None,
    progress: bool = False,
):
    """A pretrained Mamba-2 or Mamba-1 LM (vision encoders too, if given) under a randomly initialised connector.
    The preset gives the connector and vision geometry; its language model must be of the same kind, and the
    encoders, if they are the preset's, must come in its order. Without `tokenizer`, the language model's folder
    must hold one (`TOKENIZER_FILES`): it is used."""
    from huggingface_hub import snapshot_download

    stage(f"reading the language model {text_model}")
    folder = text_model if Path(text_model).is_dir() else snapshot_download(text_model)
    lm_name = Path(text_model).name if Path(text_model).exists() else text_model  # notes name no local paths
    if tokenizer is None and not has_tokenizer(folder):
        raise CheckpointError(
            f"{text_model} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): give --tokenizer "
            "(the state-spaces Mamba models use EleutherAI/gpt-neox-20b's)"
        )
    text, lm_state = mamba_lm_from_folder(folder, ngroups=ngroups)
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
        kinds, wanted_kinds = _encoder_kinds(vision_config), _encoder_kinds(base["vision_config"])
        if sorted(kinds) == sorted(wanted_kinds):  # the preset's encoders: in the preset's order
            check_vision_order(vision, kinds, wanted_kinds, f"preset {preset!r}")
    else:
        vision_config, vision_state, notes = base["vision_config"], {}, []
    if tokenizer is None:
        notes.append(f"the tokenizer is the language model's own ({lm_name})")
    stage(f"loading the tokenizer {tokenizer or folder}")
    tok = load_tokenizer(tokenizer or folder, text["vocab_size"])
    connector = dict(base["connector_config"])
    if connector.get("connector_type", "msc") in ("msc", "vss-l2"):
        connector["hidden_size"] = text["d_model"]
    stage("building the model (the connector randomly initialised)")
    model = build_model(_config_for(tok, vision_config, connector, text), dtype, seed, progress)
    stage("loading the converted tensors into the model")
    own = model.state_dict()
    random_parts = {k: v for k, v in own.items() if k.startswith("model.connector.")}
    if not vision:
        random_parts.update({k: v for k, v in own.items() if k.startswith("model.vision_tower.")})
    load_into(model, {**lm_state, **vision_state, **random_parts})
    notes.append("the connector is randomly initialised" + ("" if vision else ", and so are the vision encoders"))
    model, processor = model_and_processor(model, tok)
    return model, processor, notes


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_output(output: str | Path, sources=(), overwrite: bool = False) -> Path:
    """The resolved output folder, or OutputError where writing it would lose files.

    Refused: a file; a non-empty folder unless `overwrite`; and, even with `overwrite`, a folder that is, lies
    inside or contains a source folder, or contains a source file (a checkpoint's folder). `sources` are local
    paths or Hub ids; Hub ids protect the Hugging Face cache they are read from."""
    target = Path(output).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise OutputError(f"--output {output} is a file, not a folder: choose a folder to write the model into")
    protected = []
    for source in sources:
        path = Path(source).expanduser()
        if path.exists():
            protected.append((path.resolve(), f"the source {source}"))
        else:  # a Hub id: it is read from the cache
            protected.append((_hub_cache().resolve(), f"the Hugging Face cache that holds {source}"))
    for path, name in protected:
        if target == path:
            relation = "is"
        elif target in path.parents:
            relation = "contains"
        elif path.is_dir() and path in target.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputError(
            f"--output {output} {relation} {name}; the converter never writes into its sources, even with "
            "--overwrite: choose an --output outside them"
        )
    if target.is_dir() and not overwrite:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise OutputError(
                f"--output {output} is not empty ({shown}): choose a new or empty folder, or give --overwrite to "
                "replace it (all its files are removed once the new folder is complete)"
            )
    return target


def _beside(target: Path, kind: str) -> Path:
    """A new hidden folder next to `target`: `.NAME.KIND-XXXXXXXX`."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def staged_folder(output: str | Path, overwrite: bool = False, sources=()):
    """A temporary folder beside `output` (`.NAME.partial-XXXXXXXX`) to write into; when the block ends without
    an error it becomes `output` (with `overwrite`, an old `output` is removed only then). On an error it is
    removed and `output` is left as it was. `check_output` refuses what would lose files."""
    target = check_output(output, sources, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _beside(target, "partial")
    try:
        yield partial
        _move_into_place(partial, target, output, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _move_into_place(partial: Path, target: Path, output, overwrite: bool) -> None:
    old = None
    if target.is_dir():
        if not any(target.iterdir()):
            target.rmdir()
        elif overwrite:
            old = _beside(target, "old")
            old.rmdir()
            target.rename(old)
        else:
            raise OutputError(f"--output {output} was filled while converting: give --overwrite to replace it")
    elif target.exists():
        raise OutputError(f"--output {output} became a file while converting")
    try:
        partial.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old)


def write_folder(model, processor, folder: str | Path) -> None:
    """The weights (sharded at 5 GB), config, code files, processor and tokenizer, into `folder` as it is."""
    model.save_pretrained(folder, max_shard_size="5GB")
    processor.save_pretrained(folder)


def save_folder(model, processor, output: str | Path, overwrite: bool = False) -> Path:
    """Write `model` and `processor` as a complete model folder `output` (new or empty; a non-empty one only with
    `overwrite`, replaced once the new one is complete). Written beside it and renamed, as `staged_folder`."""
    with staged_folder(output, overwrite) as folder:
        write_folder(model, processor, folder)
    return Path(output)


def main(argv=None):
    parser = ArgumentParser(prog="mlmamba-convert", description=__doc__, formatter_class=RawTextHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--random", action="store_true", help="random weights for a named configuration (--preset)")
    source.add_argument("--checkpoint", help="ML-Mamba's or Cobra's latest-checkpoint.pt (or a folder of its tensors)")
    text_model_help = "a Mamba-2 or Mamba-1 LM folder or Hub id (state-spaces or transformers format)"
    source.add_argument("--text-model", help=text_model_help)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named configuration (--random, --text-model)")
    vision_help = (
        "vision encoder, in order: DINOv2 first, then SigLIP, as released (a swapped order is refused);\n"
        "a transformers or timm folder or Hub id, or a timm state dict file"
    )
    parser.add_argument("--vision", action="append", default=[], help=vision_help)
    tokenizer_help = (
        "tokenizer folder or Hub id (GPT-NeoX-20B style, e.g. xiuyul/mamba-2.8b-zephyr); required with\n"
        "--checkpoint; with --text-model, defaults to the tokenizer in the language model's folder"
    )
    parser.add_argument("--tokenizer", help=tokenizer_help)
    output_help = "folder to write: new or empty (see --overwrite); never a source folder or one around or in it"
    parser.add_argument("--output", required=True, help=output_help)
    overwrite_help = "replace a non-empty --output folder: all its files are removed once the new folder is complete"
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--seed", type=int, default=None, help="seed of the random weights (--random, --text-model)")
    dtype_help = "cast weights (default: keep the checkpoint's; random: float32 for -tiny, else bfloat16)"
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=dtype_help)
    image_size_help = "image size of the converted model (--checkpoint; 384 as released; presets give their own)"
    parser.add_argument("--image-size", type=int, default=None, help=image_size_help)
    ngroups_help = (
        "Mamba-2 ngroups of the checkpoint (shapes cannot tell; released models use 1;\n"
        "--text-model: default from its config.json)"
    )
    parser.add_argument("--ngroups", type=int, default=None, help=ngroups_help)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    output = Path(args.output)
    # options that the chosen source would not use are refused, never silently dropped
    unused = {
        "random": ["--tokenizer", "--vision", "--image-size", "--ngroups"],
        "checkpoint": ["--preset", "--seed"],
        "text_model": ["--image-size"],
    }
    for mode, options in unused.items():
        if getattr(args, mode):
            given = [o for o in options if getattr(args, o[2:].replace("-", "_")) not in (None, [])]
            if given:
                parser.error(f"--{mode.replace('_', '-')} does not use {', '.join(given)}")
    sources = [s for s in (args.checkpoint, args.text_model, args.tokenizer, *args.vision) if s]
    try:
        target = check_output(output, sources, args.overwrite)  # before hours of work, and again at the end
    except OutputError as err:
        parser.error(str(err))

    if args.random:
        if not args.preset:
            parser.error("--random needs --preset")
        dtype = dtype or DTYPES["float32" if args.preset.endswith("-tiny") else "bfloat16"]
        model, processor = random_model(args.preset, seed=args.seed or 0, dtype=dtype, progress=True)
        notes = ["random weights, for tests and pipelines; not a trained model"]
        title, bases, license, family = f"{args.preset} (random weights)", [], "mit", family_of(args.preset)
    elif args.checkpoint:
        if not args.tokenizer:
            parser.error("--checkpoint needs --tokenizer (e.g. xiuyul/mamba-2.8b-zephyr, the released one)")
        if len(args.vision) == 0:
            parser.error("--checkpoint needs the vision encoders: --vision DINO --vision SIGLIP (in this order)")
        model, processor, notes, family = convert_release(
            args.checkpoint,
            args.vision,
            args.tokenizer,
            dtype,
            args.ngroups or 1,
            args.image_size or 384,
            progress=True,
        )
        title, release = RELEASES[family]
        bases, license = [release, *args.vision], "mit"  # both releases are MIT
    else:
        if not args.preset:
            parser.error("--text-model needs --preset for the parts it does not provide")
        model, processor, notes = convert_text_model(
            args.text_model,
            args.preset,
            args.vision,
            args.tokenizer,
            dtype,
            args.seed or 0,
            ngroups=args.ngroups,
            progress=True,
        )
        family = family_of(args.preset)
        # a model card names Hub ids, never local paths
        lm_name = Path(args.text_model).name if Path(args.text_model).exists() else args.text_model
        title = f"{PAPERS[family][0]} on {lm_name} (connector untrained)"
        bases = [args.text_model, *args.vision]
        license = "apache-2.0"  # the state-spaces Mamba language models and Mamba-2.8B-Zephyr
    stage(f"writing {output}")
    with staged_folder(output, args.overwrite, sources) as folder:
        write_folder(model, processor, folder)
        write_model_card(folder, title, bases, notes, license, family=family, name=target.name)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {n_params / 1e6:.1f}M parameters ({model.dtype}) to {output}")


if __name__ == "__main__":
    main()
