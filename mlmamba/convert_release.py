"""Released ML-Mamba / Cobra checkpoints and Mamba language models -> our tensors, with strict accounting.

Sources:
  * ML-Mamba's `latest-checkpoint.pt` (torch pickle, read with weights_only=True):
      {"model": {"llm_backbone": {backbone.*, lm_head.weight}, "mlp": {0.*},
                 "bidirectional_mamba": {layers.N.*, norm_f.*}, "projector": {projector.{0,2,4}.*}}}
  * Cobra's `latest-checkpoint.pt` (prismatic's trainable modules of the finetune stage):
      {"model": {"projector": {projector.{0,2,4}.*}, "llm_backbone": {llm.backbone.*, llm.lm_head.weight}}}
    with a Mamba-1 language model (mixer in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj).
  * a plain Mamba-2 or Mamba-1 language model: a state-spaces `mamba2-*` / `mamba-*` folder (mamba_ssm
    format) or a transformers `Mamba2ForCausalLM` / `MambaForCausalLM` folder.
The vision encoders convert in `convert_vision`.

Every source tensor must be used exactly once, with the expected shape; otherwise conversion stops
and lists what is left over, missing or mis-shaped. Nothing is guessed.
"""

import json
from pathlib import Path

import torch

# Parameter-name suffixes of the MSC's bidirectional Mamba-2 mixer: the forward route and the reversed one
# (`conv1d_b`, `dt_bias_b`, `A_log_b`, `D_b`), as the released `bidirectional_mamba` and our mixer name them.
BIDIRECTIONAL_SUFFIXES = ("", "_b")


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
        raise CheckpointError(
            f"inconsistent mixer shapes: d_model={d_model} d_inner={d_inner} nheads={nheads} conv_dim={conv_dim}"
        )
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
        raise CheckpointError(
            f"inconsistent mixer shapes: d_model={d_model} d_inner={d_inner} "
            f"in_proj={tuple(tensors[mixer + 'in_proj.weight'].shape)}"
        )
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


def _mixer_shapes(text: dict, route_suffixes: tuple[str, ...] = ("",)) -> dict:
    """Shapes of one layer's mixer tensors, by name, for text config fields `text`. A Mamba-2 mixer that scans
    several routes (the MSC's bidirectional one) has a conv1d, dt_bias, A_log and D per route, named with the
    route's suffix (`conv1d_b.weight`, `dt_bias_b`)."""
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
        shapes = {"in_proj.weight": (in_proj_out, d)}
        for s in route_suffixes:
            shapes.update(
                {
                    f"conv1d{s}.weight": (conv_dim, 1, text["d_conv"]),
                    f"conv1d{s}.bias": (conv_dim,),
                    f"dt_bias{s}": (nheads,),
                    f"A_log{s}": (nheads,),
                    f"D{s}": (nheads,),
                }
            )
        shapes.update({"norm.weight": (d_inner,), "out_proj.weight": (d, d_inner)})
    if not text["conv_bias"]:
        shapes = {k: v for k, v in shapes.items() if not (k.startswith("conv1d") and k.endswith(".bias"))}
    if text["bias"]:
        shapes.update({"in_proj.bias": (in_proj_out,), "out_proj.bias": (d,)})
    return shapes


def take_language_model(
    ledger: TensorLedger, text: dict, prefix: str = "backbone.", head: str = "lm_head.weight"
) -> dict:
    """Our `model.language_model.*` from a mamba_ssm-layout (or transformers) Mamba-2 or Mamba-1 LM; the head
    `head`, if present, must equal the embedding (tied, as released)."""
    d, n = text["d_model"], text["n_layer"]
    shapes = _mixer_shapes(text)
    embedding = ledger.take(_embedding_key(ledger.tensors, prefix), (text["vocab_size"], d))
    out = {"model.language_model.embedding.weight": embedding}
    for i in range(n):
        src, dst = f"{prefix}layers.{i}.", f"model.language_model.layers.{i}."
        out[dst + "norm.weight"] = ledger.take(src + "norm.weight", (d,))
        for name, shape in shapes.items():
            out[dst + "mixer." + name] = ledger.take(src + "mixer." + name, shape)
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
            raise CheckpointError(
                f"{folder}: rms_norm=False (LayerNorm blocks) is not a released layout; the model uses RMSNorm"
            )
    if declared not in (None, "Mamba1", "Mamba2"):
        raise CheckpointError(f"{folder}: a {declared} model; Mamba1 and Mamba2 language models convert")
    text = infer_text_config(ledger.tensors, "backbone.", ngroups=ngroups, chunk_size=chunk)
    if declared is not None and declared != text["ssm_layer"]:
        raise CheckpointError(
            f"{folder}: config.json says {declared}, but the tensors are a {text['ssm_layer']} model"
        )
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
    # the MSC's layers are Mamba-2 mixers without an embedding: an empty one of width `hidden` gives d_model
    mixer_cfg = infer_mamba2_config(
        {"e.embedding.weight": torch.empty(0, hidden), **{"e." + k: v for k, v in msc.tensors.items()}}, "e."
    )
    n_layers = mixer_cfg["n_layer"]
    mixer_shapes = _mixer_shapes(mixer_cfg, BIDIRECTIONAL_SUFFIXES)
    for i in range(n_layers):
        for name, shape in mixer_shapes.items():
            out[f"model.connector.msc.layers.{i}.mixer.{name}"] = msc.take(f"layers.{i}.mixer.{name}", shape)
        for name in ("norm.weight", "norm.bias"):
            out[f"model.connector.msc.layers.{i}.{name}"] = msc.take(f"layers.{i}.{name}", (hidden,))
        for w in ("w1", "w2", "w3"):
            out[f"model.connector.msc.layers.{i}.mlp.{w}.weight"] = msc.take(
                f"layers.{i}.mlp.{w}.weight", (hidden, hidden)
            )
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
            raise CheckpointError(
                f"projector.0.weight has {hidden} rows, not a multiple of the vision width {vision_hidden}"
            )
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
        "not an ML-Mamba or Cobra checkpoint: expected {'model': {"
        + ", ".join(sorted(RELEASE_PARTS["mlmamba"]))
        + "}} (ML-Mamba) or {'model': {"
        + ", ".join(sorted(RELEASE_PARTS["cobra"]))
        + "}} (Cobra), found "
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
