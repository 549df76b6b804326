"""
Evaluate SAEs on held-out tokens: the table of Bloom's Feb 2024 post, and feature dashboards.

    python eval.py runs/L9                           # every SAE in the run; eval.json beside each
    python eval.py runs/Lall --tokens 500000
    python eval.py path/to/blocks.9.hook_resid_pre   # any SAELens-format folder (standard, topk,
                                                     # jumprelu), Bloom's included
    python eval.py runs/L9 --dashboard               # and dashboard/index.html beside each SAE

Every SAE is evaluated on the same held-out contexts (FineWeb's validation shard, or the
held-out end of local token files), disjoint from the training stream. Two passes: the first
finds the mean residual x_bar of the evaluation set and each feature's firing count and largest
activation; the second computes the metrics, with the SAE spliced into GPT-2, and collects the
dashboards' examples (dashboard.py). The metrics' formulas are in the README.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import dashboard
import data
import gpt2
import runs
from train_sae import SAE

p = argparse.ArgumentParser(description="Evaluate SAEs on GPT-2 small's residual stream.", formatter_class=runs.HelpFormatter)
p.add_argument("folders", nargs="+",
               help="run folders (holding blocks.L.hook_resid_pre/), SAE folders, or bloom:L / bloom:all for Bloom's "
                    "published SAEs (downloaded once into the cache)")
p.add_argument("--tokens", type=int, default=2_000_000, help="held-out tokens to evaluate on")
p.add_argument("--batch", type=int, default=32, help="contexts per forward")
runs.add_input_flags(p)  # --data, --weights, --cache_dir, --device, --ctx
p.add_argument("--activations", default=None,
               help="evaluate on the rows of this activation file [N, d] (.npy or .safetensors) instead of GPT-2's "
                    "residuals: every metric that needs no language model")
p.add_argument("--dashboard", action="store_true", help="also write a dashboard/ of every feature beside each SAE")
p.add_argument("--features", default=None, help="only these features get dashboard pages, comma-separated (default: all)")
p.add_argument("--top", type=int, default=12, help="top-activating contexts per dashboard feature")
p.add_argument("--seed", type=int, default=0, help="seeds the dashboard's random examples")

# -----------------------------------------------------------------------------
# SAE folders in SAELens's format: ours, or anyone's standard (ReLU), TopK or JumpReLU SAE on a
# resid_pre hook.

# Bloom's Feb 2024 SAEs, in SAELens's format, one folder per blocks.L.hook_resid_pre.
BLOOM_URL = "https://huggingface.co/jbloom/GPT2-Small-SAEs-Reformatted/resolve/main"
BLOOM_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")


def bloom_folders(name, cache_dir):
    """bloom:L (0..11) or bloom:all: (name, local folder) of Bloom's SAEs, downloaded once (with
    progress, resumable, renamed into place only when complete) into the cache."""
    which = name.removeprefix("bloom:")
    layers = range(12) if which == "all" else [int(which)] if which.isdigit() and int(which) < 12 else None
    if layers is None:
        raise ValueError(f"{name}: expected bloom:L with L in 0..11, or bloom:all")
    folders = []
    for L in layers:
        folder = os.path.join(cache_dir or data.default_cache_dir(), "bloom", data.hook_name(L))
        for file in BLOOM_FILES:
            data.download(f"{BLOOM_URL}/{data.hook_name(L)}/{file}", os.path.join(folder, file))
        folders.append((f"bloom:{L}", folder))
    return folders


def find_sae_folders(paths, cache_dir=None):
    """(name, folder) of every SAE the arguments name: SAE folders, run folders, Bloom's."""
    folders = []
    for path in paths:
        if path.startswith("bloom:"):
            folders += bloom_folders(path, cache_dir)
        elif os.path.isfile(os.path.join(path, "cfg.json")):
            folders.append((path, path))
        elif os.path.isdir(path):
            subs = sorted((s for s in os.listdir(path) if os.path.isfile(os.path.join(path, s, "cfg.json"))),
                          key=lambda s: (len(s), s))  # blocks.2 before blocks.10
            if not subs:
                raise ValueError(f"{path}: no SAE in it (expected cfg.json, or folders blocks.L.hook_resid_pre/)")
            folders += [(os.path.join(path, s),) * 2 for s in subs]
        else:
            raise FileNotFoundError(f"no such folder: {path}")
    seen, unique = set(), []  # one SAE named twice (runs/L9 and runs/L9/blocks.9...) is evaluated once
    for name, folder in folders:
        if os.path.realpath(folder) in seen:
            print(f"note: {name} given twice; evaluated once", file=sys.stderr)
        else:
            seen.add(os.path.realpath(folder))
            unique.append((name, folder))
    return unique


