"""Released checkpoints -> MLMambaForConditionalGeneration, with strict accounting of every tensor.

Sources:
  * ML-Mamba's `latest-checkpoint.pt` (torch pickle, read with weights_only=True):
      {"model": {"llm_backbone": {backbone.*, lm_head.weight}, "mlp": {0.*},
                 "bidirectional_mamba": {layers.N.*, norm_f.*}, "projector": {projector.{0,2,4}.*}}}
  * a plain Mamba-2 language model: a state-spaces `mamba2-*` folder (mamba_ssm format) or a
    transformers `Mamba2ForCausalLM` folder.
  * the vision encoders from transformers folders or Hub ids (DINOv2-with-registers, SigLIP, CLIP);
    DINOv2's position table is resized to the 384 px grid as released (bicubic, antialiased: the
    same interpolation timm used when the original loaded it, and transformers uses at run time).

Every source tensor must be used exactly once, with the expected shape; otherwise conversion stops
and lists what is left over, missing or mis-shaped. Nothing is guessed.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A checkpoint that does not convert: missing, unexpected or mis-shaped tensors, unsafe pickles."""


def load_tensors(path: str | Path) -> dict:
    """Tensors of a .safetensors / .pt / .bin file or a folder of them (sharded ones included).

    Pickles are read with `weights_only=True`: a checkpoint that needs arbitrary code to load is refused.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pt"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors, .bin or .pt weights")
        out = {}
        for f in files:
            out.update(load_tensors(f))
        return out
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format checkpoint: mmap is unavailable
        return _load_pickle(path)
    except Exception as err:  # weights_only refused an object
        raise CheckpointError(_unsafe_message(path, err)) from err


def _load_pickle(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(_unsafe_message(path, err)) from err


def _unsafe_message(path, err) -> str:
    return (
        f"{path} could not be read with torch.load(weights_only=True): {str(err).splitlines()[0]}\n"
        "It holds more than tensors and plain containers; loading it would execute pickled code, which "
        "this converter never does. Re-save just the tensors (torch.save of a dict of tensors) or use safetensors."
    )


class TensorLedger:
    """A dict of source tensors where every tensor must be taken exactly once."""

    def __init__(self, tensors: dict, name: str):
        self.tensors = dict(tensors)
        self.name = name
        self.used: set[str] = set()

    def take(self, key: str, shape: tuple | None = None) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.name}: missing tensor {key!r}")
        if key in self.used:
            raise CheckpointError(f"{self.name}: tensor {key!r} used twice")
        t = self.tensors[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.name}: {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return t

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(prefix))

    def finish(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = "\n  ".join(f"{k} {tuple(self.tensors[k].shape)}" for k in left[:40])
            more = f"\n  ... and {len(left) - 40} more" if len(left) > 40 else ""
            raise CheckpointError(f"{self.name}: {len(left)} tensor(s) were not used:\n  {shown}{more}")


# --------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------

MIXER_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def infer_mamba2_config(tensors: dict, prefix: str = "backbone.", ngroups: int = 1, chunk_size: int = 256) -> dict:
    """MLMambaTextConfig fields from the shapes of a mamba_ssm-layout Mamba-2 language model.

    `ngroups` cannot be told apart from d_state by shapes (both enter as 2 * ngroups * d_state); every
    released Mamba-2 language model uses 1.
    """
    emb_key = prefix + "embedding.weight" if prefix + "embedding.weight" in tensors else prefix + "embeddings.weight"
    if emb_key not in tensors:
        raise CheckpointError(f"no {prefix}embedding.weight: this is not a Mamba language model in mamba_ssm's layout")
    vocab_size, d_model = tensors[emb_key].shape
    layer_ids = {int(k[len(prefix) + 7 :].split(".")[0]) for k in tensors if k.startswith(prefix + "layers.")}
    n_layer = len(layer_ids)
    if layer_ids != set(range(n_layer)):
        raise CheckpointError(f"layers are not numbered 0..{n_layer - 1}: {sorted(layer_ids)}")
    mixer = prefix + "layers.0.mixer."
    if mixer + "A_log" not in tensors or tensors[mixer + "A_log"].ndim != 1:
        raise CheckpointError("layer 0 has no Mamba-2 mixer (A_log of shape (nheads,))")
    nheads = tensors[mixer + "A_log"].shape[0]
    d_inner = tensors[mixer + "norm.weight"].shape[0]
    conv_dim, _, d_conv = tensors[mixer + "conv1d.weight"].shape
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    if d_inner % nheads or d_inner % d_model or (conv_dim - d_inner) % (2 * ngroups):
        raise CheckpointError(f"inconsistent mixer shapes: d_model={d_model} d_inner={d_inner} nheads={nheads} conv_dim={conv_dim}")
    return dict(
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab_size,
        d_state=d_state,
        d_conv=d_conv,
        expand=d_inner // d_model,
        headdim=d_inner // nheads,
        ngroups=ngroups,
        chunk_size=chunk_size,
        conv_bias=mixer + "conv1d.bias" in tensors,
        bias=mixer + "in_proj.bias" in tensors,
    )


def take_language_model(ledger: TensorLedger, text: dict, prefix: str = "backbone.") -> dict:
    """Our `model.language_model.*` and `lm_head.weight` from a mamba_ssm-layout (or transformers) Mamba-2 LM."""
    d, d_inner, n = text["d_model"], text["expand"] * text["d_model"], text["n_layer"]
    nheads = d_inner // text["headdim"]
    conv_dim = d_inner + 2 * text["ngroups"] * text["d_state"]
    shapes = {
        "in_proj.weight": (2 * d_inner + 2 * text["ngroups"] * text["d_state"] + nheads, d),
        "conv1d.weight": (conv_dim, 1, text["d_conv"]),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d, d_inner),
    }
    emb_key = prefix + ("embedding.weight" if prefix + "embedding.weight" in ledger.tensors else "embeddings.weight")
    embedding = ledger.take(emb_key, (text["vocab_size"], d))
    out = {"model.language_model.embedding.weight": embedding}
    for i in range(n):
        out[f"model.language_model.layers.{i}.norm.weight"] = ledger.take(f"{prefix}layers.{i}.norm.weight", (d,))
        for name in MIXER_PARAMS:
            if name == "conv1d.bias" and not text["conv_bias"]:
                continue
            out[f"model.language_model.layers.{i}.mixer.{name}"] = ledger.take(f"{prefix}layers.{i}.mixer.{name}", shapes[name])
    out["model.language_model.norm_f.weight"] = ledger.take(prefix + "norm_f.weight", (d,))
    if "lm_head.weight" in ledger.tensors:
        head = ledger.take("lm_head.weight", (text["vocab_size"], d))
        if not torch.equal(head, embedding):
            raise CheckpointError("lm_head.weight differs from the embedding, but the model ties them (as released)")
    return out


def mamba2_from_folder(folder: str | Path, ngroups: int | None = None) -> tuple[dict, dict]:
    """(text config fields, our LM tensors) from a state-spaces mamba2 folder or a transformers Mamba2 folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    ledger = TensorLedger(load_tensors(folder), str(folder))
    if config.get("model_type") == "mamba2":  # transformers layout
        ngroups = ngroups or config.get("n_groups", 1)
        chunk = config.get("chunk_size", 256)
    else:  # mamba_ssm layout: {"d_model", "n_layer", "ssm_cfg": {...}}
        ssm_cfg = config.get("ssm_cfg", {})
        if ssm_cfg.get("layer", "Mamba2") != "Mamba2":
            raise CheckpointError(f"{folder} is a {ssm_cfg.get('layer')} model; only Mamba-2 language models convert here")
        ngroups = ngroups or ssm_cfg.get("ngroups", 1)
        chunk = ssm_cfg.get("chunk_size", 256)
    text = infer_mamba2_config(ledger.tensors, "backbone.", ngroups=ngroups, chunk_size=chunk)
    tensors = take_language_model(ledger, text)
    ledger.finish()
    return text, tensors


