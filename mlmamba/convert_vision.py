"""Vision encoders -> the running transformers' DINOv2-with-registers, SigLIP and CLIP vision models.

Sources: transformers folders or Hub ids (DINOv2-with-registers, SigLIP, CLIP), or timm state dicts (the
files the originals loaded through timm: `vit_large_patch14_reg4_dinov2`, `vit_so400m_patch14_siglip_384`,
`vit_large_patch14_clip_336`). DINOv2's position table is resized to the 384 px grid as released (bicubic,
antialiased: the same interpolation timm used when the original loaded it, and transformers uses at run time).
Conversion from timm is as strict as the rest (`convert_release.TensorLedger`): every tensor is used or
dropped by name, and reported.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .convert_release import CheckpointError, TensorLedger, load_tensors

VISION_CLASSES = {
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
}
# Parts of a full checkpoint that are not the vision encoder ML-Mamba uses; dropped by name, and reported.
NOT_VISION = ("text_model.", "logit_scale", "logit_bias", "head.", "text_projection", "visual_projection", "pooler.")


def resize_position_grid(table: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """(1, prefix + g*g, d) -> (1, prefix + grid*grid, d): bicubic, antialiased, in fp32 (timm's and
    transformers' interpolation of ViT position embeddings)."""
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise CheckpointError(f"position table of {patches.shape[1]} patches is not a square grid")
    if old == grid:
        return table
    x = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([prefix, x], dim=1)


def load_vision_encoder(source: str, image_size: int, dtype=None) -> tuple[dict, dict, list[str], list[str]]:
    """(encoder config dict, state dict in the running transformers' layout, names of dropped parts, notes).

    `source` is a transformers folder or Hub id of a DINOv2-with-registers, SigLIP or CLIP model (full
    or vision-only), or a timm state dict / timm folder / `timm/...` Hub id of the released encoders (see
    `timm_vision_state`). The encoder is set to `image_size`; DINOv2's position table is resized to match.
    """
    if is_timm_source(source):
        return load_timm_vision_encoder(source, image_size, dtype=dtype)
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    kind = config.model_type
    if kind not in VISION_CLASSES:
        raise CheckpointError(f"{source} is a {kind!r} model; vision encoders must be one of {sorted(VISION_CLASSES)}")
    cls = getattr(transformers, VISION_CLASSES[kind])
    model, info = cls.from_pretrained(source, output_loading_info=True, dtype=dtype)
    if info["missing_keys"]:
        raise CheckpointError(f"{source}: the vision encoder misses {sorted(info['missing_keys'])}")
    dropped = sorted(info["unexpected_keys"])
    stray = [k for k in dropped if not any(k.startswith(p) or f".{p}" in k for p in NOT_VISION)]
    if stray:
        raise CheckpointError(f"{source}: tensors that belong to no known part: {stray}")
    vision_config = model.config.to_dict()
    # transformers 4 nests SigLIP/CLIP weights under `vision_model.`; the model keeps the inner module
    state = getattr(model, "vision_model", model).state_dict()
    if kind == "dinov2_with_registers":
        grid = image_size // vision_config["patch_size"]
        state["embeddings.position_embeddings"] = resize_position_grid(
            state["embeddings.position_embeddings"], 1, grid
        )
    elif vision_config["image_size"] != image_size:
        raise CheckpointError(f"{source} sees {vision_config['image_size']} px images; this model needs {image_size}")
    vision_config["image_size"] = image_size
    if kind.startswith("siglip"):
        vision_config["vision_use_head"] = False
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    return vision_config, state, dropped, []


# --------------------------------------------------------------------------------------
# timm vision encoders: the weights the originals loaded (prismatic/Cobra/ML-Mamba pin timm 0.9.10)
# --------------------------------------------------------------------------------------


def _released_vit(model_type: str, hidden_size: int, layers: int, heads: int, hidden_act: str) -> dict:
    return dict(
        model_type=model_type,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=hidden_act,
    )


def _sizes(encoder: dict) -> tuple:
    """What tells a released encoder from a bare state dict: family, width and depth."""
    return encoder["model_type"], encoder["hidden_size"], encoder["num_hidden_layers"]


# The released encoders by timm architecture: sizes (to recognise a bare state dict; attention heads cannot be
# read from shapes) and the activation timm runs. timm's SigLIP-SO400M/14@384 runs exact GELU (SigLIP was
# trained with the tanh approximation, which transformers' config says); ML-Mamba and Cobra ran timm, so a
# timm source converts with timm's "gelu". timm's `vit_large_patch14_clip_336` runs GELU on OpenAI's weights,
# which were trained with QuickGELU (timm's `_quickgelu_` variant): CLIP converts with QuickGELU.
TIMM_ARCHITECTURES = {
    "vit_large_patch14_reg4_dinov2": _released_vit("dinov2_with_registers", 1024, 24, 16, "gelu"),
    "vit_so400m_patch14_siglip_384": _released_vit("siglip_vision_model", 1152, 27, 16, "gelu"),
    "vit_large_patch14_clip_336": _released_vit("clip_vision_model", 1024, 24, 16, "quick_gelu"),
    "vit_large_patch14_clip_quickgelu_336": _released_vit("clip_vision_model", 1024, 24, 16, "quick_gelu"),
}
TIMM_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
# Parts of a timm checkpoint that are not the features ML-Mamba reads; dropped by name, and reported.
TIMM_NOT_FEATURES = (
    "attn_pool.",  # SigLIP's attention-pool head (transformers' `head`, vision_use_head=False)
    "head.",  # CLIP's projection to the joint space (transformers' `visual_projection`), classifier heads
    "fc_norm.",
)
# open_clip's SigLIP files (`timm/ViT-SO400M-14-SigLIP-384`, what timm 0.9.10 loaded for
# vit_so400m_patch14_siglip_384.webli) hold the timm ViT under this prefix, beside the text tower.
OPEN_CLIP_TRUNK = "visual.trunk."
# transformers 4 names of DINOv2's attention (transformers 5 renames them on load; we write the running names)
_DINOV2_TF4_NAMES = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}


