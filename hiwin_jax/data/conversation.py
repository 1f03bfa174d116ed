"""Conversation templates, prompts and supervised label masks (official-spec §6.4, §9.1).

A conversation is LLaVA's json list `[{"from": "human" | "gpt", "value": str}, ...]`.

Templates (`TEMPLATES`; "v1" is an alias of "vicuna_v1" and "qwen_2" of "qwen_1_5", as in LLaVA's
`conv_templates`):
  plain      pretraining: "<image>" + caption + "\\n"; only the caption and "\\n" are supervised.
  vicuna_v1  SFT of the released Vicuna model: system + " USER: " + m1 + " ASSISTANT: " + a1 +
             "</s>USER: " + ...; answers and their "</s>" are supervised, with LLaVA's round
             arithmetic and its "tokenization mismatch" check (text-side.md corrections 2, 3, 5).
  qwen_1_5   LLaVA-OneVision's chatml template for Qwen2 checkpoints; masking as LLaVA-NeXT's
             `preprocess_qwen` (see `_preprocess_qwen`).

`preprocess` returns a `TextExample`: int32 ids (-200 = image placeholder) and labels (-100 =
not supervised), truncated to `model_max_length` as LLaVA's collator does. A sample LLaVA would
flag with "WARNING: tokenization mismatch" comes back with all labels -100, `mismatch=True` and
that warning; the caller decides whether to train on it or skip it and counts it.

No jax import: this runs in grain worker processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from hiwin_jax.data.tokenizer import IMAGE_TOKEN, IMAGE_TOKEN_INDEX

IGNORE_INDEX = -100
HUMAN, GPT = "human", "gpt"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
R2_DELETED_MARKER = "QA_GT_caption_based_noisy"

Message = tuple[str, "str | None"]  # (HUMAN or GPT, text); None = the open turn of a prompt


class ConversationError(ValueError):
  """A malformed conversation; the message names the problem, the caller adds the sample id."""


class TextTokenizer(Protocol):
  """What `qwen_1_5` needs: ids of a text with no BOS/EOS added and chatml markers recognised."""

  def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Template:
  """LLaVA's `Conversation` reduced to what prompts and masks use.

  style: "plain" (messages joined by `sep`), "two" (vicuna: `sep` after user turns, `sep2` after
  assistant turns) or "chatml" (each turn `role + "\\n" + text + sep + "\\n"`).
  """
  name: str
  style: str
  system: str
  roles: tuple[str, str]
  sep: str
  sep2: str | None = None

  def role_name(self, role: str) -> str:
    return self.roles[0] if role == HUMAN else self.roles[1]

  def render(self, messages: Sequence[Message]) -> str:
    """LLaVA's `Conversation.get_prompt()`; an empty or None message renders as an open turn."""
    if self.style == "two":
      out = self.system + self.sep
      for i, (role, text) in enumerate(messages):
        name = self.role_name(role)
        out += f"{name}: {text}{(self.sep, self.sep2)[i % 2]}" if text else f"{name}:"
      return out
    if self.style == "chatml":
      out = f"{self.system}{self.sep}\n" if self.system else ""
      for role, text in messages:
        name = self.role_name(role)
        out += f"{name}\n{text}{self.sep}\n" if text else f"{name}\n"
      return out
    return self.system + "".join(text + self.sep for _, text in messages if text)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", system="", roles=("", ""), sep="\n"),
    "vicuna_v1": Template("vicuna_v1", "two", system=VICUNA_SYSTEM, roles=("USER", "ASSISTANT"),
                          sep=" ", sep2="</s>"),
    "qwen_1_5": Template("qwen_1_5", "chatml", system=f"{IM_START}system\n{QWEN_SYSTEM}",
                         roles=(f"{IM_START}user", f"{IM_START}assistant"), sep=IM_END),
}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]
TEMPLATES["qwen_2"] = TEMPLATES["qwen_1_5"]  # one conversation under two names, as in LLaVA


