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
dashboards' examples. The formulas are in the README.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import gpt2
import train_sae

p = argparse.ArgumentParser(description="Evaluate SAEs on GPT-2 small's residual stream.",
                            formatter_class=gpt2.HelpFormatter)
p.add_argument("folders", nargs="+",
               help="run folders (holding blocks.L.hook_resid_pre/), SAE folders, or bloom:L / bloom:all for Bloom's "
                    "published SAEs (downloaded once into the cache)")
p.add_argument("--tokens", type=int, default=2_000_000, help="held-out tokens to evaluate on")
p.add_argument("--ctx", type=int, default=128, help="context length, BOS included")
p.add_argument("--batch", type=int, default=32, help="contexts per forward")
p.add_argument("--data", default="fineweb", help="'fineweb', or token files (.txt, .bin, .npy), comma-separated")
p.add_argument("--weights", default=None, help="local GPT-2 model.safetensors (default: download OpenAI's)")
p.add_argument("--dashboard", action="store_true", help="also write a dashboard/ of every feature beside each SAE")
p.add_argument("--features", default=None, help="only these features get dashboard pages, comma-separated (default: all)")
p.add_argument("--top", type=int, default=12, help="top-activating contexts per dashboard feature")
p.add_argument("--seed", type=int, default=0, help="seeds the dashboard's random examples")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
p.add_argument("--cache_dir", default=None, help=f"downloads go here (default: {gpt2.default_cache_dir()})")
p.add_argument("--activations", default=None,
               help="evaluate on the rows of this activation file [N, d] (.npy or .safetensors) instead of GPT-2's "
                    "residuals: every metric that needs no language model")

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
        folder = os.path.join(cache_dir or gpt2.default_cache_dir(), "bloom", train_sae.hook_name(L))
        for file in BLOOM_FILES:
            gpt2.download(f"{BLOOM_URL}/{train_sae.hook_name(L)}/{file}", os.path.join(folder, file))
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
    return folders


def load_sae(folder, d_model=None, gpt2_only=False):
    """(SAE, its layer, whether it reads centred residuals) from a SAELens-format folder. With
    d_model, the SAE must read residuals of that width; with gpt2_only, GPT-2's residuals."""
    path = os.path.join(folder, "cfg.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a JSON {type(cfg).__name__}, expected an object of settings")
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
    w = gpt2.load_safetensors(os.path.join(folder, "sae_weights.safetensors"))
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
    if arch == "topk" and k > m:
        raise ValueError(f"{folder}: cfg.json has k {k}, expected at most d_sae {m}")
    sae = train_sae.SAE(d, m, arch={"standard": "relu"}.get(arch, arch), k=k)
    w = {name: w[name].float() for name in keys}
    if not cfg.get("apply_b_dec_to_input", True):  # x W_enc + b_enc == (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        w["b_enc"] = w["b_enc"] + w["b_dec"] @ w["W_enc"]
    sae.load_state_dict(w)
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

def held_out_batches(args, label):
    """The same contexts on every call: [batch, ctx] token ids, --tokens of them in all, or
    all of the held-out split when it is smaller."""
    stream = gpt2.Contexts(args.shards, args.ctx)
    done, t0, shown = 0, time.time(), 0.0
    while done < args.tokens:
        idx = stream.next(min(args.batch, math.ceil((args.tokens - done) / args.ctx)))
        if len(idx) == 0:
            break  # the held-out split is smaller than asked
        done += idx.numel()
        yield idx.to(args.device)
        if time.time() - shown > 1:
            gpt2.progress(label, done, args.tokens, t0, unit="tokens")
            shown = time.time()
    gpt2.progress(label, done, args.tokens, t0, unit="tokens")
    print(file=sys.stderr)


def activation_rows(args, label):
    """The rows of --activations [n, d], in order, --tokens of them in all (or the whole file
    when it is smaller), each checked as train_sae reads them (no NaN or Inf)."""
    rows = train_sae.FileSource(args.activations, center=False, device=args.device)
    total, done, t0, shown = min(rows.n, args.tokens), 0, time.time(), 0.0
    while done < total:
        n = min(args.batch * args.ctx, total - done)
        yield rows.next(n)[:, 0]                                               # [n, d]
        done += n
        if time.time() - shown > 1:
            gpt2.progress(label, done, total, t0, unit="rows")
            shown = time.time()
    gpt2.progress(label, done, total, t0, unit="rows")
    print(file=sys.stderr)


