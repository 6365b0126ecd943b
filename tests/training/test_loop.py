"""The EVA-01 pre-training loop over DeepSpeed (block masking, cosine loss, AdamW + warmup/cosine): same math as a
plain PyTorch loop, it learns, resumes exactly, keeps its checkpoints in order, and every batch/mask is a pure
function of the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eva_pipeline.config import PretrainParams
from eva_pipeline.ingest.readers.idx import read_idx
from eva_pipeline.loader.batches import batch_masks
from eva_pipeline.loader.transforms import to_model_input
from eva_pipeline.masking import mask_rng
from eva_pipeline.models import EvaMIM, get_config
from eva_pipeline.training import loop, recipe
from eva_pipeline.training import precision as precision_module
from eva_pipeline.training import step as step_module
from eva_pipeline.training.loop import run_pretraining
from eva_pipeline.training.optim import param_groups
from eva_pipeline.training.recipe import epoch_permutation, make_mask_generator, training_fingerprint
from eva_pipeline.training.schedule import WarmupCosineSchedule
from eva_pipeline.training.step import cached_targets
from eva_test_support import make_params

FMNIST = Path(__file__).resolve().parents[2] / "data" / "01_raw" / "fashion_mnist" / "train-images-idx3-ubyte.gz"
N, D = 32, 16  # images, target width; batch 8 -> 4 steps per epoch


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 grayscale images (N, 1, 28, 28) and fixed random targets (N, 49, D)."""
    gen = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (N, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return images, torch.randn(N, 49, D, generator=gen)


def _run(params: PretrainParams, data, checkpoint_dir: Path, **kwargs):
    images, targets = data
    return run_pretraining(
        params, images, cached_targets(targets), D, checkpoint_dir=checkpoint_dir, progress=False, **kwargs
    )


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step_tags(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("step_*") if p.is_dir()), key=lambda t: int(t[5:]))


def _only_fingerprint_dir(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


# ------------------------------------------------------------------------------------------- same math as plain torch
def _reference_loop(params: PretrainParams, images: torch.Tensor, targets: torch.Tensor, steps: int):
    """EVA pre-training written out in plain PyTorch: no DeepSpeed, no ZeRO, no loop helpers for the update."""
    torch.manual_seed(params.seed)
    config = get_config(params.model.name, **{**params.model.overrides, "target_dim": targets.shape[-1]})
    model = EvaMIM(config)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in param_groups(model, params.optimizer.weight_decay)
    ]
    opt = params.optimizer
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)
    num, batch = images.shape[0], params.batch_size
    steps_per_epoch = num // batch
    warmup = int(params.optimizer.warmup_epochs * steps_per_epoch)
    total = params.epochs * steps_per_epoch
    base, final = params.optimizer.lr, params.optimizer.min_lr

    def lr_at(step: int) -> float:  # BEiT's cosine_scheduler: linspace(0, base, warmup) then half-cosine
        if step < warmup:
            return base * step / (warmup - 1)
        return final + 0.5 * (base - final) * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))

    masker = make_mask_generator(params, config.grid_size)
    losses, norms = [], []
    model.train()
    for step in range(steps):
        epoch, within = divmod(step, steps_per_epoch)
        idx = epoch_permutation(params, epoch, num)[within * batch : (within + 1) * batch]
        x = to_model_input(images[torch.from_numpy(idx)], config.img_size)
        mask = batch_masks(masker, params.seed, epoch, idx)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        target = targets[torch.from_numpy(idx)][mask]
        loss = -F.cosine_similarity(model(x, mask).float(), target.float(), dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), params.optimizer.clip_grad).item())
        optimizer.step()
        losses.append(loss.item())
    return model, losses, norms


