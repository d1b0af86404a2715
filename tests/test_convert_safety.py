"""The converter never loses user files, refuses encoders in the wrong order, adds `<image>` to any tokenizer
(transformers 5 and 4), defaults to the language model's own tokenizer, and reports its stages.

Sources on disk: the tiny ML-Mamba in the released layout (as in test_convert.py), its two vision encoders,
its tokenizer, the same tokenizer without `<image>`, and a transformers Mamba2ForCausalLM folder."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS4_PYTHON, chat_inputs, make_image
from test_convert import _hf_mamba2, release_checkpoint
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

import mlmamba.convert as convert
from mlmamba import MLMambaForConditionalGeneration
from mlmamba.convert import OutputError, build_model, save_folder
from mlmamba.convert import main as convert_main
from mlmamba.convert_release import CheckpointError
from mlmamba.presets import get_preset
from mlmamba.tokenizer_offline import EOS, IMAGE, build_tokenizer

REPO = Path(__file__).resolve().parents[1]


def tokenizer_without_image() -> PreTrainedTokenizerFast:
    """The offline tokenizer of the tiny presets without `<image>`, as GPT-NeoX-20B's comes (512 entries)."""
    data = json.loads(build_tokenizer(512).backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    assert IMAGE not in tokenizer.get_vocab() and len(tokenizer) == 512
    return tokenizer


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    model, processor = tiny
    root = tmp_path_factory.mktemp("sources")
    (root / "ckpt").mkdir()
    torch.save(release_checkpoint(model), root / "ckpt" / "latest-checkpoint.pt")
    dino, siglip = model.model.vision_tower.encoders
    dino.save_pretrained(root / "dino")
    siglip.save_pretrained(root / "siglip")
    processor.tokenizer.save_pretrained(root / "tokenizer")
    tokenizer_without_image().save_pretrained(root / "plain-tokenizer")
    _hf_mamba2().save_pretrained(root / "lm")
    return root


def release_args(root: Path, out, *extra, vision=("dino", "siglip")) -> list[str]:
    args = ["--checkpoint", str(root / "ckpt" / "latest-checkpoint.pt")]
    for name in vision:
        args += ["--vision", str(root / name)]
    return args + ["--tokenizer", str(root / "tokenizer"), "--image-size", "42", "--output", str(out), *extra]


def text_model_args(lm: Path, out, *extra) -> list[str]:
    return ["--text-model", str(lm), "--preset", "mlmamba-tiny", "--output", str(out), *extra]


def random_args(out, *extra) -> list[str]:
    return ["--random", "--preset", "mlmamba-tiny", "--output", str(out), *extra]


def refused(argv, capsys) -> str:
    """The error message of a command line that the converter refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        convert_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


# ------------------------------------------------------------------------------- the output folder


def test_non_empty_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = refused(random_args(out), capsys)
    assert f"--output {out} is not empty (notes.txt)" in err and "--overwrite" in err
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_overwrite_replaces_the_folder_with_exactly_the_files_of_a_fresh_conversion(tmp_path):
    convert_main(random_args(tmp_path / "fresh"))
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "notes.txt"):
        (out / stale).write_text("{}")
    convert_main(random_args(out, "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert 'MODEL = "out"' in (out / "README.md").read_text()  # the final name, not the temporary one
    assert leftovers(tmp_path) == []
    MLMambaForConditionalGeneration.from_pretrained(out)


def test_an_existing_empty_folder_or_a_new_nested_one_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    convert_main(random_args(tmp_path / "empty"))
    convert_main(random_args(tmp_path / "new" / "nested"))
    for out in (tmp_path / "empty", tmp_path / "new" / "nested"):
        assert (out / "config.json").exists() and (out / "model.safetensors").exists()


# (where --output points, what the error says) in the `sources` layout
SOURCE_CLASHES = [
    ("dino", "is the source"),
    ("tokenizer", "is the source"),
    ("siglip/inside", "lies inside the source"),
    ("ckpt", "contains the source"),  # the checkpoint file's folder
    (".", "contains the source"),
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where,relation", SOURCE_CLASHES)
def test_output_that_is_around_or_inside_a_source_is_refused_even_with_overwrite(
    sources, capsys, where, relation, overwrite
):
    before = snapshot(sources)
    err = refused(release_args(sources, sources / where, *(["--overwrite"] if overwrite else [])), capsys)
    assert relation in err and "never writes into its sources, even with --overwrite" in err
    assert snapshot(sources) == before and leftovers(sources) == []


def test_output_that_is_the_text_model_is_refused(sources, capsys):
    before = snapshot(sources / "lm")
    args = text_model_args(sources / "lm", sources / "lm", "--tokenizer", str(sources / "tokenizer"), "--overwrite")
    err = refused(args, capsys)
    assert f"is the source {sources / 'lm'}" in err
    assert snapshot(sources / "lm") == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_conversion_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "config.json").write_text("old")
    seen = {}

    def fail(folder, *args, **kwargs):  # the last file: the weights and processor are written by now
        seen["weights written"] = (Path(folder) / "model.safetensors").exists()
        seen["output untouched"] = snapshot(out) == {"config.json": b"old"} if existing else not out.exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "write_model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_main(random_args(out, "--overwrite"))
    assert seen == {"weights written": True, "output untouched": True}
    assert (snapshot(out) == {"config.json": b"old"}) if existing else not out.exists()
    assert leftovers(tmp_path) == []


def test_save_folder_refuses_a_non_empty_folder_unless_overwrite(tiny, tmp_path):
    model, processor = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty"):
        save_folder(model, processor, out)
    assert snapshot(out) == {"notes.txt": b"mine"}
    assert save_folder(model, processor, out, overwrite=True) == out
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "model").write_text("mine")
    assert "is a file, not a folder" in refused(random_args(tmp_path / "model", "--overwrite"), capsys)
    assert (tmp_path / "model").read_text() == "mine"


# ------------------------------------------------------------------------------- vision encoder order


def test_swapped_vision_encoders_are_refused(sources, tmp_path):
    with pytest.raises(CheckpointError) as error:
        convert_main(release_args(sources, tmp_path / "out", vision=("siglip", "dino")))
    message = str(error.value)
    assert (
        f"given 1 SigLIP ({sources / 'siglip'}), 2 DINOv2 ({sources / 'dino'}); "
        "the released ML-Mamba 3B checkpoint expects DINOv2 then SigLIP" in message
    )
    assert not (tmp_path / "out").exists()


def test_swapped_vision_encoders_of_the_preset_are_refused_with_a_text_model(sources, tmp_path):
    args = text_model_args(sources / "lm", tmp_path / "out", "--tokenizer", str(sources / "tokenizer"))
    args += ["--vision", str(sources / "siglip"), "--vision", str(sources / "dino")]
    with pytest.raises(CheckpointError, match="preset 'mlmamba-tiny' expects DINOv2 then SigLIP"):
        convert_main(args)


# ------------------------------------------------------------------------------- tokenizer


@torch.no_grad()
def test_tokenizer_without_image_token_gets_it_added(sources, tmp_path):
    out = tmp_path / "out"
    convert_main(text_model_args(sources / "lm", out, "--tokenizer", str(sources / "plain-tokenizer")))
    model = MLMambaForConditionalGeneration.from_pretrained(out).eval()
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(out)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(IMAGE) == 512
    assert IMAGE in processor.tokenizer.all_special_tokens
    inputs = chat_inputs(processor, "Which digit is this?", make_image(5))
    assert (inputs["input_ids"] == 512).sum() == model.config.num_image_tokens
    assert torch.isfinite(model(**inputs).logits).all()


def test_text_model_folder_tokenizer_is_the_default(sources, tmp_path):
    lm = tmp_path / "lm"
    _hf_mamba2().save_pretrained(lm)
    tokenizer_without_image().save_pretrained(lm)
    out = tmp_path / "out"
    convert_main(text_model_args(lm, out))
    config = json.loads((out / "config.json").read_text())
    assert config["image_token_id"] == 512
    assert "the tokenizer is the language model's own (lm)" in (out / "README.md").read_text()


def test_text_model_without_a_tokenizer_needs_the_tokenizer_option(sources, tmp_path):
    with pytest.raises(CheckpointError, match="holds no tokenizer .* give --tokenizer"):
        convert_main(text_model_args(sources / "lm", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# transformers 4.x, without pytest: a Mamba-2 LM folder that holds the offline tokenizer without <image>
_TRANSFORMERS4_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, transformers
    from tokenizers import Tokenizer
    from transformers import Mamba2Config, Mamba2ForCausalLM, PreTrainedTokenizerFast
    from mlmamba.convert import main
    from mlmamba.tokenizer_offline import EOS, IMAGE, build_tokenizer
    lm, out = sys.argv[1:3]
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(
        Mamba2Config(num_heads=8, head_dim=16, vocab_size=528, hidden_size=64, state_size=16, num_hidden_layers=2,
                     n_groups=1, expand=2, conv_kernel=4, chunk_size=16, tie_word_embeddings=True)
    )
    # state-spaces layout (4.57 refuses to save this model's tied weights as safetensors)
    os.makedirs(lm)
    sd = {k.replace("embeddings.", "embedding."): v for k, v in reference.state_dict().items()}
    torch.save(sd, os.path.join(lm, "pytorch_model.bin"))
    config = {"d_model": 64, "n_layer": 2, "vocab_size": 528, "ssm_cfg": {"layer": "Mamba2", "d_state": 16,
              "headdim": 16}, "rms_norm": True, "residual_in_fp32": True}
    with open(os.path.join(lm, "config.json"), "w") as f:
        json.dump(config, f)
    data = json.loads(build_tokenizer(512).backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token=EOS)
    assert IMAGE not in tokenizer.get_vocab()
    tokenizer.save_pretrained(lm)
    main(["--text-model", lm, "--preset", "mlmamba-tiny", "--output", out])
    print(json.dumps({"transformers": transformers.__version__}))
    """
)


