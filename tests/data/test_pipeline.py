"""Readers, formats, tokenisation and batching, on synthetic and on the real shared data."""

import collections
import gzip
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign.data import DataError, build_datasets, digits_tokenizer, parse_records, read_records
from jaxalign.data.batching import pack_rows
from jaxalign.data.formats import split_hh_dialogues
from jaxalign.data.pipeline import Batches, DataConfig, load_split
from jaxalign.data.tokenize import encode_example

RECORDS = [{"prompt": [{"role": "user", "content": f"sort : {i} 1"}], "chosen": "1 2", "rejected": "2 1"}
           for i in range(5)]


def test_readers_agree_across_formats(tmp_path):
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
    f.writelines(json.dumps(r) + "\n" for r in RECORDS)
  pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet")
  for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
    assert [r for r, _ in read_records(str(tmp_path / name))] == RECORDS, name


def test_hf_save_to_disk_directory(tmp_path):
  datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
  assert [r for r, _ in read_records(str(tmp_path / "ds"))] == RECORDS


def test_malformed_line_and_missing_field_name_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
  with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
    list(read_records(str(path)))
  path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'rejected'"):
    parse_records(read_records(str(path)), "preference")


def _error(path) -> str:
  """The DataError message reading `path` raises, checked to be one line naming the file."""
  with pytest.raises(DataError) as info:
    list(read_records(str(path)))
  message = str(info.value)
  assert "\n" not in message and message.startswith(str(path) + ":"), message
  return message


def test_non_utf8_bytes_name_file_line_and_column(tmp_path):
  lines = [json.dumps(r).encode() + b"\n" for r in RECORDS]
  lines[2] = lines[2][:11] + b"\xff" + lines[2][12:]
  (tmp_path / "a.jsonl").write_bytes(b"".join(lines))
  assert _error(tmp_path / "a.jsonl").endswith("a.jsonl:3: not UTF-8 text (byte 0xff at column 12)")
  with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
    f.write(b"".join(lines))
  assert _error(tmp_path / "a.jsonl.gz").endswith("a.jsonl.gz:3: not UTF-8 text (byte 0xff at column 12)")
  (tmp_path / "a.json").write_bytes(b'[\n  {"prompt": "x",\n   "chosen": "\xe9t\xe9"}]')
  assert _error(tmp_path / "a.json").endswith("a.json:3: not UTF-8 text (byte 0xe9 at column 15)")