def test_deepspeed_run_equals_a_plain_pytorch_loop(tmp_path, data):
    """Five steps (warmup, the first cosine step and an epoch boundary) reach the same weights as plain PyTorch."""
    params = make_params(max_steps=5, model={"overrides": {"depth": 2}})
    result = _run(params, data, tmp_path / "ckpt")
    reference, losses, norms = _reference_loop(params, *data, steps=5)
    assert result.steps == 5 and len(result.history) == 5
    assert [h["loss"] for h in result.history] == pytest.approx(losses, abs=1e-6)
    assert [h["grad_norm"] for h in result.history] == pytest.approx(norms, rel=1e-5)
    assert max(norms) > 3.0  # clipping at 3.0 was exercised, so it is part of what agrees
    initial = EvaMIM(get_config(params.model.name, **{**params.model.overrides, "target_dim": D}))
    moved = 0
    for (name, got), want in zip(result.model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)  # measured: 6e-8
        moved += int((want - initial.state_dict()[name]).abs().max() > 1e-4)
    assert moved > 10  # the weights really trained (not two copies of the initial state)


# ------------------------------------------------------------------------------------------- it learns
def test_loss_decreases_on_a_learnable_target(tmp_path):
    """Targets = a fixed linear projection of each patch's pixels (Fashion-MNIST): the loss falls within 32 steps."""
    images = torch.from_numpy(read_idx(FMNIST)[:64].copy()).unsqueeze(1)
    x = to_model_input(images, 28)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(64, 49, 48)
    targets = patches @ torch.randn(48, D, generator=torch.Generator().manual_seed(0))
    params = make_params(
        epochs=8,
        batch_size=16,
        model={"overrides": {"depth": 2}},
        checkpoint={"every_steps": 1000},
    )
    result = run_pretraining(params, images, cached_targets(targets), D, checkpoint_dir=tmp_path, progress=False)
    losses = np.array([h["loss"] for h in result.history])
    assert len(losses) == 32 and np.isfinite(losses).all()
    assert losses[:5].mean() > -0.25
    assert losses[-5:].mean() < losses[:5].mean() - 0.3
    assert losses[-5:].mean() < -0.45


