"""What train.py checks before it continues a run (--resume RUN_DIR), each refusal a
ResumeError naming the flag or file at fault (train.py prints it and exits 2):

    config, where, notes = saved_config(run_dir)     # config.json, or last.npz's own config
    check_accum_steps(config, flag, run_dir)         # flags merged in, before from_dict
    notes += check_changes(saved, cfg, sources, run_dir)
    trees, meta = load_checkpoint(run_dir)           # last.npz, or a way out through best.npz
    notes += check_config_json(run_dir, meta, cfg)   # a note for each other difference
    check_position(meta, epochs, stop_after_epoch, run_dir)   # also for a new run (meta None)

A change on --resume to what the checkpoint depends on (RESUME_FIXED) is refused; one that leaves
the run what it would have been (RESUME_SAME_RUN) is taken silently; any other (a new config key
too) is taken with a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from shlex import quote

from cmdline import UsageError


class ResumeError(UsageError):
    """--resume (or --stop-after-epoch) refused; the message names the flag or file and what
    to do instead."""


# what a resumed run's checkpoint depends on: changing it on --resume is refused
RESUME_FIXED = {"train.batch_size": "its data position (steps per epoch)",
                "train.seed": "its data order and random numbers",
                "train.repeat_augment": "its data order (which images each epoch visits)",
                "train.init_from": "the weights it started from",
                "model": "the model it trains (its parameters' shapes, its dropout, ...)",
                "data.dataset": "the images it was trained on",
                "data.layout": "the images it was trained on",
                "data.image_size": "the images it was trained on"}

# changed on --resume, these leave the run what it would have been: taken without a note
RESUME_SAME_RUN = {"data.data_dir": "the same data found elsewhere",
                   "data.cache_dir": "where the decoded images are kept, not what they are",
                   "data.workers": "processes decoding the cache, not what it holds",
                   "data.device_budget_mb": "where the batches come from, not what they hold",
                   "train.checkpoint_minutes": "when last.npz is written, not what it holds"}


def saved_config(run_dir: Path) -> tuple[dict, str, list[str]]:
    """The run's config as a dict: RUN_DIR/config.json, or, if that file is gone, the config
    last.npz was saved with (the run writes config.json again as it starts); -> (config, where
    it came from, notes)."""
    from vit import checkpoint  # noqa: PLC0415

    saved, last = run_dir / "config.json", run_dir / "last.npz"
    if not run_dir.is_dir():
        raise ResumeError(f"--resume {run_dir}: " + ("no such directory" if not run_dir.exists()
                                                     else "a file, not a run directory"))
    if saved.is_file():
        return read_config_json(saved), str(saved), []
    if not last.is_file():
        raise ResumeError(f"--resume {run_dir}: no config.json and no last.npz there; is it a "
                          "run directory?")
    try:
        meta = checkpoint.read_meta(last)
    except checkpoint.CheckpointError as err:
        raise ResumeError(f"--resume {run_dir}: no config.json there, and {err}") from None
    if not isinstance(meta.get("config"), dict):
        raise ResumeError(f"--resume {run_dir}: no config.json there, and {last} holds no config "
                          "to take its place")
    return meta["config"], f"{last} (its config)", [
        f"train.py: note: --resume {run_dir}: no config.json there; continuing with the config "
        f"{last} was saved with (config.json is written again)"]


def read_config_json(saved: Path) -> dict:
    try:
        return json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ResumeError(f"{saved} cannot be read as JSON ({err}); train.py wrote it when the "
                          "run started: put it back, or remove it to continue with the config "
                          "the run's last.npz was saved with") from None


def check_accum_steps(config: dict, flag: str, run_dir: Path):
    """train.accum_steps given (by `flag`) on --resume, in `config` (the run's, flags merged in):
    the run's batch size is fixed, so the steps must divide it (the config's own check would
    suggest a batch size that --resume refuses)."""
    train = config.get("train", {})
    batch, steps = train.get("batch_size"), train.get("accum_steps")
    if not (isinstance(batch, int) and isinstance(steps, int)) or steps < 1 or batch % steps == 0:
        return  # fine, or a wrong value the config's own checks name
    fits = [d for d in range(2, min(batch, 64) + 1) if batch % d == 0][:6]
    raise ResumeError(f"{flag}: --resume {run_dir} keeps its batch size of {batch}, which does "
                      f"not split into {steps} micro-batches of equal size; give accumulation "
                      f"steps that divide {batch}"
                      + (f" ({', '.join(map(str, fits))}, ...)" if fits else ""))


def check_config_json(run_dir: Path, meta: dict, cfg) -> list[str]:
    """RUN_DIR/config.json against the config last.npz was saved with. On what the checkpoint
    depends on (RESUME_FIXED) a difference is refused: config.json edited by hand or copied from
    another run would resume the weights and data position of one run as another (it did,
    silently). Any other (--lr on a resume killed before its first checkpoint, a key deleted by
    hand and so at its default) the run takes from config.json, unless a flag set it in RunConfig
    `cfg` (check_changes noted that): -> a note for each; they went unsaid."""
    from vit import runconfig  # noqa: PLC0415

    saved, last = run_dir / "config.json", run_dir / "last.npz"
    if not saved.is_file():  # gone: the run goes on with last.npz's own config (saved_config)
        return []
    written = read_config_json(saved)
    ours = runconfig.from_dict(written, str(saved))
    theirs = runconfig.from_dict(meta["config"], f"{last} (its config)")
    notes, running = [], cfg.to_dict()
    for name, was, value, why in config_changes(theirs, ours):
        if why:
            raise ResumeError(
                f"--resume {run_dir}: {saved} has {name} = {value!r}, but {last} was saved by a "
                f"run with {name} = {was!r}: config.json was changed or comes from another run; "
                "put the run's own back (changes go in flags or --set), or start a new run "
                "with --out")
        section, key = name.split(".", 1)
        if name not in RESUME_SAME_RUN and running[section].get(key) == value:
            has = (f"has {name} = {value!r}" if key in written.get(section, {})
                   else f"has no {name} (the default is {value!r})")
            notes.append(f"train.py: note: {saved} {has}, but {last} was saved with {was!r}: "
                         f"resuming with {value!r} (--set {name}=... chooses)")
    return notes


def check_changes(saved, cfg, sources: dict, run_dir: Path) -> list[str]:
    """RunConfig `cfg` (the flags on top of the run's) against `saved`: a change to what the
    checkpoint depends on (RESUME_FIXED) is refused naming the flag; RESUME_SAME_RUN is taken
    silently; any other (--lr, --accum-steps, ...) gets a note, since the run then differs from
    the one that would have gone on. --epochs gets the note only under a cosine schedule, which
    it stretches; a constant one just goes on longer. -> the notes, for train.py to print once
    the resume is known to go ahead."""
    notes = []
    # a change no flag made (model.image_size, following data.image_size) after those flags
    # made, so that a refusal names the flag given
    for name, before, value, why in sorted(config_changes(saved, cfg),
                                           key=lambda change: change[0] not in sources):
        flag = sources.get(name, name)
        if why:
            raise ResumeError(f"{flag}: --resume {run_dir} continues that run, and {name} fixes "
                              f"{why}; start a new run (--out) to change it")
        constant = cfg.train.hparams.schedule == "constant"
        if name in RESUME_SAME_RUN or (name == "train.epochs" and constant):
            continue  # the same run, going on as it would have (for longer)
        also = (f"; the cosine learning-rate schedule now ends at epoch {value}"
                if name == "train.epochs" else "")
        notes.append(f"train.py: note: {flag}: resuming with {name} = {value!r} (the run had "
                     f"{before!r}){also}")
    return notes


def config_changes(old, new):
    """(section.key, old value, new value, why) for each value of RunConfig `new` that differs
    from `old`'s; why: what the checkpoint takes from it (RESUME_FIXED), or None."""
    before_all = old.to_dict()
    for section, values in new.to_dict().items():
        for key, value in values.items():
            before = before_all[section].get(key)
            if key == "image_size" and section == "data" and _side(old.data) == _side(new.data):
                continue  # unset (64 px, a folder's default) and 64 are the same images
            if value != before:
                name = f"{section}.{key}"
                yield name, before, value, RESUME_FIXED.get(name) or RESUME_FIXED.get(section)


def _side(data) -> int:
    """The side of the images a data section gives: data.image_size, or, unset, the dataset's
    own size (Tiny ImageNet 64, digits 8) or an image folder's default (64). data.image_size
    first, unlike vit.runconfig.image_size_notes's size: Tiny ImageNet given 96 is then a change, refused
    naming its flag (the dataset's 64 first made it model.image_size's refusal, no flag named)."""
    from vit.data import NATIVE_IMAGE_SIZE  # noqa: PLC0415
    from vit.data.image_folder import DEFAULT_IMAGE_SIZE  # noqa: PLC0415

    return data.image_size or NATIVE_IMAGE_SIZE.get(data.dataset) or DEFAULT_IMAGE_SIZE


def load_checkpoint(run_dir: Path):
    """RUN_DIR/last.npz as (trees, meta), or a ResumeError naming what is wrong with it and
    offering best.npz if that one is sound."""
    from vit import checkpoint  # noqa: PLC0415
    from vit.runstate import RESUME_META, RESUME_TREES  # noqa: PLC0415

    def way_out(best, meta):
        return (f"{best} is sound (end of epoch {meta['epoch']}): to continue from it, cp "
                f"{quote(str(best))} {quote(str(run_dir / 'last.npz'))} and run python train.py "
                f"--resume {quote(str(run_dir))} again.")
    try:
        return checkpoint.load_from_run(run_dir, "last", meta_keys=RESUME_META,
                                        trees=RESUME_TREES, way_out=way_out)
    except checkpoint.CheckpointError as err:
        raise ResumeError(f"--resume {run_dir}: {err}") from None


def check_position(meta: dict | None, epochs: int, stop_after_epoch: int | None,
                   run_dir: Path):
    """Where the run is (meta: last.npz's, None for a new run) against train.epochs and
    --stop-after-epoch K. Refused: epochs below the checkpoint's epoch (training would end at
    once with exit code 0, as if finished, and config.json would say fewer epochs than the weights
    have seen); K at or below the epochs already done (it would train one more epoch, then stop);
    K past train.epochs (the run ends there anyway: K was meant for another run length)."""
    from vit.runstate import position_in_words  # noqa: PLC0415

    done = meta["epoch"] if meta else 0
    mid = bool(meta and meta["step_in_epoch"])
    reached = done + mid
    if epochs < reached:
        where = position_in_words(done, meta["step_in_epoch"])
        raise ResumeError(f"--resume {run_dir}: its last.npz is at {where}, past train.epochs = "
                          f"{epochs}; give --epochs {done + 1} or more to continue it")
    if stop_after_epoch is None or done >= epochs:  # a finished run: nothing to stop
        return
    ahead = f"epoch {epochs}" if done + 1 == epochs else f"an epoch from {done + 1} to {epochs}"
    if stop_after_epoch <= done:
        raise ResumeError(f"--stop-after-epoch {stop_after_epoch}: --resume {run_dir} is past "
                          f"it already (its last.npz is at the end of epoch {done}"
                          + (f", and {meta['step_in_epoch']} steps into epoch {done + 1}" if mid
                             else "")
                          + f"); give {ahead}, or leave the flag out")
    if stop_after_epoch > epochs:
        raise ResumeError(f"--stop-after-epoch {stop_after_epoch} is past train.epochs = "
                          f"{epochs}, where the run ends anyway; give an epoch up to {epochs}, "
                          f"or --epochs {stop_after_epoch} to train that long")
