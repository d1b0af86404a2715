"""Serving benchmark: vLLM's OpenAI-compatible server (through the mlmamba plugin) against transformers' `generate()`
serving the same requests one by one, on the same weights.

    .venv-vllm/bin/python benchmarks/bench_serve.py                      # CPU, "small" size, 1, 4 and 16 clients
    .venv-vllm/bin/python benchmarks/bench_serve.py --size tiny --concurrency 1 4 --requests 8

Run it in the vLLM environment (vLLM and this package; see the README's "Serving" section). It writes a random-weight
ML-Mamba folder (`--size`: vision encoders, MSC connector, Mamba-2 language model), then for each number of
concurrent clients sends `--requests` chat requests (an image of its own and a question each, `--new-tokens` greedy
tokens, end-of-sequence ignored so that every answer has that length):
  vllm           the server (`python -m vllm.entrypoints.openai.api_server`) on 127.0.0.1, streamed through the
                 `openai` client with a base64 PNG; stopped by its PID at the end
  transformers   the folder loaded with AutoModelForImageTextToText in this process; the same clients, whose
                 requests a lock lets through one at a time (processor + generate(), as a simple server would)
Latency is a request's time from sending to its last token, time to first token (TTFT) to its first one; both
include waiting behind other clients. Throughput counts generated tokens over the wall time of all requests.
transformers runs first, the server after it, so that the two never share the CPU.
"""

import argparse
import base64
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = {
    # vision encoders (DINOv2 + SigLIP, shared geometry), then the connector and the language model
    "tiny": dict(preset="mlmamba-tiny"),
    "small": dict(
        vision=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, image_size=224),  # 16 x 16 patches
        connector=dict(connector_type="msc", num_layers=2, d_state=64, headdim=64, expand=2, chunk_size=64),
        text=dict(d_model=512, n_layer=8, d_state=64, headdim=64, expand=2, ngroups=1, chunk_size=64),
    ),
}
QUESTIONS = [
    "What is in the image?",
    "Describe the picture in detail.",
    "Which digit is this?",
    "How many people are there, and where are they standing?",
]


def build_folder(size: str, output: Path) -> Path:
    from mlmamba.convert import (
        TOKENIZER_VOCAB,
        _special_token_ids,
        build_model,
        build_tokenizer,
        model_and_processor,
        random_model,
        save_folder,
    )
    from mlmamba.presets import PRESETS

    spec = SIZES[size]
    if "preset" in spec:
        return save_folder(*random_model(spec["preset"], seed=0), output)
    from mlmamba import MLMambaConfig

    tokenizer = build_tokenizer(TOKENIZER_VOCAB["mlmamba-tiny"])
    parts = PRESETS["mlmamba-tiny"]()
    vision = parts["vision_config"]
    siglip_mlp = 4 * spec["vision"]["hidden_size"]
    vision["encoders"] = [
        dict(vision["encoders"][0], **spec["vision"]),
        dict(vision["encoders"][1], **spec["vision"], intermediate_size=siglip_mlp),
    ]
    config = MLMambaConfig(
        vision_config=vision,
        connector_config=spec["connector"],
        text_config=dict(parts["text_config"], **spec["text"]),
        **_special_token_ids(tokenizer),
    )
    model, processor = model_and_processor(build_model(config, torch.float32, seed=0), tokenizer)
    return save_folder(model, processor, output)


