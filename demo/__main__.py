"""``python -m demo [--config configs/demo.yaml] [--scripted] [key.path=value ...]``

Loads the model (the newest trained run under runs/ when there is one, else the packaged
student), compiles it once, loads Whisper and Piper, then serves the UI and API and prints the URL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default configs/demo.yaml)")
    parser.add_argument("--scripted", action="store_true",
                        help="serve canned answers instead of the model (UI work, no weights)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. server.port=8000")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "jaxkd-demo-gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    from demo.app import Services, create_app
    from demo.settings import DEFAULT_CONFIG, load_demo_config

    overrides = list(args.overrides) + (["engine.kind=scripted"] if args.scripted else [])
    cfg = load_demo_config(args.config or DEFAULT_CONFIG, overrides)
    t0 = time.perf_counter()
    print(f"[demo] loading engine={cfg.engine.kind} model={cfg.engine.model} stt={cfg.stt.model} ...",
          flush=True)
    svc = Services.build(cfg)
    print(f"[demo] ready in {time.perf_counter() - t0:.1f} s (warm-up {svc.warmup_seconds:.1f} s), "
          f"serving: {svc.engine.name} from {getattr(svc.engine, 'source', '?')}", flush=True)
    app = create_app(svc)
    url = f"http://{cfg.server.host}:{cfg.server.port}{cfg.server.gradio_path}"
    print(f"[demo] open {url}  (API: /health, /api/ask, /api/transcribe, /ws)", flush=True)
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level="warning",
                ws_max_size=2 * cfg.limits.max_body_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
