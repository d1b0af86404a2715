"""mlmamba-chat (mlmamba/chat.py): its streamed answers are the greedy answers of `model.generate()` on the chat
template, one-shot and in a conversation read from stdin; the image changes the answer; bad arguments get clear
errors before anything loads; a random-weight folder gets a warning.

The answers are compared with generate() on the in-memory model, with inputs built by the processor directly
(conftest's `chat_inputs`, or the messages written out here), not through the command's own code."""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS4_PYTHON, chat_inputs
from PIL import Image

from mlmamba import chat
from mlmamba.chat import main
from mlmamba.convert import main as convert_main
from mlmamba.convert import save_folder

REPO = Path(__file__).resolve().parent.parent
QUESTION, FOLLOW_UP = "What is in the image?", "Which digit is this?"
TOKENS = 8


@pytest.fixture(scope="module")
def remembering(family, tmp_path_factory):
    """`family` (unit-scale weights) with a slow state decay, and its folder. With unit-scale dt each token
    keeps about half of the state, so nothing of an image 20-40 tokens back reaches the answer and every image
    gives the same one; at dt ~ 0.01 (softplus(-5)) the answer depends on the image and the earlier turns."""
    model, processor = family
    model = copy.deepcopy(model)  # the session's fixture stays as it is
    with torch.no_grad():
        for name, param in model.model.language_model.named_parameters():
            if name.endswith(("dt_bias", "dt_proj.bias")):  # Mamba-2, Mamba-1
                param.fill_(-5.0)
    return model, processor, save_folder(model, processor, tmp_path_factory.mktemp("remembering"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two image files (PNG: read back pixel for pixel), by name."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, colour in (("black", (0, 0, 0)), ("white", (255, 255, 255))):
        paths[name] = folder / f"{name}.png"
        Image.new("RGB", (60, 48), colour).save(paths[name])
    return paths


def greedy(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :]


def answer(model, processor, question, image_path) -> str:
    """The reference: generate() on the one-turn chat template, decoded."""
    inputs = chat_inputs(processor, question, Image.open(image_path).convert("RGB"))
    return processor.decode(greedy(model, inputs), skip_special_tokens=True)


def follow_up_answer(model, processor, image_path, first_answer: str) -> str:
    """The reference second answer: generate() on the two-turn conversation, the first answer in its history."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": FOLLOW_UP},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image_path).convert("RGB"), text=prompt)
    return processor.decode(greedy(model, inputs), skip_special_tokens=True)


def run_chat(capsys, *args, stdin: str | None = None, monkeypatch=None):
    """Run `main` in this process; (stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    main([*map(str, args), "--device", "cpu", "--max-new-tokens", str(TOKENS)])
    return capsys.readouterr()


def test_one_answer_is_generates_greedy_answer_and_depends_on_the_image(remembering, images, capsys):
    model, processor, folder = remembering
    answers = {}
    for name, path in images.items():
        out, err = run_chat(capsys, folder, "--image", path, "--question", QUESTION)
        answers[name] = answer(model, processor, QUESTION, path)
        assert out == answers[name] + "\n"  # streamed by TextStreamer, the newline at its end
        assert "random weights" not in err  # a model card that does not say so: no warning
    assert answers["black"] != answers["white"]  # the image reaches the answer


def test_a_conversation_from_stdin_keeps_the_earlier_turns(remembering, images, capsys, monkeypatch):
    model, processor, folder = remembering
    out, _ = run_chat(
        capsys, folder, "--image", images["black"], stdin=f"{QUESTION}\n{FOLLOW_UP}\n", monkeypatch=monkeypatch
    )
    first = answer(model, processor, QUESTION, images["black"])
    second = follow_up_answer(model, processor, images["black"], first)
    assert out == f"{first}\n{second}\n"  # no prompt on a pipe: the answers alone
    # the history is really there: asked on its own, the follow-up gets another answer
    assert second != answer(model, processor, FOLLOW_UP, images["black"])


@pytest.mark.parametrize("family", ["mlmamba-tiny"], indirect=True)
def test_the_console_command_switches_images_and_ends_at_an_empty_line(remembering, images):
    """`python -m mlmamba.chat` with piped stdin: `/image` starts a new conversation about another image."""
    model, processor, folder = remembering
    stdin = f"{QUESTION}\n/image {images['white']}\n{QUESTION}\n\nnever asked\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "mlmamba.chat", str(folder), "--image", str(images["black"]), "--device", "cpu"]
        + ["--max-new-tokens", str(TOKENS)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    black, white = (answer(model, processor, QUESTION, images[name]) for name in ("black", "white"))
    assert run.stdout == f"{black}\n{white}\n"
    assert f"a new conversation about {images['white']}" in run.stderr


def test_a_random_weight_folder_gets_a_warning(tmp_path, capsys):
    folder = tmp_path / "random"
    convert_main(["--random", "--preset", "mlmamba-tiny", "--output", str(folder)])
    capsys.readouterr()
    out, err = run_chat(capsys, folder, "--question", "Hello")
    assert f"warning: {folder} has random weights" in err
    assert out.endswith("\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["{model}", "--image", "{tmp}/missing.png", "--question", "Hi"],
            "--image: no such image file: {tmp}/missing.png",
        ),
        (["{tmp}", "--question", "Hi"], "{tmp} is not a model folder: it has no config.json"),
        (["{tmp}/missing-folder", "--question", "Hi"], "no such model folder: {tmp}/missing-folder"),
        (
            ["{model}", "--image", "{tmp}/notes.txt", "--question", "Hi"],
            "--image: cannot read an image from {tmp}/notes.txt",
        ),
        (["{model}", "--temperature", "0.7", "--question", "Hi"], "--temperature need(s) --do-sample"),
        (["{model}", "--question", " "], "--question is empty"),
    ],
)
def test_clear_errors_before_loading(tiny_folder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(chat, "load", not_loaded)
    (tmp_path / "notes.txt").write_text("not an image")
    fill = {"model": tiny_folder, "tmp": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**fill) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"mlmamba-chat: error: {message.format(**fill)}" in err, err


def not_loaded(*args):
    raise AssertionError("the model was loaded before the arguments were refused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_a_device_that_is_not_there(tiny_folder, capsys, monkeypatch):
    monkeypatch.setattr(chat, "load", not_loaded)
    with pytest.raises(SystemExit):
        main([str(tiny_folder), "--device", "cuda", "--question", "Hi"])
    assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err


def test_a_dtype_the_gpu_cannot_take(tiny_folder, capsys, monkeypatch):
    """bfloat16 on a GPU without it (a T4, say) is refused; auto takes float16 there. (The GPU is pretended.)"""
    monkeypatch.setattr(chat, "load", not_loaded)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    with pytest.raises(SystemExit):
        main([str(tiny_folder), "--device", "cuda", "--dtype", "bfloat16", "--question", "Hi"])
    assert "--dtype bfloat16: Tesla T4 has no bfloat16; use float16" in capsys.readouterr().err
    parser = chat.build_parser()
    assert chat.pick_dtype(parser, "auto", chat.pick_device(parser, "auto")) == torch.float16


@pytest.mark.transformers4
@pytest.mark.parametrize("family", ["cobra-tiny"], indirect=True)
def test_the_same_answer_under_transformers_4(remembering, images, tmp_path):
    """The command runs under the last 4.x line too (the package from this checkout, the model code from the
    folder), and answers as generate() does here."""
    model, processor, folder = remembering
    run = subprocess.run(
        [
            TRANSFORMERS4_PYTHON,
            "-m",
            "mlmamba.chat",
            str(folder),
            "--image",
            str(images["white"]),
            "--question",
            QUESTION,
        ]
        + ["--device", "cpu", "--max-new-tokens", str(TOKENS)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == answer(model, processor, QUESTION, images["white"]) + "\n"
