"""The README as a user reads it: its snippets run as written, top to bottom, and CI runs its two commands.

The Python snippets run in one namespace in a fresh folder (later snippets use the model and the processor of
earlier ones, as a reader would), after the README's own "get a model" command wrote `mlmamba-tiny` there and
beside a `photo.jpg`. The `mlmamba-chat` commands run in a shell, as written. The OpenAI client snippet needs a
vLLM server: tests/test_vllm.py runs it against its own (the line above the snippet says so).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent  # where pip put the console scripts of this environment


# A snippet that needs a server this suite does not start says so in the line above it, and names its test.
ELSEWHERE = "<!-- run by "


def _blocks(language: str, elsewhere: bool = False) -> list[str]:
    """The README's code blocks in `language`: those run here, or (`elsewhere`) those another test runs."""
    found = re.findall(rf"^([^\n]*)\n```{language}\n(.*?)^```", README, flags=re.M | re.S)
    return [code for above, code in found if above.startswith(ELSEWHERE) == elsewhere]


def _bash_lines() -> list[str]:
    return [line for block in _blocks("bash") for line in block.splitlines()]


def _shell(command: str, cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run(command, shell=True, cwd=cwd, env=env, input="", capture_output=True, text=True)
    assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_ci_runs_the_readmes_two_commands_exactly():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2, ci
    lines = _bash_lines()
    for command in commands:
        assert command in lines, f".ci/run runs a command the README does not show: {command}"
    assert "examples/demo.py" in commands[0] and "pytest" in commands[1] and "nox" in commands[1]


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory):
    """A fresh folder after the README's "get a model" command, with a photo in it."""
    folder = tmp_path_factory.mktemp("reader")
    (command,) = [line for line in _bash_lines() if line.startswith("mlmamba-convert --random")]
    _shell(command, folder)
    make_image(3, size=(120, 90)).save(folder / "photo.jpg")
    return folder


def test_python_snippets_run_as_written(reader_folder, monkeypatch):
    monkeypatch.chdir(reader_folder)
    namespace = {"__name__": "__readme__"}
    for snippet in _blocks("python"):
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert (reader_folder / "my-model" / "model.safetensors").is_file()
    assert (reader_folder / "my-lora" / "merged" / "model.safetensors").is_file()


def test_chat_commands_run_as_written(reader_folder):
    commands = [line for line in _bash_lines() if "mlmamba-chat " in line]
    assert commands, "the README shows no mlmamba-chat command"
    for command in commands:
        printed = _shell(command, reader_folder)
        assert printed.strip(), command  # random weights: some answer, not a particular one


def test_every_snippet_run_elsewhere_names_a_test_that_runs_it():
    for above in re.findall(rf"^({re.escape(ELSEWHERE)}.*)$", README, flags=re.M):
        test = re.search(r"tests/\S+\.py", above)
        assert test and "README" in (ROOT / test.group()).read_text(), above
