"""Corpus record schema (see ``jaxkd/data/corpus/SCHEMA.md``) and validation with file:line marks.

``load_corpus(corpus_dir)`` reads every ``<device>.yaml``, keeps the YAML node marks, checks every
record and raises ``CorpusError`` listing each problem as ``<file>:<line>: <problem>``. A record
comes back as a plain dict with the schema fields plus ``provenance = {"file", "line"}``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

CATEGORY_DEVICES: dict[str, tuple[str, ...]] = {
    "headphones": ("anc_headphones", "onear_wireless_headphones", "wired_headphones",
                   "bone_conduction_headphones"),
    "earbuds": ("true_wireless_earbuds", "sport_earbuds", "neckband_earbuds"),
    "headsets": ("office_headset", "gaming_headset"),
    "speakers": ("portable_bt_speaker", "rugged_outdoor_speaker", "wifi_multiroom_speaker",
                 "party_speaker", "computer_speakers"),
    "soundbars": ("soundbar_wireless_sub", "atmos_soundbar_earc"),
    "tv_streaming": ("smart_tv", "streaming_stick", "streaming_box"),
    "smart_speakers": ("smart_speaker_assistant", "smart_display"),
    "smart_home": ("smart_plug", "wifi_smart_bulb", "zigbee_smart_bulb", "smart_thermostat",
                   "video_doorbell", "indoor_security_camera", "outdoor_battery_camera",
                   "smart_home_hub", "smart_lock", "robot_vacuum", "smart_smoke_co_alarm"),
    "networking": ("wifi_router", "mesh_wifi_system", "wifi_range_extender"),
    "wearables": ("smartwatch", "fitness_tracker", "smart_ring", "audio_glasses"),
}
DEVICES: dict[str, str] = {d: c for c, ds in CATEGORY_DEVICES.items() for d in ds}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_DEVICES)
ISSUES: tuple[str, ...] = (
    "pairing", "connectivity", "no_audio", "audio_quality", "microphone", "battery_charging",
    "power", "firmware_update", "reset", "app_setup", "wifi_network", "voice_assistant",
    "sync_latency", "controls", "noise_cancelling", "video_display", "sensors_detection",
    "automation_integration", "notifications", "physical_safety")
SOURCES: tuple[str, ...] = ("manual", "troubleshooting_guide", "vendor_faq", "forum_qa")

FIELDS: tuple[str, ...] = ("id", "device", "category", "issue", "symptom", "source", "questions",
                           "steps", "required", "safety")
QUESTIONS_RANGE = (3, 5)
STEPS_RANGE = (3, 8)
REQUIRED_RANGE = (2, 4)
SAFETY_RANGE = (0, 3)


# libyaml's composer when available (fast); its nodes carry the same line marks.
_COMPOSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CorpusError(ValueError):
    """One or more corpus records are malformed; the message lists ``file:line: problem`` lines."""

    def __init__(self, problems: list["Problem"]):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems)
        super().__init__(
            f"{len(problems)} corpus problem(s); fix them in the YAML (format: "
            f"jaxkd/data/corpus/SCHEMA.md):\n{lines}")


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def display_path(path: Path) -> str:
    """Repo-relative path when inside the repo, else the path as given."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


class _Checker:
    """Collects problems for one file while turning YAML nodes into plain Python values."""

    def __init__(self, path: Path):
        self.path = path
        self.file = display_path(path)
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")

    def add(self, node_or_line: yaml.Node | int, message: str) -> None:
        line = node_or_line if isinstance(node_or_line, int) else node_or_line.start_mark.line + 1
        self.problems.append(Problem(self.file, line, message))

    def value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def text(self, node: yaml.Node, where: str, *, single_line: bool = False) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.add(node, f"{where} must be text, got a {_kind(node)}")
            return None
        value = self.value(node)
        if not isinstance(value, str):
            self.add(node, f"{where} must be text, got {type(value).__name__} {value!r}; quote it")
            return None
        if not value.strip():
            self.add(node, f"{where} is empty")
            return None
        if single_line and "\n" in value.strip():
            self.add(node, f"{where} must be one line")
        return value

    def text_list(self, node: yaml.Node, where: str, lo: int, hi: int) -> list[str] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.add(node, f"{where} must be a list, got a {_kind(node)}")
            return None
        if not lo <= len(node.value) <= hi:
            self.add(node, f"{where} has {len(node.value)} item(s); the schema allows {lo}-{hi}")
        items = [self.text(item, f"{where}[{i}]") for i, item in enumerate(node.value)]
        return None if any(i is None for i in items) else items  # type: ignore[return-value]


