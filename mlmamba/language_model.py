"""The Mamba language model: mamba_ssm's `MixerModel` layout (embedding, layers.N.{norm,mixer}, norm_f).

TokenEmbedding          nn.Embedding that reads only the looked-up rows of an int8 table
MLMambaBlock            pre-norm block around a Mamba-2 or Mamba-1 mixer (by `text_config.ssm_layer`)
MLMambaLanguageModel    the blocks and the final norm, with chunked prefill and packed sequences
packed_sequence_index   which sequence each token of a padding-free (packed) batch belongs to
causal_lm_loss          next-token cross-entropy
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import is_torchdynamo_compiling, logging

from .configuration_mlmamba import MLMambaTextConfig
from .mamba1_mixer import Mamba1Mixer
from .mamba2_mixer import Mamba2Mixer
from .ssm_ops import RMSNorm

logger = logging.get_logger(__name__)

# The mixer class by `ssm_layer` (mamba_ssm's `ssm_cfg["layer"]`), for the language model and the connectors.
MIXERS = {"Mamba2": Mamba2Mixer, "Mamba1": Mamba1Mixer}


class TokenEmbedding(nn.Embedding):
    """nn.Embedding whose table may be torchao's int8 with a scale per row (`int8_weight_only_config()`, which
    quantizes the output layer tied to it): torchao's own lookup dequantizes the whole table at every call
    (180-400 ms a decoding step at 130m, for one row); this one dequantizes the rows it looks up."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.weight
        if not hasattr(table, "qdata") or tuple(getattr(table, "block_size", ())) != (1, table.shape[1]):
            return super().forward(input_ids)
        # torchao's dequantization (dequantize_affine), on the looked-up rows only
        rows = F.embedding(input_ids, table.qdata).to(torch.int32)
        if table.zero_point is not None:
            rows = rows - F.embedding(input_ids, table.zero_point.reshape(-1, 1)).to(torch.int32)
        return (rows.to(table.scale.dtype) * F.embedding(input_ids, table.scale.reshape(-1, 1))).to(table.dtype)


