"""IFEval: verifiable instruction following (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models", arXiv:2311.07911).

Each prompt carries `instruction_id_list` and one `kwargs` dict per instruction. Every one of the 25 instruction
types of the published prompts is a small function `check(response, **kwargs) -> bool` here, written to the
definitions of the reference implementation (google-research `instruction_following_eval/instructions.py`, as
ported to lm-eval's `tasks/ifeval`), with these deliberate differences: sentences are counted by a rule-based
splitter (the reference loads NLTK's punkt model, a download); words for the capital-word count are
`\\w+([-.]\\w+)*` runs (the reference uses NLTK's word tokenizer; the counts agree on hyphens, "U.S." and "DON'T");
a letter-frequency "letter" that is not a-z (the data asks for `!` and `#`) is counted as given (the reference
swaps in a random letter); keywords are matched literally (`re.escape`; the reference reads them as patterns, the
same for plain words).
Language checks use `langdetect` (seeded, so repeatable); when it cannot decide, the instruction counts as
followed, as in the reference.

Strict: the response as it is. Loose (Section 3 of the paper): the instruction is followed when the response
passes after any combination of removing its first line, its last line and markdown asterisks `*` (8 variants).
An empty response follows nothing. Prompt-level accuracy is "all of the prompt's instructions followed";
instruction-level accuracy counts each instruction alone.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Sequence

import langdetect

langdetect.DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes its answer repeatable

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
# Words a period follows without ending a sentence (the common English abbreviations punkt knows).
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co no fig approx u.s a.m p.m".split())
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


# ---- helpers ------------------------------------------------------------------------------------------------

def _compare(count: int, relation: str, threshold: int) -> bool:
  if relation not in RELATIONS:
    raise ValueError(f"relation {relation!r}; choose one of {RELATIONS}")
  return count < threshold if relation == "less than" else count >= threshold


def _language(text: str) -> str | None:
  """langdetect's language code of `text`, or None when it cannot tell (no letters)."""
  try:
    return langdetect.detect(text)
  except langdetect.LangDetectException:
    return None


def count_words(text: str) -> int:
  """Runs of word characters (`\\w+`), as the reference's `count_words`."""
  return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
  """Sentences: text up to `.`, `!` or `?` (closing quotes or brackets may follow) before whitespace or the end.

  A period after a common abbreviation (`Dr.`, `e.g.`), a single letter (an initial) or a number that begins
  its line (a list enumerator `1.`) does not end one; trailing text without end punctuation is one more
  sentence. This stands in for NLTK's punkt model in the reference, which needs a downloaded model.
  """
  count, start = 0, 0
  for match in _SENTENCE_END.finditer(text):
    words = text[start:match.start()].split()
    last = words[-1].lstrip("(\"'“‘").lower() if words else ""
    line = text[:match.start()].rsplit("\n", 1)[-1].strip()
    if match.group().startswith(".") and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())
                                          or line.isdigit()):
      continue
    count += bool(text[start:match.end()].strip(" \t\n.!?\"'”’)]"))
    start = match.end()
  return count + bool(re.search(r"\w", text[start:]))


# ---- the 25 instruction types (kwargs named as in the data) -------------------------------------------------

def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
  """change_case:capital_word_frequency: words in all capitals, compared with the threshold."""
  words = re.findall(r"\w+(?:[-.]\w+)*", response)  # "OK-ISH", "U.S." count once; "DON'T" twice (as NLTK)
  return _compare(sum(w.isupper() for w in words), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
  """change_case:english_capital: all capital letters, and English."""
  return response.isupper() and _language(response) in ("en", None)


def english_lowercase(response: str) -> bool:
  """change_case:english_lowercase: all lowercase letters, and English."""
  return response.islower() and _language(response) in ("en", None)


def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
  """combination:repeat_prompt: begins with the request, repeated word for word (case aside)."""
  return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def two_responses(response: str) -> bool:
  """combination:two_responses: exactly two different, non-empty answers separated by `******`."""
  parts = response.split("******")
  if any(not p.strip() for p in parts[1:-1]):
    return False
  answers = [p.strip() for p in parts if p.strip()]
  return len(answers) == 2 and answers[0] != answers[1]


def number_placeholders(response: str, *, num_placeholders: int) -> bool:
  """detectable_content:number_placeholders: at least this many `[placeholder]`s."""
  return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, *, postscript_marker: str) -> bool:
  """detectable_content:postscript: the marker (P.S., P.P.S, ...) appears, any case, spaces inside allowed."""
  marker = postscript_marker.strip()
  patterns = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
  pattern = patterns.get(marker, r"\s*" + re.escape(marker.lower()) + r".*$")
  return bool(re.search(pattern, response.lower(), flags=re.MULTILINE))


