"""IFEval checks: every instruction type of the shared prompts passes and fails where it should; strict vs loose;
the shared file parses into prompt examples whose answers carry the instructions."""

import collections
import json

import pytest

from jaxalign.data import DataError, parse_records, read_records
from jaxalign.verifiers import ifeval

LOWER = "the quick brown fox jumps over the lazy dog and then it runs far away into the green forest."
# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
  ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
   "This is VERY IMPORTANT news.", "This is Very important news."),
  ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
   "Only ONE shouted word.", "TWO SHOUTED words."),
  ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "less than"},
   "The U.S. and the UK-EU deal.", "DON'T STOP."),  # as NLTK's tokens: U.S. / UK-EU once, DO + N'T twice
  ("change_case:english_capital", {}, LOWER.upper(), LOWER.capitalize()),
  ("change_case:english_lowercase", {}, LOWER, LOWER.capitalize()),
  ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
   "write a poem about cats. Cats are soft and small.", "Here is a poem about cats."),
  ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
  ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].",
   "Dear [name], at home."),
  ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you soon.",
   "Hello. See you soon."),
  ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. one\nP.P.S two", "Hi.\nP.S. one"),
  ("detectable_format:constrained_response", {}, "My answer is maybe.", "Maybe."),
  ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]'),
  ("detectable_format:multiple_sections", {"num_sections": 2, "section_spliter": "SECTION"},
   "SECTION 1\nIntro.\nSECTION 2\nBody.", "SECTION 1\nIntro and body."),
  ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* one\n* two\n- three", "* one\n* two"),
  ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "A *first* and a **second** part.",
   "A *first* and a ** ** part."),
  ("detectable_format:title", {}, "<<A Title>>\nText.", "<< >>\nA Title\nText."),
  ("keywords:existence", {"keywords": ["river", "stone"]}, "A Stone in the RIVER.", "A stone in the lake."),
  ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "A catalog of dogs.", "A Cat sat."),
  ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"},
   "Data, data and more data.", "Data and data."),
  ("keywords:frequency", {"keyword": "data", "frequency": 2, "relation": "less than"}, "One data point.",
   "Data and data."),
  ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag.",
   "Zig."),
  ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "A cat.",
   "A banana."),
  ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "# A\n## B",
   "# A"),  # the data asks for '#' and '!' too: counted as given
  ("language:response_language", {"language": "de"},
   "Das ist ein kurzer Satz auf Deutsch, und er ist ganz einfach zu verstehen.",
   "This is a short sentence in English, and it is quite easy to understand."),
  ("length_constraints:nth_paragraph_first_word",
   {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "second"},
   "First paragraph.\n\n\"Second, paragraph.\n\nThird paragraph.", "First.\n\nThird.\n\nSecond."),
  ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "One.\n***\nTwo.\n***\nThree.",
   "One.\n***\n***\nThree."),
  ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
   "Dr. Smith came. He left.", "One. Two! Three?"),
  ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
   "One. Two! Three? Four", "Mr. Smith went to Washington e.g. by train. Then home."),
  ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five",
   "one two three four"),
  ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four",
   "one two three four five"),
  ("punctuation:no_comma", {}, "No commas here.", "Yes, one."),
  ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. "Any other questions?"',
   "Any other questions? Done."),
  ("startend:quotation", {}, '  "All of it quoted."  ', '"Half" quoted.'),
]


