"""The synthetic scenes: deterministic renders, captions the tokenizers cover, a detector that reads them back."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image, ImageFilter
from transformers import CLIPTokenizer, T5TokenizerFast

from arcflow.demo import synthetic

SEED = 7


def test_scenes_and_renders_are_deterministic() -> None:
    first, again = synthetic.scene_batch(SEED, 10, 20), synthetic.scene_batch(SEED, 10, 20)
    assert first[1] == again[1]
    assert np.array_equal(first[0], again[0])
    other = synthetic.scene_batch(SEED + 1, 10, 20)
    assert [s.caption for s in other[1]] != [s.caption for s in first[1]]
    assert first[0].shape == (20, 64, 64, 3) and first[0].dtype == np.uint8


def test_scene_set_covers_every_attribute() -> None:
    scenes = [synthetic.make_scene(SEED, index) for index in range(400)]
    assert {s.colour for s in scenes} == set(synthetic.COLOURS)
    assert {s.shape for s in scenes} == set(synthetic.SHAPES)
    assert {s.count for s in scenes} == set(synthetic.COUNTS)
    assert {s.position for s in scenes} - {None} == set(synthetic.POSITIONS)
    assert {s.background for s in scenes} == set(synthetic.BACKGROUNDS)


@pytest.mark.parametrize("size", [64, 128])
def test_detector_reads_clean_renders_back(size: int) -> None:
    images, scenes = synthetic.scene_batch(SEED, 0, 150, size)
    for image, scene in zip(images, scenes):
        found = synthetic.detect(image)
        assert synthetic.prompt_follows(scene, found), (scene.caption, found)
        assert all(synthetic.attribute_matches(scene, found).values()), (scene.caption, found)


def test_detector_reads_softened_renders() -> None:
    """Decoded samples have soft edges: a 1-pixel Gaussian blur must not change what the detector reads."""
    images, scenes = synthetic.scene_batch(SEED, 0, 200)
    blurred = [np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0))) for image in images]
    scores = synthetic.accuracies(scenes, blurred)
    assert scores["shape"] >= 0.97 and scores["colour"] >= 0.97 and scores["count"] >= 0.95, scores


def test_detector_rejects_wrong_content() -> None:
    scene = synthetic.make_scene(SEED, 0)
    blank = np.full((64, 64, 3), synthetic.BACKGROUNDS["grey"], dtype=np.uint8)
    found = synthetic.detect(blank)
    assert found.count == 0 and found.colour is None and not synthetic.prompt_follows(scene, found)
    other_colour = next(c for c in synthetic.COLOURS if c != scene.colour)
    swapped = synthetic.Scene(other_colour, scene.shape, scene.size, scene.count, scene.position, scene.background,
                              scene.centres, scene.radius)
    assert not synthetic.prompt_follows(scene, synthetic.detect(synthetic.render(swapped)))
    for shape in synthetic.SHAPES:  # every other shape, drawn in the same place, is told apart
        drawn = synthetic.Scene(scene.colour, shape, "large", 1, "on the left", "white", ((0.4, 0.5),), 0.3)
        assert synthetic.detect(synthetic.render(drawn)).shape == shape


def test_tokenizers_cover_the_captions(tiny_flux_dir: pathlib.Path) -> None:
    """No unknown tokens, every caption fits the demo's 32 T5 tokens, content words are whole T5 pieces."""
    t5 = T5TokenizerFast.from_pretrained(tiny_flux_dir, subfolder="tokenizer_2")
    clip = CLIPTokenizer.from_pretrained(tiny_flux_dir, subfolder="tokenizer")
    captions = {synthetic.make_scene(SEED, index).caption for index in range(500)}
    for caption in captions:
        ids = t5(caption).input_ids
        assert t5.unk_token_id not in ids and len(ids) <= 32, caption
        assert clip.unk_token_id not in clip(caption).input_ids[1:-1], caption
    words = [*synthetic.COLOURS, *synthetic.SHAPES, *synthetic.SIZES, *synthetic.BACKGROUNDS, "two", "three"]
    for word in words:
        assert len(t5.tokenize(word)) == 1, word
