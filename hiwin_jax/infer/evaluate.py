"""`hiwin eval`: answer a LLaVA-style question file, resumably, then score the answers.

Question file (jsonl, one object per line): `question_id`, `text` (the question), optional
`image` (a path under the image folder), optional `answer` (str) or `answers` (list of str), and
for MME `category`. Answers file (jsonl, appended as answers are produced): `question_id`,
`prompt` (the question text), `text` (the decoded answer), `answer_id`, `model_id`, `metadata`;
a question that cannot be run gets `"text": ""` and `"error": "<reason>"` (missing or unreadable
image, empty prompt, prompt longer than the context) and the run goes on.

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

from hiwin_jax.data import image, slicing
from hiwin_jax.infer import requests, scorers

if TYPE_CHECKING:
  from hiwin_jax.infer.generate import GenerationConfig


class QuestionFileError(ValueError):
  """A malformed question file; the message names the file and line."""


def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
  """Objects of a jsonl file. strict=False skips malformed lines (a crash-truncated tail)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        if strict:
          raise QuestionFileError(f"{path}:{n}: not a JSON object: {e}") from e
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
            img = image.load_image(pathlib.Path(folder) / q["image"])
          ready.append((q, requests.prepare(
              str(q.get("text", "")), img, tokenizer, cfg_model, template=settings.template,
              image_folder=folder, max_slice_nums=settings.max_slice_nums,
              pre_resize=settings.pre_resize, max_context=max_context,
              reserve=gen.max_new_tokens)))
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
  """`bytes` -> ByteTokenizer; otherwise a SentencePiece tokenizer folder."""
  if folder == "bytes":
    return ByteTokenizer()
  from hiwin_jax.data.tokenizer import LlamaSpmTokenizer
  return LlamaSpmTokenizer(folder)


def load_model(checkpoint: str, config: str = "vicuna7b", overrides=(), dtype: str | None = None):
  """(model, cfg.model) from a hiwin checkpoint folder (params/ + hiwin_config.json with format
  "llava-uhd") or an official PyTorch LLaVA-UHD folder (config.json + safetensors, converted on
  the fly; `config` supplies the ViT geometry the official config.json does not record)."""
  from flax import nnx

  from ckpt_convert import core
  from hiwin_jax import config as C
  from hiwin_jax.models.layers import Precision
  from hiwin_jax.models.llava_uhd import LlavaUHD
  from hiwin_jax.train import checkpoint as ckpt
  folder = pathlib.Path(checkpoint)
  if (folder / "params").is_dir():
    params, saved = ckpt.read_params(folder)
    if not saved or saved.get("format") != "llava-uhd":
      raise FileNotFoundError(f"{folder}: not a hiwin llava-uhd checkpoint (its "
                              f"{ckpt.CONFIG_NAME} says format {saved and saved.get('format')!r})")
    cfg_model = C.ConfigDict(saved["model"])
  elif (folder / "config.json").is_file():
    from ckpt_convert import llava_uhd
    base = C.load_config(config, overrides).model
    cfg_model, params = llava_uhd.import_official(folder, dtype, base)
  else:
    raise FileNotFoundError(f"{folder}: neither a hiwin checkpoint (params/) nor an official "
                            "LLaVA-UHD folder (config.json + safetensors)")
  precision = Precision.from_config(cfg_model.precision)
  model = nnx.eval_shape(lambda: LlavaUHD(cfg_model, precision, rngs=nnx.Rngs(0)))
  core.load_params(model, params)
  return model, cfg_model


# --- command line ----------------------------------------------------------------------------------

def add_model_args(p) -> None:
  """Options shared by `hiwin generate` and `hiwin eval`."""
  p.add_argument("--checkpoint", required=True,
                 help="hiwin checkpoint folder (params/ + hiwin_config.json) or an official "
                      "LLaVA-UHD v2 folder (config.json + safetensors; --config gives the ViT)")
  p.add_argument("--tokenizer", required=True,
                 help="tokenizer folder (tokenizer.model + tokenizer_config.json), or 'bytes' "
                      "for the byte-level test tokenizer of tiny models")
  p.add_argument("--dtype", default=None, help="parameter dtype when importing an official folder")
  p.add_argument("--template", default=requests.DEFAULT_TEMPLATE, help="conversation template")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--num-beams", type=int, default=1)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy / beam search")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--max-slice-nums", type=int, default=slicing.EVAL_MAX_SLICE_NUMS)


def main(args, overrides) -> int:
  """Runs `hiwin generate` or `hiwin eval` from parsed arguments."""
  import logging

  from hiwin_jax.infer.generate import GenerationConfig, Generator
  log = logging.getLogger("hiwin.eval")
  tokenizer = load_tokenizer(args.tokenizer)
  model, cfg_model = load_model(args.checkpoint, args.config, overrides, args.dtype)
  gen = GenerationConfig(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         temperature=args.temperature, top_p=args.top_p,
                         eos_token_id=int(cfg_model.llm.eos_token_id),
                         pad_token_id=int(cfg_model.llm.pad_token_id))
  if args.command == "generate":
    images = args.image or [None]
    try:
      prepared = [requests.prepare(args.prompt, image.load_image(path) if path else None,
                                   tokenizer, cfg_model, template=args.template,
                                   image_folder=str(pathlib.Path(path).parent) if path else "",
                                   max_slice_nums=args.max_slice_nums,
                                   max_context=int(cfg_model.llm.max_position_embeddings),
                                   reserve=gen.max_new_tokens) for path in images]
    except requests.RequestError as e:
      print(f"hiwin generate: error: {e}", file=sys.stderr)
      return 2
    shown: list[int] = []

    def stream(step, tokens, active):
      if active[0]:
        shown.append(int(tokens[0]))
        text = tokenizer.decode(shown)
        sys.stdout.write(text[len(stream.text):])
        sys.stdout.flush()
        stream.text = text
    stream.text = ""
    streaming = gen.num_beams == 1 and len(prepared) == 1
    out = Generator(model)(requests.collate(prepared, cfg_model), gen, seed=args.seed,
                           stream=stream if streaming else None)
    if streaming:
      sys.stdout.write("\n")
      return 0
    for i, path in enumerate(images):
      text = tokenizer.decode(out.tokens[i][:out.lengths[i]].tolist()).strip()
      sys.stdout.write(f"{path}: {text}\n" if len(images) > 1 else f"{text}\n")
    return 0
  settings = EvalSettings(template=args.template, max_slice_nums=args.max_slice_nums,
                          batch_size=args.batch_size,
                          model_id=pathlib.Path(args.checkpoint).name or "hiwin")
  counts = answer_questions(model, tokenizer, cfg_model, args.questions, args.image_folder,
                            args.answers, gen=gen, settings=settings,
                            progress=not args.no_progress, log=log)
  log.info("answered %d questions (%d already answered, %d errors) -> %s", counts["asked"],
           counts["skipped"], counts["errors"], args.answers)
  result = {"counts": counts}
  if args.metric != "none":
    result["score"] = score(args.questions, args.answers, args.metric)
  print(json.dumps(result))
  return 0