def residual_batches(model, saes, args, label):
    """(token ids [b, T], {layer: residual [b, T, d]}) over the evaluation set: GPT-2's residuals
    on the held-out contexts, or else (no model) rows of --activations, as (None, [1, n, d]) for
    every SAE."""
    layers = sorted({s["layer"] for s in saes})
    if model is None:
        for x in activation_rows(args, label):
            yield None, {L: x[None] for L in layers}
    else:
        for idx in held_out_batches(args, label):
            yield idx, model.residuals(idx, layers)


@torch.no_grad()
def first_pass(model, saes, args):
    """Per SAE: the mean SAE input over the evaluation set, and each feature's firing count
    and largest activation."""
    for s in saes:
        d, m = s["sae"].W_enc.shape
        s.update(x_sum=torch.zeros(d, dtype=torch.float64, device=args.device), n=0,
                 fires=torch.zeros(m, dtype=torch.long, device=args.device), max_act=torch.zeros(m, device=args.device))
    for _, resid in residual_batches(model, saes, args, "eval pass 1 of 2 (means, firing counts)"):
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
        s["sums"] = {k: torch.zeros((), dtype=torch.float64, device=args.device) for k in keys}
    for idx, resid in residual_batches(model, saes, args, "eval pass 2 of 2 (metrics, examples)"):  # {L: [b, T, d]}
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
            if "dash" in s:
                collect_examples(s["dash"], f.view(*resid[L].shape[:2], -1), idx)  # [b, T, m]


def token_ce(logits, target):
    """Next-token cross-entropy of each prediction [b, T-1]."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")


def metrics(s):
    """The metrics from one SAE's sums (formulas in the README)."""
    t, fires = {k: v.item() for k, v in s["sums"].items()}, s["fires"].cpu()
    density = fires.double() / s["n"]
    hist, edges = np.histogram(np.log10(density.numpy() + 1e-10), bins=20, range=(-10, 0))
    spliced = {} if "n_pred" not in t else {  # the language-model metrics: none on --activations
        "ce_clean": t["ce_clean"] / t["n_pred"], "ce_sae": t["ce_sae"] / t["n_pred"], "ce_zero": t["ce_zero"] / t["n_pred"],
        "ce_recovered": (t["ce_zero"] - t["ce_sae"]) / (t["ce_zero"] - t["ce_clean"]),
        "kl": t["kl"] / t["n_pred"]}
    return {
        "layer": s["layer"], "hook_name": f"blocks.{s['layer']}.hook_resid_pre", "d_sae": len(fires),
        "tokens": int(t["n"]),
        "explained_variance": t["ev_token"] / t["n"],             # the seed's per-token form
        "explained_variance_pooled": 1 - t["sse"] / t["sst"],
        "mse": t["sse"] / (t["n"] * len(s["x_mean"])),
        "l1": t["l1"] / t["n"], "l0": t["l0"] / t["n"],
        "cos": t["cos"] / t["n"], "norm_ratio": t["norm_ratio"] / t["n"],
        "alive_pct": 100 * (fires > 0).double().mean().item(), "dead": int((fires == 0).sum()), **spliced,
        "density_histogram": {"log10_edges": edges.tolist(), "counts": hist.tolist()},
        "centered_input": s["center"],
    }

# -----------------------------------------------------------------------------
# Dashboards: every feature's examples, collected in the second pass, and a folder of pages
# beside each SAE: index.html (every feature's density and max) and chunk files of CHUNK features
# each, which the page loads by a script tag the first time one of their features is opened.