# --------------------------------------------------------------------------------------
# Connector (ML-Mamba: mlp -> bidirectional_mamba -> projector)
# --------------------------------------------------------------------------------------


def take_connector(parts: dict, vision_hidden: int, d_model: int) -> tuple[dict, dict]:
    """(connector config fields, our `model.connector.*` tensors) from the released mlp / MSC / projector."""
    mlp = TensorLedger(parts["mlp"], "mlp")
    msc = TensorLedger(parts["bidirectional_mamba"], "bidirectional_mamba")
    proj = TensorLedger(parts["projector"], "projector")
    hidden = mlp.tensors["0.weight"].shape[0]
    out = {
        "model.connector.mlp.0.weight": mlp.take("0.weight", (hidden, vision_hidden)),
        "model.connector.mlp.0.bias": mlp.take("0.bias", (hidden,)),
    }
    mixer_cfg = infer_mamba2_config(
        {"e.embedding.weight": torch.empty(0, hidden), **{"e." + k: v for k, v in msc.tensors.items()}}, "e."
    )
    n_layers, d_inner = mixer_cfg["n_layer"], mixer_cfg["expand"] * hidden
    nheads = d_inner // mixer_cfg["headdim"]
    conv_dim = d_inner + 2 * mixer_cfg["d_state"]
    mixer_shapes = {
        "in_proj.weight": (2 * d_inner + 2 * mixer_cfg["d_state"] + nheads, hidden),
        "conv1d.weight": (conv_dim, 1, mixer_cfg["d_conv"]),
        "conv1d.bias": (conv_dim,),
        "conv1d_b.weight": (conv_dim, 1, mixer_cfg["d_conv"]),
        "conv1d_b.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "dt_bias_b": (nheads,),
        "A_log_b": (nheads,),
        "D_b": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (hidden, d_inner),
    }
    for i in range(n_layers):
        for name, shape in mixer_shapes.items():
            out[f"model.connector.msc.layers.{i}.mixer.{name}"] = msc.take(f"layers.{i}.mixer.{name}", shape)
        for name in ("norm.weight", "norm.bias"):
            out[f"model.connector.msc.layers.{i}.{name}"] = msc.take(f"layers.{i}.{name}", (hidden,))
        for w in ("w1", "w2", "w3"):
            out[f"model.connector.msc.layers.{i}.mlp.{w}.weight"] = msc.take(f"layers.{i}.mlp.{w}.weight", (hidden, hidden))
            out[f"model.connector.msc.layers.{i}.mlp.{w}.bias"] = msc.take(f"layers.{i}.mlp.{w}.bias", (hidden,))
    for name in ("norm_f.weight", "norm_f.bias"):
        out[f"model.connector.msc.{name}"] = msc.take(name, (hidden,))
    expand = proj.tensors["projector.0.weight"].shape[0] // hidden
    for idx, shape in ((0, (expand * hidden, hidden)), (2, (d_model, expand * hidden)), (4, (d_model, d_model))):
        out[f"model.connector.projector.{idx}.weight"] = proj.take(f"projector.{idx}.weight", shape)
        out[f"model.connector.projector.{idx}.bias"] = proj.take(f"projector.{idx}.bias", shape[:1])
    for ledger in (mlp, msc, proj):
        ledger.finish()
    config = dict(
        connector_type="msc",
        hidden_size=hidden,
        num_layers=n_layers,
        d_state=mixer_cfg["d_state"],
        d_conv=mixer_cfg["d_conv"],
        expand=mixer_cfg["expand"],
        headdim=mixer_cfg["headdim"],
        conv_bias=mixer_cfg["conv_bias"],
        bias=mixer_cfg["bias"],
        projector_expand=expand,
    )
    return config, out


