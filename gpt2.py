"""
GPT-2 small in plain PyTorch, loaded from OpenAI's published weights, and the token stream
that feeds it. Everything the SAE trainer and the evaluation need from the language model:

1. the model, with parameter names equal to the published file's;
2. residuals at any layer under TransformerLens names: layer L is `blocks.L.hook_resid_pre`,
   the input to block L (L = 0..11), and L = 12 is the output of the last block, before ln_f;
3. per-token cross-entropy, clean or with the residual at one layer replaced (splicing);
4. downloading and loading OpenAI's `model.safetensors` (never a pickle);
5. tokens: a pre-tokenized public corpus, or local .txt / .bin / .npy files, cut into
   contexts of 128 tokens that each begin with <|endoftext|>.

`python gpt2.py` prints the clean model's cross-entropy on held-out tokens: a quick check
that the weights and the data are right (about 3.3 nats at context 128).
"""

import argparse
import errno
import hashlib
import http.client
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The model. Names follow the published checkpoint (wte, wpe, h.N.attn.c_attn, ...),
# so loading is a near one-to-one copy.

@dataclass
class GPTConfig:
    block_size: int = 1024   # longest context (rows of wpe)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v packed, as in the file
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):  # x [B, T, d]
        B, T, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # each [B, T, d]
        # [B, T, d] -> [B, n_head, T, head_size]
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        # On CUDA in bf16 this dispatches to flash attention; the mask is implicit.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, n_head, T, head_size]
        return self.c_proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):  # [B, T, d]
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form drifts.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x):  # [B, T, d]: the residual stream, read and written by each block
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: GPT-2 unembeds with its embedding matrix

    def embed(self, idx):  # idx [B, T] token ids -> [B, T, d], the residual before block 0
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"context of {T} tokens, expected at most {self.cfg.block_size}")
        return self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))

    def residuals(self, idx, layers):
        """{L: blocks.L.hook_resid_pre [B, T, d]} for each L in `layers`, one forward pass.
        Stops after the deepest layer asked for: no later blocks, no ln_f, no unembedding."""
        layers = check_layers(layers, self.cfg.n_layer)
        x, out = self.embed(idx), {}
        for L in range(max(layers) + 1):
            if L in layers:
                out[L] = x
            if L < max(layers):
                x = self.h[L](x)
        return out

    def forward(self, idx, layer=None, replace=None):
        """Logits [B, T, vocab]. With `layer` and `replace`, the residual at that layer is
        swapped for replace(residual) before the rest of the model reads it (splicing)."""
        if layer is None:
            return self.logits_from(self.embed(idx), 0)
        return self.logits_from(replace(self.residuals(idx, [layer])[layer]), layer)

    def logits_from(self, x, layer):
        """Logits [B, T, vocab] from the residual x [B, T, d] at `layer`: the blocks from there
        on, ln_f and the unembedding. With residuals(), one clean forward serves many splices."""
        for block in self.h[layer:]:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def token_losses(self, idx, layer=None, replace=None):
        """Cross-entropy of each next-token prediction [B, T-1], clean or spliced (see forward)."""
        logits = self.forward(idx, layer, replace)[:, :-1].float()  # [B, T-1, vocab]
        return F.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")


def check_layers(layers, n_layer):
    """Layers as a sorted list; each must be a resid_pre index 0..n_layer."""
    layers = sorted(set(int(L) for L in layers))
    if not layers:
        raise ValueError(f"no layer given: expected at least one of 0..{n_layer}")
    for L in layers:
        if not 0 <= L <= n_layer:
            raise ValueError(f"layer {L} out of range: expected 0..{n_layer} "
                             f"(blocks.L.hook_resid_pre, and {n_layer} for the final residual)")
    return layers


def parse_layers(text, n_layer=12):
    """'9', '3,7,9' or 'all' (the inputs of all n_layer blocks) as a sorted list."""
    if text == "all":
        return list(range(n_layer))
    try:
        layers = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--layer {text!r}: expected a number, a comma-separated list, or 'all'") from None
    return check_layers(layers, n_layer)


# -----------------------------------------------------------------------------
# Downloads: to a temporary file that is renamed only once complete and checked, resumed
# with an HTTP Range request when a transfer breaks. Standard library only.

