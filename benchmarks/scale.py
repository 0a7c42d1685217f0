"""Scale proof: TWA on a Llama-style model of 1.1B parameters on one CPU machine, end to end.

    python -m benchmarks.scale                         # the full run: ≈ 1 h on 2 cores, ≈ 25 GB of disk, cleaned up
    python -m benchmarks.scale --quick --out-dir DIR   # a tiny Llama through every phase, in about a minute

Each phase runs in its own process, so its peak RSS is its own (read from the kernel: ``wait4``'s
maximum RSS for a command, VmHWM reset per phase inside one):

1. **checkpoints**: full AdamW (torch's, ``foreach=False``) from a random init on the package's text
   as UTF-8 bytes (vocabulary 256), saving n bf16 Hugging Face folders (sharded safetensors + index), as
   a run leaves them. This is also the measured full-AdamW baseline: its per-step times and peak RSS.
2. **average**: ``twa average uniform`` over the folders, and mergekit's ``linear`` merge of the same
   folders when ``--mergekit`` names its ``mergekit-yaml`` (it lives in its own environment).
3. **fit**: ``twa fit`` (streamed build at 4 bits, TWA-v with ProjectedAdamW's defaults from the last
   checkpoint; per step forward, backward, Pᵀg, Pβ and the rest of the optimizer step).
4. **fsdp**: world size 2 over gloo: ``fully_shard`` per decoder layer and at the root, each rank
   building the rows of P̃ of its own shards; per-rank peak RSS, s/step and the bytes of every
   collective per step.

Then the JSON, markdown and a plot of memory and time per phase under ``benchmarks/results/``, and the
7B/70B plan (:mod:`benchmarks.scale_plan`), whose formulas are checked against this run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import mean

import torch

from benchmarks.common import environment, markdown_table, save
from benchmarks.quality_text import corpus_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ≈ TinyLlama's shape (hidden 2048, MLP 5632, 32 heads, 4 KV heads) with a byte vocabulary and 25 layers
FULL_MODEL = dict(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=25,
                  num_attention_heads=32, num_key_value_heads=4)
MEDIUM_MODEL = dict(vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                    num_attention_heads=16, num_key_value_heads=4)
QUICK_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
# One configuration, fixed before the run. Tokens per step = context × batch (256 at full size).
FULL_RUN = dict(n=8, warmup=4, every=2, lr=1e-3, context=128, batch=2, bits=4, twa_steps=24, eval_tokens=2048,
                fsdp_steps=4, shard_size="2GB")
QUICK_RUN = dict(n=4, warmup=2, every=2, lr=3e-3, context=32, batch=2, bits=4, twa_steps=6, eval_tokens=256,
                 fsdp_steps=2, shard_size="200KB")
SIZES = {"full": (FULL_MODEL, FULL_RUN), "medium": (MEDIUM_MODEL, FULL_RUN), "quick": (QUICK_MODEL, QUICK_RUN)}
HOLDOUT = 0.1  # twa fit's default: the checkpoints' run trains on the same first 90 % of the text


def llama_config(model: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**model, max_position_embeddings=2048, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------- phases
def save_bf16_folder(model, folder: str, shard_size: str) -> None:
    """A Hugging Face folder in bf16, sharded with an index, converting one shard at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    os.makedirs(folder)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].detach().to(torch.bfloat16).contiguous() for k in keys},
                  os.path.join(folder, filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(v.numel() * 2 for v in state.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}, f, indent=1)
    model.config.dtype = "bfloat16"
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it (mergekit reads it)
    model.config.save_pretrained(folder)


