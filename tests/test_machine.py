"""jaxkd.machine: the one reader of what a figure was measured on."""

from __future__ import annotations

from jaxkd import machine


def test_cpu_facts_reads_this_machine():
    facts = machine.cpu_facts()
    assert facts["cpu"] and facts["cores"] >= 1
    assert set(facts["simd"]) <= set(machine.SIMD_FLAGS)
    assert facts["ram_gib"] is None or facts["ram_gib"] > 0
    line = machine.describe()
    assert facts["cpu"] in line and f"{facts['cores']} cores" in line


def test_cpu_facts_parses_flags_on_word_boundaries(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU 9000\nflags\t\t: fpu avx2 fma avx512fx amx_bf16\n")
    real = machine.Path

    def fake_path(p, *a):
        return info if str(p) == "/proc/cpuinfo" else real(p, *a)

    monkeypatch.setattr(machine, "Path", fake_path)
    facts = machine.cpu_facts()
    # "avx512fx" is not avx512f: a substring match would have claimed it
    assert facts["cpu"] == "Test CPU 9000" and facts["simd"] == ["avx2", "fma", "amx_bf16"]
