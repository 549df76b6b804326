"""
Train sparse autoencoders (SAEs) on GPT-2 small's residual stream, one per layer.

    python train_sae.py --layer 9            # blocks.9.hook_resid_pre, Bloom's Feb 2024 recipe
    python train_sae.py --layer 3,7,9        # three SAEs fed by one GPT-2 forward
    python train_sae.py --layer all          # all twelve
    python train_sae.py --resume runs/L9     # continue a stopped run
    python train_sae.py --layer 9 --arch topk --k 32   # a TopK SAE (Gao et al., 2024)

The recipe is Bloom's (Feb 2024): a ReLU SAE with unit-norm decoder rows, the seed's normalised
MSE plus an L1 penalty, Adam at 4e-4 with a linear warm-up, b_dec started at the geometric
median, a shuffled mixing buffer of activations, and ghost gradients for dead features, done
as Anthropic specified them (exp of the pre-activation; the release used exp(relu(.)), which
gives dead features no gradient at all).

--arch topk and batchtopk train the recipe the field moved to in 2024: the k largest
pre-activations of each token (TopK, Gao et al.) or the B k largest of each batch (BatchTopK,
Bussmann et al.) are kept, the loss is the reconstruction error alone, and AuxK, in place of
ghost gradients, trains the dead features to reconstruct what the live ones miss.

Each SAE is written in SAELens's on-disk format to RUN/blocks.L.hook_resid_pre/. The run
folder also holds the JSONL log and, while the run is unfinished, a checkpoint.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import gpt2
import kernels

# -----------------------------------------------------------------------------
# Every setting, with its default: Bloom's recipe, except where a comment says otherwise.

p = argparse.ArgumentParser(description="Train SAEs on GPT-2 small's residual stream.",
                            formatter_class=gpt2.HelpFormatter)
p.add_argument("--layer", default=None,
               help="'9', '3,7,9' or 'all': one SAE per blocks.L.hook_resid_pre (default: 9; with --activations, the "
                    "layer named in the file's .json, if it has one)")
p.add_argument("--d_sae", type=int, default=24576, help="features per SAE")
p.add_argument("--tokens", type=int, default=300_000_000, help="training tokens (activations) per SAE")
p.add_argument("--batch", type=int, default=4096, help="activations per optimizer step")
p.add_argument("--lr", type=float, default=None,
               help="Adam learning rate (default: relu 4e-4, Bloom's; topk and batchtopk 2e-3, measured on real activations)")
p.add_argument("--lr_warmup", type=int, default=5000, help="steps of linear learning-rate warm-up")
p.add_argument("--lr_decay", choices=["none", "cosine"], default="none", help="after warm-up: constant, or cosine to 0")
p.add_argument("--arch", choices=["relu", "topk", "batchtopk"], default="relu",
               help="relu: ReLU and an L1 penalty (the seed's); topk: each token's k largest pre-activations; "
                    "batchtopk: the batch's B*k largest, saved as a JumpReLU with the threshold learnt in training")
p.add_argument("--k", type=int, default=32, help="topk, batchtopk: features active per token (batchtopk: on average)")
p.add_argument("--auxk_coef", type=float, default=1 / 32, help="topk, batchtopk: weight of the AuxK loss (0: off)")
p.add_argument("--k_aux", type=int, default=512, help="topk, batchtopk: dead features per token that AuxK trains")
p.add_argument("--threshold_rate", type=float, default=0.1,
               help="batchtopk: the threshold is a running average of each batch's smallest kept activation, at this "
                    "rate (SAELens: 0.01, which lags the cut's drift in short runs; see the README)")
p.add_argument("--l1", type=float, default=8e-5, help="relu: L1 coefficient")
p.add_argument("--l1_warmup", type=int, default=0, help="relu: steps of linear L1 warm-up (0: none, the seed's)")
p.add_argument("--loss", choices=["seed", "saelens"], default="seed",
               help="relu: seed: MSE/||x|| averaged over d, plain L1, unit-norm decoder rows; saelens: SAELens v6, "
                    "MSE summed over d, L1 weighted by decoder row norms, free decoder. topk and batchtopk ignore it: "
                    "their loss is the normalised MSE, with unit-norm decoder rows")
p.add_argument("--ghost_grads", action=argparse.BooleanOptionalAction, default=True,
               help="relu: ghost gradients for dead features (topk and batchtopk ignore it: they use AuxK)")
p.add_argument("--dead_tokens", type=int, default=None,
               help="a feature is dead after this many training tokens without firing (default: relu: Bloom's 5,000 "
                    "steps of 4,096, 20.48M; topk, batchtopk: Gao et al.'s 10M; or a tenth of --tokens if that is "
                    "less, so that short runs revive too)")
p.add_argument("--resample", action="store_true",
               help="also restart dead features at each buffer refill on badly reconstructed inputs (Anthropic, 2023)")
p.add_argument("--density_window", type=int, default=1000, help="steps over which feature density is counted")
p.add_argument("--clip_grad", type=float, default=1.0,
               help="clip the gradient norm to this (0: off, the seed's). Not the seed's: on real activations with "
                    "--loss saelens it gave 0.74 explained variance at L0 30, against 0.58 at L0 71 without; "
                    "the seed's loss never reaches it")
p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
               help="scale the inputs so that their mean norm is sqrt(d_model), from the first half-buffer; the "
                    "factor is folded back into the saved weights. The same --l1 then means the same on any model")
p.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
               help="subtract each token's mean over d_model (TransformerLens's center_writing_weights)")
p.add_argument("--exclude_bos", action="store_true", help="leave out the BOS position of each context")
p.add_argument("--buffer", type=int, default=128 * 32 * 128, help="activations in the shuffled mixing buffer")
p.add_argument("--ctx", type=int, default=128, help="context length, BOS included")
p.add_argument("--gpt2_batch", type=int, default=256, help="contexts per GPT-2 forward (speed only)")
p.add_argument("--data", default="fineweb", help="'fineweb', or token files (.txt, .bin, .npy), comma-separated")
p.add_argument("--weights", default=None, help="local GPT-2 model.safetensors (default: download OpenAI's)")
p.add_argument("--activations", default=None, help="train on cached activations [N, d] (.npy or .safetensors) instead of GPT-2")
p.add_argument("--save_activations", default=None, help="write --tokens residuals of --layer to this .npy, then stop")
p.add_argument("--out", default=None, help="run folder (default: runs/L<layer>)")
p.add_argument("--resume", default=None, help="continue the run in this folder, with its saved settings")
p.add_argument("--force", action="store_true", help="overwrite an existing run or file")
p.add_argument("--seed", type=int, default=0, help="seeds the SAE init, the data order and the buffer shuffle")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
p.add_argument("--precision", choices=["auto", "bf16", "tf32", "fp32"], default="auto",
               help="matmul precision; weights and Adam state stay fp32 (auto: bf16 on CUDA, fp32 on CPU)")
p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
               help="the SAE step: fused Triton kernels or plain torch (auto: triton on CUDA, torch on CPU)")
p.add_argument("--compile", action="store_true", help="torch.compile the GPT-2 forward")
p.add_argument("--log_every", type=int, default=100, help="steps between progress lines")
p.add_argument("--checkpoint_every", type=int, default=50_000_000, help="tokens between checkpoints")
p.add_argument("--cache_dir", default=None, help=f"downloads go here (default {gpt2.default_cache_dir()})")
p.add_argument("--parallel", choices=["auto", "layers", "data"], default="auto",
               help="under torchrun: each rank trains its own layers' SAEs, or every rank a slice of every "
                    "batch (auto: layers when there are at least as many layers as ranks)")
p.add_argument("--dist_timeout", type=int, default=600, help="seconds a rank waits for the others before giving up")


def parse_args(argv=None):
    """The flags, with the defaults that depend on others filled in (run.json records them)."""
    args = p.parse_args(argv)
    # What the activations are: GPT-2's, unless an activation file without a .json says otherwise.
    args.model_name, about = "gpt2", read_about(args.activations) if args.activations else None
    if about:
        if args.layer is not None and args.layer != str(about["layer"]):
            raise ValueError(f"--layer {args.layer}: {about_path(args.activations)} says the activations are "
                             f"{about['model']} {about['hook_name']}; expected --layer {about['layer']} or none")
        args.layer, args.model_name = str(about["layer"]), about["model"]
    elif args.activations:
        args.model_name = "unknown"  # not gpt2: nothing says it is
    args.layer = args.layer or "9"
    if args.lr is None:
        args.lr = 4e-4 if args.arch == "relu" else 2e-3
    if args.dead_tokens is None:  # short runs revive too: a 488-step run would never see 5,000 steps
        args.dead_tokens = min(5000 * 4096 if args.arch == "relu" else 10_000_000, args.tokens // 10)
    return args

# -----------------------------------------------------------------------------
# The SAE: x' = x - b_dec, f = act(x' W_enc + b_enc), x_hat = f W_dec + b_dec. The training
# forward and backward (five GEMMs, plus the elementwise work around them) are in kernels.py,
# in plain torch and fused in Triton; this file holds what the loss does with their outputs.

class SAE(nn.Module):
    """arch: "relu", "topk" (f = ReLU of each token's k largest pre-activations, 0 elsewhere) or
    "jumprelu" (f = pre where pre > threshold), which is how a "batchtopk" SAE runs once trained."""

    def __init__(self, d, m, seed=0, arch="relu", k=None):
        super().__init__()
        # Decoder rows: random unit directions. Encoder: the decoder's transpose, as a starting
        # point only (the two are trained independently); this starts every feature with a
        # sensible direction and fewer features die early. b_dec is set from the data.
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(m, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.contiguous())  # [d, m]; a clone would keep W_dec's strides
        self.b_enc = nn.Parameter(torch.zeros(m))    # [m]
        self.W_dec = nn.Parameter(W_dec)             # [m, d]
        self.b_dec = nn.Parameter(torch.zeros(d))    # [d]
        self.arch, self.k = "jumprelu" if arch == "batchtopk" else arch, k
        if self.arch == "jumprelu":
            self.register_buffer("threshold", torch.zeros(m))  # [m]; BatchTopK learns one value for all

    def forward(self, x):                            # x [B, d], for inference
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc            # [B, m]
        if self.arch == "topk":
            f = topk_relu(pre, self.k)
        elif self.arch == "jumprelu":
            f = torch.relu(pre) * (pre > self.threshold)
        else:
            f = torch.relu(pre)                                     # [B, m]
        return pre, f, f @ self.W_dec + self.b_dec                  # x_hat [B, d]


def topk_relu(pre, k):
    """The k largest entries of pre [..., m] along its last axis, ReLU'd; 0 elsewhere."""
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


def mse(pred, target, x, convention):
    """The reconstruction loss of pred against target [B, d], for the input batch x. seed: mean
    over batch and d of (pred - target)^2 / ||x_b|| (the norm, not squared, of each token's
    input); saelens: sum over d, mean over batch."""
    err = (pred - target).pow(2)                                      # [B, d]
    if convention == "seed":
        norm = x.norm(dim=1, keepdim=True)                            # [B, 1]
        # An all-zero input row (padding, say; never a residual) has no norm to divide by:
        # it gets weight 0, where 1 / tiny would let it swamp the batch.
        return (err * torch.where(norm > 0, 1 / norm, 0)).mean()
    return err.sum(1).mean()


def sae_loss(sae, x, l1_coef, dead=None, convention="seed", impl="torch", batch_mean=lambda t: t):
    """loss, its parts (detached), each feature's firing count and x_hat, for a batch x [B, d]
    (fp32). dead: indices of dead features, which get ghost gradients (Anthropic, Jan 2024).
    impl: "torch" or "triton" (kernels.py). batch_mean: turns a mean over this rank's slice of
    the batch into the mean over the whole batch (data-parallel training)."""
    dead = torch.zeros(0, dtype=torch.long, device=x.device) if dead is None else dead
    # L1 = sum_i |f_i| w_i: f >= 0, so no abs. The seed: w = 1 (the rows have unit norm anyway);
    # SAELens: w = the decoder row norms, so that shrinking f by growing W_dec does not pay.
    l1_weights = torch.ones_like(sae.b_enc) if convention == "seed" else sae.W_dec.norm(dim=1)
    x_hat, l1, pre_dead, fires = kernels.sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec,
                                                     l1_weights, dead, impl)
    x_hat = x_hat.float()
    mse_loss = mse(x_hat, x, x, convention)
    l1_loss = l1_coef * l1.mean()
    ghost_loss = torch.zeros((), device=x.device)
    if len(dead):
        # What the dead features would add, were they exp(pre) instead of relu(pre), aimed at
        # the residual the live features leave. Only its direction matters: the norm is set
        # to half the residual's, and the whole term is rescaled to the size of the MSE.
        r = (x - x_hat).detach()                                        # [B, d]
        pre_dead = pre_dead.float()                                     # [B, n_dead]: pre[:, dead]
        # exp(pre - c_b) for a constant c_b per token changes g_b by a factor that the rescale
        # below divides out again, value and gradient alike; with c_b = the row's max, exp
        # neither underflows (pre = -100 is common for long-dead features) nor overflows.
        g = torch.exp(pre_dead - pre_dead.max(1, keepdim=True).values.detach()) @ sae.W_dec[dead]  # [B, d]
        g = g * (r.norm(dim=1, keepdim=True) / (2 * g.norm(dim=1, keepdim=True))).detach()
        ghost_mse = mse(g, r, x, convention)
        scale = batch_mean(mse_loss.detach()) / batch_mean(ghost_mse.detach())
        ghost_loss = ghost_mse * scale  # a scalar rescale: its value is the MSE's
    loss = mse_loss + l1_loss + ghost_loss
    parts = {"mse": mse_loss.detach(), "l1": l1_loss.detach(), "ghost": ghost_loss.detach()}
    return loss, parts, fires, x_hat


