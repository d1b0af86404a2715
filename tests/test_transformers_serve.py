"""`transformers serve` cannot serve a saved folder, with `--trust-remote-code` or without, and nothing the
folder or the package could carry changes that: these tests run transformers' own serving code (no mock).

The server's `ModelManager._load_model` tries `AutoModelForDecision`, then `AutoModelForMultimodalLM` only for the
`model_type`s of transformers' built-in table, and otherwise looks `config.architectures[0]` up as an attribute of
the `transformers` module, which a remote-code class never is (importing `mlmamba` registers the Auto classes, not
module attributes). A folder that names the class under the one model `auto_map` entry the server reads for such a
`model_type` (`AutoModelForDecision`) does load, but every request then fails in `ModelManager.get_model_modality`,
which accepts only the class names of transformers' built-in tables. When one of these tests fails, transformers
has started to serve remote-code models: update the README's "Serving" section and turn this file into a test of
the served answer.

From transformers 5.25 the loading is `ModelLoader._load_model` (each model in a process of its own), which no
longer reads `AutoModelForDecision` either: that folder is refused at loading too.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

ARCHITECTURE = "MLMambaForConditionalGeneration"
NO_ATTRIBUTE = f"module transformers has no attribute {ARCHITECTURE}"  # the documented failure


def _serve_available() -> bool:
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:  # a transformers older than the `transformers serve` of `transformers/cli/serving/`
        return False
    return is_serve_available() and importlib.util.find_spec("transformers.cli.serving") is not None


pytestmark = pytest.mark.skipif(
    not _serve_available(),
    reason="`transformers serve` needs its optional dependencies: pip install 'transformers[serving]' "
    "(fastapi, uvicorn, openai, pydantic)",
)


class _ServerLoader:
    """The server's own loading and modality check: `ModelManager` itself up to transformers 5.24, its
    `ModelLoader` from 5.25 (where models load in a process of their own, with a copy of the loader)."""

    def __init__(self):
        from transformers.cli.serving import model_manager

        if hasattr(model_manager, "ModelLoader"):
            self.loader, self.manager = model_manager.ModelLoader(device="cpu", trust_remote_code=True), None
        else:  # model_timeout=-1: no unload timer left running after the test
            self.manager = model_manager.ModelManager(device="cpu", trust_remote_code=True, model_timeout=-1)
            self.loader = None

    def load(self, folder):
        if self.loader is not None:
            return self.loader.load_model_and_processor(str(folder))
        return self.manager.load_model_and_processor(self.manager.process_model_name(str(folder)))

    def modality(self, model, processor):  # up to 5.24 only: 5.25 refuses these folders at loading
        return self.manager.get_model_modality(model, processor=processor)

    def shutdown(self):
        if self.manager is not None:
            self.manager.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_serve_command_stops_at_the_architecture_lookup(tiny_folder, tmp_path):
    """What a user runs: the server preloads the pinned folder at start and exits with the AttributeError."""
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_folder)]
    command += ["--trust-remote-code", "--device", "cpu", "--host", "127.0.0.1", "--port", str(_free_port())]
    env = {**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = server.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        server.kill()  # this server only, by its PID
        server.communicate()
        pytest.fail("`transformers serve` now starts with the folder: it serves remote code, update the docs")
    assert server.returncode != 0
    assert f"AttributeError: {NO_ATTRIBUTE}" in stderr, stderr[-2000:]


def test_importing_the_package_first_does_not_help(tiny_folder):
    """`mlmamba` is imported here (conftest), so its classes are registered with the Auto classes: the server's
    loader, called from Python as a launcher script would, still fails at the same line."""
    import transformers

    import mlmamba  # noqa: F401  (registers the classes with the Auto classes, as a launcher script would)

    assert not hasattr(transformers, ARCHITECTURE)  # registered with the Auto classes, not as a module attribute
    manager = _ServerLoader()
    try:
        with pytest.raises(AttributeError, match=NO_ATTRIBUTE):
            manager.load(tiny_folder)
    finally:
        manager.shutdown()


def test_a_folder_the_server_loads_is_refused_at_every_request(tiny_folder, tmp_path):
    """For a `model_type` outside transformers' tables, the only model `auto_map` entry the server reads is
    `AutoModelForDecision`: a folder naming the model there loads, but the modality check that every chat,
    completion and response request runs rejects its class name."""
    folder = shutil.copytree(tiny_folder, tmp_path / "decision-folder")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForDecision"] = f"modeling_mlmamba.{ARCHITECTURE}"
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    manager = _ServerLoader()
    try:
        if manager.loader is not None:  # transformers >= 5.25 no longer reads that entry: refused at loading
            with pytest.raises(AttributeError, match=NO_ATTRIBUTE):
                manager.load(folder)
            return
        model, processor = manager.load(folder)
        assert type(model).__name__ == ARCHITECTURE
        with pytest.raises(ValueError, match=f"Unknown modality for: {ARCHITECTURE}"):
            manager.modality(model, processor)
    finally:
        manager.shutdown()