def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2_sae")


def progress(label, done, total, t0, unit="B"):
    """One self-overwriting status line on stderr, in a readable scale: a symbol such as "B"
    takes the prefix (kB, MB, GB); a word such as "tokens" follows it (12.3k tokens). The scale
    of the counts comes from the total (or from `done` when the total is unknown), the rate's
    from the rate, so that slow progress does not show as 0.0."""
    rate = done / max(time.time() - t0, 1e-9)
    (scale, prefix), (rate_scale, rate_prefix) = si_prefix(total or done), si_prefix(rate)
    if len(unit) == 1:
        of = f"/{total / scale:,.1f}" if total else ""
        count, speed = f"{done / scale:,.1f}{of} {prefix}{unit}", f"{rate / rate_scale:.2f} {rate_prefix}{unit}/s"
    else:
        of = f"/{total / scale:,.1f}{prefix}" if total else ""
        count, speed = f"{done / scale:,.1f}{prefix}{of} {unit}", f"{rate / rate_scale:.2f}{rate_prefix} {unit}/s"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    print(f"\r{label}: {count}{share} at {speed}  ", end="", file=sys.stderr, flush=True)


def si_prefix(x):
    """(scale, prefix) that shows x with one to three digits before the point: (1e6, "M")."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return scale, prefix
    return 1, ""


def download(url, path, size=None, sha256=None, retries=5):
    """Fetch `url` to `path` unless it is already there. Checks the size (given, or else the
    server's), and the SHA-256 when given. A broken transfer is resumed from `path + '.part'`,
    here or on a later call; a file that fails a check is deleted, never renamed into place.
    Only failures that a retry can mend are retried: not a missing network or a refusal."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part, name = path + ".part", os.path.basename(path)
    resume = lambda: f"; run again to resume from {part}" if os.path.exists(part) else ""
    tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
    for attempt in range(retries + 1):
        try:
            total = fetch_rest(url, part, name)
        except (OSError, http.client.HTTPException) as e:  # refused, timed out, or cut mid-body
            why = lasting_failure(url, e)
            if why:
                raise OSError(why + resume()) from None
            if attempt == retries:
                raise OSError(f"download of {url} failed ({e}) after {tries}{resume()}") from None
            print(f"\n{name}: transfer broke ({e}); resuming", file=sys.stderr)
            time.sleep(min(2 ** attempt - 1, 30))
            continue
        if total is None or os.path.getsize(part) >= total:
            break
        print(f"\n{name}: the server closed early; resuming", file=sys.stderr)
    else:
        raise OSError(f"download of {url} is incomplete after {tries}{resume()}")
    got, want = os.path.getsize(part), size or total
    problem = (f"{got:,} bytes, expected {want:,}" if want is not None and got != want else
               f"SHA-256 differs from {sha256}" if sha256 and file_sha256(part) != sha256 else None)
    if problem:
        os.remove(part)
        raise ValueError(f"{url}: {problem}; deleted the download")
    os.replace(part, path)
    return path


def lasting_failure(url, e):
    """Why the request failed, in one line, when retrying in a few seconds cannot help (no
    network, no such host, nothing listening, the server says no); None when it can (a
    transfer cut mid-body, a timeout, a server error)."""
    host = urllib.parse.urlsplit(url).hostname
    if isinstance(e, urllib.error.HTTPError):
        return None if e.code >= 500 or e.code == 429 else f"download of {url} failed: HTTP {e.code} {e.reason}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, socket.gaierror):
        return f"cannot reach {host}: name resolution failed (no network?)"
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot reach {host}: connection refused"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return f"cannot reach {host}: {reason.strerror} (no network?)"
    return None


def fetch_rest(url, part, name):
    """Append to `part` what the server has beyond its current length; return the full size
    (None when the server does not say)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing beyond `have`: the part is complete (or longer than the file)
            return int(e.headers.get("Content-Range", "*/0").rsplit("/", 1)[1])
        raise
    with r:
        if r.status == 206:  # a resume: 'Content-Range: bytes START-END/TOTAL'
            total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
        else:  # the whole file, from the start, whatever we asked for
            length = r.headers.get("Content-Length")  # absent when the server streams in chunks
            have, total = 0, int(length) if length else None
        t0, last = time.time(), 0.0
        with open(part, "ab" if have else "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                have += len(chunk)
                if time.time() - last > 0.5:
                    progress(name, have, total, t0)
                    last = time.time()
    progress(name, have, total, t0)
    print(file=sys.stderr)
    return total


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()

# -----------------------------------------------------------------------------
# OpenAI's weights. The published file holds the model under the names above, except that
# the four Conv1D weights per block are stored [in, out], the 12 `attn.bias` causal-mask
# buffers ride along, and the unembedding is implicit (tied to wte).

GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors"
GPT2_SIZE = 548_105_171
GPT2_SHA256 = "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_pretrained(path=None, cache_dir=None, cfg=None):
    """GPT-2 from a local `model.safetensors`, or OpenAI's GPT-2 small (downloaded once, then
    cached). Without `cfg`, the sizes are read off the file (any GPT-2: small to XL); with
    one, the file must match it exactly. Says on stderr what it loaded."""
    if path is None:
        path = download(GPT2_URL, os.path.join(cache_dir or default_cache_dir(), "gpt2", "model.safetensors"),
                        size=GPT2_SIZE, sha256=GPT2_SHA256)
    tensors = read_weights(path)
    model = GPT(cfg or config_of(tensors, path))
    copy_weights(model, tensors, path)
    n = sum(p.numel() for p in model.parameters())  # wte counted once: the unembedding is tied to it
    print(f"GPT-2 weights: {path} ({os.path.getsize(path) / 1e6:,.0f} MB, {n / 1e6:,.1f}M parameters, "
          f"{model.cfg.n_layer} layers, d {model.cfg.n_embd})", file=sys.stderr)
    return model.eval()


def check_device(device):
    """Refuse a device torch cannot use here, before any slow work."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")


