"""Prompt files and the resumable same-shape batch sampler."""

import json

import pytest

from arcflow.config import PromptsConfig
from arcflow.data import Prompt, PromptBatchSampler, read_prompts


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_text_and_jsonl(tmp_path):
    txt = write(tmp_path, "p.txt", "a red circle\n\n  a blue square  \n")
    assert read_prompts(PromptsConfig(prompt_file=txt, height=64, width=32)) == [
        Prompt("a red circle", 64, 32), Prompt("a blue square", 64, 32)]
    lines = [{"prompt": "x", "height": 128, "width": 64}, {"prompt": "y"}]
    jsonl = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in lines))
    assert read_prompts(PromptsConfig(prompt_file=jsonl, height=32, width=32)) == [
        Prompt("x", 128, 64), Prompt("y", 32, 32)]


def test_slicing_and_repeat(tmp_path):
    txt = write(tmp_path, "p.txt", "\n".join(f"prompt {i}" for i in range(10)))
    got = read_prompts(PromptsConfig(prompt_file=txt, start_ind=-3, repeat=2))
    assert [p.text for p in got] == ["prompt 7", "prompt 8", "prompt 9"] * 2


@pytest.mark.parametrize("line,message", [
    ('{"text": "x"}', "string 'prompt'"),
    ('{"prompt": "  "}', "empty prompt"),
    ('{"prompt": "x", "height": 100}', "height 100"),
    ('{"prompt": "x", "width": -16}', "width -16"),
    ('{"prompt": "x"', "not valid JSON"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", '{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        read_prompts(PromptsConfig(prompt_file=path))
    assert "bad.jsonl:2" in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_prompts(PromptsConfig(prompt_file=str(tmp_path / "nowhere.txt")))


def test_batches_share_one_size_and_resume_exactly():
    prompts = [Prompt(f"p{i}", 64 if i % 3 else 128, 64) for i in range(20)]
    sampler = PromptBatchSampler(prompts, batch_size=3, seed=5)
    first = [sampler.next_batch() for _ in range(4)]
    state = sampler.state_dict()
    rest = [sampler.next_batch() for _ in range(10)]  # crosses an epoch boundary
    assert all(len({(p.height, p.width) for p in batch}) == 1 and len(batch) == 3 for batch in first + rest)
    resumed = PromptBatchSampler(prompts, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(10)] == rest
    again = PromptBatchSampler(prompts, batch_size=3, seed=5)
    assert [again.next_batch() for _ in range(4)] == first
