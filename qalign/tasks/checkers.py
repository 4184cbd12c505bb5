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
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any

from qalign.tasks.base import Check
from qalign.tasks.ifeval_checks import evaluate as _ifeval_evaluate

log = logging.getLogger(__name__)

__all__ = [
    "Boxed",
    "MathWorkerPool",
    "boxes",
    "canonical_number",
    "check_choice",
    "check_gsm8k",
    "check_ifeval",
    "check_math",
    "extract_choice",
    "extract_gsm8k_answer",
    "last_boxed",
    "math_answer_parts",
    "math_pool",
    "parse_number",
    "shutdown_math_pool",
]

# =============================================================================================
# Shared helpers


@dataclass(frozen=True)
class Boxed:
    """One `\\boxed{...}` of a text: its content and where the whole box starts and ends."""

    content: str
    start: int
    end: int


def _box_at(text: str, m: re.Match[str]) -> Boxed | None:
    """The box whose opening `_BOX_START` matched at `m` (braces matched), or None if it is
    never closed."""
    if m.group(1) != "{":  # "\boxed 5": up to the next whitespace or "$"
        tail = re.match(r"[^\s$]+", text[m.end() :])
        return Boxed(tail.group(0), m.start(), m.end() + tail.end()) if tail else None
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
                return Boxed(text[m.end() : i], m.start(), i + 1)
        i += 1
    return None


_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+(?=\S))")


