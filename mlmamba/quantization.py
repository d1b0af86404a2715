"""int8 weight-only quantization of every linear layer, the output layer included, through transformers' route.

    from mlmamba.quantization import int8_weight_only_config
    model = MLMambaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.bfloat16, quantization_config=int8_weight_only_config()
    )

`TorchAoConfig(Int8WeightOnlyConfig())` quantizes every `nn.Linear` but the output layer: that one is tied to
the input embedding, which transformers leaves in the model dtype (77 of the 168 MB a 130m decoding step
reads). transformers' route quantizes it only when torchao's `FqnToConfig` names it
(`include_input_output_embeddings` alone hands it to `quantize_`, whose default filter takes linear layers
only), and then the linear layers must be named too, by weight rather than by module (for a module pattern
transformers quantizes the bias as well, and loading fails). Those names are this model's, hence a recipe
here, tested against the model's own layers (tests/test_quantization.py): it quantizes exactly what the plain
config does, plus that embedding, which the output layer then reads in int8, as llama.cpp's Q8_0 does.
"""

from .modeling_mlmamba import TIED_EMBEDDING

# The linear layers' weights, by the names the vision towers, connectors and mixers give them (q_proj, x_proj,
# dt_proj_b, fc1, w1, projector.0, ...); a LayerNorm's or a convolution's weight must not match (quantize_
# would try to quantize it).
LINEAR_WEIGHTS = r"re:.*\.(\w*_proj\w*|fc\d|w\d|mlp\.\d+|projector(\.\d+)?)\.weight"


def int8_weight_only_config(output_layer: bool = True):
    """transformers' `TorchAoConfig` for int8 weights with a scale per row and activations in the model dtype;
    with `output_layer`, the tied input embedding and output layer too (else the plain config)."""
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if not output_layer:
        return TorchAoConfig(Int8WeightOnlyConfig())
    int8 = Int8WeightOnlyConfig()
    return TorchAoConfig(
        FqnToConfig({LINEAR_WEIGHTS: int8, TIED_EMBEDDING: int8}), include_input_output_embeddings=True
    )
