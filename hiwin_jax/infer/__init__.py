"""Inference: decoding with the KV cache (`generate`), request building with the official
evaluation prompt (`requests`), benchmark metrics (`scorers`) and `hiwin eval` (`evaluate`)."""
