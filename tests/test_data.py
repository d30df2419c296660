"""The bucket sampler (distributed, resumable across world sizes) and where conditioning comes from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from arcflow.config import PromptsConfig, load_config
from arcflow.data.batches import _encode_with, embedding_source, read_prompts
from arcflow.data.sampler import BucketBatchSampler
from arcflow.models.base import ConditioningSchema

DEMO = Path(__file__).resolve().parents[1] / "configs/demo/arcflux_tiny_2nfe.py"
BUCKETS = np.array([0] * 11 + [1] * 7 + [2] * 2 + [3] * 5)  # 25 items; bucket 2 is smaller than a batch


def run(world_size: int, steps: int, state: dict | None = None, batch_size: int = 3) -> tuple[list, list[dict]]:
    """``steps`` steps on ``world_size`` ranks: each step's global batch (the ranks' rows in rank order), and
    every rank's final state."""
    samplers = [BucketBatchSampler(BUCKETS, batch_size, seed=7, rank=r, world_size=world_size)
                for r in range(world_size)]
    for sampler in samplers:
        if state is not None:
            sampler.load_state_dict(json.loads(json.dumps(state)))
    batches = [np.concatenate([sampler.next_indices() for sampler in samplers]).tolist() for _ in range(steps)]
    return batches, [s.state_dict() for s in samplers]


def test_batches_have_one_bucket_and_an_epoch_uses_every_item():
    sampler = BucketBatchSampler(BUCKETS, 3, seed=7)
    epoch = [sampler.next_indices() for _ in range(sampler.batches_per_epoch)]
    assert sampler.batches_per_epoch == 4 + 3 + 1 + 2
    assert all(len(set(BUCKETS[b])) == 1 and len(b) == 3 for b in epoch)
    assert set(np.concatenate(epoch).tolist()) == set(range(len(BUCKETS)))
    following = [sampler.next_indices() for _ in range(sampler.batches_per_epoch)]
    assert [b.tolist() for b in following] != [b.tolist() for b in epoch]  # reshuffled each epoch
    again = BucketBatchSampler(BUCKETS, 3, seed=7)
    assert [again.next_indices().tolist() for _ in range(len(epoch))] == [b.tolist() for b in epoch]


@pytest.mark.parametrize("world_size", [2, 3, 6])
def test_ranks_split_each_global_batch_of_the_one_sequence(world_size):
    """Global batch 6 on one rank, or on 2, 3, 6 ranks: the same prompts in the same global positions."""
    single, _ = run(world_size=1, steps=12, batch_size=6)
    split, states = run(world_size=world_size, steps=12, batch_size=6 // world_size)
    assert split == single
    assert all(len(set(BUCKETS[b])) == 1 for b in split)  # every global batch has one shape
    assert all(s == states[0] for s in states) and states[0]["position"] == 12


@pytest.mark.parametrize("new_world_size", [1, 3, 6])
def test_resume_continues_the_same_sequence_with_any_number_of_ranks(new_world_size):
    """Saved on 2 ranks x 3, resumed on W' ranks x 6 / W': the same global batches (epochs are crossed)."""
    straight, _ = run(world_size=1, steps=15, batch_size=6)
    first, states = run(world_size=2, steps=5)  # epoch 0 has 2 + 2 + 1 + 1 global batches
    rest, _ = run(world_size=new_world_size, steps=10, state=states[0], batch_size=6 // new_world_size)
    assert first + rest == straight


def test_state_must_match_the_prompts_and_global_batch():
    _, states = run(world_size=2, steps=2)
    with pytest.raises(ValueError, match="global_batch_size=6, this run has 8"):
        BucketBatchSampler(BUCKETS, 4, seed=7, world_size=2).load_state_dict(states[0])
    with pytest.raises(ValueError, match="num_items=25, this run has 24"):
        BucketBatchSampler(BUCKETS[1:], 6, seed=7).load_state_dict(states[0])
    old = {"seed": 7, "batch_size": 6, "num_items": 25, "batches_per_epoch": 6, "position": 3}
    with pytest.raises(ValueError, match="per-rank batches"):
        BucketBatchSampler(BUCKETS, 6, seed=7).load_state_dict(old)


def test_bucketize_off_uses_the_configured_size_and_repeat(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "height": 64, "width": 32 * (1 + i)}) for i in range(4)))
    split = PromptsConfig(source=str(path), start_ind=-2, repeat=2, height=48, width=80)
    assert [(p.text, p.width) for p in read_prompts(split)] == [("p2", 96), ("p3", 128)] * 2
    split.bucketize = False
    assert {(p.height, p.width) for p in read_prompts(split)} == {(48, 80)}