def get_template(template: str | Template) -> Template:
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise ValueError(f"unknown conversation template {template!r}; known: {sorted(TEMPLATES)}")
  return TEMPLATES[template]


@dataclasses.dataclass(frozen=True)
class TextExample:
  """input_ids, labels: [L] int32 with L <= model_max_length; labels are -100 where unsupervised."""
  input_ids: np.ndarray
  labels: np.ndarray
  mismatch: bool = False
  warning: str | None = None


def parse_conversation(conversations: Any) -> list[Message]:
  """Checks LLaVA's json layout and returns (role, text) pairs; raises ConversationError."""
  if not isinstance(conversations, (list, tuple)):
    raise ConversationError(f"conversations must be a list of messages, got "
                            f"{type(conversations).__name__}")
  if not conversations:
    raise ConversationError("conversations is empty")
  messages = []
  for i, message in enumerate(conversations):
    if not isinstance(message, dict):
      raise ConversationError(f"message {i} is a {type(message).__name__}, expected a dict with "
                              "'from' and 'value'")
    for key in ("from", "value"):
      if key not in message:
        raise ConversationError(f"message {i} has no '{key}' key (keys: {sorted(message)})")
    role, text = message["from"], message["value"]
    if role not in (HUMAN, GPT):
      raise ConversationError(f"message {i} has unknown role 'from'={role!r}; expected "
                              f"'{HUMAN}' or '{GPT}'")
    if not isinstance(text, str):
      raise ConversationError(f"message {i} has a {type(text).__name__} 'value', expected a str")
    messages.append((role, text))
  return messages


def _move_image_to_front(messages: list[Message], variant: str = "r1") -> list[Message]:
  """LLaVA's `preprocess_multimodal` (text-side.md correction 4), for samples with an image.

  "r1" (the 7B release's code): a message containing "<image>" loses every occurrence, is
  stripped, gets "<image>\\n" in front and is stripped again (so a message that was only
  "<image>" becomes "<image>"). "r2" (branch HEAD: 13B, Qwen2) does that only to a message with
  exactly one "<image>" that does not start with it; it leaves every other message as it is,
  except that it deletes the marker "QA_GT_caption_based_noisy" (LLaVA-NeXT's VideoInstruct
  cleanup) from every message. R1 leaves messages without "<image>" as they are.
  """
  if variant not in ("r1", "r2"):
    raise ValueError(f"variant must be 'r1' or 'r2', got {variant!r}")
  out = []
  for role, text in messages:
    n = text.count(IMAGE_TOKEN)
    if n and (variant == "r1" or (n == 1 and not text.startswith(IMAGE_TOKEN))):
      text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()
    if variant == "r2":
      text = text.replace(R2_DELETED_MARKER, "")
    out.append((role, text))
  return out


def preprocess_multimodal(conversations: Any, variant: str = "r1") -> list[dict[str, str]]:
  """The "<image>" placement of LLaVA's `preprocess_multimodal` on LLaVA json (a new list)."""
  return [{"from": role, "value": text}
          for role, text in _move_image_to_front(parse_conversation(conversations), variant)]


def build_prompt(conversations: Any, template: str | Template) -> str:
  """Inference prompt: the conversation plus an open assistant turn (official-spec §9.1).

  vicuna_v1 ends with "ASSISTANT:" (no trailing space), qwen_1_5 with "<|im_start|>assistant\\n".
  Messages are used as given: LLaVA's evaluation writes "<image>\\n" + question itself.
  plain gives "<image>", the prefix its training prompts have, so the model continues with a
  caption. The conversation must end with a human turn.
  """
  tpl = get_template(template)
  messages = parse_conversation(conversations)
  if messages[-1][0] != HUMAN:
    raise ConversationError("an inference prompt must end with a human message, the last one "
                            f"is '{messages[-1][0]}'")
  if tpl.style == "plain":
    if IMAGE_TOKEN not in messages[-1][1]:
      raise ConversationError("the plain template needs '<image>' in the human message")
    return IMAGE_TOKEN
  return tpl.render(messages + [(GPT, None)])


