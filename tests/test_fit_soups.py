"""``twa fit`` and ``twa average greedy`` on soups of fine-tunes made in the test (tiny configs, no hub): a
causal LM and a BERT-style classifier, the order invariance of the default start, greedy soup against the
library's, and the refusals that come before any work."""

import json
import os

import pytest
import torch

import twa_kernels as twa

pytest.importorskip("transformers")

from benchmarks.quality_text import corpus_text  # noqa: E402
from twa_kernels.cli import main  # noqa: E402
from twa_kernels.fit import byte_ids, causal_loss, load_model, random_windows  # noqa: E402

CONTEXT, POSITIONS = 16, 64
LRS = (3e-4, 1e-3, 3e-3, 1e-2)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=POSITIONS, tie_word_embeddings=False))


def train_lm(model, ids, steps, lr, seed):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        causal_loss(model, random_windows(ids, CONTEXT, 4, gen)).backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def lm_soup(tmp_path_factory):
    """A byte-level Llama pretrained on one text, fine-tuned 4 ways (learning rates) on another; val and eval
    texts that no fine-tune saw."""
    root = tmp_path_factory.mktemp("lm_soup")
    text = corpus_text()
    pre, fine, val, ev = text[:20000], text[100000:130000], text[200000:206000], text[300000:306000]
    model = tiny_llama()
    train_lm(model, byte_ids(pre), 20, 3e-3, 0)
    model.save_pretrained(root / "base")
    folders = []
    for i, lr in enumerate(LRS):
        ft = load_model(str(root / "base"), torch.float32, "cpu")
        train_lm(ft, byte_ids(fine), 12, lr, i + 1)
        ft.save_pretrained(root / f"ft{i}")
        folders.append(str(root / f"ft{i}"))
    (root / "val.txt").write_text(val, encoding="utf-8")
    (root / "eval.txt").write_text(ev, encoding="utf-8")
    (root / "one.txt").write_text(val + ev, encoding="utf-8")
    return root, folders


