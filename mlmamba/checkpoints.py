"""Released checkpoints -> MLMambaForConditionalGeneration, with strict accounting of every tensor.

Sources:
  * ML-Mamba's `latest-checkpoint.pt` (torch pickle, read with weights_only=True):
      {"model": {"llm_backbone": {backbone.*, lm_head.weight}, "mlp": {0.*},
                 "bidirectional_mamba": {layers.N.*, norm_f.*}, "projector": {projector.{0,2,4}.*}}}
  * Cobra's `latest-checkpoint.pt` (prismatic's trainable modules of the finetune stage):
      {"model": {"projector": {projector.{0,2,4}.*}, "llm_backbone": {llm.backbone.*, llm.lm_head.weight}}}
    with a Mamba-1 language model (mixer in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj).
  * a plain Mamba-2 or Mamba-1 language model: a state-spaces `mamba2-*` / `mamba-*` folder (mamba_ssm
    format) or a transformers `Mamba2ForCausalLM` / `MambaForCausalLM` folder.
  * the vision encoders from transformers folders or Hub ids (DINOv2-with-registers, SigLIP, CLIP), or
    from timm state dicts (the files the originals loaded through timm: `vit_large_patch14_reg4_dinov2`,
    `vit_so400m_patch14_siglip_384`, `vit_large_patch14_clip_336`); DINOv2's position table is resized to
    the 384 px grid as released (bicubic, antialiased: the same interpolation timm used when the original
    loaded it, and transformers uses at run time).

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
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
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
# Language model (Mamba-2: ML-Mamba; Mamba-1: Cobra, VL-Mamba), mamba_ssm's MixerModel layout
# --------------------------------------------------------------------------------------

def _embedding_key(tensors, prefix: str) -> str:
    for name in ("embedding.weight", "embeddings.weight"):  # mamba_ssm / transformers
        if prefix + name in tensors:
            return prefix + name
    raise CheckpointError(f"no {prefix}embedding.weight: this is not a Mamba language model in mamba_ssm's layout")


def _layer_count(tensors, prefix: str) -> int:
    start = len(prefix) + len("layers.")
    layer_ids = {int(k[start:].split(".")[0]) for k in tensors if k.startswith(prefix + "layers.")}
    n_layer = len(layer_ids)
    if n_layer == 0 or layer_ids != set(range(n_layer)):
        raise CheckpointError(f"layers are not numbered 0..{n_layer - 1}: {sorted(layer_ids)}")
    return n_layer


def infer_mamba2_config(tensors: dict, prefix: str = "backbone.", ngroups: int = 1, chunk_size: int = 256) -> dict:
    """MLMambaTextConfig fields from the shapes of a mamba_ssm-layout Mamba-2 language model.

    `ngroups` cannot be told apart from d_state by shapes (both enter as 2 * ngroups * d_state); every
    released Mamba-2 language model uses 1.
    """
    vocab_size, d_model = tensors[_embedding_key(tensors, prefix)].shape
    n_layer = _layer_count(tensors, prefix)
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
        ssm_layer="Mamba2",
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


def infer_mamba1_config(tensors: dict, prefix: str = "backbone.") -> dict:
    """MLMambaTextConfig fields from the shapes of a mamba_ssm-layout Mamba-1 language model: d_state from
    A_log (d_inner, d_state), dt_rank from dt_proj (d_inner, dt_rank), d_inner from in_proj (2 d_inner, d_model)."""
    vocab_size, d_model = tensors[_embedding_key(tensors, prefix)].shape
    n_layer = _layer_count(tensors, prefix)
    mixer = prefix + "layers.0.mixer."
    if mixer + "A_log" not in tensors or tensors[mixer + "A_log"].ndim != 2:
        raise CheckpointError("layer 0 has no Mamba-1 mixer (A_log of shape (d_inner, d_state))")
    d_inner, d_state = tensors[mixer + "A_log"].shape
    for key in ("in_proj.weight", "conv1d.weight", "dt_proj.weight"):
        if mixer + key not in tensors:
            raise CheckpointError(f"layer 0's Mamba-1 mixer has no {key}")
    dt_rank = tensors[mixer + "dt_proj.weight"].shape[1]
    if tuple(tensors[mixer + "in_proj.weight"].shape) != (2 * d_inner, d_model) or d_inner % d_model:
        raise CheckpointError(f"inconsistent mixer shapes: d_model={d_model} d_inner={d_inner} "
                              f"in_proj={tuple(tensors[mixer + 'in_proj.weight'].shape)}")
    return dict(
        ssm_layer="Mamba1",
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab_size,
        d_state=d_state,
        d_conv=tensors[mixer + "conv1d.weight"].shape[-1],
        expand=d_inner // d_model,
        dt_rank=dt_rank,
        conv_bias=mixer + "conv1d.bias" in tensors,
        bias=mixer + "in_proj.bias" in tensors,
    )


def infer_text_config(tensors: dict, prefix: str = "backbone.", ngroups: int = 1, chunk_size: int = 256) -> dict:
    """Mamba-1 or Mamba-2, told apart by A_log: (d_inner, d_state) or (nheads,)."""
    a_log = tensors.get(prefix + "layers.0.mixer.A_log")
    if a_log is not None and a_log.ndim == 2:
        return infer_mamba1_config(tensors, prefix)
    return infer_mamba2_config(tensors, prefix, ngroups=ngroups, chunk_size=chunk_size)


def _mixer_shapes(text: dict) -> dict:
    d, d_inner, d_state = text["d_model"], text["expand"] * text["d_model"], text["d_state"]
    if text.get("ssm_layer", "Mamba2") == "Mamba1":
        dt_rank = text["dt_rank"] if text["dt_rank"] != "auto" else -(-d // 16)
        shapes = {
            "in_proj.weight": (2 * d_inner, d),
            "conv1d.weight": (d_inner, 1, text["d_conv"]),
            "conv1d.bias": (d_inner,),
            "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
            "dt_proj.weight": (d_inner, dt_rank),
            "dt_proj.bias": (d_inner,),
            "A_log": (d_inner, d_state),
            "D": (d_inner,),
            "out_proj.weight": (d, d_inner),
        }
        in_proj_out = 2 * d_inner
    else:
        nheads = d_inner // text["headdim"]
        conv_dim = d_inner + 2 * text["ngroups"] * d_state
        in_proj_out = 2 * d_inner + 2 * text["ngroups"] * d_state + nheads
        shapes = {
            "in_proj.weight": (in_proj_out, d),
            "conv1d.weight": (conv_dim, 1, text["d_conv"]),
            "conv1d.bias": (conv_dim,),
            "dt_bias": (nheads,),
            "A_log": (nheads,),
            "D": (nheads,),
            "norm.weight": (d_inner,),
            "out_proj.weight": (d, d_inner),
        }
    if not text["conv_bias"]:
        del shapes["conv1d.bias"]
    if text["bias"]:
        shapes.update({"in_proj.bias": (in_proj_out,), "out_proj.bias": (d,)})
    return shapes


def take_language_model(ledger: TensorLedger, text: dict, prefix: str = "backbone.", head: str = "lm_head.weight") -> dict:
    """Our `model.language_model.*` from a mamba_ssm-layout (or transformers) Mamba-2 or Mamba-1 LM; the head
    `head`, if present, must equal the embedding (tied, as released)."""
    d, n = text["d_model"], text["n_layer"]
    shapes = _mixer_shapes(text)
    embedding = ledger.take(_embedding_key(ledger.tensors, prefix), (text["vocab_size"], d))
    out = {"model.language_model.embedding.weight": embedding}
    for i in range(n):
        out[f"model.language_model.layers.{i}.norm.weight"] = ledger.take(f"{prefix}layers.{i}.norm.weight", (d,))
        for name, shape in shapes.items():
            out[f"model.language_model.layers.{i}.mixer.{name}"] = ledger.take(f"{prefix}layers.{i}.mixer.{name}", shape)
    out["model.language_model.norm_f.weight"] = ledger.take(prefix + "norm_f.weight", (d,))
    if head in ledger.tensors:
        if not torch.equal(ledger.take(head, (text["vocab_size"], d)), embedding):
            raise CheckpointError(f"{head} differs from the embedding, but the model ties them (as released)")
    return out


def mamba_lm_from_folder(folder: str | Path, ngroups: int | None = None) -> tuple[dict, dict]:
    """(text config fields, our LM tensors) from a language model folder: state-spaces `mamba-*` / `mamba2-*`
    (mamba_ssm's format: config.json with d_model, n_layer, ssm_cfg) or transformers `MambaForCausalLM` /
    `Mamba2ForCausalLM`. The mixer (Mamba-1 or Mamba-2) is read from the tensors and checked against config.json."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    ledger = TensorLedger(load_tensors(folder), str(folder))
    kind = config.get("model_type")
    if kind in ("mamba", "mamba2"):  # transformers
        declared = {"mamba": "Mamba1", "mamba2": "Mamba2"}[kind]
        ngroups = ngroups or config.get("n_groups", 1)
        chunk = config.get("chunk_size", 256)
        eps = config.get("layer_norm_epsilon", 1e-5)
    else:  # mamba_ssm: {"d_model", "n_layer", "ssm_cfg": {"layer": ...}, "rms_norm", ...}; layer defaults to Mamba1
        ssm_cfg = config.get("ssm_cfg") or {}
        declared = ssm_cfg.get("layer", "Mamba1") if config else None
        ngroups = ngroups or ssm_cfg.get("ngroups", 1)
        chunk = ssm_cfg.get("chunk_size", 256)
        eps = config.get("norm_epsilon", 1e-5)
        if config.get("rms_norm", True) is not True:
            raise CheckpointError(f"{folder}: rms_norm=False (LayerNorm blocks) is not a released layout; the model uses RMSNorm")
    if declared not in (None, "Mamba1", "Mamba2"):
        raise CheckpointError(f"{folder}: a {declared} model; Mamba1 and Mamba2 language models convert")
    text = infer_text_config(ledger.tensors, "backbone.", ngroups=ngroups, chunk_size=chunk)
    if declared is not None and declared != text["ssm_layer"]:
        raise CheckpointError(f"{folder}: config.json says {declared}, but the tensors are a {text['ssm_layer']} model")
    text["norm_epsilon"] = eps
    text["residual_in_fp32"] = config.get("residual_in_fp32", True)
    tensors = take_language_model(ledger, text)
    ledger.finish()
    return text, tensors


# --------------------------------------------------------------------------------------
# Connector (ML-Mamba: mlp -> bidirectional_mamba -> projector; Cobra: projector)
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


def take_cobra_projector(projector: dict, vision_hidden: int, d_model: int) -> tuple[dict, dict]:
    """(connector config fields, our `model.connector.projector.*`) from Cobra's projector.

    "no-align+fused-gelu-mlp" (cobra+3b): `projector.{0,2,4}`, Linear(v -> 4v) GELU Linear(-> d) GELU Linear(d -> d),
    our connector "mlp". "no-align+gelu-mlp" (cobra-siglip+3b): `projector.{0,2}`, Linear(v -> d) GELU Linear(d -> d),
    our connector "mlp2x". LDPNet projectors (cobra-ldpnet+3b) have no counterpart here.
    """
    ledger = TensorLedger(projector, "projector")
    layers = sorted({k.split(".")[1] for k in projector if k.startswith("projector.")})
    out = {}
    if layers == ["0", "2", "4"]:
        hidden = ledger.tensors["projector.0.weight"].shape[0]
        if hidden % vision_hidden:
            raise CheckpointError(f"projector.0.weight has {hidden} rows, not a multiple of the vision width {vision_hidden}")
        shapes = ((0, (hidden, vision_hidden)), (2, (d_model, hidden)), (4, (d_model, d_model)))
        config = dict(connector_type="mlp", projector_expand=hidden // vision_hidden)
    elif layers == ["0", "2"]:
        shapes = ((0, (d_model, vision_hidden)), (2, (d_model, d_model)))
        config = dict(connector_type="mlp2x")
    else:
        raise CheckpointError(
            f"projector layers {layers} (keys such as {sorted(projector)[:4]}) are not Cobra's fused-gelu-mlp "
            "(projector.{0,2,4}) or gelu-mlp (projector.{0,2}); LDPNet projectors do not convert"
        )
    for idx, shape in shapes:
        out[f"model.connector.projector.{idx}.weight"] = ledger.take(f"projector.{idx}.weight", shape)
        out[f"model.connector.projector.{idx}.bias"] = ledger.take(f"projector.{idx}.bias", shape[:1])
    ledger.finish()
    return config, out


RELEASE_PARTS = {
    "mlmamba": {"llm_backbone", "mlp", "bidirectional_mamba", "projector"},  # ML-Mamba's latest-checkpoint.pt
    "cobra": {"llm_backbone", "projector"},  # Cobra's (prismatic's) latest-checkpoint.pt
}


def split_release(checkpoint: dict) -> tuple[str, dict]:
    """(family, parts) of a released `latest-checkpoint.pt`: {"model": {part: state dict}}, as prismatic saves it
    (ML-Mamba: llm_backbone, mlp, bidirectional_mamba, projector; Cobra: llm_backbone, projector)."""
    model = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    for family, expected in RELEASE_PARTS.items():
        if isinstance(model, dict) and set(model) == expected:
            return family, model
    found = sorted(model) if isinstance(model, dict) else type(checkpoint).__name__
    raise CheckpointError(
        "not an ML-Mamba or Cobra checkpoint: expected {'model': {" + ", ".join(sorted(RELEASE_PARTS["mlmamba"]))
        + "}} (ML-Mamba) or {'model': {" + ", ".join(sorted(RELEASE_PARTS["cobra"])) + "}} (Cobra), found "
        + str(found)
    )


def release_language_model(family: str, parts: dict, ngroups: int = 1) -> tuple[dict, dict]:
    """(text config fields, our LM tensors) from a release's `llm_backbone`: ML-Mamba saved the mamba_ssm model
    itself (`backbone.*`, `lm_head.weight`), Cobra its LLM wrapper (`llm.backbone.*`, `llm.lm_head.weight`)."""
    prefix = "llm." if family == "cobra" else ""
    llm = TensorLedger(parts["llm_backbone"], "llm_backbone")
    text = infer_text_config(llm.tensors, prefix + "backbone.", ngroups=ngroups)
    lm_state = take_language_model(llm, text, prefix + "backbone.", head=prefix + "lm_head.weight")
    llm.finish()
    return text, lm_state


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
        state["embeddings.position_embeddings"] = resize_position_grid(state["embeddings.position_embeddings"], 1, grid)
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

# The released encoders by timm architecture: sizes (to recognise a bare state dict; attention heads cannot be
# read from shapes) and the activation timm runs. timm's SigLIP-SO400M/14@384 runs exact GELU (SigLIP was
# trained with the tanh approximation, which transformers' config says); ML-Mamba and Cobra ran timm, so a
# timm source converts with timm's "gelu". timm's `vit_large_patch14_clip_336` runs GELU on OpenAI's weights,
# which were trained with QuickGELU (timm's `_quickgelu_` variant): CLIP converts with QuickGELU.
TIMM_ARCHITECTURES = {
    "vit_large_patch14_reg4_dinov2": dict(model_type="dinov2_with_registers", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
    "vit_so400m_patch14_siglip_384": dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, hidden_act="gelu"),
    "vit_large_patch14_clip_336": dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu"),
    "vit_large_patch14_clip_quickgelu_336": dict(model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu"),
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
_DINOV2_TF4_NAMES = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
                     "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def is_timm_source(source: str) -> bool:
    """A timm state dict file, a folder with timm's config.json (`architecture`) or open_clip's
    open_clip_config.json (a timm trunk), or a `timm/...` Hub id."""
    path = Path(source)
    if path.is_file():
        return path.suffix in TIMM_SUFFIXES
    if path.is_dir():
        config = path / "config.json"
        return (path / "open_clip_config.json").exists() or (config.exists() and "architecture" in json.loads(config.read_text()))
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
        found = [n for n, a in TIMM_ARCHITECTURES.items() if (a["model_type"], a["hidden_size"], a["num_hidden_layers"]) == (family, hidden, depth)]
        if not found:
            raise CheckpointError(
                f"a {family} ViT of width {hidden} and {depth} blocks is not one of the released encoders "
                f"({', '.join(TIMM_ARCHITECTURES)}), and its number of attention heads cannot be read from shapes: "
                "give the folder with timm's config.json (`architecture`, `model_args`)"
            )
        arch = found[0]
    base = arch.split(".")[0]
    known = TIMM_ARCHITECTURES.get(base)
    released_size = known is not None and (known["model_type"], known["hidden_size"], known["num_hidden_layers"]) == (family, hidden, depth)
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


def timm_vision_state(tensors: dict, image_size: int, name: str = "timm", arch: str | None = None,
                      model_args: dict | None = None) -> tuple[dict, dict, list[str], list[str]]:
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
    notes = []
    out = {}

    def block_names(i):
        if family == "dinov2_with_registers":
            p = f"encoder.layer.{i}."
            return p, dict(norm1=p + "norm1.", norm2=p + "norm2.", q=p + "attention.q_proj.", k=p + "attention.k_proj.",
                           v=p + "attention.v_proj.", o=p + "attention.o_proj.", fc1=p + "mlp.fc1.", fc2=p + "mlp.fc2.")
        p = f"encoder.layers.{i}."
        return p, dict(norm1=p + "layer_norm1.", norm2=p + "layer_norm2.", q=p + "self_attn.q_proj.", k=p + "self_attn.k_proj.",
                       v=p + "self_attn.v_proj.", o=p + "self_attn.out_proj.", fc1=p + "mlp.fc1.", fc2=p + "mlp.fc2.")

    for i in range(depth):
        src = f"blocks.{i}."
        p, names = block_names(i)
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
        if family == "dinov2_with_registers":
            out[p + "layer_scale1.lambda1"] = ledger.take(src + "ls1.gamma", (hidden,))
            out[p + "layer_scale2.lambda1"] = ledger.take(src + "ls2.gamma", (hidden,))

    if family == "dinov2_with_registers":
        out["embeddings.patch_embeddings.projection.weight"] = ledger.take("patch_embed.proj.weight")
        out["embeddings.patch_embeddings.projection.bias"] = ledger.take("patch_embed.proj.bias", (hidden,))
        out["embeddings.cls_token"] = ledger.take("cls_token", (1, 1, hidden))
        if "reg_token" in tensors:  # timm: the class position is folded into cls_token; registers have none
            registers = ledger.take("reg_token")
            table = ledger.take("pos_embed")
            table = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
            out["embeddings.mask_token"] = torch.zeros(1, hidden, dtype=table.dtype)
            notes.append(f"{name}: timm keeps no mask token (used only for masked-image inputs); it is set to zeros, "
                         "and so is the class position, which timm folded into cls_token")
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
        config = dict(model_type=family, hidden_size=hidden, num_hidden_layers=depth, mlp_ratio=mlp // hidden,
                      patch_size=patch_size, image_size=image_size, num_channels=channels, num_register_tokens=registers.shape[1],
                      layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False)
        if mlp % hidden:
            raise CheckpointError(f"{name}: MLP width {mlp} is not a multiple of {hidden}")
    else:
        positions = grid * grid + (family == "clip_vision_model")
        table = ledger.take("pos_embed")
        if tuple(table.shape) != (1, positions, hidden):
            raise CheckpointError(
                f"{name}: pos_embed has shape {tuple(table.shape)}; a {image_size} px model needs (1, {positions}, {hidden}) "
                "(only DINOv2's table is resized, as released)"
            )
        out["embeddings.position_embedding.weight"] = table[0]
        out["embeddings.patch_embedding.weight"] = ledger.take("patch_embed.proj.weight")
        out["post_layernorm.weight"] = ledger.take("norm.weight", (hidden,))
        out["post_layernorm.bias"] = ledger.take("norm.bias", (hidden,))
        config = dict(model_type=family, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth,
                      patch_size=patch_size, image_size=image_size, num_channels=channels)
        if family == "siglip_vision_model":
            out["embeddings.patch_embedding.bias"] = ledger.take("patch_embed.proj.bias", (hidden,))
            config.update(layer_norm_eps=1e-6, vision_use_head=False)
        else:
            out["embeddings.class_embedding"] = ledger.take("cls_token", (1, 1, hidden)).reshape(hidden)
            out["pre_layrnorm.weight"] = ledger.take("norm_pre.weight", (hidden,))
            out["pre_layrnorm.bias"] = ledger.take("norm_pre.bias", (hidden,))
            config.update(layer_norm_eps=1e-5)
    if tuple(patch.shape) != (hidden, channels, patch_size, patch_size):
        raise CheckpointError(f"{name}: patch_embed.proj.weight has shape {tuple(patch.shape)}")
    ledger.finish()
    config.update(num_attention_heads=arch_fields["num_attention_heads"], hidden_act=arch_fields["hidden_act"])
    notes.insert(0, f"{name}: timm {arch_fields['architecture']} -> transformers {family} ({arch_fields['hidden_act']}, "
                    "as timm runs it)")
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
        raise CheckpointError(f"{name}: the converted encoder does not match transformers' {type(model).__name__}: "
                              f"missing {missing[:10]}, unexpected {unexpected[:10]}")
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

        path = Path(snapshot_download(source, allow_patterns=["config.json", "open_clip_config.json", "*.safetensors"]))
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
            raise CheckpointError(f"{source}: expected one weights file in the folder, found {[f.name for f in files]}")
        path = files[0]
    tensors = load_tensors(path)
    for wrapper in ("state_dict", "model"):  # torch.save({"model": sd}) / {"state_dict": sd}, as timm reads them
        if isinstance(tensors.get(wrapper), dict):
            tensors = tensors[wrapper]
    config, state, dropped, notes = timm_vision_state(tensors, image_size, name=source, arch=arch, model_args=model_args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    vision_config, state = _running_names(config, state, source)
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        vision_config.pop(key, None)
    return vision_config, state, dropped, notes