def load_sae(folder, d_model=None, gpt2_only=False):
    """(SAE, its layer, whether it reads centred residuals) from a SAELens-format folder. With
    d_model, the SAE must read residuals of that width; with gpt2_only, GPT-2's residuals."""
    cfg = data.read_json(os.path.join(folder, "cfg.json"))
    cfg = {**(cfg.get("metadata") or {}), **cfg}  # SAELens 6 keeps hook_name and model_name in metadata
    model_name = cfg.get("model_name", "gpt2")
    if gpt2_only and model_name not in ("gpt2", "gpt2-small"):  # ours say gpt2, Bloom's gpt2-small
        raise ValueError(f"{folder}: an SAE of {model_name!r} activations (cfg.json model_name), expected gpt2: "
                         f"eval.py splices SAEs into GPT-2; evaluate it on its activations with --activations")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{folder}: cfg.json has normalize_activations {cfg['normalize_activations']!r}, expected 'none'")
    # SAELens 6 names the architecture; older folders say topk through activation_fn_str.
    arch, fn = cfg.get("architecture", "standard"), cfg.get("activation_fn_str", "relu")
    arch = "topk" if (arch, fn) == ("standard", "topk") else arch
    if arch not in ("standard", "topk", "jumprelu") or (arch != "topk" and fn != "relu"):
        raise ValueError(f"{folder}: cfg.json has architecture {arch!r} with activation_fn_str {fn!r}, expected "
                         f"'standard' or 'jumprelu' with 'relu', or 'topk'")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "topk" and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"{folder}: cfg.json has k {k!r} for a topk SAE, expected a positive integer")
    hook = cfg.get("hook_name", "")
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_pre" or not parts[1].isdigit():
        raise ValueError(f"{folder}: hook_name {hook!r}, expected blocks.L.hook_resid_pre")
    w = data.load_safetensors(os.path.join(folder, "sae_weights.safetensors"))
    keys = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if arch == "jumprelu" else ())
    for key in keys:
        if key not in w:
            raise ValueError(f"{folder}: sae_weights.safetensors has no {key}")
    d, m = w["W_enc"].shape
    d_model = d_model or d
    shapes = {"W_enc": (d_model, m), "b_enc": (m,), "W_dec": (m, d_model), "b_dec": (d_model,), "threshold": (m,)}
    if any(w[name].shape != shapes[name] for name in keys):
        raise ValueError(f"{folder}: weights of shapes {[list(w[name].shape) for name in keys]}, expected "
                         f"{[list(shapes[name]) for name in keys]} with m = {m}")
    for name in keys:
        if not torch.isfinite(w[name]).all():
            raise ValueError(f"{folder}: sae_weights.safetensors's {name} holds NaN or Inf; expected finite weights")
    if arch == "topk" and k > m:
        raise ValueError(f"{folder}: cfg.json has k {k}, expected at most d_sae {m}")
    widths = cfg.get("matryoshka_widths") or [m]  # a Matryoshka SAE: each prefix of its features is scored too
    if (not isinstance(widths, list) or widths[-1] != m or widths != sorted(set(widths))
            or not all(isinstance(w, int) and w > 0 for w in widths)):
        raise ValueError(f"{folder}: cfg.json has matryoshka_widths {widths}, expected increasing widths ending at {m}")
    sae = SAE(d, m, arch={"standard": "relu"}.get(arch, arch), k=k)
    w = {name: w[name].float() for name in keys}
    if not cfg.get("apply_b_dec_to_input", True):  # x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # SAELens's TopK: pre × ‖W_dec row‖, decoded by unit rows; folded
        norm = w["W_dec"].norm(dim=1)                                                 # [m]
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * norm, w["b_enc"] * norm, w["W_dec"] / norm[:, None]
    sae.load_state_dict(w)
    sae.prefixes = widths[:-1]  # the whole SAE's metrics are the main ones
    center = bool((cfg.get("model_from_pretrained_kwargs") or {}).get("center_writing_weights", False))
    return sae.eval(), int(parts[1]), center


