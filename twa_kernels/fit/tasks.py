"""What differs between the kinds of model ``twa fit`` merges, behind one interface: how data is read and cut
into items, how a batch is made, the loss, and the metric. The fit loop (:mod:`.run`) sees only a
:class:`Task`.

- ``causal-lm`` (``AutoModelForCausalLM``): a UTF-8 text, tokenized (the checkpoint's tokenizer, or its bytes
  with ``--tokenizer bytes``) and cut into non-overlapping windows of ``context + 1`` tokens; the loss is
  the mean next-token cross-entropy of a window.
- ``sequence-classification`` (``AutoModelForSequenceClassification``): a JSON-lines file with ``text`` and
  ``label`` fields (a label is a class index or one of the config's ``label2id`` names), truncated to
  ``context`` tokens; the loss is the cross-entropy of an example, the metric its accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("causal-lm", "sequence-classification")
DEFAULT_CONTEXT = {"causal-lm": 256, "sequence-classification": 512}


# ---------------------------------------------------------------------------------------------- helpers
def byte_ids(text: str) -> torch.Tensor:
    """The text's UTF-8 bytes as token ids (a byte-level model's tokenization)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from {source} ({err.__class__.__name__}); give one with "
                         "--tokenizer NAME_OR_PATH, or --tokenizer bytes for a byte-level model") from None


def tokenize(text: str, tokenizer: str, last: str) -> torch.Tensor:
    if tokenizer == "bytes":
        return byte_ids(text)
    tok = load_tokenizer(last if tokenizer == "auto" else tokenizer)
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def split_text(ids: torch.Tensor, holdout: float) -> dict[str, torch.Tensor]:
    """Cut token ids by position: the first ``1 − holdout`` for training, the rest halved into val and eval."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    a = int(len(ids) * (1 - holdout))
    b = a + (len(ids) - a) // 2
    return {"train": ids[:a], "val": ids[a:b], "eval": ids[b:]}


def split_items(items: list, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """The items dealt at random (a fixed draw for ``seed``) into parts of the given fractions, in order;
    each part keeps the items' original order."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        stop = len(items) if i == len(names) - 1 else start + round(fractions[name] * len(items))
        out[name] = [items[j] for j in sorted(order[start:stop])]
        start = stop
    return out


def random_windows(ids: torch.Tensor, context: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - context, (batch,), generator=gen)
    return torch.stack([ids[s:s + context + 1] for s in starts.tolist()])


