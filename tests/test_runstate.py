"""The state of a run between two steps (vit/runstate.py) and the one validation loop
(vit.step.evaluate_batches), unit by unit, without training anything: a checkpoint restores every
field it saved, closing an epoch starts clean sums and keeps the best, and validation means are
over rows, not batches. (End to end, resumed runs are compared bitwise in test_train.py; these
catch what a run and its resumed copy would get wrong alike.)"""

import dataclasses
import math

import numpy as np
import pytest

from vit import checkpoint
from vit.runstate import RESUME_META, RESUME_TREES, RunState
from vit.step import evaluate_batches

STEPS_PER_EPOCH = 11


def mid_run_state() -> RunState:
    """A run stopped at step 5 of its third epoch, every field distinct from its default."""
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5)}
    opt = {"step": np.int32(27), "m": {"w": np.full((2, 3), 0.25, np.float32)}}
    s = RunState.fresh(params, opt, [0.1, 0.2, 0.3], [1.5, 2.5, 3.5])
    s.epoch, s.step_in_epoch = 2, 5
    s.running = {"loss": 12.5, "correct": 31.0, "seen": 40, "grad_norm": 6.5,
                 "grad_norm_max": 2.5, "steps": 5}
    s.history = [{"epoch": 1, "val_top1": 0.5, "val_loss": 1.0},
                 {"epoch": 2, "val_top1": 0.75, "val_loss": 0.625}]
    s.best_top1, s.best_val_loss = 0.75, 0.625
    return s


def test_a_checkpoint_restores_every_field(tmp_path):
    """to_checkpoint -> checkpoint.save -> load (as --resume loads it) -> from_checkpoint gives
    the same state, field by field, and the meta says where the run stands."""
    s = mid_run_state()
    trees, meta = s.to_checkpoint(s.params, s.opt_state, STEPS_PER_EPOCH, config={"train": {}},
                                  seed=3, class_names=["a", "b"])
    assert (meta["epoch"], meta["step_in_epoch"]) == (2, 5)
    assert meta["global_step"] == 2 * STEPS_PER_EPOCH + 5  # steps taken so far
    assert (meta["seed"], meta["class_names"]) == (3, ["a", "b"])
    path = checkpoint.save(tmp_path / "last.npz", trees, meta)
    trees, meta = checkpoint.load(path, meta_keys=RESUME_META, trees=RESUME_TREES)
    r = RunState.from_checkpoint(trees, meta)
    for f in dataclasses.fields(RunState):
        got, want = getattr(r, f.name), getattr(s, f.name)
        if f.name in ("params", "opt_state"):
            np.testing.assert_equal(got, want, err_msg=f.name)
        elif f.name in ("mean", "std"):
            np.testing.assert_array_equal(got, want, err_msg=f.name)
            assert got.dtype == np.float32
        else:
            assert got == want, f.name


def test_a_checkpoint_from_before_best_val_loss_takes_that_of_its_first_best_epoch():
    s = mid_run_state()
    s.history.append({"epoch": 3, "val_top1": 0.75, "val_loss": 0.5})  # a tie, kept by the old rule
    trees, meta = s.to_checkpoint(s.params, s.opt_state, STEPS_PER_EPOCH)
    del meta["best_val_loss"]
    assert RunState.from_checkpoint(trees, meta).best_val_loss == 0.625  # epoch 2, in best.npz


def test_a_resume_keeps_the_lower_val_loss_a_tie_gave_the_best(tmp_path):
    """A tie in top-1 won by a lower val loss (epoch 3's 0.5 beats epoch 2's 0.625): the resumed
    state keeps 0.5, not the first best epoch's loss, so a later tie at 0.55 is no new best."""
    s = mid_run_state()
    assert s.finish_epoch({"epoch": 3, "val_top1": 0.75, "val_loss": 0.5}) is True
    trees, meta = s.to_checkpoint(s.params, s.opt_state, STEPS_PER_EPOCH)
    path = checkpoint.save(tmp_path / "last.npz", trees, meta)
    r = RunState.from_checkpoint(*checkpoint.load(path, meta_keys=RESUME_META, trees=RESUME_TREES))
    assert (r.best_top1, r.best_val_loss) == (0.75, 0.5)
    assert r.finish_epoch({"epoch": 4, "val_top1": 0.75, "val_loss": 0.55}) is False
    assert r.finish_epoch({"epoch": 5, "val_top1": 0.75, "val_loss": 0.45}) is True

