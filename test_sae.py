"""
Tests, all on CPU and offline. Run: python -m pytest -q test_sae.py
References are independent of our code: transformers' GPT-2, tiktoken, float64 computations
written out here, and closed-form cases. The Triton kernels run under Triton's interpreter.
One section per file, in the README's reading order: train_sae.py, kernels.py, gpt2.py, eval.py,
dashboard.py, data.py, runs.py; then .ci/run.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when kernels are defined: before triton is imported
# One thread per process (here and in the processes the tests start): the tensors are small, and
# on a busy machine torch's spinning worker threads made the suite 1.6 times slower (8 min 50 s
# against 5 min 38 s beside two busy processes on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import functools
import http.server
import json
import math
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dashboard
import data
import eval as evaluation  # "eval" would shadow the builtin
import gpt2
import gpu_check
import kernels
import runs
import train_sae

version = lambda v: tuple(int(part) for part in v.split(".")[:2])  # noqa: E731
if kernels.triton and version(kernels.triton.__version__) < (3, 7) and version(np.__version__) >= (2, 4):
    pytest.exit("Triton 3.6's interpreter, which the kernel tests run on, breaks with numpy >= 2.4: "
                "pip install 'numpy<2.4' (or Triton >= 3.7)", returncode=1)

# Fixtures and helpers that several sections use.

HERE = os.path.dirname(os.path.abspath(__file__))


def transformers_gpt2(cfg, seed=0):
    """A randomly initialised transformers GPT2LMHeadModel with our config."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf_cfg = GPT2Config(n_positions=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd)
    return GPT2LMHeadModel(hf_cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT-2 (3 layers, d 64) in transformers' layout and a token file."""
    folder = tmp_path_factory.mktemp("tiny")
    hf = transformers_gpt2(gpt2.GPTConfig(block_size=16, n_layer=3, n_head=1, n_embd=64))
    hf.save_pretrained(str(folder))
    data.write_shard(str(folder / "tokens.bin"), np.random.default_rng(0).integers(0, 50257, 60_000).astype(np.uint16))
    return str(folder / "model.safetensors"), str(folder / "tokens.bin")


def tiny_args(tiny, out, *extra, steps=40):
    weights, tokens = tiny
    return ["--weights", weights, "--data", tokens, "--out", str(out), "--d_sae", "64", "--batch", "64",
            "--tokens", str(64 * steps), "--buffer", "512", "--ctx", "16", "--gpt2_batch", "8", "--lr_warmup", "5",
            "--dead_tokens", str(8 * 64), "--density_window", "4", "--log_every", "4", "--device", "cpu", *extra]


def sae_weights(folder):
    return load_file(os.path.join(folder, "sae_weights.safetensors"))


def random_sae(d=12, m=40, seed=0):
    sae = train_sae.SAE(d, m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases away from zero, so that every term is exercised
        sae.b_enc.copy_(0.3 * torch.randn(m, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(d, generator=g))
        sae.W_enc.mul_(1 + torch.rand(d, m, generator=g))
    return sae


def close(got, ref, tol):
    """Relative error in the norm, against a float64 reference."""
    return (got.double() - ref).norm() <= tol * ref.norm() + 1e-12


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args, signal_after_checkpoint=None):
    """train_sae.py in a subprocess; optionally sent a signal as soon as a checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "train_sae.py", *args], cwd=HERE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if signal_after_checkpoint:
        out = args[args.index("--out") + 1]
        while not os.path.exists(os.path.join(out, "checkpoint.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.005)
        proc.send_signal(signal_after_checkpoint)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def write_sae_folder(folder, weights, layer, center, apply_b_dec=True, arch="standard"):
    """A SAELens-format folder written by hand, with the flat pre-6.0 cfg.json of Bloom's releases
    (and SAELens 6's architecture and k, for topk and jumprelu)."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "sae_weights.safetensors"))
    d, m = weights["W_enc"].shape
    cfg = {"architecture": "standard", "d_in": d, "d_sae": m, "activation_fn_str": "relu", "activation_fn_kwargs": {},
           "apply_b_dec_to_input": apply_b_dec, "finetuning_scaling_factor": False, "context_size": 16,
           "model_name": "gpt2", "hook_name": f"blocks.{layer}.hook_resid_pre", "hook_layer": layer,
           "hook_head_index": None, "prepend_bos": True, "dataset_path": "Skylion007/openwebtext",
           "normalize_activations": "none", "dtype": "float32", "device": "cpu",
           "model_from_pretrained_kwargs": {"center_writing_weights": center}}
    cfg.update({"architecture": arch, **({"k": TOPK} if arch == "topk" else {})})
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return folder


TOPK = 8  # the k of hand-written topk folders


def eval_args(tiny, *folders, tokens=10 ** 6):
    return [*map(str, folders), "--weights", tiny[0], "--data", tiny[1], "--ctx", "16", "--batch", "7",
            "--tokens", str(tokens), "--device", "cpu"]


def random_sae_weights(d, m, seed):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, m, generator=g) / d ** 0.5, "b_enc": -0.5 * torch.rand(m, generator=g),
            "W_dec": torch.randn(m, d, generator=g) / d ** 0.5, "b_dec": 0.1 * torch.randn(d, generator=g)}


# -----------------------------------------------------------------------------
# train_sae.py: the losses and their gradients against float64, init, the decoder constraint, dead
# features, TopK and BatchTopK, and the SAEs a run writes.


def reference_loss(P, x, l1_coef, dead, convention):
    """The loss in float64 from the formulas alone: plain autograd, no custom backward."""
    x = x.double()
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
    f = torch.relu(pre)
    x_hat = f @ P["W_dec"] + P["b_dec"]

    def mse(a, b):
        if convention == "seed":
            return ((a - b) ** 2 / x.norm(dim=1, keepdim=True)).mean()
        return ((a - b) ** 2).sum(1).mean()
    rec = mse(x_hat, x)
    l1 = l1_coef * (f.sum(1).mean() if convention == "seed" else (f * P["W_dec"].norm(dim=1)).sum(1).mean())
    loss = rec + l1
    if dead is not None:
        r = (x - x_hat).detach()
        g = torch.exp(pre[:, dead]) @ P["W_dec"][dead]
        g = g * (r.norm(dim=1, keepdim=True) / (2 * g.norm(dim=1, keepdim=True))).detach()
        ghost = mse(g, r)
        loss = loss + ghost * (rec / ghost).detach()
    return loss


def against_float64(sae, loss, x, dead, convention):
    """Backpropagate `loss` and the float64 reference; the reference loss, and each parameter
    gradient's relative error."""
    loss.backward()
    P = {k: v.detach().double().requires_grad_() for k, v in sae.named_parameters()}
    ref = reference_loss(P, x, 1e-2, dead, convention)
    ref.backward()
    return ref.item(), {name: ((param.grad.double() - P[name].grad).norm() / P[name].grad.norm()).item()
                        for name, param in sae.named_parameters()}


@pytest.mark.parametrize("convention", ["seed", "saelens"])
@pytest.mark.parametrize("dead, long_dead", [(None, False), ([3, 7, 20, 21], False), ([3, 7, 20, 21], True)],
                         ids=["no-dead", "dead", "long-dead"])
def test_loss_and_gradients_match_float64(convention, dead, long_dead):
    sae = random_sae()
    x = 2 * torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    dead_idx = None if dead is None else torch.tensor(dead)
    if long_dead:  # pre-activations near -100: exp underflows float32 unless handled
        with torch.no_grad():
            sae.b_enc[dead_idx] = -100 - torch.arange(4.0)
    loss, parts, fires, _ = train_sae.sae_loss(sae, x, 1e-2, dead_idx, convention)
    ref, errors = against_float64(sae, loss, x, dead_idx, convention)
    assert abs(loss.item() - ref) < 1e-5 * abs(ref)
    if dead is not None:  # the ghost term is rescaled to the MSE's value
        assert abs(parts["ghost"].item() - parts["mse"].item()) < 1e-6 * parts["mse"].item()
    assert 0 < fires.sum() < 16 * 40  # some features on, some off
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("convention", ["seed", "saelens"])
def test_bf16_autocast_gradients(convention):
    """The precision CUDA runs in by default, here through CPU autocast: the same code path
    (custom backward included) must give the float64 gradients to bf16 accuracy."""
    sae = random_sae(d=64, m=256)
    x = 2 * torch.randn(128, 64, generator=torch.Generator().manual_seed(5))
    dead = torch.arange(0, 256, 9)
    with torch.autocast("cpu", torch.bfloat16):
        loss, _, _, _ = train_sae.sae_loss(sae, x, 1e-2, dead, convention)
    ref, errors = against_float64(sae, loss, x, dead, convention)
    assert abs(loss.item() - ref) < 2e-2 * abs(ref)
    assert all(param.grad.dtype == torch.float32 for param in sae.parameters())
    assert max(errors.values()) < 2e-2, errors  # measured 2e-3 to 5e-3


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    sae = random_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    W, G = sae.W_dec.detach().double(), sae.W_dec.grad.double()
    expected = G - (G * W).sum(1, keepdim=True) * W / (W * W).sum(1, keepdim=True)  # rows are unit already
    train_sae.remove_parallel_grad(sae)
    assert (sae.W_dec.grad.double() - expected).abs().max() < 1e-6
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    # One whole optimizer step keeps every row at unit norm.
    args = train_sae.parse_args(["--d_sae", "40", "--lr", "1e-2", "--lr_warmup", "1", "--kernels", "torch"])
    t = train_sae.Trainee(9, sae, torch.optim.Adam(sae.parameters(), lr=1e-2), "cpu")
    before = sae.W_dec.detach().clone()
    train_sae.train_step(t, torch.randn(32, 12), 0, args, lambda: torch.autocast("cpu", enabled=False), False)
    assert not torch.equal(before, sae.W_dec)
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() < 1e-6


def test_geometric_median():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3000, 16, generator=g), 30 + 5 * torch.randn(500, 16, generator=g)])  # outliers
    y = train_sae.geometric_median(x).double()
    X = x.double()
    objective = lambda v: (X - v).norm(dim=1).sum()
    # Reference optimum in float64 by L-BFGS, a different method, from the coordinate-wise median.
    ref = X.median(0).values.clone().requires_grad_()
    opt = torch.optim.LBFGS([ref], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    opt.step(lambda: (opt.zero_grad(), objective(ref).backward(), objective(ref))[2])
    assert (y - ref.detach()).norm() < 1e-3 * ref.norm()
    assert objective(y) <= objective(ref.detach()) * (1 + 1e-7)
    assert objective(y) < 0.9 * objective(X.mean(0))  # the outliers pull the mean away
    # At the optimum the unit vectors towards the points cancel.
    unit = (X - y) / (X - y).norm(dim=1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3 * len(X)


def test_ghost_grads_reach_dead_features_only_when_on():
    sae = random_sae()
    dead = torch.tensor([3, 7, 20])
    with torch.no_grad():
        sae.b_enc[dead] = -100  # these never fire
    x = torch.randn(64, 12)
    for ghost in (True, False):
        sae.zero_grad()
        loss, _, fires, _ = train_sae.sae_loss(sae, x, 1e-2, dead if ghost else None, "seed")
        loss.backward()
        assert (fires[dead] == 0).all()
        for grad in (sae.W_enc.grad[:, dead], sae.b_enc.grad[dead], sae.W_dec.grad[dead]):
            assert (grad.abs().sum() > 0) == ghost
    # Through the training step: with the flag off, forced-dead features stay exactly as they were.
    for ghost in (True, False):
        sae = random_sae()
        with torch.no_grad():
            sae.b_enc[dead] = -100
        args = train_sae.parse_args(["--d_sae", "40", "--lr_warmup", "1", "--dead_tokens", str(3 * 4096), "--kernels", "torch",
                                       "--ghost_grads" if ghost else "--no-ghost_grads"])
        t = train_sae.Trainee(9, sae, torch.optim.Adam(sae.parameters(), lr=1e-3), "cpu")
        before = sae.W_enc[:, dead].detach().clone()
        for step in range(6):
            train_sae.train_step(t, torch.randn(64, 12), step, args, lambda: torch.autocast("cpu", enabled=False), False)
        assert (t.since_fired[dead] >= 3).all()
        assert torch.equal(before, sae.W_enc[:, dead].detach()) != ghost


@pytest.mark.parametrize("norm", [0.1, 10, 1000])
def test_initial_reconstruction_is_as_long_as_the_input(norm):
    """W_enc = W_dec^T alone makes the first x_hat about m / (2d) = 8 times too long; the
    data-scaled init, on data of any norm, gets within 20%, and explains some variance."""
    g = torch.Generator().manual_seed(0)
    d, m = 64, 1024
    x = torch.randn(8192, d, generator=g) + 0.5 * torch.randn(d, generator=g)   # an offset, as residuals have
    x *= norm / x.norm(dim=1).mean()
    scale = d ** 0.5 / x.norm(dim=1).mean()                                 # what --normalize does
    sae = train_sae.SAE(d, m)
    with torch.no_grad():
        naive = sae.W_enc.clone()
        train_sae.init_from_data(sae, x * scale)
        x_hat = sae(x * scale)[2] / scale
        ratio = (x_hat.norm(dim=1).mean() / x.norm(dim=1).mean()).item()
        assert abs(ratio - 1) < 0.2, ratio
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert ev > 0.5, ev
        x_in = x * scale - sae.b_dec                                        # the undamped start, for contrast
        assert (torch.relu(x_in @ naive) @ sae.W_dec).norm(dim=1).mean() > 6 * x_in.norm(dim=1).mean()


def test_first_logged_explained_variance_is_not_negative(tmp_path):
    """GPT-2-shaped data (m = 32 d, residual norms in the hundreds): the very first step's
    explained variance, which was near -200 before the data-scaled init."""
    g = torch.Generator().manual_seed(0)
    x = 300 * (torch.randn(4096, 48, generator=g) + torch.randn(48, generator=g))
    np.save(tmp_path / "acts.npy", x.numpy())
    train_sae.main(["--activations", str(tmp_path / "acts.npy"), "--d_sae", str(32 * 48), "--batch", "512",
                    "--tokens", str(3 * 512), "--buffer", "2048", "--lr_warmup", "10", "--log_every", "1",
                    "--out", str(tmp_path / "run"), "--device", "cpu"])
    first = json.loads(open(tmp_path / "run" / "log.jsonl").readline())
    assert first["step"] == 1 and first["explained_variance"] >= 0, first


def test_normalize_makes_l1_mean_the_same_at_any_data_norm(tmp_path):
    """SAELens's loss is quadratic in the data and its L1 term linear, so the same --l1 gives a
    different L0 on data 100 times larger, unless the inputs are normalized. Normalized, the two
    runs are the same run; the saved SAEs differ only by the factor, folded into the biases
    (f in the input's units)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g) + torch.randn(16, generator=g)
    runs = {}
    for norm in (1, 100):
        np.save(tmp_path / f"acts{norm}.npy", (norm * x).numpy())
        for flag in ("--normalize", "--no-normalize"):
            out = tmp_path / f"run{norm}{flag}"
            (t,) = train_sae.main(["--activations", str(tmp_path / f"acts{norm}.npy"), "--loss", "saelens",
                                   "--l1", "3", "--d_sae", "64", "--batch", "256", "--tokens", str(100 * 256), "--lr", "2e-3",
                                   "--buffer", "1024", "--lr_warmup", "5", "--log_every", "100", "--no-center",
                                   flag, "--out", str(out), "--device", "cpu"])
            runs[norm, flag] = json.loads(open(out / "log.jsonl").readline())["l0"], sae_weights(out / "blocks.9.hook_resid_pre")
    (l0_1, w1), (l0_100, w100) = runs[1, "--normalize"], runs[100, "--normalize"]
    assert abs(l0_1 - l0_100) < 0.02 * l0_1, (l0_1, l0_100)
    assert torch.allclose(w1["W_enc"], w100["W_enc"], atol=1e-4) and torch.allclose(w1["W_dec"], w100["W_dec"], atol=1e-4)
    for k in ("b_enc", "b_dec"):
        assert torch.allclose(100 * w1[k], w100[k], rtol=1e-3, atol=1e-3), k
    f1 = torch.relu((x - w1["b_dec"]) @ w1["W_enc"] + w1["b_enc"])           # the saved SAEs, on their own inputs
    f100 = torch.relu((100 * x - w100["b_dec"]) @ w100["W_enc"] + w100["b_enc"])
    assert torch.allclose(100 * f1, f100, rtol=1e-3, atol=1e-2)
    l0_raw_1, l0_raw_100 = runs[1, "--no-normalize"][0], runs[100, "--no-normalize"][0]
    assert l0_raw_100 > 2 * l0_raw_1, (l0_1, l0_raw_1, l0_raw_100)          # what normalizing prevents


@pytest.mark.parametrize("dead", [None, [3, 7, 20]], ids=["no-dead", "dead"])
def test_seed_loss_is_homogeneous_so_bloom_l1_is_unchanged_by_normalizing(dead):
    """The seed's loss scales by s when x and both biases do (the MSE is divided by ||x||, and
    f scales by s under unit-norm rows), so its minimizers, and the L0 that --l1 8e-5 gives,
    do not depend on --normalize. Checked on the loss itself, ghost term included."""
    sae = random_sae()
    x = 2 * torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    dead = None if dead is None else torch.tensor(dead)
    loss, parts, _, _ = train_sae.sae_loss(sae, x, 8e-5, dead)
    s = 37.0
    with torch.no_grad():
        sae.b_enc *= s
        sae.b_dec *= s
    loss_s, parts_s, _, _ = train_sae.sae_loss(sae, s * x, 8e-5, dead)
    for k in parts:
        assert torch.allclose(parts_s[k], s * parts[k], rtol=1e-5), k
    assert torch.allclose(loss_s, s * loss, rtol=1e-5)


@pytest.mark.parametrize("mechanism", ["ghost", "resample", "none"])
def test_dead_features_revive_within_a_short_run(mechanism):
    """Half the features start dead (their b_enc below every pre-activation on the data). In a
    300-step run, far shorter than the old 5,000-step window, the window scaled to the run
    (30 steps) lets ghost gradients, or resampling every 64 steps, bring most of them back;
    with neither they stay dead."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(96, 16, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    samples = ((torch.rand(20_000, 96, generator=g) < 4 / 96) * torch.rand(20_000, 96, generator=g)) @ atoms
    steps, batch = 300, 256
    sae = train_sae.SAE(16, 64)
    with torch.no_grad():
        train_sae.init_from_data(sae, samples)
        pre = (samples - sae.b_dec) @ sae.W_enc
        sae.b_enc[:32] = -pre[:, :32].max(0).values - 0.05                   # dead by construction
    args = train_sae.parse_args(["--batch", str(batch), "--tokens", str(steps * batch), "--lr", "1e-3",
                                   "--lr_warmup", "10", "--l1", "1e-3", "--kernels", "torch",
                                   "--ghost_grads" if mechanism == "ghost" else "--no-ghost_grads"])
    assert train_sae.dead_after(args) == 30
    t = train_sae.Trainee(9, sae, torch.optim.Adam(sae.parameters(), lr=1e-3), "cpu")
    for step in range(steps):
        if mechanism == "resample" and step % 64 == 0:  # what train() does at each refill
            train_sae.resample_dead(t, samples[:4096], args, step)
        x = samples[torch.randint(len(samples), (batch,), generator=g)]
        train_sae.train_step(t, x, step, args, lambda: torch.autocast("cpu", enabled=False), False)
    with torch.no_grad():
        never_fired = (sae(samples)[1][:, :32] > 0).sum(0).eq(0).sum().item()
    assert never_fired <= 8 if mechanism != "none" else never_fired == 32, never_fired


def known_dictionary(path, n=100_000):
    """64 unit atoms in d = 32, about 3 active per sample, on a shared offset as residuals have;
    the samples are written to `path` (.npy)."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(64, 32, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    offset = torch.randn(32, generator=g) * 5 / 32 ** 0.5
    active = torch.rand(n, 64, generator=g) < 3 / 64
    x = ((1 + torch.rand(n, 64, generator=g)) * active) @ atoms + offset
    np.save(path, x.numpy())
    return atoms


def recovered(atoms, folder):
    """The share of atoms with a decoder row within cosine 0.9 of them."""
    W = load_file(os.path.join(folder, "sae_weights.safetensors"))["W_dec"]
    return ((atoms @ (W / W.norm(dim=1, keepdim=True)).T).max(1).values > 0.9).float().mean().item()


def test_it_learns_a_known_dictionary(tmp_path):
    atoms = known_dictionary(tmp_path / "acts.npy")
    train_sae.main(["--activations", str(tmp_path / "acts.npy"), "--d_sae", "128", "--batch", "1024",
                    "--tokens", str(5000 * 1024), "--buffer", "16384", "--lr", "1e-3", "--l1", "3.6e-3",
                    "--lr_warmup", "100", "--dead_tokens", str(1000 * 1024), "--no-center", "--out", str(tmp_path / "run"),
                    "--log_every", "1000", "--device", "cpu"])
    assert recovered(atoms, tmp_path / "run" / "blocks.9.hook_resid_pre") >= 0.9


# TopK and BatchTopK (--arch).

PREFIXES = [5, 10, 20, 40]  # the nested widths of the matryoshka cases (m 40)


def reference_topk_loss(P, x, arch, k, dead, k_aux, coef):
    """The TopK loss in float64 from the formulas alone, dense [B, m] masks and plain autograd:
    the loss, and the mask of features that fire. Matryoshka: BatchTopK's, plus the loss of each
    smaller prefix's reconstruction, its first w features alone (dense slices)."""
    x = x.double()
    pre = (x - P["b_dec"]) @ P["W_enc"] + P["b_enc"]                                  # [B, m]
    B, m = pre.shape
    with torch.no_grad():
        if arch == "topk":
            keep = torch.zeros(B, m, dtype=torch.bool).scatter_(1, pre.topk(k, dim=1).indices, True)
        else:
            keep = pre >= pre.flatten().topk(B * k).values.min()
        keep &= pre > 0
    x_hat = (pre * keep) @ P["W_dec"] + P["b_dec"]
    nmse = lambda a, b: (a - b).pow(2).sum(1).mean() / (b - b.mean(0)).pow(2).sum(1).mean()
    loss = nmse(x_hat, x)
    for w in PREFIXES[:-1] if arch == "matryoshka" else []:
        loss = loss + nmse((pre * keep)[:, :w] @ P["W_dec"][:w] + P["b_dec"], x)
    if dead is not None:
        with torch.no_grad():
            among_dead = torch.full_like(pre, -math.inf)
            among_dead[:, dead] = pre[:, dead]
            aux = torch.zeros(B, m, dtype=torch.bool).scatter_(1, among_dead.topk(min(k_aux, len(dead)), dim=1).indices, True)
        e = (x - x_hat).detach()
        loss = loss + coef * nmse((pre * aux) @ P["W_dec"], e)
    return loss, keep


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead, k_aux", [(None, 3), ([3, 7, 20, 21, 30], 3), ([3, 7, 20, 21, 30], 64),
                                         (list(range(1, 40, 3)), 5)], ids=["no-dead", "dead", "k_aux-capped", "many-dead"])