def topk_loss(sae, x, arch, k, dead, k_aux, auxk_coef, shared=False, impl="torch"):
    """loss, its parts (detached), each feature's firing count, x_hat, and the batch's smallest
    kept activation (batchtopk; else None), for a TopK or BatchTopK SAE on x [B, d] (fp32).
    dead [m] (bool): the dead features, which AuxK trains. shared: x is this rank's slice of the
    batch, and every rank holds a copy of the SAE (data-parallel training). impl: the sparse
    products in "torch" or "triton" (kernels.py)."""
    B, m = len(x), sae.b_enc.shape[0]
    batch_mean, gather = (all_mean, gather_rows) if shared else (lambda t: t, lambda t: t)
    pre = kernels.dense_pre(x, sae.W_enc, sae.b_enc, sae.b_dec)          # [B, m], the one dense GEMM
    smallest_kept = None
    if arch == "topk":
        top = pre.topk(k, dim=1, sorted=False)
        kept, cols = top.values.flatten(), top.indices.flatten()      # [B k]
        rows = torch.arange(B, device=x.device).repeat_interleave(k)  # [B k]
    else:
        # The n = k B largest entries of the whole batch. Those on this rank are among its own n
        # largest, so each rank offers those, and the n-th largest of all the offers is the cut.
        # Entries equal to the cut are all kept (BOS residuals, identical in every context, tie),
        # so that the kept set does not depend on how the batch is split over ranks.
        n = k * B * (WORLD if shared else 1)
        offers = pre.flatten().topk(min(n, pre.numel()), sorted=False).values
        smallest_kept = gather(offers).float().topk(n, sorted=False).values.min().clamp_min(0)
        rows, cols = torch.nonzero((pre >= smallest_kept) & (pre > 0)).unbind(1)  # [N] each, by row
        kept = pre[rows, cols]                                        # [N]
    # AuxK (Gao et al. 2024, A.2): each token's n_aux largest pre-activations among the dead
    # features, not ReLU'd (so that a feature that died far below 0 still gets a gradient), fit
    # the residual the live features leave. When there are no more dead features than k_aux,
    # every token takes all of them: then AuxK is dense, two GEMMs of n_dead columns, far cheaper
    # than B n_dead sparse entries (each a gathered row of d in every sparse product).
    n_dead = int(dead.sum())
    n_aux = min(k_aux, n_dead) if auxk_coef > 0 else 0
    dense_aux = 0 < n_aux == n_dead
    aux_rows = aux_cols = aux_pre = rows[:0]
    if n_aux and not dense_aux:  # pre is not needed after this: mask it in place
        aux = pre.masked_fill_(~dead, -math.inf).topk(n_aux, dim=1, sorted=False)
        aux_pre, aux_cols = aux.values.flatten(), aux.indices.flatten()  # [B n_aux]
        aux_rows = torch.arange(B, device=x.device).repeat_interleave(n_aux)
    del pre
    # One autograd node for both sets of entries: their gradients meet in one sparse backward.
    values = kernels.SparsePre.apply(torch.cat([kept, aux_pre.to(kept.dtype)]), x, sae.W_enc, sae.b_enc, sae.b_dec,
                                     torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols]), impl)
    f = torch.relu(values[:len(rows)])                                 # [N]
    x_hat = kernels.sparse_decode(rows, cols, f, sae.W_dec, B, impl) + sae.b_dec  # [B, d]
    fires = torch.bincount(cols[f > 0], minlength=m)                   # [m]
    # The normalised MSE, 1 - explained variance: the scale of the data does not matter.
    spread = batch_mean((x - batch_mean(x.mean(0))).pow(2).sum(1).mean())
    mse_loss = (x - x_hat).pow(2).sum(1).mean() / spread
    aux_loss = torch.zeros((), device=x.device)
    if n_aux:
        e = (x - x_hat).detach()                                       # [B, d]
        if dense_aux:
            on = dead.nonzero().squeeze(1)                             # [n_dead]
            aux_pre = torch.addmm(sae.b_enc[on], x - sae.b_dec, sae.W_enc[:, on])  # [B, n_dead]
            e_hat = aux_pre @ sae.W_dec[on]                            # [B, d]
        else:
            e_hat = kernels.sparse_decode(aux_rows, aux_cols, values[len(rows):], sae.W_dec, B, impl)  # [B, d]
        e_spread = batch_mean((e - batch_mean(e.mean(0))).pow(2).sum(1).mean())
        aux_loss = auxk_coef * (e - e_hat).pow(2).sum(1).mean() / e_spread
    loss = mse_loss + aux_loss
    return loss, {"mse": mse_loss.detach(), "auxk": aux_loss.detach()}, fires, x_hat, smallest_kept