def phase_checkpoints(model_cfg: dict, run: dict, workdir: str) -> dict:
    from transformers import LlamaForCausalLM

    from twa_kernels.fit import Phases, byte_ids, causal_loss, random_windows, split_text

    text = corpus_text()
    with open(os.path.join(workdir, "text.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    ids = split_text(byte_ids(text), HOLDOUT)["train"]
    phases = Phases()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    with phases("adamw"):
        model = LlamaForCausalLM(llama_config(model_cfg))
        opt = torch.optim.AdamW(model.parameters(), lr=run["lr"], foreach=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / run["warmup"]))
        saves = {run["warmup"] + run["every"] * (i + 1): i for i in range(run["n"])}
        log, folders = [], []
        for step in range(1, max(saves) + 1):
            rows = random_windows(ids, run["context"], run["batch"], gen)
            t0 = time.perf_counter()
            loss = causal_loss(model, rows)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            log.append({"step": step, "loss": float(loss), "forward_s": t1 - t0, "backward_s": t2 - t1,
                        "optimizer_s": t3 - t2, "step_s": t3 - t0})
            print(f"adamw step {step}: loss {float(loss):.4f}, {t3 - t0:.1f} s", flush=True)
            if step in saves:
                folder = os.path.join(workdir, f"checkpoint-{step}")
                t4 = time.perf_counter()
                save_bf16_folder(model, folder, run["shard_size"])
                log[-1]["save_s"] = time.perf_counter() - t4
                folders.append(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "steps": log, "checkpoints": folders,
            "phases": phases.record,
            "checkpoint_bytes": sum(os.path.getsize(os.path.join(d, x)) for d in folders for x in os.listdir(d))}


def timed_process(cmd: list[str]) -> dict:
    """Run ``cmd``, waiting for it with ``wait4``: its wall time, its own peak RSS and its output."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … failed (status {proc.returncode}):\n{stderr[-4000:]}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout}


def max_abs_difference(a: str, b: str) -> tuple[float, int]:
    """The largest elementwise difference between the tensors of two model folders, and how many were compared."""
    from twa_kernels.checkpoints import open_checkpoint

    ours, theirs = open_checkpoint(a), open_checkpoint(b)
    worst = 0.0
    keys = list(ours.keys())
    for key in keys:
        worst = max(worst, float((ours.tensor(key).double() - theirs.tensor(key).double()).abs().max()))
    return worst, len(keys)


def phase_average(folders: list[str], workdir: str, mergekit: str | None) -> dict:
    out = os.path.join(workdir, "uniform")
    r = timed_process([sys.executable, "-m", "twa_kernels", "average", "uniform", *folders, "-o", out, "--quiet"])
    result = {"twa_average": {"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"]}}
    if mergekit is None:
        result["mergekit"] = {"ran": False, "why": "no --mergekit given (the path of mergekit-yaml, in its own "
                                                   "environment: its pins differ from this package's)"}
    else:
        cfg = os.path.join(workdir, "mergekit.yml")
        with open(cfg, "w") as f:
            f.write("merge_method: linear\ndtype: bfloat16\nmodels:\n")
            f.writelines(f"  - model: {folder}\n    parameters:\n      weight: 1.0\n" for folder in folders)
        mk_out = os.path.join(workdir, "mergekit_out")
        r = timed_process([mergekit, cfg, mk_out, "--lazy-unpickle"])
        worst, count = max_abs_difference(out, mk_out)
        result["mergekit"] = {"ran": True, "wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"],
                              "max_abs_diff_vs_twa_average": worst, "tensors_compared": count}
        shutil.rmtree(mk_out, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def phase_fit(folders: list[str], workdir: str, run: dict) -> dict:
    report = os.path.join(workdir, "fit_report.json")
    out = os.path.join(workdir, "fit")
    r = timed_process([sys.executable, "-m", "twa_kernels", "fit", *folders, "--text",
                       os.path.join(workdir, "text.txt"), "-o", out, "--tokenizer", "bytes",
                       "--bits", str(run["bits"]), "--steps", str(run["twa_steps"]), "--context", str(run["context"]),
                       "--batch", str(run["batch"]), "--eval-tokens", str(run["eval_tokens"]), "--report", report,
                       "--text-split", "position", "--split", "val",
                       "--quiet", "--device", "cpu"])
    with open(report) as f:
        result = json.load(f)
    result.update(wall_s=r["wall_s"], peak_rss_bytes=r["peak_rss_bytes"], summary=r["stdout"].strip().splitlines()[-1])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)  # what a user does with the output
    result["output_loads"] = sum(p.numel() for p in loaded.parameters()) == result["params"]
    result["output_files"] = sorted(os.listdir(out))
    del loaded
    shutil.rmtree(out, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------- FSDP2
def fsdp_worker(rank: int, world: int, init: str, folders: list[str], run: dict, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import twa_kernels as twa
    from benchmarks.distributed import counted_collectives
    from twa_kernels.fit import Phases, byte_ids, load_model, random_windows, split_text, train_step

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    phases = Phases()
    with phases("load"):
        model = load_model(folders[-1], torch.float32, "cpu")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    with phases("build"):
        space = twa.Subspace.from_checkpoints(model, folders, bits=run["bits"], progress=False)
        opt = twa.ProjectedAdamW(model.parameters(), space)
    with open(os.path.join(os.path.dirname(init), "text.txt"), encoding="utf-8") as f:
        ids = split_text(byte_ids(f.read()), HOLDOUT)["val"]
    gen = torch.Generator().manual_seed(1000 + rank)
    log = []
    with phases("train"):
        for _ in range(run["fsdp_steps"]):
            rows = random_windows(ids, run["context"], max(1, run["batch"] // world), gen)
            with counted_collectives() as counts:
                log.append({**train_step(model, opt, rows, "cpu"), "collective_bytes": dict(counts)})
    local = sum(p.to_local().numel() for p in model.parameters())
    with open(out.format(rank=rank), "w") as f:
        json.dump({"rank": rank, "phases": phases.record, "steps": log, "local_params": local,
                   "subspace_bytes": space.nbytes, "twa_comm_bytes": opt.comm_bytes}, f)
    dist.destroy_process_group()


def phase_fsdp(folders: list[str], workdir: str, run: dict, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    init = os.path.join(workdir, "fsdp_init")
    out = os.path.join(workdir, "fsdp_rank{rank}.json")
    mp.spawn(fsdp_worker, args=(world, init, folders, run, out), nprocs=world, join=True)
    ranks = []
    for r in range(world):
        with open(out.format(rank=r)) as f:
            ranks.append(json.load(f))
    return {"world": world, "backend": "gloo", "ranks": ranks}


# ---------------------------------------------------------------------------------------------- report
def summarize(record: dict) -> dict:
    """The headline figures, per step (the first step of each loop is left out of the means: it warms up)."""
    adam = record["checkpoints"]["steps"][1:]
    fit = record["fit"]["steps"][1:]
    per_step = {
        "adamw": {k: mean(s[k] for s in adam) for k in ("forward_s", "backward_s", "optimizer_s", "step_s")},
        "twa": {k: mean(s[k] for s in fit) for k in ("forward_s", "backward_s", "project_s", "apply_s", "rule_s",
                                                     "step_s")},
    }
    t = per_step["twa"]
    per_step["twa"]["projections_fraction"] = (t["project_s"] + t["apply_s"]) / t["step_s"]
    out = {"per_step": per_step}
    if "fsdp" in record:
        ranks = record["fsdp"]["ranks"]
        out["fsdp"] = {"s_per_step": mean(mean(s["step_s"] for s in r["steps"][1:] or r["steps"]) for r in ranks),
                       "peak_rss_bytes": [max(p["peak_rss_bytes"] or 0 for p in r["phases"].values()) for r in ranks],
                       "peak_anon_bytes": [max(p["peak_anon_bytes"] or 0 for p in r["phases"].values()) for r in ranks],
                       "train_peak_anon_bytes": [r["phases"]["train"]["peak_anon_bytes"] for r in ranks],
                       "single_process_s_per_step": t["step_s"]}
    return out


def gib(x) -> str:
    return "—" if x is None else f"{x / 2**30:.2f} GiB"


def markdown(record: dict, headline: dict) -> str:
    env, ck, fit = record["environment"], record["checkpoints"], record["fit"]
    run = record["run"]
    lines = [f"Scale run on {env['device']}, torch {env['torch']}, commit {str(env['commit'])[:10]}, {env['date']}: "
             f"a Llama-style model of {record['params']:,} parameters ({record['model']['num_hidden_layers']} layers, "
             f"hidden {record['model']['hidden_size']}, byte vocabulary), n = {run['n']} bf16 checkpoints "
             f"({ck['checkpoint_bytes'] / 1e9:.2f} GB on disk), {run['bits']}-bit P̃ of "
             f"{fit['subspace_bytes'] / 1e9:.2f} GB, {run['context'] * run['batch']} tokens per step.", ""]
    adam = ck["phases"]["adamw"]
    rows = [["AdamW training (checkpoints)", f"{adam['wall_s']:.0f}", gib(ck["peak_rss_bytes"]),
             gib(adam["peak_anon_bytes"])],
            ["twa average uniform", f"{record['average']['twa_average']['wall_s']:.0f}",
             gib(record["average"]["twa_average"]["peak_rss_bytes"]), "—"]]
    mk = record["average"]["mergekit"]
    if mk["ran"]:
        rows.append([f"mergekit linear (max abs difference to twa average: {mk['max_abs_diff_vs_twa_average']:.2g})",
                     f"{mk['wall_s']:.0f}", gib(mk["peak_rss_bytes"]), "—"])
    for name in ("load", "build", "train", "write"):
        ph = fit["phases"][name]
        rows.append([f"twa fit: {name}", f"{ph['wall_s']:.0f}", gib(ph["peak_rss_bytes"]), gib(ph["peak_anon_bytes"])])
    if "fsdp" in record:
        for r in record["fsdp"]["ranks"]:
            for name in ("load", "build", "train"):
                ph = r["phases"][name]
                rows.append([f"FSDP2 rank {r['rank']}: {name}", f"{ph['wall_s']:.0f}", gib(ph["peak_rss_bytes"]),
                             gib(ph["peak_anon_bytes"])])
    lines += [markdown_table(["phase", "wall s", "peak RSS", "peak anonymous"], rows),
              "Peak RSS counts the pages of the memory-mapped checkpoints that were read (clean file pages the "
              "kernel takes back under pressure); peak anonymous memory is what the process allocated "
              "(sampled every 0.1 s).", ""]
    a, t = headline["per_step"]["adamw"], headline["per_step"]["twa"]
    lines += ["Per step (mean over the steps after the first):", "",
              markdown_table(["", "forward s", "backward s", "Pᵀg s", "Pβ s", "optimizer rest s", "step s"],
                             [["full AdamW", f"{a['forward_s']:.2f}", f"{a['backward_s']:.2f}", "", "",
                               f"{a['optimizer_s']:.2f}", f"{a['step_s']:.2f}"],
                              ["TWA (ProjectedAdamW)", f"{t['forward_s']:.2f}", f"{t['backward_s']:.2f}",
                               f"{t['project_s']:.2f}", f"{t['apply_s']:.2f}", f"{t['rule_s']:.3f}",
                               f"{t['step_s']:.2f}"]]),
              f"The two projections take {100 * t['projections_fraction']:.1f} % of a TWA step.", ""]
    s = fit["eval_loss"]
    losses = [x["loss"] for x in fit["steps"]]
    q = max(1, len(losses) // 4)
    lines += [f"TWA-v over {fit['twa_steps']} steps: training loss (mean of the first and of the last {q} steps' "
              f"batches) {mean(losses[:q]):.4f} → {mean(losses[-q:]):.4f}; eval loss on "
              f"{fit['eval_windows']} held-out windows: last checkpoint {s['last']:.4f}, uniform merge "
              f"{s['uniform']:.4f}, TWA start {s['start']:.4f} → {s['twa']:.4f} (nats/byte). `twa fit` said: "
              f"{fit['summary'].removeprefix('twa fit: ')}", ""]
    if "fsdp" in headline:
        f = headline["fsdp"]
        lines += [f"FSDP2, world 2 over gloo (one thread per rank, fp32 all-gathers and reduce-scatters through "
                  f"host memory): {f['s_per_step']:.2f} s/step against "
                  f"{f['single_process_s_per_step']:.2f} s/step in one process of two threads; peak RSS per rank "
                  + ", ".join(gib(x) for x in f["peak_rss_bytes"]) + " (anonymous: "
                  + ", ".join(gib(x) for x in f["peak_anon_bytes"]) + "; in training: "
                  + ", ".join(gib(x) for x in f["train_peak_anon_bytes"]) + ").", ""]
    return "\n".join(lines)


def plot(record: dict, headline: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit, ck = record["fit"], record["checkpoints"]
    names = ["AdamW\ntraining", "twa\naverage", *(f"fit\n{k}" for k in ("load", "build", "train", "write"))]
    walls = [ck["phases"]["adamw"]["wall_s"], record["average"]["twa_average"]["wall_s"],
             *(fit["phases"][k]["wall_s"] for k in ("load", "build", "train", "write"))]
    rss = [ck["peak_rss_bytes"], record["average"]["twa_average"]["peak_rss_bytes"],
           *(fit["phases"][k]["peak_rss_bytes"] for k in ("load", "build", "train", "write"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    anon = [ck["phases"]["adamw"]["peak_anon_bytes"], None,
            *(fit["phases"][k]["peak_anon_bytes"] for k in ("load", "build", "train", "write"))]
    axes[0].bar(names, [x / 2**30 for x in rss], color="tab:blue", alpha=0.4, label="peak RSS")
    axes[0].bar(names, [(x or 0) / 2**30 for x in anon], color="tab:blue", label="peak anonymous")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("peak RSS (GiB)")
    axes[0].set_title("memory per phase")
    axes[1].bar(names, walls, color="tab:orange")
    axes[1].set_ylabel("wall time (s)")
    axes[1].set_title("time per phase")
    a, t = headline["per_step"]["adamw"], headline["per_step"]["twa"]
    parts = [("forward", a["forward_s"], t["forward_s"]), ("backward", a["backward_s"], t["backward_s"]),
             ("optimizer / rule", a["optimizer_s"], t["rule_s"]), ("Pᵀg", 0.0, t["project_s"]),
             ("Pβ", 0.0, t["apply_s"])]
    bottom = [0.0, 0.0]
    for label, x, y in parts:
        axes[2].bar(["full AdamW", "TWA"], [x, y], bottom=bottom, label=label)
        bottom = [bottom[0] + x, bottom[1] + y]
    axes[2].set_ylabel("seconds per step")
    axes[2].set_title("one step, by part")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{record['params'] / 1e9:.2f}B-parameter Llama, n = {record['run']['n']}, "
                 f"{record['run']['bits']}-bit, {record['environment']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def render(path: str) -> None:
    """Markdown, plot and plan again from a result JSON (after a change to how they are written)."""
    with open(path) as f:
        record = json.load(f)
    headline = summarize(record)
    with open(path.replace(".json", ".md"), "w") as f:
        f.write(markdown(record, headline))
    plot(record, headline, path.replace(".json", ".png"))
    from benchmarks import scale_plan

    with open(os.path.join(os.path.dirname(path), os.path.basename(path).replace("_cpu.json", "_plan.md")), "w") as f:
        f.write(scale_plan.plan_markdown(record))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny Llama through every phase (CI); --size quick")
    p.add_argument("--size", choices=sorted(SIZES), default="full",
                   help="full: 1.1B parameters; medium: 0.13B (the same protocol in minutes); quick: tiny")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a new temporary folder)")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--mergekit", default=None, help="mergekit-yaml to compare twa average with")
    p.add_argument("--no-fsdp", action="store_true", help="skip the world-size-2 run")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--render", default=None, metavar="JSON", help="only write the markdown, plot and plan of a result")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        return render(args.render)
    if args.quick:
        args.size = "quick"
    model_cfg, run = SIZES[args.size]
    if args.phase is not None:  # a child: one phase, its result as JSON in the work folder
        result = phase_checkpoints(model_cfg, run, args.workdir) if args.phase == "checkpoints" else None
        if args.phase == "fsdp":
            with open(os.path.join(args.workdir, "checkpoints.json")) as f:
                result = phase_fsdp(json.load(f)["checkpoints"], args.workdir, run)
        with open(os.path.join(args.workdir, f"{args.phase}.json"), "w") as f:
            json.dump(result, f)
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="twa_scale_")
    os.makedirs(workdir, exist_ok=True)
    size = ["--size", args.size]
    try:
        record = {"model": model_cfg, "run": run}

        def child(phase):
            r = timed_process([sys.executable, "-m", "benchmarks.scale", "--phase", phase, "--workdir", workdir,
                               *size])
            with open(os.path.join(workdir, f"{phase}.json")) as f:
                return {**json.load(f), "wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"]}

        print("phase 1/4: AdamW from a random init, saving the checkpoints", flush=True)
        record["checkpoints"] = child("checkpoints")
        record["params"] = record["checkpoints"]["params"]
        folders = record["checkpoints"]["checkpoints"]
        print("phase 2/4: twa average (and mergekit)", flush=True)
        record["average"] = phase_average(folders, workdir, args.mergekit)
        print("phase 3/4: twa fit", flush=True)
        record["fit"] = phase_fit(folders, workdir, run)
        if not args.no_fsdp:
            print("phase 4/4: FSDP2, world size 2 over gloo", flush=True)
            try:
                fsdp = child("fsdp")
                record["fsdp"] = {k: v for k, v in fsdp.items() if k not in ("wall_s", "peak_rss_bytes")}
                record["fsdp"]["wall_s"] = fsdp["wall_s"]
            except RuntimeError as err:  # e.g. two ranks that do not fit in memory together: say so, keep the rest
                record["fsdp_failed"] = str(err)[-2000:]
                print(f"the FSDP2 run failed; the other phases are kept:\n{err}", flush=True)
        record["twa_steps"] = record["fit"]["twa_steps"]
        record["peak_anon_bytes"] = {"adamw_training": record["checkpoints"]["phases"]["adamw"]["peak_anon_bytes"],
                                     **{f"fit_{k}": v["peak_anon_bytes"] for k, v in record["fit"]["phases"].items()}}
        record["peak_rss_bytes"] = {"adamw_training": record["checkpoints"]["peak_rss_bytes"],
                                    **{f"fit_{k}": v["peak_rss_bytes"] for k, v in record["fit"]["phases"].items()},
                                    "twa_average": record["average"]["twa_average"]["peak_rss_bytes"]}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    from benchmarks import scale_plan

    device = torch.device("cpu")
    record["environment"] = environment(device)
    headline = summarize(record)
    record["headline"] = headline
    name = "scale" if args.size == "full" else f"scale_{args.size}"
    path = save(name, device, record, markdown(record, headline), args.out_dir)
    plot(record, headline, path.replace(".json", ".png"))
    plan_path = os.path.join(os.path.dirname(path), f"{name}_plan.md")
    with open(plan_path, "w") as f:
        f.write(scale_plan.plan_markdown(record))
    print(markdown(record, headline))
    print(f"wrote {path}, its .md and .png, and {plan_path}")


if __name__ == "__main__":
    main()
