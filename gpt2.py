"""
GPT-2 small in plain PyTorch, loaded from OpenAI's published weights: everything the SAE
trainer and the evaluation need from the language model.

1. the model, with parameter names equal to the published file's;
2. residuals at any layer under TransformerLens names: layer L is `blocks.L.hook_resid_pre`,
   the input to block L (L = 0..11), and L = 12 is the output of the last block, before ln_f;
3. per-token cross-entropy, clean or with the residual at one layer replaced (splicing);
4. loading OpenAI's `model.safetensors` (downloaded once; never a pickle), published or saved
   by transformers' `save_pretrained`;
5. the SAEs' inputs: residuals over a stream of contexts, for the buffer or an activation file.

`python gpt2.py` prints the clean model's cross-entropy on held-out tokens: a quick check
that the weights and the data are right (about 3.3 nats at context 128).
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import runs

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
    try:
        path = path or data.download(GPT2_URL, os.path.join(cache_dir or data.default_cache_dir(), "gpt2",
                                                            "model.safetensors"), size=GPT2_SIZE, sha256=GPT2_SHA256)
    except OSError as e:
        raise OSError(f"{e}; {data.OFFLINE}") from None
    tensors = read_weights(path)
    model = GPT(cfg or config_of({k: t.shape for k, t in tensors.items()}, path))
    copy_weights(model, tensors, path)
    n = sum(p.numel() for p in model.parameters())  # wte counted once: the unembedding is tied to it
    print(f"GPT-2 weights: {path} ({os.path.getsize(path) / 1e6:,.0f} MB, {n / 1e6:,.1f}M parameters, "
          f"{model.cfg.n_layer} layers, d {model.cfg.n_embd})", file=sys.stderr)
    return model.eval()


def read_weights(path):
    """The tensors of a published-layout (or transformers `save_pretrained`) safetensors file,
    under our names: no `transformer.` prefix, no causal-mask buffers, no separate lm_head."""
    data.check_weights_path(path)
    tensors = {}
    for key, t in data.load_safetensors(path).items():
        name = key.removeprefix("transformer.")  # transformers' save_pretrained adds it
        if not name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers: constants
            tensors[name] = t
    if "lm_head.weight" in tensors:  # some writers store the tied matrix twice
        if not torch.equal(tensors.pop("lm_head.weight"), tensors.get("wte.weight")):
            raise ValueError(f"{path}: lm_head.weight differs from wte.weight; expected them tied")
    return tensors


def config_of(shapes, path):
    """The sizes that a checkpoint's tensor shapes {name: shape} imply (every GPT-2's heads are 64 wide)."""
    for name in ("wte.weight", "wpe.weight"):
        if name not in shapes:
            raise ValueError(f"{path}: missing tensor {name}")
    (vocab_size, n_embd), block_size = shapes["wte.weight"], shapes["wpe.weight"][0]
    n_layer = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("h.")), default=-1)
    return GPTConfig(block_size, vocab_size, n_layer, max(1, n_embd // 64), n_embd)


def read_config(path=None):
    """The sizes of the GPT-2 in a weights file, read from its header alone, so that settings can
    be checked against them before the slow load; OpenAI's GPT-2 small's without a file."""
    if path is None:
        return GPTConfig()
    with data.open_safetensors(path) as f:
        return config_of({k.removeprefix("transformer."): f.get_slice(k).get_shape() for k in f.keys()}, path)


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
# The SAEs' inputs: residuals of GPT-2 forwards over a stream of contexts, served to the
# training buffer, or written to an activation file.

class ResidualSource:
    """The next n residuals at each of `layers`, keeping those in `keep`; one forward, stopped at the
    deepest layer, serves all. Rows come in stream order whatever n is asked: GPT-2 runs on rounds of
    `batch` contexts per rank (share: this rank's; gather: every rank's rows, as one process has them),
    and the rows a call leaves are the next call's. state_dict() and load_state_dict() are the place."""

    def __init__(self, model, stream, layers, keep, batch, center, exclude_bos, autocast, device,
                 ranks=1, share=lambda idx: idx, gather=lambda x: x):
        self.stream, self.layers, self.batch = stream, layers, batch
        self.keep = [layers.index(L) for L in keep]
        self.center, self.exclude_bos, self.autocast, self.device = center, exclude_bos, autocast, device
        self.ranks, self.share, self.gather = ranks, share, gather
        self.forward, self.d = model.residuals, model.cfg.n_embd
        self.round_rows = batch * ranks * (stream.ctx - exclude_bos)
        self.spare, self.round_start = torch.zeros(0, len(keep), self.d, device=device), stream.state_dict()

    @torch.no_grad()
    def round(self):
        """One round: [batch * ranks * rows per context, kept layers, d], every rank's forward."""
        idx = self.share(self.stream.next(self.batch * self.ranks)).to(self.device)  # [batch, ctx]
        with self.autocast():
            resid = self.forward(idx, self.layers)                           # {L: [batch, ctx, d]}
        x = torch.stack([resid[L] for L in self.layers], dim=2).float()      # [batch, ctx, layers, d]
        x = self.gather(x[:, int(self.exclude_bos):].flatten(0, 1))[:, self.keep]  # [round_rows, kept, d]
        return x - x.mean(-1, keepdim=True) if self.center else x

    def next(self, n, progress=lambda rows: None):
        """[n, kept layers, d]; progress(rows ready) after each round. An interruption leaves the position."""
        parts, start, position = [self.spare], self.round_start, self.stream.state_dict()
        try:
            while sum(map(len, parts)) < n:
                start = self.stream.state_dict()
                parts.append(self.round())
                progress(min(n, sum(map(len, parts))))
        except BaseException:
            self.stream.load_state_dict(position)
            raise
        rows = torch.cat(parts)
        self.spare, self.round_start = rows[n:], start
        return rows[:n]

    def state_dict(self):  # where the last round began and how many of its rows are served, if not all
        left = len(self.spare)
        return ({"stream": self.round_start, "served": self.round_rows - left} if left else
                {"stream": self.stream.state_dict(), "served": 0})

    def load_state_dict(self, state):
        state = state if "stream" in state else {"stream": state, "served": 0}  # a checkpoint from before rounds
        self.stream.load_state_dict(state["stream"])
        self.spare, self.round_start = self.round()[state["served"]:] if state["served"] else self.spare[:0], state["stream"]