def check_weights_path(path):
    """Refuse a weights path that is missing or a directory, before any slow work."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--weights {path} is a directory, expected a model.safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")


def load_safetensors(path):
    """Every tensor of a safetensors file (never a pickle), or one line on a file that is
    truncated or not safetensors at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return load_file(path)  # reads the header first: a truncated file fails there
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e})") from None


def read_weights(path):
    """The tensors of a published-layout (or transformers `save_pretrained`) safetensors file,
    under our names: no `transformer.` prefix, no causal-mask buffers, no separate lm_head."""
    check_weights_path(path)
    tensors = {}
    for key, t in load_safetensors(path).items():
        name = key.removeprefix("transformer.")  # transformers' save_pretrained adds it
        if not name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers: constants
            tensors[name] = t
    if "lm_head.weight" in tensors:  # some writers store the tied matrix twice
        if not torch.equal(tensors.pop("lm_head.weight"), tensors.get("wte.weight")):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight; expected them tied")
    return tensors


def config_of(tensors, path):
    """The sizes a checkpoint implies. Every GPT-2 has heads of 64 dimensions."""
    for name in ("wte.weight", "wpe.weight"):
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name}")
    (vocab_size, n_embd), block_size = tensors["wte.weight"].shape, tensors["wpe.weight"].shape[0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in tensors if k.startswith("h.")), default=-1)
    return GPTConfig(block_size, vocab_size, n_layer, max(1, n_embd // 64), n_embd)


def copy_weights(model, tensors, path):
    """Copy tensors into model, transposing the Conv1D weights. Refuses a missing, extra or
    misshapen tensor with one line naming the first one."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, param in expected.items():
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name}")
        t = tensors[name].t() if name.endswith(CONV1D) else tensors[name]
        if t.shape != param.shape:
            shape = list(tensors[name].shape)
            want = list(param.shape)[::-1] if name.endswith(CONV1D) else list(param.shape)
            raise ValueError(f"{path}: tensor {name} has shape {shape}, expected {want}")
        tensors[name] = t
    for name in tensors:
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])
    return model

# -----------------------------------------------------------------------------
# Tokens. A corpus is a list of shards, each a 1-D uint16 array of GPT-2 token ids in which
# every document begins with <|endoftext|>. Arrays are memory-mapped, never read whole.
#
# The default corpus is FineWeb-10B in GPT-2 tokens, as published for modded-nanogpt
# (kjj0/fineweb10B-gpt2): 103 training shards of 100M tokens and one validation shard.
# Bloom's SAEs were trained on OpenWebText, which is not published pre-tokenized in a form
# these packages read; cross-entropies differ slightly between the corpora. nanoGPT's own
# OpenWebText `train.bin` / `val.bin` (raw uint16) load as local files.

BOS = 50256  # <|endoftext|>: GPT-2's only special token, used as beginning-of-sequence
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c / modded-nanogpt header
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{}_{:06d}.bin"
FINEWEB_TRAIN_SHARDS = range(1, 104)
TEXT_PIECE_CHARS = 1 << 22  # text is tokenized in pieces of about this many characters


def read_shard(path, cache_dir=None):
    """A .bin (with the llm.c header, or raw uint16 as nanoGPT writes), .npy or .txt file as a
    memory-mapped uint16 array. A .txt is tokenized once into a cached .bin."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    if path.endswith(".txt"):
        return read_shard(tokenize_text(path, cache_dir))
    if path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise ValueError(f"{path}: {tokens.dtype} array of shape {tokens.shape}, expected 1-D uint16")
        return tokens
    if not path.endswith(".bin"):
        raise ValueError(f"{path}: unknown token file type, expected .txt, .bin or .npy")
    nbytes = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=3) if nbytes >= 4 * HEADER_INTS else None
    # Raw uint16 cannot start with the magic: as two tokens it reads 54856, beyond the vocabulary.
    if header is not None and header[0] == SHARD_MAGIC:
        if header[1] != SHARD_VERSION:
            raise ValueError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
        n = int(header[2])
        if nbytes != 4 * HEADER_INTS + 2 * n:
            raise ValueError(f"{path}: {nbytes:,} bytes, expected {4 * HEADER_INTS + 2 * n:,} "
                             f"for the {n:,} tokens its header declares")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n,))
    if nbytes % 2:
        raise ValueError(f"{path}: odd size {nbytes:,} bytes, expected uint16 tokens")
    return np.memmap(path, dtype=np.uint16, mode="r") if nbytes else np.zeros(0, np.uint16)