def preprocess(sample_conversations: Any, tokenizer: Any, template: str | Template,
               has_image: bool, model_max_length: int | None = None, *,
               variant: str = "r1") -> TextExample:
  """Token ids and supervised labels of one training sample, as LLaVA's `preprocess`.

  tokenizer: for plain and vicuna_v1 a `LlamaSpmTokenizer` (uses `encode`,
    `tokenizer_image_token`, `legacy`, `pad_id`); for qwen_1_5 any `TextTokenizer`.
  has_image: the sample has an image; then "<image>" is moved to the front of its messages and
    becomes IMAGE_TOKEN_INDEX (-200). Without an image, "<image>" is ordinary text.
  model_max_length: the training argument (3072 pretraining, 4096 SFT); None = the tokenizer's.
  variant: the official code state ("r1" 7B release, "r2" 13B / Qwen2): how "<image>" is moved
    (`_move_image_to_front`); the caller passes the model's token layout.
  """
  tpl = get_template(template)
  if model_max_length is None:
    model_max_length = tokenizer.model_max_length
  messages = parse_conversation(sample_conversations)
  if has_image:
    messages = _move_image_to_front(messages, variant)
  if tpl.style == "plain":
    ids, labels, warning = _preprocess_plain(messages, tokenizer, tpl, has_image)
  elif tpl.style == "two":
    ids, labels, warning = _preprocess_v1(messages, tokenizer, tpl, has_image, model_max_length)
  else:
    ids, labels, warning = _preprocess_qwen(messages, tokenizer, tpl, has_image)
  # LLaVA's collator truncates ids and labels before the image is spliced in.
  return TextExample(input_ids=np.asarray(ids[:model_max_length], np.int32),
                     labels=np.asarray(labels[:model_max_length], np.int32),
                     mismatch=warning is not None, warning=warning)


def _preprocess_plain(messages, tokenizer, tpl, has_image):
  """LLaVA's `preprocess_plain`: "<image>" + answer + "\\n"; the "<image>" prefix is masked.

  The human text is discarded. Stricter than LLaVA, which only asserts two messages and an
  "<image>" in the first: roles must be human then gpt and the sample must have an image.
  """
  if not has_image:
    raise ConversationError("the plain template is for image-caption pairs; this sample has no "
                            "image")
  if len(messages) != 2 or (messages[0][0], messages[1][0]) != (HUMAN, GPT):
    raise ConversationError("the plain template needs exactly one human and then one gpt "
                            f"message, got {[role for role, _ in messages]}")
  if IMAGE_TOKEN not in messages[0][1]:
    raise ConversationError("the plain template needs '<image>' in the human message")
  ids = tokenizer.tokenizer_image_token(IMAGE_TOKEN + messages[1][1] + tpl.sep)
  labels = np.asarray(ids, np.int64)
  labels[:len(tokenizer.tokenizer_image_token(IMAGE_TOKEN))] = IGNORE_INDEX
  return ids, labels, None