INTERVALS = 5    # examples are also grouped by the fifth of the feature's max their peak falls in
PER_INTERVAL = 4  # random examples kept from each interval
WINDOW = (24, 8)  # tokens kept before and after each example's peak (fewer at the context's edges)
BINS = 40         # the activation histogram's bins, from 0 to the feature's max
CHUNK = 256       # features per chunk file: what opening a feature loads (about 1.5 MB)
EMPTY = torch.finfo(torch.float32).max  # the key of an empty slot: any found example beats it, "none" (inf) never


def parse_features(text):
    """--features as a sorted list of numbers (their range is checked once the SAEs are loaded)."""
    try:
        return sorted({int(i) for i in text.split(",")})
    except ValueError:
        raise ValueError(f"--features {text!r}: expected comma-separated feature numbers") from None


def start_examples(s, args, features=None, tokens=True):
    """s["dash"]: for every feature (or only `features`), its activation histogram and, with
    tokens, slots for its examples: a token window around each example's peak, and the
    feature's activations on it. collect_examples fills them in."""
    m, dev = s["sae"].W_enc.shape[1], args.device
    rows = m if features is None else len(features)
    width = WINDOW[0] + 1 + WINDOW[1]
    slots = lambda groups, n: {"key": torch.full((rows, groups, n), EMPTY, device=dev),    # lower is kept
                               "tokens": torch.full((rows, groups, n, width), -1, dtype=torch.int32, device=dev),
                               "acts": torch.zeros(rows, groups, n, width, device=dev)}   # tokens -1: beyond the context
    s["dash"] = {"features": None if features is None else torch.tensor(features, device=dev),
                 "max": s["max_act"] if features is None else s["max_act"][features],
                 "hist": torch.zeros(rows, BINS, dtype=torch.long, device=dev),
                 "generator": torch.Generator(dev).manual_seed(args.seed)}
    if tokens:
        s["dash"]["top"] = slots(1, args.top)                             # the highest peaks
        s["dash"]["intervals"] = slots(INTERVALS, PER_INTERVAL)           # a random few from each fifth


def keep_lowest(kept, key, ctx, pos, idx, acts):
    """Merge candidates into kept, each row of slots keeping its lowest keys. key, ctx (the
    candidate's context in the batch) and pos (its peak's position) are [rows, groups, c]; idx
    [b, T] the token ids; acts [b, T, rows]. Slots are unordered, so only the candidates that get
    in are written, and only their windows cut out: late batches, which change little, cost little."""
    n = kept["key"].shape[2]
    chosen = torch.zeros(*key.shape[:2], n + key.shape[2], dtype=torch.bool, device=key.device)
    chosen.scatter_(2, torch.cat([kept["key"], key], 2).topk(n, 2, largest=False).indices, True)
    out = (~chosen[..., :n]).nonzero(as_tuple=True)  # the slots given up, row by row
    new = chosen[..., n:].nonzero(as_tuple=True)     # the candidates taking them: as many in each row
    t = pos[new][:, None] + torch.arange(-WINDOW[0], WINDOW[1] + 1, device=key.device)  # [e, width] positions
    inside = (t >= 0) & (t < idx.shape[1])
    t, c = t.clamp(0, idx.shape[1] - 1), ctx[new][:, None]
    kept["key"][out] = key[new]
    kept["tokens"][out] = torch.where(inside, idx[c, t], -1).int()
    kept["acts"][out] = torch.where(inside, acts[c, t, new[0][:, None]], 0.0)