def test_topk_step_matches_dense_float64(arch, dead, k_aux):
    """The sparse step (kernels.SparsePre, sparse_decode) against a dense float64 formulation:
    value, every gradient, and the count of what fires."""
    sae, B, k = random_sae(), 16, 4
    x = 2 * torch.randn(B, 12, generator=torch.Generator().manual_seed(5))
    is_dead = torch.zeros(40, dtype=torch.bool)
    is_dead[dead or []] = True
    prefixes = PREFIXES if arch == "matryoshka" else None
    loss, parts, fires, x_hat, cut = train_sae.topk_loss(sae, x, arch, k, is_dead, k_aux, 0.25, prefixes=prefixes)
    loss.backward()
    P = {name: param.detach().double().requires_grad_() for name, param in sae.named_parameters()}
    ref, keep = reference_topk_loss(P, x, arch, k, dead, k_aux, 0.25)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for name, param in sae.named_parameters():
        err = (param.grad.double() - P[name].grad).norm() / P[name].grad.norm()
        assert err < 1e-5, (name, err.item())
    assert (parts["auxk"].item() == 0) == (dead is None)  # exactly 0 with no dead features
    # Exactly k per token (topk) or B k per batch (batchtopk), and those are what fire.
    assert fires.sum() == B * k and torch.equal(fires, keep.sum(0))
    per_token = keep.sum(1)
    assert (per_token == k).all() if arch == "topk" else per_token.min() < k < per_token.max()
    if arch != "topk":  # the cut is the (B k)-th largest pre-activation
        pre = (x.double() - P["b_dec"]) @ P["W_enc"] + P["b_enc"]
        assert abs(cut.item() - pre.flatten().topk(B * k).values.min().item()) < 1e-5


def jumprelu_sae(theta=0.3, seed=0):
    """random_sae with JumpReLU's learnt threshold, log θ, spread around `theta`."""
    sae = random_sae(seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    sae.log_threshold = torch.nn.Parameter(math.log(theta) + 0.5 * torch.randn(40, generator=g))
    sae.arch, sae.threshold = "jumprelu", sae.log_threshold.detach().exp()
    return sae


@pytest.mark.parametrize("mode, target, preact", [("step", None, 0), ("step", 3.0, 0), ("tanh", None, 0.5)])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_jumprelu_step_matches_float64(mode, target, preact, impl):
    """f = pre where pre > θ; the loss (normalised MSE and λ L0, or λ t (L0/t - 1)^2, or tanh(4f))
    and every gradient against float64 with dense masks, θ's written out as the rectangle kernel of
    width ε gives it: d f/d θ = -θ/ε and d H/d θ = -1/ε (tanh: -tanh(4θ)/ε) within ε/2 of θ."""
    sae, coef, eps = jumprelu_sae(), 0.05, 0.4
    x = 2 * torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[[3, 7, 20]] = True
    loss, parts, fires, x_hat, _ = train_sae.topk_loss(sae, x, "jumprelu", None, dead, 8, 0.25, impl=impl,
                                                       sparsity=(coef, target, eps, mode, preact))
    loss.backward()
    P = {name: param.detach().double().requires_grad_() for name, param in sae.named_parameters()}
    theta = P["log_threshold"].detach().exp()
    xd = x.double()
    pre = (xd - P["b_dec"]) @ P["W_enc"] + P["b_enc"]                                 # [B, m]
    keep, near = (pre > theta).detach(), ((pre - theta).abs() < eps / 2).detach()
    x_ref = (pre * keep) @ P["W_dec"] + P["b_dec"]
    spread = (xd - xd.mean(0)).pow(2).sum(1).mean()
    penalty = keep.double() if mode == "step" else torch.tanh(4 * pre * keep)
    l0 = penalty.sum(1).mean()
    ref = (x_ref - xd).pow(2).sum(1).mean() / spread + coef * (target * (l0 / target - 1) ** 2 if target else l0)
    if preact:
        ref = ref + preact * torch.relu(theta[[3, 7, 20]] - pre[:, [3, 7, 20]]).sum(1).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item() and "auxk" not in parts and near.any()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        err = (getattr(sae, name).grad.double() - P[name].grad).norm() / P[name].grad.norm()
        assert err < 1e-5, (name, err.item())
    with torch.no_grad():  # θ's: the reconstruction's and the penalty's, by the chain rule through l0
        d_x_hat = 2 * (x_ref - xd) / spread / len(x)                                  # [B, d]
        d_f = d_x_hat @ P["W_dec"].T                                                  # [B, m]
        d_l0 = coef * (2 * (l0 / target - 1) if target else 1)
        at_theta = 1 if mode == "step" else torch.tanh(4 * theta)
        d_theta = ((d_f * -theta / eps + d_l0 * -at_theta / eps / len(x)) * near).sum(0)
    assert close(sae.log_threshold.grad, d_theta * theta, 1e-5)
    assert torch.equal(fires, keep.sum(0)) and fires.sum() > 0


def test_auxk_revives_dead_features():
    """Half the features start dead (b_enc below every pre-activation they have on the data).
    300 steps with AuxK bring most of them back; without it they all stay dead."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(96, 16, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    samples = ((torch.rand(20_000, 96, generator=g) < 4 / 96) * torch.rand(20_000, 96, generator=g)) @ atoms
    steps, batch, never_fired = 300, 256, {}
    for coef in ("0.03125", "0"):
        sae = train_sae.SAE(16, 64, arch="topk", k=4)
        with torch.no_grad():
            train_sae.init_from_data(sae, samples)
            sae.b_enc[:32] = -((samples - sae.b_dec) @ sae.W_enc[:, :32]).max(0).values - 0.05  # dead by construction
        args = train_sae.parse_args(["--arch", "topk", "--k", "4", "--batch", str(batch), "--tokens", str(steps * batch),
                                       "--lr", "1e-3", "--lr_warmup", "10", "--auxk_coef", coef, "--k_aux", "16",
                                       "--kernels", "torch"])
        assert train_sae.dead_after(args) == 30
        t = train_sae.Trainee(9, sae, torch.optim.Adam(sae.parameters(), lr=1e-3), "cpu")
        order = torch.Generator().manual_seed(1)
        for step in range(steps):
            x = samples[torch.randint(len(samples), (batch,), generator=order)]
            train_sae.train_step(t, x, step, args, lambda: torch.autocast("cpu", enabled=False), False)
        with torch.no_grad():
            never_fired[coef] = (sae(samples)[1][:, :32] > 0).sum(0).eq(0).sum().item()
    assert never_fired["0"] == 32 and never_fired["0.03125"] <= 8, never_fired


def known_dictionary_run(tmp_path, *flags, steps):
    """Train on the known dictionary's samples; (atoms, the SAE as saved, 10,000 held-out samples)."""
    atoms = known_dictionary(tmp_path / "all.npy", n=110_000)
    x = np.load(tmp_path / "all.npy")
    np.save(tmp_path / "train.npy", x[:100_000])
    train_sae.main(["--activations", str(tmp_path / "train.npy"), "--d_sae", "128", "--batch", "1024",
                    "--tokens", str(steps * 1024), "--buffer", "16384", "--lr", "1e-3", "--lr_warmup", "100",
                    "--no-center", "--out", str(tmp_path / "run"), "--log_every", "1000", "--device", "cpu", *flags])
    folder = tmp_path / "run" / "blocks.9.hook_resid_pre"
    sae, _, _ = evaluation.load_sae(str(folder), 32)
    return atoms, folder, sae, torch.from_numpy(x[100_000:])


def test_eval_reads_a_saelens6_topk_folder_with_free_decoder_norms(tmp_path):
    """SAELens 6's TopK trainer saves hook_name under metadata and rows of any norm, with
    rescale_acts_by_decoder_norm: its top k are taken of pre × ‖W_dec row‖, decoded by unit rows.
    load_sae's folded SAE gives that forward, written out in float64."""
    w = random_sae_weights(16, 40, seed=3)
    w["W_dec"] = w["W_dec"] * (0.05 + torch.rand(40, 1, generator=torch.Generator().manual_seed(4)))
    folder = write_sae_folder(tmp_path / "sl6", w, 2, center=False, arch="topk")
    cfg = json.load(open(folder / "cfg.json"))
    cfg = {"architecture": "topk", "d_in": 16, "d_sae": 40, "k": TOPK, "apply_b_dec_to_input": True, "dtype": "float32",
           "normalize_activations": "none", "rescale_acts_by_decoder_norm": True, "device": "cpu",
           "metadata": {"hook_name": cfg["hook_name"], "model_name": "gpt2"}}
    json.dump(cfg, open(folder / "cfg.json", "w"))
    sae, layer, _ = evaluation.load_sae(str(folder), 16)
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(5))
    w64 = {k: v.double() for k, v in w.items()}
    norm = w64["W_dec"].norm(dim=1)                                                   # [m]
    pre = ((x.double() - w64["b_dec"]) @ w64["W_enc"] + w64["b_enc"]) * norm
    top = pre.topk(TOPK, dim=1)
    f_ref = torch.zeros_like(pre).scatter_(1, top.indices, torch.relu(top.values))
    x_hat_ref = f_ref @ (w64["W_dec"] / norm[:, None]) + w64["b_dec"]
    with torch.no_grad():
        _, f, x_hat = sae(x)
    assert layer == 2 and torch.allclose(f.double(), f_ref, atol=1e-5) and (f > 0).sum() == 30 * TOPK
    assert torch.allclose(x_hat.double(), x_hat_ref, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_adam_moves_each_parameter_by_its_share_of_the_lr(arch):
    """Adam's first step moves every element by lr · g / (|g| + eps), so by its group's lr: sparse
    SAEs' decoder rows by 4 lr, JumpReLU's log θ by 10 lr, everything else by lr."""
    sae = train_sae.SAE(8, 16, arch=arch, k=None if arch == "relu" else 2)
    if arch == "jumprelu":
        sae.log_threshold = torch.nn.Parameter(torch.zeros(16))
    opt = train_sae.adam(sae, 1e-3)
    for group in opt.param_groups:  # as train_step sets them
        group["lr"] = 1e-3 * group.get("lr_scale", 1)
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    for p in sae.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    opt.step()
    expected = {"W_dec": 1 if arch == "relu" else 4, "log_threshold": 10}
    for name, p in sae.named_parameters():
        moved = (p.detach() - before[name]).abs()
        assert torch.allclose(moved, torch.full_like(moved, 1e-3 * expected.get(name, 1)), rtol=1e-3), name


def test_topk_learns_a_known_dictionary(tmp_path):
    atoms, folder, sae, held_out = known_dictionary_run(tmp_path, "--arch", "topk", "--k", "3", steps=800)
    assert recovered(atoms, folder) >= 0.9
    with torch.no_grad():
        per_token = (sae(held_out)[1] > 0).sum(1)
    # Fewer only where a top pre-activation is <= 0: about 5% of the samples have no atom at all.
    assert per_token.max() == 3 and (per_token == 3).double().mean() > 0.9


def test_jumprelu_target_l0_is_met_at_inference(tmp_path):
    """--target_l0 3 on the known dictionary: the saved JumpReLU fires 3 times per held-out sample
    on average, within 15% (its λ, 1 by default with a target, makes the target a constraint)."""
    _, _, sae, held_out = known_dictionary_run(tmp_path, "--arch", "jumprelu", "--target_l0", "3", steps=800)
    with torch.no_grad():
        l0 = (sae(held_out)[1] > 0).sum(1).double().mean().item()
    assert abs(l0 - 3) < 0.15 * 3, l0


def test_batchtopk_threshold_gives_k_at_inference(tmp_path):
    """The saved JumpReLU, with the threshold learnt in training, fires k times per held-out
    sample on average, within 10%."""
    _, _, sae, held_out = known_dictionary_run(tmp_path, "--arch", "batchtopk", "--k", "3", steps=800)
    assert sae.arch == "jumprelu" and sae.threshold.min() == sae.threshold.max() > 0
    with torch.no_grad():
        l0 = (sae(held_out)[1] > 0).sum(1).double().mean().item()
    assert abs(l0 - 3) <= 0.3, l0


def test_each_layer_gets_its_own_activations(tiny, tmp_path, monkeypatch):
    """Two SAEs from one forward equal: one trained alone; one trained on a cached file of
    exactly its layer's residuals, which we check against gpt2.py directly. Without BOS a context
    gives 15 rows, so a round of GPT-2 forwards (8 contexts) does not fit a half-buffer (256): the
    rows a refill leaves wait for the next, and the file, written in chunks of another size (its
    --buffer), holds the same rows in the same order."""
    both = train_sae.main(tiny_args(tiny, tmp_path / "both", "--layer", "0,2", "--exclude_bos"))
    alone = train_sae.main(tiny_args(tiny, tmp_path / "alone", "--layer", "0", "--exclude_bos"))
    assert torch.equal(both[0].sae.W_enc, alone[0].sae.W_enc) and torch.equal(both[0].sae.b_dec, alone[0].sae.b_dec)
    assert not torch.equal(both[0].sae.W_enc, both[1].sae.W_enc)
    # 40 steps of 64 read the first half-buffer and 10 refills: 11 x 256 residuals, in 24 rounds of 120.
    rows, rounds, real_round = 11 * 256, [], gpt2.ResidualSource.round
    monkeypatch.setattr(gpt2.ResidualSource, "round", lambda self: rounds.append(1) or real_round(self))
    train_sae.main(tiny_args(tiny, tmp_path, "--layer", "2", "--save_activations", str(tmp_path / "acts.npy"),
                             "--tokens", str(rows), "--buffer", "1000", "--exclude_bos"))
    assert len(rounds) == 24  # no more GPT-2 than the rows asked for need
    acts = np.load(tmp_path / "acts.npy")
    model = gpt2.from_pretrained(tiny[0])
    stream = data.Contexts(data.corpus(tiny[1], "train", 16), 16, seed=0)
    with torch.no_grad():
        ref = model.residuals(stream.next(188), [2])[2][:, 1:].reshape(-1, 64)[:rows]  # [rows, d], uncentred
    assert acts.shape == (rows, 64) and np.allclose(acts, ref.numpy(), atol=1e-5)
    from_file = train_sae.main(tiny_args(tiny, tmp_path / "file", "--layer", "2", "--activations", str(tmp_path / "acts.npy")))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(from_file[0].sae, name), getattr(both[1].sae, name)), name


