"""Write complete model folders.

    python -m mlmamba.convert --random --preset mlmamba-tiny --output DIR

writes a random-weight model (safetensors), its config, the processor (image processor, an offline
tokenizer, chat_template.jinja) and the code files, so that DIR loads with
`AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)`, with or without this package installed.
"""

import argparse
import json
from pathlib import Path

import torch

from . import MLMambaForConditionalGeneration, MLMambaImageProcessor, MLMambaProcessor
from .presets import PRESETS, TOKENIZER_VOCAB, get_preset
from .tokenizer_offline import build_tokenizer

CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_processor(config, tokenizer) -> MLMambaProcessor:
    """The processor that matches `config`'s vision geometry and normalisation."""
    vision = config.vision_config
    image_processor = MLMambaImageProcessor(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
    )
    return MLMambaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def random_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight model of a named configuration and its processor (offline tokenizer)."""
    tokenizer = build_tokenizer(TOKENIZER_VOCAB[preset])
    config = get_preset(
        preset,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the embedding only {config.text_config.vocab_size}")
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MLMambaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), build_processor(config, tokenizer)


def save_folder(model, processor, output: str | Path) -> Path:
    output = Path(output)
    model.save_pretrained(output, max_shard_size="5GB")
    processor.save_pretrained(output)
    # transformers 5 names the class "TokenizersBackend", which 4.x does not know; both read this name.
    tok_config = output / "tokenizer_config.json"
    data = json.loads(tok_config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.write_text(json.dumps(data, indent=2) + "\n")
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mlmamba-convert", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--random", action="store_true", help="random weights for a named configuration (--preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named configuration")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 for -tiny, bfloat16 otherwise")
    args = parser.parse_args(argv)
    if not args.random:
        parser.error("only --random is available yet: converting released checkpoints is a later addition")
    if not args.preset:
        parser.error("--random needs --preset")
    dtype = DTYPES[args.dtype or ("float32" if args.preset.endswith("-tiny") else "bfloat16")]
    model, processor = random_model(args.preset, seed=args.seed, dtype=dtype)
    out = save_folder(model, processor, args.output)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} ({n_params / 1e6:.1f}M parameters, {dtype}) to {out}")


if __name__ == "__main__":
    main()