def fit(root, folders, out, *extra):
    return main(["fit", *folders, "-o", str(out), "--tokenizer", "bytes", "--steps", "6", "--context", str(CONTEXT),
                 "--batch", "2", "--eval-tokens", "2048", "--device", "cpu", "--quiet", *extra])


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_fit_on_a_soup_reports_every_rival_and_ignores_the_order(lm_soup, tmp_path, capsys):
    root, folders = lm_soup
    data = ["--val", str(root / "val.txt"), "--eval", str(root / "eval.txt")]
    assert fit(root, folders, tmp_path / "a", *data, "--report", str(tmp_path / "a.json")) == 0
    line = capsys.readouterr().out
    for rival in ("last", "best single (model", "greedy soup", "uniform", "TWA"):
        assert rival in line
    rep = json.loads((tmp_path / "a.json").read_text())
    # every rival on the eval text, with a standard error; the start chosen among them on the val text
    assert {"last", "best single", "greedy soup", "uniform", "start", "twa"} <= set(rep["eval"])
    assert all(v["se"] > 0 for v in rep["eval"].values())
    assert rep["start"] == min(rep["selection_loss"], key=rep["selection_loss"].get)
    windows = {k: (len(byte_ids((root / f"{k}.txt").read_text())) - 1) // CONTEXT for k in ("val", "eval")}
    # a fifth of the val windows is held back to check TWA's end point against its start
    assert rep["items"]["eval"] == windows["eval"] and rep["eval_items"] == 2048 // CONTEXT  # capped
    assert rep["items"]["val"] + rep["items"]["check"] == windows["val"]
    assert rep["items"]["check"] == round(0.2 * windows["val"])
    c = rep["check_loss"]
    assert rep["wrote"] in ("twa", "start") and c["difference"] == pytest.approx(c["twa"] - c["start"], abs=1e-9)
    assert (rep["wrote"] == "twa") == (c["difference"] + 2 * c["se"] < 0)
    assert rep["eval"]["written"] == rep["eval"]["twa" if rep["wrote"] == "twa" else "start"]
    # the start is the exact merge: its eval loss is the chosen baseline's own
    chosen = {"greedy soup": "greedy soup", "uniform": "uniform"}.get(rep["start"].split(" (")[0], "best single")
    assert rep["eval"]["start"]["loss"] == pytest.approx(rep["eval"][chosen]["loss"], abs=1e-6)
    assert rep["average_after"] == 3 and rep["twa_steps"] == 6
    # the same models in reverse order: the same choices (by model, not by position), the same merge
    assert fit(root, folders[::-1], tmp_path / "b", *data, "--report", str(tmp_path / "b.json")) == 0
    rev = json.loads((tmp_path / "b.json").read_text())
    n = len(folders)

    def by_model(report, order):
        return {k.replace(k, f"model {order[int(k.split()[1])]}") if k.startswith("model ") else k: round(v, 5)
                for k, v in report["selection_loss"].items()}

    assert by_model(rev, list(range(n))[::-1]) == by_model(rep, list(range(n)))
    assert sorted(n - 1 - i for i in rev["greedy_members"]) == sorted(rep["greedy_members"])
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert rev["eval"]["twa"]["loss"] == pytest.approx(rep["eval"]["twa"]["loss"], abs=1e-4)


def test_one_text_is_dealt_at_random_into_val_and_eval(lm_soup, tmp_path):
    root, folders = lm_soup
    assert fit(root, folders, tmp_path / "m", "--text", str(root / "one.txt"), "--report", str(tmp_path / "r.json")) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    total = (len(byte_ids((root / "one.txt").read_text())) - 1) // CONTEXT
    assert sum(rep["items"].values()) == total and rep["items"]["eval"] == round(0.25 * total)
    assert rep["text_split"] == "chunks"


def test_base_adds_task_arithmetic(lm_soup, tmp_path, capsys):
    root, folders = lm_soup
    assert fit(root, folders, tmp_path / "m", "--val", str(root / "val.txt"), "--eval", str(root / "eval.txt"),
               "--base", str(root / "base"), "--report", str(tmp_path / "r.json")) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["points"] == len(folders) + 1 and rep["task_arithmetic"].startswith("task arithmetic (λ = ")
    assert "task arithmetic" in rep["eval"] and "task arithmetic" in capsys.readouterr().out
    # the fine-tunes' candidates leave the base out: "model 0" is the first fine-tune
    assert len([k for k in rep["selection_loss"] if k.startswith("model ")]) == len(folders)


def test_average_greedy_is_the_library_greedy_soup(lm_soup, tmp_path, capsys):
    root, folders = lm_soup
    out = tmp_path / "greedy"
    assert main(["average", "greedy", *folders, "--val", str(root / "val.txt"), "-o", str(out), "--tokenizer", "bytes",
                 "--context", str(CONTEXT), "--eval-tokens", "2048", "--device", "cpu", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("greedy soup on") and "kept" in said
    ids = byte_ids((root / "val.txt").read_text())
    rows = torch.stack([ids[i * CONTEXT: i * CONTEXT + CONTEXT + 1] for i in range(2048 // CONTEXT)])

    def score(model):  # the library's greedy soup: higher is better
        with torch.no_grad():
            return -float(sum(causal_loss(model, rows[i:i + 4]) * len(rows[i:i + 4]) for i in range(0, len(rows), 4))
                          / len(rows))

    model = load_model(folders[-1], torch.float32, "cpu").eval()
    soup, chosen = twa.greedy_soup(model, folders, score)
    kept = [os.path.basename(folders[i]) for i in chosen]
    assert f"kept {len(kept)} of {len(folders)}: {', '.join(kept)}" in said
    written = weights(out)
    assert all(torch.allclose(written[k], soup[k].float(), atol=1e-6) for k in soup if k in written)


@pytest.mark.parametrize("case", ["long_context", "small_val", "both_data", "no_eval", "greedy_without_val"])
def test_refusals_come_first_and_write_nothing(lm_soup, tmp_path, capsys, case):
    root, folders = lm_soup
    out = tmp_path / "out"
    small = tmp_path / "small.txt"
    small.write_text("x" * (CONTEXT + 5))
    args = {"long_context": ["fit", *folders, "-o", str(out), "--val", str(root / "val.txt"), "--eval",
                             str(root / "eval.txt"), "--tokenizer", "bytes", "--context", str(2 * POSITIONS)],
            "small_val": ["fit", *folders, "-o", str(out), "--val", str(small), "--eval", str(root / "eval.txt"),
                          "--tokenizer", "bytes", "--context", str(CONTEXT)],
            "both_data": ["fit", *folders, "-o", str(out), "--text", str(root / "one.txt"), "--val",
                          str(root / "val.txt"), "--tokenizer", "bytes"],
            "no_eval": ["fit", *folders, "-o", str(out), "--val", str(root / "val.txt"), "--tokenizer", "bytes"],
            "greedy_without_val": ["average", "greedy", *folders, "-o", str(out)]}[case]
    expect = {"long_context": f"beyond the model's {POSITIONS} positions", "small_val": "fewer than one batch",
              "both_data": "not both", "no_eval": "--val FILE and --eval FILE", "greedy_without_val": "give --val"}[case]
    assert main(args + ["--quiet"]) == 1
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_default_context_stays_within_the_model(lm_soup, tmp_path):
    root, folders = lm_soup
    assert main(["fit", *folders, "-o", str(tmp_path / "m"), "--val", str(root / "val.txt"), "--eval",
                 str(root / "eval.txt"), "--tokenizer", "bytes", "--steps", "2", "--device", "cpu", "--quiet",
                 "--report", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["context"] == POSITIONS


# ---------------------------------------------------------------------------------------------- classification
POSITIVE, NEGATIVE = ("good great fine nice happy", "bad awful poor sad ugly")


def bert_folder(folder, model, vocab_file):
    from transformers import BertTokenizer

    model.save_pretrained(folder)
    BertTokenizer(str(vocab_file)).save_pretrained(folder)


@pytest.fixture(scope="module")
def classifier_soup(tmp_path_factory):
    """A tiny BERT classifier (its own character-level word-piece vocabulary), fine-tuned 3 ways on
    sentences whose label is their sentiment words'."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("cls_soup")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters)]
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    gen = torch.Generator().manual_seed(0)

    def sentences(count, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            label = int(torch.randint(0, 2, (1,), generator=g))
            words = (POSITIVE if label else NEGATIVE).split()
            noise = "the a it was very quite".split()
            picks = [words[int(torch.randint(0, len(words), (1,), generator=g))],
                     noise[int(torch.randint(0, len(noise), (1,), generator=g))]]
            out.append({"text": " ".join(picks), "label": ["negative", "positive"][label]})
        return out

    tok = BertTokenizer(str(vocab_file))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    base = BertForSequenceClassification(config)
    bert_folder(root / "base", base, vocab_file)
    folders = []
    train = sentences(64, 1)
    for i, lr in enumerate((3e-4, 1e-3, 3e-3)):
        model = BertForSequenceClassification.from_pretrained(root / "base")
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        for step in range(8):
            picks = torch.randint(0, len(train), (8,), generator=gen).tolist()
            enc = tok([train[j]["text"] for j in picks], padding=True, return_tensors="pt")
            labels = torch.tensor([config.label2id[train[j]["label"]] for j in picks])
            model(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        bert_folder(root / f"ft{i}", model, vocab_file)
        folders.append(str(root / f"ft{i}"))
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in sentences(80, 2)) + "\n")
    return root, folders


def test_fit_learns_a_soup_of_classifiers_and_reports_accuracy(classifier_soup, tmp_path, capsys):
    root, folders = classifier_soup
    assert main(["fit", *folders, "-o", str(tmp_path / "m"), "--task", "sequence-classification", "--data",
                 str(root / "data.jsonl"), "--steps", "6", "--batch", "4", "--device", "cpu", "--quiet",
                 "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["task"] == "sequence-classification" and rep["unit"] == "example"
    assert rep["items"] == {"val": 48, "check": 12, "eval": 20}
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in rep["eval"].values())
    assert "%" in capsys.readouterr().out
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.config.num_labels == 2


def test_classification_data_errors_name_the_line(classifier_soup, tmp_path, capsys):
    root, folders = classifier_soup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": "positive"}\n{"text": "bad", "label": "meh"}\n')
    assert main(["fit", *folders, "-o", str(tmp_path / "m"), "--task", "sequence-classification", "--data",
                 str(bad), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'meh'" in err and not (tmp_path / "m").exists()


def test_the_end_point_is_written_only_when_clearly_below_the_start():
    from twa_kernels.fit.run import clearly_below
    from twa_kernels.fit.tasks import Evaluation

    start = Evaluation(torch.tensor([3.0, 3.2, 2.9, 3.1, 3.0, 3.3], dtype=torch.float64))
    better = Evaluation(start.losses - torch.tensor([0.10, 0.12, 0.09, 0.11, 0.10, 0.10], dtype=torch.float64))
    noisy = Evaluation(start.losses + torch.tensor([-0.3, 0.25, -0.2, 0.3, -0.35, 0.2], dtype=torch.float64))
    assert clearly_below(better, start)          # 0.10 below, a paired standard error of 0.004
    assert not clearly_below(noisy, start)       # 0.02 below in the mean, a standard error of 0.12
    assert not clearly_below(start, start) and not clearly_below(start, better)
    assert not clearly_below(Evaluation(torch.tensor([1.0])), Evaluation(torch.tensor([2.0])))  # one item
