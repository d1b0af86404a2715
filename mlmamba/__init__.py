"""mlmamba: ML-Mamba (and its Mamba-family relatives) as Hugging Face transformers models.

Importing the package registers the classes with transformers' Auto classes, and marks them for
`save_pretrained` to copy their code into the model folder (so the folder loads with
`trust_remote_code=True` where this package is not installed).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from ._compat import AutoModelForMultimodalLM, AutoModelForVision2Seq
from .configuration_mlmamba import MLMambaConfig, MLMambaConnectorConfig, MLMambaTextConfig, MLMambaVisionConfig
from .image_processing_mlmamba import MLMambaImageProcessor
from .modeling_mlmamba import MLMambaCache, MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel
from .processing_mlmamba import MLMambaProcessor

__version__ = "0.1.0"

AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
for auto_class in (AutoModelForVision2Seq, AutoModelForMultimodalLM):
    if auto_class is not None:
        auto_class.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MLMambaConfig, slow_image_processor_class=MLMambaImageProcessor, exist_ok=True)
AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)

MLMambaConfig.register_for_auto_class()
MLMambaModel.register_for_auto_class("AutoModel")
MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MLMambaImageProcessor.register_for_auto_class("AutoImageProcessor")
MLMambaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "MLMambaCache",
    "MLMambaConfig",
    "MLMambaConnectorConfig",
    "MLMambaForConditionalGeneration",
    "MLMambaImageProcessor",
    "MLMambaModel",
    "MLMambaPreTrainedModel",
    "MLMambaProcessor",
    "MLMambaTextConfig",
    "MLMambaVisionConfig",
]
