"""Chat with an ML-Mamba, Cobra or VL-Mamba model: an image and a question in, the answer streamed out.

    mlmamba-chat MODEL --image photo.jpg --question "What is in the image?"   # one answer, then exit
    mlmamba-chat MODEL --image https://example.com/photo.jpg                 # a conversation, one question a line
    printf 'What is in the image?\\nWhat colour is it?\\n' | mlmamba-chat MODEL --image photo.jpg
    python -m mlmamba.chat MODEL ...                                          # the same, without the entry point

MODEL is a model folder (what `python -m mlmamba.convert` writes) or a Hub id. It loads the way users load
any model: AutoModelForImageTextToText and AutoProcessor, with trust_remote_code=True. The image is a file or
an http(s), file:// or data: URL, read as the processor reads image strings; without one the chat is text only.

With --question the answer is printed once. Without it, each line read from the input is a question,
answered with the whole conversation so far: the model's chat template is applied to all messages every turn,
the earlier answers among them. An empty line, /quit or the end of the input ends the conversation;
`/image FILE_OR_URL` starts a new one about another image. The prompt `> ` appears only on a terminal, so
piped input gives the answers alone, each ending with a newline.

--device auto takes the GPU where there is one; --dtype auto is bfloat16 there (float16 where the GPU lacks
bfloat16) and float32 on the CPU. Answers are greedy unless --do-sample.
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

from .image_processing_mlmamba import load_image_source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A Hub id: "name" or "owner/name". Anything else that is not a folder here is a mistyped path.
HUB_ID = re.compile(r"^(?![.-])[\w.-]+(/(?![.-])[\w.-]+)?$")
QUIT = ("", "/quit", "/exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlmamba-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub id")
    parser.add_argument("--image", help="image file or http(s) URL (default: none, a text-only chat)")
    parser.add_argument("--question", help="ask this one question, print the answer and exit")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if any), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights' dtype (default: auto)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit (default: %(default)s)")
    parser.add_argument("--do-sample", action="store_true", help="sample the answer instead of the greedy one")
    parser.add_argument("--temperature", type=float, help="with --do-sample (default: the model's generation config)")
    parser.add_argument("--top-p", type=float, help="with --do-sample (default: the model's generation config)")
    parser.add_argument("--seed", type=int, help="with --do-sample: seed of the sampling, for a repeatable answer")
    return parser


def pick_device(parser, name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def pick_dtype(parser, name: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        # float16 and bfloat16 run on the CPU too, only slower than float32 there: auto keeps float32
        return torch.float32 if name == "auto" else DTYPES[name]
    bf16 = torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if bf16 else torch.float16
    if name == "bfloat16" and not bf16:
        parser.error(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16")
    return DTYPES[name]


def open_image(source: str):
    """The image a file or URL holds, read as the processor reads image strings (`load_image_source`: EXIF
    orientation applied, 16-bit depth kept); ValueError/OSError when it cannot."""
    is_url = source.startswith(("http://", "https://", "file://", "data:"))
    if not is_url and not Path(source).expanduser().is_file():
        # the loader would read any other string as base64 data and fail with a message about that
        raise FileNotFoundError(f"no such image file: {source}")
    try:
        return load_image_source(source if is_url else str(Path(source).expanduser()))
    except ValueError as err:  # unreadable files and failed fetches alike: say which image, not a traceback
        raise ValueError(f"cannot read an image from {source}: {err}") from err


def check_model_source(parser, model: str) -> None:
    """Refuse, before anything loads, a folder that is no model folder and a path that does not exist."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            parser.error(f"{model} is not a model folder: it has no config.json")
    elif path.exists():
        parser.error(f"{model} is a file; MODEL is a model folder or a Hub id")
    elif not HUB_ID.match(model):
        parser.error(f"no such model folder: {model}")


def load(parser, model: str, device: torch.device, dtype: torch.dtype):
    """The model (eval mode, on `device`) and its processor, as users load them."""
    # AutoModelForImageTextToText under transformers 4.57 too (the oldest this package supports): it loads the
    # folders there, and 4.57 deprecates AutoModelForVision2Seq with a FutureWarning, so no version switch.
    source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True, dtype=dtype)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError) as err:  # not found on the Hub, no weights, not a model transformers knows
        parser.error(f"cannot load {model}: {err}")
    return loaded.to(device).eval(), processor


