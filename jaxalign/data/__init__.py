"""Data: readers, formats, tokenisation, batching and the built-in synthetic task."""

from jaxalign.data.formats import Example, parse_records, split_hh_dialogues
from jaxalign.data.pipeline import Batches, DataConfig, build_datasets, load_split
from jaxalign.data.readers import DataError, read_records
from jaxalign.data.synthetic import digits_tokenizer, sort_records, sort_reward

__all__ = ["Batches", "DataConfig", "DataError", "Example", "build_datasets", "digits_tokenizer", "load_split",
           "parse_records", "read_records", "sort_records", "sort_reward", "split_hh_dialogues"]