def _shared_records(data_dir):
  return [json.loads(line) for line in (data_dir / "ifeval/input_data.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("instruction, kwargs, good, bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_instruction_passes_and_fails(instruction, kwargs, good, bad):
  assert ifeval.follows_instruction(instruction, kwargs, good)
  assert not ifeval.follows_instruction(instruction, kwargs, bad)
  assert not ifeval.follows_instruction(instruction, kwargs, "   ")  # an empty response follows nothing


def test_the_cases_cover_every_instruction_of_the_shared_prompts(data_dir):
  records = _shared_records(data_dir)
  uses = collections.Counter(i for r in records for i in r["instruction_id_list"])
  prompts = collections.Counter(i for r in records for i in set(r["instruction_id_list"]))
  assert len(records) == 541 and len(prompts) == 25  # data README: 541 prompts, 25 instruction types
  assert set(prompts) == set(ifeval.INSTRUCTIONS) == {c[0] for c in CASES}
  assert uses["punctuation:no_comma"] == prompts["punctuation:no_comma"] == 66  # README's counts are uses
  assert uses["length_constraints:number_words"] == 52 and prompts["length_constraints:number_words"] == 50


def test_every_shared_prompt_is_checkable(data_dir):
  """Each prompt's kwargs fit its checks' parameters, and every check runs (no TypeError / KeyError)."""
  response = "SECTION 1\n<<Title>>\n* a point\n\nP.S. " + LOWER
  for record in _shared_records(data_dir):
    ids, kwargs = ifeval.decode(ifeval.encode(record["instruction_id_list"], record["kwargs"]))
    assert ids == record["instruction_id_list"]
    for loose in (False, True):
      assert len(ifeval.follows(ids, kwargs, response, loose=loose)) == len(ids)


def test_loose_forgives_a_first_line_a_last_line_and_asterisks():
  lowercase = ("change_case:english_lowercase", {})
  intro = "Sure! Here is my answer:\n" + LOWER
  assert not ifeval.follows_instruction(*lowercase, intro)
  assert ifeval.follows_instruction(*lowercase, intro, loose=True)  # first line removed
  end = ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"})
  outro = "Answer.\nIs there anything else I can help with?\nHope this helps!"
  assert not ifeval.follows_instruction(*end, outro)
  assert ifeval.follows_instruction(*end, outro, loose=True)  # last line removed
  quoted = ("startend:quotation", {})
  assert not ifeval.follows_instruction(*quoted, '**"Bold and quoted."**')
  assert ifeval.follows_instruction(*quoted, '**"Bold and quoted."**', loose=True)  # asterisks removed
  both = "Title line\n" + LOWER + "\n*Signed*, X"
  assert ifeval.follows_instruction(*lowercase, both, loose=True) and not ifeval.follows_instruction(*lowercase, both)
  assert not ifeval.follows_instruction(*lowercase, "Capital.\nAll.\nLines.", loose=True)  # the middle is not cut
  assert len(set(ifeval.loose_variants("a\n*b*\nc"))) == 8


def test_prompt_level_rewards_need_all_instructions():
  answer = ifeval.encode(["punctuation:no_comma", "length_constraints:number_words"],
                         [{}, {"num_words": 3, "relation": "at least"}])
  assert ifeval.follows(*ifeval.decode(answer), "too short") == [True, False]
  assert ifeval.strict_reward("too short", answer) == 0.0
  assert ifeval.strict_reward("long enough now", answer) == 1.0
  assert ifeval.loose_reward("Intro, with a comma\nlong enough now", answer) == 1.0
  assert ifeval.strict_reward("Intro, with a comma\nlong enough now", answer) == 0.0
  with pytest.raises(ValueError, match="unknown IFEval instruction"):
    ifeval.encode(["no:such"], [{}])
  with pytest.raises(ValueError, match="not an IFEval instruction list"):
    ifeval.decode("#### 72")


def test_the_shared_file_reads_as_prompts_with_their_instructions(data_dir, tmp_path):
  path = data_dir / "ifeval/input_data.jsonl"
  examples, skipped = parse_records(read_records(str(path)), "prompt")
  records = _shared_records(data_dir)
  assert len(examples) == 541 and not skipped
  assert examples[0].prompt == records[0]["prompt"]
  assert ifeval.decode(examples[0].answer) == (records[0]["instruction_id_list"], records[0]["kwargs"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "instruction_id_list": ["no:such"], "kwargs": [{}]}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:1: IFEval record: unknown IFEval instruction 'no:such'"):
    parse_records(read_records(str(bad)), "prompt")
