"""The synthetic world where identity is learnable, the training examples that reward memory, and
the hue check (toyworld-spec §2)."""

import colorsys

import numpy as np
import pytest

from onestory_jax.config_files import load_config
from onestory_jax.data import synthetic
from onestory_jax.data.pipeline import memory_shots, three_shot_example
from onestory_jax.eval import hue
from onestory_jax.eval.recall import named_shots, recall_metrics, recall_shots

T, H, W = 3, 8, 8


def test_stories_introduce_four_characters_one_a_shot_and_refer_to_returns():
    first_shot_recalled = []
    for seed in range(200):
        story = synthetic.make_story(seed, 8)
        order = [s.characters for s in story.shots]
        assert all(len(c) == 1 for c in order) and len(story.characters) == 4
        assert {c[0] for c in order} == {0, 1, 2, 3}
        assert all(a != b for a, b in zip(order, order[1:]))  # no immediate repeat
        assert len({c.shape for c in story.characters}) == len({c.colour for c in story.characters}) == 4
        for j, shot in enumerate(story.shots):
            ch = story.characters[shot.characters[0]]
            if shot.characters in order[:j]:
                assert shot.caption.startswith(f"The same {ch.shape} returns to") and ch.colour not in shot.caption
            else:
                assert ch.name() in shot.caption
        first_shot_recalled += [c == order[0][0] for _, c in recall_shots(story)]
    # the recalled character is often not shot 1's, so uniform frames over the memory miss it
    assert 0.2 < np.mean(first_shot_recalled) < 0.6


def test_characters_are_large_plain_and_the_only_saturated_pixels():
    shares = []
    for seed in range(20):
        story = synthetic.make_story(seed)
        for i in range(len(story.shots)):
            video, masks = synthetic.render_shot(story, i, frames=5)
            _, sat, _ = hue.hue_saturation_value(video)
            shares.append((masks > 0).mean())
            assert sat[masks == 0].max() < 0.2 and sat[masks > 0].min() > 0.6
            colour = synthetic.COLOURS[story.characters[story.shots[i].characters[0]].colour]
            assert np.all(video[masks > 0] == colour)  # plain: no pattern
    assert 0.14 < np.mean(shares) < 0.22


def _keyed_video(keys, rng):
    n = len(keys)
    return {
        "latents": np.arange(n, dtype=np.float32)[:, None, None, None, None] * np.ones((n, T, H, W, 16), np.float32),
        "frame_embeddings": rng.standard_normal((n, T, 5)).astype(np.float32),
        "text": rng.standard_normal((n, 4, 32)).astype(np.float32),
        "text_lengths": np.full((n,), 4, np.int32),
        "augmented_first": np.zeros((T, H, W, 16), np.float32),
        "image_tokens": np.ones((4, 16), np.float32),
        "first_image": np.full((T, H, W, 16), 7.0, np.float32),
        "shot_keys": np.asarray(keys, np.int32),
        "id": np.bytes_("v"),
    }


def test_recall_triplets_hold_the_targets_latest_earlier_appearance():
    keys = np.asarray([0, 1, 2, 0, 3, 1, 2])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        a, b, j = memory_shots(keys, len(keys), rng, "recall")
        assert 0 <= a < b == j - 1
        earlier = [i for i in range(j - 1) if keys[i] == keys[j]]
        assert a == (earlier[-1] if earlier else a)
        seen.add(j)
    assert seen == set(range(2, len(keys)))
    assert memory_shots(keys, len(keys), np.random.default_rng(0), "consecutive")[1:] in {(k + 1, k + 2) for k in range(5)}
    # unknown keys (real videos): a random earlier shot, then the previous one
    draws = [memory_shots(np.full(6, -1), 6, rng, "recall") for _ in range(100)]
    assert all(a < b == j - 1 for a, b, j in draws) and len({a for a, _, _ in draws}) == 4


