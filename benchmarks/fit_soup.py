"""`twa fit` on a soup of Hugging Face fine-tunes, run as a user would: the command with its defaults.

    python -m benchmarks.fit_soup            # 3 seeds, about 20 minutes on 2 CPU cores
    python -m benchmarks.fit_soup --quick    # a smoke test

Per seed: a small Llama (a byte-level BPE tokenizer trained here, saved beside every model) pretrained on
Python source code (this Python's standard library), then fine-tuned six ways on English prose
(``pydoc_data.topics``: learning rates and step counts from a small random search), each saved as a
Hugging Face folder. Two more prose texts that no model trained on: ``val.txt`` and ``eval.txt``, in two
settings: two separate stretches of the text (other topics: a shift between the data TWA-v learns on and the
data it is judged on), and chunks of one held-out stretch dealt at random between the two files (the same
distribution). Then, in each, as README says:

    twa fit FT0 … FT5 --val val.txt --eval eval.txt -o learned --report report.json

and, for the comparison a soup user makes, ``twa average greedy FT0 … FT5 --val val.txt -o greedy``. The
results hold every loss the command reported (on eval.txt) and the greedy soup's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

import torch
from tqdm.auto import tqdm

from benchmarks.common import environment, markdown_table, save
from benchmarks.quality_text import corpus_text
from benchmarks.soups import code_text

FULL = dict(vocab=512, hidden=96, intermediate=256, layers=3, heads=4, context=64, batch=16, pretrain_steps=400,
            finetunes=6, steps=(40, 160), lr=(1e-4, 3e-3), seeds=3, text=(0, 200_000), val=(300_000, 330_000),
            eval=(400_000, 430_000), held_out=(300_000, 460_000), chunk=2000, fit_steps=100)
QUICK = dict(vocab=300, hidden=32, intermediate=64, layers=1, heads=2, context=32, batch=8, pretrain_steps=40,
             finetunes=4, steps=(10, 20), lr=(3e-4, 3e-3), seeds=1, text=(0, 30_000), val=(300_000, 306_000),
             eval=(400_000, 406_000), held_out=(300_000, 312_000), chunk=1000, fit_steps=10)
# Where val.txt and eval.txt come from: two separate stretches of the prose (different topics: a shift
# between what TWA-v learns on and what it is judged on), or chunks of one held-out stretch dealt at random
# between them (the same distribution, as one --text split by twa fit itself)
SETTINGS = ("shifted", "same distribution")


def bpe_tokenizer(text: str, vocab: int, folder: str):
    """A byte-level BPE tokenizer trained on ``text``, saved as a Hugging Face tokenizer in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], vocab_size=vocab,
                            min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def train(model, ids, cfg, steps, lr, seed):
    from twa_kernels.fit import causal_loss, random_windows

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        causal_loss(model, random_windows(ids, cfg["context"], cfg["batch"], gen)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def twa(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "twa_kernels", *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout


def one_seed(cfg, seed, work) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    code, prose = code_text(400_000), corpus_text()
    tok = bpe_tokenizer(code + prose[: cfg["text"][1]], cfg["vocab"], os.path.join(work, "tokenizer"))
    ids = {k: torch.tensor(tok(t)["input_ids"]) for k, t in (("code", code), ("prose", prose[slice(*cfg["text"])]))}
    held = prose[slice(*cfg["held_out"])]
    chunks = [held[i:i + cfg["chunk"]] for i in range(0, len(held), cfg["chunk"])]
    order = random.Random(1234).sample(range(len(chunks)), len(chunks))
    texts = {"shifted": (prose[slice(*cfg["val"])], prose[slice(*cfg["eval"])]),
             "same distribution": ("".join(chunks[i] for i in sorted(order[::2])),
                                   "".join(chunks[i] for i in sorted(order[1::2])))}
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=2 * cfg["context"],
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    train(base, ids["code"], cfg, cfg["pretrain_steps"], 3e-3, seed)
    base.save_pretrained(os.path.join(work, "base"))
    tok.save_pretrained(os.path.join(work, "base"))
    rng = random.Random(seed)
    folders, search = [], []
    for i in range(cfg["finetunes"]):
        lr = 10 ** rng.uniform(*(torch.log10(torch.tensor(cfg["lr"])).tolist()))
        steps = rng.randint(*cfg["steps"])
        model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "base"))
        train(model, ids["prose"], cfg, steps, lr, seed * 100 + i)
        folder = os.path.join(work, f"ft{i}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
        search.append({"lr": lr, "steps": steps})
    out = {"search": search}
    for setting, (val_text, eval_text) in texts.items():
        where = os.path.join(work, setting.replace(" ", "_"))
        os.makedirs(where)
        for name, text in (("val", val_text), ("eval", eval_text)):
            with open(os.path.join(where, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
        data = ["--val", os.path.join(where, "val.txt"), "--eval", os.path.join(where, "eval.txt")]
        report = os.path.join(where, "report.json")
        line = twa("fit", *folders, *data, "-o", os.path.join(where, "learned"), "--report", report,
                   "--context", cfg["context"], "--steps", cfg["fit_steps"], "--quiet").strip()
        with open(report) as f:
            rep = json.load(f)
        greedy_line = twa("average", "greedy", *folders, "--val", data[1], "-o", os.path.join(where, "greedy"),
                          "--context", cfg["context"], "--quiet").strip().splitlines()[0]
        out[setting] = {"summary": line.replace(work, "WORK"), "greedy_line": greedy_line.replace(work, "WORK"),
                        "eval": rep["eval"], "start": rep["start"], "versus": rep["versus"],
                        "eval_items": rep["eval_items"], "wrote": rep["wrote"], "check_loss": rep["check_loss"],
                        "eval_tokens": rep["eval_tokens"], "tokens": rep["tokens"], "phases": rep["phases"]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    runs = []
    for seed in tqdm(range(cfg["seeds"]), desc="fit_soup", unit="seed"):
        with tempfile.TemporaryDirectory() as work:
            runs.append(one_seed(cfg, seed, work))
    device = torch.device("cpu")
    env = environment(device)
    md = render(cfg, runs, env, args.quick)
    print(md)
    path = save("fit_soup" + ("_quick" if args.quick else ""), device,
                {"config": cfg, "runs": runs,
                 "written_minus_best_of_single_and_greedy": {k: differences(runs, k) for k in SETTINGS}},
                md, out_dir=args.out_dir)
    print(f"saved {path}")


def differences(runs, setting) -> list[float]:
    """The written model's eval loss minus the better of the best single model's and the greedy soup's."""
    return [r[setting]["eval"]["written"]["loss"]
            - min(r[setting]["eval"][k]["loss"] for k in ("best single", "greedy soup")) for r in runs]


def render(cfg, runs, env, quick=False) -> str:
    out = (f"`twa fit` with its defaults on {cfg['finetunes']} fine-tunes of a small Llama ({cfg['layers']} layers, "
           f"hidden {cfg['hidden']}, byte-level BPE of {cfg['vocab']}), {cfg['seeds']} seed(s) "
           f"({'quick smoke test, not a measurement; ' if quick else ''}{env['device']}; torch {env['torch']}; "
           f"commit {str(env['commit'])[:10]}; {env['date']})\n\n"
           "Eval loss (nats/token, ± standard error) of what the command reported, per seed ('start': the exact "
           "merge TWA started from; 'twa': its end point; 'written': what the command wrote).\n")
    names = ("last", "best single", "greedy soup", "uniform", "start", "twa", "written")
    for setting in SETTINGS:
        rows = [[n, *(f"{r[setting]['eval'][n]['loss']:.4f} ± {r[setting]['eval'][n]['se']:.4f}" for r in runs)]
                for n in names]
        diffs = differences(runs, setting)
        out += (f"\nval.txt and eval.txt: {setting}\n\n"
                + markdown_table(["on eval.txt", *(f"seed {i}" for i in range(len(runs)))], rows)
                + "\nThe written model minus the better of the best single model and the greedy soup: "
                + ", ".join(f"{d:+.4f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.4f})\n\n"
                + "The command's summary lines:\n\n"
                + "\n".join(f"- seed {i}: {r[setting]['summary']}" for i, r in enumerate(runs))
                + "\n\n`twa average greedy` said:\n\n"
                + "\n".join(f"- seed {i}: {r[setting]['greedy_line']}" for i, r in enumerate(runs)) + "\n")
    return out


if __name__ == "__main__":
    main()