def causal_loss(model, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def eval_windows(num_tokens: int, context: int, max_tokens: int) -> int:
    """How many consecutive windows of ``context`` predictions the first ``max_tokens`` tokens give."""
    return min(num_tokens - 1, max_tokens) // context


def windows_of(ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``context`` predictions (``context + 1`` tokens each)."""
    return [ids[i * context: i * context + context + 1] for i in range((len(ids) - 1) // context)]


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, context: int, batch: int, max_tokens: int, device) -> float:
    """Mean next-token loss (nats) over consecutive windows of the first ``max_tokens`` tokens of ``ids``."""
    count = eval_windows(len(ids), context, max_tokens)
    if count < 1:
        raise ValueError(f"the eval text holds {len(ids)} tokens, fewer than one window of {context + 1}")
    rows = torch.stack(windows_of(ids, context)[:count])
    total = 0.0
    for i in range(0, count, batch):
        chunk = rows[i:i + batch].to(device)
        total += float(causal_loss(model, chunk)) * len(chunk)
    return total / count


def hf_load(auto_class: str, path: str, dtype: torch.dtype, device):
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return getattr(transformers, auto_class).from_pretrained(path, **{key: dtype}).to(device)


def load_model(path: str, dtype: torch.dtype, device):
    """A causal LM from a Hugging Face folder."""
    return hf_load("AutoModelForCausalLM", path, dtype, device)


def positions_of(config) -> int | None:
    """How many positions a model's config allows (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """Per-item losses (float64) of one model on one set of items, and per-item correctness (classification)."""

    losses: torch.Tensor
    correct: torch.Tensor | None = None

    @property
    def mean(self) -> float:
        return float(self.losses.mean())

    @property
    def se(self) -> float:
        """The standard error of the mean loss (items treated as independent draws)."""
        n = len(self.losses)
        return float(self.losses.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else float(self.correct.double().mean())

    def difference(self, other: "Evaluation") -> tuple[float, float]:
        """(mean, standard error) of this loss minus ``other``'s on the same items (paired)."""
        d = self.losses - other.losses
        return float(d.mean()), (float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan"))

    def as_dict(self) -> dict:
        out = {"loss": self.mean, "se": self.se}
        if self.correct is not None:
            out["accuracy"] = self.accuracy
        return out


# ---------------------------------------------------------------------------------------------- tasks
class Task:
    """The interface of a kind of model: items read from files, batches made from items, the loss."""

    name = ""
    auto_class = ""
    unit = "item"

    def __init__(self, context: int, tokenizer: str, last: str, device):
        self.context, self.tokenizer, self.last, self.device = context, tokenizer, last, torch.device(device)

    def load_model(self, path: str, dtype: torch.dtype):
        return hf_load(self.auto_class, path, dtype, self.device)

    def read(self, path: str) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def collate(self, items: list):  # pragma: no cover - abstract
        raise NotImplementedError

    def item_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        return self.item_losses(model, batch)[0].mean()

    def tokens(self, items: list) -> int:
        return sum(len(x) - 1 for x in items)

    @torch.no_grad()
    def evaluate(self, model, items: list, batch: int) -> Evaluation:
        losses, correct = [], []
        for i in range(0, len(items), batch):
            loss, ok = self.item_losses(model, self.collate(items[i:i + batch]))
            losses.append(loss.detach().double().cpu())
            if ok is not None:
                correct.append(ok.cpu())
        return Evaluation(torch.cat(losses), torch.cat(correct) if correct else None)


class CausalLM(Task):
    name, auto_class, unit = "causal-lm", "AutoModelForCausalLM", "window"

    def ids(self, path: str) -> torch.Tensor:
        with open(path, encoding="utf-8") as f:
            return tokenize(f.read(), self.tokenizer, self.last)

    def read(self, path: str) -> list:
        return windows_of(self.ids(path), self.context)

    def collate(self, items):
        return torch.stack(items).to(self.device)

    def item_losses(self, model, rows):
        logits = model(input_ids=rows[:, :-1]).logits.float()
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="none")
        return per_token.view(rows.shape[0], -1).mean(dim=1), None


class SequenceClassification(Task):
    name, auto_class, unit = "sequence-classification", "AutoModelForSequenceClassification", "example"

    def __init__(self, context, tokenizer, last, device):
        if tokenizer == "bytes":
            raise ValueError("--tokenizer bytes is for causal LMs: a classifier needs its own tokenizer")
        super().__init__(context, tokenizer, last, device)
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(last)
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.last if self.tokenizer == "auto" else self.tokenizer)
        return self._tok

    def _label(self, value, where: str) -> int:
        count = self.config.num_labels
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{where}: 'label' must be a class index or a label name, got {value!r}")
        if isinstance(value, str):
            names = dict(getattr(self.config, "label2id", None) or {})
            if value not in names:
                raise ValueError(f"{where}: label {value!r} is not one of the model's labels {sorted(names)}")
            return int(names[value])
        if not 0 <= value < count:
            raise ValueError(f"{where}: label {value} is outside the model's {count} classes")
        return value

    def read(self, path: str) -> list:
        items = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not a JSON line ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str) or "label" not in record:
                    raise ValueError(f"{where}: each line needs a 'text' string and a 'label'")
                ids = self.tok(record["text"], truncation=True, max_length=self.context)["input_ids"]
                items.append((torch.tensor(ids, dtype=torch.long), self._label(record["label"], where)))
        return items

    def tokens(self, items):
        return sum(len(ids) for ids, _ in items)

    def collate(self, items):
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (self.tok.pad_token_id or 0)
        length = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, (ids, _) in enumerate(items):
            input_ids[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        return input_ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def item_losses(self, model, batch):
        input_ids, mask, labels = batch
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(dim=-1) == labels


def make_task(name: str, context: int | None, tokenizer: str, last: str, device) -> Task:
    """The task ``name`` for checkpoints like ``last``; ``context`` (None: the task's default, within the
    model's positions) is refused with one line when the model has fewer positions."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {name!r}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(last)
    except (OSError, ValueError) as err:
        raise ValueError(f"{last}: no readable config.json ({err.__class__.__name__})") from None
    limit = positions_of(config)
    if context is None:
        context = DEFAULT_CONTEXT[name] if limit is None else min(DEFAULT_CONTEXT[name], limit)
    if context < 1:
        raise ValueError(f"--context must be at least 1, got {context}")
    if limit is not None and context > limit:
        raise ValueError(f"--context {context} is beyond the model's {limit} positions (max_position_embeddings): "
                         f"give --context {limit} or less")
    cls = CausalLM if name == "causal-lm" else SequenceClassification
    return cls(context, tokenizer, last, device)
