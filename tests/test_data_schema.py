"""Corpus schema: every real record validates; malformed records fail with file and line."""

import re
import textwrap
from pathlib import Path

import pytest

from jaxkd.data import schema
from jaxkd.data.schema import CorpusError, load_corpus, load_corpus_file

GOOD = """\
- id: smart_plug-001
  device: smart_plug
  category: smart_home
  issue: app_setup
  symptom: Plug will not join the app during setup and the light keeps blinking amber
  source: manual
  questions:
    - Why will my new smart plug not connect in the app during setup?
    - smart plug stuck blinking amber in setup, tried twice, any ideas?
    - um so the plug just keeps blinking orange and the app never finds it
  steps:
    - Plug it into a wall socket near the router and wait until the light blinks quickly.
    - Connect the phone to the 2.4 GHz network, since most plugs cannot join 5 GHz.
    - Hold the button for 5 seconds to reset Wi-Fi if the light does not blink quickly.
  required:
    - [2.4 ghz, 2.4ghz]
    - [reset, hold the button]
  safety:
    - Do not advise opening the plug housing.
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_real_record_validates():
    records = load_corpus()  # raises CorpusError listing file:line problems
    assert len(records) >= 100
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for r in records:
        assert r["device"] == Path(r["provenance"]["file"]).stem
        assert r["category"] == schema.DEVICES[r["device"]]
        assert r["issue"] in schema.ISSUES and r["source"] in schema.SOURCES
        assert len(r["questions"]) >= 3 and 3 <= len(r["steps"]) <= 8
        assert all(g and all(p == p.lower() for p in g) for g in r["required"])


def test_constants_match_schema_md():
    text = (schema.CORPUS_DIR / "SCHEMA.md").read_text()
    issues = re.search(r"ISSUES:(.*?)\n\n", text, re.S).group(1)
    assert tuple(w.strip() for w in issues.replace("\n", " ").split(",")) == schema.ISSUES
    devices = {}
    for line in re.findall(r"^- (.*): (\w+)$", text, re.M):
        for slug in line[0].split(","):
            devices[slug.strip()] = line[1]
    assert devices == schema.DEVICES
    assert "manual | troubleshooting_guide | vendor_faq | forum_qa" in text


def test_good_file_loads_with_line(tmp_path):
    recs, problems = load_corpus_file(write(tmp_path, "smart_plug.yaml", GOOD + GOOD.replace("-001", "-002")))
    assert problems == []
    assert [r["provenance"]["line"] for r in recs] == [1, 1 + GOOD.count("\n")]


@pytest.mark.parametrize("edit, line, message", [
    (lambda t: t.replace("  issue: app_setup\n", ""), 1, "missing required field 'issue'"),
    (lambda t: t.replace("issue: app_setup", "issue: wifi"), 4, "issue 'wifi' is not allowed"),
    (lambda t: t.replace("source: manual", "source: blog"), 6, "source 'blog' is not allowed"),
    (lambda t: t.replace("category: smart_home", "category: speakers"), 3, "must be 'smart_home'"),
    (lambda t: t.replace("device: smart_plug", "device: smart_bulb"), 2, "does not match the file"),
    (lambda t: t.replace("id: smart_plug-001", "id: plug-1"), 1, "must look like 'smart_plug-NNN'"),
    (lambda t: t.replace("    - um so the plug just keeps blinking orange and the app never finds it\n", ""),
     8, "questions has 2 item(s)"),
    (lambda t: t.replace("[reset, hold the button]", "[Reset, hold the button]"), 17, "must be lower case"),
    (lambda t: t.replace("    - [reset, hold the button]\n", "    - []\n"), 17, "non-empty list"),
    (lambda t: t.replace("  safety:\n    - Do not advise opening the plug housing.\n", "  safety: none\n"),
     18, "safety must be a list"),
    (lambda t: t.replace("  source: manual\n", "  source: manual\n  source: forum_qa\n"), 7,
     "duplicate key 'source'"),
    (lambda t: t.replace("  source: manual\n", "  source: manual\n  sauce: x\n"), 7, "did you mean 'source'"),
    # unclosed flow list: the parser notices on the next line
    (lambda t: t.replace("symptom: Plug", "symptom: [Plug"), 6, "YAML syntax error"),
    (lambda t: t.replace("    - Why will my", "    - Why: will: my"), 8, "YAML syntax error"),
])
def test_malformed_record_names_file_and_line(tmp_path, edit, line, message):
    bad = edit(GOOD)
    assert bad != GOOD
    path = write(tmp_path, "smart_plug.yaml", bad)
    with pytest.raises(CorpusError) as err:
        load_corpus(tmp_path)
    text = str(err.value)
    hits = [p for p in err.value.problems if message in p.message]
    assert hits, text
    assert hits[0].line == line, text
    assert f"{path}:{line}: " in text


def test_second_record_line_and_duplicate_id(tmp_path):
    second = GOOD.replace("issue: app_setup", "issue: pairng")
    write(tmp_path, "smart_plug.yaml", GOOD + second)
    with pytest.raises(CorpusError) as err:
        load_corpus(tmp_path)
    lines = {(p.line, p.message.split(":")[-1].strip()[:40]) for p in err.value.problems}
    n = GOOD.count("\n")
    assert any(p.line == n + 4 and "did you mean 'pairing'" in p.message for p in err.value.problems), lines
    # the duplicate id is only reported for records that are otherwise valid
    write(tmp_path, "smart_plug.yaml", GOOD + GOOD)
    with pytest.raises(CorpusError) as err:
        load_corpus(tmp_path)
    assert [(p.line, "duplicate id" in p.message) for p in err.value.problems] == [(n + 1, True)]


def test_unknown_file_and_non_list(tmp_path):
    write(tmp_path, "smart_plugs.yaml", "id: x\n")
    with pytest.raises(CorpusError) as err:
        load_corpus(tmp_path)
    msgs = [str(p) for p in err.value.problems]
    assert any("did you mean 'smart_plug'" in m for m in msgs), msgs
    assert any("top level must be a list" in m for m in msgs), msgs


def test_cli_build_fails_with_file_and_line(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus, "smart_plug.yaml", GOOD.replace("issue: app_setup", "issue: wifi"))
    proc = subprocess.run([sys.executable, "-m", "jaxkd.data", "build", "--corpus", str(corpus),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{corpus / 'smart_plug.yaml'}:4: " in proc.stderr
    assert not (tmp_path / "out").exists()


def test_lint_warnings_name_file_and_line(tmp_path):
    from jaxkd.data.schema import lint_records

    second = (GOOD.replace("-001", "-002").replace("[2.4 ghz, 2.4ghz]", "[qr code, qr]")
              .replace("[reset, hold the button]", "[reset]"))
    path = write(tmp_path, "smart_plug.yaml", GOOD + second)
    records = load_corpus(tmp_path)  # soft rules do not fail validation
    problems = lint_records(records)
    line = GOOD.count("\n") + 1
    assert [(p.file, p.line) for p in problems] == [(str(path), line)] * 2
    assert "['qr code', 'qr'] is not mentioned by the record's own steps" in problems[0].message
    assert "has 1 synonym(s)" in problems[1].message
    assert lint_records(records[:1]) == []