def sae_input(x, center):
    """The residual as the SAE reads it, and what to add back to its reconstruction. TransformerLens's
    center_writing_weights made every residual zero-mean over d_model; adding the mean back
    changes nothing downstream (each LayerNorm removes it) but keeps the splice exact."""
    mean = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[..., :1])
    return x - mean, mean

# -----------------------------------------------------------------------------
# The two passes over the held-out contexts.

PASSES = {1: "eval pass 1 of 2 (means, firing counts)", 2: "eval pass 2 of 2 (metrics, examples)"}


def held_out_batches(args, which):
    """The same contexts on every call: [batch, ctx] token ids, --tokens of them in all, or
    all of the held-out split when it is smaller. The progress line is redrawn every 2 s: on CPU
    one batch of pass 2 can take a minute."""
    stream = data.Contexts(args.shards, args.ctx)
    # The first batch opens the shard (FineWeb's downloads, with its own line) before this line shows.
    idx = stream.next(min(args.batch, math.ceil(args.tokens / args.ctx)))
    with data.progress_line(PASSES[which], args.tokens, unit="tokens") as shown:
        while len(idx):  # empty once --tokens are done, or at the end of a smaller held-out split
            yield idx.to(args.device)
            shown.done += idx.numel()
            expected_time(shown, idx.numel(), which, args)
            idx = stream.next(min(args.batch, math.ceil((args.tokens - shown.done) / args.ctx)))  # 0 when done


def activation_rows(args, which):
    """The rows of --activations [n, d], in order, --tokens of them in all (or the whole file
    when it is smaller), each checked as training reads them (no NaN or Inf)."""
    rows = data.FileSource(args.activations, center=False, device=args.device)
    total = min(rows.n, args.tokens)
    with data.progress_line(PASSES[which], total, unit="rows") as shown:
        while shown.done < total:
            n = min(args.batch * args.ctx, total - shown.done)
            yield rows.next(n)[:, 0]                                               # [n, d]
            shown.done += n
            expected_time(shown, n, which, args)


def expected_time(shown, n, which, args):
    """After a pass's first batch of n, when more follow: one line saying how long the pass will
    take, and what would shorten the evaluation when it takes over an hour in all."""
    if shown.done != n or n >= shown.total:
        return
    seconds = (time.time() - shown.t0) * shown.total / n
    line = f"expected time of eval pass {which}: {data.duration(seconds)}"
    if which == 1:  # pass 2 runs what pass 1 does, and more
        line += "; pass 2 takes at least as long" + ("" if args.activations else " (it runs GPT-2 to the end once "
                                                     "per SAE, and for the clean and zero-ablated logits)")
    if seconds * (3 - which) > 3600:
        line += (f"; over an hour in all: for a first look, try fewer --tokens (e.g. --tokens 100000)"
                 f"{'' if args.device.startswith('cuda') else ' or a GPU (--device cuda)'}")
    print(f"\n{line}\n", end="", file=sys.stderr)  # one write: the progress thread's redraw cannot land inside it
    shown.draw()  # and the progress line again, below it


def residual_batches(model, saes, args, which):
    """(token ids [b, T], {layer: residual [b, T, d]}) over the evaluation set in pass `which`:
    GPT-2's residuals on the held-out contexts, or else (no model) rows of --activations, as
    (None, [1, n, d]) for every SAE."""
    layers = sorted({s["layer"] for s in saes})
    if model is None:
        for x in activation_rows(args, which):
            yield None, {L: x[None] for L in layers}
    else:
        for idx in held_out_batches(args, which):
            yield idx, model.residuals(idx, layers)


