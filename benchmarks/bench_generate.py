"""Side-by-side generation benchmark: prefill time, decode tokens/s and peak memory in ONE run.

    python benchmarks/bench_generate.py                       # CPU: mamba2-130m size, prompt 829, fp32 bf16 int8
    python benchmarks/bench_generate.py --llama-cpp PATH      # ... and llama.cpp's rows (see the README)
    python benchmarks/bench_generate.py --size 2.7b --device cuda --prompts 1024 8192 32768 --batch 1 8 --repeats 1

Implementations, all with the same random weights where they share an architecture:
  ours           MLMambaForConditionalGeneration (text-only prompt), state cache, eager torch or kernels path
  ours-compiled  the same, each decoding step compiled by inductor (`enable_decode_graphs()`; CPU)
  ours-prepacked the same with `enable_decode_graphs(prepack_weights=True)`: inductor's own matrix kernels (CPU)
  ours-graph     each decoding step replayed from a CUDA graph (`enable_decode_graphs()`; CUDA default)
  hf-mamba2      transformers' Mamba2ForCausalLM holding the same language-model weights (not in int8)
  phi            a transformer of the same width and depth class (PhiForCausalLM, sdpa), its KV cache (--impls)
  llama.cpp      llama.cpp's llama-bench on the same weights converted to GGUF by its convert_hf_to_gguf.py
                 (--llama-cpp: a llama.cpp source tree with build/bin/llama-bench); fp32 -> F32, bf16 -> F16,
                 int8 -> Q8_0. Its prefill and decode figures are its pp and tg tests (decode from an empty
                 state: a Mamba's step costs the same at any position).

Precisions (`--precisions`): fp32; bf16 (`dtype=torch.bfloat16`; the SSM state stays fp32); int8, the model
loaded through transformers' route with `quantization_config=mlmamba.quantization.int8_weight_only_config()`
(a TorchAoConfig): int8 weights with a scale per row for every linear layer and for the input embedding, which
the output layer is tied to (as Q8_0 quantizes both; at 130m its 39 MB of a step's 130 MB), bf16 activations.

Prefill = time to the first generated token; decode tokens/s from the time stamps of the following
tokens (a stopping criterion records them). Each measurement runs in its own subprocess after a warm-up
generate() at the same shape (which also compiles the compiled rows); `--repeats` runs (interleaved across
the rows, llama.cpp's included: one llama-bench run, after its own warm-up, per repeat) give the median.
Its peak memory is that of the timed generate() with the model loaded (CPU: peak resident set size, VmHWM,
restarted after the warm-up; CUDA: max_memory_allocated; llama.cpp: the peak resident set size of its whole
process).

Limits, measured in the same run: the prefill limit counts 2 FLOPs per weight and token (embeddings and head
excluded) plus the sequence mixing (the SSM recurrence, 4 FLOPs per state element and token, or causal
attention) over fp32 matmul FLOP/s (2048 x 2048). The decode limit is a streaming read: a sum over fp32
matrices as large as the fp32 model's weight matrices, read in turn (515 MB at 130m, beyond any L3 cache),
which no matrix-vector kernel can beat; each row's limit is that rate over its own weight bytes, and each row
also prints the rate at which it streamed its weights (bytes of weights x tokens/s), beside llama.cpp's.

Threads: torch's default (one per core) and llama.cpp's `-t` of the same number. OpenMP's wait policy is left
to the environment unless `--omp-wait-policy` sets it (every torch row alike): libgomp's default spins a
while at a barrier before sleeping, as llama.cpp's own thread pool polls; on cores shared with other busy
jobs, PASSIVE (sleep at once) was 4-5 times faster for the eager rows (docs/PERFORMANCE.md).
"""

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
    if impl.startswith("ours") or impl == "hf-mamba2":
        ours = MLMambaForConditionalGeneration(config).to(device, dtype).eval()
        if impl != "hf-mamba2":
            return with_decode_mode(ours, impl)
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


