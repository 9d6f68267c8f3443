"""General-language set: size, topic (not electronics), QA format and answer keys."""

import re
from collections import Counter

from jaxkd.data.general import GENERAL_DIR, load_general_text, load_sanity_qa, passes
from jaxkd.data.textnorm import looks_english

ELECTRONICS = re.compile(r"\b(bluetooth|wi-?fi|router|headphones?|earbuds?|speakers?|firmware|usb|"
                         r"smartphone|app|battery|charger|device|pairing|hdmi)\b", re.I)


def test_general_text_size_and_topic():
    text = load_general_text()
    words = text.split()
    assert len(words) >= 3000
    assert ELECTRONICS.findall(text) == []
    paragraphs = [p for p in text.split("\n\n") if len(p.split()) > 40]
    assert len(paragraphs) >= 30 and all(looks_english(p) for p in paragraphs)
    titles = [p for p in text.split("\n\n") if 0 < len(p.split()) <= 6]
    assert len(titles) >= 12  # varied topics, one titled section each
    assert max(Counter(w.lower() for w in words).values()) < 0.08 * len(words)


def test_sanity_qa_format_and_keys():
    items = load_sanity_qa()
    assert len(items) >= 50
    assert len({i["id"] for i in items}) == len(items)
    cats = Counter(i["category"] for i in items)
    assert {"fact", "arithmetic", "grammar", "definition", "instruction"} <= set(cats)
    for item in items:
        assert item["prompt"].strip() and item["reference"].strip() and item["accept"]
        assert all(a == a.lower() for a in item["accept"])
        assert passes(item["reference"], item), item  # the reference passes its own key
    wrong = {i["id"]: i for i in items}
    assert not passes("Berlin.", wrong["general-001"]) and not passes("43", wrong["general-016"])


def test_readme_states_provenance_and_licence():
    readme = (GENERAL_DIR / "README.md").read_text()
    assert "written from scratch for this project" in readme and "Apache-2.0" in readme
