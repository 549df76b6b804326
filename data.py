"""
Plumbing: the inputs, and the lines that report on reading them. Nothing here knows what an
SAE is. In order: progress lines; files (downloads, atomic writes, safetensors); GPT-2's tokens,
cut into contexts; activation files, and the .json beside each that says what it holds.
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
    """One self-overwriting line on stderr: 12.3 MB, 12.3k tokens, and the time so far. The counts
    are scaled by the total (or by `done`, without one), the rate by itself, so slow progress does
    not show as 0.0."""
    rate = done / max(time.time() - t0, 1e-9)
    (scale, prefix), (rate_scale, rate_prefix) = si_prefix(total or done), si_prefix(rate)
    if len(unit) == 1:
        of = f"/{total / scale:,.1f}" if total else ""
        count, speed = f"{done / scale:,.1f}{of} {prefix}{unit}", f"{rate / rate_scale:.2f} {rate_prefix}{unit}/s"
    else:
        of = f"/{total / scale:,.1f}{prefix}" if total else ""
        count, speed = f"{done / scale:,.1f}{prefix}{of} {unit}", f"{rate / rate_scale:.2f}{rate_prefix} {unit}/s"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    print(f"\r{label}: {count}{share} at {speed}, {duration(time.time() - t0)}  ", end="", file=sys.stderr, flush=True)


class Progress:
    """A progress line redrawn every `every` seconds by a thread, however long the caller's work
    takes between updates (a GPT-2 forward on CPU can take a minute); nothing at all for work done
    within `quiet` seconds. Set .done as work is done; on a normal exit the line is drawn a last
    time and ended (an exception leaves the line to whoever reports it)."""

    def __init__(self, label, total, unit="B", quiet=0.0, every=2.0, on=True):
        self.args, self.done, self.drawn, self.on = (label, total, unit), 0, False, on
        self.every, self.quiet, self.stop = every, quiet, threading.Event()
        self.thread = threading.Thread(target=self.tick, daemon=True)

    def tick(self):
        while not self.stop.wait(self.every if self.drawn or not self.quiet else self.quiet):
            self.draw()

    def draw(self):
        label, total, unit = self.args
        progress(label, self.done, total, self.t0, unit)
        self.drawn = True

    def __enter__(self):
        self.t0 = time.time()
        if not self.on:
            return self
        self.thread.start()
        if not self.quiet:
            self.draw()
        return self

    def __exit__(self, kind, *_):
        self.stop.set()
        if self.on:
            self.thread.join()
        if kind is None and self.drawn:
            self.draw()
            print(file=sys.stderr)


def si_prefix(x):
    """(scale, prefix) that shows x with one to three digits before the point: (1e6, "M")."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return scale, prefix
    return 1, ""


def duration(seconds):
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else
            f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days")

# -----------------------------------------------------------------------------
# Files. Downloads use the standard library only.

def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2_sae")


def download(url, path, size=None, sha256=None, retries=5):
    """Fetch `url` to `path` unless it is there: checks the size (given, or the server's) and the
    SHA-256 when given; resumes a broken transfer from `path + '.part'`, now or on a later call;
    deletes a file that fails a check. Retries only what a retry can mend: not a refusal."""
    if os.path.exists(path):
        return path
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
    """Why the request failed, in one line, when a retry cannot help (no network, no such host,
    nothing listening, the server says no); None when it can (a cut, a timeout, a server error)."""
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
        if r.status == 206:  # a resume: 'Content-Range: bytes START-END/TOTAL'
            total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
        else:  # the whole file, from the start, whatever we asked for
            length = r.headers.get("Content-Length")  # absent when the server streams in chunks
            have, total = 0, int(length) if length else None
        t0, last = time.time(), 0.0
        os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)  # only now: a refusal leaves no folder
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


def replace_folder(tmp, path):
    """Put the complete folder tmp in place of path by two renames, the old one moved aside first
    and deleted last, so that one whole copy always exists."""
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
    """Every tensor of a safetensors file (never a pickle), or one line on a file that is
    truncated or not safetensors at all."""
    with open_safetensors(path):  # reads the header: a truncated file fails there
        return load_file(path)


def safetensors_shapes(path):
    """{name: shape} of a safetensors file's tensors, from its header alone."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


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
# Tokens. A corpus is a list of shards, each a 1-D uint16 array of GPT-2 token ids, memory-
# mapped, in which every document begins with <|endoftext|>. The default is FineWeb-10B in GPT-2
# tokens, as published for modded-nanogpt (kjj0/fineweb10B-gpt2). Bloom trained on OpenWebText,
# which is not published pre-tokenized; nanoGPT's `train.bin` of it loads as a local file.

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
    """GPT-2's tokenizer: tiktoken's, which fetches its two files once, or offline reads them."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' errors when offline, a hash mismatch, an unreadable cache
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        raise ValueError(f"cannot load GPT-2's tokenizer ({type(e).__name__}): with network, tiktoken fetches it "
                         f"once by itself; offline, set TIKTOKEN_CACHE_DIR (now {where or 'unset'}) to a folder "
                         f"holding tiktoken's copies of vocab.bpe and encoder.json, named "
                         f"6d1cbeee0f20b3d9449abfede4726ed8212e3aee and 6c7ea1a7e38e3a7f062df639a5b80947f075ffe6") from None


OFFLINE = "offline, --weights and --data take local files"


def fineweb_shard(split, i, cache_dir=None):
    path = os.path.join(cache_dir or default_cache_dir(), "fineweb10B", f"fineweb_{split}_{i:06d}.bin")
    try:
        return read_shard(download(FINEWEB_URL.format(split, i), path))
    except OSError as e:
        raise OSError(f"{e}; {OFFLINE}") from None


def corpus(source="fineweb", split="train", ctx=128, cache_dir=None):
    """A corpus's shards as functions, for Contexts: FineWeb's, downloaded when the stream reaches
    them, or token files (a list, or --data's string), each checked now, so a bad one fails at
    once. "eval" is FineWeb's validation shard, or the last 1% (at least one) of each file's
    windows, never in "train". Says on stderr what the split holds."""
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
    """Rows of [BOS] + a window of ctx-1 corpus tokens. With a seed, the stream is endless: each
    epoch visits every window once, in an order fixed by (seed, epoch, shard). Without one
    (held-out data), it is one pass in file order. state_dict() is the position."""

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
        """The next n contexts as token ids [n, ctx] (int64); at the end of a single pass, fewer."""
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
# Activation files: rows [N, d] of one hook's activations (.npy or one-tensor .safetensors), and
# beside each a .json (model, hook, layer, d, ...) that labels an SAE trained on them.

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
    """An activation file's rows, memory-mapped, read in order and from the start again at the
    end, as [n, 1, d]; each checked, since a NaN or Inf would surface as a diverged run."""

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
            self.rows = f
            shape, self.read = self.rows.shape, lambda a, b: torch.from_numpy(np.array(self.rows[a:b]))
        else:
            if len(f.keys()) != 1:
                raise ValueError(f"{path}: {len(f.keys())} tensors, expected one [N, d] tensor")
            self.rows = f.get_slice(next(iter(f.keys())))
            shape, self.read = self.rows.get_shape(), lambda a, b: self.rows[a:b]
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"{path}: shape {list(shape)}, expected [N, d] with N > 0")
        dtype = str(self.rows.dtype) if path.endswith(".npy") else self.rows.get_dtype()
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