def write_activations(path, source, n, chunk, about):
    """--save_activations: n rows of source (a ResidualSource of one layer, or a FileSource) to the
    .npy `path`, chunk rows at a time, and `about` to the .json beside it (data.read_about reads
    it). Both appear once complete; an interruption deletes the partial file."""
    tmp, t0 = path + ".tmp.npy", time.time()
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, source.d))  # [N, d] on disk
    try:
        with data.progress_line(f"residuals of {about['hook_name']}", n, "tokens") as shown:
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                out[a:b] = source.next(b - a, lambda rows: setattr(shown, "done", a + rows))[:, 0].cpu().numpy()
                shown.done = b
        out.flush()
    except BaseException:  # a partial file cannot be resumed: do not leave gigabytes of it behind
        os.remove(tmp)
        raise
    finally:
        del out  # closes the memory map
    os.replace(tmp, path)
    data.write_atomically(data.about_path(path), json.dumps(about, indent=2))
    print(f"wrote {n:,} x {source.d} activations of {about['hook_name']} to {path} in "
          f"{data.duration(time.time() - t0)}, described in {data.about_path(path)}")

# -----------------------------------------------------------------------------
# `python gpt2.py`

def main(argv=None):
    p = argparse.ArgumentParser(description="Cross-entropy of GPT-2 on held-out tokens.", formatter_class=runs.HelpFormatter)
    runs.add_input_flags(p)  # --data, --weights, --cache_dir, --device, --ctx
    p.add_argument("--tokens", type=int, default=1 << 18, help="held-out tokens to score")
    p.add_argument("--batch", type=int, default=32, help="contexts per forward")
    args = p.parse_args(argv)
    runs.check_inputs(args, "tokens", "batch")
    stream = data.Contexts(data.corpus(args.data, "eval", args.ctx, args.cache_dir), args.ctx)
    idx = stream.next(args.batch)  # read the data before the model, so bad data fails fast
    model = from_pretrained(args.weights, args.cache_dir).to(args.device)
    total, count, tokens = 0.0, 0, 0
    with torch.no_grad(), data.progress_line("scoring held-out tokens", args.tokens, "tokens") as shown:
        while len(idx) and tokens < args.tokens:
            losses = model.token_losses(idx.to(args.device))  # [batch, ctx-1]
            total, count, tokens = total + losses.sum().item(), count + losses.numel(), tokens + idx.numel()
            shown.done = tokens
            idx = stream.next(args.batch)  # [batch, ctx]; empty at the end of the held-out split
    if tokens < args.tokens:
        print(f"the held-out split has only {tokens:,} tokens (in contexts of {args.ctx}); "
              f"evaluated on {tokens:,} of the {args.tokens:,} asked", file=sys.stderr)
    print(f"clean cross-entropy: {total / count:.4f} nats/token over {count:,} predictions")


if __name__ == "__main__":
    runs.command_line(main, lambda: "stopped before the result")
