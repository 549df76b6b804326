"""
Tests, all on CPU and offline. Run: python -m pytest -q test_sae.py
References are independent of our code: transformers' GPT-2, tiktoken, and closed-form cases.
"""

import http.server
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gpt2

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = gpt2.GPTConfig(block_size=64, vocab_size=50257, n_layer=3, n_head=4, n_embd=64)


def transformers_gpt2(cfg, seed=0):
    """A randomly initialised transformers GPT2LMHeadModel with our config."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(n_positions=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd)
    return GPT2LMHeadModel(hf_cfg).eval()


def write_both_layouts(hf, folder, cfg):
    """transformers' own save (prefix 'transformer.', no buffers) and the published layout
    (no prefix, plus the h.N.attn.bias causal masks). Returns both paths."""
    hf.save_pretrained(folder)
    saved = os.path.join(folder, "model.safetensors")
    published = {k.removeprefix("transformer."): v for k, v in load_file(saved).items()}
    mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size)).view(1, 1, cfg.block_size, cfg.block_size)
    for i in range(cfg.n_layer):
        published[f"h.{i}.attn.bias"] = mask.clone()
    save_file(published, os.path.join(folder, "published.safetensors"))
    return saved, os.path.join(folder, "published.safetensors")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(transformers model, path in transformers' layout, path in the published layout)."""
    hf = transformers_gpt2(SMALL)
    with torch.no_grad():  # larger weights than the 0.02 init, so that errors are not hidden by tiny logits
        for p in hf.parameters():
            p.mul_(5 if p.dim() > 1 else 1)
    return (hf, *write_both_layouts(hf, str(tmp_path_factory.mktemp("small")), SMALL))


def check_against_transformers(hf, path, cfg, tol=1e-4):
    model = gpt2.from_pretrained(path, cfg=cfg)  # cfg None: read the sizes off the file
    cfg = model.cfg
    idx = torch.randint(0, cfg.vocab_size, (2, hf.config.n_positions))
    with torch.no_grad():
        ref = hf(idx, output_hidden_states=True)
        logits = model(idx)
        resid = model.residuals(idx, range(cfg.n_layer + 1))
        final = model.ln_f(resid[cfg.n_layer])  # transformers' last hidden state is after ln_f
    assert ref.logits.abs().max() > 1  # the comparison is not trivially small
    assert (logits - ref.logits).abs().max() < tol
    for L in range(cfg.n_layer):
        assert (resid[L] - ref.hidden_states[L]).abs().max() < tol * ref.hidden_states[L].abs().max(), L
    assert (final - ref.hidden_states[cfg.n_layer]).abs().max() < tol


@pytest.mark.parametrize("layout", [1, 2], ids=["transformers-prefixed", "published"])
def test_matches_transformers(small, layout):
    check_against_transformers(small[0], small[layout], SMALL)


def test_matches_transformers_full_size(tmp_path):
    """The real GPT-2 small shape (124M parameters), published layout, random weights."""
    cfg = gpt2.GPTConfig()
    hf = transformers_gpt2(cfg)
    _, published = write_both_layouts(hf, str(tmp_path), cfg)
    assert len(load_file(published)) == 160  # the count of OpenAI's file
    assert gpt2.from_pretrained(published).cfg == cfg  # the sizes, read off the file
    hf.config.n_positions = 64  # compare on short contexts, to keep the test fast
    check_against_transformers(hf, published, None, tol=1e-4)


def test_check_against_transformers_catches_a_wrong_model(small):
    """The reference test can fail: a model with one weight changed does not pass it."""
    hf, path, _ = small
    weights = load_file(path)
    weights["transformer.h.1.mlp.c_fc.bias"] = weights["transformer.h.1.mlp.c_fc.bias"] + 0.01
    bad = path.replace(".safetensors", "_bad.safetensors")
    save_file(weights, bad)
    with pytest.raises(AssertionError):
        check_against_transformers(hf, bad, SMALL)


def test_stopping_at_a_layer_runs_nothing_later(small):
    model = gpt2.from_pretrained(small[2], cfg=SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 20))
    with torch.no_grad():
        full = model.residuals(idx, range(SMALL.n_layer + 1))

    def forbidden(*args):
        raise AssertionError("a module past the deepest layer ran")
    for L in range(SMALL.n_layer + 1):
        model = gpt2.from_pretrained(small[2], cfg=SMALL)
        for block in model.h[L:]:
            block.forward = forbidden
        model.ln_f.forward = model.lm_head.forward = forbidden
        with torch.no_grad():
            got = model.residuals(idx, [0, L])
        assert torch.equal(got[L], full[L]) and torch.equal(got[0], full[0])