@torch.no_grad()
def remove_parallel_grad(sae):
    """Project out of each decoder row's gradient its component along the row: with unit rows,
    the parallel part only changes the norm, which the renormalisation would undo anyway."""
    W, G = sae.W_dec, sae.W_dec.grad                                  # [m, d]
    G -= (G * W).sum(1, keepdim=True) * W


@torch.no_grad()
def normalize_decoder(sae):
    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)


@torch.no_grad()
def init_from_data(sae, x):
    """Start b_dec at the geometric median of x [N, d], and scale the encoder so that the first
    reconstructions are as long as their inputs. With W_enc = W_dec^T alone they are about
    m / (2d) times too long: about half of the features fire on x' = x - b_dec, and each adds its
    unit row's component along x' (derivation in the README). b_enc is 0 and ReLU and TopK are
    homogeneous, so one factor on W_enc sets the length. (A TopK SAE starts near the right length:
    its k features add about k / d of it.)"""
    sae.b_dec.copy_(geometric_median(x))
    x_in = x[:16384] - sae.b_dec                                      # [n, d]
    pre = x_in @ sae.W_enc                                            # [n, m]
    f = torch.relu(pre) if sae.arch == "relu" else topk_relu(pre, sae.k)  # BatchTopK: as TopK, on average
    x_hat = f @ sae.W_dec                                             # [n, d], b_dec left out
    sae.W_enc *= x_in.norm(dim=1).mean() / x_hat.norm(dim=1).mean()


@torch.no_grad()
def geometric_median(x, iters=100, tol=1e-5):
    """argmin_y sum_b ||x_b - y|| for x [N, d], by Weiszfeld's iteration from the mean: y is
    replaced by the average of the points weighted by 1 / distance. Stops when a step moves
    y by less than tol times the mean distance."""
    y = x.mean(0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1)                                    # [N]
        w = 1 / dist.clamp_min(1e-6)       # a point sitting on y would divide by zero
        y_next = (w @ x) / w.sum()
        step = (y_next - y).norm()
        y = y_next
        if step <= tol * dist.mean():
            break
    return y

# -----------------------------------------------------------------------------
# Several processes (torchrun). Every rank reads the same token stream but runs GPT-2 on its
# share of the contexts only; the residuals are all-gathered, so every rank holds the buffer a
# single process would, and shuffles it with the same generator. Then, with --parallel layers,
# each rank trains its own layers' SAEs on whole batches; with --parallel data, every rank
# trains every SAE on its slice of each batch, and gradients, firing counts and the ghost-grad
# scale are averaged, so that the copies stay identical. Either way the SAEs equal a single
# process's. With one process, every function here does nothing.

RANK, WORLD = 0, 1


def start_distributed(args):
    global RANK, WORLD
    WORLD = int(os.environ.get("WORLD_SIZE", 1))
    if WORLD == 1:
        return
    RANK = int(os.environ["RANK"])
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                            timeout=timedelta(seconds=args.dist_timeout))


def all_sum(t):
    if WORLD > 1:
        dist.all_reduce(t)
    return t


def all_mean(t):
    return all_sum(t.clone()) / WORLD


def any_rank(flag, device):
    """True on every rank if `flag` is true on any: the ranks must decide to stop together."""
    if WORLD == 1:
        return bool(flag)  # and no device sync
    return all_sum(torch.tensor([float(bool(flag))], device=device)).item() > 0


def gather_rows(x):
    """Every rank's x, concatenated in rank order."""
    if WORLD == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def split_work(layers, args):
    """The layers whose SAEs this rank trains, and whether each SAE is shared by all ranks."""
    if args.parallel == "auto":
        args.parallel = "layers" if 1 < WORLD <= len(layers) else "data"
    if args.parallel == "layers" and WORLD > len(layers):
        raise ValueError(f"--parallel layers with {WORLD} ranks: expected at most one rank per layer ({len(layers)})")
    if args.parallel == "data" and args.batch % WORLD:
        raise ValueError(f"--batch {args.batch}: expected a multiple of the {WORLD} ranks for --parallel data")
    return layers[RANK::WORLD] if args.parallel == "layers" else layers, args.parallel == "data" and WORLD > 1

# -----------------------------------------------------------------------------
# Activations: residuals from GPT-2 forwards (or a cached file), as [n, layers, d] rows.