@torch.no_grad()
def first_pass(model, saes, args):
    """Per SAE: the mean SAE input over the evaluation set, and each feature's firing count
    and largest activation."""
    for s in saes:
        d, m = s["sae"].W_enc.shape
        s.update(x_sum=torch.zeros(d, dtype=torch.float64, device=args.device), n=0,
                 fires=torch.zeros(m, dtype=torch.long, device=args.device), max_act=torch.zeros(m, device=args.device))
    for _, resid in residual_batches(model, saes, args, 1):
        for s in saes:
            x, _ = sae_input(resid[s["layer"]].flatten(0, 1), s["center"])  # [tokens, d]
            _, f, _ = s["sae"](x)
            s["x_sum"] += x.double().sum(0)
            s["n"] += len(x)
            s["fires"] += torch.count_nonzero(f, dim=0)
            s["max_act"] = torch.maximum(s["max_act"], f.max(0).values)
    for s in saes:
        s["x_mean"] = (s["x_sum"] / s["n"]).float()


@torch.no_grad()
def second_pass(model, saes, args):
    """Per SAE: the sums behind every metric (float64, on the device until the end), and (with
    --dashboard) the examples. Without a model (--activations), the sums that need none."""
    layers = sorted({s["layer"] for s in saes})
    keys = ("n", "sse", "sst", "ev_token", "l1", "l0", "cos", "norm_ratio")
    keys += ("n_pred", "ce_clean", "ce_sae", "ce_zero", "kl") if model is not None else ()
    for s in saes:
        prefix_keys = [f"{k}_{w}" for w in s["sae"].prefixes for k in ("sse", "ev_token", "l0")]
        s["sums"] = {k: torch.zeros((), dtype=torch.float64, device=args.device) for k in (*keys, *prefix_keys)}
    for idx, resid in residual_batches(model, saes, args, 2):  # {L: [b, T, d]}
        if model is not None:
            clean = model.logits_from(resid[layers[-1]], layers[-1])            # [b, T, vocab]
            log_p_clean = F.log_softmax(clean[:, :-1].float(), -1)              # [b, T-1, vocab]
            target = idx[:, 1:]
            ce_clean = token_ce(clean, target).sum()
            ce_zero = {L: token_ce(model.logits_from(torch.zeros_like(resid[L]), L), target).sum() for L in layers}
        for s in saes:
            L, sums = s["layer"], s["sums"]
            x, mean = sae_input(resid[L], s["center"])                          # [b, T, d]
            _, f, x_hat = s["sae"](x)
            if model is not None:
                logits = model.logits_from(x_hat + mean, L)
                log_p = F.log_softmax(logits[:, :-1].float(), -1)
                sums["n_pred"] += target.numel()
                sums["ce_clean"] += ce_clean
                sums["ce_sae"] += token_ce(logits, target).sum()
                sums["ce_zero"] += ce_zero[L]
                sums["kl"] += (log_p_clean.exp() * (log_p_clean - log_p)).sum()
            x, x_hat, f = x.flatten(0, 1).double(), x_hat.flatten(0, 1).double(), f.flatten(0, 1)
            err = (x - x_hat).pow(2).sum(1)                                      # [tokens]
            spread = (x - s["x_mean"].double()).pow(2).sum(1)                    # ||x_b - x_bar||^2
            sums["n"] += len(x)
            sums["sse"] += err.sum()
            sums["sst"] += spread.sum()
            sums["ev_token"] += (1 - err / spread).sum()
            sums["l1"] += f.double().sum()
            sums["l0"] += torch.count_nonzero(f)
            sums["cos"] += F.cosine_similarity(x, x_hat, dim=1).sum()
            sums["norm_ratio"] += (x_hat.norm(dim=1) / x.norm(dim=1)).sum()
            for w in s["sae"].prefixes:  # a Matryoshka SAE's nested reconstructions, from its first w features
                err_w = (x - f[:, :w].double() @ s["sae"].W_dec[:w].double() - s["sae"].b_dec.double()).pow(2).sum(1)
                sums[f"sse_{w}"] += err_w.sum()
                sums[f"ev_token_{w}"] += (1 - err_w / spread).sum()
                sums[f"l0_{w}"] += torch.count_nonzero(f[:, :w])
            if "dash" in s:
                dashboard.collect_examples(s["dash"], f.view(*resid[L].shape[:2], -1), idx)  # [b, T, m]