def test_output_is_saelens_format_and_reloads(tiny, tmp_path):
    out = tmp_path / "run"
    (t,) = train_sae.main(tiny_args(tiny, out, "--layer", "1"))
    folder = out / "blocks.1.hook_resid_pre"
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.load(open(folder / "cfg.json"))
    assert cfg["hook_name"] == "blocks.1.hook_resid_pre" and cfg["hook_layer"] == 1
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["activation_fn_str"]) == (64, 64, "standard", "relu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["model_from_pretrained_kwargs"] == {"center_writing_weights": True}
    assert "sae_lens_version" not in cfg and cfg["context_size"] == 16 and cfg["normalize_activations"] == "none"
    weights = sae_weights(folder)
    assert {k: list(v.shape) for k, v in weights.items()} == {"W_enc": [64, 64], "b_enc": [64], "W_dec": [64, 64], "b_dec": [64]}
    reloaded = train_sae.SAE(64, 64)
    reloaded.load_state_dict(weights)
    x = torch.randn(50, 64)
    s = t.scale.item()  # it trained on x * s (--normalize); the saved SAE takes x, and gives f / s
    assert s != 1
    with torch.no_grad():
        _, f_trained, x_hat_trained = t.sae(x * s)
        assert torch.allclose(reloaded(x)[1], f_trained / s, atol=1e-5)
        assert torch.allclose(reloaded(x)[2], x_hat_trained / s, atol=1e-5)
        # SAELens's forward, written out: f = relu((x - b_dec) W_enc + b_enc).
        f = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
        assert torch.allclose(f, f_trained / s, atol=1e-5)
    sparsity = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (64,) and torch.allclose(sparsity, torch.log10(t.density + 1e-10))
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == list(range(4, 41, 4))
    assert {"tokens", "tokens_per_s", "mse", "l1", "ghost", "l0", "explained_variance", "dead_pct", "lr"} <= set(records[-1])
    # A finished run is not overwritten without --force.
    with pytest.raises(ValueError, match="holds a run already: pass --force"):
        train_sae.main(tiny_args(tiny, out, "--layer", "1"))
    train_sae.main(tiny_args(tiny, out, "--layer", "1", "--force"))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_topk_output_is_saelens_format_and_reloads(tiny, tmp_path, arch):
    """topk is saved as SAELens's "topk" with its k; batchtopk and matryoshka as "jumprelu" with the
    threshold learnt in training, matryoshka with its widths, jumprelu with one threshold per feature.
    eval.py's loader reads them back to the trained function, and scores each of matryoshka's
    prefixes as their float64 reconstructions."""
    out = tmp_path / "run"
    (t,) = train_sae.main(tiny_args(tiny, out, "--layer", "1", "--arch", arch, *(["--k", "4"] if arch != "jumprelu" else []),
                                    *(["--prefixes", "8,24,64"] if arch == "matryoshka" else [])))
    folder = out / "blocks.1.hook_resid_pre"
    cfg, weights = json.load(open(folder / "cfg.json")), sae_weights(folder)
    s = t.scale.item()
    if arch == "topk":
        assert (cfg["architecture"], cfg["k"], cfg["activation_fn_kwargs"]) == ("topk", 4, {"k": 4})
        assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    else:
        assert (cfg["architecture"], cfg["activation_fn_str"]) == ("jumprelu", "relu")
        theta = weights["threshold"]
        assert theta.shape == (64,) and ((theta == theta[0]).all() != (arch == "jumprelu")) and (theta > 0).all()
        learnt = t.sae.log_threshold.exp() if arch == "jumprelu" else t.sae.threshold  # jumprelu: log θ trains
        assert torch.allclose(theta, learnt.detach() / s, rtol=1e-6)  # in input units
        assert "log_threshold" not in weights
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert {"mse", "l0", "explained_variance", "dead_pct"} <= set(records[-1])
    assert ("auxk" in records[-1]) != ("sparsity" in records[-1]) == (arch == "jumprelu")
    assert ("threshold" in records[-1]) == (arch != "topk") and "l1" not in records[-1]
    assert ("nested" in records[-1]) == (cfg.get("matryoshka_widths") == [8, 24, 64]) == (arch == "matryoshka")
    sae, layer, center = evaluation.load_sae(str(folder), 64)
    x = 3 * torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, f_trained, x_hat_trained = t.sae(x * s)
        _, f, x_hat = sae(x)
        assert torch.allclose(f, f_trained / s, atol=1e-5) and torch.allclose(x_hat, x_hat_trained / s, atol=1e-5)
        # SAELens's forward, written out.
        pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
        if arch == "topk":
            top = pre.topk(4, dim=1)
            ref = torch.zeros_like(pre).scatter_(1, top.indices, torch.relu(top.values))
        else:
            ref = torch.relu(pre) * (pre > weights["threshold"])
        assert torch.allclose(f, ref, atol=1e-5) and (f > 0).any()
    if arch == "matryoshka":  # eval.py's prefix metrics on these rows, against float64
        np.save(tmp_path / "rows.npy", x.numpy())
        evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--device", "cpu"])
        got = json.load(open(folder / "eval.json"))["prefixes"]
        x_in = x - x.mean(1, keepdim=True) if center else x  # as eval.py hands the rows to the SAE
        with torch.no_grad():
            f = sae(x_in)[1].double()  # which entries pass the threshold: as the fp32 forward decides
        x64, W = x_in.double(), {k: v.double() for k, v in weights.items()}
        for p, w in zip(got, (8, 24)):
            err = (x64 - f[:, :w] @ W["W_dec"][:w] - W["b_dec"]).pow(2).sum(1)
            spread = (x64 - x64.mean(0)).pow(2).sum(1)
            assert p["width"] == w and abs(p["l0"] - (f[:, :w] > 0).sum(1).double().mean().item()) < 1e-9
            assert abs(p["explained_variance"] - (1 - err / spread).mean().item()) < 1e-6
            assert abs(p["explained_variance_pooled"] - (1 - err.sum() / spread.sum()).item()) < 1e-6
        assert len(got) == 2


# -----------------------------------------------------------------------------
# kernels.py, under Triton's interpreter: tiny shapes, none of them a multiple of the 64 x 64 x 32
# tile; the fused step with no dead features, some, and all; the TopK step's kernels; the
# self-checks and the choice of kernels; and the cross-compile for GPUs that are not here.


KERNEL_SHAPES = [(70, 50, 150), (1, 33, 65), (130, 96, 64)]  # B, d, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_encode_kernel(dtype, shape):
    B, d, m = shape
    g = torch.Generator().manual_seed(B * d + m)
    x_in = torch.randn(B, d, generator=g).to(dtype)
    W = (torch.randn(d, m, generator=g) / d ** 0.5).to(dtype)
    b = 0.5 * torch.randn(m, generator=g)
    l1w = 0.5 + torch.rand(m, generator=g)
    f_out = torch.full((B, m), float("nan"), dtype=dtype)  # poisoned: every element must be written
    f, l1, fires = kernels.encode(x_in, W, b, l1w, f=f_out)
    pre = x_in.double() @ W.double() + b.double()  # float64, from the same (rounded) operands
    f_ref = torch.relu(pre)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # fp16 only in how f is stored
    assert f is f_out and not f.isnan().any() and close(f, f_ref, tol)
    assert close(l1, f_ref @ l1w.double(), 1e-6)  # summed from the fp32 accumulator
    assert torch.equal(fires, (f_ref > 0).sum(0).int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pre_grad_kernel(dtype, shape):
    B, d, m = shape
    g = torch.Generator().manual_seed(B * d + m + 1)
    d_x_hat = torch.randn(B, d, generator=g).to(dtype)
    W_dec = (torch.randn(m, d, generator=g) / d ** 0.5).to(dtype)
    f = torch.relu(torch.randn(B, m, generator=g)).to(dtype)  # about half zero
    d_l1 = torch.randn(B, generator=g)
    l1w = 0.5 + torch.rand(m, generator=g)
    out = torch.full((B, m), float("nan"), dtype=dtype)
    d_pre = kernels.pre_grad(d_x_hat, W_dec, f, d_l1, l1w, d_pre=out)
    ref = (d_x_hat.double() @ W_dec.double().T + d_l1.double()[:, None] * l1w.double()) * (f > 0)
    assert d_pre is out and not d_pre.isnan().any()
    assert close(d_pre, ref, 1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("convention", ["seed", "saelens"])
@pytest.mark.parametrize("dead", [None, [3, 7, 20, 21], list(range(40))], ids=["no-dead", "dead", "all-dead"])
def test_fused_step_matches_float64(convention, dead):
    """The whole fused function, through the loss, in fp32: loss and every gradient."""
    sae = random_sae()
    x = 2 * torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    dead_idx = None if dead is None else torch.tensor(dead)
    loss, _, fires, _ = train_sae.sae_loss(sae, x, 1e-2, dead_idx, convention, impl="triton")
    ref, errors = against_float64(sae, loss, x, dead_idx, convention)
    assert abs(loss.item() - ref) < 1e-5 * abs(ref) and 0 < fires.sum() < 16 * 40
    assert max(errors.values()) < 1e-5, errors


def test_fused_step_in_fp16():
    """Half-precision operands (what bf16 is on a GPU; the interpreter cannot do bf16 dots)."""
    sae = random_sae(d=64, m=256)
    x = 2 * torch.randn(128, 64, generator=torch.Generator().manual_seed(5))
    dead = torch.arange(0, 256, 9)
    with torch.autocast("cpu", torch.float16):
        loss, _, _, _ = train_sae.sae_loss(sae, x, 1e-2, dead, "seed", impl="triton")
    ref, errors = against_float64(sae, loss, x, dead, "seed")
    assert abs(loss.item() - ref) < 1e-2 * abs(ref)
    assert all(p.grad.dtype == torch.float32 for p in sae.parameters())
    assert max(errors.values()) < 1e-2, errors


def patched_check(monkeypatch, tmp_path, old, new, file="kernels.py"):
    """Point gpu_check.self_check's child process at copies of kernels.py and gpu_check.py, with
    `old` replaced by `new` in `file`."""
    for name in ("kernels.py", "gpu_check.py"):
        source = open(os.path.join(HERE, name)).read()
        assert name != file or source.count(old) == 1, old
        open(tmp_path / name, "w").write(source.replace(old, new) if name == file else source)
    monkeypatch.setattr(gpu_check, "__file__", str(tmp_path / "gpu_check.py"))


CHECK_SHAPE = {"relu": (70, 50, 150), "topk": (16, 20, 40)}  # B, d, m: topk checks B k = 512 entries
WRONG_F = ("f = tl.where(inside, tl.maximum(pre, 0.0), 0.0)", "f = tl.where(inside, tl.maximum(pre, 0.0), 0.0) * 1.01")


@pytest.mark.parametrize("arch, old, new, said", [
    ("relu", *WRONG_F, "encode_kernel fp32/ieee 64x64x32: relative error 1.0e-02, over 1e-05"),
    ("relu", "    (B, d), m = x_in.shape, W_enc.shape[1]\n", "    raise RuntimeError('PTX too new')\n",
     "its process failed: RuntimeError: PTX too new"),
    ("relu", "    (B, d), m = x_in.shape, W_enc.shape[1]\n", "    os.abort()\n", "its process died of signal 6"),
    ("topk", "tl.store(out_ptr + n, tl.sum(acc, axis=1)", "tl.store(out_ptr + n, 1.001 * tl.sum(acc, axis=1)",
     "gathered_dot_kernel, 512 entries: relative error 1.0e-03, over 1e-05"),
    ("relu", "print(json.dumps(check_kernels(", "print((check_kernels(",  # gpu_check.py's child prints no JSON
     "its process gave no verdict (JSONDecodeError: Expecting value: line 1 column 1 (char 0))")],
    ids=["wrong-values", "raises", "aborts", "topk-wrong-values", "no-verdict"])
def test_self_check(monkeypatch, tmp_path, arch, old, new, said):
    """What --kernels auto runs before training on CUDA, here under the interpreter, in its child
    process: every kernel of the step at the training shape against float64. It names in one line
    a kernel 1% off, one that raises, and one that kills its process, and nothing else: the other
    kernels pass (the dry run of the GPU script checks every kernel unpatched)."""
    patched_check(monkeypatch, tmp_path, old, new, "gpu_check.py" if "check_kernels" in old else "kernels.py")
    assert gpu_check.self_check("cpu", arch, "fp32", "ieee", CHECK_SHAPE[arch]) == said


def test_a_failed_check_warns_and_trains_with_torch_to_the_same_weights(monkeypatch, tmp_path, capsys):
    """--kernels auto on a device whose check fails: one WARNING that names the failure (in the
    dtype, precision and tile that training runs), then the torch path, bit for bit."""
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32))
    weights = {}
    for kernels_flag in ("torch", "auto"):
        train_sae.main(["--activations", str(tmp_path / "acts.npy"), "--d_sae", "32", "--batch", "64", "--tokens", "640",
                        "--buffer", "1024", "--out", str(tmp_path / kernels_flag), "--device", "cpu", "--kernels",
                        kernels_flag, "--log_every", "1000"])
        weights[kernels_flag] = sae_weights(tmp_path / kernels_flag / "blocks.9.hook_resid_pre")
        patched_check(monkeypatch, tmp_path, *WRONG_F)
        monkeypatch.setattr(kernels, "KERNEL_DEVICES", ("cuda", "cpu"))  # here, the interpreter stands for a GPU
    err = capsys.readouterr().err
    assert ("WARNING: the Triton kernels failed their check on cpu (encode_kernel fp32/ieee 64x64x32: relative "
            "error 1.0e-02, over 1e-05); training with the torch path instead (--kernels torch)") in err
    assert all(torch.equal(weights["torch"][k], weights["auto"][k]) for k in weights["torch"])


# The TopK step's kernels.

def bags(sizes):
    """Entries sorted by bag, `sizes` of them in each: (each entry's bag, where each bag starts)."""
    bag = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    return bag, kernels.bag_offsets(bag, len(sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sizes, d, piece", [([3, 0, 17, 1, 0], 13, None), ([0, 40, 2], 130, None), ([0, 0], 5, None),
                                             ([0, 9, 0, 13, 4, 1, 0, 0], 130, 4)],
                         ids=["empty-bags", "long-bag-two-column-blocks", "no-entries", "bags-in-pieces"])
def test_bag_sum_kernel(monkeypatch, dtype, sizes, d, piece):
    """piece: kernels.BAG_PIECE, made small so that bags longer than it (9, 13), one as long (4), and
    empty ones at either end and between are summed in pieces, then the pieces by bag."""
    if piece:
        monkeypatch.setattr(kernels, "BAG_PIECE", piece)
    g = torch.Generator().manual_seed(len(sizes) * d)
    bag, starts = bags(sizes)
    index = torch.randint(23, (len(bag),), generator=g)
    weights = torch.randn(len(bag), generator=g)
    table = torch.randn(23, d + 3, generator=g).to(dtype)[:, :d]  # a row stride that is not d
    out = torch.full((len(sizes), d), float("nan"))  # poisoned: every element must be written
    got = kernels.bag_sum(index, weights, starts, table, out=out)
    ref = torch.zeros(len(sizes), d, dtype=torch.float64).index_add_(0, bag, weights.double()[:, None] * table.double()[index])
    assert got is out and not got.isnan().any() and close(got, ref, 1e-6)  # fp32 sums of the same operands
    assert close(kernels.bag_sum_torch(index, weights, starts, table.float()), ref, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("N, d", [(37, 13), (5, 130), (0, 8)])
def test_gathered_dot_kernel(dtype, N, d):
    g = torch.Generator().manual_seed(N + d)
    a = torch.randn(11, d + 2, generator=g).to(dtype)[:, :d]
    b = torch.randn(19, d, generator=g).to(dtype)
    ia, ib = torch.randint(11, (N,), generator=g), torch.randint(19, (N,), generator=g)
    out = torch.full((N,), float("nan"))
    got = kernels.gathered_dot(ia, a, ib, b, out=out)
    ref = (a.double()[ia] * b.double()[ib]).sum(1)
    assert got is out and not got.isnan().any() and close(got, ref, 1e-6)
    assert close(kernels.gathered_dot_torch(ia, a, ib, b, chunk=4), ref, 1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("dead, k_aux", [(None, 3), ([3, 7, 20, 21, 30], 3), ([3, 7, 20, 21, 30], 64),
                                         (list(range(1, 40, 3)), 5)], ids=["no-dead", "dead", "k_aux-capped", "many-dead"])
def test_topk_step_triton_matches_dense_float64(arch, dead, k_aux):
    """topk_loss with impl "triton" against the dense float64 formulation (value and every
    gradient), and against impl "torch" (x_hat, what fires)."""
    x = 2 * torch.randn(16, 12, generator=torch.Generator().manual_seed(5))
    is_dead = torch.zeros(40, dtype=torch.bool)
    is_dead[dead or []] = True
    runs = {}
    for impl in ("torch", "triton"):
        sae = random_sae()
        loss, parts, fires, x_hat, _ = train_sae.topk_loss(sae, x, arch, 4, is_dead, k_aux, 0.25, impl=impl,
                                                           prefixes=PREFIXES if arch == "matryoshka" else None)
        loss.backward()
        runs[impl] = sae, loss, parts, fires, x_hat
    sae, loss, parts, fires, x_hat = runs["triton"]
    P = {name: param.detach().double().requires_grad_() for name, param in sae.named_parameters()}
    ref, keep = reference_topk_loss(P, x, arch, 4, dead, k_aux, 0.25)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item() and (parts["auxk"].item() == 0) == (dead is None)
    for name, param in sae.named_parameters():
        err = (param.grad.double() - P[name].grad).norm() / P[name].grad.norm()
        assert err < 1e-5, (name, err.item())
    assert torch.equal(fires, keep.sum(0)) and torch.equal(fires, runs["torch"][3])
    assert close(x_hat, runs["torch"][4].double(), 1e-6)


def steps_with_each_kernels(args, make_sae, n_dead, batch, steps):
    """{impl: (Trainee, last record)} after `steps` train_steps with --kernels torch and triton,
    on the same batches, from the same SAE with its first n_dead features dead from the start."""
    runs = {}
    for impl in ("torch", "triton"):
        args.kernels = impl
        sae = make_sae()
        with torch.no_grad():
            sae.b_enc[:n_dead] = -20
        t = train_sae.Trainee(9, sae, torch.optim.Adam(sae.parameters(), lr=1e-3), "cpu")
        g = torch.Generator().manual_seed(0)
        for step in range(steps):
            record = train_sae.train_step(t, torch.randn(batch, sae.b_dec.shape[0], generator=g) + 1, step, args,
                                          lambda: torch.autocast("cpu", enabled=False), True)
        runs[impl] = t, record
    return runs


def assert_same_training(runs, keys):
    (a, ra), (b, rb) = runs["torch"], runs["triton"]
    assert torch.equal(a.since_fired, b.since_fired) and torch.equal(a.fires, b.fires)
    for name, param in a.sae.named_parameters():
        assert close(b.sae.get_parameter(name).detach(), param.detach().double(), 1e-5), name
    assert all(abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]) for k in keys)


def test_training_steps_triton_equal_torch():
    args = train_sae.parse_args(["--d_sae", "200", "--lr", "1e-3", "--lr_warmup", "1", "--dead_tokens", str(2 * 4096)])
    # 50 dead from the start, so ghost grads join in after two steps
    runs = steps_with_each_kernels(args, lambda: random_sae(d=48, m=200), n_dead=50, batch=96, steps=5)
    assert runs["triton"][1]["ghost"] > 0
    assert_same_training(runs, ("mse", "l1", "ghost", "l0"))


def test_topk_training_steps_triton_equal_torch():
    """train_step hands --kernels to the TopK step: three steps, the third with AuxK."""
    args = train_sae.parse_args(["--arch", "topk", "--k", "4", "--k_aux", "8", "--d_sae", "40", "--lr", "1e-3",
                                   "--lr_warmup", "1", "--dead_tokens", str(2 * 4096)])
    runs = steps_with_each_kernels(args, random_sae, n_dead=10, batch=32, steps=3)
    assert runs["triton"][1]["auxk"] > 0
    assert_same_training(runs, ("mse", "auxk", "l0"))


def test_kernels_chosen(monkeypatch, capsys):
    """--kernels: auto is the Triton kernels on CUDA once they pass their check of what will train,
    else torch with a one-line warning; triton insists, on CUDA or under the interpreter only."""
    asked = []

    def choose(flag, device, problem=None):
        monkeypatch.setattr(gpu_check, "self_check", lambda *spec: asked.append(spec) or problem)
        return kernels.choose(flag, device, "batchtopk", "bf16", "ieee", (4096, 768, 24576))
    assert choose("auto", "cpu") == "torch" and not asked  # no check off CUDA
    assert choose("auto", "cuda:1") == "triton" and asked == [("cuda:1", "batchtopk", "bf16", "ieee", (4096, 768, 24576))]
    assert choose("auto", "cuda", "gathered_dot_kernel fp32 16x128/4w has no tensor cores on 75") == "torch"
    assert capsys.readouterr().err == ("WARNING: the Triton kernels failed their check on cuda (gathered_dot_kernel "
                                       "fp32 16x128/4w has no tensor cores on 75); training with the torch path "
                                       "instead (--kernels torch)\n")
    assert choose("triton", "cpu") == "triton" and choose("torch", "cuda") == "torch" and len(asked) == 2
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="--kernels triton on cpu: expected a CUDA device"):
        choose("triton", "cpu")
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(ValueError, match="--kernels triton: Triton is not installed here"):
        choose("triton", "cuda")
    assert choose("auto", "cuda") == "torch" and "(Triton is not installed)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cross_compiled(tmp_path_factory):
    """`python kernels.py --json --ir` for sm_80, sm_90 and gfx942, with a real compiler (not the
    interpreter) and a fresh cache, so that it really compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    r = subprocess.run([sys.executable, "kernels.py", "--json", "--ir", "--jobs", "2", "--arch", "80,90,gfx942"], cwd=HERE,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_kernels_compile_for_gpus(cross_compiled):
    """Every kernel in every tile offered on Ampere (sm_80), Hopper (sm_90) and an MI300 (gfx942),
    compiled by the compilers in Triton's wheel: none spills or keeps a stack, each fits the
    target's shared memory (and fits() said so before compiling), and the products run on
    tensor cores (wgmma on Hopper, MFMA on the MI300) except IEEE fp32's on NVIDIA."""
    rows = cross_compiled
    for target in ("80", "90", "gfx942"):
        limit = gpu_check.SHARED_LIMIT[target]
        offered = {(r["variant"].split()[0], r["variant"].split()[1]) for r in rows if r["target"] == target}
        assert offered == {(k, dt) for k in gpu_check.GEMMS for dt in ("bf16", "fp32/tf32", "fp32/ieee")} | \
            {("bag_sum_kernel", "fp32"), ("gathered_dot_kernel", "fp32")}
        tiles = {size: [t for t in kernels.TILES[size] if kernels.fits(t, size, limit)] for size in (2, 4)}
        assert all(len(t) >= (2 if target != "gfx942" else 1) for t in tiles.values()), tiles  # a real choice on NVIDIA
        assert sum(r["target"] == target for r in rows) == 2 * (len(tiles[2]) + 2 * len(tiles[4])) + 2
    for r in rows:
        assert r["stack"] == 0 and r["spills"] == 0 and r["shared"] <= r["limit"], r
        kernel, dtype = r["variant"].split()[:2]
        gemm = kernel in gpu_check.GEMMS and (dtype != "fp32/ieee" or r["target"] == "gfx942")
        expected = {"80": "mma.sync", "90": "wgmma", "gfx942": "mfma"}[r["target"]]
        assert r["tensor_cores"] == (expected if gemm else "none"), r


