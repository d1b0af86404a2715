"""transformers' own common model tests (`ModelTesterMixin`) on each family, as transformers runs them on its
built-in models (tests/models/llava/test_modeling_llava.py, tests/models/mamba2/test_modeling_mamba2.py).

The common test files are not in the transformers wheel. On its first run this module fetches the `tests/` folder
of the installed version's source distribution into `.cache/transformers-tests/<version>/` (or the folder
`MLMAMBA_TRANSFORMERS_TESTS` names; tests/fetch_transformers_tests.py does it); without network it skips. That
distribution lacks `tests/generation/test_utils.py` and `tests/exporters/test_export.py`, which
`test_modeling_common.py` imports: empty stand-ins take their place (generate() has its own tests in
test_generate.py).

No test is skipped or expected to fail here. The flags are those of transformers' Mamba / Mamba2 testers
(`has_attentions = False`: the mixin itself skips the tests of attention outputs, which an attention-free language
model cannot give) and LLaVA's (`_is_composite`); the mixin's other skips are its own (no GPU, no flash-attn, no
RoPE, ...).
"""

import importlib
import sys
import types
import unittest
import unittest.mock
import warnings

import pytest
import torch
from fetch_transformers_tests import MARKER, fetch, tests_folder
from transformers.models.auto import modeling_auto
from transformers.testing_utils import torch_device

from mlmamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaModel
from mlmamba.presets import PRESETS

FOLDER = tests_folder()
if not (FOLDER / MARKER).is_file():
    print(f"fetch_transformers_tests: {fetch()}")  # once: later runs find them in the cache folder
if not (FOLDER / MARKER).is_file():
    pytest.skip(
        f"transformers' common tests are not in {FOLDER} and could not be fetched (it needs network once; "
        "`python tests/fetch_transformers_tests.py` says why)",
        allow_module_level=True,
    )
pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (pip install it)")

# The sdist's `tests/` folder, importable as a package that does not clash with this repository's tests.
PACKAGE = "transformers_common_tests"
# Modules that test_modeling_common.py imports and the sdist lacks, with the mixin each must define.
STAND_INS = {"generation.test_utils": "GenerationTesterMixin", "exporters.test_export": "ExportTesterMixin"}


def _module(name: str, package: bool = False) -> types.ModuleType:
    module = sys.modules.get(name) or types.ModuleType(name)
    if package and not hasattr(module, "__path__"):
        module.__path__ = []
    sys.modules[name] = module
    return module


def _import_common():
    root = _module(PACKAGE, package=True)
    root.__path__ = [str(FOLDER / "tests")]
    for relative, mixin in STAND_INS.items():
        if (FOLDER / "tests" / (relative.replace(".", "/") + ".py")).is_file():
            continue  # a later distribution that ships it: use the real one
        parent, _ = relative.rsplit(".", 1)
        if not (FOLDER / "tests" / parent).is_dir():
            _module(f"{PACKAGE}.{parent}", package=True)
        stand_in = _module(f"{PACKAGE}.{relative}")
        setattr(stand_in, mixin, type(mixin, (), {"__doc__": "Stand-in: the distribution lacks this module."}))
    with warnings.catch_warnings():  # its marks (flash_attn_test, ...) are registered by transformers' conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")


_common = _import_common()
ModelTesterMixin = _common.ModelTesterMixin
GenerationTesterMixin = importlib.import_module(f"{PACKAGE}.generation.test_utils").GenerationTesterMixin
floats_tensor, ids_tensor = _common.floats_tensor, _common.ids_tensor