# ------------------------------------------------------------------------------------------- checkpoints and resume
def test_resume_is_exact_and_checkpoints_are_pruned(tmp_path, data):
    steps = 8  # 2 epochs of 4 steps: the resumed half crosses into epoch 1
    a = _run(make_params(), data, tmp_path / "a")
    b1 = _run(make_params(max_steps=steps // 2), data, tmp_path / "b")
    assert (a.steps, a.resumed_from_step, b1.steps, b1.resumed_from_step) == (steps, 0, steps // 2, 0)
    folder_b = _only_fingerprint_dir(tmp_path / "b")
    assert _step_tags(folder_b) == ["step_2", "step_4"] and (folder_b / "latest").read_text().strip() == "step_4"

    b2 = _run(make_params(), data, tmp_path / "b")
    assert b2.resumed_from_step == steps // 2 and b2.steps == steps and len(b2.history) == steps // 2
    for (name, got), want in zip(b2.model.state_dict().items(), a.model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name  # CPU fp32 is deterministic: bit for bit
    for got, want in zip(b2.history, a.history[steps // 2 :], strict=True):
        assert {k: got[k] for k in ("loss", "lr", "grad_norm", "epoch")} == {
            k: want[k] for k in ("loss", "lr", "grad_norm", "epoch")
        }
    # The first half of b equals a's first half too (same trajectory, only cut short).
    assert [h["loss"] for h in b1.history] == [h["loss"] for h in a.history[: steps // 2]]
    # The run's history is whole after the resume: steps 1..8, the same losses as the uninterrupted run.
    assert [h["step"] for h in b2.run_history] == [float(s) for s in range(1, steps + 1)]
    assert [h["loss"] for h in b2.run_history] == [h["loss"] for h in a.history]

    # Pruning: every 2 steps with keep_last 2 leaves exactly the two newest, and `latest` names the newest.
    folder_a = _only_fingerprint_dir(tmp_path / "a")
    assert _step_tags(folder_a) == ["step_6", "step_8"] and _step_tags(folder_b) == ["step_6", "step_8"]
    assert (folder_a / "latest").read_text().strip() == "step_8"

    # A finished run resumed again trains nothing and returns the finished weights; so does a shorter max_steps.
    for extra in ({}, {"max_steps": 3}):
        again = _run(make_params(**extra), data, tmp_path / "a")
        assert (again.resumed_from_step, again.steps, again.history) == (steps, steps, [])
        assert [h["loss"] for h in again.run_history] == [h["loss"] for h in a.history]  # the plot stays whole
        for got, want in zip(again.model.state_dict().values(), a.model.state_dict().values(), strict=True):
            assert torch.equal(got, want)


def test_initial_student_is_where_training_starts(tmp_path, data):
    """``initial_student`` (also the probe's random-init baseline) is the model step 1 starts from."""
    params = make_params(max_steps=1, seed=3)
    trained = _run(params, data, tmp_path / "i").model.state_dict()  # step 1's LR is 0 (warmup from 0): nothing moves
    start = recipe.initial_student(params, D).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in start.items())
    other = recipe.initial_student(make_params(seed=4), D).state_dict()
    assert not all(torch.equal(other[k], v) for k, v in start.items())


def test_keep_last_and_every_steps(tmp_path, data):
    _run(make_params(epochs=3, checkpoint={"every_steps": 3, "keep_last": 3}), data, tmp_path / "c")
    folder = _only_fingerprint_dir(tmp_path / "c")
    # 12 steps, saved at 3, 6, 9, 12 (12 is also the last step); the newest three stay.
    assert _step_tags(folder) == ["step_6", "step_9", "step_12"]
    assert (folder / "latest").read_text().strip() == "step_12"
    _run(make_params(max_steps=5, checkpoint={"every_steps": 3, "keep_last": 1}), data, tmp_path / "d")
    # The cut-off step is always saved, even off the every_steps grid.
    assert _step_tags(_only_fingerprint_dir(tmp_path / "d")) == ["step_5"]


def test_changed_settings_use_another_folder_and_do_not_resume(tmp_path, data):
    root = tmp_path / "ckpt"
    first = _run(make_params(max_steps=4), data, root)
    other = _run(make_params(max_steps=4, optimizer={"lr": 2e-3}), data, root)
    assert other.resumed_from_step == 0 and len(other.history) == 4
    assert other.history[1]["lr"] == pytest.approx(2 * first.history[1]["lr"])
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(folders) == 2 and all(_step_tags(f) == ["step_2", "step_4"] for f in folders)
    # ... and the first configuration still resumes its own run.
    again = _run(make_params(max_steps=6), data, root)
    assert again.resumed_from_step == 4 and len(again.history) == 2


def test_fingerprint_covers_what_shapes_the_trajectory(tmp_path):
    base = make_params()
    fp = training_fingerprint(base, N, D)
    same = [
        make_params(checkpoint={"every_steps": 7, "keep_last": 5, "resume": "never"}),
        make_params(max_steps=3, log_every_steps=1, mask_examples=2),
    ]
    assert all(training_fingerprint(p, N, D) == fp for p in same)
    different = [
        make_params(optimizer={"lr": 2e-3}),
        make_params(seed=1),
        make_params(epochs=3),
        make_params(batch_size=16),
        make_params(masking={"num_masking_patches": 10}),
        make_params(model={"overrides": {"depth": 2}}),
        make_params(augmentation={"enabled": True}),
    ]
    fps = {training_fingerprint(p, N, D) for p in different}
    assert fp not in fps and len(fps) == len(different)
    assert training_fingerprint(base, N + 1, D) != fp and training_fingerprint(base, N, D + 1) != fp
    assert training_fingerprint(base, N, D, data_fingerprint="other images") != fp  # same size, other data


def test_resume_never_restarts_and_leaves_a_resumable_folder(tmp_path, data):
    """A restart over a finished run's folder must not delete its own new checkpoint in favour of stale ones."""
    root = tmp_path / "ckpt"
    full = _run(make_params(), data, root)  # steps 1..8 -> step_6, step_8
    restart = _run(make_params(max_steps=3, checkpoint={"every_steps": 3, "resume": "never"}), data, root)
    assert restart.resumed_from_step == 0 and len(restart.history) == 3
    folder = _only_fingerprint_dir(root)
    latest = (folder / "latest").read_text().strip()
    assert latest == "step_3" and _step_tags(folder) == ["step_3"]
    resumed = _run(make_params(), data, root)
    assert resumed.resumed_from_step == 3 and len(resumed.history) == 5
    for got, want in zip(resumed.model.state_dict().values(), full.model.state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_batch_larger_than_the_data_is_refused(tmp_path, data):
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 32"):
        _run(make_params(batch_size=64), data, tmp_path / "ckpt")


# ------------------------------------------------------------------------------------------- masks and data order
def _recorded_run(params: PretrainParams, data, monkeypatch, checkpoint_dir: Path):
    """Run, recording per step the sample indices the targets were looked up for and the masks the student got."""
    images, targets = data
    seen_indices, seen_masks = [], []

    class RecordingMIM(EvaMIM):
        def forward(self, images, mask):
            seen_masks.append(mask.detach().cpu().clone())
            return super().forward(images, mask)

    def target_fn(indices, x):
        seen_indices.append(indices.clone().numpy())
        return targets[indices]

    monkeypatch.setattr(recipe, "EvaMIM", RecordingMIM)  # make_student builds the student
    run_pretraining(params, images, target_fn, D, checkpoint_dir=checkpoint_dir, progress=False)
    return seen_indices, seen_masks


def test_batches_and_masks_are_pure_functions_of_the_seed(tmp_path, data, monkeypatch):
    params = make_params(checkpoint={"resume": "never"})
    indices, masks = _recorded_run(params, data, monkeypatch, tmp_path / "s0")
    assert len(indices) == len(masks) == 8
    masker = make_mask_generator(params, grid=7)
    for step, (idx, mask) in enumerate(zip(indices, masks, strict=True)):
        epoch, within = divmod(step, 4)
        np.testing.assert_array_equal(idx, epoch_permutation(params, epoch, N)[within * 8 : (within + 1) * 8])
        assert mask.dtype == torch.bool and mask.shape == (8, 49)
        expected = np.stack([masker(mask_rng(0, epoch, int(i))).reshape(-1) for i in idx])
        np.testing.assert_array_equal(mask.numpy(), expected)
        np.testing.assert_array_equal(mask.sum(1).numpy(), expected.sum(1))
        assert (mask.sum(1) <= 20).all() and (mask.sum(1) >= 4).all()
    for epoch in range(2):  # every image exactly once per epoch, in a different order each epoch
        assert sorted(np.concatenate(indices[epoch * 4 : epoch * 4 + 4]).tolist()) == list(range(N))
    assert not np.array_equal(np.concatenate(indices[:4]), np.concatenate(indices[4:]))
    # An image's mask changes from epoch to epoch (seeded by epoch and index).
    first = {int(i): m for idx, ms in zip(indices[:4], masks[:4], strict=True) for i, m in zip(idx, ms, strict=True)}
    second = {int(i): m for idx, ms in zip(indices[4:], masks[4:], strict=True) for i, m in zip(idx, ms, strict=True)}
    assert sum(not torch.equal(first[i], second[i]) for i in range(N)) > N // 2

    indices_again, masks_again = _recorded_run(
        make_params(checkpoint={"resume": "never"}), data, monkeypatch, tmp_path / "s0b"
    )
    assert all(np.array_equal(a, b) for a, b in zip(indices, indices_again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_again, strict=True))

    indices_1, masks_1 = _recorded_run(
        make_params(seed=1, checkpoint={"resume": "never"}), data, monkeypatch, tmp_path / "s1"
    )
    assert not all(np.array_equal(a, b) for a, b in zip(indices, indices_1, strict=True))
    by_index_0 = {
        int(i): m for idx, ms in zip(indices[:4], masks[:4], strict=True) for i, m in zip(idx, ms, strict=True)
    }
    by_index_1 = {
        int(i): m for idx, ms in zip(indices_1[:4], masks_1[:4], strict=True) for i, m in zip(idx, ms, strict=True)
    }
    assert sum(not torch.equal(by_index_0[i], by_index_1[i]) for i in range(N)) > N // 2


def test_schedule_helper_matches_the_reference_formula():
    """The reference loop above writes the schedule out by hand; pin it to the library's schedule."""
    schedule = WarmupCosineSchedule.from_epochs(1e-3, 1e-5, epochs=2, steps_per_epoch=4, warmup_epochs=1)
    values = [schedule(s) for s in range(8)]
    assert values[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    assert values[4] == pytest.approx(1e-3)  # the cosine starts at its top
    assert values[5] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * 1 / 4)))


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(tmp_path, data):
    """``pretrain.compile: true`` really runs through torch.compile (inductor on CPU) and follows the eager run."""
    params = {"epochs": 1, "checkpoint": {"resume": "never"}, "max_steps": 3}
    from torch._dynamo.utils import counters

    eager = _run(make_params(**params), data, tmp_path / "eager")
    counters.clear()
    compiled = _run(make_params(compile=True, **params), data, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured and compiled the student's graph
    assert [r["step"] for r in compiled.history] == [1.0, 2.0, 3.0]
    np.testing.assert_allclose(
        [r["loss"] for r in compiled.history], [r["loss"] for r in eager.history], rtol=1e-4, atol=1e-5
    )
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------- stochastic layers
DROP_PATH = {"model": {"overrides": {"depth": 2, "drop_path_rate": 0.5}}}  # rates linspace(0, 0.5, depth)


def test_ranks_and_steps_draw_different_drop_path_masks():
    """The public code seeds with seed + rank: without it every GPU drops the same paths for the same samples."""
    from timm.layers import DropPath

    layer = DropPath(0.5).train()

    def kept(rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(recipe.step_seed(0, rank, step))
        return layer(torch.ones(256, 1, 1)).flatten() != 0

    assert torch.equal(kept(0, 5), kept(0, 5))  # a function of (seed, rank, step): a restart draws it again
    assert not torch.equal(kept(0, 5), kept(1, 5))  # two ranks, same step
    assert not torch.equal(kept(0, 5), kept(0, 6))  # one rank, next step
    assert recipe.step_seed(0, 0, 5) != recipe.step_seed(1, 0, 5)  # and the run's seed


def test_every_step_is_seeded_from_seed_rank_and_step(tmp_path, data, monkeypatch):
    seen = []
    real = recipe.step_seed
    monkeypatch.setattr(  # train_step seeds drop path through its own module's name
        step_module, "step_seed", lambda seed, rank, step: seen.append((seed, rank, step)) or real(seed, rank, step)
    )
    _run(make_params(seed=3, max_steps=5, **DROP_PATH), data, tmp_path / "a")
    assert seen == [(3, 0, step) for step in range(5)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_with_drop_path_is_bit_identical(tmp_path, data, monkeypatch, precision):
    """Interrupted at step 4 and resumed, a run with drop path ends bit for bit where the uninterrupted one does, in
    fp32 and in bf16 (autocast on CPU, forced on here whatever this CPU has)."""
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    a = _run(make_params(precision=precision, **DROP_PATH), data, tmp_path / "a")
    _run(make_params(precision=precision, max_steps=4, **DROP_PATH), data, tmp_path / "b")
    b = _run(make_params(precision=precision, **DROP_PATH), data, tmp_path / "b")
    assert b.resumed_from_step == 4 and b.steps == a.steps == 8
    for (name, got), want in zip(b.model.state_dict().items(), a.model.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert [h["loss"] for h in b.run_history] == [h["loss"] for h in a.history]
    if precision == "bf16":
        return  # what follows does not depend on the precision
    # drop path really acts: the same run without it ends elsewhere
    c = _run(make_params(model={"overrides": {"depth": 2}}), data, tmp_path / "c")
    assert not torch.equal(c.model.state_dict()["lm_head.weight"], a.model.state_dict()["lm_head.weight"])


# ------------------------------------------------------------------------------------------- the step itself
STEP_KEYS = {"step", "loss", "lr", "grad_norm", "images_per_second", "epoch", "step_skipped"}  # + loss_scale (fp16)


def _tiny_engine(params: PretrainParams):
    from eva_pipeline.training.engine import initialize_engine

    model = recipe.initial_student(params, D)
    return initialize_engine(model, recipe.make_optimizer(model, params), params, torch.device("cpu"))


def _step_inputs(params: PretrainParams, data, step: int):
    """Step ``step``'s batch of the first epoch, as the loop feeds it to the step (x, mask, masked targets)."""
    images, targets = data
    idx = epoch_permutation(params, 0, N)[step * 8 : (step + 1) * 8]
    x = to_model_input(images[torch.from_numpy(idx)], 28)
    mask = batch_masks(make_mask_generator(params, 7), params.seed, 0, idx)
    return x, mask, targets[torch.from_numpy(idx)][mask], int(mask.sum())


def test_train_step_records_and_is_a_function_of_its_inputs(tmp_path, data):
    """Two engines built alike and stepped alike (interleaved, so they share the global torch generator) record the
    same steps and end with the same weights: the step reseeds drop path from (seed, rank, step) itself."""
    params = make_params(**DROP_PATH)
    engines = [_tiny_engine(params), _tiny_engine(params)]
    for engine in engines:
        engine.train()
    records: list[list[dict[str, float]]] = [[], []]
    for step, lr in enumerate([1e-3, 5e-4, 1e-3]):
        x, mask, target, num_masked = _step_inputs(params, data, step)
        for engine, out in zip(engines, records, strict=True):
            out.append(
                step_module.train_step(engine, x, mask, target, lr, num_masked=num_masked, step=step, seed=3, epoch=0)
            )
            torch.rand(7)  # whatever else draws from the generator in between must not matter
    for record in records[0]:
        assert set(record) == STEP_KEYS
        assert all(isinstance(v, float) for v in record.values())
        assert record["images_per_second"] > 0 and record["step_skipped"] == 0.0 and np.isfinite(record["grad_norm"])
    assert [r["step"] for r in records[0]] == [1.0, 2.0, 3.0] and [r["lr"] for r in records[0]] == [1e-3, 5e-4, 1e-3]
    timeless = [[{k: v for k, v in r.items() if k != "images_per_second"} for r in out] for out in records]
    assert timeless[0] == timeless[1]  # bit for bit (CPU fp32)
    initial = recipe.initial_student(params, D).state_dict()
    for (name, a), b in zip(
        engines[0].module.state_dict().items(), engines[1].module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(engines[0].module.state_dict()["lm_head.weight"], initial["lm_head.weight"])  # it trained


def test_the_loop_records_what_train_step_returns(tmp_path, data, monkeypatch):
    """``run_pretraining`` runs ``step.train_step`` once per step and logs its records (the benchmark times it)."""
    returned = []
    real = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: returned.append(real(*a, **k)) or returned[-1])
    result = _run(make_params(max_steps=3), data, tmp_path / "t")
    assert len(returned) == 3 and all(a is b for a, b in zip(result.history, returned, strict=True))
    assert all(set(r) == STEP_KEYS for r in result.history)
