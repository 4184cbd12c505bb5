"""benchmarks/reference.py: the paper authors' QAlign runs against our toy servers and is timed.

Skipped unless the reference's cached environment already exists (building it downloads
packages: `python benchmarks/reference.py` or `reference.ensure_reference_env()` does that once).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from qalign.toy.server import ToyServerOptions, serve_in_thread

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def reference() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import reference as module
    finally:
        sys.path.remove(str(BENCHMARKS))
    if not module.reference_env_ready():
        pytest.skip(f"no reference environment in {module.venv_dir()} (not built by tests)")
    yield module


def test_measure_reference_against_toy_servers(reference: ModuleType) -> None:
    chains, steps = 4, 2
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as gen,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as rm,
    ):
        res = reference.measure_reference(
            gen.url, rm.url, chains=chains, steps=steps, max_new_tokens=4, seed=3
        )
    assert res["steps_per_s"] > 0 and res["seconds"] > 0
    assert res["steps_per_s"] == pytest.approx(chains * (steps + 1) / res["seconds"])
    assert res["reference_version"] == reference.REFERENCE_VERSION
    # One generation and one reward call per chain and step (the initial sample included).
    gen_reqs = res["server"]["generator"]["requests"]
    rm_reqs = res["server"]["reward"]["requests"]
    assert gen_reqs["/v1/completions"] == chains * (steps + 1)
    assert rm_reqs["/classify"] == chains * (steps + 1)
    assert res["server"]["generator"]["errors_by_status"]["400"] == 0
    assert res["mean_gen_tokens"] > 0
    # It samples sensibly: some moves decided, responses made of toy words.
    assert 0.0 <= res["acceptance_rate"] <= 1.0 and res["proposals"] == chains * steps
    assert res["responses_are_toy_words"]


def test_unserved_server_is_a_clear_error(reference: ModuleType) -> None:
    with serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as gen:
        url = gen.url
    with pytest.raises(reference.ReferenceRunError, match="/v1/models"):
        reference.measure_reference(url, url, chains=1, steps=1, max_new_tokens=2)