def test_spills_and_missing_tensor_cores_are_problems():
    """What the self-check reads off the compiled code (here rows as `python kernels.py` printed them
    for a T4 and an A100): spill stores, and GEMMs without tensor cores where the dtype has them."""
    row = lambda target, variant, spills, cores: dict(target=target, variant=variant, spills=spills, tensor_cores=cores)  # noqa: E731
    assert gpu_check.compiled_problems(row("75", "encode_kernel bf16 64x128x64/4w/2s", 2112, "none")) == [
        "encode_kernel bf16 64x128x64/4w/2s spills (2112 stores)",
        "encode_kernel bf16 64x128x64/4w/2s has no tensor cores on 75"]
    assert gpu_check.compiled_problems(row("75", "pre_grad_kernel fp32/tf32 64x64x32/4w/3s", 0, "none")) == [
        "pre_grad_kernel fp32/tf32 64x64x32/4w/3s has no tensor cores on 75"]
    for variant in ("encode_kernel fp32/ieee 64x64x32/4w/3s", "bag_sum_kernel fp32 16x128/4w"):  # none needed
        assert gpu_check.compiled_problems(row("80", variant, 0, "none")) == []


def test_kernel_offsets_are_64_bit(cross_compiled):
    """Every pointer offset in the GEMM kernels, in every tile (their Triton IR for sm_80 and sm_90),
    is 64-bit: row * m passes 2^31 at B 16,384 and m 131,072, where 32 bits would wrap."""
    gemms = [r for r in cross_compiled if r["target"] in ("80", "90") and r["variant"].split()[0] in gpu_check.GEMMS]
    assert len(gemms) == 2 * 2 * (len(kernels.TILES[2]) + 2 * len(kernels.TILES[4]))
    for r in gemms:
        offsets = re.findall(r"tt\.addptr [^:]*: [^,]*, (\S+)", r["ttir"])
        assert len(offsets) >= 8 and all(o.endswith("xi64>") or o == "i64" for o in offsets), (r["variant"], offsets)
        bm, bn = r["variant"].split()[2].split("x")[:2]
        assert f"tensor<{bm}x{bn}xi64>" in offsets, r["variant"]  # f's tile (and d pre's), [BM, BN]


def test_gpu_script_dry_run_records_every_part(tmp_path):
    """`python gpu_check.py OUTDIR --dry`, the GPU script rehearsed on CPU, on a copy of the code
    whose fused encoder raises when the encoder part times it: every other part runs, passes and
    leaves finite numbers in results.json and its lines in log.txt; the encoder part is recorded
    as failed, with the error's line, and keeps the rows it measured before."""
    code, out, said = tmp_path / "code", tmp_path / "out", "RuntimeError: encode_kernel: out of resources"
    shutil.copytree(HERE, code, ignore=lambda folder, names: [n for n in names if not n.endswith(".py")])
    source = (code / "gpu_check.py").read_text()
    timed = '("kernels.encode, fused", lambda: kernels.encode(x_in, W, b, l1w))'
    assert source.count(timed) == 1
    (code / "gpu_check.py").write_text(source.replace(timed, timed.replace(
        "kernels.encode(x_in, W, b, l1w)", "(_ for _ in ()).throw(RuntimeError('encode_kernel: out of resources'))")))
    r = subprocess.run([sys.executable, "gpu_check.py", str(out), "--dry"], cwd=code, capture_output=True, text=True,
                       timeout=300)
    parts, log = json.load(open(out / "results.json"))["parts"], (out / "log.txt").read_text()
    assert r.returncode == 1 and list(parts) == list(gpu_check.PARTS), r.stdout[-3000:] + r.stderr[-3000:]

    def numbers(rows):
        found = [v for row in rows for v in row.values() if isinstance(v, (int, float))]
        assert found and all(math.isfinite(v) for v in found), rows
        return found
    for name, part in parts.items():
        assert f"== {name}" in log and numbers(part["rows"]) and part["status"] == ("failed" if name == "encoder" else "ok")
        assert name == "encoder" or all(row.get("verdict", "PASS") == "PASS" for row in part["rows"]), part["rows"]
    assert "PASS  self_check topk bf16" in log and "PASS  encode_kernel bf16 64x64x32 at 33x20x65" in log
    encoder = parts["encoder"]["rows"]  # the peak, the bare GEMM, eager torch, then the kernel's error
    assert parts["encoder"]["said"] == f"1 case(s) failed; the first: {encoder[-1]['what']}: {said}"
    assert [row.get("error") for row in encoder] == [None, None, None, said] and numbers(encoder[:3])
    assert f"ERROR {encoder[-1]['what']} | error: {said}" in log and "trouble in encoder;" in log
    assert not (out / "train" / "big").exists()  # GPT-2 and the tokens: deleted


def test_without_triton_train_eval_and_gpt2_run_on_cpu(tiny, tmp_path):
    """Where Triton does not install (macOS, Windows): with it hidden from imports, train_sae.py (at
    its default --kernels auto), eval.py and gpt2.py run on CPU, and --kernels triton says why not."""
    run = tmp_path / "run"
    code = f"""
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
import eval, gpt2, kernels, train_sae
assert kernels.triton is None
train_sae.main({tiny_args(tiny, run, "--layer", "1", steps=8)!r})
eval.main({eval_args(tiny, run, tokens=64)!r})
gpt2.main({["--weights", tiny[0], "--data", tiny[1], "--ctx", "16", "--tokens", "640", "--device", "cpu"]!r})
try:
    train_sae.main({tiny_args(tiny, tmp_path / "other", "--layer", "1", "--kernels", "triton")!r})
except ValueError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(run / "blocks.1.hook_resid_pre" / "eval.json"))["tokens"] == 64
    assert r.stdout.splitlines()[-1] == "--kernels triton: Triton is not installed here (pip install triton; Linux only)"


# -----------------------------------------------------------------------------
# gpt2.py: the model against transformers' GPT-2, both file layouts, stopping early, splicing, the
# loader's refusals; and residual files written for --save_activations.

SMALL = gpt2.GPTConfig(block_size=64, vocab_size=50257, n_layer=3, n_head=4, n_embd=64)


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
    raw = open(path, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        gpt2.from_pretrained(str(tmp_path / "cut.safetensors"), cfg=SMALL)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        gpt2.from_pretrained(str(tmp_path / "nope.safetensors"), cfg=SMALL)


def test_loading_gpt2_says_what_it_loaded(small, capsys):
    hf, path, _ = small
    gpt2.from_pretrained(path)
    n = sum(p.numel() for p in hf.parameters())  # transformers' count; its unembedding is tied too
    assert capsys.readouterr().err == (f"GPT-2 weights: {path} ({os.path.getsize(path) / 1e6:,.0f} MB, "
                                       f"{n / 1e6:.1f}M parameters, 3 layers, d 64)\n")


def test_interrupting_save_activations_leaves_nothing(tiny, tmp_path):
    """Ctrl-C while residuals are written: one line, exit 130, no partial file; before that, a
    live progress line."""
    weights, tokens = tiny
    path = tmp_path / "acts.npy"
    proc = subprocess.Popen([sys.executable, "train_sae.py", "--weights", weights, "--data", tokens, "--ctx", "16",
                             "--layer", "1", "--save_activations", str(path), "--tokens", "20000000", "--device", "cpu"],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "residuals of blocks.1.hook_resid_pre:" not in seen:  # the first progress line, after a second
        seen += proc.stderr.read(1)
        assert proc.poll() is None, seen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted (SIGINT); nothing was written", seen + err
    assert "Traceback" not in err and not os.listdir(tmp_path)


def test_saved_activations_say_what_they_are_and_label_the_sae(tiny, tmp_path, capsys):
    """--save_activations writes a .json beside the .npy; training on the file labels the SAE
    with it, and refuses a --layer that contradicts it. A file without one is labelled
    'unknown', never gpt2, and eval.py, which splices into GPT-2, refuses it."""
    weights, tokens = tiny
    acts = str(tmp_path / "acts.npy")
    train_sae.main(["--weights", weights, "--data", tokens, "--ctx", "16", "--buffer", "512", "--layer", "2",
                    "--save_activations", acts, "--tokens", "3000", "--batch", "64", "--device", "cpu"])
    about = json.load(open(tmp_path / "acts.json"))
    assert {k: about[k] for k in ("model", "hook_name", "layer", "d", "rows", "centered")} == {
        "model": "gpt2", "hook_name": "blocks.2.hook_resid_pre", "layer": 2, "d": 64, "rows": 3000, "centered": False}
    x = np.load(acts)
    model = gpt2.from_pretrained(weights)
    first = data.Contexts(data.corpus(tokens, "train", 16), 16, seed=0).next(1)
    assert np.allclose(x[:15], model.residuals(first, [2])[2][0, :15].detach().numpy(), atol=1e-5)  # the first context

    # A copy of the first rows carries the file's provenance; more rows than it holds are refused.
    train_sae.main(["--activations", acts, "--save_activations", str(tmp_path / "copy.npy"), "--tokens", "1000"])
    assert np.array_equal(np.load(tmp_path / "copy.npy"), x[:1000])
    assert json.load(open(tmp_path / "copy.json")) == {**about, "rows": 1000, "copied_from": acts}
    with pytest.raises(ValueError, match=f"^--tokens 3,001: {acts} holds only 3,000 rows$"):
        train_sae.main(["--activations", acts, "--save_activations", str(tmp_path / "more.npy"), "--tokens", "3001"])

    flags = ["--activations", acts, "--d_sae", "32", "--batch", "64", "--buffer", "512", "--tokens", "640", "--device", "cpu"]
    capsys.readouterr()
    train_sae.main([*flags, "--out", str(tmp_path / "run"), "--weights", "missing.safetensors"])  # unused: not checked
    assert "note: --data and --weights are not used with --activations\n" in capsys.readouterr().err
    cfg = json.load(open(tmp_path / "run" / "blocks.2.hook_resid_pre" / "cfg.json"))
    assert (cfg["model_name"], cfg["hook_name"], cfg["dataset_path"]) == ("gpt2", "blocks.2.hook_resid_pre", acts)
    with pytest.raises(ValueError) as e:
        train_sae.main([*flags, "--out", str(tmp_path / "run3"), "--layer", "3"])
    assert str(e.value) == (f"--layer 3: {tmp_path / 'acts.json'} says the activations are gpt2 "
                            f"blocks.2.hook_resid_pre; expected --layer 2 or none")

    np.save(tmp_path / "wide.npy", np.zeros((100, 512), np.float32))  # a width that contradicts its .json
    shutil.copy(tmp_path / "acts.json", tmp_path / "wide.json")
    with pytest.raises(ValueError) as e:
        train_sae.main([*flags, "--activations", str(tmp_path / "wide.npy"), "--out", str(tmp_path / "wide")])
    assert str(e.value) == f"{tmp_path / 'wide.npy'}: rows of width 512, but {tmp_path / 'wide.json'} says d 64"

    os.remove(tmp_path / "acts.json")
    capsys.readouterr()
    train_sae.main([*flags, "--out", str(tmp_path / "bare"), "--layer", "5"])
    assert "labelled model 'unknown', hook blocks.5.hook_resid_pre (from --layer)" in capsys.readouterr().err
    cfg = json.load(open(tmp_path / "bare" / "blocks.5.hook_resid_pre" / "cfg.json"))
    assert cfg["model_name"] == "unknown"
    with pytest.raises(ValueError) as e:
        evaluation.main([str(tmp_path / "bare"), "--weights", weights, "--data", tokens, "--ctx", "16"])
    assert str(e.value) == (f"{tmp_path / 'bare' / 'blocks.5.hook_resid_pre'}: an SAE of 'unknown' activations "
                            f"(cfg.json model_name), expected gpt2: eval.py splices SAEs into GPT-2; evaluate it on its "
                            f"activations with --activations")


# -----------------------------------------------------------------------------
# eval.py: every metric against float64, on GPT-2's residuals and on activation rows; closed-form
# cases; Bloom's SAEs by name; checks before any work.

def reference_metrics(tiny, weights, layer, center, apply_b_dec=True, arch="standard"):
    """Every metric in float64, from the formulas, on the same held-out contexts."""
    model = gpt2.from_pretrained(tiny[0]).double()
    idx = data.Contexts(data.corpus(tiny[1], "eval", 16), 16).next(10 ** 6)          # all held-out contexts
    W = {k: v.double() for k, v in weights.items()}
    with torch.no_grad():
        resid = model.residuals(idx, [layer])[layer]                                   # [n, T, d]
        mean = resid.mean(-1, keepdim=True) if center else torch.zeros_like(resid[..., :1])
        x = resid - mean
        pre = (x - W["b_dec"] * apply_b_dec) @ W["W_enc"] + W["b_enc"]
        if arch == "topk":
            top = pre.topk(TOPK, dim=-1)
            f = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        else:
            f = torch.relu(pre) * (pre > W["threshold"] if arch == "jumprelu" else 1)
        x_hat = f @ W["W_dec"] + W["b_dec"]
        ce = lambda logits: torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
        clean, spliced = model.logits_from(resid, layer), model.logits_from(x_hat + mean, layer)
        zeroed = model.logits_from(torch.zeros_like(resid), layer)
        ce_clean, ce_sae, ce_zero = ce(clean).mean().item(), ce(spliced).mean().item(), ce(zeroed).mean().item()
        lp, lq = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    x, x_hat, f = x.flatten(0, 1), x_hat.flatten(0, 1), f.flatten(0, 1)
    err, spread = (x - x_hat).pow(2).sum(1), (x - x.mean(0)).pow(2).sum(1)
    return {"explained_variance": (1 - err / spread).mean().item(), "explained_variance_pooled": 1 - (err.sum() / spread.sum()).item(),
            "mse": (x - x_hat).pow(2).mean().item(), "l1": f.sum(1).mean().item(), "l0": (f > 0).sum(1).double().mean().item(),
            "cos": torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean().item(),
            "norm_ratio": (x_hat.norm(dim=1) / x.norm(dim=1)).mean().item(),
            "alive_pct": 100 * (f > 0).any(0).double().mean().item(), "dead": int((~(f > 0).any(0)).sum()),
            "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
            "ce_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean), "kl": kl, "tokens": idx.numel(),
            "largest": f.max(0).values,  # each feature's largest activation, as the dashboard's index lists
            "acts": f.view(*idx.shape, -1), "idx": idx}  # for the dashboard's examples


@pytest.mark.parametrize("center, apply_b_dec, arch", [(True, True, "standard"), (False, True, "standard"),
                                                      (True, False, "standard"), (True, True, "topk"),
                                                      (True, True, "jumprelu")],
                         ids=["bloom-style-centred", "uncentred", "b_dec-not-subtracted", "topk", "jumprelu"])
def test_eval_metrics_match_float64(tiny, tmp_path, center, apply_b_dec, arch):
    weights = random_sae_weights(64, 96, seed=3)
    if arch == "jumprelu":  # thresholds per feature, as a JumpReLU SAE published in SAELens format has
        weights["threshold"] = 0.5 * torch.rand(96, generator=torch.Generator().manual_seed(4))
    folder = write_sae_folder(tmp_path / "blocks.2.hook_resid_pre", weights, 2, center, apply_b_dec, arch)
    evaluation.main(eval_args(tiny, folder) + ["--dashboard"])
    got = json.load(open(folder / "eval.json"))
    ref = reference_metrics(tiny, weights, 2, center, apply_b_dec, arch)
    largest = read_dashboard(folder)[0]["max"]                                # rounded to 3 decimals
    assert max(abs(a - b) for a, b in zip(largest, ref.pop("largest").tolist())) < 1e-3
    check_examples(folder, ref.pop("acts"), ref.pop("idx"))
    assert got["tokens"] == ref["tokens"] and got["dead"] == ref["dead"] and got["centered_input"] == center
    # CE recovered divides by CE_zero - CE_clean, a few thousandths on a random model, so its
    # float32 error is amplified: its parts are checked against float64, the ratio against them.
    for key, value in ref.items():
        if key != "ce_recovered":
            assert abs(got[key] - value) <= 1e-4 * max(1.0, abs(value)), (key, got[key], value)
    assert got["ce_recovered"] == pytest.approx((got["ce_zero"] - got["ce_sae"]) / (got["ce_zero"] - got["ce_clean"]))
    assert 0 < ref["dead"] < 96 and ref["kl"] > 1e-4  # a real test: some features dead, the splice not free


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_eval_on_an_activation_file_matches_float64(tmp_path, capsys, arch):
    """eval.py --activations: no language model; every other metric, from the file's rows, as
    the float64 formulas give them. An SAE trained on another model's rows (labelled 'unknown')
    is evaluated, and a layer that contradicts the file's .json is refused."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3000, 24, generator=g) * torch.linspace(0.2, 3, 24) + 1).numpy().astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    weights = random_sae_weights(24, 40, seed=5)
    if arch == "jumprelu":
        weights["threshold"] = 0.3 * torch.rand(40, generator=g)
    folder = write_sae_folder(tmp_path / "blocks.5.hook_resid_pre", weights, 5, center=False, arch=arch)
    cfg = json.load(open(folder / "cfg.json"))
    json.dump({**cfg, "model_name": "unknown"}, open(folder / "cfg.json", "w"))
    evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--tokens", "2500", "--batch", "3",
                     "--ctx", "100", "--device", "cpu", "--dashboard"])
    got = json.load(open(folder / "eval.json"))
    X, W = torch.from_numpy(x[:2500]).double(), {k: v.double() for k, v in weights.items()}
    pre = (X - W["b_dec"]) @ W["W_enc"] + W["b_enc"]
    if arch == "topk":
        top = pre.topk(TOPK, dim=1)
        f = torch.zeros_like(pre).scatter_(1, top.indices, torch.relu(top.values))
    else:
        f = torch.relu(pre) * (pre > W["threshold"] if arch == "jumprelu" else 1)
    x_hat = f @ W["W_dec"] + W["b_dec"]
    err, spread = (X - x_hat).pow(2).sum(1), (X - X.mean(0)).pow(2).sum(1)
    ref = {"explained_variance": (1 - err / spread).mean().item(), "explained_variance_pooled": 1 - (err.sum() / spread.sum()).item(),
           "mse": (X - x_hat).pow(2).mean().item(), "l1": f.sum(1).mean().item(), "l0": (f > 0).sum(1).double().mean().item(),
           "cos": torch.nn.functional.cosine_similarity(X, x_hat, dim=1).mean().item(),
           "norm_ratio": (x_hat.norm(dim=1) / X.norm(dim=1)).mean().item(), "dead": int((~(f > 0).any(0)).sum())}
    for key, value in ref.items():
        assert abs(got[key] - value) <= 1e-5 * max(1.0, abs(value)), (key, got[key], value)
    assert got["tokens"] == 2500 and not {"ce_clean", "ce_sae", "kl"} & set(got)
    assert got["density_histogram"]["counts"] and sum(got["density_histogram"]["counts"]) == 40
    index, pages = read_dashboard(folder)  # every feature's page: no contexts, no logits, without tokens
    assert sorted(pages) == list(range(40)) and index["vocab"] == []
    for i, page in pages.items():
        assert sorted(page) == ["hist", "similar"] and sum(page["hist"]) == int((f[:, i] > 0).sum()), i
    assert "rows.npy" in capsys.readouterr().out  # the table says what it was evaluated on
    json.dump({"model": "gpt2", "hook_name": "blocks.9.hook_resid_pre", "layer": 9, "d": 24}, open(tmp_path / "rows.json", "w"))
    with pytest.raises(ValueError, match="an SAE of blocks.5.hook_resid_pre, but .*rows.json says the rows are "
                                         "blocks.9.hook_resid_pre"):
        evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--device", "cpu"])


