"""The reference QAlign (the paper authors' `quest-alignment` package) measured on the toy servers.

The saturation benchmark compares our runner with the reference implementation in the same run,
against the same toy servers. The reference's Python module is also called `qalign`, so it
cannot share our interpreter: it gets its own virtual environment, cached outside the clone
(`~/.cache/qalign/reference/venv`, or `$QALIGN_REFERENCE_CACHE/venv`), and every measurement
runs it in a subprocess of that environment. Nothing of the reference is in this repository.

* `ensure_reference_env()` builds the cache when it is missing or its stamp (the pinned versions)
  differs: quest-alignment 1.0.13 plus what it imports but does not declare (transformers for
  AutoTokenizer, torch and scipy, imported at the top of its base.py / reward.py). torch must
  come from a local CPU wheel (`pip install torch==2.13.0` finds one on these machines); a build
  that would download it from the index is refused unless $QALIGN_REFERENCE_ALLOW_TORCH_DOWNLOAD
  is 1. The published wheel lacks its own `qalign.utils` package, so `reference_shim.py` (ours)
  is installed in its place: see that file for what it provides and its one deviation.
* `measure_reference(gen_url, rm_url, ...)` runs `reference_driver.py` in that environment:
  it makes a local Hugging Face tokenizer for the toy vocabulary and chat template (the
  reference tokenizes client-side and sends text), checks that its templated text encodes on
  the server exactly like our client's messages, builds RemoteVLLM + RemoteReward + QAlign as
  in the reference README's Quick Start and times `chain.run`. The figure is whole-span:
  chains * (steps + 1) / seconds from the first request `run` sends to the end of `run`.

Run (starts its own toy servers, as benchmarks/saturation.py does):

    .venv/bin/python benchmarks/reference.py --chains 256 --steps 8 --max-new-tokens 6 \\
        --profile fast

The first run builds the cache (about 1.5 GB, mostly torch; a minute or two).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHIM = HERE / "reference_shim.py"
DRIVER = HERE / "reference_driver.py"

REFERENCE_PACKAGE = "quest-alignment"
REFERENCE_VERSION = "1.0.13"
# The reference declares none of transformers, torch, scipy (nor numpy, which transformers
# brings), yet imports them all at module level. These are the versions it was verified with
# here: transformers 4.57.6 is the last 4.x (the reference's tokenizer calls were written against
# 4.x; 5.x was not tried), torch 2.13.0 the CPU wheel these machines carry.
TORCH_PIN = "torch==2.13.0"
PINS = (
    f"{REFERENCE_PACKAGE}=={REFERENCE_VERSION}",
    "transformers==4.57.6",
    TORCH_PIN,
    "scipy==1.17.1",
)
STAMP_NAME = "qalign-reference-stamp.json"
SHIM_MODULES = ("timing", "list", "math", "data")  # the qalign.utils.* the reference imports
PIP_TIMEOUT = 1800.0
DEFAULT_PROMPT = "Answer yes or no."


class ReferenceBenchmarkError(RuntimeError):
    """The reference could not be measured."""


class ReferenceEnvError(ReferenceBenchmarkError):
    """Its environment cannot be built or imported (e.g. no registry): callers may skip."""


class ReferenceRunError(ReferenceBenchmarkError):
    """The environment is there but the run failed (a bug or an incompatible server)."""


# ------------------------------------------------------------------------------------------------
# the cached environment


def cache_dir() -> Path:
    override = os.environ.get("QALIGN_REFERENCE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "qalign" / "reference"


def venv_dir() -> Path:
    return cache_dir() / "venv"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _wanted_stamp() -> dict[str, Any]:
    return {"pins": list(PINS), "python": list(sys.version_info[:2])}


def _read_stamp(venv: Path) -> dict[str, Any] | None:
    try:
        stamp: dict[str, Any] = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stamp


def reference_env_ready() -> bool:
    """Whether the cached environment exists and matches the pins (building nothing)."""
    venv = venv_dir()
    stamp = _read_stamp(venv)
    return (
        venv_python(venv).exists()
        and stamp is not None
        and {k: stamp.get(k) for k in _wanted_stamp()} == _wanted_stamp()
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (a test and a benchmark may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_env() -> dict[str, str]:
    """Our environment minus what would leak this checkout into the reference's interpreter."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(key, None)
    env.pop("DEBUG", None)  # the reference prints every payload when DEBUG=true
    return env