class ResidualSource:
    """The next n residual vectors at each of `layers`, from GPT-2 forwards over a token stream,
    keeping the layers in `keep`. One forward, stopped at the deepest layer, serves every layer."""

    def __init__(self, model, stream, layers, keep, batch, center, exclude_bos, autocast, device):
        self.stream, self.layers, self.batch = stream, layers, batch
        self.keep = [layers.index(L) for L in keep]
        self.center, self.exclude_bos, self.autocast, self.device = center, exclude_bos, autocast, device
        self.forward, self.d = model.residuals, model.cfg.n_embd

    @torch.no_grad()
    def next(self, n, progress=None):
        """[n, kept layers, d]. progress(rows done) is called about once a second while the
        forwards run, which takes minutes on CPU."""
        per_context = self.stream.ctx - self.exclude_bos
        n_ctx = math.ceil(n / per_context / self.batch) * self.batch  # whole GPT-2 batches
        if n_ctx % WORLD:
            raise ValueError(f"{n_ctx} contexts per refill do not split over {WORLD} ranks: change --gpt2_batch")
        mine = self.stream.next(n_ctx).chunk(WORLD)[RANK].to(self.device)  # [n_ctx / WORLD, ctx]
        chunks, shown = [], time.time()
        for idx in mine.split(self.batch):
            with self.autocast():
                resid = self.forward(idx, self.layers)                       # {L: [batch, ctx, d]}
            x = torch.stack([resid[L] for L in self.layers], dim=2).float()  # [batch, ctx, layers, d]
            if self.exclude_bos:
                x = x[:, 1:]
            chunks.append(x.reshape(-1, *x.shape[2:]))                      # [batch * ctx, layers, d]
            if progress and time.time() - shown > 1:
                progress(min(n, sum(map(len, chunks)) * WORLD))  # about: rank 0 counts for all
                shown = time.time()
        x = gather_rows(torch.cat(chunks))[:n, self.keep]                    # [n, kept layers, d]
        return x - x.mean(-1, keepdim=True) if self.center else x

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


def about_path(path):
    """The .json beside an activation file that says what it holds (written by --save_activations)."""
    return os.path.splitext(path)[0] + ".json"


def read_about(path):
    """The activation file's .json as a dict, or None when it has none."""
    if not os.path.isfile(about_path(path)):
        return None
    try:
        with open(about_path(path)) as f:
            about = json.load(f)
    except ValueError as e:
        raise ValueError(f"{about_path(path)}: not valid JSON ({e})") from None
    missing = [k for k in ("model", "hook_name", "layer", "d") if k not in about]
    if missing:
        raise ValueError(f"{about_path(path)}: no {missing[0]!r}; expected the .json --save_activations writes")
    return about


class FileSource:
    """Rows of a cached activation file [N, d] (.npy or .safetensors), memory-mapped, read in
    order and from the start again at the end, as [n, 1, d]. Each row is checked as it is read:
    a NaN or Inf in the input would otherwise surface as a diverged run."""

    def __init__(self, path, center, device):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"activations file not found: {path}")
        if not path.endswith((".npy", ".safetensors")):
            raise ValueError(f"{path}: expected a .npy or .safetensors file of activations")
        try:  # a truncated file fails here, on its header
            f = np.load(path, mmap_mode="r") if path.endswith(".npy") else safe_open(path, framework="pt")
        except (ValueError, SafetensorError) as e:
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
        self.n, self.d = shape
        about = read_about(path)
        if about and about["d"] != self.d:
            raise ValueError(f"{path}: rows of width {self.d}, but {about_path(path)} says d {about['d']}")
        self.path, self.center, self.device, self.pos = path, center, device, 0

    def next(self, n, progress=None):  # reading is fast: no progress to show
        parts = []
        while n:
            take = min(n, self.n - self.pos)
            part = self.read(self.pos, self.pos + take)                     # [take, d]
            bad = (~torch.isfinite(part).all(1)).nonzero()
            if len(bad):
                raise ValueError(f"{self.path}: row {self.pos + bad[0].item():,} is not finite (NaN or Inf); "
                                 f"expected finite activations")
            parts.append(part)
            self.pos, n = (self.pos + take) % self.n, n - take
        x = torch.cat(parts).to(self.device, torch.float32)[:, None]       # [n, 1, d]
        return x - x.mean(-1, keepdim=True) if self.center else x

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]

# -----------------------------------------------------------------------------
# Writing: SAELens folders, and checkpoints. Every write goes to a temporary name first.

def hook_name(layer):
    return f"blocks.{layer}.hook_resid_pre"


def replace_folder(tmp, folder):
    """Move the complete folder `tmp` to `folder`. An old `folder` is moved aside first and
    deleted last, so that at every moment one whole copy exists."""
    shutil.rmtree(folder + ".old", ignore_errors=True)  # left by a crash in an earlier call
    if os.path.exists(folder):
        os.replace(folder, folder + ".old")
    os.replace(tmp, folder)
    shutil.rmtree(folder + ".old", ignore_errors=True)


