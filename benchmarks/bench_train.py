"""Side-by-side training benchmark: one optimizer step's speed and peak memory, ours vs transformers' Mamba2.

    python benchmarks/bench_train.py                          # CPU: d_model 768, 6 layers, state 128, fp32
    python benchmarks/bench_train.py --size 2.7b --device cuda --seqs 1024 --batches 8    # bf16 (the CUDA default)

Implementations, holding the same random weights (built by bench_generate.build):
  ours        MLMambaForConditionalGeneration with text-only input: the language model and its tied head
              train; the (tiny, frozen) vision tower and the connector sit idle but their weights count
  hf-mamba2   transformers' Mamba2ForCausalLM (its torch path unless its hub kernels are installed)

A step is forward + backward + AdamW step on a batch of random token ids, with the ids as labels (the
loss over the whole vocabulary). Tokens/s = batch x sequence x timed steps / their time, after one warm-up
step (which also allocates the optimizer state). Each measurement runs in its own subprocess.

Memory, per measurement: "before" once the model stands alone in its process, "peak" the most during the
steps, "added" = peak - before (gradients, optimizer state, activations, temporaries). On CUDA these are
torch.cuda.memory_allocated / max_memory_allocated. On CPU they are the process's resident set size
(VmRSS / VmHWM, so "before" includes the interpreter and libraries), with the peak reset through
/proc/self/clear_refs once the other model that built the weights is freed. tracemalloc would not see
torch's allocations. The first step's loss is printed for both: equal losses show that both hold the same
weights and compute the same function. Timings are whatever this machine gives; nothing asserts on them.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import SIZES, build, reset_cpu_peak, rss_kib, sync  # noqa: E402  (shared with the generation benchmark)


def measure(impl, size, n_layer, device, dtype_name, seq, batch, steps, checkpointing):
    dtype = getattr(torch, dtype_name)
    overrides = {"n_layer": n_layer} if n_layer else {}
    model = build(impl, size, device, dtype, **overrides).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(0, 50000, (batch, seq), generator=torch.Generator().manual_seed(seq + batch)).to(device)

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**30
    else:
        reset = reset_cpu_peak()
        before = rss_kib("VmRSS") / 2**20

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = float(step())  # warm-up: also allocates AdamW's state
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = rss_kib("VmHWM") / 2**20 if reset else None
    n_trained = sum(p.numel() for p in trainable if optimizer.state.get(p))  # those AdamW stepped
    return dict(
        impl=impl,
        seq=seq,
        batch=batch,
        tokens_per_s=batch * seq * steps / elapsed,
        step_s=elapsed / steps,
        peak_gib=peak,
        before_gib=before,
        loss=first_loss,
        n_trained=n_trained,
    )


def main():
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default=default_device)
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="default: 2.7b on CUDA, 130m (--layers 6) on CPU"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="language-model layers (default: 6 on CPU, the size's own on CUDA)"
    )
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="default: 512 1024 on CPU, 1024 on CUDA")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 2 on CPU, 8 on CUDA")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps after the warm-up (default: 2 on CPU, 10 on CUDA)"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each layer in the backward (both)"
    )
    parser.add_argument("--impls", nargs="+", default=["ours", "hf-mamba2"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    cuda = args.device == "cuda"
    size = args.size or ("2.7b" if cuda else "130m")
    layers = args.layers if args.layers is not None else (None if cuda else 6)
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    steps = args.steps or (10 if cuda else 2)
    if args.one:
        impl, seq, batch = args.one.split(",")
        result = measure(
            impl, size, layers, args.device, dtype_name, int(seq), int(batch), steps, args.gradient_checkpointing
        )
        print(json.dumps(result))
        return
    seqs = args.seqs or ([1024] if cuda else [512, 1024])
    batches = args.batches or ([8] if cuda else [1, 2])

    shape = dict(SIZES[size], **({"n_layer": layers} if layers else {}))
    where = (
        torch.cuda.get_device_name()
        if cuda
        else (
            f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
            f"load average {os.getloadavg()[0]:.1f} at the start"
        )
    )
    print(
        f"machine: {where}; torch {torch.__version__}; {dtype_name}; AdamW; "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
    )
    if cuda:
        import importlib.util

        found = {name: importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "kernels")}
        disabled = os.environ.get("MLMAMBA_DISABLE_KERNELS", "0") == "1"
        print(
            f"kernels: ours {'mamba_ssm' if found['mamba_ssm'] and not disabled else 'torch path'}; "
            f"hf-mamba2 {'hub kernels if it fetches them' if found['kernels'] else 'torch path'}"
        )
    memory = "max_memory_allocated" if cuda else "peak RSS of the process"
    print(
        f"peak = {memory} over the steps; before = the same at the first step (weights, interpreter); "
        "added = peak - before (gradients, optimizer state, activations); trained = parameters AdamW stepped"
    )
    print(
        f"model: d_model {shape['d_model']}, {shape['n_layer']} layers, d_state {shape['d_state']}, headdim "
        f"{shape['headdim']}, vocab {shape['vocab_size']} (tied head); {steps} timed steps after 1 warm-up"
    )
    print(
        f"\n{'impl':<10} {'seq':>5} {'batch':>5} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>9} "
        f"{'before':>7} {'added':>6} {'1st loss':>9} {'trained':>8}"
    )
    rows = []
    for seq in seqs:
        for batch in batches:
            for impl in args.impls:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{impl},{seq},{batch}",
                    "--device",
                    args.device,
                    "--size",
                    size,
                    "--dtype",
                    dtype_name,
                    "--steps",
                    str(steps),
                ]
                cmd += ["--layers", str(layers)] if layers else []
                cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode:
                    tail = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"
                    rows.append(dict(impl=impl, seq=seq, batch=batch, error=tail[:100]))
                else:
                    rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
                print(_fmt(rows[-1]), flush=True)

    print("\nratios ours / hf-mamba2 (speed > 1: ours faster; memory < 1: ours smaller):")
    for seq in seqs:
        for batch in batches:
            by = {r["impl"]: r for r in rows if r["seq"] == seq and r["batch"] == batch and "error" not in r}
            if "ours" not in by or "hf-mamba2" not in by:
                continue
            o, h = by["ours"], by["hf-mamba2"]
            if o["peak_gib"] and h["peak_gib"]:
                added = (o["peak_gib"] - o["before_gib"]) / (h["peak_gib"] - h["before_gib"])
                memory = f"peak x{o['peak_gib'] / h['peak_gib']:.2f}, added x{added:.2f}"
            else:
                memory = "peak n/a"
            print(
                f"  seq {seq:>5} batch {batch:>2}: "
                f"tokens/s x{o['tokens_per_s'] / h['tokens_per_s']:.2f}   memory {memory}"
                f"   first-step loss {o['loss']:.4f} vs {h['loss']:.4f}"
            )


def _fmt(r):
    if "error" in r:
        return f"{r['impl']:<10} {r['seq']:>5} {r['batch']:>5}   {r['error']}"
    peak = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'n/a':>9}"
    added = f"{r['peak_gib'] - r['before_gib']:6.2f}" if r["peak_gib"] is not None else f"{'n/a':>6}"
    return (
        f"{r['impl']:<10} {r['seq']:>5} {r['batch']:>5} {r['tokens_per_s']:9.0f} {r['step_s']:7.2f} {peak} "
        f"{r['before_gib']:7.2f} {added} {r['loss']:9.4f} {r['n_trained'] / 1e6:7.1f}M"
    )


if __name__ == "__main__":
    main()
