"""Standard hooks for ``jaxkd.train.trainer.run_loop``: NaN stop, metrics, progress, checkpoints.

Each factory returns a ``Hook``; a recipe lists the ones it wants in the order they should run
(NaN stop first, so nothing is logged or saved after a bad step). Recipe-specific hooks (KD's
domain re-weighting and validation, GRPO's diagnostics) are plain ``Hook(fn, every=N)`` too.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

from jaxkd.ckpt import RunCheckpointer
from jaxkd.train.metrics import MetricsLogger
from jaxkd.train.trainer import Hook, NonFiniteLoss, StepInfo


def _last_good(ckpt: RunCheckpointer | None) -> str:
    last = ckpt.latest_step() if ckpt is not None else None
    return str(ckpt.step_dir(last)) if last is not None else "none saved yet"


def non_finite_error(values: Mapping[str, float], bad: Sequence[str], step: int,
                     ckpt: RunCheckpointer | None) -> NonFiniteLoss:
    return NonFiniteLoss(
        f"{', '.join(bad)} became {values[bad[0]]} at step {step} (loss {values.get('loss')}); stopped "
        f"without saving. Last good checkpoint: {_last_good(ckpt)}. Lower train.lr, check the inputs "
        f"(e.g. the teacher cache) for NaNs, or resume from that checkpoint with --resume.")


def stop_on_non_finite(ckpt: RunCheckpointer | None, keys: Sequence[str] = ("loss", "grad_norm")) -> Hook:
    """Every step: raise ``NonFiniteLoss`` naming the last good checkpoint when any of ``keys``
    is NaN/inf. Put it first among the after-step hooks."""

    def check(info: StepInfo) -> None:
        values = info.host_metrics()
        bad = [k for k in keys if k in values and not math.isfinite(values[k])]
        if bad:
            raise non_finite_error(values, bad, info.step - 1, ckpt)

    return Hook(check, every=1, name="nan_stop")


def log_metrics(logger: MetricsLogger, *, every: int, lr: Callable[[int], float] | None = None,
                param_norm: Callable[[Any], Any] | None = None, ckpt: RunCheckpointer | None = None,
                prefix: str = "train/", history: list[dict] | None = None) -> Hook:
    """Every ``every`` updates and after the last: the step's metrics, the learning rate, the
    step's wall time and (only here) the parameter norm, to JSONL + TensorBoard. ``history``
    (optional) collects every logged row. A non-finite parameter norm stops the run."""

    def log(info: StepInfo) -> None:
        values = dict(info.host_metrics())
        values["step_s"] = time.perf_counter() - info.started
        if lr is not None:
            values["lr"] = float(lr(info.step - 1))
        if param_norm is not None:
            values["param_norm"] = float(param_norm(info.state["params"]))
            if not math.isfinite(values["param_norm"]):
                raise non_finite_error(values, ["param_norm"], info.step - 1, ckpt)
        logger.log(info.step, values, prefix=prefix)
        if history is not None:
            history.append({"step": info.step, **values})

    return Hook(log, every=every, at_end=True, name="metrics")


def record(history: list[float], key: str = "loss") -> Hook:
    """Every step: append the host value of ``key`` (e.g. the loss curve for the run summary)."""
    return Hook(lambda info: history.append(info.host_metrics()[key]), every=1, name=f"record_{key}")


def progress_bar(start: int, total: int, desc: str) -> tuple[Hook, Callable[[], None]]:
    """(hook, close): a tqdm bar advanced every step with the loss and step seconds."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

    def tick(info: StepInfo) -> None:
        m = info.host_metrics()
        bar.set_postfix(loss=f"{m['loss']:.4f}", s=f"{time.perf_counter() - info.started:.1f}")
        bar.update(1)

    return Hook(tick, every=1, name="progress"), bar.close


def save_checkpoints(ckpt: RunCheckpointer, *, every: int,
                     extras: Callable[[], Mapping[str, Any]] = dict) -> Hook:
    """Every ``every`` updates (0: only) after the last: save the state and ``extras()`` (recipe
    state that must resume with it, e.g. the data iterator's)."""
    return Hook(lambda info: ckpt.save(info.step, info.state, extras()), every=every, at_end=True,
                name="checkpoint")


@dataclasses.dataclass
class BestTracker:
    """The lowest value of a val metric so far, and how many evaluations in a row did not beat it.

    ``update(step, value)`` returns True on a new best (strictly lower; a NaN never is);
    ``exhausted`` is True once ``patience`` (> 0) evaluations in a row brought none, and
    ``stop_reason()`` says so. ``state()`` goes into checkpoints and ``load_state`` takes it back,
    so that a resumed run keeps counting.
    """

    metric: str
    patience: int = 0
    step: int | None = None
    value: float = math.inf
    since: int = 0              # evaluations since the best

    def update(self, step: int, value: float) -> bool:
        if value < self.value:
            self.step, self.value, self.since = int(step), float(value), 0
            return True
        self.since += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.since >= self.patience

    def stop_reason(self) -> str | None:
        """Why early stopping ends the run (None while it should go on)."""
        if not self.exhausted:
            return None
        return (f"val {self.metric} stayed above its lowest, {self.value:.4f} at step {self.step}, for "
                f"{self.since} evaluations (train.early_stop={self.patience})")

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step,
                "value": None if self.step is None else self.value, "since": self.since}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        if state.get("metric") != self.metric:
            raise ValueError(f"the checkpoint tracked the best val {state.get('metric')!r}, this config "
                             f"train.keep_best={self.metric!r}; resume with the setting it was trained with")
        self.step, self.since = state["step"], int(state["since"])
        self.value = math.inf if state["value"] is None else float(state["value"])


__all__ = ["BestTracker", "log_metrics", "non_finite_error", "progress_bar", "record", "save_checkpoints",
           "stop_on_non_finite"]
