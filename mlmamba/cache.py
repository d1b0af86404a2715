"""The decoding state of the language model, and decoding steps replayed from a graph.

MLMambaCache   per layer a conv state and an SSM state, constant in sequence length
DecodeGraph    one single-token decoding step for one cache: a CUDA graph, or compiled off CUDA
DecodeGraphs   the generation head's switch for them (`enable_decode_graphs`)
"""

import types

import torch

from ._compat import LinearAttentionLayer, StateCacheBase, init_state_layers, mark_consumed
from .configuration_mlmamba import MLMambaTextConfig


def state_shapes(config: MLMambaTextConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-row shapes of one layer's conv state and SSM state."""
    d_inner = config.expand * config.d_model
    if config.ssm_layer == "Mamba1":
        return (d_inner, config.d_conv), (d_inner, config.d_state)
    conv_dim = d_inner + 2 * config.ngroups * config.d_state
    return (conv_dim, config.d_conv), (d_inner // config.headdim, config.headdim, config.d_state)


class MLMambaCache(StateCacheBase):
    """Decoding state of the language model, constant in sequence length.

    Per layer `i`, `layer_states(i)` gives a conv state in the model dtype and an SSM state in `ssm_state_dtype`
    (fp32 by default), which the mixers update in place:
        Mamba-2: (batch, conv_dim, d_conv) and (batch, nheads, headdim, d_state)
        Mamba-1: (batch, d_inner, d_conv) and (batch, d_inner, d_state)
    Under transformers 5 this is a `transformers.Cache` of linear-attention layers (as transformers' own Mamba2
    keeps its states), so cache utilities work on it; `past_key_values=DynamicCache()` is adopted the same way
    (`as_state_cache`). `seqlen_offset` counts the positions consumed so far, and `token_ids` records which
    (-1 where the prompt came as embeddings), so that a cache is only continued by ids that extend it.
    """

    is_compileable = False  # generate() must not compile around it: decoding graphs are `DecodeGraph`'s job

    def __init__(
        self,
        config: MLMambaTextConfig,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        ssm_state_dtype: torch.dtype = torch.float32,
        layers: list | None = None,
    ):
        conv_shape, ssm_shape = state_shapes(config)
        conv = [torch.zeros(batch_size, *conv_shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        ssm = [
            torch.zeros(batch_size, *ssm_shape, dtype=ssm_state_dtype, device=device) for _ in range(config.n_layer)
        ]
        init_state_layers(self, conv, ssm, layers)
        self.seqlen_offset = 0
        self.token_ids: torch.LongTensor | None = None  # (batch, seqlen_offset)
        self.prompt_in_embeds = False  # prefill consumed inputs_embeds that input_ids do not repeat

    @property
    def conv_states(self) -> list[torch.Tensor]:
        return [self.layer_states(i)[0] for i in range(self.num_layers)]

    @property
    def ssm_states(self) -> list[torch.Tensor]:
        return [self.layer_states(i)[1] for i in range(self.num_layers)]

    def state_tensors(self) -> list[torch.Tensor]:
        return self.conv_states + self.ssm_states

    @property
    def batch_size(self) -> int:
        return self.layer_states(0)[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether it keeps a fixed-size (recurrent) state: all do. generate() (transformers >= 5.24)
        then leaves slicing the prompt to `prepare_inputs_for_generation`."""
        return [True] * self.num_layers

    def record(self, input_ids: torch.LongTensor | None, length: int) -> None:
        """Count `length` consumed positions, with their ids (None: they came as embeddings)."""
        if input_ids is None:
            batch = self.batch_size
            input_ids = torch.full((batch, length), -1, dtype=torch.long, device=self.layer_states(0)[0].device)
        ids = input_ids.detach().long()
        self.token_ids = ids if self.token_ids is None else torch.cat([self.token_ids, ids.to(self.token_ids)], 1)
        self.seqlen_offset += length
        mark_consumed(self)

    def check_continued_by(self, input_ids: torch.LongTensor) -> None:
        """Refuse ids that do not start with what the cache has consumed (a cache reused without `.copy()`, or a
        question passed without its prefix)."""
        seen = self.seqlen_offset
        if input_ids.shape[1] <= seen:
            raise ValueError(
                f"the cache has consumed {seen} positions but input_ids hold {input_ids.shape[1]}: pass the ids the "
                "cache has seen followed by the new ones (prefix + question). To ask again from a prefix, pass a "
                "fresh `cache.copy()` each time: generate() advances the cache it is given."
            )
        if input_ids.shape[1] == seen + 1:
            return  # a decoding step (beam search may have reordered the rows since)
        known = self.token_ids >= 0
        if not bool((input_ids[:, :seen].to(self.token_ids) == self.token_ids)[known].all()):
            raise ValueError(
                f"input_ids do not start with the {seen} tokens this cache has consumed: pass prefix + new tokens, "
                "and reuse a prefix cache through `cache.copy()` (generate() advances the cache it is given)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows in place (beam search); the state tensors stay where they are (see `DecodeGraph`)."""
        for s in self.state_tensors():
            s.copy_(s.index_select(0, beam_idx.to(s.device)))
        if self.token_ids is not None:
            self.token_ids = self.token_ids.index_select(0, beam_idx.to(self.token_ids.device))

    def reset(self) -> None:
        for s in self.state_tensors():
            s.zero_()
        self.seqlen_offset, self.token_ids, self.prompt_in_embeds = 0, None, False
        mark_consumed(self, False)

    def copy(self, repeat: int = 1) -> "MLMambaCache":
        """An independent copy, each row repeated `repeat` times (row-major, like `repeat_interleave`).

        Prefix reuse: prefill an image and a system prompt once, then answer several questions from
        copies: `model.generate(input_ids=prefix_ids + question_ids, cache=cache.copy())` feeds
        only the tokens after the prefix; the vision tower and the prefix do not run again.
        """
        new = object.__new__(MLMambaCache)
        init_state_layers(
            new,
            [s.repeat_interleave(repeat, dim=0) for s in self.conv_states],
            [s.repeat_interleave(repeat, dim=0) for s in self.ssm_states],
        )
        new.seqlen_offset = self.seqlen_offset
        new.token_ids = None if self.token_ids is None else self.token_ids.repeat_interleave(repeat, dim=0)
        new.prompt_in_embeds = self.prompt_in_embeds
        mark_consumed(new, self.seqlen_offset > 0)
        return new

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.state_tensors())


def check_cache_fits(cache: MLMambaCache, config: MLMambaTextConfig, batch_size: int) -> None:
    """Refuse a cache made for another model (family or size) or another batch."""
    conv_shape, ssm_shape = state_shapes(config)
    conv, ssm = cache.layer_states(0)
    if cache.num_layers != config.n_layer or conv.shape[1:] != conv_shape or ssm.shape[1:] != ssm_shape:
        raise ValueError(
            f"the cache holds {cache.num_layers} layers of states {tuple(conv.shape[1:])} and {tuple(ssm.shape[1:])}; "
            f"this model needs {config.n_layer} layers of {conv_shape} and {ssm_shape}: it was made for another "
            "model (family or size). Make one with model.new_cache(batch_size), or let the model make it"
        )
    if cache.batch_size != batch_size:
        raise ValueError(f"cache holds {cache.batch_size} rows but the input has {batch_size}")


def as_state_cache(cache, config: MLMambaTextConfig, batch_size: int, dtype, device) -> MLMambaCache | None:
    """`cache` as an `MLMambaCache`: itself, or a transformers `Cache` (e.g. `DynamicCache()` or
    `DynamicCache(config=model.config)`) adopted with its layers, which then hold this model's states."""
    if cache is None or isinstance(cache, MLMambaCache):
        return cache
    if LinearAttentionLayer is None or not hasattr(cache, "layers"):
        raise TypeError(
            f"the state cache must be an MLMambaCache (model.new_cache(batch_size)), got {type(cache).__name__}"
        )
    if cache.layers and not all(isinstance(layer, LinearAttentionLayer) for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise ValueError(
            f"this model keeps a recurrent state per layer and no attention keys and values; a cache of {kinds} "
            "cannot hold it. Pass DynamicCache(config=model.config), an empty DynamicCache(), or no cache"
        )
    if any(any(layer.has_previous_state.values()) for layer in cache.layers):
        raise ValueError("this transformers Cache already holds states of another model; pass a fresh one")
    if len(cache.layers) not in (0, config.n_layer):
        raise ValueError(f"the cache has {len(cache.layers)} layers; the model has {config.n_layer}")
    layers = cache.layers if cache.layers else None
    adopted = MLMambaCache(config, batch_size, dtype=dtype, device=device, layers=layers)
    if layers is None:
        cache.layers = adopted.layers  # the caller's object holds the states too
    return adopted


# inductor settings of `enable_decode_graphs(prepack_weights=True)`: freezing makes the weights constants of
# the graph, which lets max-autotune pick its C++ matrix kernels with the weights copied once into their
# blocked layout (on CPU faster than MKL's and oneDNN's matrix-vector products on bf16 and int8 weights);
# cpp_wrapper calls the step's ~100 kernels from C++ instead of a generated Python function, whose per-call
# cost is a few percent of a 130m step (docs/PERFORMANCE.md).
PREPACK_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "cpp_wrapper": True,
}


def compile_decode_step(model, backend: str, prepack_weights: bool = False):
    """`model._decode_logits` compiled by `torch.compile(backend=backend)`, one graph per batch size.

    The compiled code belongs to a fresh copy of the method's code object: dynamo keeps compiled code per code
    object, and a graph with frozen (prepacked) weights must not be reused after the weights change, so each
    call compiles anew instead of finding an earlier graph whose guards still pass.
    """
    step = model._decode_logits
    if isinstance(step, types.MethodType):
        f = step.__func__
        fresh = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
        step = types.MethodType(fresh, model)
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    if not (prepack_weights and backend == "inductor"):
        return compiled
    from torch._inductor import config as inductor_config

    def prepacked(*args):
        # The settings must hold while inductor compiles, which happens inside a call (the first one at each
        # batch size). Given as torch.compile(options=...) instead, the step ran at the speed of the plain
        # compile (docs/PERFORMANCE.md).
        with inductor_config.patch(PREPACK_OPTIONS):
            return compiled(*args)

    return prepacked


class DecodeGraph:
    """One decoding step of the language model for one cache, replayed from a graph.

    A step of the 2.7B model launches some thousand small kernels (64 layers of projections, conv and
    state updates). On CUDA they are replayed as one CUDA graph, which removes the launch overhead that
    dominates batch-1 decoding. Elsewhere the step runs as the model's compiled step (`compiled`, from
    `compile_decode_step`): inductor fuses each layer's small operations (conv step, state update, norms)
    into a few C++ loops, which on a CPU removes most of the time a step spends besides reading the weights
    (see docs/PERFORMANCE.md); without one the step runs eagerly. The graph reads and writes the cache's
    state tensors where they are, so they must stay there: `MLMambaCache.reorder_cache` works in place.
    `step(ids (b, 1))` returns the logits (b, 1, vocab) in a buffer the next step may overwrite.

    `model` is the `MLMambaForConditionalGeneration` whose `_decode_logits` the graph records.
    """

    def __init__(self, model, cache: MLMambaCache, compiled=None):
        self.model, self.cache = model, cache
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.layer_states(0)[0].device)
        self.graph = self.logits = None
        self.compiled = None if self.ids.is_cuda else compiled
        if self.ids.is_cuda:
            self._capture()

    @torch.no_grad()
    def _capture(self) -> None:
        states = self.cache.state_tensors()
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
        if self.graph is None and self.compiled is None:
            return self.model._decode_logits(ids, self.cache)
        # Both graphs read one input tensor: a CUDA graph reads fixed addresses, and the ids generate() hands in
        # are views of its growing sequence, a new stride each step, on which a compiled graph would recompile.
        self.ids.copy_(ids)
        if self.compiled is not None:
            return self.compiled(self.ids, self.cache)
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Opt-in graph decoding for a model with `_decode_logits(ids, cache)` (the generation head).

    `prepare_inputs_for_generation` asks `can_replay_decode_graph` at each decoding step; a plain step then
    replays the graph of its cache (`decode_graph_for`), one graph at a time, for the cache in use.
    """

    use_decode_graphs = False
    _decode_graph: DecodeGraph | None = None
    _compiled_decode_step = None

    def enable_decode_graphs(self, enabled: bool = True, backend: str | None = "inductor", prepack_weights=False):
        """Run each single-token decoding step of `generate()` from a graph (`DecodeGraph`). Inference only.

        On CUDA: a CUDA graph, captured once per cache at the first decoding step. Elsewhere: the step compiled
        by `torch.compile(backend=backend)` (None: eager). The first decoding step at each batch size pays the
        compile: tens of seconds on a 2-core CPU, less once inductor's cache on disk holds it.

        `prepack_weights=True` (inductor, off CUDA) also freezes the weights into the graph and lets inductor
        choose its own C++ matrix kernels (`PREPACK_OPTIONS`): the fastest CPU decoding in bf16 and int8, at the
        cost of a second copy of the weight matrices and a longer first compile. The graph keeps the weights of
        its first step: call `enable_decode_graphs` again after changing them.
        """
        self.use_decode_graphs = enabled
        self._decode_graph = None
        self._compiled_decode_step = None
        if enabled and backend is not None:
            self._compiled_decode_step = compile_decode_step(self, backend, prepack_weights)
        return self

    def can_replay_decode_graph(self, new_ids, pixel_values, attention_mask, output_hidden_states, kwargs) -> bool:
        """Whether a decoding step is plain enough for the graph: graphs enabled, inference, one new token per
        row, and no images, padding, hidden states or packed sequences to handle."""
        return (
            self.use_decode_graphs
            and not self.training
            and not torch.is_grad_enabled()
            and new_ids.shape[1] == 1
            and pixel_values is None
            and not output_hidden_states
            and not {"seq_idx", "cu_seq_lens_q", "cu_seq_lens_k"} & set(kwargs)
            and (attention_mask is None or bool(attention_mask[:, -1:].all()))
        )

    def decode_graph_for(self, cache: MLMambaCache) -> DecodeGraph:
        if self._decode_graph is None or self._decode_graph.cache is not cache:
            self._decode_graph = DecodeGraph(self, cache, self._compiled_decode_step)
        return self._decode_graph
