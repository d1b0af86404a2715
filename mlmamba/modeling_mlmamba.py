"""ML-Mamba, Cobra and VL-Mamba as one transformers model.

    pixel_values (n_images, 3 * n_encoders, H, W)
      -> MLMambaVisionTower     transformers' SiglipVisionModel / Dinov2WithRegistersModel / CLIPVisionModel,
                                hidden state `feature_layer`, prefix tokens dropped, fused on channels
                                -> (n_images, num_image_tokens, vision_hidden)
      -> MLMambaConnector       "msc" (ML-Mamba): mlp -> MSC (Mamba-2 scan connector) -> projector
                                "mlp" (Cobra): projector
                                "mlp2x" / "vss-mlp" / "vss-l2" (VL-Mamba): linear layers and a VSS
                                -> (n_images, num_image_tokens, d_model)
      -> replaces the `<image>` placeholder embeddings in the text
      -> MLMambaLanguageModel   Mamba-2 or Mamba-1 blocks (mamba_ssm layout: embedding, layers.N.{norm,mixer}, norm_f)
      -> lm_head (tied to the embedding) -> logits

Decoding keeps an `MLMambaCache`: per layer a conv state and an SSM state, constant in sequence length.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

try:  # transformers 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # transformers 4
    from torch.nn import init

import transformers

from .configuration_mlmamba import MLMambaConfig, MLMambaConnectorConfig, MLMambaTextConfig, MLMambaVisionConfig
from .mamba1_mixer import Mamba1Mixer
from .mamba2_mixer import Mamba2Mixer, RMSNorm

MIXERS = {"Mamba2": Mamba2Mixer, "Mamba1": Mamba1Mixer}  # by config.ssm_layer

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# The name generate() keeps the state cache under in its model kwargs: "cache" since transformers 5.24,
# "cache_params" before (4.x and early 5.x). The model takes both names and returns `.cache`.
try:
    from transformers.generation.utils import ALL_CACHE_NAMES as _ALL_CACHE_NAMES
except ImportError:
    _ALL_CACHE_NAMES = ()
GENERATE_CACHE_KEY = "cache" if "cache" in _ALL_CACHE_NAMES else "cache_params"


# --------------------------------------------------------------------------------------
# State cache
# --------------------------------------------------------------------------------------


class MLMambaCache:
    """Decoding state of the language model, constant in sequence length.

    Per layer: `conv_states[i]` in the model dtype and `ssm_states[i]` in `ssm_state_dtype` (fp32 by default):
        Mamba-2: (batch, conv_dim, d_conv) and (batch, nheads, headdim, d_state)
        Mamba-1: (batch, d_inner, d_conv) and (batch, d_inner, d_state)
    `seqlen_offset` counts the positions consumed so far.
    """

    is_compileable = False

    def __init__(
        self,
        config: MLMambaTextConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
    ):
        d_inner = config.expand * config.d_model
        if config.ssm_layer == "Mamba1":
            conv_shape, ssm_shape = (d_inner, config.d_conv), (d_inner, config.d_state)
        else:
            conv_dim = d_inner + 2 * config.ngroups * config.d_state
            conv_shape, ssm_shape = (conv_dim, config.d_conv), (d_inner // config.headdim, config.headdim, config.d_state)
        self.conv_states = [
            torch.zeros(batch_size, *conv_shape, dtype=dtype, device=device) for _ in range(config.n_layer)
        ]
        self.ssm_states = [
            torch.zeros(batch_size, *ssm_shape, dtype=ssm_state_dtype, device=device) for _ in range(config.n_layer)
        ]
        self.seqlen_offset = 0
        self.prompt_in_embeds = False  # prefill consumed inputs_embeds that input_ids do not repeat

    @property
    def batch_size(self) -> int:
        return self.conv_states[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it keeps a fixed-size (recurrent) state: all do. generate() (transformers >= 5.24)
        then leaves slicing the prompt to `prepare_inputs_for_generation`."""
        return [True] * len(self.conv_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows in place (beam search); the state tensors stay where they are (see `DecodeGraph`)."""
        for s in self.conv_states + self.ssm_states:
            s.copy_(s.index_select(0, beam_idx.to(s.device)))

    def copy(self, repeat: int = 1) -> "MLMambaCache":
        """An independent copy, each row repeated `repeat` times (row-major, like `repeat_interleave`).

        Prefix reuse: prefill an image and a system prompt once, then answer several questions from
        copies: `model.generate(input_ids=prefix_ids + question_ids, cache=cache.copy())` feeds
        only the tokens after the prefix; the vision tower and the prefix do not run again.
        """
        new = object.__new__(MLMambaCache)
        new.conv_states = [s.repeat_interleave(repeat, dim=0) for s in self.conv_states]
        new.ssm_states = [s.repeat_interleave(repeat, dim=0) for s in self.ssm_states]
        new.seqlen_offset = self.seqlen_offset
        new.prompt_in_embeds = self.prompt_in_embeds
        return new

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.conv_states + self.ssm_states)


class DecodeGraph:
    """One decoding step of the language model for one cache, replayed from a CUDA graph.

    A step of the 2.7B model launches some thousand small kernels (64 layers of projections, conv and
    state updates); replaying them as one CUDA graph removes the launch overhead that dominates batch-1
    decoding. The graph reads and writes the cache's state tensors where they are, so they must stay
    there: `MLMambaCache.reorder_cache` works in place. `step(ids (b, 1))` returns the logits (b, 1, vocab)
    in a buffer the next step overwrites.

    Off CUDA the same object runs the step eagerly (no graph): the tests check that path on CPU.
    """

    def __init__(self, model: "MLMambaForConditionalGeneration", cache: MLMambaCache):
        self.model, self.cache = model, cache
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.conv_states[0].device)
        self.graph = self.logits = None
        if self.ids.is_cuda:
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        states = self.cache.conv_states + self.cache.ssm_states
        saved = [s.clone() for s in states]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles and autotunes outside the capture
            for _ in range(2):
                self.model._decode_logits(self.ids, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        for s, v in zip(states, saved):  # the warm-up advanced the states: undo it
            s.copy_(v)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, does not run
            self.logits = self.model._decode_logits(self.ids, self.cache)

    @torch.no_grad()
    def step(self, ids: torch.LongTensor) -> torch.Tensor:
        if self.graph is None:
            return self.model._decode_logits(ids, self.cache)
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


@dataclass
class MLMambaModelOutput(ModelOutput):
    """
    last_hidden_state: (batch, seq, d_model) after the final norm.
    cache: the updated `MLMambaCache` when `use_cache`.
    hidden_states: per layer outputs (embeddings first) when `output_hidden_states`.
    image_hidden_states: (n_images, num_image_tokens, d_model) connector outputs when images were given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: MLMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None

    @property
    def cache_params(self) -> MLMambaCache | None:
        """The name transformers' Mamba models used before 5.24; the same object as `cache`."""
        return self.cache


@dataclass
class MLMambaCausalLMOutput(ModelOutput):
    """
    loss: mean next-token cross-entropy over labels != -100 (when `labels` are given).
    logits: (batch, seq or logits_to_keep, vocab).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: MLMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None

    @property
    def cache_params(self) -> MLMambaCache | None:
        """The name transformers' Mamba models used before 5.24; the same object as `cache`."""
        return self.cache


# --------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------


class MLMambaVisionTower(nn.Module):
    """Runs each encoder on its own 3 channels of `pixel_values` and concatenates the patch features.

    pixel_values: (n, 3 * n_encoders, image_size, image_size) -> (n, num_image_tokens, sum of hidden sizes)

    The features are the output of one encoder layer (`feature_layer` indexes the hidden states,
    embeddings first, as `output_hidden_states` would), read with a forward hook: transformers 4
    and 5 return hidden states from different module levels, a hook on the layer works in both.
    """

    def __init__(self, config: MLMambaVisionConfig):
        super().__init__()
        # transformers 4 wraps SigLIP's and CLIP's encoder in `.vision_model`; transformers 5 does not.
        # Taking the inner module gives the same weight names (and checkpoints) under both.
        encoders = [AutoModel.from_config(c) for c in config.encoder_configs()]
        self.encoders = nn.ModuleList([getattr(e, "vision_model", e) for e in encoders])
        self.feature_layer = config.feature_layer
        self.num_patches = config.num_image_tokens
        self.image_size = config.image_size

    def _feature_layer(self, encoder: nn.Module) -> nn.Module:
        layers = encoder.encoder.layers if hasattr(encoder.encoder, "layers") else encoder.encoder.layer
        return layers[self.feature_layer % (len(layers) + 1) - 1]  # hidden_states[k] = output of layer k - 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (3 * len(self.encoders), self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {expected[0]}, {expected[1]}, {expected[2]}) "
                f"(3 channels per vision encoder, resized to {self.image_size}x{self.image_size}); got "
                f"{tuple(pixel_values.shape)}. Prepare images with MLMambaProcessor."
            )
        features = []
        for i, encoder in enumerate(self.encoders):
            captured = []
            hook = self._feature_layer(encoder).register_forward_hook(
                lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out)
            )
            trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
            dtype = next(encoder.parameters()).dtype
            try:
                with torch.set_grad_enabled(trainable):
                    encoder(pixel_values=pixel_values[:, 3 * i : 3 * i + 3].to(dtype))
            finally:
                hook.remove()
            # Prefix tokens (CLS, registers) come first; keep the patch grid.
            features.append(captured[-1][:, -self.num_patches :])
        return torch.cat(features, dim=-1)


