"""Connectors: fused vision features (n, grid * grid, vision_hidden) -> embeddings (n, grid * grid, d_model).

    "msc"      mlp (Linear + GELU), msc (MSC), projector (fused 3-layer MLP)      ML-Mamba
    "mlp"      projector (fused 3-layer MLP)                                     Cobra
    "mlp2x"    projector (Linear GELU Linear)                                    VL-Mamba "MLP"
    "vss-mlp"  vss (VSS at the vision width), projector (Linear GELU Linear)     VL-Mamba "VSS-MLP"
    "vss-l2"   mlp (Linear + GELU), vss (VSS), projector (Linear)                VL-Mamba "VSS-L2"

The submodule names (`mlp`, `msc`, `vss`, `projector`) are the released checkpoints' keys.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_mlmamba import MLMambaConnectorConfig
from .language_model import MIXERS
from .mamba2_mixer import Mamba2Mixer


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
    """x = x + Mamba2(x) (bidirectional or cross scan, no norm before it, as released);
    x = x + SwiGLU(LayerNorm(x))."""

    def __init__(self, config: MLMambaConnectorConfig, width: int):
        super().__init__()
        self.mixer = Mamba2Mixer(width, **config.mixer_kwargs(), initialize=False)
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
        self.mixer = MIXERS[config.ssm_layer](width, **config.mixer_kwargs(), initialize=False)

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


# connector_type -> its parts in order, each built from (config, vision_hidden, scan width, d_model, grid).
# `mlp` is one Linear + GELU into the scan's width (the released key, not a multi-layer MLP).
_PARTS = {
    "input_linear": lambda c, v, w, d, g: ("mlp", nn.Sequential(nn.Linear(v, w), nn.GELU())),
    "msc": lambda c, v, w, d, g: ("msc", ScanConnector(MSCLayer, c, w, g)),
    "vss": lambda c, v, w, d, g: ("vss", ScanConnector(VSSLayer, c, w, g)),
    "fused_projector_from_scan": lambda c, v, w, d, g: ("projector", fused_mlp_projector(w, d, c.projector_expand)),
    "fused_projector": lambda c, v, w, d, g: ("projector", fused_mlp_projector(v, d, c.projector_expand)),
    "mlp2x_projector": lambda c, v, w, d, g: ("projector", mlp2x_projector(v, d)),
    "linear_projector": lambda c, v, w, d, g: ("projector", nn.Linear(w, d)),
}
CONNECTOR_PARTS = {
    "msc": ("input_linear", "msc", "fused_projector_from_scan"),
    "mlp": ("fused_projector",),
    "mlp2x": ("mlp2x_projector",),
    "vss-mlp": ("vss", "mlp2x_projector"),
    "vss-l2": ("input_linear", "vss", "linear_projector"),
}


class MLMambaConnector(nn.Module):
    """(n, grid * grid, vision_hidden) -> (n, grid * grid, d_model): the parts `CONNECTOR_PARTS` lists for
    `config.connector_type`, applied in order."""

    def __init__(self, config: MLMambaConnectorConfig, vision_hidden: int, d_model: int, grid: tuple[int, int]):
        super().__init__()
        self.connector_type = config.connector_type
        width = config.scan_width(vision_hidden)
        self.part_names = []
        for part in CONNECTOR_PARTS[config.connector_type]:
            name, module = _PARTS[part](config, vision_hidden, width, d_model, grid)
            self.add_module(name, module)
            self.part_names.append(name)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for name in self.part_names:
            features = getattr(self, name)(features)
        return features