def test_recall_examples_show_the_recalled_character_and_first_shots_their_image():
    cfg = load_config("tiny", ["train.memory_pick=recall", "train.first_shot_prob=0.3"])
    video = _keyed_video([0, 1, 2, 0, 3, 1], np.random.default_rng(0))
    rng = np.random.default_rng(1)
    first = 0
    for _ in range(100):
        ex = three_shot_example(video, rng, None, cfg)
        target = int(ex["target"][0, 0, 0, 0])  # latents hold their shot index
        if not ex["memory_valid"].any():  # shot 1 from its first frame (Wan's I2V task)
            first += 1
            assert target == 0 and np.all(ex["cond"][0, ..., :4] == 1) and np.all(ex["cond"][1:, ..., :4] == 0)
            assert np.all(ex["cond"][..., 4:] == 7.0) and np.all(ex["image"] == 1.0)
            continue
        older, newer = int(ex["memory"][0, 0, 0, 0]), int(ex["memory"][T, 0, 0, 0])
        assert newer == target - 1 and np.all(ex["cond"] == 0)
        if target in (3, 5):  # returns: the older memory shot shows the same character
            assert video["shot_keys"][older] == video["shot_keys"][target]
    assert 15 < first < 45


def test_hue_check_names_ground_truth_and_fails_where_it_should():
    for seed in range(10):
        story = synthetic.make_story(10**6 + seed, 8)
        for i, shot in enumerate(story.shots):
            video, _ = synthetic.render_shot(story, i, frames=9)
            truth = story.characters[shot.characters[0]].colour
            assert hue.shot_colour(video) == truth
            # blur and grey blending keep the hue (the strict check abstains on these)
            grey = (0.5 * video + 0.5 * video.mean(-1, keepdims=True)).astype(np.uint8)
            assert hue.shot_colour(grey) == truth
            # a hue shift of 20 degrees still names the colour; of 60 degrees, the neighbour
            h, s, v = colorsys.rgb_to_hsv(*(np.asarray(synthetic.COLOURS[truth]) / 255))
            for shift, same in ((20, True), (60, False)):
                rgb = np.asarray(colorsys.hsv_to_rgb((h + shift / 360) % 1, s, v)) * 255
                recoloured = np.where((video == synthetic.COLOURS[truth]).all(-1, keepdims=True), rgb, video).astype(np.uint8)
                assert (hue.shot_colour(recoloured) == truth) == same
    story = synthetic.make_story(10**6, 8)
    video, masks = synthetic.render_shot(story, 0, frames=9)
    empty = np.where(masks[..., None] > 0, 128, video).astype(np.uint8)  # no character drawn
    assert hue.shot_colour(empty) is None


def test_recall_metrics_score_recall_and_named_shots_with_the_hue_check():
    story = synthetic.make_story(3, 4)  # characters 0, 1, 2, then 0 returns
    assert recall_shots(story) == [(3, 0)] and named_shots(story) == [(0, 0), (1, 1), (2, 2)]
    frames = [synthetic.render_shot(story, i, frames=5)[0] for i in range(4)]
    manifest = {"shots": [{"memory": []}, {"memory": [{"shot": 1}]}, {"memory": [{"shot": 2}]}, {"memory": [{"shot": 3}]}]}
    assert recall_metrics(story, frames, None, manifest) == {"recall_colour": 1.0, "named_colour": 1.0, "selection_accuracy": 0.0}
    manifest["shots"][3]["memory"] = [{"shot": 1}]
    wrong = frames[:3] + [frames[1]]  # the return drawn as another character
    assert recall_metrics(story, wrong, None, manifest) == {"recall_colour": 0.0, "named_colour": 1.0, "selection_accuracy": 1.0}


@pytest.mark.parametrize("n_shots", [2, 3, 5, 8])
def test_every_story_length_has_a_valid_cast(n_shots):
    for seed in range(30):
        story = synthetic.make_story(seed, n_shots)
        assert len(story.characters) == synthetic.cast_size(n_shots) == len({s.characters for s in story.shots})


def test_teacher_forced_sampler_generates_from_the_memory_it_is_given():
    import jax

    from onestory_jax.models.onestory import init_params
    from onestory_jax.sampling.generate import generation_spec
    from onestory_jax.sampling.teacher_forced import shot_sampler

    cfg = load_config("tiny")
    params = init_params(cfg, jax.random.key(0))
    spec = generation_spec(cfg, "last_frame", 1, (H, W), 2, 3.0, "euler", 3.0)
    sample = shot_sampler(params, cfg, spec, max_memory_shots=2)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, H, W, 16)).astype(np.float32)
    caption = rng.standard_normal((8, cfg.dit.text_dim)).astype(np.float32)
    shot, other = (rng.standard_normal((2, H, W, 16)).astype(np.float32) for _ in range(2))
    empty, one, again, wrong = (
        sample([], caption, noise),
        sample([shot], caption, noise),
        sample([shot], caption, noise),
        sample([other], caption, noise),
    )
    assert one.shape == noise.shape and np.array_equal(one, again)
    assert not np.allclose(one, empty) and not np.allclose(one, wrong)
    with pytest.raises(ValueError, match="3 memory shots"):
        sample([shot] * 3, caption, noise)