def test_a_checkpoint_keeps_the_order_of_a_list_of_ten_or_more(tmp_path):
    """Lists are saved under their indices as names ('blocks/0', ..., 'blocks/11'): a model
    with 12 blocks must get block 10 back as block 10, not after block 1."""
    blocks = [{"w": np.full((2,), i, np.float32)} for i in range(12)]
    path = checkpoint.save(tmp_path / "c.npz", {"params": {"blocks": blocks}}, {"epoch": 0})
    trees, _ = checkpoint.load(path)
    assert [float(b["w"][0]) for b in trees["params"]["blocks"]] == list(range(12))


def test_a_checkpoint_round_trips_a_bare_array_and_names_a_missing_tree(tmp_path):
    rng = np.array([7, 9], np.uint32)
    path = checkpoint.save(tmp_path / "c.npz", {"params": {"w": np.ones(2, np.float32)}, "rng": rng},
                           {"epoch": 0})
    trees, _ = checkpoint.load(path, trees=("params", "rng"))
    assert isinstance(trees["rng"], np.ndarray)  # a tree that is one array comes back as that array
    np.testing.assert_array_equal(trees["rng"], rng)
    with pytest.raises(checkpoint.CheckpointError, match="lacks arrays 'opt/...'"):
        checkpoint.load(path, meta_keys=("epoch",), trees=RESUME_TREES)
    with pytest.raises(checkpoint.CheckpointError, match="lacks meta 'step_in_epoch'"):
        checkpoint.load(path, meta_keys=("epoch", "step_in_epoch"), trees=("params",))


def test_a_zip_of_damaged_arrays_is_a_checkpoint_error(tmp_path):
    """A sound zip with a meta record whose array is damaged (a broken .npy header) or pickled (an
    object array, which load refuses to unpickle): a CheckpointError naming the file, not numpy's
    own ValueError."""
    import io
    import zipfile

    def npy(array):
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue()

    good = npy(np.arange(3.0))
    for name, member in (("header.npz", good[:8] + b"{'descr': nonsense}" + good[8:]),
                         ("pickled.npz", npy(np.array([{"a": 1}], dtype=object)))):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("__meta__.npy", npy(np.array('{"epoch": 0}')))
            z.writestr("params/w.npy", member)
        with pytest.raises(checkpoint.CheckpointError, match="is damaged") as e:
            checkpoint.load(path)
        assert str(path) in str(e.value)


def test_closing_an_epoch_starts_clean_sums_and_keeps_the_best():
    s = RunState.fresh({}, {}, [0.0], [1.0])
    assert s.grad_norms() == (None, None)  # no step counted yet: no norm to report
    s.account(2.0, 0.5, 3.0, 10)
    s.account(1.0, 1.0, 1.0, 30)  # per-image means: (2*10 + 1*30) / 40, (0.5*10 + 1*30) / 40
    assert s.train_means() == pytest.approx((1.25, 0.875))
    assert s.grad_norms() == (2.0, 3.0)  # per-step mean and the largest
    assert s.finish_epoch({"epoch": 1, "val_top1": 0.4, "val_loss": 0.8}) is True  # the first is the best yet
    assert (s.epoch, s.step_in_epoch, s.best_top1) == (1, 0, 0.4)
    assert s.running == {"loss": 0.0, "correct": 0.0, "seen": 0, "grad_norm": 0.0,
                         "grad_norm_max": 0.0, "steps": 0}  # epoch 2 starts from nothing
    assert s.train_means() == (0.0, 0.0)
    s.account(4.0, 0.0, 0.5, 8)
    assert s.train_means() == (4.0, 0.0)  # epoch 2's own, not mixed with epoch 1's
    assert s.grad_norms() == (0.5, 0.5)
    assert s.finish_epoch({"epoch": 2, "val_top1": 0.3, "val_loss": 0.5}) is False
    # a tie in top-1 goes to the lower val loss; an equal or higher one keeps the earlier best
    assert s.finish_epoch({"epoch": 3, "val_top1": 0.4, "val_loss": 0.9}) is False
    assert (s.best_top1, s.best_val_loss) == (0.4, 0.8)  # a tie that lost leaves the best's loss
    assert s.finish_epoch({"epoch": 4, "val_top1": 0.4, "val_loss": 0.7}) is True
    assert (s.best_top1, s.best_val_loss) == (0.4, 0.7)
    assert s.finish_epoch({"epoch": 5, "val_top1": 0.4, "val_loss": 0.7}) is False
    assert s.finish_epoch({"epoch": 6, "val_top1": 0.6, "val_loss": 1.2}) is True  # top-1 first
    assert (s.best_top1, s.best_val_loss) == (0.6, 1.2)
    assert [h["epoch"] for h in s.history] == [1, 2, 3, 4, 5, 6]
    for loss in (math.nan, math.inf, -math.inf):  # an overflowed loss stops training as a NaN does
        with pytest.raises(FloatingPointError):
            s.account(loss, 0.0, 1.0, 8)


