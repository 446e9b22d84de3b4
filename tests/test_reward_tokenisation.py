"""Reward prompts tokenise id for id as each reward's reference code tokenises them.

The references are run from their own code, not transcribed: open_clip's tokenizer.py (HPSv2 scores with
it) and OpenAI CLIP's simple_tokenizer.py with clip.py's `tokenize` (CLIP score), from the open_clip_torch
and clip-anytorch packages that launch/setup.sh installs without their dependencies (torchvision would break
diffusers) into a folder off sys.path. The reward models are tiny twins whose tokenizer files carry CLIP's
real vocabulary and merges, written from that same bpe_simple_vocab_16e6.txt.gz the way openai/clip-vit-*
ship them, and they are loaded through the registry, as real weights are. PickScore's and ImageReward's
references call transformers' tokenizers; those calls are reproduced as their code makes them.
"""

import ast
import gzip
import importlib.util
import json
import random
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_rewards import save_hps, save_imagereward  # their independent open_clip / BLIP key maps
from transformers import AutoTokenizer, BertTokenizer, CLIPTokenizer

from egrpo.rewards.base import RewardModel, build_reward_models
from egrpo.rewards.imagereward import MAX_PROMPT_TOKENS, load_blip_tokenizer
from egrpo.rewards.tiny import IMAGE_SIZE, build_tiny_clip, save_clip_folder
from egrpo.rewards.tokenization import clean_clip_prompt

# Where launch/setup.sh puts the reference packages (pip install --no-deps --target).
REFERENCE = Path(sys.prefix, "share", "egrpo-reference")
CONTEXT = 77
START, END = 49406, 49407  # CLIP's <|startoftext|> and <|endoftext|>

LONG = "a photograph of " + " ".join(f"tree{i} and" for i in range(60)) + " the end"
TRICKY = [
    "a cat &amp; a dog",
    "fish &amp;amp; chips",
    "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;single&#39;",
    "!",
    "wow!",
    "wow!!",
    "! !! !!! hello!",
    "a  red\n\ncircle\t on   the grass ",
    "   ",
    "",
    "The Ãºnico cafÃ© â€œquotedâ€\x9d",  # mojibake that ftfy repairs
    "Ünïcödé naïve CAFÉ 東京タワー 🚀 e\u0301",
    "it's HE'LL they'RE I'M",
    "a <|endoftext|> inside and x!<|startoftext|>",
    "<start_of_text>open_clip's names<end_of_text>",
    "photo of a dog, 4k, highly detailed, trending on artstation!!!",
    LONG,
]


def fuzz(count: int, seed: int = 0) -> list[str]:
    """Random prompts mixing words, punctuation runs, entities, digits, accents and whitespace."""
    rng = random.Random(seed)
    pieces = ["the", "A", "photo", "&amp;", "&lt;", "cat's", "!!", "!", "running", "Ãº", "東京", "🚀", "1.5"]
    chars = "abcXYZ !!&;'-.,019éüß\n\t"
    return [
        " ".join(
            rng.choice(pieces) if rng.random() < 0.5 else "".join(rng.choices(chars, k=rng.randint(1, 8)))
            for _ in range(rng.randint(1, 40))
        )
        for _ in range(count)
    ]


PROMPTS = TRICKY + fuzz(150)