def test_character_cells_pool_masks_to_the_latent_grid():
    """Wan's grouping (frame 0, then 4 frames a latent frame) and 8x8 pooling, by hand."""
    from onestory_jax.data.prepare import character_cells

    masks = np.zeros((5, 16, 16), np.uint8)
    masks[0, :8, :8] = 1  # frame 0: the top-left cell, fully
    masks[1:3, 8:, 8:] = 255  # frames 1-2 of the group 1-4: the bottom-right cell, half the time
    masks[4, 8:12, :8] = 1  # frame 4: half of the bottom-left cell, a quarter of the time
    cells = character_cells(masks, (2, 2))
    np.testing.assert_allclose(cells, [[[1, 0], [0, 0]], [[0, 0], [0.125, 0.5]]])


def test_character_weight_weighs_the_target_shots_cells():
    video = _keyed_video([0, 1, 2, 0], np.random.default_rng(0))
    cells = np.random.default_rng(1).uniform(0, 1, video["latents"].shape[:-1]).astype(np.float32)
    rng = np.random.default_rng(2)
    plain = three_shot_example({**video, "character_cells": cells}, rng, None, load_config("tiny"))
    assert "loss_weight" not in plain  # train.character_loss_weight 0: uniform L_shot
    cfg = load_config("tiny", ["train.character_loss_weight=4", "train.first_shot_prob=0.5"])
    for _ in range(20):
        ex = three_shot_example({**video, "character_cells": cells}, rng, None, cfg)
        target = int(ex["target"][0, 0, 0, 0])
        np.testing.assert_allclose(ex["loss_weight"], 1 + 4 * cells[target])
    unknown = three_shot_example(video, rng, None, cfg)  # a record without characters (a real video) weighs 1
    np.testing.assert_array_equal(unknown["loss_weight"], 1.0)


def test_memory_frames_carry_their_own_shots_caption():
    """memory.selector_reads_captions: each memory frame's `memory_text` is the mean of its shot's caption
    tokens (padding left out): the recalled shot's, the previous shot's, an inserted shot's own, none for shot 1."""
    cfg = load_config("tiny", ["train.memory_pick=recall", "train.first_shot_prob=0.3", "memory.selector_reads_captions=true"])
    rng = np.random.default_rng(2)
    video = {**_keyed_video([0, 1, 2, 0, 3, 1], rng), "text_lengths": np.asarray([2, 3, 4, 1, 2, 3], np.int32)}
    mean_caption = lambda v, s: v["text"][s, : v["text_lengths"][s]].mean(0)  # noqa: E731
    kinds = set()
    for _ in range(60):
        ex = three_shot_example(video, rng, None, cfg)
        if not ex["memory_valid"].any():
            kinds.add("first")
            assert not np.any(ex["memory_text"])
            continue
        kinds.add("triplet")
        for half in (0, T):
            shot = int(ex["memory"][half, 0, 0, 0])
            np.testing.assert_allclose(
                ex["memory_text"][half : half + T], np.broadcast_to(mean_caption(video, shot), (T, 32)), rtol=1e-6
            )
    assert kinds == {"first", "triplet"}
    two = {
        k: (v[:2] if k in ("latents", "frame_embeddings", "text", "text_lengths", "shot_keys") else v) for k, v in video.items()
    }
    other = {**two, "text": rng.standard_normal(two["text"].shape).astype(np.float32), "latents": two["latents"] + 10.0}
    inflated = load_config("tiny", ["memory.selector_reads_captions=true", "train.insertion_prob=1", "train.first_shot_prob=0"])
    ex = three_shot_example(two, rng, lambda r: other, inflated)
    inserted = ex["memory"][:, 0, 0, 0] >= 10.0  # [F]: frames of the other video's shot
    shot = int(ex["memory"][inserted][0, 0, 0, 0]) - 10
    np.testing.assert_allclose(ex["memory_text"][inserted], np.broadcast_to(mean_caption(other, shot), (T, 32)), rtol=1e-6)
    np.testing.assert_allclose(ex["memory_text"][~inserted], np.broadcast_to(mean_caption(two, 0), (T, 32)), rtol=1e-6)
