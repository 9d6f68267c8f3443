"""Tags for a record: device, category, issue, source from the record; derived ones from its text.

Derived tags name the connection types a record involves (``conn:bluetooth``, ``conn:wifi``,
``conn:zigbee``...) and a few topics (``mentions:app``, ``mentions:battery``,
``mentions:voice_assistant``, ``has_safety``). They are regex matches on the normalised text of
symptom, questions and steps, so they are cheap, explainable and deterministic.
"""

from __future__ import annotations

import re

CONNECTION_PATTERNS: dict[str, re.Pattern[str]] = {
    "bluetooth": re.compile(r"\bbluetooth\b|\bbt\b|\bldac\b|\baptx\b|\bmultipoint\b|\ba2dp\b|\ble audio\b"),
    "wifi": re.compile(r"\bwi-?fi\b|\bwlan\b|\bssid\b|\b(2\.4|5|6) ?ghz\b|\brouter\b|\bmesh\b"),
    "zigbee": re.compile(r"\bzigbee\b"),
    "zwave": re.compile(r"\bz-?wave\b"),
    "thread_matter": re.compile(r"\bthread\b|\bmatter\b"),
    "hdmi": re.compile(r"\bhdmi\b|\be?arc\b|\bcec\b"),
    "optical": re.compile(r"\boptical\b|\btoslink\b"),
    "usb": re.compile(r"\busb(-?c)?\b"),
    "analog_audio": re.compile(r"\b3\.5 ?mm\b|\baux\b|\bheadphone jack\b|\bjack\b"),
    "ethernet": re.compile(r"\bethernet\b|\blan (cable|port)\b"),
    "nfc": re.compile(r"\bnfc\b"),
    "infrared": re.compile(r"\binfrared\b|\bir (remote|blaster|sensor)\b"),
}
TOPIC_PATTERNS: dict[str, re.Pattern[str]] = {
    "app": re.compile(r"\bapp\b|\bcompanion app\b|\bapplication\b"),
    "battery": re.compile(r"\bbatter(y|ies)\b|\bcharg(e|er|ing)\b"),
    "voice_assistant": re.compile(r"\balexa\b|\bgoogle assistant\b|\bsiri\b|\bvoice assistant\b"),
    "firmware": re.compile(r"\bfirmware\b|\bsoftware update\b"),
}


def record_text(record: dict) -> str:
    return " ".join([record["symptom"], *record["questions"], *record["steps"]]).lower()


def connections(record: dict) -> list[str]:
    text = record_text(record)
    return sorted(name for name, pat in CONNECTION_PATTERNS.items() if pat.search(text))


def tag_record(record: dict) -> list[str]:
    """Sorted tags: ``device:``, ``category:``, ``issue:``, ``source:``, ``conn:``, ``mentions:``."""
    text = record_text(record)
    tags = [f"device:{record['device']}", f"category:{record['category']}",
            f"issue:{record['issue']}", f"source:{record['source']}"]
    tags += [f"conn:{c}" for c in connections(record)]
    tags += [f"mentions:{name}" for name, pat in TOPIC_PATTERNS.items() if pat.search(text)]
    if record.get("safety"):
        tags.append("has_safety")
    return sorted(tags)