def test_a_checkpoint_from_before_the_gradient_norm_sums_resumes_without_them():
    """A last.npz written before the running sums held gradient norms: its loss/accuracy sums
    are kept, and the norms start from the steps counted after the resume."""
    trees, meta = mid_run_state().to_checkpoint({}, {}, STEPS_PER_EPOCH)
    meta["running"] = {"loss": 12.5, "correct": 31.0, "seen": 40}
    s = RunState.from_checkpoint(trees, meta)
    assert s.train_means() == (12.5 / 40, 31.0 / 40) and s.grad_norms() == (None, None)
    s.account(1.5, 1.0, 4.0, 10)
    assert s.grad_norms() == (4.0, 4.0) and s.running["seen"] == 50


def fake_eval_step(params, losses, labels, valid):
    """An eval step over rows whose loss is given: sums over the valid rows, as make_eval_step's."""
    w = valid.astype(np.float64)
    return {"loss_sum": np.sum(losses * w), "top1": np.sum((labels == 0) * w),
            "top5": np.sum((labels <= 1) * w), "count": np.sum(w), "logits": None}


def test_validation_means_are_over_rows_not_batches():
    """A full batch of 4 rows and a last batch padded to 4 with one real row: every mean weighs
    the 5 real rows alike, and the padding counts nowhere."""
    batches = [(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 0, 1, 2]), np.ones(4, bool)),
               (np.array([6.0, 9.0, 9.0, 9.0]), np.array([0, 0, 0, 0]), np.array([1, 0, 0, 0], bool))]
    seen = []
    out = evaluate_batches(fake_eval_step, None, iter(batches),
                           on_batch=lambda out, labels, valid: seen.append(int(valid.sum())))
    assert out == {"loss": pytest.approx(10 / 5), "top1": pytest.approx(3 / 5),
                   "top5": pytest.approx(4 / 5), "count": 5}
    assert seen == [4, 1]
    assert evaluate_batches(fake_eval_step, None, iter([]))["count"] == 0


@pytest.mark.parametrize("num_classes", [7, 3])
def test_the_eval_step_sums_over_the_valid_rows_only(num_classes):
    """vit.step's eval step against numpy on its own logits: loss, top-1 and top-5 hits and the
    count are sums over the rows marked valid; a padding row adds nothing (3 classes: top-5 is
    top-3, every label a hit)."""
    import jax

    from vit import ViTConfig, init_params
    from vit.step import make_eval_step

    cfg = ViTConfig(image_size=8, patch_size=4, channels=3, d_model=8, heads=2, layers=1,
                    mlp_dim=8, num_classes=num_classes)
    params = init_params(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(6) % num_classes
    valid = np.array([True, True, False, True, False, True])
    out = make_eval_step(cfg, mean=[0.5] * 3, std=[0.25] * 3)(params, images, labels, valid)
    logits = np.asarray(out["logits"], np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(6), labels]
    ranks = (logits > logits[np.arange(6), labels][:, None]).sum(axis=1)  # classes scored above the label
    assert float(out["loss_sum"]) == pytest.approx(nll[valid].sum(), rel=1e-5)
    assert float(out["top1"]) == (ranks == 0)[valid].sum()
    assert float(out["top5"]) == (ranks < 5)[valid].sum()
    assert float(out["count"]) == valid.sum()
