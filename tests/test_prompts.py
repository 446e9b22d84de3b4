"""Prompt datasets (toy splits, .txt, .jsonl, .json as HPDv2 releases it) and the resumable prompt sampler."""

import json

import pytest

from egrpo.data.prompts import PromptSampler, load_prompts
from egrpo.toyworld.world import eval_prompts, train_prompts


def test_toy_splits():
    assert load_prompts("toy:train") == train_prompts()
    assert load_prompts("toy:eval") == eval_prompts()
    with pytest.raises(ValueError, match="toy:test"):
        load_prompts("toy:test")


def test_txt_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  a cat \n\n a dog\n   \n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


def test_jsonl_reads_prompt_caption_or_text(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a cat"}, {"caption": "a dog", "id": 3}, {"text": " a cow "}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_prompts(str(path)) == ["a cat", "a dog", "a cow"]


def test_json_reads_hpdv2_benchmark_and_test_files(tmp_path):
    """HPDv2's benchmark/<style>.json is a list of strings; its test.json and train.json are lists of objects
    with a "prompt" field and annotation fields, and train.json repeats a prompt once per image pair."""
    benchmark = tmp_path / "anime.json"
    benchmark.write_text(json.dumps(["A hyena fursona at sunset.", " Walter White as a king. "]))
    assert load_prompts(str(benchmark)) == ["A hyena fursona at sunset.", "Walter White as a king."]
    pairs = tmp_path / "train.json"
    records = [
        {"human_preference": [0, 1], "prompt": "a cat", "image_path": ["0.jpg", "1.jpg"]},
        {"human_preference": [1, 0], "prompt": "a dog", "image_path": ["2.jpg", "3.jpg"]},
        {"human_preference": [1, 0], "prompt": "a cat", "image_path": ["4.jpg", "5.jpg"]},
        {"caption": "a cow"},
        "a hen",
    ]
    pairs.write_text(json.dumps(records, indent=2))
    assert load_prompts(str(pairs)) == ["a cat", "a dog", "a cow", "a hen"]


def test_txt_keeps_the_first_of_repeated_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\na dog\n a cat \n")
    assert load_prompts(str(path)) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "content, where",
    [
        ('["a cat", {"prompt": "a dog"}, {"url": "x"}]', r"p\.json\[2\]"),
        ('["a cat", 3]', r"p\.json\[1\]"),
        ('[{"prompt": ["a", "cat"]}]', r"p\.json\[0\]"),
        ('{"prompt": "a cat"}', r"p\.json: expected a JSON list"),
        ('["a cat",', r"p\.json: not valid JSON"),
    ],
)
def test_bad_json_names_path_and_index(tmp_path, content, where):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=where):
        load_prompts(str(path))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(str(path))


@pytest.mark.parametrize("suffix, content", [(".txt", "\n \n"), (".jsonl", "\n \n"), (".json", '["", "  "]')])
def test_empty_file_names_the_path(tmp_path, suffix, content):
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"no prompts in .*empty{suffix}"):
        load_prompts(str(path))


@pytest.mark.parametrize("bad", ["{not json", '{"url": "x"}', '["a cat"]', '{"prompt": 3}'])
def test_bad_jsonl_line_names_path_and_line(tmp_path, bad):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat"}\n\n' + bad + "\n")
    with pytest.raises(ValueError, match="p.jsonl:3"):
        load_prompts(str(path))


def test_unknown_extension_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="prompts.csv"):
        load_prompts(str(tmp_path / "prompts.csv"))


PROMPTS = [f"prompt {i}" for i in range(7)]


def test_sampler_epochs_are_permutations_and_reshuffle():
    sampler = PromptSampler(PROMPTS, seed=0)
    first, second = sampler.next(7), sampler.next(7)
    assert sorted(first) == sorted(second) == sorted(PROMPTS)
    assert first != second
    assert PromptSampler(PROMPTS, seed=0).next(14) == first + second
    assert PromptSampler(PROMPTS, seed=1).next(14) != first + second


def test_sampler_resumes_the_exact_sequence():
    straight = PromptSampler(PROMPTS, seed=5).next(20)
    sampler = PromptSampler(PROMPTS, seed=5)
    head = sampler.next(10)
    state = json.loads(json.dumps(sampler.state_dict()))
    resumed = PromptSampler(PROMPTS, seed=99)
    resumed.load_state_dict(state)
    assert head + resumed.next(10) == straight


def test_sampler_rejects_state_for_other_prompts_and_bad_requests():
    state = PromptSampler(PROMPTS, seed=0).state_dict()
    with pytest.raises(ValueError, match="7 prompts"):
        PromptSampler(PROMPTS[:3], seed=0).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptSampler([], seed=0)
    with pytest.raises(ValueError):
        PromptSampler(PROMPTS, seed=0).next(-1)
    assert PromptSampler(PROMPTS, seed=0).next(0) == []
