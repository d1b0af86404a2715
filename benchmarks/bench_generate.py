"""Side-by-side generation benchmark: prefill time, decode tokens/s and peak memory in ONE run.

    python benchmarks/bench_generate.py                       # CPU: mamba2-130m size, prompts 829 and 2048
    python benchmarks/bench_generate.py --size 2.7b --device cuda --prompts 1024 8192 32768 --batch 1 8 --repeats 1

Implementations, all with the same random weights where they share an architecture:
  ours        MLMambaForConditionalGeneration (text-only prompt), state cache, torch or kernels path
  ours-graph  the same, each decoding step replayed from a CUDA graph (`enable_decode_graphs`; CUDA default)
  hf-mamba2   transformers' Mamba2ForCausalLM holding the same language-model weights
  phi         a transformer of the same width and depth class (PhiForCausalLM, sdpa), its KV cache

Prefill = time to the first generated token; decode tokens/s from the time stamps of the following
tokens (a stopping criterion records them). The prefill limit counts 2 FLOPs per weight and token
(embeddings and head excluded) plus the sequence mixing: the SSM recurrence, 4 FLOPs per state element
and token, or causal attention, 2 * prompt * hidden per token and layer. Each measurement runs in its
own subprocess after a warm-up generate() at the same shape; `--repeats` runs (interleaved across the
rows) give the median. Its peak memory is that of the timed generate() with the
model loaded (CPU: peak resident set size, VmHWM, restarted after the warm-up once the model stands
alone in the process; CUDA: max_memory_allocated). The run also measures the
machine's own limits: matmul FLOP/s (2048 x 2048) and matrix-vector bandwidth, over the language
model's weight matrices read in turn as a decoding step reads them (also printed: over the output layer
alone, which a large CPU cache can hold between repeats, so it overstates what decoding can stream), and
prints each figure's ratio to the limit it is bound by:
  prefill limit = model FLOPs / matmul FLOP/s        decode limit = bytes of weights / streaming read
The streaming read (a sum over each of those matrices in turn) is the honest decode limit: no
matrix-vector kernel reads the weights faster. Threads: torch's default (one per core); the rows
run one at a time, each in its own process, so none competes with another for the cores, and with
OMP_WAIT_POLICY=PASSIVE unless `--omp-wait-policy` says otherwise (every row alike).
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {
    # d_model, layers, d_state, headdim, vocab   (mamba2-130m / mamba2-2.7b)
    "130m": dict(d_model=768, n_layer=24, d_state=128, headdim=64, vocab_size=50288),
    "2.7b": dict(d_model=2560, n_layer=64, d_state=128, headdim=64, vocab_size=50288),
}
PHI = {  # transformers of comparable size: hidden, layers, heads, intermediate
    "130m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240),
}


def build(impl: str, size: str, device: str, dtype: torch.dtype, **text_overrides):
    """One implementation at a named size (`text_overrides` replace language-model fields, e.g. n_layer=6),
    in eval mode; `ours` and `hf-mamba2` hold the same weights."""
    torch.manual_seed(0)
    from mlmamba import MLMambaConfig, MLMambaForConditionalGeneration
    from mlmamba.presets import PRESETS

    text = dict(SIZES[size], chunk_size=256, **text_overrides)
    tiny = PRESETS["mlmamba-tiny"]()
    config = MLMambaConfig(
        vision_config=tiny["vision_config"],
        connector_config=tiny["connector_config"],
        text_config=text,
        image_token_id=50277,
    )
    if impl in ("ours", "ours-graph", "hf-mamba2"):
        ours = MLMambaForConditionalGeneration(config).to(device, dtype).eval()
        if impl == "ours":
            return ours
        if impl == "ours-graph":
            return ours.enable_decode_graphs()
        from transformers import Mamba2Config, Mamba2ForCausalLM

        d_inner = 2 * text["d_model"]
        hf = Mamba2ForCausalLM(
            Mamba2Config(
                num_heads=d_inner // text["headdim"],
                head_dim=text["headdim"],
                vocab_size=text["vocab_size"],
                hidden_size=text["d_model"],
                state_size=text["d_state"],
                num_hidden_layers=text["n_layer"],
                n_groups=1,
                expand=2,
                chunk_size=256,
                tie_word_embeddings=True,
            )
        )
        sd = {
            "backbone." + k.replace("embedding.", "embeddings."): v
            for k, v in ours.model.language_model.state_dict().items()
        }
        hf.load_state_dict(sd, strict=False)
        hf.tie_weights()
        return hf.to(device, dtype).eval()
    from transformers import PhiConfig, PhiForCausalLM

    phi = PhiForCausalLM(PhiConfig(vocab_size=text["vocab_size"], attn_implementation="sdpa", **PHI[size]))
    return phi.to(device, dtype).eval()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_cpu_peak() -> bool:
    """Free what is unreferenced, give it back to the OS, and restart the peak RSS count from now (Linux);
    False where the peak cannot be reset."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(impl, size, device, dtype_name, prompt, batch, new_tokens):
    dtype = getattr(torch, dtype_name)
    model = build(impl, size, device, dtype)
    # The language model only: a decoding step reads every weight once, except an input embedding
    # that is not also the output layer (one row of it is read).
    lm = [(n, p) for n, p in model.named_parameters() if "vision_tower" not in n and "connector" not in n]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding is head
    weight_bytes = sum(p.numel() * p.element_size() for _, p in lm if tied or p is not embedding)
    # prefill FLOPs: every weight but the embeddings and the head (computed for the last token only)
    n_params = sum(p.numel() for _, p in lm if p is not embedding and p is not head)
    # plus the sequence mixing that has no weights: the SSM recurrence (x B^T into the state and C out of it,
    # 4 FLOPs per state element and token) or causal attention (QK^T and AV, 2 * prompt * hidden per token)
    if impl == "phi":
        mixing_flops = PHI[size]["num_hidden_layers"] * batch * 2 * prompt * prompt * PHI[size]["hidden_size"]
    else:
        c = SIZES[size]
        mixing_flops = c["n_layer"] * batch * prompt * 4 * 2 * c["d_model"] * c["d_state"]
    ids = torch.randint(0, 50000, (batch, prompt), device=device)
    from transformers import StoppingCriteria

    class Clock(StoppingCriteria):
        """Time stamps of every generated token (generate() asks after each one)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            sync(device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with torch.no_grad():
        # Warm-up at the measured shape: Triton compiles and autotunes per shape, and a CPU process maps the
        # memory of its first long prompt once (every implementation gets the same warm-up).
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:  # the peak of this generate() alone, not of building the model (hf-mamba2 copies ours)
            reset = reset_cpu_peak()
        clock = Clock()
        sync(device)
        start = time.perf_counter()
        model.generate(
            input_ids=ids,
            max_new_tokens=new_tokens + 1,
            min_new_tokens=new_tokens + 1,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            stopping_criteria=[clock],
        )
        prefill = clock.times[0] - start  # the prompt and the first token
        decode_s = clock.times[-1] - clock.times[0]  # new_tokens decoding steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = rss_kib("VmHWM") / 2**20 if reset else float("nan")
    return dict(
        impl=impl,
        prompt=prompt,
        batch=batch,
        prefill_ms=prefill * 1e3,
        decode_tps=batch * new_tokens / decode_s,
        peak_gib=peak,
        n_params=n_params,
        mixing_flops=mixing_flops,
        weight_bytes=weight_bytes,
    )


def _matvec_bandwidth(weights, device, repeats, product=lambda v, w: v @ w.T):
    """Bytes per second of `product(x, w)` (default `x @ w.T`) over the matrices in turn (what a decoding step
    does with its weights)."""
    vectors = [torch.randn(1, w.shape[1], device=device, dtype=w.dtype) for w in weights]
    for w, v in zip(weights, vectors):
        product(v, w)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        for w, v in zip(weights, vectors):
            product(v, w)
    sync(device)
    return repeats * sum(w.numel() * w.element_size() for w in weights) / (time.perf_counter() - t)


def _stream_bandwidth(weights, device, repeats):
    """Bytes per second of one streaming read of the matrices in turn (a sum of each): what any decoding
    step must at least do with its weights, whatever its matrix-vector kernel."""
    for w in weights:
        w.sum()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            w.sum()
    sync(device)
    return repeats * sum(w.numel() * w.element_size() for w in weights) / (time.perf_counter() - t)


def machine_limits(device, dtype, size):
    """matmul FLOP/s (2048 x 2048), and matrix-vector bandwidth twice: over the output layer alone (it can
    stay in a large CPU cache between repeats) and over one matrix per weight matrix of the language model at
    `size`, read in turn as a decoding step reads them (they cannot)."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync(device)
    flops = 10 * 2 * 2048**3 / (time.perf_counter() - t)
    c = SIZES[size]
    d, d_inner = c["d_model"], 2 * c["d_model"]
    head = [torch.randn(c["vocab_size"], d, device=device, dtype=dtype)]
    head_bandwidth = _matvec_bandwidth(head, device, repeats=20)
    layers = [(2 * d_inner + 2 * c["d_state"] + d_inner // c["headdim"], d), (d, d_inner)] * c["n_layer"]
    model = head + [torch.randn(shape, device=device, dtype=dtype) for shape in layers]
    model_bandwidth = _matvec_bandwidth(model, device, repeats=5)
    # oneDNN's linear on the same weights as they lie (an alternative to MKL's product on CPU)
    onednn = None
    if device == "cpu" and torch.backends.mkldnn.is_available():
        linear = torch.ops.mkldnn._linear_pointwise
        onednn = _matvec_bandwidth(model, device, 5, lambda v, w: linear(v, w, None, "none", [], ""))
    stream = _stream_bandwidth(model, device, repeats=5)
    del model, head
    if device == "cuda":
        torch.cuda.empty_cache()
    return flops, head_bandwidth, model_bandwidth, onednn, stream


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="130m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--prompts", type=int, nargs="+", default=[829, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--impls", nargs="+", default=None, help="default: ours hf-mamba2 phi, and ours-graph on CUDA")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each row, interleaved across rows; the median is reported (default 3)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every measured row (default PASSIVE: OpenMP threads sleep at barriers instead "
        "of spinning, which on cores shared with other jobs was 4-5 times faster; '' keeps the environment's)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    dtype_name = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.impls is None:
        args.impls = ["ours", *(["ours-graph"] if args.device == "cuda" else []), "hf-mamba2", "phi"]
    if args.one:
        impl, prompt, batch = args.one.split(",")
        print(json.dumps(measure(impl, args.size, args.device, dtype_name, int(prompt), int(batch), args.new_tokens)))
        return

    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when OpenMP loads: it applies to the rows only
    flops, head_bandwidth, matvec, onednn, bandwidth = machine_limits(
        args.device, getattr(torch, dtype_name), args.size
    )
    print(
        f"machine: {args.device}, {dtype_name}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'unset')} in the rows "
        f"({os.environ.get('OMP_WAIT_POLICY', 'unset')} for the limits); matmul {flops / 1e9:.0f} GFLOP/s; "
        f"streaming read {bandwidth / 1e9:.1f} GB/s over a {args.size} model's weight matrices in turn "
        f"(the decode limit); matrix-vector over them {matvec / 1e9:.1f} GB/s (x @ w.T)"
        + (f", {onednn / 1e9:.1f} GB/s (oneDNN linear)" if onednn else "")
        + f", {head_bandwidth / 1e9:.1f} GB/s repeating the output layer alone"
    )
    cases = [(prompt, batch, impl) for prompt in args.prompts for batch in args.batch for impl in args.impls]
    runs = {case: [] for case in cases}
    for repeat in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every row alike
        for prompt, batch, impl in cases:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                f"{impl},{prompt},{batch}",
                "--size",
                args.size,
                "--device",
                args.device,
                "--dtype",
                dtype_name,
                "--new-tokens",
                str(args.new_tokens),
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode:
                tail = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"
                runs[(prompt, batch, impl)].append(dict(impl=impl, prompt=prompt, batch=batch, error=tail[:80]))
            else:
                runs[(prompt, batch, impl)].append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"(run {repeat + 1} of {args.repeats} done)", flush=True)
    rows = [_median(results) for results in runs.values()]
    print(f"\nmedians of {args.repeats} runs (spread min-max):")
    for row in rows:
        print(_fmt(row, flops, bandwidth))
    print("\nratios (ours / other; > 1 means ours is better):")
    for prompt in args.prompts:
        for batch in args.batch:
            by = {r["impl"]: r for r in rows if r["prompt"] == prompt and r["batch"] == batch and "error" not in r}
            if "ours" not in by:
                continue
            for other in (i for i in by if i != "ours"):
                o, x = by["ours"], by[other]
                print(
                    f"  prompt {prompt:>6} batch {batch}: vs {other:<9} "
                    f"prefill x{x['prefill_ms'] / o['prefill_ms']:.2f}"
                    f"  decode x{o['decode_tps'] / x['decode_tps']:.2f}"
                    f"  peak memory x{x['peak_gib'] / o['peak_gib']:.2f}"
                )


def _median(results):
    """One row from the repeats of a measurement: the median of each figure, and the spread of the timings."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    row = dict(ok[0])
    for key in ("prefill_ms", "decode_tps", "peak_gib"):
        values = [r[key] for r in ok]
        row[key] = statistics.median(values)
        row[key + "_range"] = (min(values), max(values))
    return row


def _fmt(r, flops, bandwidth):
    if "error" in r:
        return f"{r['impl']:<10} prompt {r['prompt']:>6} batch {r['batch']}: {r['error']}"
    prefill_limit = (2 * r["n_params"] * r["prompt"] * r["batch"] + r["mixing_flops"]) / flops * 1e3
    decode_limit = bandwidth / r["weight_bytes"] * r["batch"]
    spread = ""
    if "prefill_ms_range" in r:
        (p0, p1), (d0, d1) = r["prefill_ms_range"], r["decode_tps_range"]
        spread = f"  [prefill {p0:.0f}-{p1:.0f} ms, decode {d0:.1f}-{d1:.1f}]"
    return (
        f"{r['impl']:<10} prompt {r['prompt']:>6} batch {r['batch']}: prefill {r['prefill_ms']:8.0f} ms "
        f"(limit {prefill_limit:6.0f} ms, {prefill_limit / r['prefill_ms']:4.0%})  "
        f"decode {r['decode_tps']:7.1f} tok/s "
        f"(limit {decode_limit:6.1f}, {r['decode_tps'] / decode_limit:4.0%})  peak {r['peak_gib']:.2f} GiB{spread}"
    )


if __name__ == "__main__":
    main()