def token_ce(logits, target):
    """Next-token cross-entropy of each prediction [b, T-1]."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")


def metrics(s):
    """The metrics from one SAE's sums (formulas in the README)."""
    t, fires = {k: v.item() for k, v in s["sums"].items()}, s["fires"].cpu()
    ratio = lambda a, b: a / b if b else math.nan  # no spread, or a zero ablation as good as the model: no ratio
    density = fires.double() / s["n"]
    hist, edges = np.histogram(np.log10(density.numpy() + 1e-10), bins=20, range=(-10, 0))
    spliced = {} if "n_pred" not in t else {  # the language-model metrics: none on --activations
        "ce_clean": t["ce_clean"] / t["n_pred"], "ce_sae": t["ce_sae"] / t["n_pred"], "ce_zero": t["ce_zero"] / t["n_pred"],
        "ce_recovered": ratio(t["ce_zero"] - t["ce_sae"], t["ce_zero"] - t["ce_clean"]),
        "kl": t["kl"] / t["n_pred"]}
    return {
        "layer": s["layer"], "hook_name": f"blocks.{s['layer']}.hook_resid_pre", "d_sae": len(fires),
        "tokens": int(t["n"]),
        "explained_variance": t["ev_token"] / t["n"],             # the seed's per-token form
        "explained_variance_pooled": 1 - ratio(t["sse"], t["sst"]),
        "mse": t["sse"] / (t["n"] * len(s["x_mean"])),
        "l1": t["l1"] / t["n"], "l0": t["l0"] / t["n"],
        "cos": t["cos"] / t["n"], "norm_ratio": t["norm_ratio"] / t["n"],
        "alive_pct": 100 * (fires > 0).double().mean().item(), "dead": int((fires == 0).sum()), **spliced,
        "prefixes": [{"width": w, "explained_variance": t[f"ev_token_{w}"] / t["n"], "l0": t[f"l0_{w}"] / t["n"],
                      "explained_variance_pooled": 1 - ratio(t[f"sse_{w}"], t["sst"])} for w in s["sae"].prefixes],
        "density_histogram": {"log10_edges": edges.tolist(), "counts": hist.tolist()},
        "centered_input": s["center"],
    }

# -----------------------------------------------------------------------------
# main: every check first, then the two passes, then every file at once.

COLUMNS = [("sae", "SAE", "{}"), ("layer", "layer", "{}"), ("explained_variance", "var. expl.", "{:.2%}"), ("l1", "L1", "{:.2f}"),
           ("l0", "L0", "{:.2f}"), ("alive_pct", "% alive", "{:.1f}%"), ("ce_sae", "recon. CE", "{:.3f}"),
           ("ce_clean", "clean CE", "{:.3f}"), ("ce_zero", "zero CE", "{:.3f}"), ("ce_recovered", "CE recov.", "{:.2%}"),
           ("kl", "KL", "{:.4f}"), ("explained_variance_pooled", "var. expl. pooled", "{:.2%}"),
           ("mse", "MSE", "{:.4g}"), ("cos", "cos", "{:.4f}"), ("norm_ratio", "|x_hat|/|x|", "{:.3f}"), ("dead", "dead", "{}")]


written = []  # the files this run has written, for the message if it is interrupted