def save_sae(folder, sae, density, layer, args, scale=1.0):
    """SAELens's on-disk format: sae_lens.SAE.load_from_disk(folder) loads it as it is. The SAE
    was trained on x * scale; the saved one takes x itself. Dividing both biases by the scale
    divides pre, f and x_hat by it too (ReLU, TopK and, with its threshold divided, JumpReLU are
    homogeneous), and the decoder rows keep their norms, so f comes out in the input's units.
    A TopK SAE is saved as architecture "topk" with its k; a BatchTopK SAE as "jumprelu" with
    its threshold [m], as SAELens saves its own."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    for k in ("b_enc", "b_dec", "threshold"):  # the threshold compares with pre, which is divided too
        if k in weights:
            weights[k] = weights[k] / scale
    save_file(weights, os.path.join(tmp, "sae_weights.safetensors"))
    save_file({"sparsity": torch.log10(density.float().cpu() + 1e-10)}, os.path.join(tmp, "sparsity.safetensors"))
    d_in, d_sae = sae.W_enc.shape
    settings = recorded(args)
    # SAELens 6 names the architecture; its older versions read activation_fn_str and its kwargs.
    arch = {"relu": ("standard", "relu", {}), "topk": ("topk", "topk", {"k": sae.k}),
            "jumprelu": ("jumprelu", "relu", {})}[sae.arch]
    cfg = {
        "architecture": arch[0], "d_in": d_in, "d_sae": d_sae,
        "activation_fn_str": arch[1], "activation_fn_kwargs": arch[2],
        **({"k": sae.k, "rescale_acts_by_decoder_norm": False} if sae.arch == "topk" else {}),
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "context_size": args.ctx, "model_name": args.model_name, "hook_name": hook_name(layer), "hook_layer": layer,
        "hook_head_index": None, "prepend_bos": True,
        "dataset_path": settings["activations"] or ("kjj0/fineweb10B-gpt2" if args.data == "fineweb" else settings["data"]),
        "dataset_trust_remote_code": False, "normalize_activations": "none",
        "dtype": "float32", "device": "cpu", "sae_lens_training_version": None, "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {"center_writing_weights": args.center},
        "seqpos_slice": [1, None] if args.exclude_bos else [None],
        "training_args": settings,  # ours, beyond SAELens's fields; it ignores unknown keys
    }
    with open(os.path.join(tmp, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    replace_folder(tmp, folder)


def save_checkpoint(run, trainees, kept, served, gen, source, step, args):
    """Each writing rank's file: its SAEs' weights, Adam moments and feature counters, its part
    of the kept half-buffer and of the served half's rows not yet trained on (none, except when a
    signal stops the run between refills), the shuffle generator; the step and the data position
    as metadata. Then rank 0 commits them by naming their step in checkpoint.json, and only then
    deletes older files: a kill at any moment leaves one complete checkpoint."""
    check_finite(trainees, step, args.device, run)
    tick = time.time()
    if args.parallel == "layers" or RANK == 0:  # in data-parallel training the copies are identical
        tensors = {"buffer": kept.cpu(), "served": served.cpu(), "generator": gen.get_state()}
        for t in trainees:
            for name, value in t.sae.state_dict().items():  # the weights, and the threshold of batchtopk
                tensors[f"{t.layer}.{name}"] = value.cpu()
            for name, param in t.sae.named_parameters():
                for k, v in t.opt.state[param].items():  # step, exp_avg, exp_avg_sq (none before step 1)
                    tensors[f"{t.layer}.adam.{name}.{k}"] = v.cpu()
            for k in ("since_fired", "fires", "density", "scale"):
                tensors[f"{t.layer}.{k}"] = getattr(t, k).cpu()
        meta = {"step": str(step), "source": json.dumps(source.state_dict())}
        path = os.path.join(run, f"ckpt-{step:09d}-rank{RANK}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)
    if WORLD > 1:
        dist.barrier()
    if RANK == 0:
        with open(os.path.join(run, "checkpoint.json.tmp"), "w") as f:
            json.dump({"step": step, "ranks": WORLD, "parallel": args.parallel}, f)
        os.replace(os.path.join(run, "checkpoint.json.tmp"), os.path.join(run, "checkpoint.json"))
        size = 0
        for name in os.listdir(run):
            if name.startswith("ckpt-") and not name.startswith(f"ckpt-{step:09d}-"):
                os.remove(os.path.join(run, name))
            elif name.startswith("ckpt-"):
                size += os.path.getsize(os.path.join(run, name))
        print(f"checkpoint: step {step:,}, {size / 1e6:,.1f} MB in {run} ({time.time() - tick:.1f} s)", file=sys.stderr)


def load_checkpoint(run, trainees, gen, source, args):
    with open(os.path.join(run, "checkpoint.json")) as f:
        saved = json.load(f)
    if (saved["ranks"], saved["parallel"]) != (WORLD, args.parallel):
        raise ValueError(f"{run} was checkpointed by {saved['ranks']} rank(s) in --parallel {saved['parallel']}, "
                         f"expected {WORLD} in --parallel {args.parallel}: resume it as it ran")
    path = os.path.join(run, f"ckpt-{saved['step']:09d}-rank{RANK if args.parallel == 'layers' else 0}.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = gpt2.load_safetensors(path)
    for t in trainees:
        with torch.no_grad():
            for name, value in t.sae.state_dict().items():
                value.copy_(tensors[f"{t.layer}.{name}"])
        state = t.opt.state_dict()  # refill its per-parameter state; the param groups stay
        state["state"] = {i: {k: tensors[f"{t.layer}.adam.{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                          for i, (name, _) in enumerate(t.sae.named_parameters())
                          if f"{t.layer}.adam.{name}.step" in tensors}
        t.opt.load_state_dict(state)
        for k in ("since_fired", "fires", "density", "scale"):
            setattr(t, k, tensors[f"{t.layer}.{k}"].to(args.device))
    gen.set_state(tensors["generator"])
    source.load_state_dict(json.loads(meta["source"]))
    served = tensors["served"].to(args.device) if "served" in tensors else None  # none before this version
    return tensors["buffer"].to(args.device), served, int(meta["step"])

# -----------------------------------------------------------------------------
# Training


class Trainee:
    """One layer's SAE and what its training keeps track of."""

    def __init__(self, layer, sae, opt, device, scale=1.0):
        m = sae.b_enc.shape[0]
        self.layer, self.sae, self.opt = layer, sae, opt
        self.scale = torch.tensor(float(scale), device=device)  # the SAE sees x * scale (--normalize)
        self.since_fired = torch.zeros(m, dtype=torch.long, device=device)  # steps since each feature fired
        self.fires = torch.zeros(m, device=device)       # activations counted in the current density window
        self.density = torch.zeros(m, device=device)     # firing rate over the last full window


def adam(sae, lr):
    """Adam, fused: one pass over the weights per step instead of one per operation. On CPU at
    d 768, m 24,576 it takes 0.04 s a step instead of 0.33 s, which matters beside TopK's one GEMM."""
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)


def lr_at(step, args):
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    if args.lr_decay == "cosine":
        done = (step - args.lr_warmup) / max(1, args.tokens // args.batch - args.lr_warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * done))
    return args.lr


@torch.no_grad()
def resample_dead(t, x, args, step):
    """Anthropic's resampling (Towards Monosemanticity, 2023): each dead feature restarts on a
    token of x [n, d] (scaled) drawn with probability proportional to its squared error. Its
    decoder row becomes that error's direction and its encoder column the same direction at a
    fifth of the live columns' mean norm, with b_enc 0 and fresh Adam moments, so it fires at
    once on inputs like that one and learns what the live features miss. The draw is seeded by
    the seed, the layer and the step: every rank and a resumed run draw alike, and a layer's SAE
    does not depend on which others train beside it."""
    is_dead = t.since_fired >= dead_after(args)                          # [m]
    dead = torch.nonzero(is_dead).squeeze(1)
    if not len(dead):
        return
    sae = t.sae
    err = x - sae(x)[2]                                                  # [n, d]
    if not err.any():
        return
    gen = torch.Generator(x.device).manual_seed((args.seed * 1000 + t.layer) * 10 ** 9 + step)
    pick = torch.multinomial(err.pow(2).sum(1), len(dead), replacement=True, generator=gen)
    u = err[pick] / err[pick].norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_dead, d], unit rows
    live = ~is_dead
    enc_norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else 1.0
    dec_norm = sae.W_dec[live].norm(dim=1).mean() if live.any() else 1.0  # 1 under the seed's loss
    sae.W_dec[dead] = u * dec_norm
    sae.W_enc[:, dead] = u.T * 0.2 * enc_norm
    sae.b_enc[dead] = 0
    for param, index in ((sae.W_dec, dead), (sae.W_enc, (slice(None), dead)), (sae.b_enc, dead)):
        for k in ("exp_avg", "exp_avg_sq"):
            if k in t.opt.state[param]:
                t.opt.state[param][k][index] = 0
    t.since_fired[dead] = 0


def dead_after(args):
    """Steps without firing after which a feature is dead (and gets ghost gradients or AuxK)."""
    return max(1, math.ceil(args.dead_tokens / args.batch))


