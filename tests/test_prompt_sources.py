"""Prompt sources: every local format and the hub path read the same rows; bad rows are named."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arcflow.config import PromptsConfig
from arcflow.data.prompt_sources import Prompt, load_prompt_table

ROWS = [{"prompt": "a red circle", "height": 128, "width": 64},
        {"prompt": " two blue squares ", "height": 64, "width": 128},
        {"prompt": "a cat", "height": 1024, "width": 1024}]
EXPECTED = [Prompt("a red circle", 128, 64), Prompt("two blue squares", 64, 128), Prompt("a cat", 1024, 1024)]


def prompts(table) -> list[Prompt]:
    return [table.prompt(i) for i in range(len(table))]


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_formats_read_the_same_prompts(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,height,width\n" + "".join(f"\"{r['prompt']}\",{r['height']},{r['width']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    jsonl(folder / "a.jsonl", ROWS[:2])
    jsonl(folder / "b.jsonl", ROWS[2:])
    (folder / ".hidden.csv").write_text("ignored")
    for source in (jsonl(tmp_path / "p.jsonl", ROWS), str(csv), str(tmp_path / "p.parquet"), str(folder)):
        table = load_prompt_table(PromptsConfig(source=source))
        assert prompts(table) == EXPECTED, source
        assert table.source_rows.tolist() == [0, 1, 2]


def test_text_file_uses_the_configured_size_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue square  \n")
    table = load_prompt_table(PromptsConfig(source=str(path), height=64, width=32))
    assert prompts(table) == [Prompt("a red circle", 64, 32), Prompt("a blue square", 64, 32)]


def test_row_range_max_size_and_fingerprint(tmp_path):
    rows = [{"prompt": f"prompt {i}", "height": 16 * (1 + i % 3), "width": 32} for i in range(10)]
    source = jsonl(tmp_path / "p.jsonl", rows)
    last = load_prompt_table(PromptsConfig(source=source, start_ind=-3))
    assert [p.text for p in prompts(last)] == ["prompt 7", "prompt 8", "prompt 9"]
    assert last.source_rows.tolist() == [7, 8, 9]
    first = load_prompt_table(PromptsConfig(source=source, end_ind=-3, max_size=4))
    assert [p.text for p in prompts(first)] == [f"prompt {i}" for i in range(4)]
    again = load_prompt_table(PromptsConfig(source=source, end_ind=-3, max_size=4))
    assert first.fingerprint() == again.fingerprint() != last.fingerprint()
    assert first.with_size(48, 64).heights.tolist() == [48] * 4


@pytest.mark.parametrize("name,content,message", [
    ("cols.jsonl", '{"text": "x"}\n', r"no 'prompt' column \(columns: text\)"),
    ("empty.jsonl", '{"prompt": "fine"}\n{"prompt": "   "}\n', "row 1: empty prompt"),
    ("null.jsonl", '{"prompt": "fine"}\n{"prompt": null}\n', "row 1: empty prompt"),
    ("size.jsonl", '{"prompt": "x", "height": 100, "width": 64}\n', "row 0: height x width 100 x 64 is not a positive"),
    ("neg.jsonl", '{"prompt": "x", "height": 64, "width": -16}\n', "64 x -16"),
    ("float.jsonl", '{"prompt": "x", "height": 64.5, "width": 64}\n', "column 'height' has type double"),
    ("zero.csv", "prompt,height,width\nx,64,64\ny,0,64\n", "row 1: height x width 0 x 64"),
    ("broken.jsonl", '{"prompt": "x"\n', "could not read prompts from .*broken.jsonl"),
    ("p.yaml", "prompt: x\n", "unsupported extension '.yaml'"),
])
def test_bad_input_is_a_clear_error_naming_file_and_row(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_prompt_table(PromptsConfig(source=str(path)), key="data.val")
    assert name in str(err.value)
    if "row" in message:
        assert "data.val.skip_invalid=True" in str(err.value)


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    rows = [{"prompt": "ok 0"}, {"prompt": ""}, {"prompt": "ok 2", "height": 1000}, {"prompt": "ok 3", "height": 32}]
    source = jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="arcflow"):
        table = load_prompt_table(PromptsConfig(source=source, height=64, width=64, skip_invalid=True))
    assert prompts(table) == [Prompt("ok 0", 64, 64), Prompt("ok 3", 32, 64)]  # no size given: the config's
    assert table.source_rows.tolist() == [0, 3]
    assert "skipping 2 invalid row(s) of 4" in caplog.text and "row 2: height x width 1000 x 64" in caplog.text


def test_missing_sources_and_empty_ranges(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_prompt_table(PromptsConfig(source=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(ValueError, match="set data.source"):
        load_prompt_table(PromptsConfig(source=""))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    jsonl(mixed / "a.jsonl", ROWS)
    (mixed / "b.csv").write_text("prompt\nx\n")
    with pytest.raises(ValueError, match="mixes formats"):
        load_prompt_table(PromptsConfig(source=str(mixed)))
    with pytest.raises(ValueError, match=r"no prompts in rows \[5:None\]"):
        load_prompt_table(PromptsConfig(source=jsonl(tmp_path / "p.jsonl", ROWS), start_ind=5))


def test_hub_id_goes_through_datasets_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    table = load_prompt_table(PromptsConfig(source="Lakonik/t2i-prompts-3m", start_ind=-2))
    assert calls == [("Lakonik/t2i-prompts-3m", "train")]
    assert prompts(table) == EXPECTED[1:] and np.array_equal(table.source_rows, [1, 2])


def test_unreachable_hub_names_the_dataset_and_the_way_out(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"'Lakonik/t2i-prompts-3m' \(split 'train'\).*local file or folder"):
        load_prompt_table(PromptsConfig(source="Lakonik/t2i-prompts-3m"))
    with pytest.raises(FileNotFoundError, match="neither a local file/folder nor a hub dataset id"):
        load_prompt_table(PromptsConfig(source="not a/valid/id"))