def model_card_warning(model: str) -> str | None:
    """A warning when the model card says the answers will not mean anything: `python -m mlmamba.convert`
    titles a --random folder "... (random weights)" and a --text-model one "... (connector untrained)"."""
    path = Path(model).expanduser()
    card = path / "README.md"
    if not path.is_dir():
        try:  # a Hub model: its card, if the Hub (or the local cache) has one
            from huggingface_hub import hf_hub_download

            card = Path(hf_hub_download(model, "README.md"))
        except Exception:  # no card, or no network: no warning rather than no chat
            return None
    try:
        title = next((line for line in card.read_text(encoding="utf-8").splitlines() if line.startswith("# ")), "")
    except OSError:
        return None
    if "(random weights)" in title:
        return f"warning: {model} has random weights (its model card says so): its answers are noise"
    if "(connector untrained)" in title:
        return f"warning: {model} has an untrained connector (its model card says so): its answers ignore the image"
    return None


class Chat:
    """A conversation: the messages so far, and the image it is about (the first user turn holds it)."""

    def __init__(self, model, processor, generate_kwargs: dict, image=None):
        self.model, self.processor, self.generate_kwargs = model, processor, generate_kwargs
        self.new(image)

    def new(self, image=None) -> None:
        self.image, self.messages = image, []

    def ask(self, question: str) -> str:
        """Stream the answer to `question` to stdout, given the conversation so far; return it."""
        # The chat template places every image of a conversation before its first turn, as the models were
        # trained; the image item goes in the first user message, where the message layout says it belongs.
        content = [{"type": "image"}] if self.image is not None and not self.messages else []
        self.messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        # The whole conversation, templated again each turn: the prompt is exactly what the template makes of
        # these messages, earlier answers included (a state cache carried over would hold the answer's tokens
        # as generated, which need not be the tokens of its text).
        prompt = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        images = [self.image] if self.image is not None else None
        inputs = self.processor(images=images, text=prompt, return_tensors="pt").to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        streamer = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **self.generate_kwargs, streamer=streamer)
        answer = self.processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def converse(chat: Chat) -> None:
    """Questions from stdin, one a line, until an empty line, /quit or the end of the input."""
    prompt = "> " if sys.stdin.isatty() else ""  # on a pipe, stdout carries the answers alone
    if prompt:
        try:  # input() then edits the line and recalls earlier questions with the arrow keys
            import readline  # noqa: F401
        except ImportError:  # not on Windows
            pass
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            if prompt:
                print()
            return
        if line in QUIT:
            return
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command != "/image" or not argument.strip():
                print("commands: /image FILE_OR_URL (a new conversation about that image), /quit", file=sys.stderr)
                continue
            try:
                image = open_image(argument.strip())
            except (OSError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                continue
            # A new conversation: the models saw one image per conversation, placed before all its turns,
            # so a second image would not belong to the questions after it.
            chat.new(image)
            print(f"(a new conversation about {argument.strip()})", file=sys.stderr)
            continue
        try:
            chat.ask(line)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the conversation goes on without the question
            print()
            del chat.messages[-1]


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = {"temperature": args.temperature, "top_p": args.top_p}
    if not args.do_sample:
        given = [f"--{name.replace('_', '-')}" for name, v in {**sampling, "seed": args.seed}.items() if v is not None]
        if given:
            parser.error(f"{', '.join(given)} need(s) --do-sample (answers are greedy without it)")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.question is not None and not args.question.strip():
        parser.error("--question is empty")
    # Everything that can be refused is checked before the model loads, which can take minutes.
    device = pick_device(parser, args.device)
    dtype = pick_dtype(parser, args.dtype, device)
    check_model_source(parser, args.model)
    image = None
    if args.image:
        try:
            image = open_image(args.image)
        except (OSError, ValueError) as err:
            parser.error(f"--image: {err}")

    model, processor = load(parser, args.model, device, dtype)
    warning = model_card_warning(args.model)
    if warning:
        print(warning, file=sys.stderr)

    generate_kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        generate_kwargs.update({name: v for name, v in sampling.items() if v is not None})
        if args.seed is not None:
            torch.manual_seed(args.seed)
    chat = Chat(model, processor, generate_kwargs, image)
    if args.question is not None:
        chat.ask(args.question)
    else:
        converse(chat)


if __name__ == "__main__":
    main()