class MLMambaBlock(GradientCheckpointingLayer):
    """mamba_ssm's pre-norm block: residual += hidden; hidden = mixer(norm(residual)).

    The residual stream is carried separately (in fp32 when `residual_in_fp32`), as mamba_ssm does.
    """

    def __init__(self, config: MLMambaTextConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = MIXERS[config.ssm_layer](config.d_model, **config.mixer_kwargs(), initialize=False)

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
    mapped from layer to layer instead of being faulted in again (docs/PERFORMANCE.md has the counts).
    Elsewhere (another allocator or OS) this is a 32 MB allocation and nothing more.
    """
    global _cpu_allocator_primed
    if not _cpu_allocator_primed:
        torch.empty(32 * 2**20 - 2**16, dtype=torch.uint8)  # allocated and freed at once
        _cpu_allocator_primed = True


def default_max_prefill_tokens(device: torch.device) -> int:
    """Chunked-prefill piece length when `text_config.max_prefill_tokens` is None.

    CPU: 1024. Larger pieces free more than glibc's largest trim threshold (64 MB, see
    `prime_cpu_allocator`) between layers at mamba2-130m size, and the freed memory gets faulted in
    again (docs/PERFORMANCE.md). Elsewhere 8192: large enough that per-piece kernel launches stay
    negligible, small enough to bound activation memory.
    """
    return 1024 if device.type == "cpu" else 8192


class MLMambaLanguageModel(nn.Module):
    """Mamba-2 or Mamba-1 backbone without head (mamba_ssm's `MixerModel`): (b, l, d_model) embeddings ->
    hidden states."""

    def __init__(self, config: MLMambaTextConfig):
        super().__init__()
        self.config = config
        self.embedding = TokenEmbedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([MLMambaBlock(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)

    def forward(self, inputs_embeds, attention_mask=None, cache=None, output_hidden_states=False, seq_idx=None):
        """(b, l, d_model) -> (b, l, d_model) after norm_f, and the per-layer hidden states (embeddings first)
        when `output_hidden_states`. With a cache and no autograd, prompts longer than `max_prefill_tokens`
        run in pieces (chunked prefill): the states carry over exactly, as they do between generate() steps.
        `seq_idx` (b, l) marks packed sequences (see `packed_sequence_index`): each runs as if alone."""
        if seq_idx is not None:
            if cache is not None:
                raise ValueError("packed sequences (padding-free batches) are for training; they take no state cache")
            if attention_mask is not None:
                raise ValueError("packed sequences take no attention_mask: pass one or the other")
            return self._forward_packed(inputs_embeds, seq_idx, output_hidden_states)
        piece = self.config.max_prefill_tokens
        if piece is None:
            piece = default_max_prefill_tokens(inputs_embeds.device)
        l = inputs_embeds.shape[1]
        if inputs_embeds.device.type == "cpu" and l > 1 and not is_torchdynamo_compiling():
            prime_cpu_allocator()  # an eager-only effect on the allocator: a compiled graph would drop it
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
            conv_state, ssm_state = cache.layer_states(i) if cache is not None else (None, None)
            hidden_states, residual = layer(hidden_states, residual, attention_mask, conv_state, ssm_state)
            if output_hidden_states:
                all_hidden += ((residual + hidden_states).to(inputs_embeds.dtype),)
        residual = residual + hidden_states
        return self.norm_f(residual).to(inputs_embeds.dtype), all_hidden

    def _forward_packed(self, inputs_embeds, seq_idx, output_hidden_states):
        """Run each packed sequence as its own right-padded row (the padding leaves no trace, see
        Mamba2Mixer), then put the outputs back in the packed layout."""
        b, l, d = inputs_embeds.shape
        segment, position, n_seg, max_len, _ = unpack_sequences(seq_idx)
        rows = inputs_embeds.new_zeros(n_seg, max_len, d).index_put(
            (segment, position), inputs_embeds.reshape(b * l, d)
        )
        mask = torch.zeros(n_seg, max_len, dtype=torch.long, device=inputs_embeds.device)
        mask[segment, position] = 1
        hidden, all_hidden = self.forward(rows, mask, None, output_hidden_states=output_hidden_states)
        repack = lambda h: h[segment, position].reshape(b, l, -1)  # noqa: E731
        if all_hidden is not None:
            all_hidden = tuple(repack(h) for h in all_hidden)
        return repack(hidden), all_hidden


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
        raise ValueError(
            "packed sequences must be contiguous: seq_idx of shape (batch, seq), non-decreasing along each row"
        )
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


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor | None,
    never: torch.Tensor,
    num_items_in_batch=None,
    shift_labels: torch.LongTensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy through transformers' `ForCausalLMLoss` (fp32; logits[:, t] predicts
    labels[:, t + 1], or `shift_labels[:, t]`; mean over kept labels, or their sum / `num_items_in_batch`).

    `never` (b, l) marks the positions no label may ask the model to predict (image tokens, padding, packed
    sequence starts). Rows without any kept label are counted in a warning; a batch without any gives a loss
    of 0 that still reaches every parameter's gradient, not NaN.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]
    never_next = F.pad(never, (0, 1), value=True)[:, 1:]  # the position each target sits at
    shift_labels = shift_labels.to(logits.device).masked_fill(never_next.to(logits.device), ignore_index)
    kept = (shift_labels != ignore_index).sum(-1)
    if not bool(kept.all()):
        empty = int((kept == 0).sum())
        logger.warning(
            f"{empty} of {len(kept)} rows carry no label to learn from (all -100 after masking images and padding, "
            "or the answer cut away by max_length): they add nothing to the loss"
        )
    if int(kept.sum()) == 0:
        return logits.float().sum() * 0.0
    return ForCausalLMLoss(
        logits,
        None,
        logits.shape[-1],
        num_items_in_batch=num_items_in_batch,
        ignore_index=ignore_index,
        shift_labels=shift_labels,
    )