def test_bloom_saes_by_name(tiny, tmp_path, server, monkeypatch, capsys):
    """eval.py bloom:L downloads Bloom's folder (here from a local server with his paths, holding
    a small SAE in his format) into the cache, once, and evaluates it beside ours: one row each,
    on the same held-out tokens."""
    weights = random_sae_weights(64, 96, seed=3)
    theirs = write_sae_folder(tmp_path / "published" / "blocks.1.hook_resid_pre", weights, 1, center=True)
    for name in evaluation.BLOOM_FILES[:2]:
        server["files"][f"/jbloom/blocks.1.hook_resid_pre/{name}"] = (theirs / name).read_bytes()
    server["files"]["/jbloom/blocks.1.hook_resid_pre/sparsity.safetensors"] = b"sparsity, unread"
    monkeypatch.setattr(evaluation, "BLOOM_URL", server["url"] + "/jbloom")
    ours = write_sae_folder(tmp_path / "run" / "blocks.1.hook_resid_pre", random_sae_weights(64, 96, seed=4), 1, True)
    cache = tmp_path / "cache"
    evaluation.main(eval_args(tiny, tmp_path / "run", "bloom:1") + ["--cache_dir", str(cache)])
    local = cache / "bloom" / "blocks.1.hook_resid_pre"
    assert all((local / name).read_bytes() == server["files"][f"/jbloom/blocks.1.hook_resid_pre/{name}"]
               for name in evaluation.BLOOM_FILES)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["SAE", "layer"]
    assert table[1].split()[0] == str(ours) and table[2].split()[0] == "bloom:1"
    got, ref = json.load(open(local / "eval.json")), reference_metrics(tiny, weights, 1, center=True)
    assert got["tokens"] == ref["tokens"] == json.load(open(ours / "eval.json"))["tokens"]
    assert abs(got["explained_variance"] - ref["explained_variance"]) < 1e-5
    requests = len(server["ranges"])
    evaluation.main(eval_args(tiny, "bloom:1") + ["--cache_dir", str(cache)])
    assert len(server["ranges"]) == requests  # cached: nothing fetched again
    for bad in ("bloom:12", "bloom:x"):
        with pytest.raises(ValueError, match=f"^{bad}: expected bloom:L with L in 0..11, or bloom:all$"):
            evaluation.main(eval_args(tiny, bad) + ["--cache_dir", str(cache)])


def test_eval_closed_form_cases(tiny, tmp_path):
    d = 64
    eye = torch.eye(d)
    identity = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * d),  # f = [relu(x), relu(-x)]
                "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(d)}           # x_hat = relu(x) - relu(-x) = x
    zero = {**identity, "W_dec": torch.zeros(2 * d, d)}
    run = tmp_path / "run"
    write_sae_folder(run / "blocks.1.hook_resid_pre", identity, 1, center=True)
    write_sae_folder(run / "blocks.2.hook_resid_pre", zero, 2, center=False)
    evaluation.main(eval_args(tiny, run))
    ident = json.load(open(run / "blocks.1.hook_resid_pre" / "eval.json"))
    assert abs(ident["explained_variance"] - 1) < 1e-6 and abs(ident["explained_variance_pooled"] - 1) < 1e-6
    assert abs(ident["ce_recovered"] - 1) < 1e-4 and abs(ident["kl"]) < 1e-6 and abs(ident["cos"] - 1) < 1e-6
    zeroed = json.load(open(run / "blocks.2.hook_resid_pre" / "eval.json"))
    assert abs(zeroed["ce_recovered"]) < 1e-6 and zeroed["ce_sae"] == pytest.approx(zeroed["ce_zero"], abs=1e-6)
    assert abs(zeroed["explained_variance_pooled"]) < 0.05 and zeroed["cos"] == 0


def test_eval_reads_our_training_output(tiny, tmp_path):
    train_sae.main(tiny_args(tiny, tmp_path / "run", "--layer", "0,2"))
    saes = evaluation.main(eval_args(tiny, tmp_path / "run", tokens=64))
    assert [s["layer"] for s in saes] == [0, 2] and all(s["center"] for s in saes)
    for layer in (0, 2):
        result = json.load(open(tmp_path / "run" / f"blocks.{layer}.hook_resid_pre" / "eval.json"))
        assert result["tokens"] == 64 and result["hook_name"] == f"blocks.{layer}.hook_resid_pre"
        assert sum(result["density_histogram"]["counts"]) == 64  # every feature in one bin


def test_gpt2_and_eval_say_when_the_held_out_split_is_smaller(tiny, tmp_path, capsys):
    """tiny's held-out split: 40 contexts of 16 tokens."""
    folder = write_sae_folder(tmp_path / "blocks.1.hook_resid_pre", random_sae_weights(64, 16, seed=1), 1, center=True)
    short = "the held-out split has only 640 tokens (in contexts of 16); evaluated on 640 of the 1,000,000 asked"
    evaluation.main(eval_args(tiny, folder, tokens=10 ** 6))
    err = capsys.readouterr().err
    assert f"SAE {folder}: layer 1, relu, d_sae 16, centred input\n" in err and short in err
    assert "held-out tokens: 1 file, 40 contexts of 16 (640 tokens, BOS included)" in err  # the same count
    result = json.load(open(folder / "eval.json"))
    assert result["tokens"] == 640 and result["settings"]["tokens_requested"] == 10 ** 6
    evaluation.main(eval_args(tiny, folder, tokens=64))
    assert "held-out split has only" not in capsys.readouterr().err
    assert json.load(open(folder / "eval.json"))["settings"]["tokens_requested"] == 64
    gpt2.main(["--weights", tiny[0], "--data", tiny[1], "--ctx", "16", "--tokens", "1000000"])
    assert short in capsys.readouterr().err
    gpt2.main(["--weights", tiny[0], "--data", tiny[1], "--ctx", "16", "--tokens", "64"])
    assert "held-out split has only" not in capsys.readouterr().err


@pytest.mark.parametrize("case", ["truncated-weights", "broken-cfg", "feature-out-of-range"])
def test_eval_bad_sae_folder_gets_one_line_before_any_work(tiny, tmp_path, case, monkeypatch):
    folder = write_sae_folder(tmp_path / "blocks.2.hook_resid_pre", random_sae_weights(64, 96, seed=3), 2, center=True)
    weights_file, cfg_file = folder / "sae_weights.safetensors", folder / "cfg.json"
    extra = []
    if case == "truncated-weights":
        weights_file.write_bytes(weights_file.read_bytes()[:5000])
        message = f"error: {weights_file}: not a complete safetensors file ("
    elif case == "broken-cfg":
        cfg_file.write_text(cfg_file.read_text()[:-10])
        message = f"error: {cfg_file}: not valid JSON ("
    else:
        extra = ["--dashboard", "--features", "3,99999"]
        message = f"error: --features 99999: expected 0..95 (d_sae of {folder})"
    # In this process (the command line's printing of such errors is tested with BAD_INPUT); before
    # any work: GPT-2 is never loaded.
    monkeypatch.setattr(gpt2, "from_pretrained", lambda *a: pytest.fail("GPT-2 loaded before the check"))
    with pytest.raises((ValueError, OSError)) as e:
        evaluation.main(eval_args(tiny, folder) + extra)
    assert ("error: " + str(e.value)).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("case", ["nan-W_dec", "inf-b_enc", "features-without-dashboard", "wrong-width",
                                  "layer-out-of-range", "ctx-too-long"])
def test_eval_refuses_before_gpt2_loads(tiny, tmp_path, case, monkeypatch):
    """Each refusal is one line, before the held-out tokens are read or GPT-2 is loaded (the tiny
    GPT-2: 3 layers, d 64, contexts of 16, read from its file's header alone)."""
    layer, d = 4 if case == "layer-out-of-range" else 2, 32 if case == "wrong-width" else 64
    weights = random_sae_weights(d, 96, seed=3)
    if case == "nan-W_dec":
        weights["W_dec"][5, 7] = float("nan")
    if case == "inf-b_enc":
        weights["b_enc"][0] = -float("inf")
    folder = write_sae_folder(tmp_path / f"blocks.{layer}.hook_resid_pre", weights, layer, center=True)
    message = {"nan-W_dec": f"{folder}: sae_weights.safetensors's W_dec holds NaN or Inf; expected finite weights",
               "inf-b_enc": f"{folder}: sae_weights.safetensors's b_enc holds NaN or Inf; expected finite weights",
               "features-without-dashboard": "--features 3: expected --dashboard too (only dashboards use it)",
               "wrong-width": f"{folder}: an SAE of width 32, expected GPT-2's 64",
               "layer-out-of-range": f"{folder}: layer 4 out of range: expected 0..3 (blocks.L.hook_resid_pre, "
                                     f"and 3 for the final residual)",
               "ctx-too-long": f"--ctx 32: expected at most 16, the longest context of {tiny[0]}"}[case]
    extra = {"features-without-dashboard": ["--features", "3"], "ctx-too-long": ["--ctx", "32"]}.get(case, [])
    monkeypatch.setattr(data, "corpus", lambda *a: pytest.fail("held-out tokens read before the check"))
    monkeypatch.setattr(gpt2, "from_pretrained", lambda *a: pytest.fail("GPT-2 loaded before the check"))
    with pytest.raises(ValueError) as e:
        evaluation.main(eval_args(tiny, folder) + extra)
    assert str(e.value) == message
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]  # no eval.json


def test_eval_writes_non_finite_metrics_as_null(tmp_path, capsys):
    """Rows a, 0, -a: their mean is 0, so the middle row's spread is 0, and its explained variance
    (1 - err / 0) and |x_hat| / |x| are infinite. eval.json says null for both (JSON has no
    Infinity), and the table a dash."""
    a = torch.randn(24, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "rows.npy", torch.stack([a, torch.zeros(24), -a]).numpy())
    folder = write_sae_folder(tmp_path / "blocks.5.hook_resid_pre", random_sae_weights(24, 40, seed=5), 5, center=False)
    evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--device", "cpu"])
    text = open(folder / "eval.json").read()
    got = json.loads(text, parse_constant=lambda name: pytest.fail(f"eval.json holds a bare {name}"))
    assert got["explained_variance"] is None and got["norm_ratio"] is None
    assert all(math.isfinite(got[k]) for k in ("explained_variance_pooled", "mse", "l1", "l0", "cos"))
    row = capsys.readouterr().out.splitlines()[1].split()  # SAE, layer, var. expl., ..., |x_hat|/|x|, dead
    assert row[2] == "—" and row[-2] == "—" and row[-1].isdigit()
    np.save(tmp_path / "same.npy", np.tile(a.numpy(), (3, 1)))  # no spread at all: the pooled ratio is 0 / 0
    evaluation.main([str(folder), "--activations", str(tmp_path / "same.npy"), "--device", "cpu"])
    assert json.load(open(folder / "eval.json"))["explained_variance_pooled"] is None


@pytest.mark.parametrize("given", ["run-and-sae", "same-twice", "symlink"])
def test_eval_evaluates_a_folder_given_twice_once(tiny, tmp_path, capsys, given):
    folder = write_sae_folder(tmp_path / "run" / "blocks.1.hook_resid_pre", random_sae_weights(64, 16, seed=1), 1,
                              center=True)
    os.symlink(folder, tmp_path / "link")
    second = {"run-and-sae": folder, "same-twice": tmp_path / "run", "symlink": tmp_path / "link"}[given]
    saes = evaluation.main(eval_args(tiny, tmp_path / "run", second, tokens=16))
    assert [s["folder"] for s in saes] == [str(folder)]
    err, out = capsys.readouterr()[::-1]
    assert f"note: {folder if given != 'symlink' else second} given twice; evaluated once\n" in err
    assert len(out.splitlines()) == 3  # the header, one row, the line saying what was written


@pytest.mark.parametrize("source", ["gpt2", "activations"])
def test_eval_progress_is_redrawn_during_a_slow_batch(tiny, tmp_path, capsys, monkeypatch, source):
    """The first batch takes 0.5 s, and the progress line (here redrawn every 0.05 s) shows its
    0 tokens many times meanwhile: progress is time-based, not drawn only once a batch is done."""
    monkeypatch.setattr(data, "progress_line", functools.partial(data.progress_line, every=0.05))
    real, calls = evaluation.sae_input, []

    def slow_first(x, center):
        calls.append(1)
        time.sleep(0.5 if len(calls) == 1 else 0)
        return real(x, center)
    monkeypatch.setattr(evaluation, "sae_input", slow_first)
    if source == "gpt2":
        folder = write_sae_folder(tmp_path / "blocks.1.hook_resid_pre", random_sae_weights(64, 16, seed=1), 1, True)
        evaluation.main(eval_args(tiny, folder, tokens=32) + ["--batch", "1"])
    else:
        np.save(tmp_path / "rows.npy", np.random.default_rng(0).standard_normal((3000, 24), np.float32))
        folder = write_sae_folder(tmp_path / "blocks.5.hook_resid_pre", random_sae_weights(24, 40, seed=5), 5, False)
        evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--batch", "3", "--ctx", "100",
                         "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("\reval pass 1 of 2 (means, firing counts): 0.0") >= 3, err


def fake_progress(seconds, done, total=2_000_000):
    """A data.progress_line whose first `done` of `total` took `seconds`."""
    return types.SimpleNamespace(total=total, done=done, t0=time.time() - seconds, draw=lambda: None)


GPT2_LINE = ("; pass 2 takes at least as long (it runs GPT-2 to the end once per SAE, and for the clean and "
             "zero-ablated logits)")
ADVICE = "; over an hour in all: for a first look, try fewer --tokens (e.g. --tokens 100000)"
ON_CPU = ADVICE + " or a GPU (--device cuda)"


@pytest.mark.parametrize("which, seconds, done, device, activations, line", [
    (1, 60, 1000, "cpu", None, "expected time of eval pass 1: 33.3 h" + GPT2_LINE + ON_CPU),
    (1, 1, 1000, "cpu", None, "expected time of eval pass 1: 33.3 min" + GPT2_LINE + ON_CPU),  # 67 min with pass 2
    (1, 0.5, 1000, "cpu", None, "expected time of eval pass 1: 16.7 min" + GPT2_LINE),
    (1, 1, 1000, "cpu", "rows.npy", "expected time of eval pass 1: 33.3 min; pass 2 takes at least as long" + ON_CPU),
    (2, 1, 1000, "cpu", None, "expected time of eval pass 2: 33.3 min"),
    (2, 60, 1000, "cuda", None, "expected time of eval pass 2: 33.3 h" + ADVICE),
    (1, 60, 2000, "cpu", None, None),  # not the first batch: nothing
], ids=["pass-1-hours", "pass-1-over-an-hour-in-all", "pass-1-under-an-hour", "pass-1-activations",
        "pass-2-under-an-hour", "pass-2-on-cuda", "second-batch"])
def test_eval_says_the_expected_time_after_the_first_batch(capsys, which, seconds, done, device, activations, line):
    """The line after the first 1,000 of 2M tokens took `seconds`: the pass's time, and advice past an hour in all."""
    args = types.SimpleNamespace(device=device, activations=activations)
    evaluation.expected_time(fake_progress(seconds, done), 1000, which, args)
    assert capsys.readouterr().err == (f"\n{line}\n" if line else "")


def test_eval_prints_the_expected_time_of_each_pass_in_order(tiny, tmp_path, capsys):
    """With the tiny GPT-2 (batches of one context of 16 tokens), one line after each pass's first
    batch, on a line of its own between that pass's progress lines; none when one batch is the
    whole pass."""
    folder = write_sae_folder(tmp_path / "blocks.1.hook_resid_pre", random_sae_weights(64, 16, seed=1), 1, True)
    evaluation.main(eval_args(tiny, folder, tokens=32) + ["--batch", "1"])
    err = capsys.readouterr().err
    pass_1 = re.escape("eval pass 1 of 2 (means, firing counts)") + r": [^\n]*\n"
    pass_2 = re.escape("eval pass 2 of 2 (metrics, examples)") + r": [^\n]*\n"
    assert re.search(pass_1 + r"expected time of eval pass 1: \d+ s" + re.escape(GPT2_LINE) + r"\n\r" + pass_1
                     + ".*" + pass_2 + r"expected time of eval pass 2: \d+ s\n\r" + pass_2, err, re.S), err
    evaluation.main(eval_args(tiny, folder, tokens=16) + ["--batch", "1"])
    assert "expected time" not in capsys.readouterr().err


