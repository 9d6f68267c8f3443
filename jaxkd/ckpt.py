"""The one checkpoint format for trained models: a run directory, written by the trainer.

    runs/<name>/
      run.json        serving metadata, written when the run starts: format, recipe, the base
                      model (its ModelSpec and ModelConfig), the trainable subset, and the system
                      prompt + chat template the student was trained with
      config.json     the run's full config (RunConfig)
      ckpt/<step>/    orbax checkpoints (the last ``train.keep``), three items:
        params/       the trainable parameters: all a server needs on top of the base model
        train/        everything else of the train state (optimizer moments, step, rng): resume only
        meta/         JSON: leaf paths of both items, step, time, and recipe extras (e.g. the grain
                      data-iterator state, so ``--resume`` continues exactly)
      best/<step>/    only with ``train.keep_best``: params + meta of the evaluated step with the
                      lowest val metric (meta extras: metric, value); what serving loads
      metrics.jsonl, tb/, summary.json    logs (never read back by the loader)

Frozen weights (the embeddings under ``train.trainable=no_embed``) are not copied: they are the
base model's, which ``run.json`` names; the loader checks that the base still has the recorded
architecture. Arrays are stored under positional names, their pytree paths in ``meta``: a
checkpoint that does not fit the model it is restored onto fails naming the differing entries.
Orbax commits a step by renaming its directory into place, so a save killed half-way leaves no
step behind. ``jaxkd.serving.load_model`` is the one reader for serving; the trainer resumes
with ``RunCheckpointer.restore``.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

FORMAT = "jaxkd-run-v1"
RUN_META = "run.json"
CKPT_DIR = "ckpt"
BEST_DIR = "best"
_ITEMS = ("params", "train", "meta")


class CheckpointError(RuntimeError):
    """A run or checkpoint is missing, incomplete, corrupt or does not fit; the message names the path."""


def committed_steps(run_dir: str | os.PathLike, subdir: str = CKPT_DIR) -> list[int]:
    """Steps committed under ``<run_dir>/<subdir>`` (orbax renames a finished save into
    ``<step>``), read from the directory names without opening orbax."""
    d = Path(run_dir) / subdir
    return sorted(int(x.name) for x in d.iterdir() if x.is_dir() and x.name.isdigit()) if d.is_dir() else []


def served_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
    """``(subdir, step)`` a run is served from: the given ``step`` (from ``ckpt/``, else ``best/``);
    without one, the best-val step when the run kept one (``train.keep_best``), else the latest."""
    if not (Path(run_dir) / CKPT_DIR).is_dir():
        raise CheckpointError(f"{Path(run_dir).absolute()} has no checkpoints: {CKPT_DIR}/ is missing (the "
                              f"run saved no step yet, or this is not a run directory)")
    saved, best = committed_steps(run_dir), committed_steps(run_dir, BEST_DIR)
    if step is None:
        if best:
            return BEST_DIR, best[-1]
        if saved:
            return CKPT_DIR, saved[-1]
        raise CheckpointError(f"{run_dir} has no complete checkpoint under {CKPT_DIR}/ (the run saved no "
                              f"step yet, or its only save was interrupted)")
    if step in saved:
        return CKPT_DIR, int(step)
    if step in best:
        return BEST_DIR, int(step)
    raise CheckpointError(f"{run_dir}: no checkpoint for step {step}; saved steps: {saved}"
                          + (f" (best-val step: {best[-1]})" if best else ""))


# --------------------------------------------------------------------------------------------
# run.json
# --------------------------------------------------------------------------------------------


def write_run_meta(run_dir: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``run_dir/run.json`` atomically (``format`` is added)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_META
    tmp = path.with_name(f".{RUN_META}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_META).is_file()


def read_run_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a run directory; CheckpointError naming the path when it is not usable."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise CheckpointError(f"no trained run at {run_dir}: the directory does not exist")
    path = run_dir / RUN_META
    if not path.is_file():
        hint = (" (it has a ckpt/ directory: a run made by an older jaxkd without serving metadata; "
                "train it again)") if (run_dir / CKPT_DIR).is_dir() else ""
        raise CheckpointError(f"{run_dir} is not a jaxkd run directory: {RUN_META} is missing{hint}")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is corrupt (not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {got!r}, expected {FORMAT!r}")
    for key in ("base_model", "model_config", "trainable"):
        if key not in meta:
            raise CheckpointError(f"{path} is incomplete: key {key!r} is missing")
    return meta


# --------------------------------------------------------------------------------------------
# Orbax checkpoints of the train state
# --------------------------------------------------------------------------------------------


def _flatten(tree: Any) -> tuple[list[str], list[Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in leaves], [v for _, v in leaves]


def abstract_like(tree: Any, sharding: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (a restore target) of ``tree``.

    ``sharding``: None (each leaf's own, the default device for leaves without one), one
    ``jax.sharding.Sharding`` for all leaves, or ``fn(path_str, leaf) -> Sharding``.
    """
    def one(p: Any, x: Any) -> jax.ShapeDtypeStruct:
        if callable(sharding) and not isinstance(sharding, jax.sharding.Sharding):
            s = sharding(jax.tree_util.keystr(p), x)
        else:
            s = sharding if sharding is not None else getattr(x, "sharding", None)
        if s is None:
            s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

    return jax.tree_util.tree_map_with_path(one, tree)


