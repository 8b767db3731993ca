"""Instruction data: JSONL records {"prompt": ..., "response": ...} or {"messages": [{"role": ...,
"content": ...}, ...]} (rendered with the tokenizer's chat template), trained on the response only.

Each record becomes prompt tokens + response tokens + end-of-text, cut to seq_len + 1 tokens.
Inputs are all but the last token; targets are the tokens shifted left by one, with -100 (the
ignore index of cross-entropy) on every prompt position and on padding, so the loss counts
response tokens only.

Two layouts of a batch:
- padded (`InstructBatches`): one record per row, padded to seq_len on the right (causal
  attention: padding never influences the real tokens before it). Batches are (inputs, targets).
- packed (`PackedInstructBatches`, `data.pack`): records follow each other in a row until the
  next one does not fit, so rows hold few padding tokens. Batches are (inputs, targets,
  positions): positions restart at 0 at each record, and the decoder derives from them both the
  rotary positions and an attention mask that keeps every token inside its own record, so a
  packed record is computed exactly as it would be alone (tested).

Batches are stateless like WindowSampler's: batch(step, micro) draws its records from a
generator seeded by (seed, step, micro), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from hasten.config import ConfigError
from hasten.models.ops.cross_entropy import IGNORE_INDEX  # prompt tokens: no loss (one definition with the loss)


def is_instruct_source(source: str) -> bool:
    """A .jsonl file whose first record has `prompt` and `response` fields, or `messages`."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(rec, dict) and ("prompt" in rec and "response" in rec or "messages" in rec)
    return False


class ChatTemplate:
    """Turns a conversation into (prompt, response) with a tokenizer folder's chat template.

    The template is the folder's own (`chat_template` in tokenizer_config.json), rendered by
    transformers' `apply_chat_template`. The response is the last message, which must be the
    assistant's: prompt = the conversation before it, with the template's generation prompt;
    response = what the whole conversation renders to beyond that prompt (the assistant's text and
    the template's end-of-turn marks). Earlier assistant turns are context, not trained on."""

    def __init__(self, folder: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("Records with 'messages' are rendered with the tokenizer's chat template through "
                              "`transformers`: pip install 'hasten[peft]'.") from None
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        if not getattr(self.tok, "chat_template", None):
            raise ConfigError(f"Records with 'messages' need a chat template, and the tokenizer in {folder} has none "
                              "(chat_template in tokenizer_config.json); write prompt/response records instead.")

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ValueError("the last message must be the assistant's (the response trained on)")
        prompt = self.tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = self.tok.apply_chat_template(messages, tokenize=False)
        if not whole.startswith(prompt):
            raise ValueError("the chat template renders the conversation without its prompt as a prefix")
        return prompt, whole[len(prompt):]


def load_records(source: str, tokenizer_folder: str | Path | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file: prompt/response records as they are, `messages`
    records through the chat template of `tokenizer_folder` (ChatTemplate)."""
    records, chat = [], None
    for n, line in enumerate(Path(source).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if isinstance(rec.get("messages"), list):
            if chat is None:
                if tokenizer_folder is None:
                    raise ConfigError(f"{source}:{n}: records with 'messages' need the chat template of a tokenizer "
                                      "folder: set model.from (or data.tokenizer) to a folder with one.")
                chat = ChatTemplate(tokenizer_folder)
            try:
                records.append(chat(rec["messages"]))
            except ValueError as err:
                raise ConfigError(f"{source}:{n}: {err}.") from None
            continue
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("response"), str):
            raise ConfigError(f"{source}:{n}: every record needs string 'prompt' and 'response' fields, or a "
                              "'messages' list.")
        records.append((rec["prompt"], rec["response"]))
    return records


def split_records(records: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    """Train and validation records, chosen by a hash of the prompt (stable under reordering)."""
    train, val = [], []
    for rec in records:
        (val if zlib.crc32(rec[0].encode("utf-8")) % 10_000 < val_fraction * 10_000 else train).append(rec)
    return train, val


def encode_example(tokenizer, prompt: str, response: str, seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one record, unpadded, at most seq_len long; targets -100 on the prompt."""
    p = tokenizer.encode(prompt)
    r = tokenizer.encode(response) + [tokenizer.eot_id]
    ids = (p + r)[:seq_len + 1]
    labels = ([IGNORE_INDEX] * len(p) + r)[:seq_len + 1]
    return ids[:-1], labels[1:]


class _RecordBatches:
    """What both layouts share: the encoded records and the run's batch geometry."""

    def __init__(self, records: list[tuple[str, str]], tokenizer, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not records:
            raise ConfigError("The instruction data holds no training records; add some or lower data.val_fraction.")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.pad_id = tokenizer.eot_id
        self.encoded = [encode_example(tokenizer, prompt, response, seq_len) for prompt, response in records]
        if all(y.count(IGNORE_INDEX) == len(y) for _, y in self.encoded):
            raise ConfigError("No response token survives truncation to train.seq_len; raise train.seq_len.")

    def __len__(self) -> int:
        return len(self.encoded)


class InstructBatches(_RecordBatches):
    """(inputs, targets) int64 [batch_size, seq_len] batches of instruction records, one per row."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.encoded)
        self.inputs = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        self.targets = np.full((n, self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for i, (x, y) in enumerate(self.encoded):
            self.inputs[i, :len(x)] = x
            self.targets[i, :len(y)] = y

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64([self.seed, step, micro]))
        total = self.world_size * self.batch_size
        picks = rng.permutation(len(self))[:total] if total <= len(self) else rng.integers(0, len(self), total)
        return picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices(step, micro)
        return torch.from_numpy(self.inputs[idx]), torch.from_numpy(self.targets[idx])


class PackedInstructBatches(_RecordBatches):
    """(inputs, targets, positions) int64 [batch_size, seq_len] batches, several records per row.

    For (step, micro), the records of a seeded permutation fill the world's rows in turn (next
    fit: a record that does not fit closes the row); this rank takes its rows. A record longer
    than seq_len is cut, as in the padded layout."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lengths = np.array([len(x) for x, _ in self.encoded], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.inputs = np.array([t for x, _ in self.encoded for t in x], dtype=np.int64)
        self.targets = np.array([t for _, y in self.encoded for t in y], dtype=np.int64)

    def rows(self, step: int, micro: int = 0) -> list[list[int]]:
        """Record indices of every row of the world's batch at (step, micro)."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step, micro]))
        rows, row, used = [], [], 0
        total = self.world_size * self.batch_size
        while len(rows) < total:
            for i in rng.permutation(len(self)).tolist():  # another permutation if the records run out
                if used + self.lengths[i] > self.seq_len:
                    rows.append(row)
                    row, used = [], 0
                    if len(rows) == total:
                        break
                row.append(i)
                used += self.lengths[i]
        return rows

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (self.batch_size, self.seq_len)
        inputs = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(shape, dtype=np.int64)
        mine = self.rows(step, micro)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        for r, row in enumerate(mine):
            at = 0
            for i in row:
                a, n = self.offsets[i], self.lengths[i]
                inputs[r, at:at + n] = self.inputs[a:a + n]
                targets[r, at:at + n] = self.targets[a:a + n]
                positions[r, at:at + n] = np.arange(n)
                at += n
            positions[r, at:] = np.arange(self.seq_len - at)  # padding: one more segment, all targets ignored
        return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(positions)