def collect_examples(dash, f, idx=None):
    """f [b, T, m]: add every feature's nonzero activations to its histogram and, given the
    contexts' token ids idx [b, T], offer each feature this batch's contexts with its highest
    peaks and a random few from each interval. Beside f, it makes tensors the size of its
    nonzero entries and of [b, m]."""
    acts = f if dash["features"] is None else f[..., dash["features"]]        # [b, T, rows]
    rows, scale = acts.shape[-1], dash["max"].clamp_min(1e-12)
    flat = acts.reshape(-1)
    hit = flat.nonzero().squeeze(1)                                          # [nonzero]: about L0 per token
    row = hit % rows
    bins = (flat[hit] / scale[row] * BINS).long().clamp(max=BINS - 1)
    dash["hist"] += torch.bincount(row * BINS + bins, minlength=rows * BINS).view(rows, BINS)
    if idx is None:
        return  # rows of activations, not contexts: nothing to show them by
    peak, at = acts.max(1)                                                   # [b, rows]: each context's peak, where
    cols, found = torch.arange(rows, device=f.device), peak > 0
    key, ctx = torch.where(found, -peak, math.inf).topk(min(dash["top"]["key"].shape[2], len(peak)), 0, largest=False)
    keep_lowest(dash["top"], key.T[:, None], ctx.T[:, None], at[ctx, cols].T[:, None], idx, acts)  # [rows, 1, c]
    # The interval of a context: q where its peak is in (q/5, (q+1)/5] of the max. In each, the
    # lowest of uniform random keys, kept over all batches, are a uniform sample.
    q = ((peak / scale * INTERVALS).ceil().long() - 1).clamp(0, INTERVALS - 1)
    r = torch.rand(peak.shape, generator=dash["generator"], device=f.device)
    inside = found & (q == torch.arange(INTERVALS, device=f.device)[:, None, None])         # [5, b, rows]
    key, ctx = torch.where(inside, r, math.inf).topk(min(PER_INTERVAL, len(peak)), 1, largest=False)  # [5, c, rows]
    keep_lowest(dash["intervals"], key.permute(2, 0, 1), ctx.permute(2, 0, 1), at[ctx, cols].permute(2, 0, 1), idx, acts)