# --------------------------------------------------------------------------------------
# Connector: mlp -> MSC (Mamba-2 Scan Connector) -> projector
# --------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), all with bias (as released)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MSCLayer(GradientCheckpointingLayer):
    """x = x + Mamba2(x) (bidirectional or cross scan, no norm before it, as released); x = x + SwiGLU(LayerNorm(x))."""

    def __init__(self, config: MLMambaConnectorConfig, width: int):
        super().__init__()
        self.mixer = Mamba2Mixer(width, **config.mixer_kwargs())
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.mlp = SwiGLU(width, width)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.mixer(x, grid=grid)
        return x + self.mlp(self.norm(x))


class VSSLayer(GradientCheckpointingLayer):
    """VL-Mamba's Vision Selective Scan block (pre-norm, as VMamba's VSS block): x = x + Mixer(LayerNorm(x)),
    the mixer a Mamba-1 or Mamba-2 mixer scanning the grid with BSM ("bidirectional") or CSM ("cross")."""

    def __init__(self, config: MLMambaConnectorConfig, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_epsilon)
        self.mixer = MIXERS[config.ssm_layer](width, **config.mixer_kwargs())

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x + self.mixer(self.norm(x), grid=grid)


class ScanConnector(nn.Module):
    """A stack of scan layers over the patch grid and a final LayerNorm: (n, h * w, d) -> (n, h * w, d).

    MSC (ML-Mamba's Mamba-2 Scan Connector, released as "Bidirectional_Mamba") stacks `MSCLayer`s;
    VSS (VL-Mamba's Vision Selective Scan) stacks `VSSLayer`s. Tokens arrive row-major over the grid.
    """

    def __init__(self, layer_cls, config: MLMambaConnectorConfig, width: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.layers = nn.ModuleList([layer_cls(config, width) for _ in range(config.num_layers)])
        self.norm_f = nn.LayerNorm(width, eps=config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, self.grid)
        return self.norm_f(x)


def fused_mlp_projector(in_dim: int, out_dim: int, expand: int) -> nn.Sequential:
    """Linear(in -> expand*in) GELU Linear(-> out) GELU Linear(out -> out) (prismatic's FusedMLPProjector)."""
    return nn.Sequential(
        nn.Linear(in_dim, expand * in_dim),
        nn.GELU(),
        nn.Linear(expand * in_dim, out_dim),
        nn.GELU(),
        nn.Linear(out_dim, out_dim),
    )


def mlp2x_projector(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in -> out) GELU Linear(out -> out) (LLaVA-1.5's "mlp2x_gelu", VL-Mamba's MLP connector)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class MLMambaConnector(nn.Module):
    """(n, grid * grid, vision_hidden) -> (n, grid * grid, d_model). Submodules by connector type, in order:

        "msc"      mlp (Linear + GELU), msc (MSC), projector (fused 3-layer MLP)      ML-Mamba
        "mlp"      projector (fused 3-layer MLP)                                     Cobra
        "mlp2x"    projector (Linear GELU Linear)                                    VL-Mamba "MLP"
        "vss-mlp"  vss (VSS at the vision width), projector (Linear GELU Linear)     VL-Mamba "VSS-MLP"
        "vss-l2"   mlp (Linear + GELU), vss (VSS), projector (Linear)                VL-Mamba "VSS-L2"
    """

    def __init__(self, config: MLMambaConnectorConfig, vision_hidden: int, d_model: int, grid: tuple[int, int]):
        super().__init__()
        kind = self.connector_type = config.connector_type
        width = config.scan_width(vision_hidden)
        if kind in ("msc", "vss-l2"):
            self.mlp = nn.Sequential(nn.Linear(vision_hidden, width), nn.GELU())
        if kind == "msc":
            self.msc = ScanConnector(MSCLayer, config, width, grid)
        elif kind in ("vss-mlp", "vss-l2"):
            self.vss = ScanConnector(VSSLayer, config, width, grid)
        if kind == "msc":
            self.projector = fused_mlp_projector(width, d_model, config.projector_expand)
        elif kind == "mlp":
            self.projector = fused_mlp_projector(vision_hidden, d_model, config.projector_expand)
        elif kind == "vss-l2":
            self.projector = nn.Linear(width, d_model)
        else:  # "mlp2x", "vss-mlp"
            self.projector = mlp2x_projector(vision_hidden, d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "mlp"):
            features = self.mlp(features)
        if hasattr(self, "msc"):
            features = self.msc(features)
        if hasattr(self, "vss"):
            features = self.vss(features)
        return self.projector(features)


# --------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------


class MLMambaBlock(GradientCheckpointingLayer):
    """mamba_ssm's pre-norm block: residual += hidden; hidden = mixer(norm(residual)).

    The residual stream is carried separately (in fp32 when `residual_in_fp32`), as mamba_ssm does.
    """

    def __init__(self, config: MLMambaTextConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = MIXERS[config.ssm_layer](config.d_model, **config.mixer_kwargs())

    def forward(self, hidden_states, residual=None, attention_mask=None, conv_state=None, ssm_state=None):
        residual = hidden_states if residual is None else residual + hidden_states
        if self.residual_in_fp32:
            residual = residual.float()
        hidden_states = self.mixer(self.norm(residual), attention_mask, conv_state=conv_state, ssm_state=ssm_state)
        return hidden_states, residual


_cpu_allocator_primed = False


def prime_cpu_allocator() -> None:
    """Once per process: let glibc's malloc keep the memory of a layer's temporaries between layers.

    glibc hands freed memory back to the kernel once more than its trim threshold lies free at the top
    of the heap, and the next allocations then fault fresh pages in again. The threshold follows the
    largest block it has unmapped so far, up to 32 MB (threshold 64 MB): freeing one 32 MB block sets it
    there, as any program that once frees a large tensor does. A prefill piece's temporaries then stay
    mapped from layer to layer: on the 2-core machine here some 300k page faults per 829-token prompt
    went away. Elsewhere (another allocator or OS) this is a 32 MB allocation and nothing more.
    """
    global _cpu_allocator_primed
    if not _cpu_allocator_primed:
        torch.empty(32 * 2**20 - 2**16, dtype=torch.uint8)  # allocated and freed at once
        _cpu_allocator_primed = True


def default_max_prefill_tokens(device: torch.device) -> int:
    """Chunked-prefill piece length when `text_config.max_prefill_tokens` is None.

    CPU: 1024. Larger pieces free more than glibc's largest trim threshold (64 MB, see
    `prime_cpu_allocator`) between layers at mamba2-130m size, and the freed memory gets faulted in
    again: a 2048-token prompt took about 2000 ms in one piece (150k-350k page faults) and 1760 ms in
    two (none), on 2 CPU cores. Elsewhere 8192: large enough that per-piece kernel launches stay
    negligible, small enough to bound activation memory.
    """
    return 1024 if device.type == "cpu" else 8192


class MLMambaLanguageModel(nn.Module):
    """Mamba-2 or Mamba-1 backbone without head (mamba_ssm's `MixerModel`): (b, l, d_model) embeddings -> hidden states."""

    def __init__(self, config: MLMambaTextConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([MLMambaBlock(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)

    def forward(self, inputs_embeds, attention_mask=None, cache=None, output_hidden_states=False):
        """(b, l, d_model) -> (b, l, d_model) after norm_f, and the per-layer hidden states (embeddings first)
        when `output_hidden_states`. With a cache and no autograd, prompts longer than `max_prefill_tokens`
        run in pieces (chunked prefill): the states carry over exactly, as they do between generate() steps."""
        piece = self.config.max_prefill_tokens
        if piece is None:
            piece = default_max_prefill_tokens(inputs_embeds.device)
        l = inputs_embeds.shape[1]
        if inputs_embeds.device.type == "cpu" and l > 1:
            prime_cpu_allocator()
        if cache is None or not piece or l <= piece or torch.is_grad_enabled():
            return self._forward_layers(inputs_embeds, attention_mask, cache, output_hidden_states)
        pieces = [
            self._forward_layers(
                inputs_embeds[:, start : start + piece],
                attention_mask[:, start : start + piece] if attention_mask is not None else None,
                cache,
                output_hidden_states,
            )
            for start in range(0, l, piece)
        ]
        hidden_states = torch.cat([h for h, _ in pieces], dim=1)
        all_hidden = None
        if output_hidden_states:
            all_hidden = tuple(torch.cat(per_layer, dim=1) for per_layer in zip(*(a for _, a in pieces)))
        return hidden_states, all_hidden

    def _forward_layers(self, inputs_embeds, attention_mask, cache, output_hidden_states):
        hidden_states, residual = inputs_embeds, None
        all_hidden = (inputs_embeds,) if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            conv_state = cache.conv_states[i] if cache is not None else None
            ssm_state = cache.ssm_states[i] if cache is not None else None
            hidden_states, residual = layer(hidden_states, residual, attention_mask, conv_state, ssm_state)
            if output_hidden_states:
                all_hidden += ((residual + hidden_states).to(inputs_embeds.dtype),)
        residual = residual + hidden_states
        return self.norm_f(residual).to(inputs_embeds.dtype), all_hidden


def packed_sequence_index(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which sequence each token belongs to, for padding-free (packed) batches; None for ordinary batches.

    Packed rows hold several sequences back to back (TRL's `padding_free=True` / `packing=True`). They are
    marked by `seq_idx` (b, l), by `cu_seq_lens` (n_seq + 1,) cumulative lengths of one packed row, or by
    `position_ids` that restart at 0 inside a row (only read without an attention_mask: generate() passes
    position_ids computed from the mask, which are not a packing signal). Returns (b, l) int64 ids that are
    constant over each sequence, or None when every row is one sequence.
    """
    if seq_idx is None and cu_seq_lens is not None:
        lengths = cu_seq_lens.diff().long()
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)[None]
    if seq_idx is None and position_ids is not None and attention_mask is None and position_ids.shape[1] > 1:
        starts = position_ids == 0
        starts[:, 0] = True
        seq_idx = starts.long().cumsum(1)
    if seq_idx is None:
        return None
    seq_idx = seq_idx.long()
    if seq_idx.ndim != 2 or not bool((seq_idx[:, 1:] >= seq_idx[:, :-1]).all()):
        raise ValueError("packed sequences must be contiguous: seq_idx of shape (batch, seq), non-decreasing along each row")
    if bool((seq_idx == seq_idx[:, :1]).all()):
        return None
    return seq_idx


def unpack_sequences(seq_idx: torch.Tensor):
    """Where each token of a packed (b, l) batch goes in a right-padded batch with one sequence per row.

    Returns (segment, position, n_segments, max_length, starts): for every token in row-major order its
    sequence number, its position within that sequence, the number of sequences, the longest length, and
    a (b, l) bool mask of the tokens that start a sequence.
    """
    b, l = seq_idx.shape
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    flat = starts.flatten()
    segment = flat.long().cumsum(0) - 1
    first = torch.nonzero(flat).squeeze(1)
    position = torch.arange(b * l, device=seq_idx.device) - first[segment]
    return segment, position, len(first), int(position.max()) + 1, starts


# --------------------------------------------------------------------------------------
# Pretrained model plumbing
# --------------------------------------------------------------------------------------


def _dt_bias_init(mixer, n: int, device) -> torch.Tensor:
    """mamba_ssm's dt bias: the inverse softplus of n step sizes drawn log-uniform in [dt_min, dt_max], floored."""
    log_dt = torch.rand(n, device=device) * (math.log(mixer.dt_max) - math.log(mixer.dt_min)) + math.log(mixer.dt_min)
    dt = torch.exp(log_dt).clamp(min=mixer.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class MLMambaPreTrainedModel(PreTrainedModel):
    config_class = MLMambaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "MLMambaBlock",
        "MSCLayer",
        "SiglipEncoderLayer",
        "Dinov2WithRegistersLayer",
        "CLIPEncoderLayer",
    ]
    _is_stateful = True
    _supports_sdpa = True  # the vision encoders use it; the Mamba parts have no attention

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_vision_tower_if_configured()  # loading re-creates parameters with requires_grad=True
        return loaded

    def freeze_vision_tower_if_configured(self) -> None:
        """Freeze the vision encoders when `config.freeze_vision_tower` (default True), as released."""
        if getattr(self.config, "freeze_vision_tower", True):
            base = self if isinstance(self, MLMambaModel) else self.model
            base.vision_tower.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module):
        text = self.config.text_config
        std = text.initializer_range
        if isinstance(module, Mamba2Mixer):
            suffixes = module.route_suffixes
            for suffix in suffixes:
                dt_bias, A_log, D = (getattr(module, n + suffix) for n in ("dt_bias", "A_log", "D"))
                init.copy_(dt_bias, _dt_bias_init(module, module.nheads, dt_bias.device))
                init.copy_(A_log, torch.log(torch.empty(module.nheads, device=A_log.device).uniform_(*module.A_init_range)))
                init.ones_(D)
        elif isinstance(module, Mamba1Mixer):
            # mamba_simple's init; runs after the generic Linear init of dt_proj below (children come first)
            for suffix in module.route_suffixes:
                dt_proj, A_log, D = (getattr(module, n + suffix) for n in ("dt_proj", "A_log", "D"))
                dt_std = module.dt_rank**-0.5 * module.dt_scale
                if module.dt_init == "constant":
                    init.constant_(dt_proj.weight, dt_std)
                else:
                    init.uniform_(dt_proj.weight, -dt_std, dt_std)
                init.copy_(dt_proj.bias, _dt_bias_init(module, module.d_inner, dt_proj.bias.device))
                A = torch.arange(1, module.d_state + 1, dtype=torch.float32, device=A_log.device)
                init.copy_(A_log, torch.log(A).expand(module.d_inner, -1))  # S4D-real: A = -(1, ..., d_state)
                init.ones_(D)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)) or type(module).__name__ == "RMSNormGated":
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        if isinstance(module, MLMambaBlock) and text.rescale_prenorm_residual:
            # GPT-2 style: scale the residual branch's output projection by 1/sqrt(n_layer).
            init.normal_(module.mixer.out_proj.weight, mean=0.0, std=std / text.n_layer**0.5)


class MLMambaModel(MLMambaPreTrainedModel):
    """Vision tower + connector + Mamba-2 backbone, without the LM head."""

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.vision_tower = MLMambaVisionTower(config.vision_config)
        grid = (config.vision_config.grid_size,) * 2
        self.connector = MLMambaConnector(
            config.connector_config, config.vision_config.hidden_size, config.text_config.d_model, grid
        )
        self.language_model = MLMambaLanguageModel(config.text_config)
        self.freeze_vision_tower_if_configured()
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embedding

    def set_input_embeddings(self, value):
        self.language_model.embedding = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3 * n_encoders, H, W) -> (n_images, num_image_tokens, d_model)."""
        features = self.vision_tower(pixel_values)
        connector_dtype = next(self.connector.parameters()).dtype
        return self.connector(features.to(connector_dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache: MLMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        **kwargs,
    ) -> MLMambaModelOutput:
        """Arguments as in `MLMambaForConditionalGeneration.forward`; `seq_idx` (b, l) marks packed sequences
        (see `packed_sequence_index`): each runs as if alone, from a zero state."""
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.embedding(input_ids)
        batch_size = inputs_embeds.shape[0]

        prefill = cache is None or cache.seqlen_offset == 0
        image_features = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError(
                    "pixel_values need input_ids with <image> placeholder tokens to mark where the images go; "
                    "with inputs_embeds, merge the image features (get_image_features) yourself"
                )
            image_features = self.get_image_features(pixel_values)
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)
        elif input_ids is not None and prefill:
            n_tokens = int((input_ids == self.config.image_token_id).sum())
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image tokens but no pixel_values were given; pass the images "
                    "(MLMambaProcessor does both), or remove the image tokens"
                )

        if attention_mask is not None:
            if attention_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the input is {tuple(inputs_embeds.shape[:2])}"
                )
            if bool(attention_mask.all()):
                attention_mask = None

        if use_cache is None:
            use_cache = cache is not None
        if use_cache and self.training and self.language_model.layers and self.language_model.layers[0].gradient_checkpointing:
            use_cache = False
        if use_cache and cache is None:
            cache = MLMambaCache(
                self.config.text_config, batch_size, dtype=inputs_embeds.dtype, device=inputs_embeds.device
            )
        if not use_cache:
            cache = None
        elif cache.batch_size != batch_size:
            raise ValueError(f"cache holds {cache.batch_size} rows but the input has {batch_size}")

        if seq_idx is not None:
            if cache is not None:
                raise ValueError("packed sequences (padding-free batches) are for training; they take no state cache")
            if attention_mask is not None:
                raise ValueError("packed sequences take no attention_mask: pass one or the other")
            hidden_states, all_hidden = self._forward_packed(inputs_embeds, seq_idx, bool(output_hidden_states))
        else:
            hidden_states, all_hidden = self.language_model(
                inputs_embeds, attention_mask, cache, output_hidden_states=bool(output_hidden_states)
            )
        if cache is not None:
            cache.seqlen_offset += inputs_embeds.shape[1]
        return MLMambaModelOutput(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=all_hidden,
            image_hidden_states=image_features,
        )

    def _forward_packed(self, inputs_embeds, seq_idx, output_hidden_states):
        """Run each packed sequence as its own right-padded row (the padding leaves no trace, see
        Mamba2Mixer), then put the outputs back in the packed layout."""
        b, l, d = inputs_embeds.shape
        segment, position, n_seg, max_len, _ = unpack_sequences(seq_idx)
        rows = inputs_embeds.new_zeros(n_seg, max_len, d).index_put((segment, position), inputs_embeds.reshape(b * l, d))
        mask = torch.zeros(n_seg, max_len, dtype=torch.long, device=inputs_embeds.device)
        mask[segment, position] = 1
        hidden, all_hidden = self.language_model(rows, mask, None, output_hidden_states=output_hidden_states)
        repack = lambda h: h[segment, position].reshape(b, l, -1)  # noqa: E731
        if all_hidden is not None:
            all_hidden = tuple(repack(h) for h in all_hidden)
        return repack(hidden), all_hidden

    def _merge_image_features(self, input_ids, inputs_embeds, image_features):
        mask = input_ids == self.config.image_token_id
        n_tokens = int(mask.sum())
        n_images, per_image = image_features.shape[:2]
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"Got {n_images} image(s), which need {n_images * per_image} image tokens ({per_image} each), "
                f"but input_ids hold {n_tokens} image tokens ({n_tokens / per_image:g} images' worth). Put one "
                "<image> in the text per image and let MLMambaProcessor expand it."
            )
        return inputs_embeds.masked_scatter(mask[..., None], image_features.to(inputs_embeds.dtype))


# Arguments generic callers (generate, Trainer) pass that have no meaning for a state-space model.
IGNORED_KWARGS = {"position_ids", "cache_position", "token_type_ids", "num_items_in_batch", "output_attentions", "is_first_iteration"}
# What TRL's padding-free collator adds to mark packed sequences (read by `packed_sequence_index`).
PACKING_KWARGS = {"seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def _cache_argument(cache: MLMambaCache | None, kwargs: dict) -> MLMambaCache | None:
    """`cache`, or `cache_params` (its name before transformers 5.24) taken out of `kwargs`."""
    old = kwargs.pop("cache_params", None)
    if old is not None and cache is not None and old is not cache:
        raise ValueError("got two state caches: pass it once, as `cache` (`cache_params` is its old name)")
    return cache if cache is not None else old


def _check_extra_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - IGNORED_KWARGS - PACKING_KWARGS)
    if unknown:
        raise TypeError(f"MLMambaForConditionalGeneration.forward() got unexpected arguments {unknown}")
    if kwargs.get("output_attentions"):
        raise ValueError("Mamba layers compute no attention weights; output_attentions=True is not supported")


def causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index=-100):
    """Mean next-token cross-entropy (fp32) over labels != ignore_index; logits[:, t] predicts labels[:, t + 1].

    With `num_items_in_batch` (Trainer's gradient accumulation) the sum is divided by it instead.
    """
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss


class MLMambaForConditionalGeneration(MLMambaPreTrainedModel, GenerationMixin):
    """ML-Mamba with a language-modelling head: image(s) + text -> next-token logits, and `generate()`."""

    if _TRANSFORMERS_5:
        _tied_weights_keys = {"lm_head.weight": "model.language_model.embedding.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: MLMambaConfig):
        super().__init__(config)
        self.model = MLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.d_model, config.text_config.vocab_size, bias=False)
        self.use_decode_graphs = False  # see `enable_decode_graphs`
        self._decode_graph: DecodeGraph | None = None
        self.post_init()

    def enable_decode_graphs(self, enabled: bool = True) -> "MLMambaForConditionalGeneration":
        """Replay each single-token decoding step from a CUDA graph (`DecodeGraph`), captured once per cache
        at the first decoding step of a `generate()` call. Inference only; off CUDA steps run eagerly.
        Untested on a GPU so far: `tests/test_gpu.py` checks it against the plain path where CUDA exists."""
        self.use_decode_graphs = enabled
        self._decode_graph = None
        return self

    def _decode_logits(self, input_ids: torch.LongTensor, cache: MLMambaCache) -> torch.Tensor:
        """One token per row with a state cache, no checks and no data-dependent branches (capturable):
        (b, 1) ids -> (b, 1, vocab) logits; the cache's states advance in place (not its seqlen_offset)."""
        hidden, _ = self.model.language_model(self.model.language_model.embedding(input_ids), None, cache)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def _graph_step(self, input_ids, pixel_values, attention_mask, inputs_embeds, labels, cache, output_hidden_states, kwargs):
        """Logits of a decoding step through `DecodeGraph` when enabled and the step is a plain one; else None."""
        plain = (
            self.use_decode_graphs
            and not self.training
            and not torch.is_grad_enabled()
            and cache is not None
            and cache.seqlen_offset > 0
            and input_ids is not None
            and input_ids.shape[1] == 1
            and pixel_values is None
            and inputs_embeds is None
            and labels is None
            and not output_hidden_states
            and not set(kwargs) & PACKING_KWARGS
            and (attention_mask is None or bool(attention_mask[:, -1:].all()))
        )
        if not plain:
            return None
        graph = self._decode_graph
        if graph is None or graph.cache is not cache:  # one graph at a time, for the cache in use
            graph = self._decode_graph = DecodeGraph(self, cache)
        logits = graph.step(input_ids)
        cache.seqlen_offset += 1
        return logits.clone()

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # Remote code: let every Auto class users reach for find the code files.
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModel"] = "modeling_mlmamba.MLMambaModel"
            auto_map["AutoModelForVision2Seq"] = "modeling_mlmamba.MLMambaForConditionalGeneration"  # transformers 4.x
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state cache is created in `prepare_inputs_for_generation`

    def new_cache(self, batch_size: int) -> MLMambaCache:
        """An empty state cache for `batch_size` rows on the model's device and dtype."""
        return MLMambaCache(self.config.text_config, batch_size, dtype=self.dtype, device=self.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: MLMambaCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MLMambaCausalLMOutput:
        """
        Args:
            input_ids: (batch, seq) token ids, with `num_image_tokens` `<image>` ids per image.
            pixel_values: (n_images, 3 * n_encoders, H, W) from MLMambaProcessor; images fill the image
                tokens in reading order (row by row).
            attention_mask: (batch, seq), 1 for tokens, 0 for left or right padding.
            labels: (batch, seq); -100 is ignored. Image token positions never carry loss.
            cache / use_cache: the state cache for decoding (see MLMambaCache).
            logits_to_keep: if > 0, only the logits of the last `logits_to_keep` positions are computed.
            position_ids / seq_idx / cu_seq_lens_q: padding-free (packed) batches, as TRL's collator with
                `padding_free=True` or `packing=True` makes them: sequences back to back in a row, without an
                attention_mask. Each sequence is computed as if alone (its own zero state) and no loss crosses
                from one into the next. Otherwise position_ids are ignored (a Mamba has no positions).
        """
        cache = _cache_argument(cache, kwargs)
        _check_extra_kwargs(kwargs)
        logits = self._graph_step(
            input_ids, pixel_values, attention_mask, inputs_embeds, labels, cache, output_hidden_states, kwargs
        )
        if logits is not None:
            return MLMambaCausalLMOutput(logits=logits, cache=cache)
        seq_idx = packed_sequence_index(
            attention_mask, kwargs.get("position_ids"), kwargs.get("seq_idx"), kwargs.get("cu_seq_lens_q")
        )
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            seq_idx=seq_idx,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype))

        loss = None
        if labels is not None:
            if input_ids is not None:
                labels = labels.masked_fill(input_ids == self.config.image_token_id, -100)
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            if seq_idx is not None:  # the first token of a packed sequence is not predicted from the one before
                labels = labels.masked_fill(unpack_sequences(seq_idx)[4], -100)
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))

        return MLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        pixel_values=None,
        attention_mask=None,
        inputs_embeds=None,
        cache: MLMambaCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int | None = None,
        **kwargs,
    ):
        """Prefill consumes the prompt (and the images); later steps feed only the tokens the cache has
        not seen. Without a cache the whole sequence (images included) is recomputed every step."""
        cache = _cache_argument(cache, kwargs)
        embeds_prompt = inputs_embeds is not None and (input_ids is None or input_ids.shape[1] == 0)
        if use_cache and cache is None:
            cache = self.new_cache(inputs_embeds.shape[0] if embeds_prompt else input_ids.shape[0])
        seen = cache.seqlen_offset if use_cache else 0

        if seen == 0:
            if embeds_prompt:
                if use_cache:
                    cache.prompt_in_embeds = True
                model_inputs = {"inputs_embeds": inputs_embeds, "input_ids": None}
            else:
                model_inputs = {"input_ids": input_ids}
        else:
            new_ids = input_ids[:, -1:] if cache.prompt_in_embeds else input_ids[:, seen:]
            if new_ids.shape[1] == 0:
                raise ValueError(f"the cache has seen {seen} positions and input_ids hold no new token after them")
            model_inputs = {"input_ids": new_ids}
            if pixel_values is not None and not bool((new_ids == self.config.image_token_id).any()):
                pixel_values = None  # the images were consumed at prefill
            if attention_mask is not None:
                attention_mask = attention_mask[:, -new_ids.shape[1] :]
        model_inputs.update(
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        if logits_to_keep is not None:
            model_inputs["logits_to_keep"] = logits_to_keep
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Keep the state cache where this transformers version's generate() looks for it (beam search
        reorders it there): `GENERATE_CACHE_KEY`."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs.pop("cache_params" if GENERATE_CACHE_KEY == "cache" else "cache", None)
        if outputs.cache is not None:
            model_kwargs[GENERATE_CACHE_KEY] = outputs.cache
        return model_kwargs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache


__all__ = [
    "MLMambaCache",
    "MLMambaModel",
    "MLMambaPreTrainedModel",
    "MLMambaForConditionalGeneration",
]