def is_timm_source(source: str) -> bool:
    """A timm state dict file, a folder with timm's config.json (`architecture`) or open_clip's
    open_clip_config.json (a timm trunk), or a `timm/...` Hub id."""
    path = Path(source)
    if path.is_file():
        return path.suffix in TIMM_SUFFIXES
    if path.is_dir():
        config = path / "config.json"
        return (path / "open_clip_config.json").exists() or (
            config.exists() and "architecture" in json.loads(config.read_text())
        )
    return source.startswith("timm/")


def _timm_family(keys: set) -> str:
    if "register_tokens" in keys or "reg_token" in keys:
        return "dinov2_with_registers"
    if "cls_token" in keys and "norm_pre.weight" in keys:
        return "clip_vision_model"
    if "cls_token" not in keys and "pos_embed" in keys:
        return "siglip_vision_model"
    raise CheckpointError(
        "not a timm DINOv2-with-registers, SigLIP or CLIP ViT state dict (expected reg_token / register_tokens, "
        f"a cls_token with norm_pre, or pos_embed without cls_token); found e.g. {sorted(keys)[:8]}"
    )


def _timm_architecture(family: str, hidden: int, depth: int, arch: str | None, model_args: dict) -> dict:
    """Heads and activation: from the named architecture (timm's config.json), else from the released sizes."""
    if arch is None:
        found = [n for n, a in TIMM_ARCHITECTURES.items() if _sizes(a) == (family, hidden, depth)]
        if not found:
            raise CheckpointError(
                f"a {family} ViT of width {hidden} and {depth} blocks is not one of the released encoders "
                f"({', '.join(TIMM_ARCHITECTURES)}), and its number of attention heads cannot be read from shapes: "
                "give the folder with timm's config.json (`architecture`, `model_args`)"
            )
        arch = found[0]
    base = arch.split(".")[0]
    known = TIMM_ARCHITECTURES.get(base)
    released_size = known is not None and _sizes(known) == (family, hidden, depth)
    if not released_size and "num_heads" not in model_args:
        raise CheckpointError(
            f"timm {arch!r} with a {family} ViT of width {hidden} and {depth} blocks is not a released encoder "
            "this converter knows, and the number of attention heads cannot be read from shapes: config.json's "
            "model_args must give num_heads"
        )
    if known is None or known["model_type"] != family:
        known = dict(model_type=family, hidden_act={"clip_vision_model": "quick_gelu"}.get(family, "gelu"))
    heads = model_args.get("num_heads", known.get("num_attention_heads"))
    if heads is None or hidden % heads:
        raise CheckpointError(f"{hidden} channels do not split into {heads} attention heads")
    act = model_args.get("act_layer", known["hidden_act"])
    act = {"gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "gelu": "gelu"}.get(act, act)
    return dict(num_attention_heads=heads, hidden_act=act, architecture=arch)


def _split_qkv(ledger: TensorLedger, prefix: str, hidden: int) -> list[torch.Tensor]:
    """timm's fused `attn.qkv` (3*d, d) -> q, k, v weights and biases, in that order."""
    weight = ledger.take(prefix + "qkv.weight", (3 * hidden, hidden))
    bias = ledger.take(prefix + "qkv.bias", (3 * hidden,))
    return list(zip(weight.chunk(3), bias.chunk(3)))


# transformers' names of timm's block parts (norm1, norm2, the q/k/v split of attn.qkv, attn.proj) in a DINOv2
# block (`encoder.layer.N.`) and a SigLIP / CLIP block (`encoder.layers.N.`); both name the MLP mlp.fc1 / mlp.fc2
_BLOCK_PARTS = ("norm1", "norm2", "q", "k", "v", "o")
_DINOV2_BLOCK = "norm1 norm2 attention.q_proj attention.k_proj attention.v_proj attention.o_proj".split()
_SIGLIP_CLIP_BLOCK = (
    "layer_norm1 layer_norm2 self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.out_proj".split()
)


def _timm_blocks(ledger: TensorLedger, family: str, depth: int, hidden: int, mlp: int) -> dict:
    """timm's `blocks.N.*` -> transformers' encoder layers: qkv split, DINOv2's layer scales become lambda1."""
    dinov2 = family == "dinov2_with_registers"
    out = {}
    for i in range(depth):
        src = f"blocks.{i}."
        p = f"encoder.layer.{i}." if dinov2 else f"encoder.layers.{i}."
        names = {part: f"{p}{n}." for part, n in zip(_BLOCK_PARTS, _DINOV2_BLOCK if dinov2 else _SIGLIP_CLIP_BLOCK)}
        names.update(fc1=p + "mlp.fc1.", fc2=p + "mlp.fc2.")
        for part in ("norm1", "norm2"):
            for w in ("weight", "bias"):
                out[names[part] + w] = ledger.take(f"{src}{part}.{w}", (hidden,))
        for (w, b), part in zip(_split_qkv(ledger, src + "attn.", hidden), "qkv"):
            out[names[part] + "weight"], out[names[part] + "bias"] = w, b
        out[names["o"] + "weight"] = ledger.take(src + "attn.proj.weight", (hidden, hidden))
        out[names["o"] + "bias"] = ledger.take(src + "attn.proj.bias", (hidden,))
        out[names["fc1"] + "weight"] = ledger.take(src + "mlp.fc1.weight", (mlp, hidden))
        out[names["fc1"] + "bias"] = ledger.take(src + "mlp.fc1.bias", (mlp,))
        out[names["fc2"] + "weight"] = ledger.take(src + "mlp.fc2.weight", (hidden, mlp))
        out[names["fc2"] + "bias"] = ledger.take(src + "mlp.fc2.bias", (hidden,))
        if dinov2:
            out[p + "layer_scale1.lambda1"] = ledger.take(src + "ls1.gamma", (hidden,))
            out[p + "layer_scale2.lambda1"] = ledger.take(src + "ls2.gamma", (hidden,))
    return out


def _dinov2_embeddings(ledger: TensorLedger, name: str, hidden: int, grid: int) -> tuple[dict, int, list[str]]:
    """(embeddings and final norm in transformers' names, number of registers, notes) of a timm or DINOv2 ViT."""
    notes = []
    out = {
        "embeddings.patch_embeddings.projection.weight": ledger.take("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": ledger.take("patch_embed.proj.bias", (hidden,)),
        "embeddings.cls_token": ledger.take("cls_token", (1, 1, hidden)),
    }
    if "reg_token" in ledger.tensors:  # timm: the class position is folded into cls_token; registers have none
        registers = ledger.take("reg_token")
        table = ledger.take("pos_embed")
        table = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
        out["embeddings.mask_token"] = torch.zeros(1, hidden, dtype=table.dtype)
        notes.append(
            f"{name}: timm keeps no mask token (used only for masked-image inputs); it is set to zeros, "
            "and so is the class position, which timm folded into cls_token"
        )
    else:  # DINOv2's own release
        registers = ledger.take("register_tokens")
        table = ledger.take("pos_embed")
        out["embeddings.mask_token"] = ledger.take("mask_token", (1, hidden))
    if registers.ndim != 3 or registers.shape[::2] != (1, hidden):
        raise CheckpointError(f"{name}: register tokens have shape {tuple(registers.shape)}")
    out["embeddings.register_tokens"] = registers
    if table.ndim != 3 or table.shape[2] != hidden:
        raise CheckpointError(f"{name}: pos_embed has shape {tuple(table.shape)}")
    out["embeddings.position_embeddings"] = resize_position_grid(table, 1, grid)
    out["layernorm.weight"] = ledger.take("norm.weight", (hidden,))
    out["layernorm.bias"] = ledger.take("norm.bias", (hidden,))
    return out, registers.shape[1], notes


def _siglip_clip_embeddings(
    ledger: TensorLedger, family: str, name: str, hidden: int, image_size: int, grid: int
) -> dict:
    """Embeddings and norms in transformers' names of a timm SigLIP (patch bias) or CLIP (class token, pre-norm)
    ViT. Their position tables must already fit the grid: only DINOv2's is resized, as released."""
    positions = grid * grid + (family == "clip_vision_model")
    table = ledger.take("pos_embed")
    if tuple(table.shape) != (1, positions, hidden):
        raise CheckpointError(
            f"{name}: pos_embed has shape {tuple(table.shape)}; a {image_size} px model needs "
            f"(1, {positions}, {hidden}) (only DINOv2's table is resized, as released)"
        )
    out = {
        "embeddings.position_embedding.weight": table[0],
        "embeddings.patch_embedding.weight": ledger.take("patch_embed.proj.weight"),
        "post_layernorm.weight": ledger.take("norm.weight", (hidden,)),
        "post_layernorm.bias": ledger.take("norm.bias", (hidden,)),
    }
    if family == "siglip_vision_model":
        out["embeddings.patch_embedding.bias"] = ledger.take("patch_embed.proj.bias", (hidden,))
    else:
        out["embeddings.class_embedding"] = ledger.take("cls_token", (1, 1, hidden)).reshape(hidden)
        out["pre_layrnorm.weight"] = ledger.take("norm_pre.weight", (hidden,))
        out["pre_layrnorm.bias"] = ledger.take("norm_pre.bias", (hidden,))
    return out


def timm_vision_state(
    tensors: dict, image_size: int, name: str = "timm", arch: str | None = None, model_args: dict | None = None
) -> tuple[dict, dict, list[str], list[str]]:
    """(transformers config fields, state dict in transformers' names, dropped keys, notes) from a timm ViT.

    Layouts: timm's DINOv2-with-registers (`vit_*_reg4_dinov2`: reg_token, no class position), DINOv2's own
    release (`dinov2_vit*_reg4_pretrain.pth`: register_tokens, mask_token, a class position), SigLIP
    (`vit_*_siglip_*`) and CLIP (`vit_*_clip_*`). The fused qkv is split, layer scales become lambda1, and
    DINOv2's position table is resized to the `image_size` grid as timm resized it when the original loaded it.
    """
    model_args = model_args or {}
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    outside = []
    if any(k.startswith(OPEN_CLIP_TRUNK) for k in tensors):  # open_clip: the timm ViT is `visual.trunk`
        outside = sorted(k for k in tensors if not k.startswith(OPEN_CLIP_TRUNK))
        tensors = {k[len(OPEN_CLIP_TRUNK) :]: v for k, v in tensors.items() if k.startswith(OPEN_CLIP_TRUNK)}
    ledger = TensorLedger(tensors, name)
    family = _timm_family(set(tensors))
    patch = ledger.tensors["patch_embed.proj.weight"]
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    if any(k.startswith("blocks.") and not k.split(".")[1].isdigit() for k in tensors) or depth == 0:
        raise CheckpointError(f"{name}: blocks are not numbered blocks.N (chunked blocks are not supported)")
    mlp = ledger.tensors["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in tensors else None
    if mlp is None:
        raise CheckpointError(f"{name}: no blocks.0.mlp.fc1 (SwiGLU DINOv2 variants are not supported)")
    arch_fields = _timm_architecture(family, hidden, depth, arch, model_args)
    grid = image_size // patch_size
    dropped = sorted(k for k in tensors if k.startswith(TIMM_NOT_FEATURES))
    for k in dropped:
        ledger.take(k)
    dropped = outside + dropped  # open_clip's text tower, logit scale and bias: not the vision encoder
    out = _timm_blocks(ledger, family, depth, hidden, mlp)
    config = dict(
        model_type=family,
        hidden_size=hidden,
        num_hidden_layers=depth,
        patch_size=patch_size,
        image_size=image_size,
        num_channels=channels,
    )
    if family == "dinov2_with_registers":
        embeddings, registers, notes = _dinov2_embeddings(ledger, name, hidden, grid)
        if mlp % hidden:
            raise CheckpointError(f"{name}: MLP width {mlp} is not a multiple of {hidden}")
        config.update(
            mlp_ratio=mlp // hidden,
            num_register_tokens=registers,
            layerscale_value=1.0,
            layer_norm_eps=1e-6,
            qkv_bias=True,
            use_swiglu_ffn=False,
        )
    else:
        embeddings, notes = _siglip_clip_embeddings(ledger, family, name, hidden, image_size, grid), []
        config.update(intermediate_size=mlp, layer_norm_eps=1e-6 if family == "siglip_vision_model" else 1e-5)
        if family == "siglip_vision_model":
            config.update(vision_use_head=False)
    out.update(embeddings)
    if tuple(patch.shape) != (hidden, channels, patch_size, patch_size):
        raise CheckpointError(f"{name}: patch_embed.proj.weight has shape {tuple(patch.shape)}")
    ledger.finish()
    config.update(num_attention_heads=arch_fields["num_attention_heads"], hidden_act=arch_fields["hidden_act"])
    notes.insert(
        0,
        f"{name}: timm {arch_fields['architecture']} -> transformers {family} ({arch_fields['hidden_act']}, "
        "as timm runs it)",
    )
    return config, out, dropped, notes


def _running_names(config: dict, state: dict, name: str) -> tuple[dict, dict]:
    """Check `state` against the running transformers' model for `config` (built on the meta device) and rename
    to its names; returns (its config dict, state)."""
    from transformers import AutoConfig, AutoModel

    fields = {k: v for k, v in config.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModel.from_config(hf_config)
    model = getattr(model, "vision_model", model)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    renamed = {}
    for key, value in state.items():
        if key not in own:
            for new, old in _DINOV2_TF4_NAMES.items():
                key = key.replace(new, old)
        renamed[key] = value
    missing, unexpected = sorted(set(own) - set(renamed)), sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: the converted encoder does not match transformers' {type(model).__name__}: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    for key, value in renamed.items():
        if tuple(value.shape) != own[key]:
            raise CheckpointError(f"{name}: {key} has shape {tuple(value.shape)}, transformers expects {own[key]}")
    return model.config.to_dict(), renamed


def load_timm_vision_encoder(source: str, image_size: int, dtype=None) -> tuple[dict, dict, list[str], list[str]]:
    """A timm state dict file, timm folder or `timm/...` Hub id -> (encoder config dict, state, dropped, notes),
    as `load_vision_encoder` returns them."""
    path = Path(source)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(source, allow_patterns=["config.json", "open_clip_config.json", "*.safetensors"])
        )
    arch, model_args = None, {}
    if path.is_dir():
        if (path / "open_clip_config.json").exists():
            vision_cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
            arch = vision_cfg.get("timm_model_name")
            if arch is None:
                raise CheckpointError(f"{source}: open_clip model without a timm trunk (vision_cfg.timm_model_name)")
        else:
            timm_config = json.loads((path / "config.json").read_text())
            arch, model_args = timm_config.get("architecture"), timm_config.get("model_args") or {}
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pth"))
        if len(files) != 1:
            raise CheckpointError(
                f"{source}: expected one weights file in the folder, found {[f.name for f in files]}"
            )
        path = files[0]
    tensors = load_tensors(path)
    for wrapper in ("state_dict", "model"):  # torch.save({"model": sd}) / {"state_dict": sd}, as timm reads them
        if isinstance(tensors.get(wrapper), dict):
            tensors = tensors[wrapper]
    config, state, dropped, notes = timm_vision_state(
        tensors, image_size, name=source, arch=arch, model_args=model_args
    )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    vision_config, state = _running_names(config, state, source)
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    return vision_config, state, dropped, notes
