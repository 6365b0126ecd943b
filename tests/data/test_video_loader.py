"""Video clips (eva_pipeline.loader.video): TSN and test-view sampling, clip transforms, the clip datasets.

Clips come from ``video_fakes.FakeDecode``: a transformed clip says which frames, which video and which way round.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from video_fakes import FakeDecode, clip_rows, synthetic_frames, unnormalise

from eva_pipeline.loader.classification import classification_loader
from eva_pipeline.loader.video import (
    MULTISCALE_SCALES,
    VIDEO_MEAN,
    VIDEO_STD,
    BadClip,
    VideoClipDataset,
    VideoViewsDataset,
    item_rng,
    middle_view,
    multiscale_crop_box,
    spatial_crops,
    strided_indices,
    train_clip_transform,
    tsn_indices,
    uniform_view_indices,
)

SIZE, T = 16, 4


def frame_ids(clip: torch.Tensor) -> list[int]:
    """The source frame index of each frame of a transformed (C, T, H, W) clip."""
    return unnormalise(clip)[0].mean(dim=(1, 2)).round().to(torch.int64).tolist()


def video_id(clip: torch.Tensor) -> int:
    return round(unnormalise(clip)[1].mean().item() / 10)


# ---------------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(("n", "t"), [(300, 8), (40, 8), (17, 16), (16, 16), (9, 4)])
def test_tsn_indices_one_frame_inside_each_segment(n: int, t: int) -> None:
    bounds = (np.arange(t + 1) * n) // t
    for seed in range(20):
        picked = tsn_indices(n, t, np.random.default_rng(seed))
        assert picked.shape == (t,) and picked.dtype == np.int64
        assert np.all(picked >= bounds[:-1]) and np.all(picked < bounds[1:])
        assert np.all(np.diff(picked) > 0)
    centres = tsn_indices(n, t)  # the frame at each segment's middle moment: it overlaps the segment
    assert np.all(centres >= bounds[:-1]) and np.all(centres < -((-np.arange(1, t + 1) * n) // t))
    assert np.all(np.diff(centres) > 0)


def test_tsn_indices_deterministic_per_seed_and_random_across_seeds() -> None:
    draw = [tsn_indices(300, 8, np.random.default_rng(s)) for s in (1, 1, 2)]
    assert np.array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])
    # every frame of every segment is reachable: 400 draws over segments of 3 or 4 frames
    seen = np.zeros(30, dtype=bool)
    for s in range(400):
        seen[tsn_indices(30, 8, np.random.default_rng(s))] = True
    assert seen.all()


@pytest.mark.parametrize(("n", "t"), [(32, 8), (40, 8), (17, 16), (9, 4)])
def test_strided_indices_evenly_spaced_one_offset_inside_each_segment(n: int, t: int) -> None:
    bounds = (np.arange(t + 1) * n) // t
    offsets = set()
    for seed in range(40):
        picked = strided_indices(n, t, np.random.default_rng(seed))
        assert picked.shape == (t,) and picked.dtype == np.int64
        assert np.all(picked >= bounds[:-1]) and np.all(picked < bounds[1:]) and np.all(np.diff(picked) > 0)
        offsets.add(tuple(picked - bounds[:-1]))
    assert all(len(set(o)) == 1 for o in offsets)  # one offset for every segment
    assert len(offsets) == int((bounds[1:] - bounds[:-1]).min())  # and every offset that fits each segment drawn
    if n % t == 0:
        assert all(len(set(np.diff(np.asarray(o) + bounds[:-1]))) == 1 for o in offsets)  # evenly spaced
    assert np.array_equal(strided_indices(n, t), tsn_indices(n, t))  # testing: the same segment middles


def test_the_training_sampling_is_a_dataset_option() -> None:
    def frames_of(sampling: str) -> list[list[int]]:
        dataset = VideoClipDataset(
            clip_rows(3, frames=40), num_frames=8, img_size=SIZE, train=True, sampling=sampling, decode=FakeDecode()
        )
        return [frame_ids(dataset[i][0]) for i in range(3)]

    strided = frames_of("strided")
    assert all(len(set(np.diff(ids))) == 1 for ids in strided[:1])  # clip 0 has 40 frames: spacing 5 everywhere
    assert frames_of("tsn") != strided
    with pytest.raises(ValueError, match="sampling must be one of"):
        VideoClipDataset(clip_rows(3), num_frames=T, img_size=SIZE, train=True, sampling="dense")


def test_tsn_centres_equal_the_official_test_sampling() -> None:
    # EVA-01 SampleFrames._get_test_clips: int(avg * i + avg / 2), avg = N / T
    for n, t in [(300, 8), (250, 16), (64, 8), (31, 8)]:
        avg = n / t
        official = (np.arange(t) * avg + avg / 2).astype(np.int64)
        assert np.array_equal(tsn_indices(n, t), official)


def test_short_videos_repeat_frames_deterministically() -> None:
    expected = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # floor((i + 0.5) * 3 / 8)
    assert np.array_equal(tsn_indices(3, 8), expected)
    assert np.array_equal(tsn_indices(3, 8, np.random.default_rng(0)), expected)
    assert np.array_equal(tsn_indices(1, 4), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least one frame"):
        tsn_indices(0, 8)
    with pytest.raises(ValueError, match="num_segments"):
        tsn_indices(10, 0)


def test_uniform_views_shape_determinism_and_coverage() -> None:
    views = uniform_view_indices(300, 8, 4)
    assert views.shape == (4, 8)
    assert np.array_equal(views, uniform_view_indices(300, 8, 4))
    bounds = np.arange(9) * 37.5  # segment i spans the moments [37.5 i, 37.5 (i + 1))
    assert np.all(views >= np.floor(bounds[:-1])) and np.all(views < bounds[1:])
    assert np.all(np.diff(views, axis=1) > 0)  # each clip runs forward in time
    assert len({tuple(row) for row in views}) == 4  # four different clips
    # segments of 4 frames and 4 clips: clip c takes offset c, together every frame exactly once
    grid = uniform_view_indices(32, 8, 4)
    assert np.array_equal(grid, np.arange(8)[None, :] * 4 + np.arange(4)[:, None])
    # one clip is the segment middles
    assert np.array_equal(uniform_view_indices(300, 8, 1)[0], tsn_indices(300, 8))
    short = uniform_view_indices(3, 8, 4)
    assert short.shape == (4, 8) and short.min() >= 0 and short.max() <= 2
    assert middle_view(4, 3) == 7 and middle_view(1, 1) == 0 and middle_view(3, 3) == 4


# -------------------------------------------------------------------------------------------------------- transforms


def test_spatial_crops_landscape_and_portrait_order_and_normalisation() -> None:
    clip = synthetic_frames(3, [5, 6])
    crops = spatial_crops(clip, SIZE)
    assert crops.shape == (3, 3, 2, SIZE, SIZE) and crops.dtype == torch.float32
    ramp = [unnormalise(c)[2].mean().item() for c in crops]
    assert ramp[0] < ramp[1] < ramp[2]  # left, centre, right
    # constant channels come out exactly normalised: frame index 5 and 6, video 30
    expected = (torch.tensor([5.0, 6.0]) / 255 - VIDEO_MEAN[0]) / VIDEO_STD[0]
    assert torch.allclose(crops[0, 0, :, 0, 0], expected, atol=1e-6)
    assert torch.allclose(crops[:, 1], torch.full_like(crops[:, 1], (30 / 255 - VIDEO_MEAN[1]) / VIDEO_STD[1]))
    # the centre crop alone is the middle one of the three
    assert torch.equal(spatial_crops(clip, SIZE, 1)[0], crops[1])
    portrait = np.ascontiguousarray(clip.transpose(0, 2, 1, 3))  # the ramp now runs top to bottom
    tall = spatial_crops(portrait, SIZE)
    assert tall.shape == (3, 3, 2, SIZE, SIZE)
    ramp = [unnormalise(c)[2].mean().item() for c in tall]
    assert ramp[0] < ramp[1] < ramp[2]  # top, centre, bottom
    with pytest.raises(ValueError, match="uint8"):
        spatial_crops(clip.astype(np.float32), SIZE)
    with pytest.raises(ValueError, match="spatial crops"):
        spatial_crops(clip, SIZE, 2)


def test_multiscale_crop_boxes_follow_tsn() -> None:
    rng = np.random.default_rng(0)
    sides = [int(240 * s) for s in MULTISCALE_SCALES]
    seen = set()
    for _ in range(400):
        top, left, h, w = multiscale_crop_box(240, 320, rng)
        i, j = sides.index(h), sides.index(w)
        assert abs(i - j) <= 1
        w_step, h_step = (320 - w) // 4, (240 - h) // 4
        assert (top, left) in {
            (0, 0),
            (0, 4 * w_step),
            (4 * h_step, 0),
            (4 * h_step, 4 * w_step),
            (2 * h_step, 2 * w_step),
        }
        seen.add((h, w))
    assert len(seen) == 10  # 4 scales, pairs at most one level apart: 4 + 2 * 3


def test_train_transform_shape_same_crop_on_every_frame_and_flip_off() -> None:
    still = synthetic_frames(2, [9] * T)  # a clip of identical frames
    for seed in range(12):
        out = train_clip_transform(still, np.random.default_rng(seed), img_size=SIZE, hflip=False)
        assert out.shape == (3, T, SIZE, SIZE) and out.dtype == torch.float32
        assert all(torch.equal(out[:, 0], out[:, k]) for k in range(1, T))  # the same crop on every frame
        ramp = unnormalise(out)[2].mean(dim=(0, 1))
        assert ramp[-1] > ramp[0]  # never flipped: left stays left
        flipped = train_clip_transform(still, np.random.default_rng(seed), img_size=SIZE, hflip=True)
        assert torch.equal(flipped, out) or torch.equal(flipped, out.flip(-1))  # the flag changes only the flip
    flips = [
        not torch.equal(
            train_clip_transform(still, np.random.default_rng(s), img_size=SIZE, hflip=True),
            train_clip_transform(still, np.random.default_rng(s), img_size=SIZE, hflip=False),
        )
        for s in range(12)
    ]
    assert any(flips) and not all(flips)


def test_colour_options_apply_to_the_whole_clip() -> None:
    still = synthetic_frames(2, [9] * T)
    grey = unnormalise(train_clip_transform(still, np.random.default_rng(0), img_size=SIZE, grayscale=1.0))
    assert torch.allclose(grey[0], grey[1], atol=1e-3) and torch.allclose(grey[1], grey[2], atol=1e-3)
    plain = train_clip_transform(still, np.random.default_rng(0), img_size=SIZE)
    jittered = train_clip_transform(still, np.random.default_rng(0), img_size=SIZE, color_jitter=1.0)
    assert not torch.allclose(plain, jittered)
    assert all(torch.equal(jittered[:, 0], jittered[:, k]) for k in range(1, T))
    with pytest.raises(ValueError, match="probability"):
        train_clip_transform(still, np.random.default_rng(0), img_size=SIZE, color_jitter=1.5)


# ---------------------------------------------------------------------------------------------------------- datasets


def train_set(decode: FakeDecode | None = None, rows: pd.DataFrame | None = None, **kwargs) -> VideoClipDataset:
    return VideoClipDataset(
        clip_rows() if rows is None else rows,
        num_frames=T,
        img_size=SIZE,
        train=True,
        seed=kwargs.pop("seed", 3),
        decode=decode or FakeDecode(),
        **kwargs,
    )


def test_item_is_a_pure_function_of_seed_epoch_index() -> None:
    a, b = train_set(), train_set()
    b.set_epoch(2)
    b.set_epoch(0)
    for i in range(len(a)):
        (xa, ya), (xb, yb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (3, T, SIZE, SIZE) and ya.dtype == torch.int64 and int(ya) == i % 3
        assert video_id(xa) == i
        bounds = (np.arange(T + 1) * (40 + i)) // T
        ids = frame_ids(xa)
        assert all(bounds[k] <= ids[k] < bounds[k + 1] for k in range(T))
    b.set_epoch(1)
    assert not all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    c = train_set(seed=4)
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(len(a)))
    assert [frame_ids(x) for x, _ in a.__getitems__([0, 1])] == [frame_ids(a[0][0]), frame_ids(a[1][0])]


def test_batches_do_not_depend_on_workers() -> None:
    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = classification_loader(train_set(), 2, shuffle=True, seed=7, epoch=1, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == 3 and serial[0][0].shape == (2, 3, T, SIZE, SIZE)
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_mode_is_the_1x1_view() -> None:
    decode = FakeDecode()
    dataset = VideoClipDataset(clip_rows(), num_frames=T, img_size=SIZE, train=False, decode=decode)
    x, y = dataset[2]
    frames = synthetic_frames(2, tsn_indices(42, T).tolist())
    assert torch.equal(x, spatial_crops(frames, SIZE, 1)[0])
    assert int(y) == 2
    dataset.set_epoch(5)
    assert torch.equal(dataset[2][0], x)


def test_bad_clip_is_replaced_listed_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    decode = FakeDecode(bad=frozenset({"v1.mp4", "v2.mp4", "v5.mp4"}))
    dataset = train_set(decode, root="/data")
    with caplog.at_level(logging.WARNING, logger="eva_pipeline.loader.video"):
        x, y = dataset[1]
    assert video_id(x) == 3 and int(y) == 3 % 3  # v1 and v2 fail: the next that decodes is v3
    # replacing clip 3 for item 1 is still drawn from (seed, epoch, item 1, clip 3): deterministic
    assert torch.equal(train_set(FakeDecode(bad=frozenset({"v1.mp4", "v2.mp4", "v5.mp4"})), root="/data")[1][0], x)
    assert dataset.bad_clips == [
        ("/data/clips/v1.mp4", "moov atom not found in v1.mp4"),
        ("/data/clips/v2.mp4", "moov atom not found in v2.mp4"),
    ]
    assert "/data/clips/v1.mp4" in caplog.text and "moov atom not found in v1.mp4" in caplog.text
    assert video_id(dataset[5][0]) == 0  # the last clip wraps round to the first
    assert len(dataset.bad_clips) == 3
    dataset[1]
    assert len(dataset.bad_clips) == 3  # listed once
    broken = train_set(FakeDecode(bad=frozenset(f"v{i}.mp4" for i in range(6))))
    with pytest.raises(RuntimeError, match="none of the 6 clips"):
        broken[0]


def test_decode_gets_root_joined_paths_and_distinct_frames() -> None:
    decode = FakeDecode()
    rows = pd.DataFrame({"path": ["v0.mp4"], "num_frames": [2], "label": [0]})
    dataset = VideoClipDataset(rows, num_frames=T, img_size=SIZE, train=True, root="/videos", decode=decode)
    x, _ = dataset[0]
    assert decode.calls == [("/videos/v0.mp4", [0, 1])]  # 2 frames for 4 segments: each decoded once
    assert frame_ids(x) == [0, 0, 1, 1]


def test_bad_rows_are_refused_with_the_clip_named() -> None:
    rows = clip_rows()
    with pytest.raises(ValueError, match="num_frames"):
        VideoClipDataset(rows.drop(columns="num_frames"), num_frames=T, img_size=SIZE, train=True)
    zero = rows.assign(num_frames=[40, 0, 40, 40, 40, 40])
    with pytest.raises(ValueError, match=r"clips/v1\.mp4"):
        VideoClipDataset(zero, num_frames=T, img_size=SIZE, train=True)
    unlabelled = rows.assign(label=pd.array([0, 1, None, 0, 1, 2], dtype="Int64"))
    with pytest.raises(ValueError, match=r"no label, e\.g\. 'clips/v2\.mp4'"):
        VideoClipDataset(unlabelled, num_frames=T, img_size=SIZE, train=True)
    with pytest.raises(ValueError, match="no 'label'"):
        VideoViewsDataset(rows.drop(columns="label"), num_frames=T, img_size=SIZE)
    # labels given explicitly replace the column (e.g. mapped to another head)
    dataset = VideoViewsDataset(rows.drop(columns="label"), np.arange(6) + 10, num_frames=T, img_size=SIZE)
    assert dataset.clips.labels.tolist() == list(range(10, 16))


def test_views_dataset_decodes_each_clip_once() -> None:
    decode = FakeDecode()
    dataset = VideoViewsDataset(clip_rows(), num_frames=T, img_size=SIZE, decode=decode)
    views, label = dataset[4]
    assert views.shape == (12, 3, T, SIZE, SIZE) and int(label) == 4 % 3
    grid = uniform_view_indices(44, T, 4)
    assert decode.calls == [("clips/v4.mp4", sorted(set(grid.reshape(-1).tolist())))]
    for c in range(4):
        crops = spatial_crops(synthetic_frames(4, grid[c].tolist()), SIZE, 3)
        for s in range(3):
            assert torch.equal(views[c * 3 + s], crops[s])
    middle = spatial_crops(synthetic_frames(4, grid[2].tolist()), SIZE, 1)[0]  # clip 4 // 2, centre crop
    assert torch.equal(views[dataset.middle_view], middle)
    assert dataset.num_views == 12 and dataset.middle_view == 7


def test_views_dataset_skips_and_lists_bad_clips() -> None:
    dataset = VideoViewsDataset(clip_rows(), num_frames=T, img_size=SIZE, decode=FakeDecode(bad=frozenset({"v2.mp4"})))
    item = dataset[2]
    assert item == BadClip("clips/v2.mp4", "moov atom not found in v2.mp4")
    assert dataset.bad_clips == [item]
    assert dataset[3][0].shape == (12, 3, T, SIZE, SIZE)


def test_item_rng_is_keyed_by_all_four() -> None:
    base = item_rng(1, 2, 3, 4).integers(1 << 30, size=4)
    assert np.array_equal(base, item_rng(1, 2, 3, 4).integers(1 << 30, size=4))
    for key in [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)]:
        assert not np.array_equal(base, item_rng(*key).integers(1 << 30, size=4))


def test_the_frame_cache_gives_the_same_clips_and_decodes_each_clip_once() -> None:
    """Every epoch's items equal those of a dataset without the cache; with the cache each clip is decoded once
    (all its frames), after that never again."""
    decode = FakeDecode()
    cached, plain = train_set(decode, cache_bytes=2**30), train_set()
    for epoch in range(3):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(plain)):
            assert torch.equal(cached[i][0], plain[i][0]) and torch.equal(cached[i][1], plain[i][1])
    assert sorted(path for path, _ in decode.calls) == sorted(f"clips/v{i}.mp4" for i in range(6))
    assert all(indices == list(range(40 + int(path[7:-4]))) for path, indices in decode.calls)
    assert cached.clips.cached_bytes == sum(frames.nbytes for frames in cached.clips.cached.values())


def test_the_frame_cache_stays_within_its_budget_and_then_decodes_as_without_it() -> None:
    one_clip = synthetic_frames(0, list(range(40))).nbytes
    decode = FakeDecode()
    dataset = train_set(decode, cache_bytes=int(2.5 * one_clip))
    for _ in range(2):
        for i in range(len(dataset)):
            dataset[i]
    assert sorted(dataset.clips.cached) == [0, 1] and dataset.clips.cached_bytes <= 2.5 * one_clip
    assert dataset.clips.cache_full
    whole = [path for path, indices in decode.calls if len(indices) > T]
    assert whole == ["clips/v0.mp4", "clips/v1.mp4", "clips/v2.mp4"]  # v2 did not fit: decoded whole once, not kept
    assert sum(path == "clips/v4.mp4" for path, _ in decode.calls) == 2  # a clip past the budget: once per epoch
    with pytest.raises(ValueError, match="cache_bytes"):
        train_set(cache_bytes=-1)


def test_the_frame_cache_lists_bad_clips_as_before(caplog: pytest.LogCaptureFixture) -> None:
    bad = frozenset({"v1.mp4"})
    cached, plain = train_set(FakeDecode(bad=bad), cache_bytes=2**30), train_set(FakeDecode(bad=bad))
    with caplog.at_level(logging.WARNING, logger="eva_pipeline.loader.video"):
        assert torch.equal(cached[1][0], plain[1][0])
    assert cached.bad_clips == plain.bad_clips == [("clips/v1.mp4", "moov atom not found in v1.mp4")]
    assert 1 not in cached.clips.cached
