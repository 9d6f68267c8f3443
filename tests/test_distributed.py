"""Two real processes on loopback join one JAX process group through jaxkd.distributed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    from jaxkd.distributed import maybe_initialize
    idx = maybe_initialize()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    local = np.full((jax.local_device_count(), 3), idx + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print(f"proc={idx} devices={jax.device_count()} total={float(total)}")
""")


def test_two_processes_share_one_mesh(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAXKD_LOCAL_DEVICES"] = "2"
    result = subprocess.run(["bash", str(REPO / "launch/local_multiprocess.sh"), "2", sys.executable,
                             str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    # 2 processes x 2 devices x 3 values; process 0 contributes 1s, process 1 contributes 2s.
    for i in range(2):
        assert f"proc={i} devices=4 total=18.0" in result.stdout, result.stdout


def test_half_configured_environment_is_named(monkeypatch):
    monkeypatch.setenv("JAXKD_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("JAXKD_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXKD_PROCESS_ID", raising=False)
    from jaxkd.distributed import maybe_initialize
    with pytest.raises(ValueError, match="JAXKD_NUM_PROCESSES"):
        maybe_initialize()
