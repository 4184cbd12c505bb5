"""Answer extraction and checking for the evaluation tasks.

Every checker returns a `Check`. Its `answer` is the canonical extracted answer, the key that
majority voting groups by: two responses that give the same answer map to the same string.
Where equivalence is uncertain the keys stay apart (a false split costs a vote; a false merge
would pool votes for different answers).

* `check_gsm8k`: the final number (`#### X`, `\\boxed{X}`, "The answer is X", else the last
  number), canonicalised as an exact decimal ("18", "-3.5", "1234") or a reduced fraction
  ("1/3") when it has no finite decimal.
* `check_math`: math-verify (`parse` + `verify`) on the last `\\boxed{...}` of the response
  (the whole response when nothing is boxed), run in a separate worker process so that a time
  limit works from any thread (math-verify's own limit uses SIGALRM: main thread only). The
  voting key is `str()` of math-verify's parsed SymPy expression with a top-level float made an
  exact rational, so `\\frac{1}{2}`, `\\dfrac12`, `0.5` and `\\boxed{0.50}` all give "1/2", while
  `50\\%` ("50*(1/100)") or `x = 1/2` ("Eq(x, 1/2)") stay apart.
* `check_choice`: a multiple-choice letter, preferring explicit statements ("The answer is
  (B)") and never taking the pronoun "I" or the article "A" for an option.
* `check_ifeval`: IFEval strict (`correct`) and loose (`correct_loose`) prompt-level accuracy;
  `answer` is None (IFEval aggregates by MBR, not by voting). See `qalign.tasks.ifeval_checks`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any

from qalign.tasks.base import Check
from qalign.tasks.ifeval_checks import evaluate as _ifeval_evaluate

log = logging.getLogger(__name__)

__all__ = [
    "MathWorkerPool",
    "canonical_number",
    "check_choice",
    "check_gsm8k",
    "check_ifeval",
    "check_math",
    "extract_choice",
    "extract_gsm8k_answer",
    "last_boxed",
    "math_pool",
    "parse_number",
    "shutdown_math_pool",
]

# =============================================================================================
# Shared helpers


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched;
    `\\boxed 5` (no braces) gives "5". None when there is none (or it is never closed)."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s+(?=\S))", text)]
    for m in reversed(starts):
        if m.group(1) != "{":  # "\boxed 5": up to the next whitespace or "$"
            tail = re.match(r"[^\s$]+", text[m.end() :])
            if tail:
                return tail.group(0)
            continue
        depth, i = 1, m.end()
        while i < len(text):
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[m.end() : i]
            i += 1
    return None


# =============================================================================================
# GSM8K

# A number: optional sign and currency, thousands groups, decimals, an optional "/ denominator".
# The lookbehind keeps "3-4" from reading as "3" and "-4", and "B12" or "x2" from reading as 12/2.
_NUMBER = re.compile(
    r"(?<![\w./])(?P<sign>[-−](?=[$€£]?\.?\d))?(?:[$€£]\s*)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)

_ANSWER_IS = re.compile(
    r"(?i)\b(?:final\s+answer|the\s+answer|answer)\s*(?:is|would\s+be|will\s+be|should\s+be"
    r"|equals|=|:)\s*(?::\s*)?"
)


def _fraction(text: str) -> Fraction:
    return Fraction(Decimal(text.replace(",", "")))


def _numbers(text: str) -> list[tuple[Fraction, str]]:
    """Every number in `text` with its source text, in order."""
    out = []
    for m in _NUMBER.finditer(text):
        value = _fraction(m.group("num"))
        if m.group("den"):
            den = _fraction(m.group("den"))
            if den != 0:
                value /= den
        if m.group("sign"):
            value = -value
        out.append((value, m.group(0).strip()))
    return out


def canonical_number(value: Fraction) -> str:
    """The decimal form ("18", "-3.5", "0.125"), or "p/q" when there is no finite decimal."""
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    d = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    s = format(d, "f")
    return "0" if s in ("-0", "0") else s


def _latex_to_text(s: str) -> str:
    """Enough LaTeX removed for the number inside a \\boxed{} to be read."""
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r" \1 ", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\$", "$").replace("\\%", "%").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\((\d+(?:\.\d+)?)\)/\((\d+(?:\.\d+)?)\)", r"\1/\2", s)
    return s


def _first_number_after_equals(segment: str) -> tuple[Fraction, str] | None:
    if "=" in segment:
        nums = _numbers(segment.rsplit("=", 1)[1])
        if nums:
            return nums[0]
    nums = _numbers(segment)
    return nums[0] if nums else None


def parse_number(text: str) -> Fraction | None:
    """The single number a reference answer ("18", "-10", "2,125", "$3.50", "1/2") states."""
    nums = _numbers(_latex_to_text(text.strip()))
    return nums[0][0] if nums else None


def extract_gsm8k_answer(response: str) -> tuple[Fraction, str, str] | None:
    """(value, source text, rule) of a GSM8K response's final answer, or None.

    Rules, in order: the last "#### X"; the last \\boxed{X}; the last "The (final) answer is
    X" (the first number of that sentence, or the first after its last "="); the last number.
    """
    marks = list(re.finditer(r"####\s*([^\n]*)", response))
    for m in reversed(marks):
        found = _first_number_after_equals(m.group(1))
        if found:
            return found[0], found[1], "####"
    boxed = last_boxed(response)
    if boxed is not None:
        found = _first_number_after_equals(_latex_to_text(boxed))
        if found:
            return found[0], found[1], "boxed"
    for m in reversed(list(_ANSWER_IS.finditer(response))):
        rest = _latex_to_text(response[m.end() :])
        # The sentence the phrase starts: up to a line break or a "." that ends a sentence.
        sentence = re.split(r"\n|\.(?=\s|$)", rest, maxsplit=1)[0]
        found = _first_number_after_equals(sentence)
        if found:
            return found[0], found[1], "answer_is"
    nums = _numbers(_latex_to_text(response))
    if nums:
        return nums[-1][0], nums[-1][1], "last_number"
    return None


def check_gsm8k(response: str, reference: str) -> Check:
    """Numeric equality of the response's final answer with the reference number (within
    max(1e-6, 1e-9 * |reference|)). `answer` is the canonical number ("18", "-3.5")."""
    found = extract_gsm8k_answer(response)
    ref = parse_number(reference)
    if found is None:
        return Check(answer=None, correct=False, details={"rule": None})
    value, source, rule = found
    correct = ref is not None and abs(value - ref) <= max(Fraction(1, 10**6), abs(ref) / 10**9)
    return Check(
        answer=canonical_number(value),
        correct=bool(correct),
        details={"rule": rule, "extracted": source},
    )


# =============================================================================================
# MATH (math-verify in worker processes)


def _worker_entry(argv: Sequence[str]) -> None:
    """Main of a pool process (`python -c ...` with: read fd, write fd, modules to import):
    import the modules, say "ready", then run (fn, args) jobs until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    conn_in = Connection(int(argv[0]), writable=False)
    conn_out = Connection(int(argv[1]), readable=False)
    parent = os.getppid()

    def orphan_watch() -> None:  # a stuck job must not outlive the parent
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()
    try:
        for name in argv[2:]:
            importlib.import_module(name)
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        conn_out.send(("ready", None))
    except BaseException as e:
        conn_out.send(("err", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            job = conn_in.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args = job
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except BaseException as e:  # report, keep serving
            reply = ("err", f"{type(e).__name__}: {e}")
        try:
            conn_out.send(reply)
        except (EOFError, OSError):
            return


class _Worker:
    def __init__(self, process: subprocess.Popen[bytes], send: Connection, recv: Connection):
        self.process = process
        self.send = send
        self.recv = recv

    def kill(self) -> None:
        for conn in (self.send, self.recv):
            with contextlib.suppress(OSError):
                conn.close()
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("math worker %d did not exit after SIGKILL", self.process.pid)


class WorkerCrashed(RuntimeError):
    """The worker process died (or could not start) while running a job."""


class MathWorkerPool:
    """A small reusable pool of worker processes, safe to call from any thread.

    `run(fn, args, timeout)` runs `fn(*args)` (a picklable, importable function) in an idle
    worker and waits at most `timeout` seconds for the result; on time-out that worker is killed
    (a new one starts on the next demand) and TimeoutError is raised. Jobs running in other
    workers are not affected. Workers are fresh interpreters (`python -c`, like multiprocessing's
    "spawn" but without re-importing the caller's `__main__`, so scripts need no
    `if __name__ == "__main__"` guard); they exit when the parent process does.
    """

    def __init__(
        self, max_workers: int, init_modules: Sequence[str] = (), startup_timeout: float = 120.0
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.max_workers = max_workers
        self.init_modules = tuple(init_modules)
        self.startup_timeout = startup_timeout
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._count = 0  # workers alive or starting
        self._closed = False

    def _start_worker(self) -> _Worker:
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [p for p in sys.path if p] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        code = (
            "import sys; from qalign.tasks.checkers import _worker_entry; "
            "_worker_entry(sys.argv[1:])"
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(job_r), str(res_w), *self.init_modules],
                pass_fds=(job_r, res_w),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
        except BaseException:
            for fd in (job_r, job_w, res_r, res_w):
                os.close(fd)
            raise
        os.close(job_r)
        os.close(res_w)
        worker = _Worker(
            process, Connection(job_w, readable=False), Connection(res_r, writable=False)
        )
        try:
            if not worker.recv.poll(self.startup_timeout):
                raise WorkerCrashed(f"math worker did not start within {self.startup_timeout} s")
            status, message = worker.recv.recv()
            if status != "ready":
                raise WorkerCrashed(f"math worker failed to start: {message}")
        except (EOFError, OSError) as e:
            worker.kill()
            raise WorkerCrashed(f"math worker died while starting: {e!r}") from e
        except BaseException:
            worker.kill()
            raise
        return worker

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the math worker pool is shut down")
                if self._idle:
                    worker = self._idle.pop()
                    self._busy.add(worker)
                    return worker
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            worker = self._start_worker()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker, *, kill: bool) -> None:
        with self._cond:
            self._busy.discard(worker)
            if kill or self._closed:
                self._count -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()
        if kill or self._closed:
            worker.kill()

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> Any:
        worker = self._acquire()
        kill = True
        try:
            try:
                worker.send.send((fn, args))
                done = worker.recv.poll(timeout)
                if done:
                    status, value = worker.recv.recv()
            except (EOFError, OSError) as e:
                raise WorkerCrashed(f"math worker died: {e!r}") from e
            if not done:  # (TimeoutError is an OSError: raised outside the handler above)
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} took over {timeout} s")
            kill = False
        finally:
            self._release(worker, kill=kill)
        if status != "ok":
            raise RuntimeError(f"math worker error: {value}")
        return value

    @property
    def size(self) -> int:
        """Workers alive or starting."""
        with self._cond:
            return self._count

    def pids(self) -> list[int]:
        """Process ids of the started workers (idle and busy)."""
        with self._cond:
            return [w.process.pid for w in [*self._idle, *self._busy]]

    def shutdown(self) -> None:
        """Stop the idle workers now; busy ones stop when their job ends (or times out)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for w in idle:
            with contextlib.suppress(OSError):
                w.send.send(None)
            w.kill()


_pool_lock = threading.Lock()
_pool: MathWorkerPool | None = None


def math_pool() -> MathWorkerPool:
    """The process-wide pool behind `check_math` (started on first use; size from
    QALIGN_MATH_WORKERS, default min(4, CPU count))."""
    global _pool
    with _pool_lock:
        if _pool is None:
            n = int(os.environ.get("QALIGN_MATH_WORKERS", "0")) or min(4, os.cpu_count() or 1)
            _pool = MathWorkerPool(max_workers=n, init_modules=("math_verify", __name__))
            atexit.register(shutdown_math_pool)
        return _pool


def shutdown_math_pool() -> None:
    """Stop `check_math`'s worker processes (a later call starts new ones)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown()


def _math_canonical(parsed: list[Any]) -> str | None:
    """The voting key of math-verify's parse result (runs in the worker)."""
    if not parsed:
        return None
    first = parsed[0]
    if isinstance(first, str):
        return re.sub(r"\s+", " ", first).strip() or None
    try:
        import sympy

        if isinstance(first, sympy.Float) and first.is_finite:
            first = sympy.Rational(str(first))
        return str(first)
    except Exception:  # e.g. an integer too long for str()
        fallback = parsed[-1] if isinstance(parsed[-1], str) else None
        return re.sub(r"\s+", " ", fallback).strip() if fallback else None


def _math_job(response: str, reference: str) -> tuple[str | None, bool, str | None]:
    """(voting key, verified, text parsed) for one response (runs in the worker)."""
    from math_verify import parse, verify

    boxed = last_boxed(response)
    pred_text = "\\boxed{" + boxed + "}" if boxed is not None else response
    pred = parse(pred_text, parsing_timeout=None)
    gold = parse("\\boxed{" + reference + "}", parsing_timeout=None)
    correct = bool(pred) and bool(gold) and bool(verify(gold, pred, timeout_seconds=None))
    extracted = (
        boxed if boxed is not None else (pred[-1] if pred and isinstance(pred[-1], str) else None)
    )
    return _math_canonical(pred), correct, extracted


@functools.lru_cache(maxsize=8192)
def _math_cached(
    response: str, reference: str, timeout: float
) -> tuple[str | None, bool, str | None]:
    result: tuple[str | None, bool, str | None] = math_pool().run(
        _math_job, (response, reference), timeout
    )
    return result


def check_math(response: str, reference: str, timeout: float = 5.0) -> Check:
    """MATH-style answer check with math-verify: `verify(gold, pred)` where gold is the
    reference LaTeX and pred the last \\boxed{} of the response (the whole response when nothing
    is boxed). Works from any thread; a check that takes over `timeout` seconds is killed and
    counts as wrong, with details {"timeout": True}."""
    try:
        answer, correct, extracted = _math_cached(response, reference, timeout)
    except TimeoutError:
        return Check(
            answer=None,
            correct=False,
            details={"timeout": True, "extracted": last_boxed(response)},
        )
    except (RuntimeError, OSError) as e:
        log.warning("math check failed: %s", e)
        return Check(
            answer=None, correct=False, details={"error": str(e), "extracted": last_boxed(response)}
        )
    return Check(answer=answer, correct=correct, details={"extracted": extracted})


# =============================================================================================
# Multiple choice


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Words after which a capital "A" / "I" is still an option letter ("A is correct"); any other
# lower-case word after it makes it the article / the pronoun ("A good answer", "I think").
_A_LETTER_WORDS = _words(
    "is was would could should must might seems appears looks and or because since as "
    "matches fits states says describes captures answers correctly best has provides "
    "gives remains"
)
_I_LETTER_WORDS = _words(
    "is seems appears looks matches fits states says describes captures answers "
    "correctly best has provides gives remains"
)
_LETTER_CONTEXT_BEFORE = re.compile(r"(?i)(?:option|choice|letter|answer)[\s:]*[(\[*]*\s*$")


def _is_option_letter(text: str, start: int, end: int) -> bool:
    """Whether the capital letter text[start:end] (a standalone "A"/"I"/...) names an option."""
    letter = text[start:end]
    if letter not in ("A", "I"):
        return True
    if _LETTER_CONTEXT_BEFORE.search(text[max(0, start - 40) : start]):
        return True
    after = text[end:]
    if re.match(r"['’][a-zA-Z]", after):  # I'm, I'd, I've, I'll
        return False
    m = re.match(r":?[ \t]+([a-z][a-z'’]*)", after)
    if m:
        word = m.group(1)
        return word in (_A_LETTER_WORDS if letter == "A" else _I_LETTER_WORDS)
    return True


def _letter_class(letters: Sequence[str]) -> str:
    return "".join(re.escape(x) for x in letters)


def extract_choice(response: str, letters: Sequence[str]) -> tuple[str, str] | None:
    """(letter, rule) of the option a response picks, or None.

    Rules, in order (the last match of the first rule that matches wins): "the answer is (B)" /
    "Answer: B"; \\boxed{B}; "option B" / "choice B"; **B** (bold); (B); "B)" / "B." / "B:" at
    the start of a line; the last standalone capital option letter that is not the pronoun "I"
    or the article "A".
    """
    letters = [x.strip().upper() for x in letters]
    cls = _letter_class(letters)
    lower_cls = cls.lower()
    text = response
    if not cls:
        return None
    # A letter: an upper-case option letter, or a lower-case one not followed by a word.
    letter = rf"(?P<l>[{cls}]|[{lower_cls}](?![ \t]+[a-z]))(?![\w'’-])"
    opener = r"[\s*(\[{\"'“‘]*"
    rules = [
        (
            "answer_is",
            rf"(?i:\b(?:final\s+|correct\s+|best\s+|right\s+)?answer(?:\s+choice|\s+option)?"
            rf"\s*(?:is|would\s+be|will\s+be|should\s+be|must\s+be|[:=\-])?\s*"
            rf"(?:option\s+|choice\s+|letter\s+)?){opener}{letter}",
        ),
        ("answer_line", rf"(?m)^[ \t>*#]*A:[ \t]*{opener}(?P<l>[{cls}])(?![\w'’-])"),
        ("boxed", rf"\\boxed\{{(?:\\text(?:bf)?\{{)?\s*\(?(?P<l>[{cls}])\)?\s*\}}"),
        (
            "option",
            rf"(?i:\b(?:option|choice)\s*(?:is|would\s+be|will\s+be|[:#])?\s*){opener}{letter}",
        ),
        ("bold", rf"\*\*\s*\(?(?P<l>[{cls}])\)?(?:[.):][^*\n]*)?\s*\*\*"),
        ("paren", rf"\((?P<l>[{cls}])\)"),
        ("line_start", rf"(?m)^[ \t>*#-]*\(?(?P<l>[{cls}])[.):](?=\s|$)"),
    ]
    for rule, pattern in rules:
        for m in reversed(list(re.finditer(pattern, text))):
            chosen = m.group("l").upper()
            if chosen not in letters:
                continue
            start, end = m.span("l")
            if (
                rule != "paren"
                and m.group("l").isupper()
                and not _is_option_letter(text, start, end)
            ):
                continue
            if (
                rule == "line_start"
                and chosen == "A"
                and text[end : end + 1] == ":"
                and not _is_option_letter(text, start, end)
            ):
                continue
            return chosen, rule
    for m in reversed(list(re.finditer(rf"(?<![\w'’-])(?P<l>[{cls}])(?![\w'’-])", text))):
        if _is_option_letter(text, m.start(), m.end()):
            return m.group("l"), "last_letter"
    return None


def check_choice(response: str, letters: Sequence[str], reference: str) -> Check:
    """Multiple-choice check: `answer` is the picked letter (upper case), `correct` whether it
    is `reference`."""
    found = extract_choice(response, letters)
    if found is None:
        return Check(answer=None, correct=False, details={"rule": None})
    chosen, rule = found
    return Check(answer=chosen, correct=chosen == reference.strip().upper(), details={"rule": rule})


# =============================================================================================
# IFEval


def check_ifeval(response: str, meta: Mapping[str, Any]) -> Check:
    """IFEval prompt-level accuracy: `correct` (strict) and `correct_loose` are True when every
    instruction is followed. `meta` holds `instruction_id_list` and `kwargs` (one dict per
    instruction; None values ignored); details["instructions"] has per-instruction verdicts."""
    ids = list(meta["instruction_id_list"])
    results = _ifeval_evaluate(response, ids, list(meta["kwargs"]))
    per = [
        {"id": iid, "strict": strict, "loose": loose}
        for iid, (strict, loose) in zip(ids, results, strict=True)
    ]
    return Check(
        answer=None,
        correct=all(s for s, _ in results),
        correct_loose=all(lo for _, lo in results),
        details={"instructions": per},
    )
