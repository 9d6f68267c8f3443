"""Shared tiny fixtures for the teacher / KD tests: a byte tokenizer with a Qwen-style chat
template, tiny random decoders, and a handful of synthetic corpus records."""

from __future__ import annotations

import jax.numpy as jnp
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxkd.config import ModelConfig
from jaxkd.models.decoder import Decoder

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 256 + len(SPECIALS)   # 259
MODEL_VOCAB = 263                        # padded past the tokenizer, like real checkpoints
IM_END, ENDOFTEXT, IM_START = 256, 257, 258
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Token i < 256 is byte i; 256.. are the Qwen chat specials. <|im_end|> ends a turn."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, extra = printable[:], 0
    byte_of = printable[:]
    for b in range(256):
        if b not in printable:
            byte_of.append(b)
            chars.append(256 + extra)
            extra += 1
    vocab = {chr(c): b for b, c in zip(byte_of, chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>",
                                                additional_special_tokens=list(SPECIALS[1:2]))
    fast.chat_template = CHAT_TEMPLATE
    fast.generation_eos_ids = (fast.convert_tokens_to_ids("<|im_end|>"),
                               fast.convert_tokens_to_ids("<|endoftext|>"))
    assert len(fast) == TOKENIZER_VOCAB, len(fast)
    assert fast.generation_eos_ids == (IM_END, ENDOFTEXT) and fast.pad_token_id == ENDOFTEXT
    return fast


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=MODEL_VOCAB, hidden_size=36, intermediate_size=53, num_layers=2,
                num_heads=3, num_kv_heads=1, head_dim=12, max_position_embeddings=2048,
                qkv_bias=True, eos_token_ids=(IM_END,))
    base.update(kw)
    return ModelConfig(**base)


def tiny_decoder(seed: int = 0, **kw) -> Decoder:
    return Decoder(tiny_config(**kw), rngs=nnx.Rngs(seed), param_dtype=jnp.float32,
                   compute_dtype=jnp.float32)


def tiny_records(n_per_category: int = 3, categories=("audio", "network", "wearable")) -> list[dict]:
    """Synthetic corpus records (the fields the KD stage reads)."""
    out = []
    for c in categories:
        for i in range(n_per_category):
            out.append({
                "id": f"{c}-{i:03d}", "category": c, "device": f"{c}_dev{i % 2}",
                "issue": ["pairing", "power"][i % 2], "split": "train",
                "questions": [f"my {c} thing {i} fails?", f"why does {c} {i} break"],
                "steps": [f"Hold the {c} button {i + 2} s.", "Unplug it; wait 10 s."],
                "required": [["hold the", "press"], ["unplug"]],
                "safety": ["Never open the battery."] if i == 0 else [],
                "symptom": "it fails", "tags": [],
            })
    return out


def write_tiny_presets(root) -> dict:
    """Preset YAMLs ``root/teacher.yaml`` and ``root/student.yaml`` over tiny HF directories
    (different random weights, the byte tokenizer), for the CLI recipes end to end."""
    from jaxkd.models.params import write_hf_dir

    tok = byte_tokenizer()
    out = {}
    for name, seed in (("teacher", 11), ("student", 5)):
        d = write_hf_dir(tiny_config(), tiny_decoder(seed=seed).hf_tensors(), root / name, tokenizer=tok)
        (root / f"{name}.yaml").write_text(f"name: tiny-{name}\nsource: hf\nlocation: {d}\n")
        out[name] = root / f"{name}.yaml"
    return out


def poison_targets_from(first_step: int):
    """A KD ``batch_hook``: from ``first_step`` on, the teacher top-k ids are random tokens, so the
    student is trained away from the teacher and val KL stops falling (model-selection tests)."""
    import numpy as np

    def hook(step: int, batch: dict) -> dict:
        if step < first_step:
            return batch
        rng = np.random.default_rng(step)
        return {**batch, "topk_ids": rng.integers(0, TOKENIZER_VOCAB, batch["topk_ids"].shape).astype(np.int32)}

    return hook


def test_byte_tokenizer_round_trip_and_template():
    tok = byte_tokenizer()
    text = "Pair: hold 5 s — ok"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 2 and ids[-1] == ord("\n")
