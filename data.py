"""
Plumbing for the inputs, knowing nothing of SAEs: progress lines; files (downloads, atomic writes,
safetensors); GPT-2's tokens, cut into contexts; activation files, and the .json beside each.
"""

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from functools import partial

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

# -----------------------------------------------------------------------------
# Progress lines.

def progress(label, done, total, t0, unit="B"):
    """One self-overwriting line on stderr. The rate is scaled by itself, not the total: slow progress never shows 0.0."""
    rate = done / max(time.time() - t0, 1e-9)
    (scale, prefix), (rate_scale, rate_prefix) = si_prefix(total or done), si_prefix(rate)
    word = len(unit) > 1  # a word leaves the prefix on each number (12.3k/50.0k tokens), a symbol takes it (12.3 MB)
    num, rate_num = (prefix, rate_prefix) if word else ("", "")
    sym, rate_sym = ("", "") if word else (prefix, rate_prefix)
    of = f"/{total / scale:,.1f}{num}" if total else ""
    count = f"{done / scale:,.1f}{num}{of} {sym}{unit}"
    speed = f"{rate / rate_scale:.2f}{rate_num} {rate_sym}{unit}/s"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    print(f"\r{label}: {count}{share} at {speed}, {duration(time.time() - t0)}  ", end="", file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_line(label, total, unit="B", quiet=0.0, every=2.0):
    """A line a thread redraws every `every` seconds however long the caller's work between updates (a GPT-2
    forward on CPU can take a minute), once `quiet` seconds have passed. The caller sets .done; a normal exit ends it."""
    shown, stop = types.SimpleNamespace(done=0, total=total, t0=time.time(), drawn=False), threading.Event()

    def draw():
        progress(label, shown.done, total, shown.t0, unit)
        shown.drawn = True

    def redraw():
        while not stop.wait(every if shown.drawn or not quiet else quiet):
            draw()
    shown.draw, thread = draw, threading.Thread(target=redraw, daemon=True)
    thread.start()
    if not quiet:
        draw()
    try:
        yield shown
    finally:
        stop.set()
        thread.join()
    if shown.drawn:
        draw()
        print(file=sys.stderr)


def si_prefix(x):
    """(scale, prefix) that shows x with one to three digits before the point: (1e6, "M")."""
    return next(((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if x >= s), (1, ""))


def duration(seconds):
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else
            f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days")

# -----------------------------------------------------------------------------
# Files. Downloads use the standard library only.

def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2_sae")


def download(url, path, size=None, sha256=None, retries=5):
    """Fetch `url` to `path` unless it is there, resuming from `path + '.part'`; a size or SHA-256 mismatch deletes it."""
    if os.path.exists(path):
        return path
    part, name = path + ".part", os.path.basename(path)
    resume = lambda: f"; run again to resume from {part}" if os.path.exists(part) else ""
    tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
    for attempt in range(retries + 1):
        try:
            total = fetch_rest(url, part, name)
            if total is None or os.path.getsize(part) >= total:
                break
            print(f"\n{name}: the server closed early; resuming", file=sys.stderr)
        except (OSError, http.client.HTTPException) as e:  # refused, timed out, or cut mid-body
            if why := lasting_failure(url, e):
                raise OSError(why + resume()) from None
            if attempt == retries:
                raise OSError(f"download of {url} failed ({e}) after {tries}{resume()}") from None
            print(f"\n{name}: transfer broke ({e}); resuming", file=sys.stderr)
            time.sleep(min(2 ** attempt - 1, 30))
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
    """Why the request failed when a retry cannot help (no network, no such host, nothing listening, a 4xx)."""
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


def fetch_rest(url, part, name):
    """Append to `part` what the server has beyond its length; the full size (None if not said)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing beyond `have`: the part is complete (or longer than the file)
            return int(e.headers.get("Content-Range", "*/0").rsplit("/", 1)[1])
        raise
    with r:
        resumed = r.status == 206  # 'Content-Range: bytes START-END/TOTAL'; else the whole file, whatever we asked for
        size = r.headers["Content-Range"].rsplit("/", 1)[1] if resumed else r.headers.get("Content-Length")
        have, total = have if resumed else 0, int(size) if size else None  # no Content-Length: streamed in chunks
        os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)  # only now: a refusal leaves no folder
        with open(part, "ab" if have else "wb") as f, progress_line(name, total, every=0.5) as shown:
            shown.done = have
            while chunk := r.read(1 << 20):
                f.write(chunk)
                shown.done += len(chunk)
    return total


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def replace_folder(tmp, path):
    """Put the complete folder tmp in place of path: the old one moved aside first, deleted last."""
    shutil.rmtree(path + ".old", ignore_errors=True)  # left by a crash in an earlier call
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def check_weights_path(path):
    if os.path.isdir(path):
        raise IsADirectoryError(f"--weights {path} is a directory, expected a model.safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")


def read_json(path):
    """A JSON file's object, or one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:  # a JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: a JSON {type(value).__name__}, expected an object")
    return value


def write_atomically(path, text):
    """Write text to path through a temporary file: a kill leaves the old file or the new one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def load_safetensors(path):
    """Every tensor of a safetensors file (never a pickle); one line on a truncated or foreign file."""
    with open_safetensors(path):  # reads the header: a truncated file fails there
        return load_file(path)


@contextlib.contextmanager
def open_safetensors(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e})") from None

# -----------------------------------------------------------------------------
# Tokens. A shard is a memory-mapped 1-D uint16 array of GPT-2 token ids; every document begins with BOS.

BOS = 50256  # <|endoftext|>: GPT-2's only special token, used as beginning-of-sequence
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # llm.c / modded-nanogpt header
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/fineweb_{}_{:06d}.bin"
FINEWEB_TRAIN_SHARDS = range(1, 104)
OFFLINE = "offline, --weights and --data take local files"  # what a failed download adds
TEXT_PIECE_CHARS = 1 << 22  # text is tokenized in pieces of about this many characters


def read_shard(path, cache_dir=None):
    """A .bin (llm.c's header, or raw as nanoGPT writes), .npy or .txt (tokenized once) as a uint16 memmap."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    if path.endswith(".txt"):
        return read_shard(tokenize_text(path, cache_dir))
    if path.endswith(".npy"):
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, EOFError) as e:  # truncated, or empty
            raise ValueError(f"{path}: not a complete .npy file ({e})") from None
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
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())
    os.replace(path + ".tmp", path)


def tokenize_text(path, cache_dir=None):
    """The path of a UTF-8 text file's cached shard, tokenized in pieces (so size is no limit) if new."""
    st, name = os.stat(path), os.path.basename(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir or default_cache_dir(), "tokens", f"{name}.{key}.bin")
    if os.path.exists(out):
        return out
    enc, pieces = tokenizer(), [np.array([BOS], np.uint16)]
    try:  # no progress line for a quick file
        with open(path, encoding="utf-8", newline="") as f, progress_line(f"tokenizing {name}", st.st_size, quiet=1) as line:
            while text := f.read(TEXT_PIECE_CHARS):
                text += f.readline()  # no word or separator is cut (blank lines may be: decoding is unchanged)
                pieces.append(np.array(enc.encode(text, allowed_special={"<|endoftext|>"}), np.uint16))
                line.done += len(text.encode())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    os.makedirs(os.path.dirname(out), exist_ok=True)  # only now: a failure leaves no empty folder
    write_shard(out, np.concatenate(pieces))
    return out


def tokenizer():
    """GPT-2's tokenizer: tiktoken's, which fetches its two files once, or offline reads them."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' errors when offline, a hash mismatch, an unreadable cache
        raise ValueError(f"cannot load GPT-2's tokenizer ({type(e).__name__}): with network, tiktoken fetches it once by "
                         f"itself; offline, set TIKTOKEN_CACHE_DIR (now {os.environ.get('TIKTOKEN_CACHE_DIR') or 'unset'}) "
                         f"to a folder holding tiktoken's copies of vocab.bpe and encoder.json, named "
                         f"6d1cbeee0f20b3d9449abfede4726ed8212e3aee and 6c7ea1a7e38e3a7f062df639a5b80947f075ffe6") from None


def fineweb_shard(split, i, cache_dir=None):
    path = os.path.join(cache_dir or default_cache_dir(), "fineweb10B", f"fineweb_{split}_{i:06d}.bin")
    try:
        return read_shard(download(FINEWEB_URL.format(split, i), path))
    except OSError as e:
        raise OSError(f"{e}; {OFFLINE}") from None


def corpus(source="fineweb", split="train", ctx=128, cache_dir=None):
    """Shards as functions, for Contexts: FineWeb's, fetched when the stream reaches them, or token files (a list,
    or --data's string), each checked now. "eval" is FineWeb's validation shard or each file's last 1% of windows."""
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r}, expected 'train' or 'eval'")
    what = "held-out" if split == "eval" else "training"
    if source == "fineweb":
        shards = [("val", 0)] if split == "eval" else [("train", i) for i in FINEWEB_TRAIN_SHARDS]
        print(f"{what} tokens: FineWeb-10B, {len(shards)} shard{'s' * (len(shards) > 1)} of about 100M tokens, "
              f"each downloaded (200 MB) when the stream reaches it", file=sys.stderr)
        return [partial(fineweb_shard, s, i, cache_dir) for s, i in shards]
    paths = source.split(",") if isinstance(source, str) else list(source)
    n = sum(len(local_split(p, split, ctx, cache_dir)) // (ctx - 1) for p in paths)  # contexts
    if n == 0:
        raise ValueError(f"empty corpus: no file holds a context of {ctx - 1} tokens")
    print(f"{what} tokens: {len(paths)} file{'s' * (len(paths) > 1)}, {n:,} contexts of {ctx} ({n * ctx:,} tokens, "
          f"BOS included)", file=sys.stderr)
    return [partial(local_split, p, split, ctx, cache_dir) for p in paths]


def local_split(path, split, ctx, cache_dir):
    tokens = read_shard(path, cache_dir)
    n_windows = len(tokens) // (ctx - 1)
    cut = max(0, n_windows - max(1, n_windows // 100)) * (ctx - 1)  # where the held-out windows start
    return tokens[cut:] if split == "eval" else tokens[:cut]


class Contexts:
    """Rows of [BOS] + a window of ctx-1 tokens of corpus()'s shards (it refuses an empty corpus). With a seed,
    endless: each epoch visits every window once, in an order fixed by (seed, epoch, shard); else one pass."""

    def __init__(self, shards, ctx=128, seed=None, vocab_size=50257):
        self.shards, self.ctx, self.seed, self.vocab_size = shards, ctx, seed, vocab_size
        self.epoch, self.shard, self.pos = 0, 0, 0  # the position: the next window to serve
        self.opened = None  # (epoch, shard, tokens, window order) of the shard being read

    def next(self, n):
        """The next n contexts as token ids [n, ctx] (int64); at the end of a single pass, fewer."""
        rows = [np.zeros((0, self.ctx - 1), np.uint16)]
        while n and (self.seed is not None or self.epoch == 0):
            if self.opened is None or self.opened[:2] != (self.epoch, self.shard):
                tokens = self.shards[self.shard]()
                n_windows = len(tokens) // (self.ctx - 1)
                order = (np.arange(n_windows) if self.seed is None else
                         np.random.default_rng([self.seed, self.epoch, self.shard]).permutation(n_windows))
                self.opened = (self.epoch, self.shard, tokens, order)
            tokens, order = self.opened[2:]
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
# Activation files: [N, d] rows of one hook (.npy, or one-tensor .safetensors), and the .json beside each.

def hook_name(layer):
    return f"blocks.{layer}.hook_resid_pre"


def about_path(path):
    return os.path.splitext(path)[0] + ".json"


def read_about(path):
    """The activation file's .json as a dict, or None when it has none."""
    if not os.path.isfile(about_path(path)):
        return None
    about = read_json(about_path(path))
    missing = [k for k in ("model", "hook_name", "layer", "d") if k not in about]
    if missing:
        raise ValueError(f"{about_path(path)}: no {missing[0]!r}; expected the .json --save_activations writes")
    return about


class FileSource:
    """An activation file's rows as [n, 1, d], memory-mapped, in a loop; checked: a NaN would surface as a diverged run."""

    def __init__(self, path, center, device):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"activations file not found: {path}")
        if not path.endswith((".npy", ".safetensors")):
            raise ValueError(f"{path}: expected a .npy or .safetensors file of activations")
        try:  # a truncated or empty file fails here, on its header
            f = np.load(path, mmap_mode="r") if path.endswith(".npy") else safe_open(path, framework="pt")
        except (ValueError, EOFError, SafetensorError) as e:
            raise ValueError(f"{path}: not a complete {os.path.splitext(path)[1]} file ({e})") from None
        if path.endswith(".npy"):
            shape, dtype, self.read = f.shape, str(f.dtype), lambda a, b: torch.from_numpy(np.array(f[a:b]))
        elif len(f.keys()) != 1:
            raise ValueError(f"{path}: {len(f.keys())} tensors, expected one [N, d] tensor")
        else:
            self.rows = f.get_slice(next(iter(f.keys())))
            shape, dtype, self.read = self.rows.get_shape(), self.rows.get_dtype(), lambda a, b: self.rows[a:b]
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"{path}: shape {list(shape)}, expected [N, d] with N > 0")
        if dtype not in ("float16", "float32", "float64", "F16", "BF16", "F32", "F64"):
            raise ValueError(f"{path}: {dtype} rows, expected floating-point activations")
        self.n, self.d = shape
        about = read_about(path)
        if about and about["d"] != self.d:
            raise ValueError(f"{path}: rows of width {self.d}, but {about_path(path)} says d {about['d']}")
        self.path, self.center, self.device, self.pos = path, center, device, 0

    def next(self, n, progress=None):  # reading is fast: no progress to show
        parts, pos = [], self.pos  # self.pos moves at the end: an interruption leaves it
        while n:
            take = min(n, self.n - pos)
            part = self.read(pos, pos + take)                                # [take, d]
            bad = (~torch.isfinite(part).all(1)).nonzero()
            if len(bad):
                raise ValueError(f"{self.path}: row {pos + bad[0].item():,} is not finite (NaN or Inf); "
                                 f"expected finite activations")
            parts.append(part)
            pos, n = (pos + take) % self.n, n - take
        self.pos = pos
        x = torch.cat(parts).to(self.device, torch.float32)[:, None]       # [n, 1, d]
        return x - x.mean(-1, keepdim=True) if self.center else x

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]