def load_by_path(name: str, path: Path) -> ModuleType:
    """A module from its file, without importing the package it belongs to (open_clip's and clip's
    __init__ import torchvision)."""
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash launch/setup.sh`, which installs the reference tokenisers")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> ModuleType:
    """open_clip's tokenizer.py (its module-level `tokenize` is what HPSv2's scoring calls)."""
    return load_by_path("reference_open_clip_tokenizer", REFERENCE / "open_clip" / "tokenizer.py")


@pytest.fixture(scope="module")
def openai_simple_tokenizer() -> ModuleType:
    """OpenAI CLIP's simple_tokenizer.py."""
    return load_by_path("reference_openai_simple_tokenizer", REFERENCE / "clip" / "simple_tokenizer.py")


@pytest.fixture(scope="module")
def openai_tokenize(openai_simple_tokenizer: ModuleType) -> typing.Callable[..., torch.Tensor]:
    """OpenAI CLIP's clip.tokenize, its own source, run with its own SimpleTokenizer: clip.py itself cannot be
    imported without torchvision, so only its `tokenize` function is compiled from it."""
    simple = openai_simple_tokenizer
    source_file = REFERENCE / "clip" / "clip.py"
    tree = ast.parse(source_file.read_text())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tokenize")
    namespace = {
        "torch": torch,
        "Union": typing.Union,
        "List": typing.List,  # noqa: UP006 - the names clip.py's annotations use
        "_tokenizer": simple.SimpleTokenizer(),
    }
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(source_file), "exec"), namespace)
    return namespace["tokenize"]


def write_clip_tokenizer(folder: Path, open_clip_tokenizer: ModuleType, pad_token: str) -> CLIPTokenizer:
    """CLIP's tokenizer files from the reference's bpe_simple_vocab_16e6.txt.gz, as openai/clip-vit-* ship
    them (vocab.json: the 256 byte characters, the same with </w>, one entry per merge, then the two
    specials; merges.txt), with `pad_token` "<|endoftext|>" (OpenAI's files) or "!" (LAION's, so HPSv2's
    and PickScore's)."""
    bpe = Path(open_clip_tokenizer.default_bpe())
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(open_clip_tokenizer.bytes_to_unicode().values())
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "pad_token": pad_token, "model_max_length": CONTEXT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, open_clip_tokenizer: ModuleType) -> dict[str, Path]:
    """`clip` (OpenAI's tokenizer files), `pickscore` and `hpsv2` (LAION's) folders of one tiny CLIP with the
    real vocabulary, in the layouts their loaders read."""
    root = tmp_path_factory.mktemp("tokenisation")
    openai = write_clip_tokenizer(root / "openai-tokenizer", open_clip_tokenizer, "<|endoftext|>")
    laion = write_clip_tokenizer(root / "laion-tokenizer", open_clip_tokenizer, "!")
    model, _ = build_tiny_clip(seed=0, tokenizer=openai)
    save_clip_folder(model, openai, root / "clip")
    save_clip_folder(model, laion, root / "pickscore")
    save_clip_folder(model, laion, root / "hpsv2" / "clip")
    save_hps(root / "hpsv2", model)
    return {"clip": root / "clip", "pickscore": root / "pickscore", "hpsv2": root / "hpsv2"}


@pytest.fixture(scope="module")
def rewards(folders: dict[str, Path]) -> dict[str, RewardModel]:
    names = ("clip_score", "pickscore", "hpsv2")
    built = build_reward_models(names, paths={m: str(p) for m, p in folders.items()}, device="cpu")
    return dict(zip(names, built, strict=True))


def assert_clip_layout(tokens: dict[str, torch.Tensor]) -> None:
    """[start, ..., end, 0, ...] rows of the context length, the mask 1 exactly up to the end token."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (len(ids), CONTEXT) and ids.dtype == torch.long
    assert (ids[:, 0] == START).all()
    length = mask.sum(1)
    assert (ids[torch.arange(len(ids)), length - 1] == END).all()
    positions = torch.arange(CONTEXT)
    assert torch.equal(mask, (positions < length[:, None]).long())
    assert (ids[mask == 0] == 0).all()


def test_prompts_are_cleaned_as_the_references_clean_them(
    open_clip_tokenizer: ModuleType, openai_simple_tokenizer: ModuleType
) -> None:
    simple = openai_simple_tokenizer
    for prompt in PROMPTS:
        cleaned = clean_clip_prompt(prompt)
        assert cleaned == open_clip_tokenizer._clean_lower(prompt), prompt
        assert cleaned == simple.whitespace_clean(simple.basic_clean(prompt)).lower(), prompt
    assert clean_clip_prompt("fish &amp;amp; chips") == "fish & chips"
    assert clean_clip_prompt("The Ãºnico cafÃ©\n\n  OK ") == "the único café ok"


def test_hpsv2_prompts_are_open_clip_tokenize(
    rewards: dict[str, RewardModel], open_clip_tokenizer: ModuleType
) -> None:
    tokens = rewards["hpsv2"].tokenize(PROMPTS)
    assert torch.equal(tokens["input_ids"], open_clip_tokenizer.tokenize(PROMPTS, context_length=CONTEXT))
    assert_clip_layout(tokens)


def test_clip_score_prompts_are_openai_clip_tokenize(
    rewards: dict[str, RewardModel], openai_tokenize: typing.Callable[..., torch.Tensor]
) -> None:
    tokens = rewards["clip_score"].tokenize(PROMPTS)
    reference = openai_tokenize(PROMPTS, context_length=CONTEXT, truncate=True)
    assert torch.equal(tokens["input_ids"], reference.long())
    assert_clip_layout(tokens)


def test_the_reported_differences_are_gone(rewards: dict[str, RewardModel], folders: dict[str, Path]) -> None:
    """`&amp;` is one "&" token, not "&", "amp", ";"; a "!" in a prompt is its BPE token, not LAION's pad
    id 0; a prompt past the context is cut to 75 BPE ids with the end token kept."""
    vocab = CLIPTokenizer.from_pretrained(folders["hpsv2"] / "clip").get_vocab()
    for reward in ("hpsv2", "clip_score"):
        tokenize = rewards[reward].tokenize
        ids = tokenize(["a cat &amp; a dog", "wow!!", "! hello!", LONG])["input_ids"]
        words = [vocab[w] for w in ("a</w>", "cat</w>", "&</w>", "a</w>", "dog</w>")]
        assert ids[0, :7].tolist() == [START, *words, END]
        assert ids[1, :4].tolist() == [START, vocab["wow</w>"], vocab["!!</w>"], END]
        assert ids[2, :5].tolist() == [START, vocab["!</w>"], vocab["hello</w>"], vocab["!</w>"], END]
        assert (ids[3] != 0).all() and ids[3, -1] == END and (ids[3, 1:-1] != END).all()
    # what transformers' own call on LAION's files gives, for contrast: "!" is read as the pad token
    laion = AutoTokenizer.from_pretrained(folders["hpsv2"] / "clip")
    assert laion("wow!!")["input_ids"] == [START, vocab["wow</w>"], 0, 0, END]
    assert len(laion("a cat &amp; a dog")["input_ids"]) == 9


def test_pickscore_prompts_are_its_processor_call(
    rewards: dict[str, RewardModel], folders: dict[str, Path]
) -> None:
    """PickScore was trained and is scored with transformers' tokenizer of laion/CLIP-ViT-H-14, called as
    `processor(text=prompts, padding=True, truncation=True, max_length=77)`; egrpo keeps that, quirks and
    all."""
    tokens = rewards["pickscore"].tokenize(PROMPTS)
    reference = AutoTokenizer.from_pretrained(folders["pickscore"])(
        PROMPTS, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt"
    )
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert torch.equal(tokens["attention_mask"], reference["attention_mask"])
    assert tokens["input_ids"].shape[1] == CONTEXT  # LONG is truncated, its end token kept
    assert (tokens["input_ids"][PROMPTS.index(LONG)][-1] == END).all()


def test_scores_read_the_cleaned_prompt(rewards: dict[str, RewardModel]) -> None:
    """The ids reach the text tower: prompts that clean to the same text score the same, the score's text
    side is the reference ids' embedding."""
    one = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    image = one.repeat(3, 1, 1, 1)
    prompts = ["a cat &amp; a dog!", "A  cat & a\n DOG!", "a cat and a dog!"]
    for reward in ("hpsv2", "clip_score"):
        model = rewards[reward]
        scores = model.score(image, prompts)[reward]
        assert scores[0] == scores[1] and scores[0] != scores[2]
        tokens = model.tokenize(prompts[:1])
        with torch.no_grad():
            text = model.model.get_text_features(**tokens)
            pixels = model.transform(image[:1])
            picture = model.model.get_image_features(pixel_values=pixels)
        text, picture = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (text, picture))
        expected = torch.nn.functional.cosine_similarity(picture, text, dim=-1)
        torch.testing.assert_close(scores[:1], expected)


# ImageReward: BLIP's init_tokenizer (ImageReward/models/BLIP/blip.py) builds
# BertTokenizer.from_pretrained('bert-base-uncased') plus [DEC] (bos_token) and [ENC]; ImageReward.py's score
# calls it as tokenizer(prompt, padding='max_length', truncation=True, max_length=35, return_tensors="pt").
def blip_reference(bert_base_uncased: Path) -> BertTokenizer:
    tokenizer = BertTokenizer.from_pretrained(bert_base_uncased)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def write_bert_files(folder: Path, saved: Path, layout: str) -> None:
    """`folder` as a copy of the word-piece vocabulary in `saved` laid out as bert-base-uncased's files are
    found: "vocab" (vocab.txt alone), "hub" (vocab.txt, tokenizer.json, tokenizer_config.json naming no class,
    no config.json: the case AutoTokenizer loaded without a pad token), "saved" (save_pretrained's files)."""
    folder.mkdir()
    tokenizer = BertTokenizer.from_pretrained(saved)
    pieces = sorted((i, t) for t, i in tokenizer.get_vocab().items() if t not in ("[DEC]", "[ENC]"))
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for _, t in pieces))
    if layout == "hub":
        BertTokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
        config = {"do_lower_case": True, "model_max_length": 512}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    elif layout == "saved":
        tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("layout", ["vocab", "hub", "saved"])
def test_imagereward_prompts_are_blips_tokenizer_call(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "imagereward"
    save_imagereward(folder, seed=0)
    saved = tmp_path / "saved-tokenizer"
    (folder / "tokenizer").rename(saved)
    write_bert_files(folder / "tokenizer", saved, layout)
    write_bert_files(tmp_path / "bert-base-uncased", saved, "vocab")
    assert not (folder / "tokenizer" / "config.json").exists()
    tokenizer = load_blip_tokenizer(folder / "tokenizer")
    assert tokenizer.pad_token_id == 0 and tokenizer.convert_tokens_to_ids("[ENC]") == len(tokenizer) - 1

    (model,) = build_reward_models(["imagereward"], paths={"imagereward": str(folder)})
    prompts = [*PROMPTS, "[DEC] and [ENC] stay BLIP's tokens", "x" * 200]
    tokens = model.tokenize(prompts)
    reference = blip_reference(tmp_path / "bert-base-uncased")(
        prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
    )
    assert torch.equal(tokens["input_ids"], reference["input_ids"])
    assert torch.equal(tokens["attention_mask"], reference["attention_mask"])
    assert tokens["input_ids"].shape == (len(prompts), MAX_PROMPT_TOKENS)
    scores = model.score(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE), prompts[:2])["imagereward"]
    assert scores.isfinite().all()