@pytest.mark.parametrize("extra, note", [
    ([], None),
    (["--weights", "nowhere/model.safetensors"], "note: --data and --weights are not used"),
    (["--data", "nowhere.txt", "--weights", "nowhere/model.safetensors"], "note: --data and --weights are not used"),
], ids=["neither", "weights", "data-and-weights"])
def test_eval_on_activations_says_data_and_weights_are_unused(tmp_path, capsys, extra, note):
    """Neither file exists: with --activations neither is read, and the line says so."""
    np.save(tmp_path / "rows.npy", np.random.default_rng(0).standard_normal((300, 24), np.float32))
    folder = write_sae_folder(tmp_path / "blocks.5.hook_resid_pre", random_sae_weights(24, 40, seed=5), 5, False)
    evaluation.main([str(folder), "--activations", str(tmp_path / "rows.npy"), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert (note is None and "note:" not in err) or f"{note} with --activations\n" in err
    assert os.path.isfile(folder / "eval.json")


# -----------------------------------------------------------------------------
# dashboard.py: every feature's page against a search of all contexts at once, a planted feature,
# pages from activation rows, and the page in a real browser.

PLANTED_TOKEN = 23748  # " hello"


@pytest.fixture(scope="module")
def planted(tiny, tmp_path_factory):
    """A GPT-2 whose embedding of one token is large along a direction u, a token stream in
    which that token is common, and an SAE at blocks.0.hook_resid_pre whose feature 5 reads u
    with a threshold that only that token clears."""
    folder = tmp_path_factory.mktemp("planted")
    weights = load_file(tiny[0])
    u = torch.randn(64, generator=torch.Generator().manual_seed(7))
    u /= u.norm()
    weights["transformer.wte.weight"][PLANTED_TOKEN] = 5 * u
    save_file(weights, str(folder / "model.safetensors"))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50000, 40_000)
    tokens[rng.random(40_000) < 0.05] = PLANTED_TOKEN
    data.write_shard(str(folder / "tokens.bin"), tokens.astype(np.uint16))
    sae = random_sae_weights(64, 32, seed=4)
    sae["W_enc"][:, 5], sae["b_enc"][5], sae["b_dec"][:] = u, -2.5, 0
    write_sae_folder(folder / "blocks.0.hook_resid_pre", sae, 0, center=False)
    return str(folder / "model.safetensors"), str(folder / "tokens.bin"), folder / "blocks.0.hook_resid_pre"


def read_dashboard(folder):
    """folder/dashboard/: the index (index.html's INDEX) and every feature's page from the chunk files."""
    html = (folder / "dashboard" / "index.html").read_text(encoding="utf-8")
    start = html.index("const INDEX = ") + len("const INDEX = ")
    index, pages = json.loads(html[start:html.index(";\n", start)]), {}
    for path in (folder / "dashboard").glob("chunk*.js"):
        k, text = int(path.stem[len("chunk"):]), path.read_text(encoding="utf-8")
        head = f"DASHBOARD_CHUNK({k}, "
        assert text.startswith(head) and text.endswith(");\n"), path
        chunk = {int(i): page for i, page in json.loads(text[len(head):-3]).items()}
        assert chunk and all(i // index["chunk"] == k for i in chunk), path
        pages.update(chunk)
    return index, pages


def check_examples(folder, acts, idx, top=12):
    """The dashboard of every feature against its activations acts [n, T, m] on the held-out
    contexts idx [n, T]: the histogram counts its nonzero activations; the top examples are token
    windows (24 before the peak, 8 after) of the contexts with the highest peaks, best first, with
    its activations in thousandths of its max; each fifth holds min(4, contexts there) examples."""
    index, pages = read_dashboard(folder)
    enc, (_, T, m) = data.tokenizer(), acts.shape
    tok = lambda t: enc.decode_single_token_bytes(t).decode("utf-8", errors="replace")
    peak, at = acts.max(1)                                                                   # [n, m]
    assert sorted(pages) == list(range(m)) and index["pages"] is None
    for i, page in pages.items():
        assert abs(sum(page["hist"]) - int((acts[..., i] > 0).sum())) <= 2  # float32 against float64 at 0
        best = [c for c in peak[:, i].argsort(descending=True)[:top].tolist() if peak[c, i] > 0]
        assert len(page["top"]) == len(best), i
        for (ids, q), c in zip(page["top"], best):
            lo, hi = max(0, at[c, i] - 24), min(T, at[c, i] + 9)
            assert [index["vocab"][t] for t in ids] == [tok(t) for t in idx[c, lo:hi].tolist()], (i, c)
            assert max(abs(a - b) for a, b in zip(q, (acts[c, lo:hi, i] / peak[:, i].max() * 1000).tolist())) < 1
        frac = peak[:, i] / peak[:, i].max()
        for g, examples in enumerate(page["intervals"]):
            inside = (frac > g / 5) & (frac <= (g + 1) / 5)
            assert len(examples) == min(4, int(inside.sum())), (i, g)
            assert all(g * 200 - 2 <= max(q) <= (g + 1) * 200 + 2 for _, q in examples)


def planted_dashboard(planted):
    """The planted SAE's dashboard, made once: every feature, in chunks of 8 (4 chunk files)."""
    weights, tokens, folder = planted
    if not (folder / "dashboard").exists():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dashboard, "CHUNK", 8)
            evaluation.main([str(folder), "--weights", weights, "--data", tokens, "--ctx", "16", "--tokens", "100000",
                             "--device", "cpu", "--dashboard", "--top", "6"])
    return read_dashboard(folder)


def test_dashboard_shows_a_planted_feature(planted):
    folder = planted[2]
    index, pages = planted_dashboard(planted)
    assert sorted(p.name for p in (folder / "dashboard").iterdir()) == ["chunk0.js", "chunk1.js", "chunk2.js", "chunk3.js", "index.html"]
    assert sorted(pages) == list(range(32)) and len(index["density"]) == len(index["max"]) == 32
    assert not (folder / "dashboard.tmp").exists() and not (folder / "dashboard.html").exists()
    f5, vocab = pages[5], index["vocab"]
    assert 0.03 < index["density"][5] < 0.08 and len(f5["top"]) == 6  # fires on the planted token only
    for ids, q in f5["top"] + [e for fifth in f5["intervals"] for e in fifth]:
        tokens = [vocab[t] for t in ids]
        peak = max(range(len(q)), key=q.__getitem__)
        assert tokens[peak] == " hello" and q[peak] > 0 and len(ids) == len(q) <= 16  # a window of a 16-token context
        assert all(a == 0 for t, a in zip(tokens, q) if t != " hello")
    assert sum(f5["hist"]) == pytest.approx(index["density"][5] * index["tokens"], rel=1e-3)  # density: 3 digits
    assert len(f5["similar"]) == 8 and len(f5["up"]) == len(f5["down"]) == 10


def test_dashboard_of_chosen_features_replaces_the_old_one(planted, tmp_path):
    """--features: only those features get pages (one chunk file), the index lists every feature,
    and the new folder replaces the old one whole."""
    weights, tokens, planted_folder = planted
    folder = tmp_path / "blocks.0.hook_resid_pre"
    folder.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        shutil.copy(planted_folder / name, folder / name)
    (folder / "dashboard").mkdir()
    (folder / "dashboard" / "chunk9.js").write_text("stale")
    evaluation.main([str(folder), "--weights", weights, "--data", tokens, "--ctx", "16", "--tokens", "20000",
                     "--device", "cpu", "--dashboard", "--features", "6,5"])
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "dashboard", "eval.json", "sae_weights.safetensors"]
    assert sorted(p.name for p in (folder / "dashboard").iterdir()) == ["chunk0.js", "index.html"]
    index, pages = read_dashboard(folder)
    assert index["pages"] == [5, 6] and sorted(pages) == [5, 6] and len(index["density"]) == 32


def test_dashboard_examples_match_a_search_of_all_contexts_at_once(tmp_path):
    """collect_examples, six contexts at a time, keeps what check_examples finds over all 40 at
    once, for all 50 features; in 64-token contexts the windows are cut at both edges."""
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(40, 64, 50, generator=g) - 2)                   # [n, T, m], sparse
    idx = torch.randint(0, 50257, (40, 64), generator=g)
    s = {"folder": "random", "layer": 0, "sae": train_sae.SAE(8, 50), "n": acts[..., 0].numel(),
         "fires": (acts > 0).sum((0, 1)), "max_act": acts.amax((0, 1))}
    dashboard.start_examples(s, evaluation.p.parse_args(["random", "--device", "cpu", "--top", "5"]))
    for b in range(0, 40, 6):
        dashboard.collect_examples(s["dash"], acts[b:b + 6], idx[b:b + 6])
    dashboard.write_folder(str(tmp_path / "dashboard"), dashboard.dashboard_files(s, enc=data.tokenizer()))
    check_examples(tmp_path, acts, idx, top=5)
    assert {len(ids) for ids, _ in read_dashboard(tmp_path)[1][0]["top"]} >= {33}  # a whole window, inside the context


def rows_dashboard(path):
    """A dashboard of a 32-feature SAE collected from rows of activations, as --activations
    gives them: no token contexts and no language model. Returns the activations [rows, m]."""
    sae = train_sae.SAE(64, 32).eval()
    with torch.no_grad():
        f = sae(torch.randn(500, 64, generator=torch.Generator().manual_seed(0)))[1]
    s = {"folder": "rows", "layer": 3, "sae": sae, "n": len(f), "fires": (f > 0).sum(0), "max_act": f.max(0).values}
    dashboard.start_examples(s, evaluation.p.parse_args(["rows", "--device", "cpu"]), tokens=False)
    dashboard.collect_examples(s["dash"], f[None])                             # [1, rows, m], no token ids
    dashboard.write_folder(str(path), dashboard.dashboard_files(s))          # no model, no tokenizer
    return f


def test_dashboard_without_token_contexts(tmp_path):
    f = rows_dashboard(tmp_path / "dashboard")
    index, pages = read_dashboard(tmp_path)
    assert sorted(pages) == list(range(32)) and index["vocab"] == [] and not index["contexts"]
    for i, page in pages.items():
        assert sorted(page) == ["hist", "similar"] and len(page["similar"]) == 8 and i not in dict(page["similar"])
        assert sum(page["hist"]) == int((f[:, i] > 0).sum()) and page["hist"][-1] > 0  # the max is in the last bin


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    import warnings
    warnings.warn("NO CHROMIUM: the dashboard's browser test is SKIPPED (.ci/run installs Debian's chromium)")
    pytest.skip("no Chromium on this machine: install Debian's chromium (.ci/run does)")


def test_dashboard_opens_in_a_browser_without_errors(planted, tmp_path):
    """Headless Chromium renders the pages from file:// (the JavaScript builds the DOM, and loads a
    feature's chunk file when it is opened), with no console message."""
    browser = chromium()
    index, pages = planted_dashboard(planted)
    shutil.copytree(planted[2] / "dashboard", tmp_path / "dashboard")
    # A copy of the page that types 17 into the search box and clicks "show".
    html = (tmp_path / "dashboard" / "index.html").read_text(encoding="utf-8")
    search = '<script>document.getElementById("search").value = "17"; document.getElementById("go").click();</script>'
    (tmp_path / "dashboard" / "search.html").write_text(html.replace("</body>", search + "</body>"), encoding="utf-8")
    rows_dashboard(tmp_path / "rows")

    def render(page, fragment=""):
        r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                            "--virtual-time-budget=5000", "--dump-dom", (tmp_path / page).as_uri() + fragment],
                           capture_output=True, text=True, timeout=120)
        console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
        assert r.returncode == 0 and not console, console or r.stderr[-2000:]
        return r.stdout

    def shows(dom, i):  # feature i's page, with every example it has
        examples = len(pages[i]["top"]) + sum(map(len, pages[i]["intervals"]))
        assert f"<h2>Feature {i}</h2>" in dom and examples > 0 and dom.count('class="tok peak"') == examples, i

    # Features 0, 5 (the planted one), 17 (found by the search box) and 31, in chunks 0, 0, 2 and 3.
    dom = render("dashboard/index.html", "#f=0")
    shows(dom, 0)
    assert dom.count("<tr") == 1 + 32 and "page 1 of 1" in dom  # the index: a header and one row per feature
    assert "Every feature has a full page" in dom and all(f'<a href="#f={i}">{i}</a>' in dom for i in range(32))
    dom = render("dashboard/index.html", "#f=5")
    shows(dom, 5)
    peaks = dom.split('class="tok peak"')[1:]
    assert all(p.split(">", 1)[1].startswith(" hello<") for p in peaks)  # the peak token of every example
    # The histogram's axes: count, and activation from 0 to the max.
    assert '<div class="ylabel">count</div>' in dom and f'<span>{max(pages[5]["hist"])}</span><span>0</span>' in dom
    assert f'<span>0</span><span>activation</span><span>{index["max"][5]:.3f}</span>' in dom
    shows(render("dashboard/search.html"), 17)
    shows(render("dashboard/index.html", "#f=31"), 31)
    # A feature beyond the SAE: said so, and the index stays on a real page.
    dom = render("dashboard/index.html", "#f=5000")
    assert "no feature 5000 (this SAE has 0..31)" in dom and "page 1 of 1" in dom and dom.count("<tr") == 1 + 32
    # Without token contexts or a language model: the histogram and the closest directions only.
    dom = render("rows/index.html", "#f=3")
    assert "<h2>Feature 3</h2>" in dom and "No token contexts" in dom and "Closest decoder directions" in dom
    assert "<h3>Raises the logits" not in dom and '<div class="ylabel">count</div>' in dom


# -----------------------------------------------------------------------------
# data.py: downloads, against a real HTTP server on 127.0.0.1 that honours Range requests and can
# cut its first response short; progress lines; tokens, shards and contexts; activation files.


