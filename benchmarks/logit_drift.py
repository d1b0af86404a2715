"""How far each reduced precision moves the logits from fp32, on a model with weights at unit scale.

    python benchmarks/logit_drift.py                  # mamba2-130m size, 256-token prompt, 32 decoding steps

The model: bench_generate's mamba2-130m-sized random model with its language model's weights redrawn at unit
scale (`tests/references.spread_weights`: matrices N(0, 1/fan_in)), so that every layer moves the logits (the
default initialisation leaves them close to the embedding's). The modes, each loaded from the same saved
folder as bench_generate loads them:
  bf16   dtype=torch.bfloat16 (SSM state and its update in fp32)
  int8   int8_weight_only_config(): every linear layer and the tied embedding / output layer in int8, as
         bench_generate's int8 rows (bf16 activations)
  int8-linear   the plain TorchAoConfig(Int8WeightOnlyConfig()): the output layer stays bf16
Compared with fp32 on the prompt's logits (one prefill) and on the logits of decoding steps that all modes take
on the same tokens (fp32's greedy continuation, fed to each), with the state cache: the rms difference, the
largest one, both beside the spread (std) of the fp32 logits, and how often the top-1 token is the same.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' unit-scale weights, one definition
from bench_generate import build, load_int8  # noqa: E402
from references import spread_weights  # noqa: E402

from mlmamba import MLMambaForConditionalGeneration  # noqa: E402


@torch.no_grad()
def logits_of(model, prompt: torch.Tensor, continuation: torch.Tensor):
    """Prefill logits (1, l, vocab) and the logits of each decoding step along `continuation` (1, n, vocab)."""
    out = model(input_ids=prompt, use_cache=True)
    steps = []
    for t in range(continuation.shape[1]):
        steps.append(model(input_ids=continuation[:, t : t + 1], cache=out.cache, use_cache=True).logits)
    return out.logits.float(), torch.cat(steps, 1).float()


def compare(name: str, what: str, ref: torch.Tensor, got: torch.Tensor) -> str:
    diff = got - ref
    rms, worst, spread = diff.pow(2).mean().sqrt(), diff.abs().max(), ref.std()
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    return (
        f"{name:<11} {what:<8} rms {rms:.4f} ({rms / spread:.2%} of the logits' std {spread:.3f}), "
        f"max {worst:.3f}, same top-1 token {same:.1%}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", default="130m")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    reference = build("ours", args.size, "cpu", torch.float32)
    spread_weights(reference.model.language_model, seed=1)
    prompt = torch.randint(0, 50000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        greedy = reference.generate(
            input_ids=prompt, max_new_tokens=args.steps, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    continuation = greedy[:, args.prompt :]
    ref_prefill, ref_steps = logits_of(reference, prompt, continuation)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        del reference
        modes = {
            "bf16": lambda: MLMambaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval(),
            "int8": lambda: load_int8(folder, "ours"),
            "int8-linear": lambda: load_int8(folder, "ours", output_layer=False),
        }
        for name, load in modes.items():
            prefill, steps = logits_of(load(), prompt, continuation)
            print(compare(name, "prefill", ref_prefill, prefill))
            print(compare(name, "decode", ref_steps, steps))


if __name__ == "__main__":
    main()
