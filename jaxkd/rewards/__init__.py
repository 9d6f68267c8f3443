"""Deterministic answer scorers and the combined reward, shared by the evals and GRPO.

An answer is split into *units* (sentences and list items, markdown stripped). Rule credit for a
keyword or a reference step is given only inside an *eligible* unit:
  * well-formed: 4-60 words, function words 5-75% of them, a verb from ``VERBS``, no doubled
    word and no determiner followed by a function word ("the of", "your the") -- so a bare list of
    nouns or a keyword dump never earns credit;
  * not an echo of the question: fewer than 60% of its content words come from the question
    (generic filler such as "follow these steps" aside) -- so a copied question earns nothing.
Words match on word boundaries after Snowball stemming ("app" does not match "apply", "reset"
does not match "preset"; "pairing" matches "paired").

Scores, all in [0, 1] (NaN where the item has nothing to score against):
  required      share of the item's required keyword groups with a synonym (a stemmed token
                sequence) inside an eligible unit
  steps         completeness: mean over reference steps of a soft credit rising linearly from 0
                at recall 0.2 to 1 at recall 0.5,
                where recall is the weighted share of the step's content stems found in one
                eligible unit (or it and the next), question words weighted 0.25, and zero
                unless the window also contains one of the step's action verbs (by class:
                "check"/"verify"/"confirm" are one class); one unit credits at most 2 steps
  actionable    practical utility: distinct instruction units (imperative or "you should ...")
                with at least two specific content words beyond the question, / 3, capped at 1
  numbered      numbered-steps structure: a run 1., 2., 3. ... of items that each hold an
                eligible unit; 0 below 2 items, 2 items = 2/3, 3 or more = 1
  repetition    share of repeated word 3-grams (0 = none; a looping answer approaches 1)
  spelling      1 - share of unknown words (pyspellchecker's English dictionary plus the corpus
                vocabulary, the question and the reference), 0 when nothing can be checked
  language      offline language signal: share of the answer's words inside well-formed units
                x max(0, 1 - misspelled share / 0.2)
  unsafe        1 if an un-negated sentence matches ``UNSAFE_PATTERNS`` (negation must come
                before the match in the same clause: "do not use a hair dryer" is not flagged,
                "use a hair dryer, don't wait" is)

Offline language library: pyspellchecker (pure Python, bundles an English word-frequency
dictionary, works offline, maintained). proselint was considered but checks style (cliches,
jargon), not errors; LanguageTool needs Java and downloads. Grammar and fluency proper come
from the LLM judge (jaxkd.judge); this signal catches typos, garble and non-sentences cheaply.
Stemming: snowballstemmer (the Snowball English stemmer, pure Python).

Modules: ``text`` (units, stems, lexicons), ``rules`` (the scorers), ``combine`` (``item_view``,
``rule_scores``, ``combined_rewards``: R = w_tech * R_tech + w_lang * R_lang with the ranges
documented there). The LLM judge is ``jaxkd.judge``; this package never imports it (the reward
takes any object with its ``score`` method).
"""

from jaxkd.rewards.combine import (RULE_METRICS, ItemView, Judge, RewardBreakdown, combined_rewards, item_view,
                                   rule_scores)
from jaxkd.rewards.rules import (UNSAFE_PATTERNS, actionability, contradictions, corpus_vocabulary,
                                 forbidden_actions, hidden_notes_mentions, language_signal, misspelled, numbered_steps,
                                 repetition, required_coverage, spelling, step_coverage, step_credits, unsafe_flag)
from jaxkd.rewards.text import (FUNCTION_WORDS, Unit, analyse, content_stems, is_wellformed, normalise, split_units,
                                stem, stems, words)

__all__ = ["RULE_METRICS", "ItemView", "Judge", "RewardBreakdown", "combined_rewards", "item_view", "rule_scores",
           "UNSAFE_PATTERNS", "actionability", "contradictions", "corpus_vocabulary", "forbidden_actions",
           "hidden_notes_mentions", "language_signal", "misspelled", "numbered_steps", "repetition",
           "required_coverage", "spelling", "step_coverage", "step_credits",
           "unsafe_flag", "FUNCTION_WORDS", "Unit", "analyse", "content_stems", "is_wellformed", "normalise",
           "split_units", "stem", "stems", "words"]
