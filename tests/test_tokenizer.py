"""load_tokenizer: chat template, generation_eos_ids from special tokens only, clear errors."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxkd.models.params import gguf_tokenizer
from jaxkd.models.tokenizer import TokenizerError, load_tokenizer

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer_dir(path, chat_template: str | None = CHAT):
    # "</s>" is an ordinary word in this vocab (as in Qwen's BPE vocab): it must not stop generation.
    vocab = {w: i for i, w in enumerate(["[UNK]", "my", "earbuds", "won't", "pair", "</s>", "user",
                                         "assistant", "system", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def test_chat_template_and_eos_ids(tmp_path):
    src = tiny_tokenizer_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [4]}))
    tok = load_tokenizer(tmp_path)
    im_end, eot = src.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.generation_eos_ids[0] == im_end  # the tokenizer's eos first
    assert set(tok.generation_eos_ids) == {im_end, eot, 4}
    assert 5 not in tok.generation_eos_ids  # the plain word "</s>"
    text = tok.apply_chat_template([{"role": "user", "content": "my earbuds won't pair"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nmy earbuds won't pair<|im_end|>\n<|im_start|>assistant\n"


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="is a GGUF file.*gguf_tokenizer"):
        load_tokenizer(tmp_path / "model.gguf")
    with pytest.raises(TokenizerError, match="GGUF file not found"):
        gguf_tokenizer(tmp_path / "model.gguf")
    tiny_tokenizer_dir(tmp_path / "plain", chat_template=None)
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_tokenizer(tmp_path / "plain")