def _run(cmd: list[str], what: str, timeout: float, cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ReferenceEnvError(f"{what}: no answer within {timeout:.0f} s") from exc
    if p.returncode != 0:
        # pip prints one "Location ... is ignored" warning per extra index and package: noise.
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "is ignored:" not in ln]
        tail = "\n".join(lines[-25:])
        raise ReferenceEnvError(f"{what} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


def _check_torch_source(py: Path) -> None:
    """Refuse to pull a multi-GB CUDA torch from the index: it must be a local (CPU) wheel."""
    if os.environ.get("QALIGN_REFERENCE_ALLOW_TORCH_DOWNLOAD") == "1":
        return
    with tempfile.TemporaryDirectory(prefix="qalign-reference-") as tmp:
        report = Path(tmp) / "report.json"
        _run(
            [str(py), "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
             "--quiet", "--report", str(report), TORCH_PIN],
            f"resolving {TORCH_PIN}",
            PIP_TIMEOUT,
        )  # fmt: skip
        items = json.loads(report.read_text()).get("install", [])
    for item in items:
        url = str(item.get("download_info", {}).get("url", ""))
        version = str(item.get("metadata", {}).get("version", ""))
        if not url.startswith("file:") and "+cpu" not in version:
            raise ReferenceEnvError(
                f"pip would download {TORCH_PIN} ({version}) from {url}: the reference imports "
                "torch, and the index's build is a CUDA one of several GB. Put a CPU wheel of "
                "that version where pip finds it (PIP_FIND_LINKS), or set "
                "QALIGN_REFERENCE_ALLOW_TORCH_DOWNLOAD=1"
            )


def _site_package_dir(py: Path) -> Path:
    # find_spec locates the package without executing its __init__ (which fails until the shim
    # is in place).
    out = _run(
        [str(py), "-I", "-c",
         "import importlib.util as u; print(u.find_spec('qalign').submodule_search_locations[0])"],
        "locating the reference package",
        120,
    )  # fmt: skip
    return Path(out.strip())


def _install_shim(py: Path) -> None:
    """Put our stand-in `qalign.utils` into the reference's package folder (if changed).

    The code lives in a private `_shim` module and each `qalign.utils.<name>` re-exports it:
    defining it in the package's `__init__` would break it, since importing the submodules
    `list` and `math` rebinds those names in the package namespace.
    """
    utils = _site_package_dir(py) / "utils"
    utils.mkdir(exist_ok=True)
    files = {
        "_shim.py": SHIM.read_text(),
        "__init__.py": '"""Stand-in for the package quest-alignment 1.0.13 does not ship."""\n',
    }
    for name in SHIM_MODULES:
        files[f"{name}.py"] = "from qalign.utils._shim import *  # noqa: F403\n"
    for name, text in files.items():
        target = utils / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def _verify_imports(py: Path) -> None:
    _run(
        [str(py), "-I", "-c",
         "import qalign.base, qalign.model, qalign.reward, transformers, tokenizers"],
        "importing the reference (qalign.base, qalign.model, qalign.reward)",
        600,
    )  # fmt: skip


def ensure_reference_env() -> Path:
    """The reference's virtual environment, built first if missing or stale; returns its folder.

    Raises ReferenceEnvError (with pip's last lines) when it cannot be built or imported.
    """
    venv = venv_dir()
    with _locked(cache_dir() / "build.lock"):
        py = venv_python(venv)
        if not reference_env_ready():
            started = time.perf_counter()
            print(f"building the reference environment in {venv} ...", file=sys.stderr)
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)], "creating the venv", 600)
            _check_torch_source(py)
            _run(
                [str(py), "-m", "pip", "install", "--quiet", *PINS],
                f"pip install {' '.join(PINS)}",
                PIP_TIMEOUT,
            )
            _install_shim(py)
            _verify_imports(py)
            freeze = _run([str(py), "-m", "pip", "freeze"], "pip freeze", 120).split()
            stamp = {
                **_wanted_stamp(),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.perf_counter() - started, 1),
                "freeze": freeze,
            }
            # Written last: an interrupted build has no stamp and is rebuilt next time.
            (venv / STAMP_NAME).write_text(json.dumps(stamp, indent=2))
            print(f"built in {stamp['build_seconds']} s", file=sys.stderr)
        else:
            _install_shim(py)  # cheap; picks up edits of reference_shim.py
    return venv


