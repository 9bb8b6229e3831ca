"""jalign checkpoints: an Orbax CheckpointManager directory of numbered steps.

Each step holds named items. Every checkpoint has
  ``params``        the parameters as nested dicts (nnx pure dicts): a model checkpoint's
                    one model, a training run's ``{role: what of it trains}``,
  ``model_config``  the model config as JSON,
  ``metadata``      jalign version, step, what wrote it, the roles and checksums.
Training adds its own items (optimizer state, data-iterator state, operative gin config)
beside these, so a converted model and a training checkpoint share one format; loading
either as a model is ``jalign.sources.load_checkpoint``.

Orbax writes each step to a temporary directory and renames it on commit; restore only
ever sees committed steps.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

import jalign
from jalign import checksum
from jalign.checkpoint_space import (DiskFull, SpaceCheck, disk_full_message, is_disk_full)
from jalign.faults import fault
from jalign.errors import first_line
from jalign.models.build import params_of
from jalign.models.families import config_from_dict, config_to_dict
from jalign.models.heads import head_of
from jalign.train.roles import LAYOUT, stored_roles


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpoint(CheckpointError):
    """A committed step whose contents do not read back as saved."""


def manager(directory: str | os.PathLike, **options) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(Path(directory).absolute(),
                                 options=ocp.CheckpointManagerOptions(create=True, **options))


def save_model(directory: str | os.PathLike, config, model, *, step: int = 0,
               extra_metadata: dict | None = None) -> Path:
    """Write a params-only checkpoint of one model (what ``jalign convert hf-to-jalign``
    produces); its metadata names the model's head."""
    params = params_of(model)
    metadata = {"jalign_version": jalign.__version__, "step": step, "kind": "model",
                "head": head_of(model), "checksums": {"params": checksum.checksums(params)}}
    metadata.update(extra_metadata or {})
    mngr = manager(directory)
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        model_config=ocp.args.JsonSave(config_to_dict(config)),
        metadata=ocp.args.JsonSave(metadata)))
    mngr.wait_until_finished()
    mngr.close()
    return Path(directory)