def main(argv=None):
    args = p.parse_args(argv)
    # Every check that can fail comes before the slow work: GPT-2's download and the passes.
    runs.check_inputs(args, "tokens", "batch", "top")
    features = dashboard.parse_features(args.features) if args.features else []
    if args.features and not args.dashboard:
        raise ValueError(f"--features {args.features}: expected --dashboard too (only dashboards use it)")
    enc = data.tokenizer() if args.dashboard and not args.activations else None
    about = data.read_about(args.activations) if args.activations else None  # what the rows are, if known
    saes = []
    for name, folder in find_sae_folders(args.folders, args.cache_dir):
        sae, layer, center = load_sae(folder, gpt2_only=not args.activations)
        if about and about["layer"] != layer:
            raise ValueError(f"{folder}: an SAE of {data.hook_name(layer)}, but {data.about_path(args.activations)} "
                             f"says the rows are {about['hook_name']}")
        saes.append({"folder": folder, "name": name, "sae": sae, "layer": layer, "center": center})
        m = sae.W_enc.shape[1]
        bad = [i for i in features if not 0 <= i < m]
        if bad:
            raise ValueError(f"--features {bad[0]}: expected 0..{m - 1} (d_sae of {folder})")
    for s in saes:
        sae = s["sae"]
        print(f"SAE {s['folder']}: layer {s['layer']}, {sae.arch}{f' k {sae.k}' if sae.arch == 'topk' else ''}, "
              f"d_sae {sae.W_enc.shape[1]:,}{', centred input' if s['center'] else ''}", file=sys.stderr)
    # GPT-2's sizes from the weights file's header alone (no download): the SAEs' width and layers,
    # and --ctx, are checked against them before the model loads.
    cfg = None if args.activations else gpt2.read_config(args.weights)
    d_model = cfg.n_embd if cfg else data.FileSource(args.activations, center=False, device="cpu").d
    if cfg and args.ctx > cfg.block_size:
        raise ValueError(f"--ctx {args.ctx}: expected at most {cfg.block_size}, the longest context of "
                         f"{args.weights or 'GPT-2 small'}")
    for s in saes:
        if cfg:
            try:
                gpt2.check_layers([s["layer"]], cfg.n_layer)
            except ValueError as e:  # the same line, naming the SAE
                raise ValueError(f"{s['folder']}: {e}") from None
        if s["sae"].W_enc.shape[0] != d_model:
            raise ValueError(f"{s['folder']}: an SAE of width {s['sae'].W_enc.shape[0]}, expected "
                             f"{'the rows of ' + args.activations if cfg is None else 'GPT-2'}'s {d_model}")
    if args.activations:  # no language model: the rows are the residuals
        model = None
    else:
        args.shards = data.corpus(args.data, "eval", args.ctx, args.cache_dir)  # opened once, read by both passes
        model = gpt2.from_pretrained(args.weights, args.cache_dir).to(args.device)
    for s in saes:
        s["sae"] = s["sae"].to(args.device)
    first_pass(model, saes, args)
    n = saes[0]["n"]
    if n < args.tokens:
        print(f"the activation file has only {n:,} rows; evaluated on all of them, of the {args.tokens:,} asked"
              if model is None else f"the held-out split has only {n:,} tokens (in contexts of {args.ctx}); "
              f"evaluated on {n:,} of the {args.tokens:,} asked", file=sys.stderr)
    if args.dashboard:
        for s in saes:
            dashboard.start_examples(s, args, features or None, tokens=model is not None)
    second_pass(model, saes, args)
    rows, files = [], []  # files: (path, text), written together at the end
    for s in saes:
        # JSON has no NaN or Infinity: a metric that is not finite (a row equal to the mean divides by 0) is null.
        result = s["result"] = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics(s).items()}
        result["settings"] = {"tokens_requested": args.tokens, "ctx": args.ctx, "data": args.data,
                              "activations": args.activations and os.path.abspath(args.activations)}
        files.append((os.path.join(s["folder"], "eval.json"), json.dumps(result, indent=2, allow_nan=False)))
        rows.append([s["name"]] + [fmt.format(result[key]) if result.get(key) is not None else "—"
                                   for key, _, fmt in COLUMNS[1:]])
    if args.dashboard:  # each to dashboard.tmp/ now, put in place of dashboard/ with the other files below
        files += [(path, None) for path in dashboard.write_dashboards(saes, model, enc)]
    for path, text in files:  # an interrupted run leaves each old file or folder whole
        if text is None:  # a dashboard, written already to path.tmp/
            data.replace_folder(path + ".tmp", path)
        else:
            data.write_atomically(path, text)
        written.append(path)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (_, h, _) in enumerate(COLUMNS)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    for s in saes:
        if s["sae"].prefixes:
            print(f"{s['name']}, its prefixes: " + ", ".join(f"{p['width']:,} features: var. expl. "
                                                            f"{p['explained_variance']:.2%}, L0 {p['l0']:.2f}"
                                                            for p in s["result"]["prefixes"]))
    print(f"({n:,} {'rows of ' + args.activations if model is None else 'held-out tokens'}; "
          f"eval.json{' and dashboard/' if args.dashboard else ''} written beside each SAE)")
    return saes


if __name__ == "__main__":
    runs.command_line(main, lambda: f"wrote only {', '.join(written)}" if written else "nothing was written")
