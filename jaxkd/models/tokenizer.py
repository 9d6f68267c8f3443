"""The HF tokenizer (with its chat template) for a model, from an HF directory or a GGUF file.

``load_tokenizer`` returns a transformers tokenizer with one extra attribute,
``generation_eos_ids``: every token id generation should stop on. For Qwen chat models that is
``<|im_end|>`` (end of an assistant turn) and ``<|endoftext|>``; the tokenizer's own
``eos_token_id`` and the ``eos_token_id`` of a ``generation_config.json`` next to it are included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# End-of-turn / end-of-text tokens of the chat families jaxkd loads (counted only where they are
# special/added tokens of the tokenizer).
END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>",
                               "<|end|>", "</s>")


class TokenizerError(ValueError):
    """A tokenizer could not be found or built; the message says where we looked."""


def generation_eos_ids(tokenizer: Any, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """Token ids that end generation: eos, generation_config eos, and known end-of-turn tokens."""
    ids: list[int] = []

    def add(i: Any) -> None:
        if isinstance(i, (list, tuple)):
            for j in i:
                add(j)
        elif i is not None and int(i) not in ids:
            ids.append(int(i))

    add(tokenizer.eos_token_id)
    if model_dir is not None and (Path(model_dir) / "generation_config.json").exists():
        add(json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id"))
    special = tokenizer.get_added_vocab()  # never a plain BPE piece that merely spells "</s>"
    for tok in END_TOKENS:
        if tok in special:
            add(special[tok])
    return tuple(ids)


def _finish(tokenizer: Any, model_dir: str | Path | None) -> Any:
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(f"the tokenizer at {model_dir} has no chat template; jaxkd formats every "
                             f"prompt as chat, so use an instruct model's tokenizer")
    tokenizer.generation_eos_ids = generation_eos_ids(tokenizer, model_dir)
    return tokenizer


def tokenizer_from_gguf(gguf_path: str | Path) -> Any:
    """Build the tokenizer from GGUF metadata with transformers' gguf support (~15 s)."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:
        raise TokenizerError(f"could not build a tokenizer from the GGUF metadata of {gguf_path}: "
                             f"{type(e).__name__}: {e}") from e
    return _finish(tok, None)


def load_tokenizer(path_or_dir: str | Path) -> Any:
    """Tokenizer of an HF directory. For a ``.gguf`` file use ``jaxkd.models.params.gguf_tokenizer``
    (it knows where the file's cached HF conversion lives) or ``tokenizer_from_gguf``."""
    from transformers import AutoTokenizer

    path = Path(path_or_dir)
    if path.suffix == ".gguf":
        raise TokenizerError(f"{path} is a GGUF file, not an HF directory: use "
                             f"jaxkd.models.params.gguf_tokenizer(path) (reads the cached HF "
                             f"conversion when there is one) or tokenizer_from_gguf(path)")
    if not path.is_dir() or not ((path / "tokenizer.json").exists()
                                 or (path / "tokenizer_config.json").exists()):
        raise TokenizerError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {path}")
    return _finish(AutoTokenizer.from_pretrained(str(path)), path)