def write_shard(path, tokens):
    """Write tokens as an llm.c-format shard, atomically."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    os.replace(path + ".tmp", path)


def tokenize_text(path, cache_dir=None):
    """Tokenize a UTF-8 text file, in which documents are separated by <|endoftext|>, into a
    cached shard; return the shard's path. Reads in pieces, with progress, so size is no limit."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir or default_cache_dir(), "tokens", f"{os.path.basename(path)}.{key}.bin")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    enc = tokenizer()
    pieces, done, t0, last = [np.array([BOS], np.uint16)], 0, time.time(), time.time()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while text := f.read(TEXT_PIECE_CHARS):
                # End the piece at a line end, so that no word or separator is cut. (A run of
                # blank lines across the cut can split into other tokens; decoding is unchanged.)
                text += f.readline()
                pieces.append(np.array(enc.encode(text, allowed_special={"<|endoftext|>"}), np.uint16))
                done += len(text.encode())
                if time.time() - last > 1:
                    progress(f"tokenizing {os.path.basename(path)}", done, st.st_size, t0)
                    last = time.time()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    if time.time() - t0 > 1:
        print(file=sys.stderr)
    write_shard(out, np.concatenate(pieces))
    return out


def tokenizer():
    """GPT-2's tokenizer. tiktoken fetches its two files once and caches them; offline it
    needs them in TIKTOKEN_CACHE_DIR, under the SHA-1s of the URLs it would fetch them from."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' errors when offline, a hash mismatch, an unreadable cache
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        raise ValueError(f"cannot load GPT-2's tokenizer ({type(e).__name__}): with network, tiktoken fetches it "
                         f"once by itself; offline, set TIKTOKEN_CACHE_DIR (now {where or 'unset'}) to a folder "
                         f"holding tiktoken's copies of vocab.bpe and encoder.json, named "
                         f"6d1cbeee0f20b3d9449abfede4726ed8212e3aee and 6c7ea1a7e38e3a7f062df639a5b80947f075ffe6") from None


def fineweb_shard(split, i, cache_dir=None):
    name = f"fineweb_{split}_{i:06d}.bin"
    path = os.path.join(cache_dir or default_cache_dir(), "fineweb10B", name)
    return read_shard(download(FINEWEB_URL.format(split, i), path))


def corpus(source="fineweb", split="train", ctx=128, cache_dir=None):
    """The shards of a corpus as zero-argument functions, for Contexts. `source` is "fineweb",
    whose shards are downloaded only when the stream reaches them, or local token files: a list,
    or a string of comma-separated paths (the --data flag's form), each opened and checked now
    (a .txt is tokenized now, once), so that a bad file fails at once, not when the stream
    reaches it. Says on stderr what the split holds.
    The held-out "eval" split is FineWeb's validation shard, or else the last 1% of each
    file's windows (at least one), so it never overlaps "train"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}, expected 'train' or 'eval'")
    what = "held-out" if split == "eval" else "training"
    if source == "fineweb":
        shards = [("val", 0)] if split == "eval" else [("train", i) for i in FINEWEB_TRAIN_SHARDS]
        print(f"{what} tokens: FineWeb-10B, {len(shards)} shard{'s' * (len(shards) > 1)} of about 100M tokens, "
              f"each downloaded (200 MB) when the stream reaches it", file=sys.stderr)
        return [partial(fineweb_shard, s, i, cache_dir) for s, i in shards]
    paths = source.split(",") if isinstance(source, str) else list(source)
    sizes = [len(local_split(p, split, ctx, cache_dir)) for p in paths]
    if sum(n // (ctx - 1) for n in sizes) == 0:
        raise ValueError(f"empty corpus: no file holds a context of {ctx - 1} tokens")
    print(f"{what} tokens: {len(paths)} file{'s' * (len(paths) > 1)}, {sum(sizes):,} tokens", file=sys.stderr)
    return [partial(local_split, p, split, ctx, cache_dir) for p in paths]


def local_split(path, split, ctx, cache_dir):
    tokens = read_shard(path, cache_dir)
    n_windows = len(tokens) // (ctx - 1)
    cut = max(0, n_windows - max(1, n_windows // 100)) * (ctx - 1)  # where the held-out windows start
    return tokens[cut:] if split == "eval" else tokens[:cut]


class Contexts:
    """Rows of [BOS] + the next ctx-1 corpus tokens. Each shard is cut into windows of ctx-1
    tokens. With a seed, the stream is endless: each epoch visits every window once, in an
    order fixed by (seed, epoch, shard). Without one (held-out data), it is one pass in file
    order. state_dict() / load_state_dict() save and restore the position."""

    def __init__(self, shards, ctx=128, seed=None, vocab_size=50257):
        if not shards:
            raise ValueError("empty corpus: no token files given")
        self.shards, self.ctx, self.seed, self.vocab_size = shards, ctx, seed, vocab_size
        self.epoch, self.shard, self.pos = 0, 0, 0  # the position: the next window to serve
        self.opened = None  # (epoch, shard, tokens, window order) of the shard being read

    def windows(self):
        if self.opened is None or self.opened[:2] != (self.epoch, self.shard):
            tokens = self.shards[self.shard]()
            n = len(tokens) // (self.ctx - 1)
            order = (np.arange(n) if self.seed is None else
                     np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(n))
            self.opened = (self.epoch, self.shard, tokens, order)
        return self.opened[2], self.opened[3]

    def next(self, n):
        """The next n contexts as token ids [n, ctx] (int64). A single pass returns fewer at
        its end, then none."""
        rows, empty_shards = [np.zeros((0, self.ctx - 1), np.uint16)], 0
        while n and (self.seed is not None or self.epoch == 0):
            tokens, order = self.windows()
            empty_shards = empty_shards + 1 if len(order) == 0 else 0
            if empty_shards == len(self.shards):
                raise ValueError(f"empty corpus: no file holds a context of {self.ctx - 1} tokens")
            take = order[self.pos:self.pos + n]  # window numbers
            idx = take[:, None] * (self.ctx - 1) + np.arange(self.ctx - 1)  # [k, ctx-1] token offsets
            rows.append(np.asarray(tokens[idx]))  # a gather from the memory map
            self.pos, n = self.pos + len(take), n - len(take)
            if self.pos == len(order):  # this shard is used up: on to the next, or the next epoch
                self.shard, self.pos = self.shard + 1, 0
                if self.shard == len(self.shards):
                    self.epoch, self.shard = self.epoch + 1, 0
        body = torch.from_numpy(np.concatenate(rows).astype(np.int64))  # [n, ctx-1]
        if len(body) and body.max() >= self.vocab_size:
            raise ValueError(f"token id {int(body.max())} in the corpus, expected < {self.vocab_size}")
        return torch.cat([torch.full((len(body), 1), BOS), body], dim=1)  # [n, ctx]

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos, "seed": self.seed, "ctx": self.ctx}

    def load_state_dict(self, state):
        if (state["seed"], state["ctx"]) != (self.seed, self.ctx):
            raise ValueError(f"saved stream has seed {state['seed']} and context {state['ctx']}, "
                             f"expected {self.seed} and {self.ctx}")
        self.epoch, self.shard, self.pos = state["epoch"], state["shard"], state["pos"]

# -----------------------------------------------------------------------------
# `python gpt2.py`: the clean model's cross-entropy on held-out tokens. And what the three
# command lines (gpt2.py, train_sae.py, eval.py) share: their --help, and how they stop.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None and "": such flags say in their help what they
    do without a value, and "(default: None)" would only repeat it less clearly."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def stop_on_sigterm():
    """Make SIGTERM stop the program as Ctrl-C does, with a KeyboardInterrupt that carries
    the signal's number."""
    def handler(signum, frame):
        raise KeyboardInterrupt(signum)
    signal.signal(signal.SIGTERM, handler)


def exit_interrupted(e, what):
    """End on a KeyboardInterrupt with one line and the shell's status for the signal, 128 + its
    number: 130 for Ctrl-C, 143 for SIGTERM."""
    signum = e.args[0] if e.args else signal.SIGINT
    print(f"\ninterrupted ({signal.Signals(signum).name}); {what}", file=sys.stderr)
    sys.exit(128 + signum)


def main(argv=None):
    p = argparse.ArgumentParser(description="Cross-entropy of GPT-2 small on held-out tokens.",
                                formatter_class=HelpFormatter)
    p.add_argument("--weights", default=None, help="local model.safetensors (default: download OpenAI's)")
    p.add_argument("--data", default="fineweb", help="'fineweb', or token files (.txt, .bin, .npy), comma-separated")
    p.add_argument("--tokens", type=int, default=1 << 18, help="held-out tokens to score")
    p.add_argument("--ctx", type=int, default=128, help="context length, BOS included")
    p.add_argument("--batch", type=int, default=32, help="contexts per forward")
    p.add_argument("--cache_dir", default=None, help=f"downloads go here (default: {default_cache_dir()})")
    args = p.parse_args(argv)
    for flag in ("tokens", "ctx", "batch"):
        if getattr(args, flag) < (2 if flag == "ctx" else 1):
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.weights is not None:
        check_weights_path(args.weights)
    stream = Contexts(corpus(args.data, "eval", args.ctx, args.cache_dir), args.ctx)
    idx = stream.next(args.batch)  # read the data before the model, so bad data fails fast
    model = from_pretrained(args.weights, args.cache_dir).to(device)
    total, count, tokens, t0 = 0.0, 0, 0, time.time()
    with torch.no_grad():
        while len(idx) and tokens < args.tokens:
            losses = model.token_losses(idx.to(device))  # [batch, ctx-1]
            total, count, tokens = total + losses.sum().item(), count + losses.numel(), tokens + idx.numel()
            progress("scoring held-out tokens", tokens, args.tokens, t0, unit="tokens")
            idx = stream.next(args.batch)  # [batch, ctx]; empty at the end of the held-out split
    print(file=sys.stderr)
    if tokens < args.tokens:
        print(f"the held-out split has only {tokens:,} tokens (in contexts of {args.ctx}); "
              f"evaluated on {tokens:,} of the {args.tokens:,} asked", file=sys.stderr)
    print(f"clean cross-entropy: {total / count:.4f} nats/token over {count:,} predictions")


if __name__ == "__main__":
    stop_on_sigterm()
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        exit_interrupted(e, "stopped before the result")