@pytest.mark.transformers4
def test_transformers4_converts_with_a_tokenizer_without_image_token(tmp_path):
    (tmp_path / "run.py").write_text(_TRANSFORMERS4_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [TRANSFORMERS4_PYTHON, str(tmp_path / "run.py"), str(tmp_path / "lm"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1])["transformers"].startswith("4.")
    tokenizer = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    image = [t for t in tokenizer["added_tokens"] if t["content"] == IMAGE]
    assert image == [dict(image[0], id=512, special=True)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_token_id"] == 512


# ------------------------------------------------------------------------------- options and progress


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--random", "--tokenizer", "tok"], "--random does not use --tokenizer"),
        (["--random", "--vision", "v", "--image-size", "42"], "--random does not use --vision, --image-size"),
        (["--checkpoint", "c.pt", "--seed", "3"], "--checkpoint does not use --seed"),
        (["--text-model", "lm", "--image-size", "42"], "--text-model does not use --image-size"),
    ],
)
def test_options_the_source_would_not_use_are_refused(tmp_path, capsys, extra, message):
    argv = [*extra, "--preset", "mlmamba-tiny", "--output", str(tmp_path / "out")]
    if extra[0] == "--checkpoint":
        argv.remove("--preset")
        argv.remove("mlmamba-tiny")
    assert message in refused(argv, capsys)