def reference_build_seconds() -> float | None:
    stamp = _read_stamp(venv_dir())
    return None if stamp is None else stamp.get("build_seconds")


# ------------------------------------------------------------------------------------------------
# one measurement


def _get_json(url: str, timeout: float = 30) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _served_name(url: str) -> str:
    """The first model name a server lists: the reference's model_path (and tokenizer folder)."""
    try:
        name = str(_get_json(f"{url}/v1/models")["data"][0]["id"])
    except Exception as exc:
        raise ReferenceRunError(f"cannot read a model name from {url}/v1/models: {exc}") from exc
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise ReferenceRunError(f"served model name {name!r} cannot name a tokenizer folder")
    return name


def _metrics(url: str) -> dict[str, Any] | None:
    """The toy server's JSON counters, or None for a server without them."""
    try:
        out: dict[str, Any] = _get_json(f"{url}/metrics")
    except Exception:
        return None
    return out if isinstance(out.get("requests"), dict) else None


def _counter_delta(
    before: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    reqs = {
        k: after["requests"].get(k, 0) - before["requests"].get(k, 0)
        for k in ("/v1/completions", "/classify", "/tokenize", "/v1/models")
    }
    return {
        "requests": reqs,
        "generated_tokens": after["generated_tokens"] - before["generated_tokens"],
        "sequences": after["sequences"] - before["sequences"],
        "scored_inputs": after["scored_inputs"] - before["scored_inputs"],
        "errors_by_status": {
            k: v - before["errors_by_status"].get(k, 0)
            for k, v in after["errors_by_status"].items()
        },
    }


def _toy_spec(prompt: str, model: Any) -> dict[str, Any]:
    """The toy vocabulary, specials and chat template markers, for the driver's tokenizer."""
    from qalign.toy.model import BOS, END, EOS, ROLE_IDS, SPECIALS, WORD_BASE

    words = list(model.words)
    specials = {str(i): text for i, text in SPECIALS.items()}
    known = set(words) | set(SPECIALS.values())
    return {
        "specials": specials,
        "bos": SPECIALS[BOS],
        "eos": SPECIALS[EOS],
        "end": SPECIALS[END],
        "unk": "<unk>",
        "roles": {role: SPECIALS[i] for role, i in ROLE_IDS.items()},
        "word_base": WORD_BASE,
        "words": words,
        "extra_words": [w for w in dict.fromkeys(prompt.split()) if w not in known],
    }


def measure_reference(
    gen_url: str,
    rm_url: str,
    *,
    chains: int,
    steps: int,
    max_new_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    beta: float = 1.0,
    concurrency: int = 256,
    max_prompt_length: int = 64,
    seed: int | None = None,
    timeout: float = 3600.0,
    toy_model: Any = None,
) -> dict[str, Any]:
    """Run the reference QAlign once against the given toy servers and time it.

    Returns `steps_per_s` (chains * (steps + 1) / `seconds`, where `seconds` runs from the first
    request `run` sends to the end of `run`), `run_seconds` (the whole `run` call),
    `wall_seconds` (the whole subprocess: imports, tokenizer build, checks, run), the toy
    servers' counters over the run (`server`: requests by endpoint, generated tokens and
    sequences, hence `mean_gen_tokens`), the sampling sanity figures (`acceptance_rate`,
    `responses_are_toy_words`, a few `sample_texts`) and `reference_version`.

    Raises ReferenceEnvError when the environment cannot be built or imported, and
    ReferenceRunError when the run itself fails.
    """
    from qalign.toy.model import ToyModel

    model = toy_model if toy_model is not None else ToyModel()
    gen_url, rm_url = gen_url.rstrip("/"), rm_url.rstrip("/")
    venv = ensure_reference_env()
    gen_name, rm_name = _served_name(gen_url), _served_name(rm_url)
    max_len = int(_get_json(f"{gen_url}/v1/models")["data"][0].get("max_model_len") or 4096)
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    try:
        spec = {
            **_toy_spec(prompt, model),
            "work_dir": str(work),
            "result_path": str(work / "result.json"),
            "gen_url": gen_url,
            "rm_url": rm_url,
            "gen_model": gen_name,
            "rm_model": rm_name,
            "max_model_len": max_len,
            "prompt": prompt,
            "chains": chains,
            "steps": steps,
            "max_new_tokens": max_new_tokens,
            "max_prompt_length": max_prompt_length,
            "beta": beta,
            "concurrency": concurrency,
            "seed": seed,
        }
        (work / "spec.json").write_text(json.dumps(spec, indent=2))
        driver = work / "driver.py"
        shutil.copyfile(DRIVER, driver)
        gen_before, rm_before = _metrics(gen_url), _metrics(rm_url)
        started = time.perf_counter()
        try:
            p = subprocess.run(
                [str(venv_python(venv)), "-I", str(driver), str(work / "spec.json")],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_clean_env(),
                cwd=work,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ReferenceRunError(f"the reference run took over {timeout:.0f} s") from exc
        wall = time.perf_counter() - started
        if p.returncode != 0 or not (work / "result.json").exists():
            tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
            raise ReferenceRunError(f"the reference run failed (exit {p.returncode}):\n{tail}")
        res: dict[str, Any] = json.loads((work / "result.json").read_text())
        gen_delta = _counter_delta(gen_before, _metrics(gen_url))
        rm_delta = _counter_delta(rm_before, _metrics(rm_url))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    words = set(model.words)
    texts: list[str] = [t or "" for t in res.pop("final_texts")]
    res.update(
        wall_seconds=wall,
        reference_version=res["versions"][REFERENCE_PACKAGE],
        server={"generator": gen_delta, "reward": rm_delta},
        mean_gen_tokens=(
            gen_delta["generated_tokens"] / gen_delta["sequences"]
            if gen_delta and gen_delta["sequences"]
            else None
        ),
        responses_are_toy_words=all(w in words for t in texts for w in t.split()),
        empty_responses=sum(1 for t in texts if not t.split()),
        sample_texts=texts[:5],
    )
    return res


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--profile", default="fast", help="a toy server profile of saturation.py")
    ap.add_argument("--concurrency", type=int, default=256, help="max_concurrent_requests")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from saturation import PROFILES, ServerProc, expected_initial_len

    prof = PROFILES[args.profile]
    try:
        ensure_reference_env()
    except ReferenceEnvError as exc:
        sys.exit(f"the reference cannot run here: {exc}")
    gen = ServerProc(served_model_names=("toy-lm",), **prof)
    rm = ServerProc(served_model_names=("toy-rm",))
    try:
        res = measure_reference(
            gen.url,
            rm.url,
            chains=args.chains,
            steps=args.steps,
            max_new_tokens=args.max_new_tokens,
            prompt=args.prompt,
            beta=args.beta,
            concurrency=args.concurrency,
        )
    finally:
        gen.stop()
        rm.stop()

    if res["mean_gen_tokens"] is not None:
        mean_tokens, source = res["mean_gen_tokens"], "toy server /metrics (tokens / sequences)"
    else:
        mean_tokens = expected_initial_len(args.max_new_tokens)
        source = "ToyModel exact expected initial length (no /metrics)"
    ceiling = prof["capacity"] / (prof["latency_base"] + prof["latency_per_token"] * mean_tokens)
    res.update(
        profile=args.profile,
        profile_settings=prof,
        ceiling_steps_per_s=ceiling,
        ratio=res["steps_per_s"] / ceiling,
        mean_gen_tokens_source=source,
        build_seconds=reference_build_seconds(),
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    gen_reqs = (res["server"]["generator"] or {}).get("requests", {})
    rm_reqs = (res["server"]["reward"] or {}).get("requests", {})
    print(json.dumps(res, indent=2))
    print(
        f"\nreference quest-alignment {res['reference_version']}, profile {args.profile}: "
        f"{res['steps_per_s']:.1f} steps/s over {res['seconds']:.2f} s "
        f"({args.chains} chains x ({args.steps} + 1)), ceiling {ceiling:.1f} steps/s, "
        f"ratio {res['ratio']:.3f}\n"
        f"mean generated tokens {mean_tokens:.2f} from {source}; requests: "
        f"{gen_reqs.get('/v1/completions')} completions, {rm_reqs.get('/classify')} classify; "
        f"acceptance rate {res['acceptance_rate']:.3f}; run() {res['run_seconds']:.2f} s, "
        f"subprocess {res['wall_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