def constrained_response(response: str) -> bool:
  """detectable_format:constrained_response: contains one of "My answer is yes. / no. / maybe."."""
  return any(option in response.strip() for option in CONSTRAINED_RESPONSES)


def json_format(response: str) -> bool:
  """detectable_format:json_format: the whole response (optionally in a ``` / ```json fence) is JSON."""
  text = response.strip()
  for fence in ("```json", "```Json", "```JSON", "```"):
    text = text.removeprefix(fence)
  try:
    json.loads(text.removesuffix("```").strip())
  except ValueError:
    return False
  return True


def multiple_sections(response: str, *, num_sections: int, section_spliter: str) -> bool:
  """detectable_format:multiple_sections: at least this many sections headed `<spliter> <number>`."""
  parts = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", response)
  return len(parts) - 1 >= num_sections


def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
  """detectable_format:number_bullet_lists: exactly this many markdown bullets (`* item` or `- item`)."""
  stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
  dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
  return len(stars) + len(dashes) == num_bullets


def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
  """detectable_format:number_highlighted_sections: at least this many non-empty `*highlighted*` or `**bold**`
  spans."""
  single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
  double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
  return len(single) + len(double) >= num_highlights


def title(response: str) -> bool:
  """detectable_format:title: a non-empty title in double angular brackets, `<<title>>`."""
  return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def existence(response: str, *, keywords: Sequence[str]) -> bool:
  """keywords:existence: every keyword appears (any case, anywhere)."""
  return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


def forbidden_words(response: str, *, forbidden_words: Sequence[str]) -> bool:
  """keywords:forbidden_words: none of the words appears as a whole word (any case)."""
  return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
  """keywords:frequency: the keyword's occurrences (any case, substrings count) against the threshold."""
  count = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
  return _compare(count, relation, frequency)


def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
  """keywords:letter_frequency: occurrences of the letter (any case) against the threshold."""
  return _compare(collections.Counter(response.lower())[letter.strip().lower()], let_relation, let_frequency)


def response_language(response: str, *, language: str) -> bool:
  """language:response_language: the whole response is in this language (an ISO 639-1 code)."""
  return _language(response) in (language, None)


def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
  """length_constraints:nth_paragraph_first_word: exactly `num_paragraphs` paragraphs (separated by a blank line)
  and paragraph `nth_paragraph` (1-based) starts with `first_word` (case and trailing punctuation aside)."""
  paragraphs = response.split("\n\n")
  count = sum(bool(p.strip()) for p in paragraphs)
  if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
    return False
  word = paragraphs[nth_paragraph - 1].split()[0].strip().lstrip("'").lstrip('"')
  word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
  return count == num_paragraphs and word == first_word.lower()


def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
  """length_constraints:number_paragraphs: exactly this many paragraphs separated by markdown dividers `***`
  (an empty paragraph between two dividers fails)."""
  paragraphs = re.split(r"\s?\*\*\*\s?", response)
  inner = paragraphs[1:-1]
  if any(not p.strip() for p in inner):
    return False
  return sum(bool(p.strip()) for p in paragraphs) == num_paragraphs


def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
  """length_constraints:number_sentences: the sentence count (`count_sentences`) against the threshold."""
  return _compare(count_sentences(response), relation, num_sentences)


def number_words(response: str, *, num_words: int, relation: str) -> bool:
  """length_constraints:number_words: the word count (`count_words`) against the threshold."""
  return _compare(count_words(response), relation, num_words)


def no_comma(response: str) -> bool:
  """punctuation:no_comma: no commas at all."""
  return "," not in response


def end_checker(response: str, *, end_phrase: str) -> bool:
  """startend:end_checker: ends with the phrase (case, surrounding space and double quotes aside)."""
  return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
  """startend:quotation: the whole response is wrapped in double quotation marks."""
  text = response.strip()
  return len(text) > 1 and text[0] == '"' and text[-1] == '"'


