"""Ask an ML-Mamba model a question about an image.

    python examples/demo.py                                  # builds a random tiny model folder, offline
    python examples/demo.py --model PATH_OR_HUB_ID --image photo.jpg --question "What is in the image?"

Without --model it writes a random-weight `mlmamba-tiny` folder (python -m mlmamba.convert --random),
loads it the way users load any model (Auto classes, trust_remote_code=True) and answers with it:
the path is real, the answer is noise until the model is trained or converted from a checkpoint.
"""

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer


def sample_image() -> Image.Image:
    try:
        from skimage import data  # scikit-image ships a few sample photographs

        return Image.fromarray(data.astronaut())
    except ImportError:
        y, x = np.mgrid[0:224, 0:224]
        return Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype("uint8"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: a random mlmamba-tiny built here)")
    parser.add_argument("--image", help="image file (default: scikit-image's astronaut photo)")
    parser.add_argument("--question", default="Provide a short description of this image.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    path = args.model
    if path is None:
        from mlmamba.convert import random_model, save_folder

        path = tempfile.mkdtemp(prefix="mlmamba-tiny-")
        save_folder(*random_model("mlmamba-tiny"), path)
        print(f"built a random-weight mlmamba-tiny folder in {path} (answers are noise until trained)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

    image = Image.open(args.image) if args.image else sample_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt).to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

    print(f"Q: {args.question}\nA: ", end="", flush=True)
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)


if __name__ == "__main__":
    main()