def _kind(node: yaml.Node) -> str:
    return {yaml.ScalarNode: "scalar", yaml.SequenceNode: "list",
            yaml.MappingNode: "mapping"}.get(type(node), type(node).__name__)


def _check_record(ck: _Checker, node: yaml.Node, index: int, device_slug: str) -> dict | None:
    if not isinstance(node, yaml.MappingNode):
        ck.add(node, f"record {index} must be a mapping of fields, got a {_kind(node)}")
        return None
    fields: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = ck.value(key_node)
        if key in fields:
            ck.add(key_node, f"duplicate key {key!r} in record {index}")
            continue
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.add(key_node, f"unknown field {key!r}{hint}; allowed: {list(FIELDS)}")
            continue
        fields[key] = value_node
    n_before = len(ck.problems)
    rid = fields.get("id")
    label = f"record {index}"
    for name in FIELDS:
        if name not in fields:
            ck.add(node, f"{label}: missing required field {name!r}")
    rec: dict[str, Any] = {}
    if "id" in fields:
        rec["id"] = ck.text(fields["id"], "id")
        if rec["id"] is not None:
            label = rec["id"]
            if not re.fullmatch(rf"{re.escape(device_slug)}-\d{{3}}", rec["id"]):
                ck.add(fields["id"], f"id {rec['id']!r} must look like '{device_slug}-NNN' "
                                     "(the file's device slug, zero-padded number)")
    if "device" in fields:
        rec["device"] = ck.text(fields["device"], f"{label}: device")
        if rec["device"] is not None and rec["device"] != device_slug:
            known = "" if rec["device"] in DEVICES else " (and it is not a known device slug)"
            ck.add(fields["device"], f"{label}: device {rec['device']!r} does not match the file "
                                     f"name {device_slug!r}{known}")
    if "category" in fields:
        rec["category"] = ck.text(fields["category"], f"{label}: category")
        want = DEVICES.get(device_slug)
        if rec["category"] is not None and want is not None and rec["category"] != want:
            ck.add(fields["category"], f"{label}: category {rec['category']!r} is wrong for device "
                                       f"{device_slug!r}; it must be {want!r}")
    for name, allowed in (("issue", ISSUES), ("source", SOURCES)):
        if name in fields:
            rec[name] = ck.text(fields[name], f"{label}: {name}")
            if rec[name] is not None and rec[name] not in allowed:
                close = difflib.get_close_matches(rec[name], allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                ck.add(fields[name], f"{label}: {name} {rec[name]!r} is not allowed{hint}; "
                                     f"allowed: {list(allowed)}")
    if "symptom" in fields:
        rec["symptom"] = ck.text(fields["symptom"], f"{label}: symptom", single_line=True)
    if "questions" in fields:
        rec["questions"] = ck.text_list(fields["questions"], f"{label}: questions", *QUESTIONS_RANGE)
    if "steps" in fields:
        rec["steps"] = ck.text_list(fields["steps"], f"{label}: steps", *STEPS_RANGE)
    if "safety" in fields:
        rec["safety"] = ck.text_list(fields["safety"], f"{label}: safety", *SAFETY_RANGE)
    if "required" in fields:
        rec["required"] = _check_required(ck, fields["required"], label)
    if len(ck.problems) > n_before:
        return None
    rec["provenance"] = {"file": ck.file, "line": node.start_mark.line + 1}
    return rec


def _check_required(ck: _Checker, node: yaml.Node, label: str) -> list[list[str]] | None:
    where = f"{label}: required"
    if not isinstance(node, yaml.SequenceNode):
        ck.add(node, f"{where} must be a list of synonym lists, got a {_kind(node)}")
        return None
    lo, hi = REQUIRED_RANGE
    if not lo <= len(node.value) <= hi:
        ck.add(node, f"{where} has {len(node.value)} group(s); the schema allows {lo}-{hi}")
    groups: list[list[str]] = []
    ok = True
    for g, group in enumerate(node.value):
        if not isinstance(group, yaml.SequenceNode) or not group.value:
            ck.add(group, f"{where}[{g}] must be a non-empty list of synonyms like "
                          "[pairing mode, discoverable]")
            ok = False
            continue
        phrases = [ck.text(p, f"{where}[{g}][{i}]") for i, p in enumerate(group.value)]
        for p, pnode in zip(phrases, group.value):
            if p is not None and p != p.lower():
                ck.add(pnode, f"{where}[{g}]: {p!r} must be lower case (matching is "
                              "case-insensitive on normalised text)")
                ok = False
        if any(p is None for p in phrases):
            ok = False
            continue
        groups.append(phrases)  # type: ignore[arg-type]
    return groups if ok else None


def load_corpus_file(path: str | Path) -> tuple[list[dict], list[Problem]]:
    """Records of one ``<device>.yaml`` file and the problems found in it (file:line each)."""
    path = Path(path)
    ck = _Checker(path)
    slug = path.stem
    if slug not in DEVICES:
        close = difflib.get_close_matches(slug, DEVICES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        ck.add(1, f"file name {slug!r} is not a known device slug{hint}; see SCHEMA.md DEVICES")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=_COMPOSER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        ck.add(line, f"YAML syntax error: {problem}")
        return [], ck.problems
    except UnicodeDecodeError as e:
        ck.add(1, f"file is not UTF-8 text: {e}")
        return [], ck.problems
    if root is None:
        ck.add(1, "file is empty; it must be a YAML list of records")
        return [], ck.problems
    if not isinstance(root, yaml.SequenceNode):
        ck.add(root, f"top level must be a list of records, got a {_kind(root)}")
        return [], ck.problems
    records = []
    for i, node in enumerate(root.value):
        rec = _check_record(ck, node, i, slug)
        if rec is not None:
            records.append(rec)
    return records, ck.problems


def load_corpus(corpus_dir: str | Path = CORPUS_DIR) -> list[dict]:
    """All records of ``corpus_dir/*.yaml`` in file then document order; raises ``CorpusError``."""
    corpus_dir = Path(corpus_dir)
    files = sorted(corpus_dir.glob("*.yaml")) + sorted(corpus_dir.glob("*.yml"))
    if not files:
        raise CorpusError([Problem(display_path(corpus_dir), 0, "no *.yaml corpus files found")])
    records: list[dict] = []
    problems: list[Problem] = []
    for path in files:
        recs, probs = load_corpus_file(path)
        records.extend(recs)
        problems.extend(probs)
    seen: dict[str, dict] = {}
    for rec in records:
        first = seen.setdefault(rec["id"], rec)
        if first is not rec:
            p = rec["provenance"]
            problems.append(Problem(p["file"], p["line"], f"duplicate id {rec['id']!r}; first used at "
                                    f"{first['provenance']['file']}:{first['provenance']['line']}"))
    if problems:
        raise CorpusError(problems)
    return records


def lint_records(records: list[dict]) -> list[Problem]:
    """Soft checks (warnings, not build failures unless ``build --strict``), each at the record's
    line: a required group that the record's own reference steps never mention (the reference
    answer would fail its scoring key), a group with fewer than 2 or more than 4 synonyms, a
    required phrase longer than 4 words."""
    from jaxkd.data.textnorm import normalise

    out = []
    for rec in records:
        file, line = rec["provenance"]["file"], rec["provenance"]["line"]
        steps = normalise(" ".join(rec["steps"])).lower()
        for g, group in enumerate(rec["required"]):
            if not any(normalise(p).lower() in steps for p in group):
                out.append(Problem(file, line, f"{rec['id']}: required[{g}] {group} is not mentioned "
                                               "by the record's own steps"))
            if not 2 <= len(group) <= 4:
                out.append(Problem(file, line, f"{rec['id']}: required[{g}] {group} has "
                                               f"{len(group)} synonym(s); SCHEMA.md asks for 2-4"))
            for p in group:
                if len(p.split()) > 4:
                    out.append(Problem(file, line, f"{rec['id']}: required phrase {p!r} is longer "
                                                   "than 4 words"))
    return out