class MLMambaModelTester:
    """A tiny config of one family (its preset with 2 layers in each encoder and in the language model, which is
    32 wide over 99 tokens) and LLaVA's tester's inputs: each row one image, its image tokens first, then text.
    `pixel_values` are (batch, 3 * encoders, size, size): the encoders' channels stacked, as the processor gives."""

    def __init__(self, parent, preset: str, batch_size=3, text_seq_length=7, vocab_size=99, hidden_size=32):
        self.parent = parent
        self.preset = preset
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = 2  # the language model's
        self.vision_config = {"num_hidden_layers": 2}  # each vision encoder's, as LLaVA's tester says it
        self.image_token_id = 0  # as LLaVA's tester: ids 0 and 1 stay out of the random text
        self.pad_token_id = 1
        self.is_training = True
        config = self.get_config()
        self.num_image_tokens = config.num_image_tokens
        self.num_channels = 3 * len(config.vision_config.encoders)
        self.image_size = config.vision_config.image_size
        self.seq_length = text_seq_length + self.num_image_tokens
        self.encoder_seq_length = self.seq_length

    def get_config(self) -> MLMambaConfig:
        parts = PRESETS[self.preset]()
        for encoder in parts["vision_config"]["encoders"]:
            encoder["num_hidden_layers"] = self.vision_config["num_hidden_layers"]
        parts["text_config"].update(
            n_layer=self.num_hidden_layers, d_model=self.hidden_size, vocab_size=self.vocab_size
        )
        if parts["text_config"].get("ssm_layer", "Mamba2") == "Mamba2":
            parts["text_config"].update(headdim=16, chunk_size=8)
        parts.update(image_token_id=self.image_token_id, pad_token_id=self.pad_token_id)
        return MLMambaConfig(**parts)

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return config, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, : self.num_image_tokens] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def _auto_names_patches():
    """transformers' tests find a built-in model's heads by class name in `modeling_auto.*_MAPPING_NAMES` (which
    tests build `labels`, check `shift_labels`, ...). Name this package's classes there for the Auto classes that
    `import mlmamba` registered them with (AutoModel, AutoModelForImageTextToText, ...), and no others."""
    patches = []
    for name in dir(modeling_auto):
        lazy = getattr(modeling_auto, name.removesuffix("_NAMES"), None) if name.endswith("_MAPPING_NAMES") else None
        registered = getattr(lazy, "_extra_content", {}).get(MLMambaConfig)
        if registered is not None:
            names = {MLMambaConfig.model_type: registered.__name__}
            patches.append(unittest.mock.patch.dict(getattr(modeling_auto, name), names))
    return patches


class _FamilyTest(ModelTesterMixin, GenerationTesterMixin):
    """The flags that transformers 5.24's ModelTesterMixin reads, as its Mamba / Mamba2 (attention-free language
    model) and LLaVA (composite) testers set them. (test_pruning, test_head_masking, fx_compatible,
    test_torchscript: no longer read; `_is_stateful` is the model class's own flag.)"""

    preset = None
    all_model_classes = (MLMambaModel, MLMambaForConditionalGeneration)
    has_attentions = False  # Mamba, Mamba2: "Mamba does not support attentions" (the language model)
    test_missing_keys = False  # Mamba, Mamba2
    _is_composite = True  # LLaVA: vision tower + language model, each with its sub-config
    # The mixin runs this test for the models it dates 2023 or later by the "# Copyright YYYY" line of their
    # configuration file, which configuration_mlmamba.py does not have; Mamba, Mamba2 and LLaVA all run it.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = MLMambaModelTester(self, self.preset)
        for patch in _auto_names_patches():
            patch.start()
            self.addCleanup(patch.stop)

    def test_attn_implementation_composite_models(self):
        # `has_attentions = False` skips it, but the vision encoders have attention: run it as for LLaVA.
        with unittest.mock.patch.object(self, "has_attentions", True):
            super().test_attn_implementation_composite_models()


class MLMambaCommonTest(_FamilyTest, unittest.TestCase):
    preset = "mlmamba-tiny"  # Mamba-2 LM, MSC connector, DINOv2 + SigLIP


class CobraCommonTest(_FamilyTest, unittest.TestCase):
    preset = "cobra-tiny"  # Mamba-1 LM, MLP projector, DINOv2 + SigLIP


class VLMambaCommonTest(_FamilyTest, unittest.TestCase):
    preset = "vlmamba-tiny"  # Mamba-1 LM, VSS connector with the cross scan, CLIP
