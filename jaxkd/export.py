"""Export a trained run (or any model jaxkd loads) to a directory other tools read.

    python -m jaxkd.export runs/kd-cpu --to hf exports/kd-cpu-hf [--step N]

``--to hf`` writes config.json, generation_config.json, model.safetensors and the tokenizer (with
the chat template the run was trained with) so that ``transformers`` loads it with
``AutoModelForCausalLM.from_pretrained(OUT)`` (a LoRA run: its adapters merged into the base
weights, ``W + alpha/r B A``), plus ``jaxkd_serving.json`` (the run's system
prompt and where the weights came from) so that jaxkd serves the export exactly like the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

FORMATS = ("hf",)


def export_hf(model_spec: str, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Load ``model_spec`` with ``jaxkd.serving.load_model`` and write it as an HF directory."""
    from jaxkd.models.params import write_hf_dir
    from jaxkd.serving import SERVING_FILE, load_model

    # A LoRA run loads with its adapters already merged into the base weights (serving.load_model).
    loaded = load_model(model_spec, step=step)
    out = write_hf_dir(loaded.config, loaded.model.hf_tensors(), out_dir, tokenizer=loaded.tokenizer)
    (out / SERVING_FILE).write_text(json.dumps(
        {"name": loaded.name, "system_prompt": loaded.system_prompt, "exported_from": loaded.source,
         "step": loaded.step}, indent=1) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxkd.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a trained run dir (runs/<name>), preset, .gguf or HF dir")
    ap.add_argument("--to", choices=FORMATS, required=True, help="output format")
    ap.add_argument("out", help="output directory (replaced if it exists)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: its best-val step when it kept one, else the latest)")
    args = ap.parse_args(argv)
    from jaxkd.assets import AssetError
    from jaxkd.ckpt import CheckpointError
    from jaxkd.config import ConfigError
    from jaxkd.models.params import WeightsError

    try:
        out = export_hf(args.model, args.out, step=args.step)
    except (CheckpointError, ConfigError, AssetError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.model} -> {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
