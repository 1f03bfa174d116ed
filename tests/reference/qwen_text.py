"""The official Qwen2 text path (LLaVA-UHD v2 branch HEAD), re-derived on transformers' own
tokenizer machinery, and the golden cases it writes.

Read from the official `llava/train/train.py` (HEAD): `preprocess_multimodal` moves "<image>" to
the front of a message only when the message holds exactly one and does not start with it;
`preprocess_qwen` (chosen for conversation version "qwen": templates qwen_1_5 and qwen_2) copies
the tokenizer, adds "<image>" as a special token when the sample has an image, replaces the
chat template by one that renders each message as "<|im_start|>{role}\\n{content}<|im_end|>\\n",
tokenizes the system message ("You are a helpful assistant.") and then every message on its own
with `apply_chat_template`, masks the system and user messages, supervises the assistant ones
whole, and afterwards supervises every id 198 ("\\n"), <|im_start|> and <|im_end|> wherever it is;
the "<image>" id becomes -200 in the ids. The collator cuts ids and labels at
`model_max_length`. Evaluation renders `conv_qwen` (chatml, system "<|im_start|>system\\nYou are a
helpful assistant.", open turn "<|im_start|>assistant\\n") and tokenizes it with
`tokenizer_image_token`.

Regenerate the fixture (needs only the repository's fixture tokenizer):
  python -m tests.reference.qwen_text tests/fixtures/golden/qwen2_text_cases.jsonl
"""

from __future__ import annotations

import copy
import json
import lzma
import pathlib
import sys
import tempfile

IGNORE, IMAGE = -100, -200
SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "qwen2-tokenizer"


def hf_tokenizer(folder: pathlib.Path):
  """transformers' fast tokenizer on the fixture's tokenizer.json, with Qwen2-7B-Instruct's
  special tokens (eos <|im_end|>, pad <|endoftext|>, additional <|im_start|>, <|im_end|>)."""
  from transformers import PreTrainedTokenizerFast
  return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")


def move_image(text: str) -> str:
  if text.count("<image>") == 1 and not text.startswith("<image>"):
    text = ("<image>\n" + text.replace("<image>", "").strip()).strip()
  return text.replace("QA_GT_caption_based_noisy", "")


def _ids(encoded):
  # transformers >= 5 returns a BatchEncoding from apply_chat_template, 4.x a list.
  return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def preprocess_qwen(conversations, tok, has_image: bool, model_max_length: int):
  if has_image:
    conversations = [dict(m, value=move_image(m["value"])) for m in conversations]
  tok = copy.deepcopy(tok)
  if has_image:
    tok.add_tokens(["<image>"], special_tokens=True)
  image_id = tok.convert_tokens_to_ids("<image>")
  unmask = {198, tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
  tok.chat_template = CHAT_TEMPLATE
  roles = {"human": "user", "gpt": "assistant"}
  if roles[conversations[0]["from"]] != "user":
    conversations = conversations[1:]
  ids = _ids(tok.apply_chat_template([{"role": "system", "content": SYSTEM}]))
  labels = [IGNORE] * len(ids)
  for m in conversations:
    role = roles[m["from"]]
    turn = _ids(tok.apply_chat_template([{"role": role, "content": m["value"]}]))
    ids += turn
    labels += turn if role == "assistant" else [IGNORE] * len(turn)
  labels = [t if t in unmask else lab for t, lab in zip(ids, labels)]
  ids = [IMAGE if has_image and t == image_id else t for t in ids]
  return ids[:model_max_length], labels[:model_max_length]


def inference_ids(question: str, has_image: bool, tok):
  """The evaluation prompt of `model_vqa_loader` with conv mode qwen_1_5, tokenized."""
  qs = "<image>\n" + question if has_image else question
  prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{qs}<|im_end|>\n"
            "<|im_start|>assistant\n")
  chunks = [tok(c).input_ids for c in prompt.split("<image>")]
  out = list(chunks[0])
  for c in chunks[1:]:
    out += [IMAGE] + list(c)
  return prompt, out


def _c(*turns):
  return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(turns)]


TRAIN = [
    ("single_turn_image", True, 4096,
     _c("<image>\nWhat is in the picture?", "A cat sleeping on a red sofa.")),
    ("multi_turn_image_moved_to_front", True, 4096,
     _c("Describe this scene in detail. <image>", "Two people walk a dog.\nIt is raining.",
        "What colour is the dog?\n\nAnswer briefly.", "Brown.")),
    ("image_first_without_newline_kept", True, 4096,
     _c("<image>What does the sign say?  ", " STOP ")),
    ("text_only_multi_turn", False, 4096,
     _c("Write a haiku about autumn.", "Leaves drift slowly down\nCold wind hums\tthrough bare "
        "branches\n\nThe year exhales", "Now in français, s'il vous plaît 🍂", "Feuilles qui "
        "tombent…")),
    ("leading_gpt_turn_dropped", False, 4096,
     [{"from": "gpt", "value": "Hello!"}] + _c("Count to three.", "1, 2, 3")),
    ("text_only_literal_image_marker", False, 4096,
     _c("What does <image> mean in LLaVA data?", "It marks where the image goes.")),
    ("truncated_inside_an_answer", True, 33,
     _c("<image>\nRead the text.", "The quick brown fox jumps over the lazy dog, twice.")),
    ("noisy_marker_removed", True, 4096,
     _c("<image>\nQA_GT_caption_based_noisyWhat happens?", "QA_GT_caption_based_noisyA goal.")),
]
INFERENCE = [("inference_image", True, "What is written on the board?"),
             ("inference_text", False, "Name three primes.")]


def golden_cases(folder: pathlib.Path):
  tok = hf_tokenizer(folder)
  for name, has_image, max_len, conversations in TRAIN:
    ids, labels = preprocess_qwen(conversations, tok, has_image, max_len)
    yield {"name": name, "template": "qwen_1_5", "has_image": has_image,
           "model_max_length": max_len, "conversations": conversations, "input_ids": ids,
           "labels": labels}
  for name, has_image, question in INFERENCE:
    prompt, ids = inference_ids(question, has_image, tok)
    yield {"name": name, "template": "qwen_1_5", "has_image": has_image, "question": question,
           "prompt": prompt, "input_ids": ids}


def unpacked_fixture(into: pathlib.Path) -> pathlib.Path:
  """The fixture tokenizer folder with tokenizer.json decompressed, under `into`."""
  into.mkdir(parents=True, exist_ok=True)
  (into / "tokenizer.json").write_bytes(lzma.decompress((FIXTURE / "tokenizer.json.xz")
                                                        .read_bytes()))
  (into / "tokenizer_config.json").write_bytes((FIXTURE / "tokenizer_config.json").read_bytes())
  return into


if __name__ == "__main__":
  with tempfile.TemporaryDirectory() as d:
    rows = list(golden_cases(unpacked_fixture(pathlib.Path(d))))
  pathlib.Path(sys.argv[1]).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in rows), encoding="utf-8")
