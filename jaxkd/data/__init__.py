"""Data side of jaxkd: the curated corpus, cleaning/dedup/tagging, leak-free splits, chat
formatting and grain loaders.

Modules: ``schema`` (record format, validation with file:line), ``textnorm`` (normalisation,
shingles, English check), ``neardup`` (MinHash LSH index), ``clean``, ``tagging``, ``splits``,
``formatting`` (``record_to_messages``, ``sft_examples``), ``store`` (built JSONL / datasets),
``loader`` (grain batches), ``build`` and ``stats`` (``python -m jaxkd.data build|stats``),
``tiny_tokenizer`` (an in-memory BPE with a ChatML template for tests).
"""

from jaxkd.data.formatting import (SYSTEM_PROMPT, example_id, prompt_examples, prompt_messages,
                                   record_to_messages, reference_answer, sft_examples)
from jaxkd.data.loader import ChatLoader, LoaderConfig, tokenize_chat
from jaxkd.data.schema import CorpusError, load_corpus
from jaxkd.data.store import load_dataset, load_records

__all__ = ["SYSTEM_PROMPT", "ChatLoader", "CorpusError", "LoaderConfig", "example_id",
           "load_corpus", "load_dataset", "load_records", "prompt_examples", "prompt_messages",
           "record_to_messages", "reference_answer", "sft_examples", "tokenize_chat"]
