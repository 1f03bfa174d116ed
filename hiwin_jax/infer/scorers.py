"""Benchmark metrics, written from their published definitions.

- `vqa_accuracy` (VQAv2, TextVQA, VizWiz): both answers are normalised as the VQA evaluation does
  (punctuation removed or turned into a space, periods kept inside numbers, thousands commas
  dropped, number words -> digits, articles removed, apostrophe-less contractions restored,
  lower case), then acc = min(#annotators who gave the answer / 3, 1), averaged over the 10
  leave-one-annotator-out subsets of the ground-truth answers.
- `anls` (DocVQA, InfographicVQA): 1 - normalised Levenshtein distance to the closest answer,
  0 where that distance is >= 0.5 (threshold tau = 0.5), case-insensitive, stripped.
- `relaxed_accuracy` (ChartQA): numbers within 5% relative error of the target are right
  ("12%" reads as 0.12); other answers must match exactly (case-insensitive).
- `exact_match`: after strip + lower case.
- `normalized_match`: after lower case, punctuation to spaces and whitespace collapsed
  (" Red." matches "red"; no article or number-word rules, unlike the VQA normalisation).
- `choice_accuracy`: the option letter read from the answer ("B", "(B)", "B. cat", "The answer is B").
- `mme_scores` (MME): yes/no accuracy per question and acc+ per image (both of its two questions
  right); a subtask's score is 100 * (acc + acc+).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence

# --- VQA answer normalisation ---------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# Contractions written without the apostrophe, restored to their usual spelling, so that
# "dont" and "don't" compare equal.
_CONTRACTION_PAIRS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodyd": "somebody'd", "someoned": "someone'd", "somethingd": "something'd",
    "thered": "there'd", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_CONTRACTIONS = dict(_CONTRACTION_PAIRS)
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")


def _punctuation(text: str) -> str:
  """Drops each punctuation mark when it touches a space (or the text has a thousands comma),
  otherwise replaces it by a space; then drops periods that are not decimal points."""
  out = text
  has_number_comma = _THOUSANDS_COMMA.search(text) is not None
  for p in _PUNCTUATION:
    if f"{p} " in text or f" {p}" in text or has_number_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_NOT_IN_NUMBER.sub("", out)


def _words(text: str) -> str:
  """Lower case, number words -> digits, articles dropped, contractions restored."""
  words = []
  for w in text.lower().split():
    w = _NUMBER_WORDS.get(w, w)
    if w in _ARTICLES:
      continue
    words.append(_CONTRACTIONS.get(w, w))
  return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
  """The VQA evaluation's answer normalisation (see the module docstring)."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _words(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the (usually 10) annotator answers.

  For each annotator i: min(#other annotators whose answer equals the prediction / 3, 1); the
  mean over i. With a single reference answer this is 1 for a match, else 0 (the leave-one-out
  subset is empty, so the reference itself counts, as the evaluators of TextVQA-style single
  answers expect).
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  pred = normalize_vqa_answer(prediction)
  refs = [normalize_vqa_answer(a) for a in answers]
  if len(refs) == 1:
    return float(pred == refs[0])
  scores = []
  for i in range(len(refs)):
    others = refs[:i] + refs[i + 1:]
    scores.append(min(sum(r == pred for r in others) / 3.0, 1.0))
  return sum(scores) / len(scores)


# --- ANLS -----------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions, each costing 1)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalized Levenshtein Similarity of one prediction: max over the answers of
  1 - d / max(len), counted as 0 when d / max(len) >= threshold."""
  if not answers:
    raise ValueError("anls needs at least one reference answer")
  pred = " ".join(prediction.strip().lower().split())
  best = 0.0
  for ans in answers:
    ref = " ".join(str(ans).strip().lower().split())
    longest = max(len(pred), len(ref))
    dist = levenshtein(pred, ref) / longest if longest else 0.0
    best = max(best, 0.0 if dist >= threshold else 1.0 - dist)
  return best


# --- ChartQA relaxed accuracy -----------------------------------------------------------------

def _to_float(text: str) -> float | None:
  text = text.strip()
  try:
    if text.endswith("%"):
      return float(text[:-1].replace(",", "")) / 100.0
    return float(text.replace(",", ""))
  except ValueError:
    return None


def relaxed_accuracy(prediction: str, answers: Sequence[str] | str,
                     tolerance: float = 0.05) -> float:
  """1 if the prediction is within `tolerance` relative error of a numeric target (a target of 0
  needs exactly 0), or equals a non-numeric target case-insensitively; the max over targets."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  pred = prediction.strip().rstrip(".")
  best = 0.0
  for ans in answers:
    p, t = _to_float(pred), _to_float(str(ans))
    if p is not None and t is not None:
      ok = p == t if t == 0 else abs(p - t) / abs(t) <= tolerance
    else:
      ok = pred.lower() == str(ans).strip().lower()
    best = max(best, float(ok))
  return best


# --- exact match and multiple choice ---------------------------------------------------------

def exact_match(prediction: str, answers: Sequence[str] | str) -> float:
  answers = [answers] if isinstance(answers, str) else list(answers)
  pred = prediction.strip().lower()
  return float(any(pred == str(a).strip().lower() for a in answers))


_ANY_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
  """Lower case, punctuation to spaces, whitespace collapsed: " Red." -> "red"."""
  return " ".join(_ANY_PUNCTUATION.sub(" ", text.lower()).split())


def normalized_match(prediction: str, answers: Sequence[str] | str) -> float:
  """1 if the prediction equals an answer after `normalize_answer`."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(str(a)) for a in answers))


# Tried in order: a parenthesised letter anywhere wins over a bare leading capital, so
# "I think (B) is right" names B, not the pronoun.
_LETTER_PATTERNS = (
    re.compile(r"(?:^|\s)\(([A-Z])\)(?:\s|$|[.:])"),               # "(B)", "... (B) ..."
    re.compile(r"answer is:?\s*\(?([A-Z])\)?(?:[.:)\s]|$)", re.IGNORECASE),
    re.compile(r"^([A-Z])(?:[.:)\s]|$)"),                          # "B", "B.", "B: cat"
)


def choice_letter(prediction: str) -> str | None:
  """The option letter an answer names, or None when it names none."""
  text = prediction.strip()
  for pattern in _LETTER_PATTERNS:
    m = pattern.search(text)
    if m:
      return m.group(1).upper()
  return None


def choice_accuracy(prediction: str, answer: str) -> float:
  """1 if the letter read from the prediction is the answer's letter ("B" or "(B) cat")."""
  target = choice_letter(str(answer)) or str(answer).strip().upper()[:1]
  return float(choice_letter(prediction) == target)


# --- MME ------------------------------------------------------------------------------------------

def yes_no(prediction: str) -> str:
  """'yes' / 'no' from the start of an answer ("Yes, it is." -> yes), else 'other'."""
  words = re.findall(r"[a-z]+", prediction.lower())
  if words and words[0] in ("yes", "no"):
    return words[0]
  return "other"


def mme_scores(records: Iterable[dict]) -> dict[str, dict[str, float]]:
  """records: dicts with `category`, `image`, `prediction`, `answer` ("Yes"/"No").

  -> {category: {"acc", "acc_plus", "score"}}: acc over questions, acc+ over images (every
  question of the image right; MME asks two per image), score = 100 * (acc + acc+).
  """
  per_cat: dict[str, dict[str, list[bool]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  for r in records:
    right = yes_no(r["prediction"]) == str(r["answer"]).strip().lower()
    per_cat[r["category"]][r["image"]].append(right)
  out = {}
  for cat, images in sorted(per_cat.items()):
    flat = [x for v in images.values() for x in v]
    acc = sum(flat) / len(flat)
    acc_plus = sum(all(v) for v in images.values()) / len(images)
    out[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}
  return out


METRICS = {"vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy,
           "exact": exact_match, "normalized": normalized_match, "choice": choice_accuracy}