def train_step(t, x, step, args, autocast, log, shared=False):
    """One optimizer step of one SAE on x [B, d]; returns the metrics when `log`. shared: x is
    this rank's slice of the batch, and every rank holds a copy of the SAE."""
    batch_mean = all_mean if shared else (lambda v: v)
    x = x * t.scale
    lr = lr_at(step, args)
    l1 = args.l1 * min(1.0, (step + 1) / args.l1_warmup) if args.l1_warmup else args.l1
    for group in t.opt.param_groups:
        group["lr"] = lr
    is_dead = t.since_fired >= dead_after(args)                        # [m]
    with autocast():
        if args.arch == "relu":
            dead = torch.nonzero(is_dead).squeeze(1) if args.ghost_grads else None
            loss, parts, fires, x_hat = sae_loss(t.sae, x, l1, dead, args.loss, args.kernels, batch_mean)
        else:
            loss, parts, fires, x_hat, smallest_kept = topk_loss(t.sae, x, args.arch, args.k, is_dead, args.k_aux,
                                                                 args.auxk_coef, shared, args.kernels)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    if shared:  # the whole batch's gradient is the mean of the slices'; the counts, their sum
        for param in t.sae.parameters():
            all_sum(param.grad).div_(WORLD)
        fires = all_sum(fires)
    unit_rows = args.loss == "seed" or args.arch != "relu"
    if unit_rows:
        remove_parallel_grad(t.sae)
    if args.clip_grad:
        torch.nn.utils.clip_grad_norm_(t.sae.parameters(), args.clip_grad)
    t.opt.step()
    if unit_rows:
        normalize_decoder(t.sae)
    with torch.no_grad():
        if args.arch == "batchtopk":  # the JumpReLU threshold: starts at the first batch's cut, then follows it
            t.sae.threshold.lerp_(smallest_kept.expand_as(t.sae.threshold), 1.0 if step == 0 else args.threshold_rate)
        t.since_fired = torch.where(fires > 0, 0, t.since_fired + 1)   # fires [m]: tokens each fired on
        t.fires += fires
        if (step + 1) % args.density_window == 0:
            t.density, t.fires = t.fires / (args.density_window * args.batch), torch.zeros_like(t.fires)
        if not log:
            return None
        x_hat, total = x_hat.float(), x - batch_mean(x.mean(0))
        explained = 1 - (x - x_hat).pow(2).sum(1) / total.pow(2).sum(1)  # the seed's per-token form
        record = {k: batch_mean(v).item() for k, v in parts.items()}
        return {**record, "loss": batch_mean(loss.detach()).item(), "l0": fires.sum().item() / args.batch,
                "explained_variance": batch_mean(explained.mean()).item(),
                "dead_pct": 100 * (t.since_fired >= dead_after(args)).float().mean().item(), "lr": lr,
                **({"threshold": (t.sae.threshold[0] / t.scale).item()} if args.arch == "batchtopk" else {})}


def check_run_folder(args):
    """Refuse to overwrite a finished or unfinished run without --force."""
    run = args.out
    if os.path.exists(run) and not os.path.isdir(run):
        raise ValueError(f"--out {run}: a file, expected a run folder (new, or one this script wrote)")
    if os.path.exists(os.path.join(run, "run.json")) and not args.force:
        if os.path.exists(os.path.join(run, "checkpoint.json")):
            raise ValueError(f"{run} holds an unfinished run: continue it with --resume {run}, or pass --force")
        if not any(name.startswith("blocks.") for name in os.listdir(run)):
            raise ValueError(f"{run} holds a run that stopped before its first checkpoint: pass --force to start over")
        raise ValueError(f"{run} holds a run already: pass --force to overwrite it, or choose --out")


def start_run_folder(args):
    """Clear what an overwritten run left (--force), its SAEs included, so that the folder holds
    one run, and record this run's settings in run.json."""
    run = args.out
    os.makedirs(run, exist_ok=True)
    removed = []
    for stale in sorted(os.listdir(run)):
        path = os.path.join(run, stale)
        if stale in ("checkpoint.json", "log.jsonl") or stale.startswith("ckpt-"):
            os.remove(path)
        elif stale.startswith("blocks.") and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(stale)
    if removed:
        print(f"--force: deleted the earlier run's {', '.join(removed)} from {run}", file=sys.stderr)
    with open(os.path.join(run, "run.json.tmp"), "w") as f:
        json.dump(recorded(args), f, indent=2)
    os.replace(os.path.join(run, "run.json.tmp"), os.path.join(run, "run.json"))


def recorded(args):
    """The settings as run.json and cfg.json record them: input paths made absolute, so that
    --resume works from any directory."""
    settings = dict(vars(args))
    if args.data != "fineweb":
        settings["data"] = ",".join(os.path.abspath(path) for path in args.data.split(","))
    for flag in ("weights", "activations", "cache_dir"):
        if settings[flag]:
            settings[flag] = os.path.abspath(settings[flag])
    return settings


# What may be given again with --resume: where the run runs, and where its inputs now are.
RESUME_MAY_CHANGE = ("data", "weights", "activations", "cache_dir", "device", "kernels", "dist_timeout")