def make_requests(n: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.RandomState(0)
    return [
        (QUESTIONS[i % len(QUESTIONS)], Image.fromarray((rng.rand(240, 320, 3) * 255).astype("uint8")))
        for i in range(n)
    ]


def summarise(engine: str, concurrency: int, records: list[dict], wall: float) -> dict:
    latencies = sorted(r["end"] - r["start"] for r in records)
    return dict(
        engine=engine,
        concurrency=concurrency,
        requests=len(records),
        tokens=sum(r["tokens"] for r in records),
        wall=wall,
        tok_s=sum(r["tokens"] for r in records) / wall,
        req_s=len(records) / wall,
        latency=statistics.mean(latencies),
        p50=latencies[len(latencies) // 2],
        p90=latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
        ttft=statistics.mean(r["first"] - r["start"] for r in records),
    )


def measure(engine: str, ask, requests: list, concurrencies: list[int]) -> list[dict]:
    """One warm-up request, then per concurrency: that many clients, each sending the next request once its
    previous one is answered, summarised."""
    ask(requests[0])
    results = []
    for concurrency in concurrencies:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            records = list(pool.map(ask, requests))
        results.append(summarise(engine, concurrency, records, time.perf_counter() - start))
    return results


# ---- transformers ---------------------------------------------------------------------------------------------


def bench_transformers(folder: Path, requests: list, concurrencies: list[int], new_tokens: int) -> list[dict]:
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.generation.streamers import BaseStreamer

    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    lock = threading.Lock()  # one request at a time: generate() serves them one by one

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # the first call hands over the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    def ask(request) -> dict:
        question, image = request
        start = time.perf_counter()
        with lock:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            streamer = FirstToken()
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    streamer=streamer,
                )
        tokens = out.shape[1] - inputs["input_ids"].shape[1]
        return dict(start=start, first=streamer.first, end=time.perf_counter(), tokens=tokens)

    return measure("transformers", ask, requests, concurrencies)


# ---- vLLM's server --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, args, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "bench",
        "--trust-remote-code",
        "--dtype",
        args.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory-bytes",
        str(args.kv_cache_memory_bytes),
        "--max-num-seqs",
        str(max(args.concurrency)),
        *(["--enforce-eager"] if args.enforce_eager else []),
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent, start_new_session=True
        )
    deadline = start + args.startup_timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return process, f"http://127.0.0.1:{port}/v1", time.perf_counter() - start
        except OSError:
            time.sleep(2)
    stop_server(process)
    raise TimeoutError(f"the server did not start within {args.startup_timeout} s:\n{log_path.read_text()[-4000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to its PID; its process group (the engine processes) is killed if it has not gone after 30 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def bench_vllm(base_url: str, requests: list, concurrencies: list[int], new_tokens: int) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    urls = {id(image): data_url(image) for _, image in requests}  # encoded once, outside the timing

    def ask(request) -> dict:
        question, image = request
        content = [{"type": "image_url", "image_url": {"url": urls[id(image)]}}, {"type": "text", "text": question}]
        start, first, tokens = time.perf_counter(), None, 0
        stream = client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": content}],
            max_tokens=new_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": new_tokens},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return dict(start=start, first=first or end, end=end, tokens=tokens)

    return measure("vllm", ask, requests, concurrencies)


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'engine':<13}{'clients':>8}{'requests':>9}{'tokens':>8}{'wall s':>9}{'tok/s':>9}{'req/s':>8}"
        f"{'latency s':>11}{'p50 s':>8}{'p90 s':>8}{'TTFT s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["engine"])):
        print(
            f"{r['engine']:<13}{r['concurrency']:>8}{r['requests']:>9}{r['tokens']:>8}{r['wall']:>9.2f}"
            f"{r['tok_s']:>9.1f}{r['req_s']:>8.2f}{r['latency']:>11.2f}{r['p50']:>8.2f}{r['p90']:>8.2f}"
            f"{r['ttft']:>8.2f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per number of clients")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="the server's; transformers runs the folder's (float32)")
    parser.add_argument("--enforce-eager", action="store_true", help="the server without torch.compile")
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=512 * 2**20,
        help="the server's state cache (vLLM's CPU default, 92%% of RAM, is not free on a shared machine)",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(args.size, Path(tmp) / f"mlmamba-{args.size}")
        requests = make_requests(max(args.requests, max(args.concurrency)))
        rows = []
        if "transformers" in args.engines:
            rows += bench_transformers(folder, requests, args.concurrency, args.new_tokens)
            print(f"transformers: {torch.get_num_threads()} torch threads", flush=True)
        if "vllm" in args.engines:
            log_path = Path(tmp) / "server.log"
            process, base_url, startup = start_server(folder, args, log_path)
            try:
                print(f"vllm: server up in {startup:.0f} s", flush=True)
                rows += bench_vllm(base_url, requests, args.concurrency, args.new_tokens)
            finally:
                stop_server(process)
    size = SIZES[args.size].get("text", {}).get("d_model", "tiny")
    print(
        f"\nsize {args.size} (d_model {size}), {args.new_tokens} new tokens per request, "
        f"server dtype {args.dtype}{', eager' if args.enforce_eager else ''}"
    )
    print_table(rows)


if __name__ == "__main__":
    main()