def _checkpoint_dir(directory: str | os.PathLike) -> Path:
    """A training run directory keeps its steps under ``checkpoints/``; accept either."""
    directory = Path(directory)
    return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def latest_step(directory: str | os.PathLike) -> int:
    directory = _checkpoint_dir(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    mngr = manager(directory)
    step = mngr.latest_step()
    mngr.close()
    if step is None:
        raise CheckpointError(f"{directory}: no committed checkpoint step found")
    return step


def read_model_config(directory: str | os.PathLike, step: int | None = None):
    step = latest_step(directory) if step is None else step
    mngr = manager(_checkpoint_dir(directory))
    restored = mngr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    mngr.close()
    return config_from_dict(restored["model_config"])


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    step = latest_step(directory) if step is None else step
    mngr = manager(_checkpoint_dir(directory))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return restored["metadata"]


def read_config_record(directory: str | os.PathLike, step: int | None = None) -> dict | None:
    """The config record a run saved with ``step`` (None: a model checkpoint has none)."""
    step = latest_step(directory) if step is None else step
    if not (_checkpoint_dir(directory) / str(step) / "gin_config").is_dir():
        return None  # a model checkpoint: no run, no record
    mngr = manager(_checkpoint_dir(directory))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(gin_config=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return restored["gin_config"].get("record")


def read_roles(directory: str | os.PathLike, step: int | None = None):
    """The roles a checkpoint holds (``jalign.train.roles.StoredRoles``), any layout."""
    return stored_roles(read_metadata(directory, step))


def restore_params(directory, step: int, abstract, metadata: dict):
    """The step's ``params`` item read onto ``abstract``'s shapes and shardings, checked
    against the checksums saved with it."""
    mngr = manager(_checkpoint_dir(directory))
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # undecodable bytes surface as tensorstore/zstd errors
        raise CorruptCheckpoint(f"{directory} step {step} cannot be read back "
                                f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        mngr.close()
    _verify(directory, step, "params", metadata, restored["params"])
    return restored["params"]


def _verify(directory, step: int, item: str, metadata: dict, tree) -> None:
    """Raise CorruptCheckpoint if ``tree`` (item ``item`` as read back) differs from the
    checksums recorded at save time (checkpoints without them are not checked)."""
    expected = metadata.get("checksums", {}).get(item)
    if expected is None:
        return
    bad = checksum.mismatches(expected, tree)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CorruptCheckpoint(f"{directory} step {step}: item {item!r} does not match its "
                                f"saved checksums: {shown}")


# ---------------------------------------------------------------------------- training

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def resolve_run_dir(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` after checking ``name`` cannot escape ``root`` (no '..', no absolute
    path, no odd characters): run names often come from command lines and sweeps."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or ".." in name.split("/"):
        raise CheckpointError(
            f"invalid run name {name!r}: use letters, digits, '.', '_', '-' and '/' "
            "separated parts, not starting with '.' or '/' and without '..'")
    root_path = Path(root).resolve()
    run = (root_path / name).resolve()
    if root_path not in run.parents:
        raise CheckpointError(f"run name {name!r} escapes the output root {root_path}")
    return run


def legacy_unwrap(tree, name: str):
    """``tree`` with every dict that holds only key ``name`` replaced by its value: a run's
    state as written before roles, when its one trained model was not keyed by its role.
    The leaves keep their order, so ``jax.tree.unflatten`` puts them back."""
    if isinstance(tree, dict):
        if set(tree) == {name}:
            return legacy_unwrap(tree[name], name)
        return {k: legacy_unwrap(v, name) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(legacy_unwrap(v, name) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(legacy_unwrap(v, name) for v in tree)
    return tree


def config_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_fails(directory):
    def write():
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "params" in OCDBT database at local '
                         f'file "{directory}": Failed to write 418 bytes to file 9: No space '
                         "left on device [os_error_code='28']")
    return write


class TrainCheckpointer:
    """Saves and restores training: state, data-iterator position, operative config.

    Items per step: ``params`` (the model, readable alone for export), ``train_state``
    (step, optimizer state, rng, skip count, frozen models), ``data`` (iterator state),
    ``gin_config``, ``model_config`` and ``metadata``. Saves are asynchronous; a step
    becomes visible to restore only once Orbax has committed it.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int, async_save: bool = True,
                 warn=None):
        self.run_dir = Path(run_dir)
        self._pending: tuple[int, int] | None = None  # (step, bytes) of a save in flight
        self._failed: DiskFull | None = None
        self._space = SpaceCheck(warn)
        options = ocp.CheckpointManagerOptions(
            create=True, max_to_keep=keep, enable_async_checkpointing=async_save,
            save_interval_steps=1)  # the loop decides when to save
        self._mngr = ocp.CheckpointManager(self.run_dir.absolute() / "checkpoints",
                                           options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, state, *, data_state: dict, model_config, operative: str,
             roles: dict, extra_metadata: dict | None = None,
             config_record: dict | None = None) -> int:
        """Save ``state`` at its step. ``roles``: name -> ``roles.role_record`` of each
        role (what a restore or an export needs to rebuild the unsaved fixed parts)."""
        step = int(jax.device_get(state.step))
        # The fixed parts (frozen roles, LoRA bases, what a trainable regex leaves out) are
        # not written: they are rebuilt from their sources on restore; their checksums are
        # kept so that a source that changed since is caught.
        rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
                "skipped": state.skipped, "frozen": None}
        metadata = {"jalign_version": jalign.__version__, "step": step, "kind": "train",
                    "config_hash": config_hash(operative), "time": time.time(),
                    "frozen_rebuilt": True, "layout": LAYOUT, "roles": roles,
                    # Computed where the arrays live, before the async save copies them.
                    "checksums": {"params": checksum.checksums(state.params),
                                  "train_state": checksum.checksums(rest),
                                  "fixed": checksum.checksums(state.fixed or {})}}
        metadata.update(extra_metadata or {})
        size = sum(int(x.nbytes) for x in jax.tree.leaves((state.params, rest))
                   if hasattr(x, "nbytes"))
        directory = self.run_dir / "checkpoints"
        self.wait()  # the save in flight's failure shows here, named as its own
        if jax.process_index() == 0:
            self._space(directory, size)
        self._pending = (step, size)
        if fault("disk_full_at_save", step):  # as tensorstore reports a full file system
            self._guarded(_write_fails(directory))
        self._guarded(lambda: self._mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train_state=ocp.args.StandardSave(rest),
            data=ocp.args.JsonSave(data_state),
            gin_config=ocp.args.JsonSave({"operative": operative, "record": config_record}),
            model_config=ocp.args.JsonSave(config_to_dict(model_config)),
            metadata=ocp.args.JsonSave(metadata)), force=True))
        return step

    def _guarded(self, action):
        """``action()``; a full disk under it (this save, or the one in flight) becomes
        DiskFull naming the step, the directory and the intact checkpoint."""
        try:
            return action()
        except Exception as e:
            if not is_disk_full(e):
                raise
            if self._failed is None:  # orbax raises it again at the next wait or close
                step, size = self._pending or (None, 0)
                committed = [s for s in self._mngr.all_steps() if s != step]
                self._failed = DiskFull(disk_full_message(
                    self.run_dir / "checkpoints", step, size, max(committed, default=None)))
            self._pending = None
            raise self._failed from None

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def newest_first(self, until: int | None = None) -> list[int]:
        return [s for s in reversed(self.all_steps()) if until is None or s <= until]

    def newest_readable(self) -> tuple[dict, int]:
        """(metadata, step) of the newest step whose metadata and model config read back (a
        damaged newer step is skipped here and reported by restore_intact)."""
        problems = []
        for step in self.newest_first():
            try:
                meta = read_metadata(self.run_dir, step)
                read_model_config(self.run_dir, step)
                return meta, step
            except Exception as e:  # unreadable JSON items
                problems.append(f"step {step}: {type(e).__name__}: {first_line(e, 200)}")
        raise CorruptCheckpoint(f"{self.run_dir}: no checkpoint whose metadata reads back: "
                                + "; ".join(problems))

    def read_config_record(self, step: int) -> dict | None:
        """The config record saved with ``step``, or with the newest older step whose record
        reads back (a damaged step is dealt with by restore_intact); None when none has one."""
        for candidate in self.newest_first(until=step):
            try:
                restored = self._mngr.restore(candidate, args=ocp.args.Composite(
                    gin_config=ocp.args.JsonRestore()))
            except Exception:  # unreadable JSON: try the step before
                continue
            return restored["gin_config"].get("record")
        return None

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, metadata) of ``step`` (default latest committed) onto the
        shardings carried by ``abstract_state`` (ShapeDtypeStructs). Raises
        CorruptCheckpoint when what is read back differs from what was saved.

        ``state.fixed`` is None: the caller rebuilds it from the sources (steps written
        before frozen models were rebuilt hold them: those come back in ``state.fixed``).
        A step written before roles keeps its one trained model's tree and optimizer state
        without the role's name around them (``legacy_unwrap``)."""
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.run_dir}: no committed checkpoint")
        stored = self._stored_metadata(step)
        # Unreadable metadata: restore below reports the step as damaged.
        rebuilt = stored is None or bool(stored.get("frozen_rebuilt"))
        bare = None
        if stored is not None and stored.get("layout") != LAYOUT:
            roles = stored_roles(stored)
            bare = next(r.name for r in roles.roles if r.trained) if roles.bare else None
        unwrap = (lambda t: legacy_unwrap(t, bare)) if bare else (lambda t: t)
        frozen_target = None
        if not rebuilt:  # a very old step: the frozen models were saved in train_state
            names = stored_roles(stored).roles
            frozen_target = {r.name: abstract_state.fixed[r.name] for r in names
                             if not r.trained}
        params_target = unwrap(abstract_state.params)
        rest = {"step": abstract_state.step, "opt_state": unwrap(abstract_state.opt_state),
                "rng": abstract_state.rng, "skipped": abstract_state.skipped,
                "frozen": frozen_target}
        where = self.run_dir / "checkpoints"
        self._check_structure(step, (stored or {}).get("checksums"), params_target, rest)
        items = {"params": ocp.args.StandardRestore(params_target),
                 "train_state": ocp.args.StandardRestore(rest),
                 "data": ocp.args.JsonRestore(), "metadata": ocp.args.JsonRestore()}
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # undecodable bytes surface as tensorstore/JSON/zstd errors
            raise CorruptCheckpoint(f"{where} step {step}: item(s) {self._unreadable(step, items)} "
                                    f"cannot be read back ({type(e).__name__}: "
                                    f"{first_line(e)})") from None
        metadata = restored["metadata"]
        _verify(where, step, "params", metadata, restored["params"])
        _verify(where, step, "train_state", metadata, restored["train_state"])
        r = restored["train_state"]

        def rewrap(tree, like):  # the legacy trees in the state's own structure
            return jax.tree.unflatten(jax.tree.structure(like), jax.tree.leaves(tree))

        state = type(abstract_state)(
            r["step"], rewrap(restored["params"], abstract_state.params),
            rewrap(r["opt_state"], abstract_state.opt_state), r["rng"], r["skipped"],
            r["frozen"])
        return state, restored["data"], metadata

    def _unreadable(self, step: int, items: dict) -> list[str]:
        """Which of ``items`` fail to restore on their own (named in the error: a damaged
        step says where it is damaged)."""
        bad = []
        for name, arg in items.items():
            try:
                self._mngr.restore(step, args=ocp.args.Composite(**{name: arg}))
            except Exception:
                bad.append(name)
        return bad

    def _stored_metadata(self, step: int) -> dict | None:
        """The step's metadata item, or None when it does not read back."""
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(
                metadata=ocp.args.JsonRestore()))["metadata"]
        except Exception:  # unreadable JSON: restore() reports the step as damaged
            return None

    def _check_structure(self, step: int, recorded: dict | None, params, rest) -> None:
        """The step holds the arrays this run's state has (by the paths its checksums were
        ``recorded`` under): a changed optimizer or model is a config problem, not damage."""
        if not recorded:
            return
        for item, tree in (("params", params), ("train_state", rest)):
            want, have = set(checksum.leaf_paths(tree)), set(recorded.get(item, {}))
            if want != have:
                extra, missing = sorted(have - want)[:3], sorted(want - have)[:3]
                raise CheckpointError(
                    f"{self.run_dir} step {step}: item {item!r} holds other arrays than this "
                    f"run's state (saved only: {extra}; expected but not saved: {missing}); "
                    "the optimizer or model config differs from the one it was saved with")

    def restore_intact(self, abstract_state, log=print):
        """(state, data_state, metadata, step) of the newest step that reads back as saved;
        each damaged newer step is reported through ``log`` and skipped. Raises
        CorruptCheckpoint naming every damaged step when none is intact."""
        problems, damaged = [], []
        for step in self.newest_first():
            try:
                state, data_state, metadata = self.restore(abstract_state, step)
            except CorruptCheckpoint as e:
                problems.append(str(e))
                damaged.append(step)
                continue
            for bad in damaged:
                log(f"checkpoint step {bad} skipped and moved to "
                    f"{self._set_aside(bad)}: {problems[damaged.index(bad)]}")
            return state, data_state, metadata, step
        raise CorruptCheckpoint("no intact checkpoint to resume from: " + " | ".join(problems))

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step out of the manager's directory (kept for inspection, never
        deleted) so that training past it can save that step number again."""
        target = self.run_dir / "damaged_checkpoints" / f"{step}.{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.run_dir / "checkpoints" / str(step), target)
        if jax.process_count() > 1:  # every process sees the move before re-listing steps
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jalign_set_aside_{step}")
        self._mngr.reload()
        return target

    def wait(self) -> None:
        self._guarded(self._mngr.wait_until_finished)
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()