@pytest.fixture
def server():
    state = {"files": {}, "ranges": [], "cut_first_at": None, "errors": []}  # errors: statuses to answer first

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if state["errors"]:
                self.send_error(state["errors"].pop(0))
                return
            if self.path.startswith("/redirect/"):  # as Hugging Face sends downloads to its CDN
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/redirect"))
                self.end_headers()
                return
            payload = state["files"][self.path]
            rng = self.headers.get("Range")
            state["ranges"].append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            self.send_header("Content-Length", str(len(payload) - start))
            self.end_headers()
            body = payload[start:]
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
    payload = os.urandom(3_000_000)
    server["files"]["/w.bin"] = payload
    dest = str(tmp_path / "sub" / "w.bin")
    import hashlib
    data.download(server["url"] + "/w.bin", dest, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    assert open(dest, "rb").read() == payload and not os.path.exists(dest + ".part")
    data.download(server["url"] + "/w.bin", dest)  # cached: no second request
    assert server["ranges"] == [None]


def test_download_cut_midway_resumes(server, tmp_path):
    payload = os.urandom(2_500_000)
    server["files"]["/w.bin"] = payload
    server["cut_first_at"] = 1_000_000
    dest = str(tmp_path / "w.bin")
    data.download(server["url"] + "/redirect/w.bin", dest, size=len(payload))
    assert open(dest, "rb").read() == payload
    assert server["ranges"] == [None, "bytes=1000000-"]  # the second request resumed, past the redirect


def test_download_resumes_a_part_left_by_an_earlier_run(server, tmp_path):
    payload = os.urandom(1_000_000)
    server["files"]["/w.bin"] = payload
    dest = str(tmp_path / "w.bin")
    with open(dest + ".part", "wb") as f:
        f.write(payload[:300_000])
    data.download(server["url"] + "/w.bin", dest, size=len(payload))
    assert open(dest, "rb").read() == payload and server["ranges"] == ["bytes=300000-"]
    # A part that is already whole (killed between the last byte and the rename) is finished.
    dest2 = str(tmp_path / "w2.bin")
    with open(dest2 + ".part", "wb") as f:
        f.write(payload)
    data.download(server["url"] + "/w.bin", dest2, size=len(payload))
    assert open(dest2, "rb").read() == payload and server["ranges"][-1] == "bytes=1000000-"


def test_download_refuses_size_or_hash_mismatch(server, tmp_path):
    payload = os.urandom(500_000)
    server["files"]["/w.bin"] = payload
    dest = str(tmp_path / "w.bin")
    with pytest.raises(ValueError, match="500,000 bytes, expected 500,001"):
        data.download(server["url"] + "/w.bin", dest, size=len(payload) + 1)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    with pytest.raises(ValueError, match="SHA-256 differs"):
        data.download(server["url"] + "/w.bin", dest, sha256="0" * 64)
    assert os.listdir(tmp_path) == []


def test_download_without_network_fails_at_once(tmp_path, monkeypatch, capsys):
    """No retries for what a retry cannot mend: a name that does not resolve (.invalid never
    does), a port nobody listens on, a 404; and no .part named when none was written."""
    calls = []
    fetch = data.fetch_rest
    monkeypatch.setattr(data, "fetch_rest", lambda *a: calls.append(a) or fetch(*a))
    for url, message in [("http://nonexistent.invalid/x", "cannot reach nonexistent.invalid: name resolution failed (no network?)"),
                         (f"http://127.0.0.1:{free_port()}/x", "cannot reach 127.0.0.1: connection refused")]:
        calls.clear()
        t0 = time.time()
        with pytest.raises(OSError) as e:
            data.download(url, str(tmp_path / "cache" / "x.bin"))
        assert str(e.value) == message and len(calls) == 1 and time.time() - t0 < 5
    assert "transfer broke" not in capsys.readouterr().err and os.listdir(tmp_path) == []  # not even the folder
    # GPT-2's weights and FineWeb say that local files will do
    monkeypatch.setattr(gpt2, "GPT2_URL", "http://nonexistent.invalid/model.safetensors")
    monkeypatch.setattr(data, "FINEWEB_URL", "http://nonexistent.invalid/fineweb_{}_{:06d}.bin")
    for load in (lambda: gpt2.from_pretrained(None, str(tmp_path)), lambda: data.corpus("fineweb", "eval")[0]()):
        with pytest.raises(OSError) as e:
            load()
        assert str(e.value).endswith("(no network?); offline, --weights and --data take local files"), str(e.value)
    assert os.listdir(tmp_path) == []


def test_download_retries_server_errors_and_names_the_part_only_when_there_is_one(server, tmp_path, capsys):
    payload = os.urandom(1_000_000)
    server["files"]["/w.bin"] = payload
    dest, url = str(tmp_path / "w.bin"), server["url"] + "/w.bin"
    server["errors"] = [404]
    with pytest.raises(OSError, match=r"^download of .*/w.bin failed: HTTP 404 Not Found$"):
        data.download(url, dest)
    server["errors"] = [503, 503]  # a server error is worth a retry; no byte came, so no .part
    with pytest.raises(OSError, match=r"HTTP Error 503: Service Unavailable\) after 2 tries$"):
        data.download(url, dest, retries=1)
    assert capsys.readouterr().err.count("transfer broke") == 1 and os.listdir(tmp_path) == []
    server["cut_first_at"] = 300_000  # a broken transfer leaves a .part, which the message names
    with pytest.raises(OSError, match=f"after 1 try; run again to resume from {dest}.part$"):
        data.download(url, dest, retries=0)
    assert os.path.getsize(dest + ".part") == 300_000
    with pytest.raises(OSError, match=f"^cannot reach 127.0.0.1: connection refused; run again to resume from {dest}.part$"):
        data.download(f"http://127.0.0.1:{free_port()}/w.bin", dest)
    data.download(url, dest, size=len(payload))  # and the next run resumes it
    assert open(dest, "rb").read() == payload and server["ranges"][-1] == "bytes=300000-"


def test_progress_picks_a_readable_scale(capsys, monkeypatch):
    monkeypatch.setattr(data, "time", types.SimpleNamespace(time=lambda: 1010.0))  # 10 s after t0
    t0 = 1000.0
    data.progress("eval", 12_300, 50_000, t0, unit="tokens")
    data.progress("model.safetensors", 120_500_000, 548_105_171, t0)
    data.progress("shard.bin", 2_500, None, t0)
    data.progress("eval", 300, 900, t0, unit="tokens")
    lines = [line.strip() for line in capsys.readouterr().err.split("\r") if line]
    assert lines == ["eval: 12.3k/50.0k tokens (25%) at 1.23k tokens/s, 10 s",
                     "model.safetensors: 120.5/548.1 MB (22%) at 12.05 MB/s, 10 s",
                     "shard.bin: 2.5 kB at 250.00 B/s, 10 s",
                     "eval: 300.0/900.0 tokens (33%) at 30.00 tokens/s, 10 s"]


# Tokens.


def test_progress_is_redrawn_by_time_and_quiet_work_prints_nothing(capsys):
    with data.progress_line("slow", 100, "tokens", every=0.05) as shown:
        time.sleep(0.3)  # one long piece of work, with no update
        shown.done = 100
    err = capsys.readouterr().err
    assert err.count("\rslow: 0.0/100.0 tokens (0%)") >= 3 and err.endswith("100.0/100.0 tokens (100%) at " +
                                                                           err.rsplit(" at ", 1)[1]) and err[-1] == "\n"
    with data.progress_line("quick", 100, "tokens", quiet=1.0) as shown:
        shown.done = 100
    with pytest.raises(KeyboardInterrupt), data.progress_line("cut", 100, "tokens") as shown:
        raise KeyboardInterrupt
    assert capsys.readouterr().err == "\rcut: 0.0/100.0 tokens (0%) at 0.00 tokens/s, 0 s  "  # no line end: the message ends it


@pytest.fixture(scope="module")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


TEXT = ("The residual stream is the sum of every layer's output.\n\n  Indented line; café, naïve, 東京.\n" * 40
        + "<|endoftext|>" + "A second document, with numbers 12345 and symbols #@!.\n" * 60
        + "<|endoftext|>" + "Third.\n")


def test_text_round_trips(tmp_path, enc, monkeypatch):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    tokens = data.read_shard(str(tmp_path / "a.txt"), str(tmp_path / "cache"))
    assert tokens[0] == data.BOS and enc.decode(tokens.tolist()) == "<|endoftext|>" + TEXT
    assert tokens.tolist() == [data.BOS] + enc.encode(TEXT, allowed_special={"<|endoftext|>"})
    assert (tokens == data.BOS).sum() == 3  # one before each document
    # A large file is read in pieces; the tokens still decode to the text exactly.
    monkeypatch.setattr(data, "TEXT_PIECE_CHARS", 100)
    (tmp_path / "b.txt").write_text(TEXT, encoding="utf-8")
    pieces = data.read_shard(str(tmp_path / "b.txt"), str(tmp_path / "cache"))
    assert enc.decode(pieces.tolist()) == "<|endoftext|>" + TEXT and (pieces == data.BOS).sum() == 3


def test_shard_formats_read_back(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 10_000).astype(np.uint16)
    data.write_shard(str(tmp_path / "headered.bin"), tokens)
    tokens.tofile(tmp_path / "raw.bin")  # nanoGPT's train.bin layout
    np.save(tmp_path / "a.npy", tokens)
    for name in ("headered.bin", "raw.bin", "a.npy"):
        assert np.array_equal(data.read_shard(str(tmp_path / name)), tokens), name
    assert isinstance(data.read_shard(str(tmp_path / "headered.bin")), np.memmap)
    with open(tmp_path / "headered.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(ValueError, match="for the 10,000 tokens its header declares"):
        data.read_shard(str(tmp_path / "headered.bin"))
    np.save(tmp_path / "wide.npy", tokens.astype(np.int32))
    with pytest.raises(ValueError, match="int32 array of shape .* expected 1-D uint16"):
        data.read_shard(str(tmp_path / "wide.npy"))


def shard_files(tmp_path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i, n in enumerate(sizes):
        a = rng.integers(0, 50000, n).astype(np.uint16)
        data.write_shard(str(tmp_path / f"s{i}.bin"), a)
        paths.append(str(tmp_path / f"s{i}.bin"))
        arrays.append(a)
    return paths, arrays


def test_contexts_cover_the_corpus_once_per_epoch(tmp_path):
    ctx = 16
    paths, arrays = shard_files(tmp_path, [15 * 50 + 7, 15 * 30])
    stream = data.Contexts(data.corpus(paths, "train", ctx), ctx, seed=1)
    # Each file holds back its last max(1, 1%) windows: one here.
    train_windows = {a[w * 15:(w + 1) * 15].tobytes() for a in arrays for w in range(len(a) // 15 - 1)}
    n_train = 49 + 29
    rows = stream.next(n_train)
    assert rows.shape == (n_train, ctx) and (rows[:, 0] == data.BOS).all()
    seen = [r[1:].numpy().astype(np.uint16).tobytes() for r in rows]
    assert len(set(seen)) == n_train and set(seen) == train_windows
    assert stream.state_dict()["epoch"] == 1
    again = stream.next(n_train)  # epoch 1: the same windows in another order
    assert sorted(r[1:].numpy().tobytes() for r in again) == sorted(r[1:].numpy().tobytes() for r in rows)
    assert not torch.equal(again, rows)
    # The held-out windows are the last of each file, and none of them is served for training.
    held = data.Contexts(data.corpus(paths, "eval", ctx), ctx)
    heldout = held.next(100)
    assert len(heldout) == 2 and len(held.next(5)) == 0
    assert torch.equal(heldout[0, 1:], torch.from_numpy(arrays[0][49 * 15:50 * 15].astype(np.int64)))
    assert not {r[1:].numpy().astype(np.uint16).tobytes() for r in heldout} & set(seen)


def test_contexts_are_deterministic_and_resume(tmp_path):
    paths, _ = shard_files(tmp_path, [2000, 1000, 1500])
    make = lambda seed: data.Contexts(data.corpus(paths, "train", 32), 32, seed=seed)
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


def test_corpus_checks_every_file_at_once(tmp_path, capsys):
    paths, _ = shard_files(tmp_path, [1000, 500])
    (tmp_path / "odd.bin").write_bytes(bytes(1001))
    # The bad file is the second of three: refused now, not when the stream reaches it.
    with pytest.raises(ValueError, match="odd.bin: odd size 1,001 bytes, expected uint16 tokens"):
        data.corpus([paths[0], str(tmp_path / "odd.bin"), paths[1]], "train", 16)
    capsys.readouterr()
    # 66 and 33 windows of 15 tokens: the last of each is held out, with the leftover tokens.
    assert len(data.corpus(paths, "train", 16)) == 2 and len(data.corpus(",".join(paths), "eval", 16)) == 2
    assert capsys.readouterr().err == ("training tokens: 2 files, 97 contexts of 16 (1,552 tokens, BOS included)\n"
                                       "held-out tokens: 2 files, 2 contexts of 16 (32 tokens, BOS included)\n")
    shards = data.corpus("fineweb", "train", cache_dir=str(tmp_path / "cache"))  # nothing is fetched yet
    assert len(shards) == 103 and not os.path.exists(tmp_path / "cache")
    assert "103 shards of about 100M tokens, each downloaded (200 MB) when the stream reaches it" in capsys.readouterr().err


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    data.write_shard(str(tmp_path / "t.bin"), np.full(500, 60000, np.uint16))
    with pytest.raises(ValueError, match="token id 60000 in the corpus, expected < 50257"):
        data.Contexts(data.corpus(str(tmp_path / "t.bin"), "train", 16), 16, seed=0).next(2)


def test_tokenizer_offline_gets_one_line(tmp_path):
    """No network and no cached vocabulary: one line that says where tiktoken looks, and for what."""
    (tmp_path / "a.txt").write_text("Some text.\n")
    (tmp_path / "empty").mkdir()
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update({"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                **{k: "http://127.0.0.1:9" for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}})
    for args in (["gpt2.py", "--data", str(tmp_path / "a.txt")], ["eval.py", str(tmp_path), "--dashboard"]):
        r = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith("error: cannot load GPT-2's tokenizer") and f"TIKTOKEN_CACHE_DIR (now {tmp_path / 'empty'})" in err
        assert "vocab.bpe and encoder.json, named 6d1cbeee0f20b3d9449abfede4726ed8212e3aee and " \
               "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6" in err and "with network, tiktoken fetches it" in err
    assert not os.path.exists(tmp_path / "cache")  # nothing was cached, so no folder either


def activation_run(tmp_path, x, *extra, steps=100):
    """train_sae.main on the activation rows x [N, 16], in this process (the command line's
    one-line errors are tested above): the error it raises, or None."""
    np.save(tmp_path / "acts.npy", x)
    try:
        train_sae.main(["--activations", str(tmp_path / "acts.npy"), "--out", str(tmp_path / "run"), "--d_sae", "32",
                        "--batch", "64", "--buffer", "512", "--tokens", str(64 * steps), "--log_every", "1",
                        "--device", "cpu", *extra])
    except (ValueError, FloatingPointError) as e:
        return str(e)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_input_row_is_named(tmp_path, bad):
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    x[1234, 5] = bad
    error = activation_run(tmp_path, x)
    assert error == f"{tmp_path / 'acts.npy'}: row 1,234 is not finite (NaN or Inf); expected finite activations"


# -----------------------------------------------------------------------------
# runs.py: one line for bad input and for signals; checkpoints and --resume after real kills; the
# run folder; what a run prints; and several processes (real process groups, gloo, on 127.0.0.1).

# Bad input on the command line: one line, non-zero exit, no traceback.


def run_cli(*args, cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([sys.executable, *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr.strip()


BAD_INPUT = [
    (["train_sae.py", "--layer", "13"], "error: layer 13 out of range: expected 0..12"),
    (["train_sae.py", "--layer", "nine"], "error: --layer 'nine': expected a number"),
    (["train_sae.py", "--data", "missing.txt"], "error: token file not found: missing.txt"),
    (["train_sae.py", "--batch", "0"], "error: --batch 0: expected a positive number"),
    (["train_sae.py", "--tokens", "100"], "error: --tokens 100: expected at least one batch (4096)"),
    (["train_sae.py", "--layer", "3,4", "--activations", "a.npy"], "error: --layer 3,4: expected one layer"),
    (["train_sae.py", "--activations", "{tmp}/missing.npy", "--out", "{tmp}/run"], "error: activations file not found"),
    (["train_sae.py", "--resume", "{tmp}/nothing"], "error: no run to resume in"),
    (["train_sae.py", "--arch", "topk", "--k", "0"], "error: --k 0: expected 1..24576 (--d_sae)"),
    (["train_sae.py", "--k", "16"], "error: --k 16: not a flag of --arch relu, which would ignore it"),
    (["train_sae.py", "--arch", "batchtopk", "--l1", "0.1"], "error: --l1 0.1: not a flag of --arch batchtopk, which"),
    (["train_sae.py", "--layer", ""], "error: --layer '': expected a number"),
    (["train_sae.py", "--arch", "matryoshka", "--prefixes", "512,256,24576"],
     "error: --prefixes 512,256,24576: expected increasing widths ending at --d_sae (24576)"),
    (["train_sae.py", "--arch", "matryoshka", "--prefixes", "512,4096"],
     "error: --prefixes 512,4096: expected increasing widths ending at --d_sae (24576)"),
    (["train_sae.py", "--arch", "matryoshka", "--prefixes", "half,all"], "error: --prefixes half,all: expected comma-separated"),
    (["train_sae.py", "--arch", "topk", "--prefixes", "512,24576"], "error: --prefixes 512,24576: not a flag of --arch topk"),
    (["train_sae.py", "--arch", "jumprelu", "--target_l0", "0"], "error: --target_l0 0.0: expected a positive number"),
    (["train_sae.py", "--arch", "jumprelu", "--bandwidth", "-1"], "error: --bandwidth -1.0: expected a positive number"),
    (["train_sae.py", "--arch", "jumprelu", "--threshold_rate", "0.5"], "error: --threshold_rate 0.5: not a flag of --arch jumprelu"),
    (["train_sae.py", "--target_l0", "30"], "error: --target_l0 30.0: not a flag of --arch relu"),
    (["train_sae.py", "--activations", "{tmp}/empty.npy", "--out", "{tmp}/run"], "error: {tmp}/empty.npy: not a complete .npy file"),
    (["train_sae.py", "--activations", "{tmp}/ints.npy", "--out", "{tmp}/run"],
     "error: {tmp}/ints.npy: int64 rows, expected floating-point activations"),
    (["train_sae.py", "--save_activations", "{tmp}/nodir/x.npy"],
     "error: --save_activations {tmp}/nodir/x.npy: expected a .npy path in a folder that exists"),
    (["train_sae.py", "--resume", "{tmp}/broken"], "error: {tmp}/broken/run.json: not valid JSON (Expecting"),
    (["train_sae.py", "--arch", "batchtopk", "--threshold_rate", "2"], "error: --threshold_rate 2.0: expected a rate in (0, 1]"),
    (["train_sae.py", "--device", "gpu"], "error: --device gpu: expected cpu, cuda, cuda:N or mps"),
    (["eval.py", "{tmp}", "--device", "gpu"], "error: --device gpu: expected cpu, cuda, cuda:N or mps"),
    (["train_sae.py", "--activations", "{tmp}/cut.npy", "--out", "{tmp}/run"], "error: {tmp}/cut.npy: not a complete .npy file"),
    (["train_sae.py", "--activations", "{tmp}/cut.safetensors", "--out", "{tmp}/run"],
     "error: {tmp}/cut.safetensors: not a complete .safetensors file"),
    (["train_sae.py", "--weights", "{tmp}"], "error: --weights {tmp} is a directory, expected a model.safetensors file"),
    (["train_sae.py", "--out", "{tmp}/a.bin"], "error: --out {tmp}/a.bin: a file, expected a run folder"),
    (["eval.py", "{tmp}/nothing"], "error: no such folder"),
    (["eval.py", "{tmp}"], "no SAE in it (expected cfg.json, or folders blocks.L.hook_resid_pre/)"),
    (["eval.py", "{tmp}", "--tokens", "0"], "error: --tokens 0: expected a positive number"),
    (["gpt2.py", "--data", "{tmp}/latin1.txt"], "not UTF-8 text"),
    (["gpt2.py", "--data", "{tmp}/empty.txt"], "error: empty corpus"),
    (["train_sae.py", "--data", "{tmp}/empty.txt", "--out", "{tmp}/run"], "error: empty corpus"),
    (["gpt2.py", "--data", "{tmp}/a.bin", "--weights", "{tmp}/missing.safetensors"],
     "error: weights file not found"),
    (["gpt2.py", "--data", "{tmp}/a.bin", "--weights", "{tmp}"], "is a directory, expected a model.safetensors file"),
    (["eval.py", "{tmp}", "--weights", "{tmp}"], "is a directory, expected a model.safetensors file"),
    (["gpt2.py", "--data", "{tmp}/a.bin,{tmp}/odd.bin"], "odd.bin: odd size 1,001 bytes, expected uint16 tokens"),
    (["gpt2.py", "--tokens", "0"], "error: --tokens 0: expected a positive number"),
    (["eval.py", "{tmp}", "--features", "abc"], "error: --features 'abc': expected comma-separated feature numbers"),
    (["bench.py", "--sections", "gpt2,nonsense"],
     "error: --sections 'nonsense': expected a comma-separated list of gpt2, step, train, precision, ranks, realacts"),
    (["bench.py", "--sections", "realacts", "--recipes", "topk,gated"],
     "error: --recipes 'gated': expected a comma-separated list of relu, topk, batchtopk, matryoshka, jumprelu, jumprelu-tanh"),
    (["bench.py", "--sections", "realacts", "--families", "ours,sparsify"],
     "error: --families 'sparsify': expected a comma-separated list of ours, saelens, saelens-defaults"),
]


MAINS = {"train_sae.py": train_sae.main, "eval.py": evaluation.main, "gpt2.py": gpt2.main}


# Run as real command lines too: the first case of each script, and a missing file (an OSError,
# not a ValueError). bench.py runs at import, so its cases are command lines only.
COMMAND_LINES = sorted({[args[0] for args, _ in BAD_INPUT].index(script) for script in ("train_sae.py", "eval.py", "gpt2.py")}
                       | {i for i, (args, _) in enumerate(BAD_INPUT) if args[0] == "bench.py" or "missing.txt" in args})


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """The bad files, and the COMMAND_LINES run as subprocesses, side by side: each spends about
    1.5 s importing torch, so on 2 cores that halves the wait. Each has its own cache."""
    from concurrent.futures import ThreadPoolExecutor
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (tmp / "empty.txt").write_text("")
    data.write_shard(str(tmp / "a.bin"), np.arange(1000, dtype=np.uint16))
    (tmp / "odd.bin").write_bytes(bytes(1001))
    np.save(tmp / "cut.npy", np.zeros((1000, 16), np.float32))
    np.save(tmp / "ints.npy", np.zeros((1000, 16), np.int64))
    (tmp / "empty.npy").write_bytes(b"")
    os.makedirs(tmp / "broken")
    (tmp / "broken" / "run.json").write_text('{"layer": "9", ')  # cut short
    (tmp / "broken" / "checkpoint.json").write_text('{"step": 10, "ranks": 1, "parallel": "data"}')
    save_file({"x": torch.zeros(1000, 16)}, str(tmp / "cut.safetensors"))
    for name in ("cut.npy", "cut.safetensors"):  # truncated, as by a full disk or a killed copy
        (tmp / name).write_bytes((tmp / name).read_bytes()[:3000])
    run = lambda i: run_cli(*[a.format(tmp=tmp) for a in BAD_INPUT[i][0]], cache=tmp / "caches" / str(i))
    with ThreadPoolExecutor(4) as pool:
        return tmp, dict(zip(COMMAND_LINES, pool.map(run, COMMAND_LINES)))


@pytest.mark.parametrize("i", range(len(BAD_INPUT)), ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_gets_one_line(bad_input_runs, i, monkeypatch):
    """Each script's main raises the error that its __main__ prints as one line (ValueError or
    OSError, a message without a line break); the COMMAND_LINES show that it does, with no
    traceback and a non-zero exit."""
    tmp, command_lines = bad_input_runs
    (script, *argv), message = [a.format(tmp=tmp) for a in BAD_INPUT[i][0]], BAD_INPUT[i][1].format(tmp=tmp)
    if i in command_lines:
        code, err = command_lines[i]
        assert code != 0 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    if script in MAINS:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "caches" / f"in-process-{i}"))
        monkeypatch.chdir(HERE)  # relative paths, as the command lines have them
        with pytest.raises((ValueError, OSError)) as e:
            MAINS[script](argv)
        assert message in "error: " + str(e.value) and "\n" not in str(e.value), str(e.value)
    else:
        assert i in command_lines


def test_help_shows_each_default_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor  # side by side: each spends 1.5 s importing torch
    help_of = lambda script: subprocess.run([sys.executable, script, "--help"], cwd=HERE, capture_output=True,
                                            text=True, timeout=120)
    scripts = ("train_sae.py", "gpt2.py", "eval.py", "bench.py")
    with ThreadPoolExecutor(4) as pool:
        helps = dict(zip(scripts, pool.map(help_of, scripts)))
    for script, r in helps.items():
        text = " ".join(r.stdout.split())  # one line: argparse wraps the help at the terminal's width
        assert r.returncode == 0 and "(default:" in text, (script, r.stderr)
        assert "(default: None)" not in text and "(default: )" not in text, script
        assert not re.search(r"\(default:[^()]*\) \(default:", text), script
    # bench.py names its sections and shows which run by default
    assert "of gpt2, step, train, precision, ranks, realacts" in text and "(default: gpt2,step,train,precision,ranks)" in text


def read_stderr_until(proc, text, timeout=60):
    """What proc has written to stderr once `text` appears in it (progress lines end in \\r, not \\n)."""
    got, deadline = "", time.time() + timeout
    while text not in got:
        assert proc.poll() is None and time.time() < deadline, got
        if select.select([proc.stderr], [], [], 0.5)[0]:
            got += os.read(proc.stderr.fileno(), 1 << 16).decode()
    return got


@pytest.mark.parametrize("script, how", [("eval.py", signal.SIGINT), ("eval.py", signal.SIGTERM), ("gpt2.py", signal.SIGINT)],
                         ids=["eval-SIGINT", "eval-SIGTERM", "gpt2-SIGINT"])
def test_interrupt_ends_with_one_line(tiny, tmp_path, script, how):
    tokens = str(tmp_path / "tokens.bin")
    data.write_shard(tokens, np.random.default_rng(0).integers(0, 50257, 10_000_000).astype(np.uint16))  # 100k held out
    folder = write_sae_folder(tmp_path / "blocks.2.hook_resid_pre", random_sae_weights(64, 96, seed=3), 2, center=True)
    args = [str(folder)] if script == "eval.py" else []
    proc = subprocess.Popen([sys.executable, script, *args, "--weights", tiny[0], "--data", tokens, "--ctx", "16",
                             "--tokens", "100000"], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = read_stderr_until(proc, "eval pass 1 of 2" if script == "eval.py" else "scoring held-out tokens")
    proc.send_signal(how)
    err += proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 128 + how and "Traceback" not in err, err
    after_progress = err.rsplit("\r", 1)[1].strip().splitlines()  # the last progress line, then the message
    what = "nothing was written" if script == "eval.py" else "stopped before the result"
    assert len(after_progress) == 2 and after_progress[1] == f"interrupted ({how.name}); {what}", err
    assert sorted(os.listdir(folder)) == ["cfg.json", "sae_weights.safetensors"]  # no eval.json, no .tmp


def signal_during_step(monkeypatch, at_step, signum, times):
    """Make this process receive `signum` `times` times while train_step runs step `at_step`."""
    real, sent = train_sae.train_step, []

    def step(t, x, s, *args, **kwargs):
        if s == at_step and not sent:
            sent.append(s)
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(t, x, s, *args, **kwargs)
    monkeypatch.setattr(train_sae, "train_step", step)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_a_kill_gives_the_same_weights(tiny, tmp_path, how, capsys):
    """The run that is killed is a real process; the others run in this one."""
    extra = ["--layer", "0,2", "--checkpoint_every", "256"]
    train_sae.main(tiny_args(tiny, tmp_path / "whole", *extra, steps=200))
    code, err = run_train(tiny_args(tiny, tmp_path / "cut", *extra, steps=200), signal_after_checkpoint=how)
    assert code == (-9 if how == signal.SIGKILL else 128 + signal.SIGTERM), err
    assert not os.path.exists(tmp_path / "cut" / "blocks.0.hook_resid_pre")  # it really was cut short
    with pytest.raises(ValueError, match="holds an unfinished run: continue it with --resume"):
        train_sae.main(tiny_args(tiny, tmp_path / "cut", *extra, steps=200))
    capsys.readouterr()
    train_sae.main(["--resume", str(tmp_path / "cut")])
    assert "resumed" in capsys.readouterr().err
    for layer in (0, 2):
        whole = sae_weights(tmp_path / "whole" / f"blocks.{layer}.hook_resid_pre")
        cut = sae_weights(tmp_path / "cut" / f"blocks.{layer}.hook_resid_pre")
        assert all(torch.equal(whole[k], cut[k]) for k in whole), layer
    logged = [(r["step"], r["layer"]) for r in map(json.loads, open(tmp_path / "cut" / "log.jsonl"))]
    assert logged == [(s, layer) for s in range(4, 201, 4) for layer in (0, 2)]  # none twice, none lost
    assert not [n for n in os.listdir(tmp_path / "cut") if n.startswith(("ckpt-", "checkpoint"))]  # spent


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_batchtopk_resumes_after_a_kill_to_the_same_weights(tiny, tmp_path, arch):
    """The threshold and AuxK's dead-feature counters are checkpointed too (AuxK is on: an
    8-batch dead window at k 2 leaves features dead); jumprelu's log θ and its Adam moments, with
    the pre-activation loss of dead features on."""
    extra = ["--layer", "1", "--checkpoint_every", "256", "--arch", arch,
             *(["--k", "2"] if arch != "jumprelu" else ["--l0_coef", "0.01", "--sparsity", "tanh", "--preact_coef", "0.1"])]
    train_sae.main(tiny_args(tiny, tmp_path / "whole", *extra, steps=120))
    key = "sparsity" if arch == "jumprelu" else "auxk"
    assert any(json.loads(line)[key] > 0 for line in open(tmp_path / "whole" / "log.jsonl"))
    code, err = run_train(tiny_args(tiny, tmp_path / "cut", *extra, steps=120), signal_after_checkpoint=signal.SIGKILL)
    assert code == -9 and not os.path.exists(tmp_path / "cut" / "blocks.1.hook_resid_pre"), err
    train_sae.main(["--resume", str(tmp_path / "cut")])
    whole, cut = (sae_weights(tmp_path / run / "blocks.1.hook_resid_pre") for run in ("whole", "cut"))
    assert set(whole) == set(cut) and all(torch.equal(whole[k], cut[k]) for k in whole)


def signal_during_refill(monkeypatch, at_round, send):
    """Call send() in GPT-2's forward round number `at_round` (8 make a half-buffer of 1,024)."""
    real, rounds = gpt2.ResidualSource.round, []

    def round(self):
        rounds.append(1)
        if len(rounds) == at_round:
            send()
        return real(self)
    monkeypatch.setattr(gpt2.ResidualSource, "round", round)


@pytest.mark.parametrize("signum, during", [(signal.SIGINT, "step"), (signal.SIGTERM, "step"), (signal.SIGINT, "refill")])
def test_a_signal_stops_after_the_step_and_resumes_mid_buffer(tiny, tmp_path, monkeypatch, capsys, signum, during):
    """The first signal stops the run after the step it arrives in, not at the end of the
    half-buffer (minutes on CPU): the checkpoint keeps the served rows not yet trained on. In a
    refill (a minute or more on CPU) it stops at once, from the state before the refill. Either
    way --resume gives the weights of a run never stopped."""
    extra = ["--layer", "0,2", "--buffer", "2048", "--checkpoint_every", "10000000"]  # 16 steps per half-buffer
    train_sae.main(tiny_args(tiny, tmp_path / "whole", *extra, steps=40))
    if during == "step":
        signal_during_step(monkeypatch, 6, signum, times=1)
    else:  # the 4th round of the refill at step 16
        signal_during_refill(monkeypatch, 20, lambda: os.kill(os.getpid(), signum))
    with pytest.raises(SystemExit) as stopped:
        train_sae.main(tiny_args(tiny, tmp_path / "cut", *extra, steps=40))
    assert stopped.value.code == 128 + signum
    err, step = capsys.readouterr().err, 7 if during == "step" else 16
    assert f"stopping {'after this step' if during == 'step' else 'now'}, with a checkpoint" in err
    assert f"stopped by signal {signum} at step {step}" in err
    assert json.load(open(tmp_path / "cut" / "checkpoint.json"))["step"] == step
    checkpoint = load_file(str(tmp_path / "cut" / f"ckpt-{step:09d}-rank0.safetensors"))
    assert checkpoint["served"].shape == ((9 if during == "step" else 0) * 64, 2, 64)  # 16 batches served, 7 trained on
    monkeypatch.undo()
    train_sae.main(["--resume", str(tmp_path / "cut")])
    for layer in (0, 2):
        whole = sae_weights(tmp_path / "whole" / f"blocks.{layer}.hook_resid_pre")
        cut = sae_weights(tmp_path / "cut" / f"blocks.{layer}.hook_resid_pre")
        assert all(torch.equal(whole[k], cut[k]) for k in whole), layer


def two_signals_in_one_operation():
    """Two SIGINTs, 20 ms apart, while this thread is in one torch operation (Python runs a
    handler only between operations, so it sees them as one call)."""
    def send():
        for _ in range(2):
            time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
    sender = threading.Thread(target=send)
    sender.start()
    torch.ones(2500, 2500) @ torch.ones(2500, 2500)  # about 0.3 s or more on 2 cores, in C
    sender.join()


@pytest.mark.parametrize("at_step, note", [(20, "the checkpoint of step 16 is kept: continue with --resume"),
                                           (3, "no checkpoint was written yet: start again")])
def test_a_second_signal_quits_at_once_with_one_line(tiny, tmp_path, monkeypatch, capsys, at_step, note):
    """Sent by this process between two operations, or by Ctrl-C twice during one long operation
    of a refill. A checkpoint that is damaged afterwards is named when --resume reads it."""
    extra = ["--layer", "1", "--buffer", "2048", "--checkpoint_every", "1024"]  # routine checkpoints at refills
    if at_step == 20:
        signal_during_step(monkeypatch, at_step, signal.SIGINT, times=2)
    else:  # the refill at step 0
        signal_during_refill(monkeypatch, 12, two_signals_in_one_operation)
    with pytest.raises(SystemExit) as stopped:
        train_sae.main(tiny_args(tiny, tmp_path / "run", *extra, steps=40))
    assert stopped.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"signal 2 again: quitting without a checkpoint; {note}" + (f" {tmp_path / 'run'}" if at_step == 20 else "")
    if at_step == 20:
        path = tmp_path / "run" / "ckpt-000000016-rank0.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(ValueError) as e:
            train_sae.main(["--resume", str(tmp_path / "run")])
        assert str(e.value).startswith(f"{path}: not a complete safetensors file (") and str(e.value).endswith(
            "; the run cannot resume from it: start again with --force")


def test_force_leaves_only_the_new_run(tiny, tmp_path, capsys):
    train_sae.main(tiny_args(tiny, tmp_path / "run", "--layer", "0,2", steps=8))
    open(tmp_path / "run" / "notes.txt", "w").write("mine")  # not the run's: kept
    train_sae.main(tiny_args(tiny, tmp_path / "run", "--layer", "1", "--force", steps=8))
    assert "--force: deleted the earlier run's blocks.0.hook_resid_pre, blocks.2.hook_resid_pre" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "run")) == ["blocks.1.hook_resid_pre", "log.jsonl", "notes.txt", "run.json"]


def test_resume_from_elsewhere_with_moved_inputs(tiny, tmp_path, monkeypatch):
    """run.json holds absolute paths, so --resume works from any directory; inputs that moved
    are given again; other flags are refused (the run continues with its own settings)."""
    weights, tokens = tiny
    os.makedirs(tmp_path / "a")
    shutil.copy(tokens, tmp_path / "a" / "tokens.bin")
    args = tiny_args(tiny, "run", "--layer", "1", "--buffer", "2048", steps=60)
    args[args.index("--data") + 1] = "tokens.bin"  # relative to the directory it starts in
    monkeypatch.chdir(tmp_path / "a")
    signal_during_step(monkeypatch, 20, signal.SIGTERM, times=1)
    with pytest.raises(SystemExit):
        train_sae.main(args)
    monkeypatch.undo()  # back in the project's directory, with train_step as it is
    assert json.load(open(tmp_path / "a" / "run" / "run.json"))["data"] == str(tmp_path / "a" / "tokens.bin")
    resume = ["--resume", str(tmp_path / "a" / "run")]
    with pytest.raises(ValueError, match="^--tokens with --resume: a run continues with the settings in"):
        train_sae.main([*resume, "--tokens", "100"])
    os.replace(tmp_path / "a" / "tokens.bin", tmp_path / "moved.bin")
    with pytest.raises(ValueError, match=r"2 file\(s\), but the run read 1"):
        train_sae.main([*resume, "--data", f"{tmp_path / 'moved.bin'},{tokens}"])
    train_sae.main([*resume, "--data", str(tmp_path / "moved.bin")])
    changed = [{"flag": "data", "was": str(tmp_path / "a" / "tokens.bin"), "now": str(tmp_path / "moved.bin"), "at_step": 21}]
    settings = json.load(open(tmp_path / "a" / "run" / "run.json"))
    cfg = json.load(open(tmp_path / "a" / "run" / "blocks.1.hook_resid_pre" / "cfg.json"))
    assert settings["data"] == cfg["dataset_path"] == str(tmp_path / "moved.bin")
    assert settings["inputs_changed"] == cfg["training_args"]["inputs_changed"] == changed
    train_sae.main(tiny_args(tiny, tmp_path / "whole", "--layer", "1", "--buffer", "2048", steps=60))
    whole, cut = (sae_weights(tmp_path / run / "blocks.1.hook_resid_pre") for run in ("whole", "a/run"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_what_a_run_prints_while_it_starts(tiny, tmp_path):
    """No silent minutes: each stage of the start says what it did, and checkpoints say so too."""
    code, err = run_train(tiny_args(tiny, tmp_path / "run", "--layer", "1", "--checkpoint_every", "256", steps=12))
    assert code == 0, err
    for line in ("filling the first half of the buffer: ", "layer 1: b_dec starts at the geometric median of 256 activations",
                 "expected time for the remaining 9 steps: ", "checkpoint: step 4, ", f"MB in {tmp_path / 'run'}"):
        assert line in err, (line, err)


def test_slow_steps_and_refills_print_by_time(tiny, tmp_path, monkeypatch, capsys):
    """A line at least every LOG_SECONDS whatever --log_every (here 0 s: every step), and a
    refill's progress line once it has taken REFILL_QUIET (here 0 s: every refill)."""
    monkeypatch.setattr(runs, "LOG_SECONDS", 0)
    monkeypatch.setattr(runs, "REFILL_QUIET", 0)
    train_sae.main(tiny_args(tiny, tmp_path / "run", "--layer", "1", "--log_every", "1000", steps=12))
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == list(range(1, 13))
    assert capsys.readouterr().err.count("refilling the buffer: 256.0/256.0 tokens (100%)") == 3  # at steps 0, 4, 8


def test_short_runs_warm_up_over_a_tenth():
    """The lr warm-up, like the dead window, scales down for short runs."""
    assert train_sae.parse_args([]).lr_warmup == 5000  # Bloom's: 73,242 steps
    args = train_sae.parse_args(["--tokens", str(292 * 4096)])
    assert args.lr_warmup == 29 and train_sae.lr_at(291, args) == args.lr


def test_a_run_of_more_than_a_day_says_so_at_the_start(tiny, tmp_path, monkeypatch, capsys):
    """After the first refill and three steps, seconds into the run: the estimate, with advice."""
    signal_during_step(monkeypatch, 4, signal.SIGINT, times=1)
    with pytest.raises(SystemExit):
        train_sae.main(tiny_args(tiny, tmp_path / "run", "--layer", "1", steps=10 ** 11))
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("expected time for the remaining "))
    assert line.startswith("expected time for the remaining 99,999,999,997 steps: ") and line.endswith("filling the buffer)")
    assert err.count(runs.OVER_A_DAY) == 1 and f"filling the buffer)\n{runs.OVER_A_DAY}\n" in err


def test_expected_time_warns_past_a_day():
    line = runs.expected_time(100_000, 2.0, 0.5)  # 250,000 s
    assert line.startswith("expected time for the remaining 100,000 steps: 2.9 days (2 s a step, and 0.5 s a step "
                           "filling the buffer)\nthat is more than a day: ")
    assert runs.expected_time(100, 1.0, 0.2) == ("expected time for the remaining 100 steps: 2.0 min (1 s a step, "
                                                      "and 0.2 s a step filling the buffer)")
    assert [data.duration(s) for s in (59, 600, 9000, 100_000, 200_000)] == [
        "59 s", "10.0 min", "2.5 h", "27.8 h", "2.3 days"]


@pytest.mark.parametrize("checkpoints", [True, False])
def test_a_diverged_run_stops_and_names_only_a_checkpoint_that_exists(tmp_path, checkpoints):
    """Finite inputs whose squares overflow float32 make the loss infinite: the run stops with
    one line, which offers the last checkpoint only when there is one, and that one is finite."""
    x = np.random.default_rng(0).standard_normal((4096, 16)).astype(np.float32)
    x[1500:] = 1e38  # read in the fifth refill
    error = activation_run(tmp_path, x, "--checkpoint_every", "256" if checkpoints else "1000000")
    assert error and ("loss is inf" in error or "loss is nan" in error or "weights are not finite" in error), error
    if not checkpoints:
        assert "no checkpoint was written yet" in error and not os.path.exists(tmp_path / "run" / "checkpoint.json")
        return
    step = json.load(open(tmp_path / "run" / "checkpoint.json"))["step"]
    assert f"the checkpoint of step {step:,} is kept: continue with --resume" in error, error
    checkpoint = load_file(str(tmp_path / "run" / f"ckpt-{step:09d}-rank0.safetensors"))
    assert all(torch.isfinite(v.float()).all() for k, v in checkpoint.items() if k != "generator")


def start_ranks(args, world=2):
    """Two train_sae.py processes with the environment torchrun would give them."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "train_sae.py", *args], cwd=HERE, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def assert_same_saes(a, b, layers, tol):
    for layer in layers:
        wa, wb = (sae_weights(run / f"blocks.{layer}.hook_resid_pre") for run in (a, b))
        for k in wa:
            err = (wa[k].double() - wb[k].double()).norm() / wa[k].double().norm()
            assert err <= tol, (layer, k, err.item())


# A one-batch dead window and a strong L1: enough features die for ghost grads and resampling to run.
DIST = ("--d_sae", "512", "--dead_tokens", "64", "--l1", "3e-2", "--resample")


@pytest.fixture(scope="module")
def single_runs(tiny, tmp_path_factory):
    """The single-process runs the distributed ones must reproduce (200 steps)."""
    out = tmp_path_factory.mktemp("single")
    for layers in ("2", "0,2"):
        train_sae.main(tiny_args(tiny, out / layers, "--layer", layers, *DIST, steps=200))
        assert any(json.loads(line)["ghost"] > 0 for line in open(out / layers / "log.jsonl"))
    return out


def test_torchrun_data_parallel_equals_one_process(tiny, tmp_path, single_runs):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_sae.py", *tiny_args(tiny, tmp_path / "dp", "--layer", "2", "--parallel", "data", *DIST,
                                                   steps=200)],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Each rank took half of every batch; the averaged gradients are the whole batch's, up to rounding.
    assert_same_saes(single_runs / "2", tmp_path / "dp", [2], tol=1e-5)  # measured 3e-7
    ours, theirs = ([json.loads(line) for line in open(run / "log.jsonl")] for run in (tmp_path / "dp", single_runs / "2"))
    assert [r["step"] for r in ours] == list(range(4, 201, 4))
    for a, b in zip(ours, theirs):  # the logged metrics are the whole batch's too
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1e-3, abs(b[k])) for k in ("mse", "l1", "ghost", "l0", "dead_pct"))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_torchrun_data_parallel_topk_equals_one_process(tiny, tmp_path, arch):
    """Each rank holds half of every batch. BatchTopK's cut is the whole batch's, found from every
    rank's candidates, so every rank keeps what one process would and moves the threshold alike."""
    flags = ("--layer", "2", "--arch", arch, *(["--k", "2"] if arch != "jumprelu" else ["--l0_coef", "0.01"]),
             "--d_sae", "256", "--dead_tokens", "256")
    code, err = run_train(tiny_args(tiny, tmp_path / "one", *flags, steps=100))
    assert code == 0, err
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_sae.py", *tiny_args(tiny, tmp_path / "dp", *flags, "--parallel", "data", steps=100)],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_saes(tmp_path / "one", tmp_path / "dp", [2], tol=1e-5)
    ours, theirs = ([json.loads(line) for line in open(run / "log.jsonl")] for run in (tmp_path / "dp", tmp_path / "one"))
    assert any(r["auxk" if arch != "jumprelu" else "sparsity"] > 0 for r in theirs)
    keys = ("mse", "l0", "dead_pct") + (("threshold",) if arch != "topk" else ()) + (("auxk",) if arch != "jumprelu" else ())
    keys += ("nested",) if arch == "matryoshka" else ()
    for a, b in zip(ours, theirs):
        assert all(abs(a[k] - b[k]) <= 1e-4 * max(1e-3, abs(b[k])) for k in keys), (a, b)


def test_layer_parallel_equals_one_process(tiny, tmp_path, single_runs):
    procs = start_ranks(tiny_args(tiny, tmp_path / "lp", "--layer", "0,2", "--parallel", "layers", *DIST, steps=200))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert_same_saes(single_runs / "0,2", tmp_path / "lp", [0, 2], tol=1e-6)  # rank 0 trained layer 0, rank 1 layer 2


@pytest.mark.parametrize("mode", ["layers", "data"])
def test_a_killed_rank_stops_the_other_and_the_run_resumes(tiny, tmp_path, single_runs, mode):
    out = tmp_path / "run"
    procs = start_ranks(tiny_args(tiny, out, "--layer", "0,2", "--parallel", mode, "--checkpoint_every", "256",
                                  "--dist_timeout", "60", *DIST, steps=200))
    while not os.path.exists(out / "checkpoint.json"):
        assert all(p.poll() is None for p in procs), "a rank ended before the first checkpoint"
        time.sleep(0.005)
    procs[1].kill()
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)
    procs[1].communicate()
    assert time.time() - t0 < 60 and procs[0].returncode == 1, err[-2000:]
    assert "error: rank 0 lost the other ranks" in err and "Traceback" not in err
    procs = start_ranks(["--resume", str(out)])
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert_same_saes(single_runs / "0,2", out, [0, 2], tol=1e-6 if mode == "layers" else 1e-5)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):  # finished: the checkpoint is spent
        train_sae.main(["--resume", str(out)])


# -----------------------------------------------------------------------------
# .ci/run

def test_ci_fails_loudly_without_the_offline_vocabulary(tmp_path):
    """.ci/run, copied where no ../shared/tiktoken_cache exists, stops at once with one line
    (before making a virtual environment), instead of running the tests with an empty path."""
    os.makedirs(tmp_path / "clone" / ".ci")
    shutil.copy(os.path.join(HERE, ".ci", "run"), tmp_path / "clone" / ".ci" / "run")
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    r = subprocess.run(["bash", str(tmp_path / "clone" / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ../shared/tiktoken_cache is missing"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and os.listdir(tmp_path / "clone") == [".ci"]