def test_splicing(small):
    hf, path, _ = small
    model = gpt2.from_pretrained(path, cfg=SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (2, 32))
    with torch.no_grad():
        clean = model.token_losses(idx)  # [2, 31]
        logits = hf(idx).logits[:, :-1]
        ref_clean = torch.nn.functional.cross_entropy(logits.transpose(1, 2), idx[:, 1:], reduction="none")
        assert clean.shape == (2, 31) and (clean - ref_clean).abs().max() < 1e-4
        for L in range(SMALL.n_layer + 1):
            assert torch.equal(model.token_losses(idx, L, lambda x: x), clean)
            zeroed = model.token_losses(idx, L, torch.zeros_like)
            # Reference: transformers with the same residual zeroed by a hook.
            where = hf.transformer.h[L] if L < SMALL.n_layer else hf.transformer.ln_f
            hook = where.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),) + args[1:])
            try:
                ref = hf(idx).logits[:, :-1]
            finally:
                hook.remove()
            ref = torch.nn.functional.cross_entropy(ref.transpose(1, 2), idx[:, 1:], reduction="none")
            assert (zeroed - ref).abs().max() < 1e-4
            assert (zeroed - clean).abs().mean() > 0.1


def test_loader_refuses_bad_files(small, tmp_path):
    _, _, path = small
    good = load_file(path)

    def refused(weights, message):
        bad = str(tmp_path / "bad.safetensors")
        save_file(weights, bad)
        with pytest.raises(ValueError, match=message):
            gpt2.from_pretrained(bad, cfg=SMALL)

    refused({k: v for k, v in good.items() if k != "h.1.ln_2.bias"}, "missing tensor h.1.ln_2.bias$")
    refused({**good, "wpe.weight": good["wpe.weight"][:-1].clone()},
            r"tensor wpe.weight has shape \[63, 64\], expected \[64, 64\]$")
    # A Conv1D weight is stored [in, out]: the message gives the file's orientation.
    refused({**good, "h.0.mlp.c_fc.weight": good["h.0.mlp.c_fc.weight"].t().contiguous()},
            r"tensor h.0.mlp.c_fc.weight has shape \[256, 64\], expected \[64, 256\]$")
    refused({**good, "h.0.extra": torch.zeros(3)}, "unexpected tensor h.0.extra$")
    refused({**good, "lm_head.weight": good["wte.weight"] + 1}, "lm_head.weight differs from wte.weight")
    # A checkpoint that stores the tied matrix twice is fine.
    save_file({**good, "lm_head.weight": good["wte.weight"].clone()}, str(tmp_path / "tied.safetensors"))
    gpt2.from_pretrained(str(tmp_path / "tied.safetensors"), cfg=SMALL)
    # Truncated: the header promises more bytes than the file has.
    data = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        gpt2.from_pretrained(str(tmp_path / "cut.safetensors"), cfg=SMALL)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        gpt2.from_pretrained(str(tmp_path / "nope.safetensors"), cfg=SMALL)

# -----------------------------------------------------------------------------
# Downloads, against a real HTTP server on 127.0.0.1 that honours Range requests and can
# cut its first response short.

@pytest.fixture
def server():
    state = {"files": {}, "ranges": [], "cut_first_at": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/redirect/"):  # as Hugging Face sends downloads to its CDN
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/redirect"))
                self.end_headers()
                return
            data = state["files"][self.path]
            rng = self.headers.get("Range")
            state["ranges"].append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if state["cut_first_at"] is not None and len(state["ranges"]) == 1:
                body = body[:state["cut_first_at"]]  # then the connection closes: a broken transfer
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.server_address[1]}"
    yield state
    srv.shutdown()


