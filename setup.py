from pathlib import Path

from setuptools import find_packages, setup

# Lower bounds are the versions the tests ran with (assistant-only loss on image data needs TRL's
# vision collator of the 1.x line and transformers >= 5.18 for its chat-template masks).
TRAIN = ["trl>=1.16", "peft>=0.21", "datasets>=4.0", "accelerate>=1.15"]

setup(
    name="mlmamba",
    version="0.1.0",
    description="ML-Mamba, VL-Mamba and Cobra: Mamba multimodal LLMs as Hugging Face transformers models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mlmamba", "mlmamba.*"]),
    package_data={"mlmamba": ["chat_template.jinja"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.57,<6",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "tokenizers>=0.21",
        "numpy",
        "pillow",
    ],
    extras_require={
        "train": TRAIN,
        "kernels": ["mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        # no timm here: it pulls torchvision, which replaces the pinned CPU torch with a CUDA build
        "dev": ["pytest>=8", "parameterized>=0.9", "ruff>=0.15", "scikit-learn", "scikit-image", *TRAIN],
    },
    entry_points={"console_scripts": ["mlmamba-convert=mlmamba.convert:main"]},
)
