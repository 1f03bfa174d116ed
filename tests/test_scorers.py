"""Benchmark metrics against cases worked out by hand from the metric definitions."""

import pytest

from hiwin_jax.infer import scorers


@pytest.mark.parametrize("raw, expected", [
    ("A dog.", "dog"),                      # article and final period dropped
    ("The Two cats", "2 cats"),             # number word, case
    ("an apple, a pear", "apple pear"),     # comma touching a space is removed
    ("black/white", "black white"),         # punctuation inside a word becomes a space
    ("1,000", "1000"),                      # thousands comma
    ("3.5", "3.5"),                         # decimal point kept
    ("dont", "don't"),                      # contraction restored
    ("yes!", "yes"),
    ("  none \n", "0"),
])
def test_vqa_normalisation(raw, expected):
  assert scorers.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_is_the_leave_one_out_mean():
  # 2 of 10 annotators said "two": leaving out one of them leaves 1 match (1/3), leaving out any
  # of the other 8 leaves 2 matches (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
  answers = ["two", "2"] + ["three"] * 8
  assert scorers.vqa_accuracy("2", answers) == pytest.approx(0.6)
  # 3 matches: leaving one of them out leaves 2 (2/3); otherwise 3 (1): (3*2/3 + 7) / 10 = 0.9.
  assert scorers.vqa_accuracy("The dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
  # 4 or more matches: every subset keeps >= 3.
  assert scorers.vqa_accuracy("dog.", ["a dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
  assert scorers.vqa_accuracy("bird", ["dog"] * 10) == 0.0
  assert scorers.vqa_accuracy("Dog", ["dog"]) == 1.0


def test_anls_threshold():
  # "helo" vs "hello": distance 1 over length 5 -> 0.8.
  assert scorers.anls("helo", ["hello"]) == pytest.approx(0.8)
  # "abc" vs "abcdef": 3 / 6 = 0.5 is not below the threshold -> 0.
  assert scorers.anls("abc", ["abcdef"]) == 0.0
  # "abcd" vs "abcdef": 2 / 6 < 0.5 -> 1 - 1/3.
  assert scorers.anls("abcd", ["abcdef"]) == pytest.approx(2 / 3)
  # Case and surrounding spaces do not count; the best reference wins.
  assert scorers.anls("  HELLO ", ["world", "hello"]) == 1.0


def test_relaxed_accuracy_five_percent():
  assert scorers.relaxed_accuracy("105", ["100"]) == 1.0       # 5% exactly
  assert scorers.relaxed_accuracy("105.1", ["100"]) == 0.0
  assert scorers.relaxed_accuracy("95", "100") == 1.0
  assert scorers.relaxed_accuracy("12%", ["0.12"]) == 1.0      # percent reads as a fraction
  assert scorers.relaxed_accuracy("0", ["0"]) == 1.0
  assert scorers.relaxed_accuracy("0.01", ["0"]) == 0.0
  assert scorers.relaxed_accuracy("Yes", ["yes"]) == 1.0
  assert scorers.relaxed_accuracy("yes", ["no"]) == 0.0


def test_exact_match_and_choice_letters():
  assert scorers.exact_match(" Paris ", ["paris"]) == 1.0
  assert scorers.exact_match("Paris.", ["paris"]) == 0.0
  for pred in ["B", "(B)", "B. a cat", "B: cat", "The answer is B.", "I think (B) is right"]:
    assert scorers.choice_letter(pred) == "B", pred
  assert scorers.choice_letter("a cat") is None
  assert scorers.choice_accuracy("C", "C") == 1.0
  assert scorers.choice_accuracy("(A) dog", "C") == 0.0


def test_mme_acc_plus_needs_both_questions_of_an_image():
  records = [
      dict(category="color", image="1.png", prediction="Yes", answer="Yes"),
      dict(category="color", image="1.png", prediction="No, it is not.", answer="No"),
      dict(category="color", image="2.png", prediction="yes", answer="Yes"),
      dict(category="color", image="2.png", prediction="yes", answer="No"),
      dict(category="count", image="3.png", prediction="maybe", answer="No"),
      dict(category="count", image="3.png", prediction="No", answer="No"),
  ]
  out = scorers.mme_scores(records)
  assert out["color"]["acc"] == pytest.approx(3 / 4)
  assert out["color"]["acc_plus"] == pytest.approx(1 / 2)
  assert out["color"]["score"] == pytest.approx(125.0)
  assert out["count"]["acc"] == pytest.approx(1 / 2)
  assert out["count"]["acc_plus"] == 0.0