def test_download_complete(server, tmp_path):
    data = os.urandom(3_000_000)
    server["files"]["/w.bin"] = data
    dest = str(tmp_path / "sub" / "w.bin")
    import hashlib
    gpt2.download(server["url"] + "/w.bin", dest, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert open(dest, "rb").read() == data and not os.path.exists(dest + ".part")
    gpt2.download(server["url"] + "/w.bin", dest)  # cached: no second request
    assert server["ranges"] == [None]


def test_download_cut_midway_resumes(server, tmp_path):
    data = os.urandom(2_500_000)
    server["files"]["/w.bin"] = data
    server["cut_first_at"] = 1_000_000
    dest = str(tmp_path / "w.bin")
    gpt2.download(server["url"] + "/redirect/w.bin", dest, size=len(data))
    assert open(dest, "rb").read() == data
    assert server["ranges"] == [None, "bytes=1000000-"]  # the second request resumed, past the redirect


def test_download_resumes_a_part_left_by_an_earlier_run(server, tmp_path):
    data = os.urandom(1_000_000)
    server["files"]["/w.bin"] = data
    dest = str(tmp_path / "w.bin")
    with open(dest + ".part", "wb") as f:
        f.write(data[:300_000])
    gpt2.download(server["url"] + "/w.bin", dest, size=len(data))
    assert open(dest, "rb").read() == data and server["ranges"] == ["bytes=300000-"]
    # A part that is already whole (killed between the last byte and the rename) is finished.
    dest2 = str(tmp_path / "w2.bin")
    with open(dest2 + ".part", "wb") as f:
        f.write(data)
    gpt2.download(server["url"] + "/w.bin", dest2, size=len(data))
    assert open(dest2, "rb").read() == data and server["ranges"][-1] == "bytes=1000000-"


def test_download_refuses_size_or_hash_mismatch(server, tmp_path):
    data = os.urandom(500_000)
    server["files"]["/w.bin"] = data
    dest = str(tmp_path / "w.bin")
    with pytest.raises(ValueError, match="500,000 bytes, expected 500,001"):
        gpt2.download(server["url"] + "/w.bin", dest, size=len(data) + 1)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        gpt2.download(server["url"] + "/w.bin", dest, sha256="0" * 64)
    assert os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# Tokens


@pytest.fixture(scope="module")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


TEXT = ("The residual stream is the sum of every layer's output.\n\n  Indented line; café, naïve, 東京.\n" * 40
        + "<|endoftext|>" + "A second document, with numbers 12345 and symbols #@!.\n" * 60
        + "<|endoftext|>" + "Third.\n")


def test_text_round_trips(tmp_path, enc, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    tokens = gpt2.read_shard(str(tmp_path / "a.txt"), str(tmp_path / "cache"))
    assert tokens[0] == gpt2.BOS and enc.decode(tokens.tolist()) == "<|endoftext|>" + TEXT
    assert tokens.tolist() == [gpt2.BOS] + enc.encode(TEXT, allowed_special={"<|endoftext|>"})
    assert (tokens == gpt2.BOS).sum() == 3  # one before each document
    # A large file is read in pieces; the tokens still decode to the text exactly.
    monkeypatch.setattr(gpt2, "TEXT_PIECE_CHARS", 100)
    (tmp_path / "b.txt").write_text(TEXT, encoding="utf-8")
    pieces = gpt2.read_shard(str(tmp_path / "b.txt"), str(tmp_path / "cache"))
    assert enc.decode(pieces.tolist()) == "<|endoftext|>" + TEXT and (pieces == gpt2.BOS).sum() == 3


def test_shard_formats_read_back(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 10_000).astype(np.uint16)
    gpt2.write_shard(str(tmp_path / "headered.bin"), tokens)
    tokens.tofile(tmp_path / "raw.bin")  # nanoGPT's train.bin layout
    np.save(tmp_path / "a.npy", tokens)
    for name in ("headered.bin", "raw.bin", "a.npy"):
        assert np.array_equal(gpt2.read_shard(str(tmp_path / name)), tokens), name
    assert isinstance(gpt2.read_shard(str(tmp_path / "headered.bin")), np.memmap)
    with open(tmp_path / "headered.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(ValueError, match="for the 10,000 tokens its header declares"):
        gpt2.read_shard(str(tmp_path / "headered.bin"))
    np.save(tmp_path / "wide.npy", tokens.astype(np.int32))
    with pytest.raises(ValueError, match="int32 array of shape .* expected 1-D uint16"):
        gpt2.read_shard(str(tmp_path / "wide.npy"))


def shard_files(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i, n in enumerate(sizes):
        a = rng.integers(0, 50000, n).astype(np.uint16)
        gpt2.write_shard(str(tmp_path / f"s{i}.bin"), a)
        paths.append(str(tmp_path / f"s{i}.bin"))
        arrays.append(a)
    return paths, arrays


def test_contexts_cover_the_corpus_once_per_epoch(tmp_path):
    ctx = 16
    paths, arrays = shard_files(tmp_path, [15 * 50 + 7, 15 * 30])
    stream = gpt2.Contexts(gpt2.corpus(paths, "train", ctx), ctx, seed=1)
    # Each file holds back its last max(1, 1%) windows: one here.
    train_windows = {a[w * 15:(w + 1) * 15].tobytes() for a in arrays for w in range(len(a) // 15 - 1)}
    n_train = 49 + 29
    rows = stream.next(n_train)
    assert rows.shape == (n_train, ctx) and (rows[:, 0] == gpt2.BOS).all()
    seen = [r[1:].numpy().astype(np.uint16).tobytes() for r in rows]
    assert len(set(seen)) == n_train and set(seen) == train_windows
    assert stream.state_dict()["epoch"] == 1
    again = stream.next(n_train)  # epoch 1: the same windows in another order
    assert sorted(r[1:].numpy().tobytes() for r in again) == sorted(r[1:].numpy().tobytes() for r in rows)
    assert not torch.equal(again, rows)
    # The held-out windows are the last of each file, and none of them is served for training.
    held = gpt2.Contexts(gpt2.corpus(paths, "eval", ctx), ctx)
    heldout = held.next(100)
    assert len(heldout) == 2 and len(held.next(5)) == 0
    assert torch.equal(heldout[0, 1:], torch.from_numpy(arrays[0][49 * 15:50 * 15].astype(np.int64)))
    assert not {r[1:].numpy().astype(np.uint16).tobytes() for r in heldout} & set(seen)


def test_contexts_are_deterministic_and_resume(tmp_path):
    paths, _ = shard_files(tmp_path, [2000, 1000, 1500])
    make = lambda seed: gpt2.Contexts(gpt2.corpus(paths, "train", 32), 32, seed=seed)
    a, b, c = make(0), make(0), make(1)
    first = a.next(40)
    assert torch.equal(first, b.next(40)) and not torch.equal(first, c.next(40))
    # Save mid-stream, run on across shard and epoch boundaries, then restore into a new stream.
    state = a.state_dict()
    later = [a.next(37) for _ in range(6)]
    resumed = make(0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.next(37)) for x in later)
    with pytest.raises(ValueError, match="seed 0 .* expected 1"):
        make(1).load_state_dict(state)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    gpt2.write_shard(str(tmp_path / "t.bin"), np.full(500, 60000, np.uint16))
    with pytest.raises(ValueError, match="token id 60000 in the corpus, expected < 50257"):
        gpt2.Contexts(gpt2.corpus(str(tmp_path / "t.bin"), "train", 16), 16, seed=0).next(2)

# -----------------------------------------------------------------------------
# Bad input on the command line: one line, non-zero exit, no traceback.


def run_cli(*args, cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr.strip()


@pytest.mark.parametrize("args, message", [
    (["train_sae.py", "--layer", "13"], "error: layer 13 out of range: expected 0..12"),
    (["train_sae.py", "--layer", "nine"], "error: --layer 'nine': expected a number"),
    (["train_sae.py", "--data", "missing.txt"], "error: token file not found: missing.txt"),
    (["gpt2.py", "--data", "{tmp}/latin1.txt"], "not UTF-8 text"),
    (["gpt2.py", "--data", "{tmp}/empty.txt"], "error: empty corpus"),
    (["train_sae.py", "--data", "{tmp}/empty.txt", "--out", "{tmp}/run"], "error: empty corpus"),
    (["gpt2.py", "--data", "{tmp}/a.bin", "--weights", "{tmp}/missing.safetensors"],
     "error: weights file not found"),
])
def test_bad_input_gets_one_line(tmp_path, args, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    gpt2.write_shard(str(tmp_path / "a.bin"), np.arange(1000, dtype=np.uint16))
    code, err = run_cli(*[a.format(tmp=tmp_path) for a in args], cache=tmp_path / "cache")
    assert code != 0 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