def dashboard_data(s, model=None, enc=None):
    """(index, chunks): the index page's data (every feature's density and max; the strings of
    the tokens the examples use, most used first, which they name by number), and a generator
    of the chunks (k, {feature: its page}), made one at a time. Without a model, no logits;
    without token contexts collected, no examples."""
    dash, W_dec = s["dash"], s["sae"].W_dec
    m = W_dec.shape[0]
    features = list(range(m)) if dash["features"] is None else dash["features"].tolist()
    kept = [dash[name] for name in ("top", "intervals") if name in dash]
    tok = (lambda t: enc.decode_single_token_bytes(t).decode("utf-8", errors="replace")) if enc else str
    vocab, number = [], None
    if kept:
        ids = torch.cat([k["tokens"].flatten() for k in kept])
        used, counts = ids[ids >= 0].long().unique(return_counts=True)
        used = used[counts.argsort(descending=True, stable=True)]
        number = torch.zeros(int(used.max()) + 1 if len(used) else 1, dtype=torch.long, device=used.device)
        number[used] = torch.arange(len(used), device=used.device)          # token id -> its number in vocab
        number = number.cpu().numpy()
        vocab = [tok(t) for t in used.tolist()]
    index = {"name": s["folder"], "layer": s["layer"], "tokens": s["n"], "contexts": bool(kept), "chunk": CHUNK,
             "density": [float(f"{v:.3g}") for v in (s["fires"].double() / s["n"]).tolist()],
             "max": [round(v, 3) for v in s["max_act"].tolist()],
             "pages": None if dash["features"] is None else features,               # None: every feature has one
             "vocab": vocab}

    def examples(block, c):
        """Row c's examples in each group, best first: [token numbers, activations in thousandths
        of the feature's max (a nonzero one at least 1)]."""
        key, ids, q = (a[c] for a in block)
        return [[[number[ids[g, e][ids[g, e] >= 0]].tolist(), q[g, e][ids[g, e] >= 0].tolist()]
                 for e in np.argsort(key[g], kind="stable") if key[g, e] < EMPTY] for g in range(len(key))]

    def chunks():
        unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        row = {i: j for j, i in enumerate(features)}                             # feature -> its row in dash
        groups = {}
        for i in features:
            groups.setdefault(i // CHUNK, []).append(i)
        for k, feats in groups.items():
            these = torch.tensor(feats, device=W_dec.device)                     # [c] the chunk's features
            j = torch.tensor([row[i] for i in feats], device=W_dec.device)       # [c] their rows in dash
            sims = unit[these] @ unit.T                                          # [c, m] cosines
            sims[torch.arange(len(feats), device=these.device), these] = -2      # not itself
            similar = [t.tolist() for t in sims.topk(min(8, m - 1), 1)]
            hist = dash["hist"][j].tolist()
            if model is not None:
                effect = W_dec[these] @ model.wte.weight.T                       # [c, vocab]: W_dec[i] . W_U
                up, down = [t.tolist() for t in effect.topk(10, 1)], [t.tolist() for t in (-effect).topk(10, 1)]
            if kept:  # each kept tensor's rows of this chunk, on the CPU
                peak = dash["max"][j].clamp_min(1e-12)[:, None, None, None]
                blocks = [(kp["key"][j].cpu().numpy(), kp["tokens"][j].cpu().numpy(),
                           torch.where(kp["acts"][j] > 0, (kp["acts"][j] / peak * 1000).round().clamp_min(1), 0).long().cpu().numpy())
                          for kp in kept]
            pages = {}
            for c, i in enumerate(feats):
                page = {"hist": hist[c], "similar": [[t, round(v, 3)] for v, t in zip(similar[0][c], similar[1][c])]}
                if model is not None:
                    page["up"] = [[tok(t), round(v, 3)] for v, t in zip(up[0][c], up[1][c])]
                    page["down"] = [[tok(t), round(-v, 3)] for v, t in zip(down[0][c], down[1][c])]
                if kept:
                    page["top"], page["intervals"] = examples(blocks[0], c)[0], examples(blocks[1], c)
                pages[i] = page
            yield k, pages

    return index, chunks()


def dashboard_files(s, model=None, enc=None):
    """The dashboard folder's files, (name, text), made one at a time."""
    index, chunks = dashboard_data(s, model, enc)
    yield "index.html", DASHBOARD.replace("__INDEX__", json.dumps(index, separators=(",", ":")).replace("</", "<\\/"))
    m, t0 = len(s["fires"]), time.time()  # tens of seconds at m 24,576 on a CPU: say so as it goes
    for k, pages in chunks:
        yield f"chunk{k}.js", f"DASHBOARD_CHUNK({k}, {json.dumps(pages, separators=(',', ':'))});\n"
        gpt2.progress(f"dashboard of {s['folder']}", min(m, (k + 1) * CHUNK), m, t0, unit="features")
    print(file=sys.stderr)


def write_folder(path, files):
    """Write files (name, text) into a fresh folder path."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for name, text in files:
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)


def replace(tmp, path):
    """Put tmp, a file or a folder, in place of path: a file atomically; a folder by two renames,
    the old one removed only once the new one is in place."""
    if not os.path.isdir(tmp):
        return os.replace(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, path + ".old")
    os.rename(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


DASHBOARD = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>SAE features</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; }
tr.detail td:first-child a { font-weight: bold; }
.ctx { font: 12px ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0; padding: 3px; border-bottom: 1px solid #eee; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #b00; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; }
.bar { display: inline-block; width: 8px; background: #47a; vertical-align: bottom; margin-right: 1px; }
.muted { color: #888; } #search { width: 6em; }
.plot { display: grid; grid-template-columns: auto auto auto; column-gap: 4px; font-size: 12px; }
.yaxis { display: flex; flex-direction: column; justify-content: space-between; text-align: right; }
.ylabel { writing-mode: vertical-rl; transform: rotate(180deg); text-align: center; }
.xaxis { display: flex; justify-content: space-between; }
</style></head><body>
<h1 id="title"></h1>
<p>Find feature <input id="search" type="number" min="0"> <button id="go">show</button>
<span id="note" class="muted"></span></p>
<p id="full"></p>
<div id="feature"></div>
<h2>All features</h2>
<p><button id="prev">&larr;</button> <span id="page"></span> <button id="next">&rarr;</button>
sorted by <select id="sort"><option value="id">number</option><option value="density">density</option>
<option value="max">max activation</option></select>
<span class="muted">bold: has a full page; density = fraction of tokens it fires on</span></p>
<table><thead><tr><th>feature</th><th>log10 density</th><th>max activation</th></tr></thead><tbody id="index"></tbody></table>
<script>
// INDEX: every feature's density and max, and the strings of the tokens its examples name by
// number. Feature i's page is in chunk{floor(i / INDEX.chunk)}.js, which calls DASHBOARD_CHUNK; it is
// loaded by a script tag when one of its features is first opened (file:// pages may not fetch).
const INDEX = __INDEX__;
const CHUNKS = {};
function DASHBOARD_CHUNK(k, pages) { CHUNKS[k] = pages; }
const N = INDEX.density.length, PAGE = 100;
const pages = INDEX.pages === null ? null : new Set(INDEX.pages);
const hasPage = i => pages === null || pages.has(i);
let page = 0, order = [...Array(N).keys()], shown = null;
const el = (tag, attrs = {}, text = "") => { const e = document.createElement(tag); Object.assign(e, attrs); e.textContent = text; return e; };
const log10 = d => d > 0 ? Math.log10(d).toFixed(2) : "dead";

function renderIndex() {
  const body = document.getElementById("index"); body.replaceChildren();
  const count = Math.ceil(N / PAGE);
  page = Math.max(0, Math.min(page, count - 1));
  for (const i of order.slice(page * PAGE, (page + 1) * PAGE)) {
    const tr = el("tr", {className: hasPage(i) ? "detail" : ""});
    const td = el("td"); td.append(el("a", {href: "#f=" + i}, String(i))); tr.append(td);
    tr.append(el("td", {}, log10(INDEX.density[i])), el("td", {}, INDEX.max[i].toFixed(3)));
    body.append(tr);
  }
  document.getElementById("page").textContent = `page ${page + 1} of ${count}`;
}

// One example: [token numbers, activations in thousandths of the feature's max], shaded by activation.
function context([ids, q], max) {
  const div = el("div", {className: "ctx"}), at = q.indexOf(Math.max(...q));
  ids.forEach((t, p) => {
    const s = el("span", {className: "tok" + (p === at ? " peak" : ""), title: (q[p] * max / 1000).toPrecision(3)}, INDEX.vocab[t]);
    if (q[p] > 0) s.style.background = `rgba(255, 120, 0, ${Math.min(1, q[p] / 1000).toFixed(3)})`;
    div.append(s);
  });
  return div;
}

function load(k, then) {
  const s = el("script", {src: `chunk${k}.js`});
  s.onload = then;
  s.onerror = () => { document.getElementById("note").textContent = `cannot load chunk${k}.js: it belongs beside index.html`; };
  document.head.append(s);
}

function renderFeature(i) {
  shown = i;
  const box = document.getElementById("feature"); box.replaceChildren();
  const note = document.getElementById("note"); note.textContent = "";
  if (!(i >= 0 && i < N)) { note.textContent = `no feature ${i} (this SAE has 0..${N - 1})`; return; }
  const max = INDEX.max[i];
  box.append(el("h2", {}, `Feature ${i}`));
  box.append(el("p", {}, `density ${INDEX.density[i].toExponential(3)} (log10 ${log10(INDEX.density[i])}), max activation ${max.toFixed(3)}`));
  if (!hasPage(i)) { note.textContent = `feature ${i} has no full page: rerun with --dashboard alone, or with --features ${i}`; return; }
  const k = Math.floor(i / INDEX.chunk);
  if (!CHUNKS[k]) { box.append(el("p", {className: "muted"}, "loading…")); load(k, () => { if (shown === i) renderFeature(i); }); return; }
  const f = CHUNKS[k][i], cols = el("div", {className: "cols"});
  // The histogram: counts of nonzero activations, in 40 bins from 0 to the feature's max.
  const hist = el("div"); hist.append(el("h3", {}, "Activations (nonzero)"));
  const hmax = Math.max(1, ...f.hist), bars = el("div", {style: "height: 80px"});
  f.hist.forEach(c => bars.append(el("span", {className: "bar", title: String(c), style: `height: ${Math.round(80 * c / hmax)}px`})));
  const yaxis = el("div", {className: "yaxis"}); yaxis.append(el("span", {}, String(hmax)), el("span", {}, "0"));
  const xaxis = el("div", {className: "xaxis"});
  xaxis.append(el("span", {}, "0"), el("span", {}, "activation"), el("span", {}, max.toFixed(3)));
  const plot = el("div", {className: "plot"});
  plot.append(el("div", {className: "ylabel"}, "count"), yaxis, bars, el("div"), el("div"), xaxis);
  hist.append(plot); cols.append(hist);
  for (const [name, list] of [["Raises the logits of", f.up], ["Lowers the logits of", f.down]]) {
    if (!list) continue;  // evaluated without a language model
    const d = el("div"); d.append(el("h3", {}, name));
    list.forEach(([t, v]) => d.append(el("div", {className: "ctx"}, `${JSON.stringify(t)}  ${v}`)));
    cols.append(d);
  }
  const sim = el("div"); sim.append(el("h3", {}, "Closest decoder directions"));
  f.similar.forEach(([j, v]) => { const d = el("div"); d.append(el("a", {href: "#f=" + j}, String(j)), el("span", {}, `  cos ${v}`)); sim.append(d); });
  cols.append(sim); box.append(cols);
  if (!f.top) { box.append(el("p", {className: "muted"}, "No token contexts: this SAE was evaluated on rows of activations.")); return; }
  if (!f.top.length) { box.append(el("p", {className: "muted"}, "No examples: it never fired on these tokens.")); return; }
  box.append(el("h3", {}, "Top activations"));
  f.top.forEach(c => box.append(context(c, max)));
  f.intervals.forEach((examples, q) => {
    if (!examples.length) return;
    box.append(el("h3", {}, `Peak activation in (${q / 5}, ${(q + 1) / 5}] of the max`));
    examples.forEach(c => box.append(context(c, max)));
  });
}

function route() {
  const m = location.hash.match(/^#f=(\d+)$/);
  if (m) { const i = Number(m[1]); page = Math.floor(order.indexOf(i) / PAGE); renderIndex(); renderFeature(i); }  // renderIndex clamps the page
}
const full = document.getElementById("full");
if (INDEX.pages === null) full.append("Every feature has a full page: pick one below, or find it by number.");
else { full.append("Full dashboards: "); INDEX.pages.forEach((i, k) => { if (k) full.append(", "); full.append(el("a", {href: "#f=" + i}, String(i))); }); }
document.getElementById("title").textContent =
  `${INDEX.name}: layer ${INDEX.layer}, ${N} features, ${INDEX.tokens} ${INDEX.contexts ? "tokens" : "activation rows"}`;
document.getElementById("prev").onclick = () => { page = Math.max(0, page - 1); renderIndex(); };
document.getElementById("next").onclick = () => { page = Math.min(Math.ceil(N / PAGE) - 1, page + 1); renderIndex(); };
document.getElementById("go").onclick = () => { location.hash = "f=" + document.getElementById("search").value; };
document.getElementById("search").onkeydown = e => { if (e.key === "Enter") document.getElementById("go").click(); };
document.getElementById("sort").onchange = e => {
  const by = e.target.value;
  order = [...Array(N).keys()];
  if (by !== "id") order.sort((a, b) => INDEX[by][b] - INDEX[by][a]);  // largest first
  page = 0; renderIndex();
};
window.addEventListener("hashchange", route);
renderIndex();
if (location.hash) route(); else renderFeature(INDEX.pages === null ? 0 : INDEX.pages[0]);
</script></body></html>
"""

# -----------------------------------------------------------------------------

COLUMNS = [("sae", "SAE", "{}"), ("layer", "layer", "{}"), ("explained_variance", "var. expl.", "{:.2%}"), ("l1", "L1", "{:.2f}"),
           ("l0", "L0", "{:.2f}"), ("alive_pct", "% alive", "{:.1f}%"), ("ce_sae", "recon. CE", "{:.3f}"),
           ("ce_clean", "clean CE", "{:.3f}"), ("ce_zero", "zero CE", "{:.3f}"), ("ce_recovered", "CE recov.", "{:.2%}"),
           ("kl", "KL", "{:.4f}"), ("explained_variance_pooled", "var. expl. pooled", "{:.2%}"),
           ("mse", "MSE", "{:.4g}"), ("cos", "cos", "{:.4f}"), ("norm_ratio", "|x_hat|/|x|", "{:.3f}"), ("dead", "dead", "{}")]


written = []  # the files this run has written, for the message if it is interrupted


def main(argv=None):
    args = p.parse_args(argv)
    # Every check that can fail comes before the slow work: GPT-2's download and the passes.
    for flag in ("tokens", "ctx", "batch", "top"):
        if getattr(args, flag) < (2 if flag == "ctx" else 1):
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    gpt2.check_device(args.device)
    features = parse_features(args.features) if args.features else []
    if args.weights is not None:
        gpt2.check_weights_path(args.weights)
    enc = gpt2.tokenizer() if args.dashboard and not args.activations else None
    about = train_sae.read_about(args.activations) if args.activations else None  # what the rows are, if known
    saes = []
    for name, folder in find_sae_folders(args.folders, args.cache_dir):
        sae, layer, center = load_sae(folder, gpt2_only=not args.activations)
        if about and about["layer"] != layer:
            raise ValueError(f"{folder}: an SAE of {train_sae.hook_name(layer)}, but {train_sae.about_path(args.activations)} "
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
    if args.activations:  # no language model: the rows are the residuals
        model, d_model = None, train_sae.FileSource(args.activations, center=False, device="cpu").d
    else:
        args.shards = gpt2.corpus(args.data, "eval", args.ctx, args.cache_dir)  # opened once, read by both passes
        model = gpt2.from_pretrained(args.weights, args.cache_dir).to(args.device)
        d_model = model.cfg.n_embd
    for s in saes:
        if model is not None:
            gpt2.check_layers([s["layer"]], model.cfg.n_layer)
        if s["sae"].W_enc.shape[0] != d_model:
            raise ValueError(f"{s['folder']}: an SAE of width {s['sae'].W_enc.shape[0]}, expected "
                             f"{'the rows of ' + args.activations if model is None else 'GPT-2'}'s {d_model}")
        s["sae"] = s["sae"].to(args.device)
    first_pass(model, saes, args)
    n = saes[0]["n"]
    if n < args.tokens:
        print(f"the activation file has only {n:,} rows; evaluated on all of them, of the {args.tokens:,} asked"
              if model is None else f"the held-out split has only {n:,} tokens (in contexts of {args.ctx}); "
              f"evaluated on {n:,} of the {args.tokens:,} asked", file=sys.stderr)
    if args.dashboard:
        for s in saes:
            start_examples(s, args, features or None, tokens=model is not None)
    second_pass(model, saes, args)
    rows, files = [], []  # files: (path, text), written together at the end
    for s in saes:
        result = metrics(s)
        result["settings"] = {"tokens_requested": args.tokens, "ctx": args.ctx, "data": args.data,
                              "activations": args.activations and os.path.abspath(args.activations)}
        files.append((os.path.join(s["folder"], "eval.json"), json.dumps(result, indent=2)))
        rows.append([s["name"]] + [fmt.format(result[key]) if key in result else "—" for key, _, fmt in COLUMNS[1:]])
    # Each dashboard goes to dashboard.tmp/ now, in place of dashboard/ with the other files below.
    dashboards = [os.path.join(s["folder"], "dashboard") for s in saes] if args.dashboard else []
    try:
        for s, path in zip(saes, dashboards):
            write_folder(path + ".tmp", dashboard_files(s, model, enc))
    except BaseException:
        for path in dashboards:
            shutil.rmtree(path + ".tmp", ignore_errors=True)
        raise
    files += [(path, None) for path in dashboards]  # None: written already, to path.tmp
    for path, text in files:
        if text is not None:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
        replace(path + ".tmp", path)  # an interrupted run leaves the old file or folder whole
        written.append(path)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (_, h, _) in enumerate(COLUMNS)]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    print(f"({n:,} {'rows of ' + args.activations if model is None else 'held-out tokens'}; "
          f"eval.json{' and dashboard/' if args.dashboard else ''} written beside each SAE)")
    return saes


if __name__ == "__main__":
    gpt2.stop_on_sigterm()
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        gpt2.exit_interrupted(e, f"wrote only {', '.join(written)}" if written else "nothing was written")
