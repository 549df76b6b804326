"""
Feature dashboards: every feature's examples, collected during eval.py's second pass, and a
folder of pages beside each SAE that opens from disk (no server, no network):

    dashboard/index.html   the page (templates/dashboard.html) with every feature's density and
                           largest activation, and the strings of the tokens the examples use
    dashboard/chunkK.js    the pages of features CHUNK K .. CHUNK (K + 1) - 1, which index.html
                           loads by a script tag when one of them is first opened

A feature's page: its top-activating contexts, a few random examples from each fifth of its
largest activation, a histogram of its activations, the tokens whose logits it raises and
lowers most, and the features with the closest decoder directions.
"""

import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

import data

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "dashboard.html")
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
    with open(TEMPLATE, encoding="utf-8") as f:
        page = f.read()
    yield "index.html", page.replace("__INDEX__", json.dumps(index, separators=(",", ":")).replace("</", "<\\/"))
    m, t0 = len(s["fires"]), time.time()  # tens of seconds at m 24,576 on a CPU: say so as it goes
    for k, pages in chunks:
        yield f"chunk{k}.js", f"DASHBOARD_CHUNK({k}, {json.dumps(pages, separators=(',', ':'))});\n"
        data.progress(f"dashboard of {s['folder']}", min(m, (k + 1) * CHUNK), m, t0, unit="features")
    print(file=sys.stderr)


def write_folder(path, files):
    """Write files (name, text) into a fresh folder path."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    for name, text in files:
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)


def write_dashboards(saes, model=None, enc=None):
    """Each SAE's dashboard, written to FOLDER/dashboard.tmp/ (all or none of them: an
    interruption removes what was written); returns the dashboard/ paths, for data.replace_folder."""
    paths = [os.path.join(s["folder"], "dashboard") for s in saes]
    try:
        for s, path in zip(saes, paths):
            write_folder(path + ".tmp", dashboard_files(s, model, enc))
    except BaseException:
        for path in paths:
            shutil.rmtree(path + ".tmp", ignore_errors=True)
        raise
    return paths
