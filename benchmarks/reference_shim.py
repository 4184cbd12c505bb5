"""Stand-ins for the `qalign.utils` helpers that the reference wheel imports but does not ship.

quest-alignment 1.0.13 on PyPI (the paper authors' package) imports `qalign.utils.timing`,
`qalign.utils.list`, `qalign.utils.math` and `qalign.utils.data` from `qalign/base.py`,
`qalign/model.py` and `qalign/reward.py`, but neither its wheel nor its sdist contains a
`qalign/utils` package (its source folder has no `__init__.py`, so setuptools' package discovery
left it out): as published, `import qalign` fails with ModuleNotFoundError.

`benchmarks/reference.py` installs this file as `qalign/utils/_shim.py` inside the reference's
own virtual environment (never ours), plus one-line submodules (`qalign.utils.list`, ...) that
re-export from it. Only the names the import lines need are defined, written here from what the
call sites expect (their behaviour was checked against the helpers in the authors' public
repository, none of whose code is copied here):

* the MH proposal picks the prefix length uniformly (`sample_index`) and scores that pick
  (`log_prob_index`), as the paper's QUEST/QAlign kernel describes;
* bookkeeping for `QAlign.run`'s output (`join_accepted_values`, `process_batch_outputs`,
  `repeat_on_reject`) and request batching (`chunked`, `unflatten_list`);
* timing hooks (`timing_decorator`, `TimingStats`);
* `get_loader`, needed only by the local (in-process HF model) reward, which the benchmark
  never builds.

One deliberate difference from the authors' helpers: a completion of zero tokens (the model
emitted EOS first; the reference's token lists exclude EOS) has no index in [0, 0), and their
`randint(0, 0)` / `-log(0)` raise. Here it proposes index 0 (regenerate from scratch) with
probability 1. On the toy task about 7 % of first samples are empty, so without this no run of
256 chains would get past its first step.

This module runs under the reference's interpreter only: it must not import our `qalign`.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

# NumPy's global generator, like the rest of the reference (scipy's bernoulli draws from it too),
# so seeding numpy seeds the whole chain.
from numpy.random import randint as _randint

T = TypeVar("T")

__all__ = [
    "TimingStats",
    "chunked",
    "get_loader",
    "join_accepted_values",
    "log_prob_index",
    "process_batch_outputs",
    "repeat_on_reject",
    "sample_index",
    "timing_decorator",
    "unflatten_list",
]


# ---- qalign.utils.math ---------------------------------------------------------------------------


def sample_index(truncation: int) -> int:
    """A prefix length drawn uniformly from {0, ..., truncation - 1} ({0} when truncation is 0)."""
    return int(_randint(0, max(int(truncation), 1)))


def log_prob_index(index: int, truncation: int) -> float:
    """log P(index) under `sample_index(truncation)`: -log(truncation), 0 for an empty sequence."""
    del index  # uniform: every admissible index has the same probability
    return -math.log(max(int(truncation), 1))


# ---- qalign.utils.list ---------------------------------------------------------------------------


def join_accepted_values(
    accept: Iterable[Any], proposal: Iterable[T], state: Iterable[T]
) -> list[T]:
    """Per chain: the proposal's value where the move was accepted, else the current one."""
    return [new if ok else old for ok, new, old in zip(accept, proposal, state, strict=True)]


def process_batch_outputs(state_path: Sequence[dict[str, Any]], batch_size: int) -> list[list[Any]]:
    """Transpose the per-step records (each field a list over chains) into one list per chain.

    Every record keeps its step number `t` (a scalar shared by all chains) and, for each other
    field, the chain's own entry.
    """
    return [
        [
            {"t": record["t"], **{k: v[chain] for k, v in record.items() if k != "t"}}
            for record in state_path
        ]
        for chain in range(batch_size)
    ]


def repeat_on_reject(output: Sequence[dict[str, Any]]) -> list[Any]:
    """The chain's state text at every step: a rejected proposal repeats the last accepted one."""
    texts: list[Any] = []
    current: Any = None
    for record in output:
        if record["accept"]:
            current = record["text"]
        texts.append(current)
    return texts


def unflatten_list(flat: Sequence[T], counts: Iterable[int]) -> list[list[T]]:
    """Split `flat` into consecutive groups of the given sizes."""
    out: list[list[T]] = []
    start = 0
    for n in counts:
        out.append(list(flat[start : start + n]))
        start += n
    return out


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# ---- qalign.utils.timing -------------------------------------------------------------------------


@dataclass
class TimingStats:
    """Call count, total and mean seconds per named operation (`QAlign.print_timing_stats`)."""

    operations: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, operation: str, seconds: float) -> None:
        entry = self.operations.setdefault(operation, {"count": 0, "total": 0.0, "mean": 0.0})
        entry["count"] += 1
        entry["total"] += seconds
        entry["mean"] = entry["total"] / entry["count"]


def timing_decorator(operation: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Time a method into `self.timing_stats` (created on first use)."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def timed(self: Any, *args: Any, **kwargs: Any) -> T:
            stats = getattr(self, "timing_stats", None)
            if stats is None:
                stats = self.timing_stats = TimingStats()
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                stats.record(operation, time.perf_counter() - started)

        return timed

    return decorate


# ---- qalign.utils.data ---------------------------------------------------------------------------


def get_loader(*args: Any, **kwargs: Any) -> Any:
    """Only the reference's in-process HF reward model batches through this; not benchmarked."""
    raise NotImplementedError(
        "qalign.utils.data.get_loader is not part of the quest-alignment wheel and the benchmark's "
        "stand-in does not provide it (only RemoteReward is used)"
    )
