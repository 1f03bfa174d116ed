"""Answering a LLaVA-style question file, resumably, and scoring the answers (`hiwin eval`).

Question file (jsonl, one object per line): `question_id`, `text` (the question), optional
`image` (a path under the image folder), optional `answer` (str) or `answers` (list of str), and
for MME `category`. Answers file (jsonl, appended as answers are produced): `question_id`,
`prompt` (the question text), `text` (the decoded answer), `answer_id`, `model_id`, `metadata`;
a question that cannot be run gets `"text": ""` and `"error": "<reason>"` (missing or unreadable
image, an image path that does not resolve inside the image folder (never opened), empty prompt,
prompt longer than the context) and the run goes on. A malformed or non-UTF-8 question file is a
QuestionFileError naming the file and line, before anything runs.

Resuming: ids already present in the answers file are skipped, so an interrupted run continues
where it stopped (a truncated last line is ignored and that question is asked again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hiwin_jax.data import image, slicing, sources
from hiwin_jax.infer import requests, scorers

if TYPE_CHECKING:
  from hiwin_jax.infer.generate import GenerationConfig


class QuestionFileError(ValueError):
  """A malformed question file; the message names the file and line."""


def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
  """Objects of a jsonl file (UTF-8, a BOM allowed). strict=False skips malformed lines (a
  crash-truncated tail); strict=True raises QuestionFileError naming the file and line."""
  out = []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
      except UnicodeDecodeError as e:
        if strict:
          raise QuestionFileError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of "
                                  "the line)") from None
        continue
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        if strict:
          raise QuestionFileError(f"{path}:{n}: not a JSON object: {e}") from None
        continue
      if not isinstance(obj, dict):
        if strict:
          raise QuestionFileError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        continue
      out.append(obj)
  return out


def read_questions(path: str | os.PathLike) -> list[dict]:
  questions = read_jsonl(path)
  seen = set()
  for n, q in enumerate(questions, 1):
    if "question_id" not in q:
      raise QuestionFileError(f"{path}: question {n} has no 'question_id' (keys: {sorted(q)})")
    if q["question_id"] in seen:
      raise QuestionFileError(f"{path}: question_id {q['question_id']!r} appears twice")
    for key in ("image", "text"):
      if key in q and not isinstance(q[key], str):
        raise QuestionFileError(f"{path}: question {q['question_id']!r}: {key!r} must be a "
                                f"string, got {type(q[key]).__name__}")
    seen.add(q["question_id"])
  return questions


def references(q: dict) -> list[str] | None:
  if "answers" in q:
    a = q["answers"]
    return [str(x["answer"]) if isinstance(x, dict) else str(x) for x in a]
  if "answer" in q:
    return [str(q["answer"])]
  return None


@dataclasses.dataclass
class EvalSettings:
  template: str = requests.DEFAULT_TEMPLATE
  max_slice_nums: int = slicing.EVAL_MAX_SLICE_NUMS
  batch_size: int = 1
  model_id: str = "hiwin"
  pre_resize: bool = True


class _Progress:
  """Done/total, rate and ETA on stderr (tqdm when available)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    self.total, self.done, self.start = total, initial, time.perf_counter()
    self.enabled = enabled
    if enabled:
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="q", file=sys.stderr,
                        dynamic_ncols=True)
      except ImportError:
        pass

  def update(self, n: int) -> None:
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
    elif self.enabled:
      rate = (self.done) / max(time.perf_counter() - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate else float("inf")
      print(f"eval: {self.done}/{self.total} questions, {rate:.2f} q/s, ETA {eta:.0f} s",
            file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def answer_questions(model, tokenizer, cfg_model, questions_path, image_folder, answers_path, *,
                     gen: GenerationConfig, settings: EvalSettings | None = None,
                     progress: bool = True, log=None) -> dict[str, int]:
  """Answers every question not yet in `answers_path`; returns counts (asked, skipped, errors)."""
  settings = settings or EvalSettings()
  questions = read_questions(questions_path)
  answers_path = pathlib.Path(answers_path)
  done = set()
  if answers_path.exists():
    done = {a.get("question_id") for a in read_jsonl(answers_path, strict=False)}
  todo = [q for q in questions if q["question_id"] not in done]
  answers_path.parent.mkdir(parents=True, exist_ok=True)
  max_context = min(int(cfg_model.llm.max_position_embeddings),
                    int(cfg_model.get("max_length", 1 << 30)))
  from hiwin_jax.infer.generate import Generator
  generator = Generator(model)
  counts = {"asked": 0, "skipped": len(questions) - len(todo), "errors": 0}
  bar = _Progress(len(questions), counts["skipped"], progress)
  folder = str(image_folder or "")
  folder_real = sources.image_folder(folder) if folder else None
  if answers_path.exists() and answers_path.stat().st_size:
    with open(answers_path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      ends_cleanly = f.read(1) == b"\n"
    if not ends_cleanly:  # a crash-truncated last line: start the next record on its own line
      with open(answers_path, "a", encoding="utf-8") as f:
        f.write("\n")
  with open(answers_path, "a", encoding="utf-8") as out:
    def write(q, text, error=None):
      rec = {"question_id": q["question_id"], "prompt": q.get("text", ""), "text": text,
             "answer_id": f"{settings.model_id}-{q['question_id']}",
             "model_id": settings.model_id, "metadata": {}}
      if error:
        rec["error"] = error
        counts["errors"] += 1
      out.write(json.dumps(rec, ensure_ascii=False) + "\n")

    for start in range(0, len(todo), settings.batch_size):
      chunk = todo[start:start + settings.batch_size]
      ready = []
      for q in chunk:
        try:
          img = None
          if q.get("image"):
            path = (sources.resolve_image(folder_real, q["image"]) if folder_real
                    else q["image"])
            img = image.load_image(path)
          ready.append((q, requests.prepare(
              str(q.get("text", "")), img, tokenizer, cfg_model, template=settings.template,
              image_folder=folder, max_slice_nums=settings.max_slice_nums,
              pre_resize=settings.pre_resize, max_context=max_context,
              reserve=gen.max_new_tokens)))
        except sources.SampleError as e:
          write(q, "", str(e))
          if log:
            log.warning("question %s: %s", q["question_id"], e)
        except (image.ImageError, requests.RequestError, ValueError) as e:
          write(q, "", f"{type(e).__name__}: {e}")
          if log:
            log.warning("question %s: %s", q["question_id"], e)
      if ready:
        result = generator(requests.collate([p for _, p in ready], cfg_model), gen)
        for (q, _), toks, n in zip(ready, result.tokens, result.lengths):
          write(q, tokenizer.decode([int(t) for t in toks[:n]], skip_special_tokens=True).strip())
      out.flush()
      counts["asked"] += len(chunk)
      bar.update(len(chunk))
  bar.close()
  return counts


def score(questions_path, answers_path, metric: str, *,
          chance: Mapping[str, float] | None = None) -> dict[str, Any]:
  """Scores the answers file against the references of the question file.

  metric: vqa, anls, relaxed, exact, normalized, choice (`scorers.METRICS`; the mean over the
  questions that have references, a question answered with an error scoring 0; also per
  `category` when the questions have one) or mme (per-category acc / acc+ / score).
  chance: category -> the score of a guess (1 / the number of possible answers); the result then
  also holds the chance level of the scored questions, overall and per category.
  """
  questions = {q["question_id"]: q for q in read_questions(questions_path)}
  answers = {a["question_id"]: a for a in read_jsonl(answers_path, strict=False)}
  if metric == "mme":
    records = [dict(category=q.get("category", "all"), image=q.get("image"),
                    prediction=answers.get(qid, {}).get("text", ""), answer=references(q)[0])
               for qid, q in questions.items() if references(q)]
    per = scorers.mme_scores(records)
    return {"metric": "mme", "categories": per,
            "total_score": sum(v["score"] for v in per.values())}
  if metric not in scorers.METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose from "
                     f"{sorted(scorers.METRICS) + ['mme']}")
  fn = scorers.METRICS[metric]
  values, categories, errors, missing = [], [], 0, 0
  for qid, q in questions.items():
    refs = references(q)
    if refs is None:
      continue
    a = answers.get(qid)
    if a is None:
      missing += 1
      continue
    categories.append(q.get("category"))
    if a.get("error"):
      errors += 1
      values.append(0.0)
      continue
    values.append(fn(a.get("text", ""), refs[0] if metric == "choice" else refs))
  result = {"metric": metric, "score": float(np.mean(values)) if values else None,
            "scored": len(values), "errors": errors, "unanswered": missing}
  if chance is not None:
    unknown = sorted({str(c) for c in categories if c not in chance})
    if unknown:
      raise ValueError(f"{questions_path}: no chance level for the categories {unknown} "
                       f"(known: {sorted(chance)})")
    result["chance"] = float(np.mean([chance[c] for c in categories])) if values else None
  if any(c is not None for c in categories):
    result["per_category"] = {}
    for c in sorted({c for c in categories if c is not None}, key=str):
      mine = [v for v, k in zip(values, categories) if k == c]
      entry = {"score": float(np.mean(mine)), "scored": len(mine)}
      if chance is not None:
        entry["chance"] = float(chance[c])
      result["per_category"][c] = entry
  return result


class ByteTokenizer:
  """A vocabulary-free tokenizer for tiny test models: id = 3 + byte (BOS 1, EOS 2).

  It stands in for the SentencePiece tokenizer in smoke tests of `hiwin eval` with the tiny
  config (vocab 512); it is not a model's real tokenizer.
  """
  bos_id, eos_id, pad_id = 1, 2, 0

  def encode(self, text: str) -> list[int]:
    return [self.bos_id] + [3 + b for b in text.encode("utf-8")]

  def tokenizer_image_token(self, prompt: str) -> list[int]:
    from hiwin_jax.data.tokenizer import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    chunks = [self.encode(c) for c in prompt.split(IMAGE_TOKEN)]
    ids = list(chunks[0])
    for c in chunks[1:]:
      ids += [IMAGE_TOKEN_INDEX] + c[1:]
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    data = bytes(i - 3 for i in ids if 3 <= i < 259)
    return data.decode("utf-8", errors="replace")


def load_tokenizer(folder: str):
  """`bytes` -> ByteTokenizer; otherwise a tokenizer folder (`tokenizer.load_tokenizer`)."""
  if folder == "bytes":
    return ByteTokenizer()
  from hiwin_jax.data import tokenizer
  return tokenizer.load_tokenizer(folder)
