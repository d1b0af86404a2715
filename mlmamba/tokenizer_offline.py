"""A GPT-NeoX-style byte-level BPE tokenizer built offline, for random-weight and tiny models.

Same conventions as the GPT-NeoX-20B tokenizer that ML-Mamba uses: byte-level pre-tokenizer and
decoder, `<|endoftext|>` = id 0 is both eos and pad, `<|padding|>` = id 1, no BOS. `<image>` is
added as a special token after the learned vocabulary. Padding is on the left, for batched generation.
The merges are learned from a small fixed English corpus, so the result is deterministic and needs no
network. Real checkpoints use their own tokenizer (the converter's --tokenizer).
"""

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .processing_mlmamba import IMAGE_TOKEN as IMAGE  # the processor's marker, defined once

EOS = "<|endoftext|>"
PAD = "<|padding|>"

_CORPUS = """\
A photo of a cat sitting on a red chair next to a window. Two dogs are playing in the park.
What is in the image? Describe the image in detail. The picture shows a street with cars and people.
How many people are there? There are three people standing near the bus stop. Which digit is this?
It is the digit seven. The answer is yes. The answer is no. What color is the car? The car is blue.
Where is the man standing? He is standing on the beach near the water. Is there a clock on the wall?
A kitchen with a stove, a sink and a refrigerator. A plate of food with rice, vegetables and meat.
The sky is clear and the sun is shining. A train arrives at the station while people wait on the platform.
Please answer the question about the picture. Provide a short answer. Provide a detailed description.
Mamba is a state space model. Images are encoded by a vision transformer and scanned by a connector.
The quick brown fox jumps over the lazy dog. She reads a book under a large green tree in the garden.
zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand
"""


def _corpus():
    lines = _CORPUS.splitlines()
    for _ in range(4):
        yield from lines
        yield "<|user|>\n" + "\n".join(lines[:3]) + "\n<|assistant|>\n"
    yield " ".join(str(i) for i in range(2000))


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with at most `vocab_size` learned entries; `<image>` gets the next id."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.add_special_tokens([AddedToken(IMAGE, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # batched generation continues every row from its last token
    )