def test_byte_order_mark_is_accepted(tmp_path):
  (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
  (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
  for name in ("a.jsonl", "a.json"):
    assert [r for r, _ in read_records(str(tmp_path / name))] == RECORDS, name


def test_truncated_or_corrupt_gzip_names_file_and_last_line(tmp_path):
  path = tmp_path / "a.jsonl.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"".join(json.dumps({"prompt": str(i), "completion": "y" * 50}).encode() + b"\n" for i in range(2000)))
  whole = path.read_bytes()
  path.write_bytes(whole[:len(whole) // 2])
  message = _error(path)
  assert message.startswith(f"{path}: truncated or corrupt gzip stream after line ")
  complete = int(message.rsplit(" ", 1)[1])
  assert 0 < complete < 2000
  seen = []
  with pytest.raises(DataError, match="truncated"):
    seen.extend(where for _, where in read_records(str(path)))
  assert seen[-1] == f"{path}:{complete}"  # every complete line was read, then the error
  path.write_bytes(whole[:-8] + bytes(8))  # CRC and length trailer zeroed
  assert _error(path) == f"{path}: truncated or corrupt gzip stream after line 2000"
  path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS))  # plain text named .gz
  assert _error(path) == f"{path}: not a gzip file"


def test_files_without_records_are_errors(tmp_path):
  cases = {"a.jsonl": b"", "b.jsonl": b"\n  \n", "c.json": b"", "d.json": b"[]", "e.parquet": b""}
  expected = {"a.jsonl": "empty file", "b.jsonl": "only blank lines", "c.json": "empty file",
              "d.json": "empty JSON list", "e.parquet": "empty file", "f.parquet": "no rows",
              "g.jsonl.gz": "empty file"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  pq.write_table(pa.Table.from_pylist(RECORDS).slice(0, 0), tmp_path / "f.parquet")
  with gzip.open(tmp_path / "g.jsonl.gz", "wb"):
    pass
  for name, why in expected.items():
    assert _error(tmp_path / name) == f"{tmp_path / name}: no records ({why})"


def test_identical_pairs_and_empty_responses_are_counted_and_skipped():
  records = [(dict(RECORDS[0], rejected="1 2"), "x:1"), (dict(RECORDS[1], chosen=" "), "x:2"), (RECORDS[2], "x:3")]
  examples, skipped = parse_records(records, "preference")
  assert len(examples) == 1 and skipped == {"identical responses": 1, "empty response": 1}


def test_hh_rlhf_split_on_the_real_data(data_dir):
  counts = collections.Counter()
  path = data_dir / "hh_rlhf/helpful-rejection-sampled/test.jsonl.gz"
  examples, skipped = parse_records(read_records(str(path)), "preference")
  assert skipped["identical responses"] == 32  # the data README's count
  for e in examples:
    assert e.prompt.endswith("\n\nAssistant:") and e.responses[0] != e.responses[1]
  assert len(examples) + sum(skipped.values()) == 2749
  # the longest-common-prefix split differs from a naive rfind in some records
  naive = sum(r["chosen"].rfind("\n\nAssistant:") != len(split_hh_dialogues(r["chosen"], r["rejected"])[0]) - 12
              for r, _ in read_records(str(path)) if r["chosen"] != r["rejected"])
  assert naive >= 1
  del counts


def test_prompt_tokens_are_shared_and_mask_covers_response_and_eos():
  tok = digits_tokenizer()
  examples, _ = parse_records([(RECORDS[0], "x")], "preference")
  enc = encode_example(tok, examples[0], 32, 16, collections.Counter())
  assert enc.responses[0][-1] == tok.eos_token_id and enc.responses[1][-1] == tok.eos_token_id
  assert tok.convert_ids_to_tokens(enc.prompt.tolist()) == ["<bos>", "<user>", "sort", ":", "0", "1", "<assistant>"]


def test_truncation_keeps_prompt_end_and_counts():
  tok = digits_tokenizer()
  counts = collections.Counter()
  long = parse_records([({"prompt": "sort : " + " ".join("7" * 30), "completion": " ".join("1" * 30)}, "x")], "sft")
  enc = encode_example(tok, long[0][0], 24, 8, counts)
  assert len(enc.prompt) == 8 and len(enc.prompt) + len(enc.responses[0]) == 24
  assert counts == {"prompt truncated": 1, "response truncated": 1}


def test_packing_keeps_documents_apart():
  tok = digits_tokenizer()
  cfg = DataConfig(format="sft", max_length=32, max_prompt_length=16, batch_size=2)
  examples, _ = load_split(("synthetic:sort",), cfg, tok)
  batch, used = pack_rows(examples, 2, 32)
  assert used > 2  # several documents per row
  seg, mask = batch["segment_ids"], batch["loss_mask"]
  assert seg.shape == (2, 32) and seg.max() > 1
  assert np.all(mask[seg == 0] == 0)


def test_batches_are_deterministic_and_resumable():
  tok = digits_tokenizer()
  cfg = DataConfig(format="preference", max_length=32, max_prompt_length=16, batch_size=8,
                   synthetic_size=(40, 8))
  train, _, _ = build_datasets(cfg, tok, seed=1)
  first = [next(train) for _ in range(3)]
  state = train.state()
  rest = [next(train) for _ in range(7)]  # crosses an epoch boundary (40 / 8 = 5 batches)
  again, _, _ = build_datasets(cfg, tok, seed=1)
  again.restore(state)
  for a, b in zip(rest, [next(again) for _ in range(7)]):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  fresh, _, _ = build_datasets(cfg, tok, seed=1)
  np.testing.assert_array_equal(next(fresh)["input_ids"], first[0]["input_ids"])
  assert first[0]["input_ids"].shape == (8, 2, 32)


def test_too_few_examples_is_an_error():
  with pytest.raises(DataError, match="only 3 usable examples"):
    Batches([None] * 3, DataConfig(batch_size=4), 0)


def test_preference_scores_and_margins_reach_the_batch(tmp_path):
  records = [{**r, "score_chosen": 1.5 + i, "score_rejected": -0.5 * i, "margin": 0.25 * i}
             for i, r in enumerate(RECORDS)]
  path = tmp_path / "scored.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  cfg = DataConfig(train=[str(path)], eval=[str(path)], format="preference", batch_size=4, max_length=32,
                   max_prompt_length=16, share_prompt=False)
  batch = next(build_datasets(cfg, digits_tokenizer(), seed=0)[0])
  by_chosen = {r["score_chosen"]: (r["score_rejected"], r["margin"]) for r in records}
  assert batch["scores"].shape == (4, 2) and batch["margin"].shape == (4,)
  for (chosen, rejected), margin in zip(batch["scores"], batch["margin"]):
    assert by_chosen[float(chosen)] == (float(rejected), float(margin))


def test_half_scored_preference_record_is_an_error(tmp_path):
  path = tmp_path / "half.jsonl"
  path.write_text(json.dumps({**RECORDS[0], "score_chosen": 1.0}) + "\n")
  with pytest.raises(DataError, match=r"half.jsonl:1: 'score_chosen' and 'score_rejected' come together"):
    parse_records(read_records(str(path)), "preference")
  path.write_text(json.dumps({**RECORDS[0], "margin": "big"}) + "\n")
  with pytest.raises(DataError, match=r"half.jsonl:1: field 'margin' must be a number"):
    parse_records(read_records(str(path)), "preference")


def test_sort_updown_leaves_the_direction_to_the_preferences():
  """Its demonstrations sort up or down (about half each); its pairs prefer up over down; its answer is up."""
  from jaxalign.data import synthetic

  sft = synthetic.TASKS["sort_updown"](400, 0, "sft")
  digits = [r["prompt"][0]["content"].split(" : ")[1].split() for r in sft]
  up = [r["completion"].split() == sorted(d) for r, d in zip(sft, digits)]
  down = [r["completion"].split() == sorted(d, reverse=True) for r, d in zip(sft, digits)]
  assert all(u or w for u, w in zip(up, down)) and 0.4 < np.mean(up) < 0.6 and 0.4 < np.mean(down) < 0.6
  pairs = synthetic.TASKS["sort_updown"](50, 1, "preference")
  for pair in pairs:
    d = pair["prompt"][0]["content"].split(" : ")[1].split()
    assert pair["chosen"].split() == sorted(d)
    assert pair["rejected"].split() == sorted(d, reverse=True) or len(set(d)) == 1
  assert all(r["answer"].split() == sorted(r["prompt"][0]["content"].split(" : ")[1].split())
             for r in synthetic.TASKS["sort_updown"](20, 2, "prompt"))