def test_conversion_prints_its_stages_to_stderr(sources, tmp_path, capsys):
    convert_main(release_args(sources, tmp_path / "out"))
    captured = capsys.readouterr()
    stages = [line for line in captured.err.splitlines() if line.startswith("mlmamba-convert: ")]
    expected = ["reading", "converting", "loading vision encoder 1 of 2", "loading vision encoder 2 of 2"]
    expected += ["loading the tokenizer", "building the model", "loading the converted tensors", "writing"]
    positions = [next((i for i, line in enumerate(stages) if e in line), None) for e in expected]
    assert None not in positions and positions == sorted(positions), stages
    assert captured.out.strip().startswith("wrote ") and len(captured.out.strip().splitlines()) == 1


@pytest.mark.parametrize("preset", ["mlmamba-tiny", "cobra-tiny", "vlmamba-tiny"])
def test_building_with_a_progress_bar_gives_the_same_weights_and_reaches_its_total(preset, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(convert, "_progress_bar", Bar)
    config = get_preset(preset)
    with_bar = build_model(config, torch.float32, seed=4, progress=True).state_dict()
    without = build_model(config, torch.float32, seed=4).state_dict()
    assert with_bar.keys() == without.keys() and all(torch.equal(with_bar[k], without[k]) for k in without)
    assert len(bars) == 1 and bars[0].n == bars[0].total > 0