def split_release(checkpoint: dict) -> dict:
    """The four parts of ML-Mamba's `latest-checkpoint.pt`."""
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    expected = {"llm_backbone", "mlp", "bidirectional_mamba", "projector"}
    if not isinstance(model, dict) or set(model) != expected:
        found = sorted(model) if isinstance(model, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"not an ML-Mamba checkpoint: expected {{'model': {{{', '.join(sorted(expected))}}}}}, found {found}"
        )
    return model


# --------------------------------------------------------------------------------------
# Vision encoders
# --------------------------------------------------------------------------------------

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


def load_vision_encoder(source: str, image_size: int, dtype=None) -> tuple[dict, dict, list[str]]:
    """(encoder config dict, state dict in the running transformers' layout, names of dropped parts).

    `source` is a transformers folder or Hub id of a DINOv2-with-registers, SigLIP or CLIP model (full
    or vision-only). The encoder is set to `image_size`; DINOv2's position table is resized to match.
    """
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
        state["embeddings.position_embeddings"] = resize_position_grid(state["embeddings.position_embeddings"], 1, grid)
    elif vision_config["image_size"] != image_size:
        raise CheckpointError(f"{source} sees {vision_config['image_size']} px images; this model needs {image_size}")
    vision_config["image_size"] = image_size
    if kind.startswith("siglip"):
        vision_config["vision_use_head"] = False
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    return vision_config, state, dropped