def settings_for_resume(args, argv=None):
    path = os.path.join(args.resume, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run to resume in {args.resume} (expected {path})")
    if not os.path.isfile(os.path.join(args.resume, "checkpoint.json")):
        raise ValueError(f"{args.resume} has no checkpoint to resume from (finished, or stopped before the first)")
    with open(path) as f:
        saved = argparse.Namespace(**json.load(f))
    if not hasattr(saved, "model_name"):  # runs started before it was recorded were labelled gpt2
        saved.model_name = "gpt2"
    missing = sorted(set(vars(args)) - set(vars(saved)))
    if missing:
        raise ValueError(f"{path} has no setting for --{', --'.join(missing)}: the run was started by an older "
                         f"train_sae.py; resume it with that version")
    given, defaults = vars(p.parse_args(argv)), vars(p.parse_args([]))
    for flag in given:
        if flag != "resume" and given[flag] != defaults[flag] and flag not in RESUME_MAY_CHANGE:
            raise ValueError(f"--{flag} with --resume: a run continues with the settings in {path}; expected "
                             f"only --{', --'.join(RESUME_MAY_CHANGE)} (for inputs that moved, or another machine)")
    # The run continues as it began; only where it runs may change, and the folder and inputs may have moved.
    saved.resume, saved.out, saved.device, saved.kernels = args.resume, args.resume, args.device, args.kernels
    for flag in ("data", "weights", "activations", "cache_dir"):
        if given[flag] != defaults[flag]:
            if flag == "data" and len(given[flag].split(",")) != len(saved.data.split(",")):
                raise ValueError(f"--data {given[flag]}: {len(given[flag].split(','))} file(s), but the run read "
                                 f"{len(saved.data.split(','))}: {saved.data}")
            setattr(saved, flag, given[flag])
    return saved


def resolve_kernels(args):
    # relu's step is the fused kernels; topk's and batchtopk's, the sparse ones (kernels.py)
    check, which = (kernels.check_fused, "fused") if args.arch == "relu" else (kernels.check_sparse, "sparse TopK")
    if args.kernels == "auto":
        args.kernels = "triton" if args.device.startswith("cuda") else "torch"
        problem = check(args.device) if args.kernels == "triton" else None
        if problem:  # never silently: the torch path is correct, only slower
            print(f"WARNING: the {which} Triton kernels failed their check on {args.device} ({problem}); "
                  f"training with the torch path instead (--kernels torch)", file=sys.stderr)
            args.kernels = "torch"
    if args.kernels == "triton" and not args.device.startswith("cuda") and not kernels.INTERPRET:
        raise ValueError("--kernels triton on CPU: expected a CUDA device (or TRITON_INTERPRET=1, for tests)")


def make_autocast(args):
    precision = args.precision if args.precision != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    return lambda: torch.autocast(device_type, torch.bfloat16, enabled=precision == "bf16")


def make_source(args, layers, keep, autocast):
    if args.activations:  # every rank reads the rows itself
        source = FileSource(args.activations, args.center, args.device)
        if args.model_name == "unknown" and RANK == 0:
            print(f"note: {args.activations} has no {os.path.basename(about_path(args.activations))} beside it (as "
                  f"--save_activations writes): the SAE is labelled model 'unknown', hook "
                  f"{hook_name(args.layer)} (from --layer)", file=sys.stderr)
        return source
    shards = gpt2.corpus(args.data, "train", args.ctx, args.cache_dir)  # checks every file: before the model
    stream = gpt2.Contexts(shards, args.ctx, seed=args.seed)
    model = gpt2.from_pretrained(args.weights, args.cache_dir).to(args.device)
    source = ResidualSource(model, stream, layers, keep, args.gpt2_batch, args.center, args.exclude_bos,
                            autocast, args.device)
    if args.compile:
        source.forward = torch.compile(model.residuals)
    return source


def check_args(args):
    """One line naming the first flag with a value that cannot work."""
    for flag in ("d_sae", "batch", "tokens", "buffer", "gpt2_batch", "log_every", "density_window", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    for flag in ("lr_warmup", "l1_warmup", "dead_tokens", "l1", "clip_grad"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected zero or more")
    if args.lr <= 0:
        raise ValueError(f"--lr {args.lr}: expected a positive learning rate")
    if args.arch != "relu" and not 1 <= args.k <= args.d_sae:
        raise ValueError(f"--k {args.k}: expected 1..{args.d_sae} (--d_sae)")
    if args.k_aux < 1 or args.auxk_coef < 0:
        raise ValueError(f"--k_aux {args.k_aux} --auxk_coef {args.auxk_coef}: expected k_aux >= 1 and auxk_coef >= 0")
    if not 0 < args.threshold_rate <= 1:
        raise ValueError(f"--threshold_rate {args.threshold_rate}: expected a rate in (0, 1]")
    if args.tokens < args.batch:
        raise ValueError(f"--tokens {args.tokens}: expected at least one batch ({args.batch})")
    if args.buffer < 2 * args.batch:
        raise ValueError(f"--buffer {args.buffer}: expected at least two batches ({2 * args.batch})")
    if not 2 <= args.ctx <= 1024:
        raise ValueError(f"--ctx {args.ctx}: expected 2..1024 (BOS and at least one token; GPT-2's longest context)")
    gpt2.check_device(args.device)
    if args.weights:
        gpt2.check_weights_path(args.weights)
    layers = gpt2.parse_layers(args.layer)
    if (args.activations or args.save_activations) and len(layers) != 1:
        raise ValueError(f"--layer {args.layer}: expected one layer with --activations or --save_activations")
    return layers


def train(args):
    layers = check_args(args)
    resolve_kernels(args)
    owned, shared = split_work(layers, args)
    half = args.buffer // 2
    if not args.resume:
        check_run_folder(args)
    autocast = make_autocast(args)
    source = make_source(args, layers, owned, autocast)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    trainees = []
    kept = None  # [half, owned layers, d]: the first half-buffer
    if not args.resume:
        t0 = time.time()
        show = lambda rows: gpt2.progress("filling the first half of the buffer", rows, half, t0, unit="tokens")
        kept = source.next(half, show if RANK == 0 else None)
        if RANK == 0:
            show(half)
            print(file=sys.stderr)
            gpt2_s = args.tokens * (time.time() - t0) / half  # a lower bound on the run's length, known now
            if gpt2_s > 86400:
                print(f"at that rate the activations alone take {duration(gpt2_s)} for --tokens {args.tokens:,}; "
                      f"{OVER_A_DAY}", file=sys.stderr)
    for j, layer in enumerate(owned):
        # Seeded by layer, so that an SAE does not depend on which other layers train beside it.
        sae = SAE(source.d, args.d_sae, args.seed * 1000 + layer, args.arch, args.k).to(args.device)
        scale = 1.0
        if kept is not None:
            if args.normalize:  # mean norm sqrt(d): a norm of 10 or of 1000 trains alike
                scale = math.sqrt(source.d) / kept[:, j].norm(dim=1).mean().item()
            tick = time.time()
            init_from_data(sae, kept[:, j] * scale)
            if RANK == 0:
                print(f"layer {layer}: b_dec starts at the geometric median of {len(kept):,} activations "
                      f"({time.time() - tick:.1f} s)", file=sys.stderr)
        opt = adam(sae, args.lr)
        trainees.append(Trainee(layer, sae, opt, args.device, scale))
    if not args.resume and RANK == 0:  # only now: a run stopped while starting leaves no folder behind
        start_run_folder(args)
    step, served = 0, None
    if args.resume:
        kept, served, step = load_checkpoint(args.out, trainees, gen, source, args)
        if RANK == 0:
            keep_log_until(os.path.join(args.out, "log.jsonl"), step)
            print(f"resumed {args.out} at step {step:,}", file=sys.stderr)

    stop = []  # the signal that asked us to stop, if any

    def on_signal(signum, frame):
        if stop:  # asked twice: quit now. The last checkpoint on disk is whole (see save_checkpoint).
            if RANK == 0:
                print(f"\nsignal {signum} again: quitting without a checkpoint; {last_checkpoint_note(args.out)}",
                      file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        stop.append(signum)
        if RANK == 0:
            print("\nstopping after this step, with a checkpoint (signal again to quit at once, without one)",
                  file=sys.stderr, flush=True)
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_steps(args, trainees, source, kept, served, gen, step, stop, autocast, shared)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return trainees


def run_steps(args, trainees, source, kept, served, gen, step, stop, autocast, shared):
    """The loop: refill the buffer, serve its batches to every SAE, log, checkpoint; at the end
    write each SAE's folder. `served` holds the rows of the current half not yet trained on."""
    half = args.buffer // 2
    total, per_half = args.tokens // args.batch, half // args.batch
    steps_per_checkpoint = max(1, args.checkpoint_every // args.batch)
    log = open(os.path.join(args.out, "log.jsonl"), "a") if RANK == 0 else None
    last_checkpoint, t0, step0 = step, time.time(), step
    refill_s, step_s = None, []  # the first refill's and steps' times: the early estimate of the run's length
    while step < total:
        if served is None or len(served) < args.batch:
            # Routine checkpoints happen here, between refills, where the state is smallest:
            # the kept half of the buffer and nothing served.
            if step - last_checkpoint >= steps_per_checkpoint:
                save_checkpoint(args.out, trainees, kept, kept[:0], gen, source, step, args)
                last_checkpoint = step
            # The seed's mixing buffer: the kept half and a fresh half, shuffled together; one
            # half is served as batches, the other kept for the next round.
            tick = time.time()
            mixed = torch.cat([kept, source.next(half)])                           # [2 half, layers, d]
            mixed = mixed[torch.randperm(len(mixed), generator=gen, device=args.device)]
            kept, served = mixed[:half], mixed[half:][:per_half * args.batch]
            refill_s = refill_s or time.time() - tick
            if args.resample:
                for j, t in enumerate(trainees):
                    resample_dead(t, served[:16384, j] * t.scale, args, step)
        x, served = served[:args.batch], served[args.batch:]                         # [batch, layers, d]
        if shared:
            x = x.chunk(WORLD)[RANK]                                                # this rank's slice
        logging = (step + 1) % args.log_every == 0 or step + 1 == total
        tick = time.time()
        records = [train_step(t, x[:, j], step, args, autocast, logging, shared) for j, t in enumerate(trainees)]
        step += 1
        if RANK == 0 and refill_s is not None and len(step_s) < 3:  # three steps tell the run's length
            step_s.append(timed(tick, args.device))
            if len(step_s) == 3 and step < total:
                print(expected_time(total - step, sum(step_s) / 3, refill_s / per_half), file=sys.stderr)
        if logging:
            report(gather_records(trainees, records, args), step, total, args, time.time() - t0, step - step0, log)
        if any_rank(stop, args.device) and step < total:  # a signal: stop here, keeping what is left unserved
            save_checkpoint(args.out, trainees, kept, served, gen, source, step, args)
            signum = stop[0] if stop else signal.SIGTERM
            if RANK == 0:
                print(f"stopped by signal {signum} at step {step:,}; checkpoint saved. "
                      f"Continue with: python train_sae.py --resume {args.out}", file=sys.stderr)
            sys.exit(128 + signum)
    if log:
        log.close()
    check_finite(trainees, step, args.device, args.out)
    if args.parallel == "layers" or RANK == 0:
        for t in trainees:
            density = t.density if step >= args.density_window else t.fires / (step * args.batch)
            save_sae(os.path.join(args.out, hook_name(t.layer)), t.sae, density, t.layer, args, t.scale.item())
    if WORLD > 1:
        dist.barrier()
    if RANK == 0:  # the SAEs are saved: the checkpoint is spent
        for name in os.listdir(args.out):
            if name == "checkpoint.json" or name.startswith("ckpt-"):
                os.remove(os.path.join(args.out, name))
        print(f"done: {', '.join(os.path.join(args.out, hook_name(L)) for L in gpt2.parse_layers(args.layer))}")


def timed(tick, device):
    """Seconds since `tick`, once the device has finished the work queued since."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.time() - tick


def duration(seconds):
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else
            f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days")


def expected_time(steps_left, step_s, refill_s_per_step):
    """One line: how long the rest of the run will take, and what to change if that is over a day."""
    seconds = steps_left * (step_s + refill_s_per_step)
    line = (f"expected time for the remaining {steps_left:,} steps: {duration(seconds)} "
            f"({step_s:.3g} s a step, and {refill_s_per_step:.3g} s a step filling the buffer)")
    return line + (f"\n{OVER_A_DAY}" if seconds > 86400 else "")


OVER_A_DAY = ("that is more than a day: for a first run, try fewer --tokens (e.g. 10_000_000) or a smaller --d_sae "
              "(e.g. 4096), or a GPU (--device cuda)")


def last_checkpoint_note(run):
    """What a stopped run leaves to resume from, said only if it exists."""
    path = os.path.join(run, "checkpoint.json")
    if not os.path.isfile(path):
        return "no checkpoint was written yet: start again"
    with open(path) as f:
        step = json.load(f)["step"]
    return f"the checkpoint of step {step:,} is kept: continue with --resume {run}"


def check_finite(trainees, step, device, run):
    """Stop before a NaN or Inf could be saved, keeping the last good checkpoint if there is one."""
    bad = [t.layer for t in trainees if not all(torch.isfinite(p).all() for p in t.sae.parameters())]
    if any_rank(bad, device):
        raise FloatingPointError(f"weights are not finite at step {step:,} (layer {bad or 'of another rank'}); "
                                 f"stopped. Lower --lr or raise --lr_warmup; {last_checkpoint_note(run)}")


def gather_records(trainees, records, args):
    """[(layer, record)] for every SAE of the run, on every rank."""
    mine = [(t.layer, r) for t, r in zip(trainees, records)]
    if WORLD == 1 or args.parallel == "data":
        return mine
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    return sorted(pair for part in everyone for pair in part)


def keep_log_until(path, step):
    """On resume, drop the log lines of steps that will be run again."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(path + ".tmp", path)


def report(records, step, total, args, elapsed, steps_done, log):
    """One line per SAE on stdout, the same records in log.jsonl (rank 0). A NaN or Inf stops
    the run, on every rank."""
    tokens_per_s = steps_done * args.batch / elapsed
    eta = (total - step) * args.batch / tokens_per_s
    for layer, r in records:
        if not all(math.isfinite(v) for v in r.values()):
            raise FloatingPointError(f"layer {layer}: loss is {r['loss']} at step {step:,}; stopped. Lower --lr "
                                     f"or raise --lr_warmup; {last_checkpoint_note(args.out)}")
    if RANK != 0:
        return
    for layer, r in records:
        r = {"step": step, "tokens": step * args.batch, "layer": layer, "tokens_per_s": round(tokens_per_s), **r}
        log.write(json.dumps(r) + "\n")
        print(f"step {step:>7,}/{total:,} | {step * args.batch / 1e6:7.1f}M tok | {tokens_per_s / 1e3:6.1f}k tok/s"
              f" | eta {duration(eta):>9} | layer {layer:<2} | "
              + " ".join(f"{k} {r[k]:.4g}" for k in ("mse", "l1", "ghost", "auxk") if k in r) +
              f" | L0 {r['l0']:6.1f} | ev {r['explained_variance']:.3f} | dead {r['dead_pct']:5.1f}% | lr {r['lr']:.2e}")
    log.flush()


def save_activations(args):
    """Write --tokens raw residuals ([N, d] float32 .npy, uncentred) of one layer, to train on
    later with --activations (centring, if on, is applied when training), and beside it a .json
    saying what they are, which training reads to label the SAE."""
    layers = check_args(args)
    path = args.save_activations
    if not path.endswith(".npy"):
        raise ValueError(f"--save_activations {path}: expected a .npy path")
    for target in (path, about_path(path)):
        if os.path.exists(target) and not args.force:
            raise ValueError(f"{target} exists: pass --force to overwrite it")
    if WORLD > 1:
        raise ValueError("--save_activations: run it in one process, not under torchrun")
    args.center = False
    source = make_source(args, layers, layers, make_autocast(args))
    d, chunk, label = source.d, args.buffer // 2, f"residuals of {hook_name(layers[0])}"  # training's chunks
    tmp = path + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(args.tokens, d))  # [N, d] on disk
    try:
        t0 = time.time()
        for a in range(0, args.tokens, chunk):
            b = min(a + chunk, args.tokens)
            show = lambda rows: gpt2.progress(label, min(a + rows, args.tokens), args.tokens, t0, unit="tokens")
            out[a:b] = source.next(chunk, show)[:b - a, 0].cpu().numpy()
            show(b - a)
        print(file=sys.stderr)
        out.flush()
    except BaseException:  # a partial file cannot be resumed: do not leave gigabytes of it behind
        os.remove(tmp)
        raise
    finally:
        del out  # closes the memory map
    settings = recorded(args)
    about = {"model": args.model_name, "hook_name": hook_name(layers[0]), "layer": layers[0], "d": d,
             "rows": args.tokens, "centered": False, "weights": settings["weights"] or gpt2.GPT2_URL,
             "data": settings["data"], "ctx": args.ctx, "exclude_bos": args.exclude_bos, "seed": args.seed}
    with open(about_path(path) + ".tmp", "w") as f:
        json.dump(about, f, indent=2)
    os.replace(tmp, path)
    os.replace(about_path(path) + ".tmp", about_path(path))
    print(f"wrote {args.tokens:,} x {d} activations of {hook_name(layers[0])} to {path} in {duration(time.time() - t0)}, "
          f"described in {about_path(path)}")


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = settings_for_resume(args, argv)
    start_distributed(args)
    if args.save_activations:
        return save_activations(args)
    args.out = args.out or os.path.join("runs", "L" + args.layer.replace(",", "-"))
    return train(args)


def lost_a_rank(e):
    """Whether an error is a collective failing because another rank died or timed out."""
    return WORLD > 1 and any(s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe",
                                                    "NCCL", "Timed out", "timed out", "Socket"))


if __name__ == "__main__":
    gpt2.stop_on_sigterm()  # while starting, SIGTERM ends it as Ctrl-C does; training installs its own handlers
    try:
        main()
        if WORLD > 1:
            dist.destroy_process_group()
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {e}" if WORLD == 1 else f"error: rank {RANK}: {e}")
    except KeyboardInterrupt as e:  # while starting (once training runs, a signal stops it with a checkpoint)
        gpt2.exit_interrupted(e, "nothing was written")
    except RuntimeError as e:
        if not lost_a_rank(e):
            raise
        print(f"error: rank {RANK} lost the other ranks ({str(e).splitlines()[0][:200]}); one of them failed or "
              f"was killed: see its output. Resume from the last checkpoint with --resume", file=sys.stderr, flush=True)
        # Not sys.exit: tearing down a process group whose peer is gone can abort (SIGABRT) in gloo's
        # destructors, turning this clean exit 1 into a crash now and then. The checkpoint is on disk.
        sys.stdout.flush()
        os._exit(1)
