"""Import timm (installed with `pip install --no-deps timm`) without torchvision, as an independent reference.

timm depends on torchvision, but PyPI's torchvision wheels are built against the CUDA torch and do not load
beside the CPU torch these tests pin. timm's ViT code (`timm.models.vision_transformer` and the layers it uses)
never calls torchvision: torchvision is imported at `import timm` only for data transforms and datasets
(`timm.data`), FX feature extraction, and FrozenBatchNorm2d (conv-net freezing utilities). So while timm
imports, each of those names is a stub that raises if anything ever builds it; `InterpolationMode` is a
plain enum, because timm's transforms build lookup tables from it at import. The stub modules are taken
out of `sys.modules` right after, so nothing else (transformers checks whether torchvision is installed)
ever sees them. Returns None when timm is not installed.
"""

import enum
import importlib.util
import sys
import types

from torch import nn

STUBBED = (
    "torchvision",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.datasets",
)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") or name in ("create_feature_extractor", "get_graph_node_names"):
            raise AttributeError(name)  # timm then records that FX feature extraction is unavailable
        if name == "InterpolationMode":
            value = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC BOX HAMMING LANCZOS")
        else:

            def refuse(*args, _name=f"{self.__name__}.{name}", **kwargs):
                raise RuntimeError(f"{_name} is a test stub: torchvision is not installed")

            value = type(name, (nn.Module,), {"__init__": refuse, "__module__": self.__name__})
        setattr(self, name, value)
        return value


def import_timm():
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        return None
    if importlib.util.find_spec("torchvision") is not None:  # a working torchvision: no stub needed
        import timm

        return timm
    for name in STUBBED:
        module = _StubModule(name)
        module.__path__ = []
        sys.modules[name] = module
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, module)
    try:
        import timm
    finally:
        for name in STUBBED:
            sys.modules.pop(name, None)
    return timm