def with_decode_mode(model, impl: str):
    """`model` set up for the decoding of row `impl` (ours, ours-compiled, ours-prepacked, ours-graph)."""
    if impl in ("ours-compiled", "ours-graph"):
        return model.enable_decode_graphs()
    if impl == "ours-prepacked":
        return model.enable_decode_graphs(prepack_weights=True)
    return model


def load_int8(folder: str, impl: str, output_layer: bool = True):
    """Our model from `folder`, int8 weight-only through transformers' TorchAoConfig (see the docstring);
    `output_layer=False`: the plain `TorchAoConfig(Int8WeightOnlyConfig())`, which leaves it bf16."""
    from mlmamba import MLMambaForConditionalGeneration
    from mlmamba.quantization import int8_weight_only_config

    config = int8_weight_only_config(output_layer)
    model = MLMambaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=config)
    return with_decode_mode(model.eval(), impl)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: an int8 weight of torchao counts its int8 data and its scales."""
    if hasattr(t, "qdata"):
        return t.qdata.numel() * t.qdata.element_size() + t.scale.numel() * t.scale.element_size()
    return t.numel() * t.element_size()


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


def measure(impl, size, device, precision, prompt, batch, new_tokens, folder=None):
    if precision == "int8":
        model = load_int8(folder, impl)
    else:
        model = build(impl, size, device, PRECISIONS[precision])
    # The language model only: a decoding step reads every weight once, except an input embedding
    # that is not also the output layer (one row of it is read).
    lm = [(n, p) for n, p in model.named_parameters() if "vision_tower" not in n and "connector" not in n]
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding is head
    weight_bytes = sum(tensor_bytes(p) for _, p in lm if tied or p is not embedding)
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
        precision=precision,
        prompt=prompt,
        batch=batch,
        prefill_ms=prefill * 1e3,
        decode_tps=batch * new_tokens / decode_s,
        peak_gib=peak,
        n_params=n_params,
        mixing_flops=mixing_flops,
        weight_bytes=weight_bytes,
    )


def _stream_bandwidth(matrices, device, repeats):
    """Bytes per second of one streaming read of the matrices in turn (a sum of each): what any decoding
    step must at least do with its weights, whatever its matrix-vector kernel."""
    for w in matrices:
        w.sum()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        for w in matrices:
            w.sum()
    sync(device)
    return repeats * sum(w.numel() * w.element_size() for w in matrices) / (time.perf_counter() - t)


def machine_limits(device, size):
    """fp32 matmul FLOP/s (2048 x 2048), and the streaming read rate over fp32 matrices shaped as the language
    model's weight matrices at `size` (the output layer and every layer's in_proj and out_proj), in turn."""
    a = torch.randn(2048, 2048, device=device)
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
    shapes = [(c["vocab_size"], d)] + [
        (2 * d_inner + 2 * c["d_state"] + d_inner // c["headdim"], d),
        (d, d_inner),
    ] * c["n_layer"]
    matrices = [torch.randn(shape, device=device) for shape in shapes]
    stream = statistics.median(_stream_bandwidth(matrices, device, repeats=3) for _ in range(5))
    del matrices
    if device == "cuda":
        torch.cuda.empty_cache()
    return flops, stream


# ---- llama.cpp (optional rows) --------------------------------------------------------------------------

GGUF_TYPES = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}


class LlamaCpp:
    """llama-bench's prefill (pp) and decode (tg) on our weights converted by llama.cpp's own converter:
    `convert(precision)` once, then `measure(precision, prompt)` once per repeat (one llama-bench run, so that
    its repeats interleave with ours); an error row where a tool is missing or fails."""

    def __init__(self, llama_dir: Path, bench: Path | None, hf_folder: Path, work: Path, new_tokens, threads):
        self.dir, self.bench = llama_dir, bench or llama_dir / "build" / "bin" / "llama-bench"
        self.hf_folder, self.work, self.new_tokens, self.threads = hf_folder, work, new_tokens, threads
        self.errors = {}  # precision -> why its rows cannot run

    def gguf(self, precision: str) -> Path:
        return self.work / f"model-{GGUF_TYPES[precision]}.gguf"

    def convert(self, precision: str) -> None:
        convert = self.dir / "convert_hf_to_gguf.py"
        if not self.bench.exists() or not convert.exists():
            self.errors[precision] = f"no {self.bench} or {convert}: build llama-bench as the README says"
            return
        env = dict(os.environ, PYTHONPATH=str(self.dir / "gguf-py"))
        kind, out = GGUF_TYPES[precision], self.gguf(precision)
        cmd = [sys.executable, str(convert), str(self.hf_folder), "--outtype", kind, "--outfile", str(out)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            self.errors[precision] = (
                "convert_hf_to_gguf failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:80]
            )

    def measure(self, precision: str, prompt: int) -> dict:
        row = dict(impl="llama.cpp", precision=precision, prompt=prompt, batch=1)
        if precision in self.errors:
            return dict(row, error=self.errors[precision])
        cmd = [str(self.bench), "-m", str(self.gguf(precision)), "-p", str(prompt), "-n", str(self.new_tokens)]
        cmd += ["-t", str(self.threads), "-r", "1", "-o", "json"]
        returncode, peak_kib, out, err = _run_with_peak(cmd, self.work)
        if returncode:
            return dict(row, error=f"llama-bench exited {returncode}: " + err.strip()[-80:])
        tests = json.loads(out)
        pp = next(t for t in tests if t["n_prompt"] == prompt and t["n_gen"] == 0)
        tg = next(t for t in tests if t["n_gen"] == self.new_tokens and t["n_prompt"] == 0)
        return dict(
            row,
            prefill_ms=pp["avg_ns"] / 1e6,
            decode_tps=tg["avg_ts"],
            peak_gib=peak_kib / 2**20,
            weight_bytes=pp["model_size"],
            n_params=None,
        )


def _run_with_peak(cmd, work: Path):
    """Run `cmd`; its exit status, peak resident set size (KiB, from wait4), stdout and stderr."""
    out_path, err_path = work / "stdout", work / "stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss, out_path.read_text(), err_path.read_text()


def save_folder(impl: str, size: str, work: Path) -> Path:
    """`impl` (ours, or hf-mamba2 for llama.cpp's converter) in fp32, saved under `work`; the int8 rows load ours
    from there through TorchAoConfig."""
    folder = work / impl
    build(impl, size, "cpu", torch.float32).save_pretrained(folder)
    return folder


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="130m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=sorted(PRECISIONS),
        default=None,
        help="default: fp32 bf16 int8 on CPU, bf16 on CUDA",
    )
    parser.add_argument("--prompts", type=int, nargs="+", default=[829])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help="default: ours ours-compiled ours-prepacked hf-mamba2 on CPU; ours ours-graph hf-mamba2 on CUDA",
    )
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree with build/bin/llama-bench built")
    parser.add_argument("--llama-bench", type=Path, help="llama-bench elsewhere than build/bin of --llama-cpp")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each row, interleaved across rows; the median is reported (default 3)",
    )
    parser.add_argument(
        "--omp-wait-policy",
        default="",
        help="OMP_WAIT_POLICY of every torch row (default '': the environment's; PASSIVE helps on cores that "
        "other jobs share)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # internal: the saved model for the int8 rows
    args = parser.parse_args()
    if args.precisions is None:
        args.precisions = ["fp32", "bf16", "int8"] if args.device == "cpu" else ["bf16"]
    if args.impls is None:
        cpu_rows = ["ours-compiled", "ours-prepacked"]
        args.impls = ["ours", *(cpu_rows if args.device == "cpu" else ["ours-graph"]), "hf-mamba2"]
    if args.one:
        impl, precision, prompt, batch = args.one.split(",")
        row = measure(impl, args.size, args.device, precision, int(prompt), int(batch), args.new_tokens, args.folder)
        print(json.dumps(row))
        return

    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read when OpenMP loads: it applies to the rows only
    threads = torch.get_num_threads()
    flops, bandwidth = machine_limits(args.device, args.size)
    print(
        f"machine: {args.device}, {threads} threads, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'unset')} in the "
        f"torch rows; fp32 matmul {flops / 1e9:.0f} GFLOP/s; streaming read {bandwidth / 1e9:.1f} GB/s over a "
        f"{args.size} model's fp32 weight matrices in turn (the decode limit: that rate over each row's weight bytes)"
    )
    work = Path(tempfile.mkdtemp(prefix="bench_generate-"))
    try:
        ours_folder = save_folder("ours", args.size, work) if "int8" in args.precisions else None
        cases = [
            (prompt, batch, impl, precision)
            for precision in args.precisions
            for prompt in args.prompts
            for batch in args.batch
            for impl in args.impls
            if not (precision == "int8" and impl in ("hf-mamba2", "phi"))  # int8 rows: ours only
        ]
        llama = None
        if args.llama_cpp:
            hf_folder = save_folder("hf-mamba2", args.size, work)
            llama = LlamaCpp(args.llama_cpp, args.llama_bench, hf_folder, work, args.new_tokens, threads)
            for precision in args.precisions:
                llama.convert(precision)
            cases += [(prompt, 1, "llama.cpp", precision) for precision in args.precisions for prompt in args.prompts]
        runs = {case: [] for case in cases}
        for repeat in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every row alike
            for prompt, batch, impl, precision in cases:
                if impl == "llama.cpp":
                    runs[(prompt, batch, impl, precision)].append(llama.measure(precision, prompt))
                    continue
                cmd = [sys.executable, __file__, "--one", f"{impl},{precision},{prompt},{batch}", "--size", args.size]
                cmd += ["--device", args.device, "--new-tokens", str(args.new_tokens), "--folder", str(ours_folder)]
                run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                row = dict(impl=impl, precision=precision, prompt=prompt, batch=batch)
                if run.returncode:
                    tail = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"
                    runs[(prompt, batch, impl, precision)].append(dict(row, error=tail[:80]))
                else:
                    runs[(prompt, batch, impl, precision)].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"(run {repeat + 1} of {args.repeats} done)", flush=True)
        rows = [_median(results) for results in runs.values()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (args.precisions.index(r["precision"]), r["prompt"], r["batch"]))
    print(f"\nmedians of {args.repeats} runs (spread min-max):")
    for row in rows:
        print(_fmt(row, flops, bandwidth))
    print("\nratios (ours-* / other; > 1 means ours is better):")
    for precision in args.precisions:
        for prompt in args.prompts:
            for batch in args.batch:
                by = {
                    r["impl"]: r
                    for r in rows
                    if (r["precision"], r["prompt"], r["batch"]) == (precision, prompt, batch) and "error" not in r
                }
                for mine in (i for i in by if i.startswith("ours")):
                    for other in (i for i in by if not i.startswith("ours")):
                        o, x = by[mine], by[other]
                        print(
                            f"  {precision} prompt {prompt:>6} batch {batch}: {mine:<14} vs {other:<9} "
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
    name = f"{r['impl']:<14} {r['precision']:<4} prompt {r['prompt']:>6} batch {r['batch']}:"
    if "error" in r:
        return f"{name} {r['error']}"
    prefill = f"prefill {r['prefill_ms']:8.0f} ms"
    if r.get("n_params"):
        prefill_limit = (2 * r["n_params"] * r["prompt"] * r["batch"] + r["mixing_flops"]) / flops * 1e3
        prefill += f" ({prefill_limit / r['prefill_ms']:4.0%} of fp32 FLOP/s)"
    else:
        prefill += " " * 22
    decode_limit = bandwidth / r["weight_bytes"] * r["batch"]
    streamed = r["weight_bytes"] * r["decode_tps"] / r["batch"] / 1e9
    spread = ""
    if "prefill_ms_range" in r:
        (p0, p1), (d0, d1) = r["prefill_ms_range"], r["decode_tps_range"]
        spread = f"  [prefill {p0:.0f}-{p1:.0f} ms, decode {d0:.1f}-{d1:.1f}]"
    return (
        f"{name} {prefill}  decode {r['decode_tps']:7.1f} tok/s (limit {decode_limit:6.1f}; weights "
        f"{r['weight_bytes'] / 1e6:4.0f} MB streamed at {streamed:5.1f} GB/s)  peak {r['peak_gib']:.2f} GiB{spread}"
    )


if __name__ == "__main__":
    main()