INSTRUCTIONS: dict[str, Callable[..., bool]] = {
  "change_case:capital_word_frequency": capital_word_frequency,
  "change_case:english_capital": english_capital,
  "change_case:english_lowercase": english_lowercase,
  "combination:repeat_prompt": repeat_prompt,
  "combination:two_responses": two_responses,
  "detectable_content:number_placeholders": number_placeholders,
  "detectable_content:postscript": postscript,
  "detectable_format:constrained_response": constrained_response,
  "detectable_format:json_format": json_format,
  "detectable_format:multiple_sections": multiple_sections,
  "detectable_format:number_bullet_lists": number_bullet_lists,
  "detectable_format:number_highlighted_sections": number_highlighted_sections,
  "detectable_format:title": title,
  "keywords:existence": existence,
  "keywords:forbidden_words": forbidden_words,
  "keywords:frequency": frequency,
  "keywords:letter_frequency": letter_frequency,
  "language:response_language": response_language,
  "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
  "length_constraints:number_paragraphs": number_paragraphs,
  "length_constraints:number_sentences": number_sentences,
  "length_constraints:number_words": number_words,
  "punctuation:no_comma": no_comma,
  "startend:end_checker": end_checker,
  "startend:quotation": quotation,
}


# ---- strict / loose, per instruction and per prompt ---------------------------------------------------------

def loose_variants(response: str) -> tuple[str, ...]:
  """The response, without its first line, without its last line, without both; each also without `*`."""
  lines = response.split("\n")
  cut = (response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip())
  return cut + tuple(text.replace("*", "") for text in cut)


def follows_instruction(instruction_id: str, kwargs: dict, response: str, *, loose: bool = False) -> bool:
  """Whether `response` follows one instruction (strict, or loose: any of `loose_variants`)."""
  if instruction_id not in INSTRUCTIONS:
    raise ValueError(f"unknown IFEval instruction {instruction_id!r}")
  check = INSTRUCTIONS[instruction_id]
  params = {k: v for k, v in (kwargs or {}).items() if v is not None}
  return any(text.strip() and check(text, **params) for text in (loose_variants(response) if loose else (response,)))


def follows(instruction_ids: Sequence[str], kwargs: Sequence[dict], response: str, *,
            loose: bool = False) -> list[bool]:
  """Instruction-level results: one bool per instruction of the prompt."""
  return [follows_instruction(i, k, response, loose=loose) for i, k in zip(instruction_ids, kwargs, strict=True)]


# ---- a prompt's instructions as the gold "answer" string of rule rewards ------------------------------------

def encode(instruction_ids: Sequence[str], kwargs: Sequence[dict]) -> str:
  """A prompt's instructions as one JSON string (what the data pipeline keeps as the example's answer).

  ValueError when the lists differ in length, an instruction is unknown, or a kwargs entry is not a mapping.
  """
  if not isinstance(instruction_ids, list) or not isinstance(kwargs, list) or len(instruction_ids) != len(kwargs):
    raise ValueError("'instruction_id_list' and 'kwargs' must be lists of the same length")
  unknown = [i for i in instruction_ids if i not in INSTRUCTIONS]
  if unknown:
    raise ValueError(f"unknown IFEval instruction {unknown[0]!r}")
  if not all(isinstance(k, dict) for k in kwargs):
    raise ValueError("each 'kwargs' entry must be a mapping")
  kwargs = [{k: v for k, v in entry.items() if v is not None} for entry in kwargs]
  return json.dumps({"instruction_id_list": list(instruction_ids), "kwargs": kwargs}, sort_keys=True)


def decode(answer: str) -> tuple[list[str], list[dict]]:
  """(instruction ids, kwargs) from `encode`'s string; ValueError when `answer` is not one."""
  try:
    record = json.loads(answer)
    return list(record["instruction_id_list"]), list(record["kwargs"])
  except (TypeError, ValueError, KeyError):
    raise ValueError(f"not an IFEval instruction list: {str(answer)[:60]!r}") from None


def strict_reward(completion: str, answer: str) -> float:
  """Reward: 1.0 when the completion follows all of the prompt's instructions (prompt-level, strict), else 0.0."""
  return float(all(follows(*decode(answer), completion)))


def loose_reward(completion: str, answer: str) -> float:
  """Reward: 1.0 when the completion follows all of the prompt's instructions (prompt-level, loose), else 0.0."""
  return float(all(follows(*decode(answer), completion, loose=True)))
