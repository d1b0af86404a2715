"""The decoding state of the language model, and decoding steps replayed from a CUDA graph.

MLMambaCache   per layer a conv state and an SSM state, constant in sequence length
DecodeGraph    one single-token decoding step for one cache, captured once and replayed
DecodeGraphs   the generation head's switch for them (`enable_decode_graphs`)
"""

import torch

from .configuration_mlmamba import MLMambaTextConfig


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
            conv_shape, ssm_shape = (
                (conv_dim, config.d_conv),
                (d_inner // config.headdim, config.headdim, config.d_state),
            )
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

    `model` is the `MLMambaForConditionalGeneration` whose `_decode_logits` the graph records. Off CUDA the
    same object runs the step eagerly (no graph): the tests check that path on CPU.
    """

    def __init__(self, model, cache: MLMambaCache):
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


class DecodeGraphs:
    """Opt-in CUDA-graph decoding for a model with `_decode_logits(ids, cache)` (the generation head).

    `prepare_inputs_for_generation` asks `can_replay_decode_graph` at each decoding step; a plain step then
    replays the graph of its cache (`decode_graph_for`), one graph at a time, for the cache in use.
    """

    use_decode_graphs = False
    _decode_graph: DecodeGraph | None = None

    def enable_decode_graphs(self, enabled: bool = True):
        """Replay each single-token decoding step from a CUDA graph (`DecodeGraph`), captured once per cache
        at the first decoding step of a `generate()` call. Inference only; off CUDA steps run eagerly."""
        self.use_decode_graphs = enabled
        self._decode_graph = None
        return self

    def can_replay_decode_graph(self, new_ids, pixel_values, attention_mask, kwargs: dict) -> bool:
        """Whether a decoding step is plain enough for the graph: graphs enabled, inference, one new token per
        row, and no images, padding, hidden states or packed sequences to handle."""
        return (
            self.use_decode_graphs
            and not self.training
            and not torch.is_grad_enabled()
            and new_ids.shape[1] == 1
            and pixel_values is None
            and not kwargs.get("output_hidden_states")
            and not {"seq_idx", "cu_seq_lens_q", "cu_seq_lens_k"} & set(kwargs)
            and (attention_mask is None or bool(attention_mask[:, -1:].all()))
        )

    def decode_graph_for(self, cache: MLMambaCache) -> DecodeGraph:
        if self._decode_graph is None or self._decode_graph.cache is not cache:
            self._decode_graph = DecodeGraph(self, cache)
        return self._decode_graph