def fake_cache(root: Path, complete: tuple[str, ...], started: tuple[str, ...] = (), **encoder) -> None:
    """Just the files the rule looks at: a manifest per complete split, a plan per started one."""
    cfg = load_config(DEMO)
    for name in complete:
        split = getattr(cfg.data, name)
        (root / name).mkdir(parents=True)
        manifest = {"format": "arcflow-prompt-cache/2", "complete": True, "max_size": None,
                    "source": {"source": split.source, "split": split.split, "start_ind": split.start_ind,
                               "end_ind": split.end_ind, "height": split.height, "width": split.width},
                    "encoder": {"type": "PretrainedFluxTextEncoder", "max_sequence_length": 32,
                                "pretrained": cfg.model.pretrained, **encoder}}
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    for name in started:
        (root / name).mkdir(parents=True)
        (root / name / "plan.json").write_text("{}")


def config(root: Path, **options):
    return load_config(DEMO, {"data.data_root": str(root), **options})


def test_rule_cache_when_complete_else_on_the_fly_with_a_text_encoder(tmp_path):
    assert embedding_source(config(tmp_path / "none")) == "encoder"  # the demo config has model.text_encoder
    fake_cache(tmp_path / "full", ("train", "val"))
    assert embedding_source(config(tmp_path / "full")) == "cache"
    assert embedding_source(config(tmp_path / "full", **{"data.cache": "never"})) == "encoder"
    assert embedding_source(config(tmp_path / "full", **{"model.text_encoder": None})) == "cache"


@pytest.mark.parametrize("layout,options,message", [
    ({}, {"model.text_encoder": None}, "no prompt-embedding cache .* and no model.text_encoder"),
    ({}, {"data.cache": "always"}, "does not exist and data.cache='always'"),
    ({"complete": ("train",), "started": ("val",)}, {}, "is not complete .* or set data.cache='never'"),
    ({"complete": ("train", "val")}, {"model.text_encoder.max_sequence_length": 64},
     "model.text_encoder.max_sequence_length: cache 32, config 64"),
    ({"complete": ("train", "val")}, {"data.val.start_ind": -16}, "data.val.start_ind: cache -8, config -16"),
    ({"complete": ("train", "val")}, {"data.train.max_size": 10}, "data.train.max_size: cache None, config 10"),
])
def test_rule_errors_say_how_to_fix(tmp_path, layout, options, message):
    fake_cache(tmp_path / "root", layout.get("complete", ()), layout.get("started", ()))
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        embedding_source(config(tmp_path / "root", **options))


def test_data_config_errors_name_the_key():
    with pytest.raises(ValueError, match="data.cache"):
        load_config(DEMO, {"data.cache": "sometimes"})
    with pytest.raises(ValueError, match="data.val.height"):
        load_config(DEMO, {"data.val.height": 100})
    cfg = load_config(DEMO, {"data.source": "other.jsonl", "data.val.prompt_file": "old.jsonl"})
    assert (cfg.data.train.source, cfg.data.val.source) == ("other.jsonl", "old.jsonl")  # prompt_file: older name
    with pytest.raises(ValueError, match="data.train.prompt_file"):
        load_config(DEMO, {"data.train.source": "a.jsonl", "data.train.prompt_file": "b.jsonl"})


class _MaskedEncoder:
    """A family-neutral stand-in: variable-length rows with a mask, and a negative prompt."""

    schema = ConditioningSchema(sequences={"prompt_embeds": "prompt_embeds_mask"}, negative_prompt="")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(prompts))
        lengths = [max(len(p.split()), 1) for p in prompts]
        longest = max(lengths)
        mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
        embeds = torch.arange(len(prompts) * longest * 3, dtype=torch.float64).reshape(len(prompts), longest, 3)
        return {"prompt_embeds": embeds * mask[..., None], "prompt_embeds_mask": mask}


def test_on_the_fly_conditioning_carries_the_negative_prompt_once_embedded():
    encoder = _MaskedEncoder()
    encode = _encode_with(encoder, torch.device("cpu"), torch.float32)
    first = encode(["a red circle", "two"])
    second = encode(["three blue squares at the top"])
    assert encoder.calls == [["a red circle", "two"], [""], ["three blue squares at the top"]]  # "" embedded once
    assert first["prompt_embeds"].dtype == torch.float32 and first["prompt_embeds_mask"].dtype == torch.int64
    assert first["negative_prompt_embeds"].shape == (2, 1, 3) and second["negative_prompt_embeds"].shape == (1, 1, 3)
    torch.testing.assert_close(first["negative_prompt_embeds"][1], second["negative_prompt_embeds"][0])
    assert first["negative_prompt_embeds_mask"].tolist() == [[1], [1]]


def test_a_schema_without_negative_prompt_adds_nothing():
    class Plain(_MaskedEncoder):
        schema = ConditioningSchema(sequences={"prompt_embeds": "prompt_embeds_mask"})

    encoder = Plain()
    assert set(_encode_with(encoder, torch.device("cpu"), torch.float32)(["x"])) == {"prompt_embeds",
                                                                                      "prompt_embeds_mask"}
    assert encoder.calls == [["x"]]