def boxes(text: str) -> list[Boxed]:
    """Every closed `\\boxed{...}` / `\\fbox{...}` of `text` in order (a box inside another is
    part of the outer one's content)."""
    out: list[Boxed] = []
    for m in _BOX_START.finditer(text):
        if out and m.start() < out[-1].end:
            continue
        box = _box_at(text, m)
        if box is not None:
            out.append(box)
    return out


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched;
    `\\boxed 5` (no braces) gives "5". None when there is none (or it is never closed)."""
    for m in reversed(list(_BOX_START.finditer(text))):
        box = _box_at(text, m)
        if box is not None:
            return box.content
    return None


# =============================================================================================
# GSM8K

# A number: optional sign and currency, thousands groups (commas, or spaces as in "12 500"),
# decimals, an optional "/ denominator". The lookbehind keeps "3-4" from reading as "3" and "-4",
# and "B12" or "x2" from reading as 12/2; a space group never runs into more digits or a hyphen
# ("1 2345", "3 100-page books" are two numbers).
_SPACE = "[ \u00a0\u2009\u202f]"  # space, no-break space, thin space, narrow no-break space
_NUMBER = re.compile(
    r"(?<![\w./])(?P<sign>[-−](?=[$€£]?\.?\d))?(?:[$€£]\s*)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?"
    rf"|\d{{1,3}}(?:{_SPACE}\d{{3}})+(?![\d-])(?:\.\d+)?"
    r"|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d/]))?"
)
# "Step 2 100 ...", "Day 3 250 ...": after a label, a space is not a thousands separator.
_LABEL_BEFORE = re.compile(
    r"(?i)\b(?:step|day|week|month|year|part|question|problem|case|item|round|level|page"
    r"|chapter|line|row|no\.?|number|#)\s*$"
)

_ANSWER_IS = re.compile(
    r"(?i)\b(?:final\s+answer|the\s+answer|answer)\s*(?:is|would\s+be|will\s+be|should\s+be"
    r"|equals|=|:)\s*(?::\s*)?"
)


def _fraction(text: str) -> Fraction:
    return Fraction(Decimal(re.sub(r"[,\s]", "", text)))


def _numbers(text: str) -> list[tuple[Fraction, str]]:
    """Every number in `text` with its source text, in order."""
    out = []
    pos = 0
    while m := _NUMBER.search(text, pos):
        num = m.group("num")
        if re.search(_SPACE, num) and _LABEL_BEFORE.search(text[: m.start()]):
            # Read only the label's own number, then go on after it.
            first = re.match(r"\d+", num)
            assert first is not None
            pos = m.start("num") + first.end()
            value = Fraction(int(first.group(0)))
            out.append((-value if m.group("sign") else value, text[m.start() : pos].strip()))
            continue
        pos = m.end()
        value = _fraction(num)
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


# A line that starts another problem: models trained on few-shot transcripts go on with
# "Question: ..." (or a chat turn) after answering.
_NEW_PROBLEM = re.compile(
    r"(?im)^[ \t>*#_]*(?:(?:new\s+|next\s+|another\s+)?(?:question|problem|exercise)(?:\s*\d+)?"
    r"|q\d*|human|user|<\|(?:user|im_start)\|?>?)\s*[:.)]?[ \t*_]*(?:(?=\S)|$)"
)


def _cut_new_problem(response: str) -> str:
    """The response up to the first line that starts a new problem after an answer (a line
    before which a number was already written; a restated question at the top is kept)."""
    for m in _NEW_PROBLEM.finditer(response):
        # Only a labelled line counts ("Question:", "Q2:", "User:"), not a sentence that starts
        # with the word "Question".
        if not re.search(r"[:.)>]|\d", response[m.start() : m.end()]):
            continue
        if m.start() > 0 and _numbers(response[: m.start()]):
            return response[: m.start()]
    return response


# The start of a paragraph that comments on the answer after giving it: a note, a check,
# another method, a remark wholly in parentheses, or the same quantity in other units.
_TRAILER = re.compile(
    r"(?i)[ \t>*#_]*(?:\((?=[\s\S]*\)[.!]?\s*$)|(?:notes?|remarks?|check(?:ing)?|verification"
    r"|verify|sanity\s+check|double[- ]?check(?:ing)?|alternatively"
    r"|alternative\s+(?:method|solution|approach)|bonus|p\.\s?s\.|explanation"
    r"|to\s+(?:double[- ]?)?(?:check|verify|confirm)|let['’]?s\s+(?:double[- ]?)?(?:check|verify"
    r"|confirm)|in\s+[a-z]+(?:\s+[a-z]+)?,?\s+(?:that|this|it)\s+(?:is|would\s+be|equals)"
    r"|(?:this|that)\s+is\s+(?:equal|equivalent)\s+to|converting)(?!\w))"
)


def _cut_trailer(text: str) -> str:
    """`text` without its trailing comment paragraphs (_TRAILER). They must close the text:
    every paragraph after the first of them is another comment or holds no number (a note in
    the middle of the working, followed by more working, stays); and a number must come before
    them."""
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*\n", text)]
    paragraphs = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    for i in range(1, len(paragraphs)):
        if not _TRAILER.match(paragraphs[i]) or not _numbers(text[: starts[i]]):
            continue
        if all(_TRAILER.match(p) or not _numbers(p) for p in paragraphs[i + 1 :]):
            return text[: starts[i]]
    return text


# After the answer in its final sentence, the same quantity restated: "3 hours, which is 180
# minutes", "5 miles (about 8 km)", "$18 per day (7 days a week)". The restatement holds one
# number and no arithmetic.
_RESTATEMENT = re.compile(
    r"(?i)(?:,?\s*\([^()=+×*÷/\d]*\d[^()=+×*÷/]*\)"
    r"|(?:,|\s+-+|\s*[—–])\s*(?:which\s+is|which\s+equals|that\s+is|that['’]s|i\.e\.,?|or"
    r"|equivalent\s+to|equal\s+to|about|approximately|roughly)\s+[^=+×*÷/\n]*?)"
    r"[\s.!]*$"
)


def _final_sentence_number(text: str) -> tuple[Fraction, str] | None:
    """The answer of a response that states it in no marked way: the last number of its last
    sentence that has one, after dropping a restatement of the same quantity."""
    # A sentence ends at a line break, or at ".", "!" or "?" before a capital, a digit or "$"
    # (not at "i.e. about").
    sentences = [x for x in re.split(r"\n+|(?<=[.!?])\s+(?=[A-Z0-9$(])", text) if _numbers(x)]
    if not sentences:
        return None
    last = sentences[-1]
    trimmed = _RESTATEMENT.sub("", last)
    if not _numbers(trimmed):
        trimmed = last
    # "... 240 + 10 = 250 km farther to meet the other 10 people": the result of the sentence's
    # last equation, not a number in the words after it.
    if "=" in trimmed and (after := _numbers(trimmed.rsplit("=", 1)[1])):
        return after[0]
    return _numbers(trimmed)[-1]


def extract_gsm8k_answer(response: str) -> tuple[Fraction, str, str] | None:
    """(value, source text, rule) of a GSM8K response's final answer, or None.

    A new problem the model goes on to (a line "Question: ...", "Q2:", "User:" after the
    answer) is cut off first. Rules, in order: the last "#### X"; the last \\boxed{X}; the last
    "The (final) answer is X" (the first number of that sentence, or the first after its last
    "="); the last number of the last sentence that has one, ignoring trailing notes and checks
    (_TRAILER) and a restatement in other units (_RESTATEMENT).
    """
    response = _cut_new_problem(response)
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
    found = _final_sentence_number(_cut_trailer(_latex_to_text(response)))
    if found:
        return found[0], found[1], "last_number"
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


# Between two boxes of one answer ("$x = \boxed{2}$ and $x = \boxed{-3}$", "\boxed{1},
# \boxed{2}", "$\boxed{-2}$ or $\boxed{2}$", "\boxed{(3, 3)} \text{ for part (a) and }
# \boxed{(1, 1)}"): math delimiters, commas, "and", "or", "for part (a)", an assignment "x =".
_BOX_GAP = re.compile(
    r"(?:\s|\$|\\[()\[\]]|[,;&]|\\\\|\\q?quad|\\[,;!]"
    r"|\\text\{\s*(?:for\s+part\s*\(?\w\)?\s*)?(?:and|or|,)?\s*\}"
    r"|\b(?:and|or)\b|(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*=)*"
)
# An explicit final answer written after the last box: "... so the final answer is $24$."
_MATH_ANSWER_IS = re.compile(
    r"(?im)\b(?:(?:the\s+)?final\s+answer|the\s+answer)\s*(?:is|would\s+be|will\s+be|:|=)\s*:?"
    r"|^[ \t*#]*answer\s*:"
)
# A concluding last sentence that names its result: "Therefore, the area is $16$."
_CONCLUSION_IS = re.compile(
    r"(?is)(?:^|[.!?\n]\s*)(?:therefore|thus|hence|so|finally|in\s+conclusion),?\s+"
    r"(?:the|our)\s[^.$\n]{0,80}?\b(?:is|are|equals)\s*\$([^$]+)\$[\s.!]*$"
)


def _answer_stated_after(text: str) -> str | None:
    """The answer that `text` (what follows the last box) states: the rest of the sentence after
    its last "the (final) answer is" / "Answer:", or the math of a concluding last sentence
    ("Therefore, the area is $16$."); without math delimiters. None when there is none."""
    found = list(_MATH_ANSWER_IS.finditer(text))
    if found:
        rest = text[found[-1].end() :]
        sentence = re.split(r"\n|\.(?=\s|$)", rest.strip(" \t*"), maxsplit=1)[0]
        # Without math delimiters and quotes ('the final answer is "$12$ and $13$"').
        sentence = re.sub(r"\\[()\[\]]|\$|\\?[\"“”]", " ", sentence).strip(" \t*.")
        # Math has a digit, a command or is one token; "I hope it is correct" is not an answer.
        if re.search(r"[\d\\]", sentence) or re.fullmatch(r"\S+", sentence):
            return sentence
        return None
    conclusion = _CONCLUSION_IS.search(text)
    return conclusion.group(1).strip() if conclusion else None


def math_answer_parts(response: str) -> list[str] | None:
    """The final answer of a MATH response as LaTeX values for math-verify, or None to let
    math-verify search the whole response (nothing is boxed).

    * An answer stated after the last box ("$x = \\boxed{4}$ ... so the final answer is $16$.",
      "... \\boxed{4}. Therefore, the area is $16$.") wins: the box held an intermediate value.
    * Otherwise the last box, with the boxes right before it that only connectors separate
      (_BOX_GAP): a response that boxes each value of a set or list ("$x = \\boxed{2}$ and
      $x = \\boxed{-3}$") gives them all. Repeated values count once.
    """
    found = boxes(response)
    if not found:
        return None
    stated = _answer_stated_after(response[found[-1].end :])
    if stated is not None:
        return [stated]
    run = [found[-1]]
    for box in reversed(found[:-1]):
        if not _BOX_GAP.fullmatch(response[box.end : run[0].start]):
            break
        run.insert(0, box)
    return list(dict.fromkeys(b.content.strip() for b in run))


def _math_job(response: str, reference: str) -> tuple[str | None, bool, str | None]:
    """(voting key, verified, text parsed) for one response (runs in the worker)."""
    from math_verify import parse, verify

    def parse_boxed(latex: str) -> list[Any]:
        return list(parse("\\boxed{" + latex + "}", parsing_timeout=None))

    parts = math_answer_parts(response)
    if parts is not None and len(parts) > 1:
        # Boxes that agree are one answer in several forms ("\boxed{0.5}, or \boxed{\frac12}"),
        # not a list of values.
        first = parse_boxed(parts[0])
        if first and all(verify(first, parse_boxed(p), timeout_seconds=None) for p in parts[1:]):
            parts = parts[-1:]
    answer = ", ".join(parts) if parts is not None else None
    pred = parse_boxed(answer) if answer is not None else []
    if answer is not None and not pred:  # a stated answer math-verify cannot read: the last box
        answer = last_boxed(response)
        pred = parse_boxed(answer or "")
    if answer is None:
        pred = parse(response, parsing_timeout=None)
    gold = parse_boxed(reference)
    correct = bool(pred) and bool(gold) and bool(verify(gold, pred, timeout_seconds=None))
    extracted = (
        answer if answer is not None else (pred[-1] if pred and isinstance(pred[-1], str) else None)
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


# Other option letters listed with one: "A), B) and D)", "(A) and (B)", "A, B, or D".
_MORE_LETTERS = r"(?:\s*(?:,|/|&|\band\b|\bor\b)\s*(?:(?:option|choice)\s+)?\(?[A-Za-z]\)?)*"
# An option (with the ones listed after it) marked wrong: "A) and B) can be ruled out",
# "Option D is not", "C isn't", "(B) is incorrect", or a bare verdict word closing a clause
# ("a) Incorrect.", "B - wrong,"). Without a verb, "not" or "false" is option text ("B) Not
# enough information", "C) False"), not a verdict.
_NEGATED_AFTER = re.compile(
    rf"(?i)^\)?\.?{_MORE_LETTERS}\s*\)?\s*(?:"
    r"(?:is|are|was|were|can|could|should|must|seems?)\s*(?:be\s+|also\s+)?"
    r"(?:not\b|n['’]t\b|incorrect|wrong|false|ruled\s+out|eliminated|excluded|implausible"
    r"|irrelevant|a\s+distractor)"
    r"|[-–—:]?\s*(?:incorrect|wrong|ruled\s+out|eliminated|excluded)\s*(?:[.,;:!\-–—(]|$))"
)
# An option named after words that set it aside: "eliminate A and B", "ruling out (A)",
# "other than C".
_NEGATED_BEFORE = re.compile(
    r"(?i)\b(?:eliminat\w*|rul\w*\s+out|exclud\w*|discard\w*|cross\w*\s+out|except|other\s+than"
    rf"|besides|not)\s+(?:(?:options?|choices?)\s+)?(?:\(?[A-Za-z]\)?{_MORE_LETTERS}\s*)?\(?$"
)


def _negated(text: str, start: int, end: int) -> bool:
    """Whether the option letter text[start:end] is mentioned as a wrong option."""
    if _NEGATED_AFTER.match(text[end : end + 120]):
        return True
    return bool(_NEGATED_BEFORE.search(text[max(0, start - 80) : start]))


# Rules that trust the position of a letter rather than a statement about it: a letter there
# that is marked wrong is passed over.
_POSITIONAL_RULES = frozenset({"option", "bold", "paren", "line_start", "marker"})


def _choice_rules(cls: str) -> list[tuple[str, ...]]:
    """The rules of `extract_choice` for the option letters `cls` (a character class body of
    upper-case letters): (rule name, pattern, more patterns of the same rule...). Each pattern
    names the letter group "l"."""
    lower_cls = cls.lower()
    # A letter: an upper-case option letter, or a lower-case one not followed by a word.
    letter = rf"(?P<l>[{cls}]|[{lower_cls}](?![ \t]+[a-z]))(?![\w'’-])"
    opener = r"[\s*(\[{\"'“‘]*"
    dash = r"[:=\-—–→]"
    linking = r"(?:is|would\s+be|will\s+be|should\s+be|must\s+be)"
    # A lower-case line-start marker must not be the roman numeral "i." of a sub-list.
    line_letter = rf"(?P<l>[{cls}]|(?!i\.)[{lower_cls}])"
    return [
        (
            "answer_is",
            rf"(?i:\b(?:final\s+|correct\s+|best\s+|right\s+)?answer(?:\s+choice|\s+option)?"
            rf"\s*(?:{linking}\s*{dash}?|{dash})?\s*(?:option\s+|choice\s+|letter\s+)?)"
            rf"{opener}{letter}",
        ),
        ("answer_line", rf"(?m)^[ \t>*#]*A:[ \t]*{opener}(?P<l>[{cls}])(?![\w'’-])"),
        ("boxed", rf"\\boxed\{{(?:\\text(?:bf)?\{{)?\s*\(?(?P<l>[{cls}])\)?\s*\}}"),
        (
            # "C is correct", "(C) is the best answer", "b) Correct.", "That leaves C)", "we are
            # left with C", "only C remains".
            "verdict",
            rf"(?i:(?:\bleaves?|\bleaving|\bleft\s+with|\bonly|\bmust\s+be|\bhas\s+to\s+be)"
            rf"(?:\s+us)?(?:\s+with)?\s+(?:(?:option|choice)\s+)?){opener}{letter}",
            rf"(?<![\w'’])\(?{letter}\)?(?i:\s*(?:is|seems|appears)\s+(?:to\s+be\s+)?(?:the\s+)?"
            r"(?:correct|right|true|best|most\s+(?:likely|accurate|appropriate))\b"
            r"|\s+(?:remains|is\s+left|is\s+the\s+only))",
            rf"(?m)^[ \t>*#-]*\(?{line_letter}[.):][ \t*]*(?i:correct|right|true)\b",
        ),
        (
            "option",
            rf"(?i:\b(?:option|choice)\s*(?:{linking}|[:#])?\s*){opener}{letter}",
        ),
        ("bold", rf"\*\*\s*\(?(?P<l>[{cls}])\)?(?:[.):][^*\n]*)?\s*\*\*"),
        ("paren", rf"\((?P<l>[{cls}])\)"),
        ("line_start", rf"(?m)^[ \t>*#-]*\(?{line_letter}(?:\)\.|[.):])(?=[\s*]|$)"),
        # "it is b) because ...": an option marker anywhere, but not the end of "(a + b)".
        ("marker", rf"(?<![\w(])(?<![-+*/=^×·]\s)(?P<l>[{cls}{lower_cls}])\)"),
    ]


def extract_choice(response: str, letters: Sequence[str]) -> tuple[str, str] | None:
    """(letter, rule) of the option a response picks, or None.

    Rules, in order (the last match of the first rule that matches wins): "the answer is (B)" /
    "Answer: B" / "The answer is: B" / "Answer — B" / "Answer = B"; "A: B" at the start of a
    line; \\boxed{B}; a verdict ("B is correct", "b) Correct", "that leaves B)", "only B
    remains"); "option B" / "choice B"; **B** (bold); (B); "B)" / "B." / "B:" / "b)" at the
    start of a line; "B)" / "b)" anywhere; the last standalone capital option letter that is
    not the pronoun "I" or the article "A". The positional rules (option to marker, and the
    last letter) pass over a letter that the response marks wrong ("A) and B) can be ruled
    out", "Option D is not", "eliminating A").
    """
    letters = [x.strip().upper() for x in letters]
    cls = _letter_class(letters)
    text = response
    if not cls:
        return None
    for rule, *patterns in _choice_rules(cls):
        matches = [m for pattern in patterns for m in re.finditer(pattern, text)]
        for m in sorted(matches, key=lambda m: m.start("l"), reverse=True):
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
            if rule in _POSITIONAL_RULES and _negated(text, start, end):
                continue
            return chosen, rule
    for m in reversed(list(re.finditer(rf"(?<![\w'’-])(?P<l>[{cls}])(?![\w'’-])", text))):
        if _is_option_letter(text, m.start(), m.end()) and not _negated(text, m.start(), m.end()):
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