class RunCheckpointer:
    """Orbax checkpoints under ``<run_dir>/<subdir>/<step>`` (the last ``keep``; None keeps all).

    ``save(step, state, extras)`` stores ``state["params"]`` and the rest of ``state`` as separate
    items, so a server restores the parameters without reading the optimizer state. ``subdir``
    is ``ckpt`` (the run's resumable states) or ``best`` (``train.keep_best``: parameters only).
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int | None = None, create: bool = False,
                 subdir: str = CKPT_DIR):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.run_dir = Path(run_dir).absolute()
        self.dir = self.run_dir / subdir
        if not create and not self.dir.is_dir():
            raise CheckpointError(f"{self.run_dir} has no checkpoints: {subdir}/ is missing (the run "
                                  f"saved no step yet, or this is not a run directory)")
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
            item_names=_ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.dir / str(step)

    def save(self, step: int, state: Mapping[str, Any], extras: Mapping[str, Any] | None = None) -> Path:
        """Save ``state`` (a dict with ``params``) and JSON-able ``extras`` as step ``step``;
        returns once the checkpoint is complete on disk."""
        ocp = self._ocp
        rest = {k: v for k, v in state.items() if k != "params"}
        p_paths, p_leaves = _flatten(state["params"])
        t_paths, t_leaves = _flatten(rest)
        meta = {"format": FORMAT, "step": int(step), "params_paths": p_paths, "train_paths": t_paths,
                "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "extras": dict(extras or {})}
        items = {"params": ocp.args.StandardSave({f"a{i:05d}": x for i, x in enumerate(p_leaves)}),
                 "meta": ocp.args.JsonSave(meta)}
        if t_leaves:  # orbax refuses an empty item (a state of parameters only)
            items["train"] = ocp.args.StandardSave({f"a{i:05d}": x for i, x in enumerate(t_leaves)})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()  # a checkpoint is complete before training goes on
        return self.step_dir(step)

    def resolve_step(self, step: int | None) -> int:
        """``step`` if saved (None: the latest); CheckpointError naming the saved steps otherwise."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.run_dir} has no complete checkpoint under {self.dir.name}/ (the "
                                  f"run saved no step yet, or its only save was interrupted)")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.run_dir}: no checkpoint for step {step}; saved steps: {steps}")
        return int(step)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.resolve_step(step)
        where = self.step_dir(step)
        try:
            meta = self.manager.restore(step, args=self._ocp.args.Composite(
                meta=self._ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"could not read the metadata of checkpoint {where} "
                                  f"({type(e).__name__}: {str(e)[:200]}); it is corrupt or incomplete") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {where} is not in format {FORMAT!r} (made by another "
                                  f"jaxkd version?); train the run again")
        return meta

    def _restore_item(self, step: int, item: str, template: Any, paths: list[str]) -> Any:
        where = self.step_dir(step)
        want, leaves = _flatten(template)
        if not want and not paths:
            return template
        if want != paths:
            diff = sorted(set(want) ^ set(paths))[:5]
            raise CheckpointError(
                f"checkpoint {where} does not fit this model / trainable subset ({item}: differing "
                f"entries, e.g. {diff}); restore it with the base model and config it was trained with")
        abstract = {f"a{i:05d}": a for i, a in enumerate(jax.tree.leaves(abstract_like(leaves)))}
        try:
            arrays = self.manager.restore(step, args=self._ocp.args.Composite(
                **{item: self._ocp.args.StandardRestore(abstract)}))[item]
        except Exception as e:
            raise CheckpointError(f"could not read the {item} arrays of checkpoint {where} "
                                  f"({type(e).__name__}: {str(e)[:300]}); it is corrupt or incomplete") from e
        for (k, a), x in zip(abstract.items(), leaves):
            if tuple(arrays[k].shape) != tuple(np.shape(x)):
                raise CheckpointError(f"checkpoint {where}: {item} leaf {want[int(k[1:])]} has shape "
                                      f"{arrays[k].shape}, the model has {np.shape(x)}")
        treedef = jax.tree_util.tree_structure(template)
        return jax.tree_util.tree_unflatten(treedef, [arrays[f"a{i:05d}"] for i in range(len(leaves))])

    def restore(self, step: int | None, template: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(train state laid out like ``template``, recipe extras) of ``step`` (None: the latest)."""
        step = self.resolve_step(step)
        meta = self.read_meta(step)
        params = self._restore_item(step, "params", template["params"], meta["params_paths"])
        rest = self._restore_item(step, "train", {k: v for k, v in template.items() if k != "params"},
                                  meta["train_paths"])
        return {"params": params, **rest}, meta.get("extras", {})

    def start(self, state: Mapping[str, Any], *, resume: bool, log: Callable[[str], None] = print,
              ) -> tuple[Any, dict[str, Any] | None, int]:
        """A training loop's start: ``(state, extras, step)``, restored from the latest checkpoint
        with ``resume``, else ``(state, None, 0)``. Refuses to start over existing checkpoints
        (that would mix two runs in one directory) and to resume from none."""
        latest = self.latest_step()
        if resume:
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.dir}")
            restored, extras = self.restore(latest, state)
            log(f"resumed from {self.step_dir(latest)} at step {latest}")
            return restored, extras, latest
        self.refuse_existing()
        return state, None, 0

    def refuse_existing(self) -> None:
        """FileExistsError when this directory already holds a checkpoint: a fresh run must not
        mix its steps with another run's."""
        if self.latest_step() is not None:
            raise FileExistsError(f"{self.dir} already holds checkpoints; pass --resume to continue "
                                  f"or choose another name= / runs_dir=")

    def restore_params(self, step: int | None, template: Any) -> Any:
        """Only the trainable parameters of ``step`` (None: the latest), laid out like ``template``
        (arrays or ShapeDtypeStructs: restore onto any sharding)."""
        step = self.resolve_step(step)
        return self._restore_item(step, "params", template, self.read_meta(step)["params_paths"])

    def delete_after(self, step: int) -> list[int]:
        """Delete the steps saved after ``step`` (a resumed run recomputes them); returns them."""
        gone = [s for s in self.all_steps() if s > step]
        for s in gone:
            self.manager.delete(s)
        return gone

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["BEST_DIR", "CKPT_DIR", "CheckpointError", "FORMAT", "RUN_META", "RunCheckpointer", "abstract_like",
           "committed_steps", "is_run_dir", "read_run_meta", "served_checkpoint", "write_run_meta"]