def _preprocess_v1(messages, tokenizer, tpl, has_image, model_max_length):
  """LLaVA's `preprocess_v1` (official-spec §6.4 with text-side.md corrections 2, 3, 5).

  The prompt is split into rounds on "</s>" and each round on " ASSISTANT: ". BOS is masked, then
  per round `len(tok(instruction)) - 2` tokens (the standalone BOS and the lone "▁" of the
  trailing space); the cursor moves by `len(tok(round))`. With a non-legacy tokenizer rounds
  after the first subtract one more from both (the round's "USER" merges with the removed
  "</s>"). A round that does not split in two stops the walk. When the cursor is below
  `model_max_length` and differs from the number of non-pad ids, all labels are masked.
  """
  if messages[0][0] != HUMAN:  # LLaVA drops a leading gpt turn without a word
    messages = messages[1:]
  for j, (role, _) in enumerate(messages):
    if role != (HUMAN, GPT)[j % 2]:
      raise ConversationError(f"roles must alternate human, gpt, ... after dropping a leading gpt "
                              f"turn; got {[r for r, _ in messages]}")
  prompt = tpl.render(messages)
  tokenize = tokenizer.tokenizer_image_token if has_image else tokenizer.encode
  ids = tokenize(prompt)
  if not has_image:  # LLaVA's text-only branch tokenizes with truncation=True
    ids = ids[:model_max_length]
  labels = np.asarray(ids, np.int64)
  total_len = int(np.count_nonzero(labels != tokenizer.pad_id))
  answer_sep = tpl.sep + tpl.roles[1] + ": "
  cur_len = 1
  labels[:cur_len] = IGNORE_INDEX
  for i, round_text in enumerate(prompt.split(tpl.sep2)):
    if round_text == "":
      break
    parts = round_text.split(answer_sep)
    if len(parts) != 2:
      break
    round_len = len(tokenize(round_text))
    instruction_len = len(tokenize(parts[0] + answer_sep)) - 2
    if i != 0 and not tokenizer.legacy:
      round_len -= 1
      instruction_len -= 1
    # numpy slices like the torch tensors of the official code (negative ends included)
    labels[cur_len:cur_len + instruction_len] = IGNORE_INDEX
    cur_len += round_len
  labels[cur_len:] = IGNORE_INDEX
  warning = None
  if cur_len < model_max_length and cur_len != total_len:
    labels[:] = IGNORE_INDEX
    warning = f"WARNING: tokenization mismatch: {cur_len} vs. {total_len}. (ignored)"
  return ids, labels, warning


def _single_id(tokenizer: TextTokenizer, text: str) -> int:
  ids = tokenizer.encode(text)
  if len(ids) != 1:
    raise ValueError(f"qwen_1_5 needs {text!r} to be one token of the tokenizer, got {ids}")
  return ids[0]


def _preprocess_qwen(messages, tokenizer, tpl, has_image):
  """LLaVA-NeXT's `preprocess_qwen` semantics for the qwen_1_5 chatml template.

  A leading gpt turn is dropped. The system turn and every message are rendered as
  "<|im_start|>{system|user|assistant}\\n{text}<|im_end|>\\n" and tokenized one by one (no BOS).
  System and user turns are masked, assistant turns (header, text, "<|im_end|>\\n") supervised;
  then every "\\n", "<|im_start|>" and "<|im_end|>" token is supervised wherever it is, user
  turns included (LLaVA-NeXT's `unmask_tokens_idx`). With an image, "<image>" is split out
  before tokenizing and becomes IMAGE_TOKEN_INDEX with label -100 (LLaVA-NeXT would leave the
  added token's id as the label in an assistant turn). Roles need not alternate; no mismatch
  check exists for this template.
  """
  if messages[0][0] != HUMAN:
    messages = messages[1:]
  unmasked = {_single_id(tokenizer, "\n"), _single_id(tokenizer, IM_START),
              _single_id(tokenizer, IM_END)}

  def tokenize(text: str) -> list[int]:
    chunks = text.split(IMAGE_TOKEN) if has_image else [text]
    ids = list(tokenizer.encode(chunks[0])) if chunks[0] else []
    for chunk in chunks[1:]:
      ids.append(IMAGE_TOKEN_INDEX)
      ids.extend(tokenizer.encode(chunk) if chunk else [])
    return ids

  ids = tokenize(f"{tpl.system}{tpl.sep}\n")
  labels = [IGNORE_INDEX] * len(ids)
  for role, text in messages:
    turn = tokenize(f"{tpl.role_name(role)}\n{text}{tpl.sep}\n")
    ids.extend(turn)
    labels.extend(turn if role == GPT else [IGNORE_INDEX] * len(turn))
  labels = [token if token in unmasked else
            (IGNORE_INDEX if token == IMAGE_TOKEN_INDEX else label)
            for token, label in zip(ids, labels)]
  return ids, labels, None
