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

--arch topk, batchtopk and matryoshka, the field's recipes since 2024, keep the k largest
pre-activations of each token (Gao et al.) or the B k largest of the batch (Bussmann et al.), and
AuxK trains the dead features; --arch jumprelu keeps those above a learnt θ, with an L0 penalty.

Read in this order: this file (the flags, the SAE, its losses, init and the decoder constraint,
train_step, the loop, main); kernels.py (the step's GEMMs, in torch and fused in Triton); gpt2.py
(where the activations come from); eval.py and dashboard.py (how an SAE is judged); then the
plumbing: data.py (tokens, downloads, files) and runs.py (command lines, torchrun, checkpoints).

Each SAE is written in SAELens's on-disk format to RUN/blocks.L.hook_resid_pre/. The run
folder also holds the JSONL log and, while the run is unfinished, a checkpoint.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
from safetensors.torch import save_file

import data
import gpt2
import kernels
import runs

# -----------------------------------------------------------------------------
# Every setting, with its default: Bloom's recipe, except where a comment says otherwise.

p = argparse.ArgumentParser(description="Train SAEs on GPT-2's residual stream.", formatter_class=runs.HelpFormatter)
p.add_argument("--layer", default=None, help="'9', '3,7,9' or 'all': one SAE per blocks.L.hook_resid_pre "
                                             "(default: 9, or the layer an --activations file's .json names)")
p.add_argument("--d_sae", type=int, default=24576, help="features per SAE")
p.add_argument("--tokens", type=int, default=300_000_000, help="training tokens (activations) per SAE")
p.add_argument("--batch", type=int, default=4096, help="activations per optimizer step")
p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: relu 4e-4; topk, batchtopk 2e-3)")
p.add_argument("--lr_warmup", type=int, default=None, help="lr warm-up steps (default: 5,000, at most a tenth of the run)")
p.add_argument("--lr_decay", choices=["none", "cosine"], default="none", help="after warm-up: constant, or cosine to 0")
p.add_argument("--arch", choices=["relu", "topk", "batchtopk", "matryoshka", "jumprelu"], default="relu",
               help="relu: L1 penalty; topk: each token's k largest; batchtopk: the batch's B*k; matryoshka: batchtopk, "
                    "each prefix reconstructing alone; jumprelu: pre > a learnt θ, L0 penalty")
p.add_argument("--k", type=int, default=32, help="topk, batchtopk: features active per token; jumprelu: at first")
p.add_argument("--auxk_coef", type=float, default=1 / 32, help="topk, batchtopk: weight of the AuxK loss (0: off)")
p.add_argument("--k_aux", type=int, default=512, help="topk, batchtopk: dead features per token that AuxK trains")
p.add_argument("--threshold_rate", type=float, default=0.1, help="batchtopk: the threshold's running-average rate")
p.add_argument("--prefixes", default=None, help="matryoshka: nested widths, ending at --d_sae (default: d_sae/32, /16 .. 1)")
p.add_argument("--l0_coef", type=float, default=None, help="jumprelu: λ (default: 1e-3; 1 with --target_l0)")
p.add_argument("--target_l0", type=float, default=None, help="jumprelu: penalise λ target (L0/target - 1)^2, not λ L0")
p.add_argument("--l0_warmup", type=int, default=None, help="jumprelu: λ's linear warm-up (default: a tenth of the run)")
p.add_argument("--bandwidth", type=float, default=0.05, help="jumprelu: ε, the straight-through window's width at θ")
p.add_argument("--sparsity", choices=["step", "tanh"], default="step", help="jumprelu: L0, or Anthropic's tanh(4f)")
p.add_argument("--preact_coef", type=float, default=0.0, help="jumprelu: weight of dead features' pre-activation loss")
p.add_argument("--l1", type=float, default=8e-5, help="relu: L1 coefficient")
p.add_argument("--l1_warmup", type=int, default=0, help="relu: steps of linear L1 warm-up (0: none)")
p.add_argument("--loss", choices=["seed", "saelens"], default="seed",
               help="relu: seed: MSE/||x||, plain L1, unit-norm rows; saelens: SAELens 6's summed MSE, L1 times row norms")
p.add_argument("--ghost_grads", action=argparse.BooleanOptionalAction, default=True, help="relu: ghost gradients")
p.add_argument("--dead_tokens", type=int, default=None,
               help="tokens without firing that make a feature dead (default: relu 20.48M, else 10M; at most --tokens/10)")
p.add_argument("--resample", action="store_true", help="also restart dead features at each buffer refill (Anthropic, 2023)")
p.add_argument("--density_window", type=int, default=1000, help="steps over which feature density is counted")
p.add_argument("--clip_grad", type=float, default=1.0, help="clip the gradient norm to this (0: off, the seed's)")
p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True, help="scale x to mean norm sqrt(d)")
p.add_argument("--center", action=argparse.BooleanOptionalAction, default=True, help="subtract each token's mean")
p.add_argument("--exclude_bos", action="store_true", help="leave out the BOS position of each context")
p.add_argument("--buffer", type=int, default=128 * 32 * 128, help="activations in the shuffled mixing buffer")
p.add_argument("--gpt2_batch", type=int, default=256, help="contexts per GPT-2 forward (speed only)")
runs.add_input_flags(p)  # --data, --weights, --cache_dir, --device, --ctx
p.add_argument("--activations", default=None, help="train on an activation file [N, d] (.npy or .safetensors), not GPT-2")
p.add_argument("--save_activations", default=None, help="write --tokens residuals of --layer to this .npy, then stop")
p.add_argument("--out", default=None, help="run folder (default: runs/L<layer>)")
p.add_argument("--resume", default=None, help="continue the run in this folder, with its saved settings")
p.add_argument("--force", action="store_true", help="overwrite an existing run or file")
p.add_argument("--seed", type=int, default=0, help="seeds the SAE init, the data order and the buffer shuffle")
p.add_argument("--precision", choices=["auto", "bf16", "tf32", "fp32"], default="auto", help="matmuls (auto: bf16 on CUDA)")
p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto", help="SAE step (auto: triton on CUDA)")
p.add_argument("--compile", action="store_true", help="torch.compile the GPT-2 forward")
p.add_argument("--log_every", type=int, default=100, help="steps between progress lines (in one process, at most 10 s)")
p.add_argument("--checkpoint_every", type=int, default=50_000_000, help="tokens between checkpoints")
p.add_argument("--parallel", choices=["auto", "layers", "data"], default="auto",
               help="torchrun: each rank trains its layers, or a slice of every batch (auto: layers if ranks <= layers)")
p.add_argument("--dist_timeout", type=int, default=600, help="seconds a rank waits for the others before giving up")


def parse_args(argv=None):
    """The flags, with the defaults that depend on others filled in (run.json records them)."""
    args = p.parse_args(argv)
    # What the activations are: GPT-2's, unless an activation file without a .json says otherwise.
    args.model_name, about = "gpt2", data.read_about(args.activations) if args.activations else None
    if about:
        if args.layer is not None and args.layer != str(about["layer"]):
            raise ValueError(f"--layer {args.layer}: {data.about_path(args.activations)} says the activations are "
                             f"{about['model']} {about['hook_name']}; expected --layer {about['layer']} or none")
        args.layer, args.model_name = str(about["layer"]), about["model"]
    elif args.activations:
        args.model_name = "unknown"  # not gpt2: nothing says it is
    args.layer = "9" if args.layer is None else args.layer
    if args.arch == "matryoshka":  # each width double the last (Bussmann et al. 2025 use a few such groups)
        try:
            args.prefixes = ([int(w) for w in args.prefixes.split(",")] if args.prefixes else
                             sorted({max(1, args.d_sae >> i) for i in range(6)}))
        except ValueError:
            raise ValueError(f"--prefixes {args.prefixes}: expected comma-separated widths") from None
    if args.lr is None:  # relu: Bloom's; topk and batchtopk: measured on real activations (docs/results.md)
        args.lr = 4e-4 if args.arch == "relu" else 2e-3
    if args.lr_warmup is None:  # short runs warm up and revive too: a 488-step run would never see 5,000 steps
        args.lr_warmup = min(5000, args.tokens // max(1, args.batch) // 10)
    if args.arch == "jumprelu":  # a target is a constraint: λ 1 holds L0 within 10% of it (docs/design.md)
        args.l0_coef = (1.0 if args.target_l0 else 1e-3) if args.l0_coef is None else args.l0_coef
        args.l0_warmup = args.tokens // max(1, args.batch) // 10 if args.l0_warmup is None else args.l0_warmup
    if args.dead_tokens is None:
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
        self.arch, self.k = "jumprelu" if arch in ("batchtopk", "matryoshka") else arch, k
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

# -----------------------------------------------------------------------------
# The losses.

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
    x_hat, l1, pre_dead, fires = kernels.sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, l1_weights, dead, impl)
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


def topk_loss(sae, x, arch, k, dead, k_aux, auxk_coef, shared=False, impl="torch", prefixes=None, sparsity=None):
    """loss, its parts (detached), each feature's firing count, x_hat, and the batch's smallest kept
    activation (batchtopk, matryoshka; else None), for a sparse SAE on x [B, d] (fp32). dead [m] (bool):
    the dead features, which AuxK trains. shared: x is this rank's slice of the batch, and every rank
    holds a copy of the SAE. impl: "torch" or "triton" (kernels.py). prefixes (matryoshka): the nested
    widths, whose reconstructions' losses add to the SAE's. sparsity (jumprelu): (λ, target L0 or None,
    ε, "step" or "tanh", the pre-activation loss's weight); its penalty replaces AuxK."""
    B, m = len(x), sae.b_enc.shape[0]
    batch_mean, gather = (runs.all_mean, runs.gather_rows) if shared else (lambda t: t, lambda t: t)
    pre = kernels.dense_pre(x, sae.W_enc, sae.b_enc, sae.b_dec)          # [B, m], the one dense GEMM
    smallest_kept = None
    if arch == "topk":
        top = pre.topk(k, dim=1, sorted=False)
        kept, cols = top.values.flatten(), top.indices.flatten()      # [B k]
        rows = torch.arange(B, device=x.device).repeat_interleave(k)  # [B k]
    elif arch == "jumprelu":  # f = pre where pre > θ = exp(log θ), per feature (Rajamanoharan et al. 2024)
        coef, target, eps, mode, preact = sparsity
        theta = sae.log_threshold.exp()                               # [m], fp32
        rows, cols = torch.nonzero(pre > theta).unbind(1)             # [N] each, by row
        kept = pre[rows, cols]                                        # [N]
        near_rows, near_cols = torch.nonzero((pre - theta.detach()).abs() < eps / 2).unbind(1)  # within ε/2 of θ
    else:
        # The n = k B largest entries of the whole batch. Those on this rank are among its own n
        # largest, so each rank offers those, and the n-th largest of all the offers is the cut.
        # Entries equal to the cut are all kept (BOS residuals, identical in every context, tie),
        # so that the kept set does not depend on how the batch is split over ranks.
        n = k * B * (runs.WORLD if shared else 1)
        offers = pre.flatten().topk(min(n, pre.numel()), sorted=False).values
        smallest_kept = gather(offers).float().topk(n, sorted=False).values.min().clamp_min(0)
        rows, cols = torch.nonzero((pre >= smallest_kept) & (pre > 0)).unbind(1)  # [N] each, by row
        kept = pre[rows, cols]                                        # [N]
    # AuxK (Gao et al. 2024, A.2): each token's n_aux largest pre-activations among the dead
    # features, not ReLU'd (so that a feature that died far below 0 still gets a gradient), fit
    # the residual the live features leave. Dense over the dead columns, however many: five bf16 GEMMs
    # of B n_dead d beat B n_aux gathered fp32 rows on a GPU up to n_dead ~ 200 k_aux (bench.py's AuxK row).
    n_dead = int(dead.sum())
    n_aux = min(k_aux, n_dead) if auxk_coef > 0 and not sparsity else 0
    del pre
    values = kernels.SparsePre.apply(kept, x, sae.W_enc, sae.b_enc, sae.b_dec, rows, cols, impl)  # [N]
    f = torch.relu(values)                                             # [N]
    if prefixes:  # Matryoshka: group g (features prefixes[g-1] to prefixes[g]) adds to the prefixes from g on,
        # so the nested reconstructions are running sums of one sparse decode into a bag per (group, token).
        bag = torch.bucketize(cols, torch.tensor(prefixes[:-1], device=x.device), right=True) * B + rows  # [N]
        order = torch.argsort(bag, stable=True)                        # by group, then (as before) by token
        adds = kernels.sparse_decode(bag[order], cols[order], f[order], sae.W_dec, len(prefixes) * B, impl)
        x_hats = sae.b_dec + adds.view(len(prefixes), B, -1).cumsum(0)  # [prefixes, B, d]
    else:
        x_hats = (kernels.sparse_decode(rows, cols, f, sae.W_dec, B, impl) + sae.b_dec)[None]  # [1, B, d]
    x_hat = x_hats[-1]                                                 # [B, d]
    sparse_loss = torch.zeros((), device=x.device)
    if sparsity:  # θ's straight-through gradients, the jump smoothed by a rectangle of width ε: d f/d θ = -θ/ε,
        # d H(pre - θ)/d θ = -1/ε near θ. Each term below is 0, with that gradient: (θ - θ.detach()) / ε x the rest.
        jump = (theta[near_cols] - theta[near_cols].detach()) / eps   # [n_near], all 0
        x_hat = x_hat - kernels.sparse_decode(near_rows, near_cols, theta[near_cols].detach() * jump,
                                              sae.W_dec.detach(), B, impl)
        penalty = torch.ones_like(f) if mode == "step" else torch.tanh(4 * f)  # each kept entry's, with f's gradient
        at_theta = 1 if mode == "step" else torch.tanh(4 * theta[near_cols].detach())
        l0 = (penalty.sum() - (at_theta * jump).sum()) / B
        sparse_loss = coef * (target * (l0 / target - 1) ** 2 if target else l0)
        if preact and n_dead:  # Anthropic (2025): dead features' pre-activations are pulled up to θ
            on = dead.nonzero().squeeze(1)
            pre_dead = kernels.Encode.apply(x, sae.W_enc[:, on], sae.b_enc[on], sae.b_dec)  # [B, n_dead]
            sparse_loss = sparse_loss + preact * torch.relu(theta[on].detach() - pre_dead).sum(1).mean()
    fires = torch.bincount(cols[f > 0], minlength=m)                   # [m]
    # The normalised MSE, 1 - explained variance: the scale of the data does not matter.
    spread = batch_mean((x - batch_mean(x.mean(0))).pow(2).sum(1).mean())
    mse_loss = (x - x_hat).pow(2).sum(1).mean() / spread
    nested = (x - x_hats[:-1]).pow(2).sum(2).mean(1).sum() / spread if prefixes else 0  # the smaller prefixes
    aux_loss = torch.zeros((), device=x.device)
    if n_aux:
        e = (x - x_hat).detach()                                       # [B, d]
        on = dead.nonzero().squeeze(1)                                 # [n_dead]
        aux_pre = kernels.Encode.apply(x, sae.W_enc[:, on], sae.b_enc[on], sae.b_dec)  # [B, n_dead]
        if n_aux < n_dead:  # zero all but each token's n_aux largest: a mask, so the kept ones get gradients
            top = aux_pre.topk(n_aux, dim=1, sorted=False).indices    # [B, n_aux]
            aux_pre = aux_pre * torch.zeros_like(aux_pre, dtype=torch.bool).scatter_(1, top, True)
        e_hat = aux_pre @ sae.W_dec[on]                                # [B, d]
        e_spread = batch_mean((e - batch_mean(e.mean(0))).pow(2).sum(1).mean())
        aux_loss = auxk_coef * (e - e_hat).pow(2).sum(1).mean() / e_spread
    parts = {"mse": mse_loss.detach(), **({"nested": nested.detach()} if prefixes else {}),
             **({"sparsity": sparse_loss.detach()} if sparsity else {"auxk": aux_loss.detach()})}
    return mse_loss + nested + sparse_loss + aux_loss, parts, fires, x_hat, smallest_kept

# -----------------------------------------------------------------------------
# Init, and the decoder constraint.

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
    unit row's component along x' (derivation in docs/design.md). b_enc is 0 and ReLU and TopK are
    homogeneous, so one factor on W_enc sets the length (a TopK SAE's k features add about k / d).
    A JumpReLU's θ starts, per feature, at the cut that has each fire on k/m of the tokens."""
    sae.b_dec.copy_(geometric_median(x))
    x_in = x[:16384] - sae.b_dec                                      # [n, d]
    pre = x_in @ sae.W_enc                                            # [n, m]
    f = topk_relu(pre, sae.k) if sae.k else torch.relu(pre)  # BatchTopK and JumpReLU: as TopK, on average
    x_hat = f @ sae.W_dec                                             # [n, d], b_dec left out
    factor = x_in.norm(dim=1).mean() / x_hat.norm(dim=1).mean()
    sae.W_enc *= factor
    if hasattr(sae, "log_threshold"):
        per_feature = len(pre) * sae.k // pre.shape[1]  # the entries of each feature above its θ: k a token in all
        sae.threshold.copy_((factor * pre.topk(max(1, per_feature), dim=0).values[-1]).clamp_min(1e-3))  # θ > 0
        sae.log_threshold.copy_(sae.threshold.log())


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
        step, y = (y_next - y).norm(), y_next
        if step <= tol * dist.mean():
            break
    return y

# -----------------------------------------------------------------------------
# One optimizer step.

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
    """Adam, fused (one pass over the weights a step: 0.04 s, not 0.33 s, on CPU at m 24,576). JumpReLU's log θ
    at 10 times the lr, to follow the pre-activations; a sparse SAE's unit decoder rows at 4 (docs/design.md)."""
    scale = {"log_threshold": 10, "W_dec": 1 if sae.k is None else 4}  # the others: 1
    groups = {s: [p for name, p in sae.named_parameters() if scale.get(name, 1) == s] for s in (1, 4, 10)}
    return torch.optim.Adam([{"params": ps, "lr_scale": s} for s, ps in groups.items()], lr=lr, fused=True)


def lr_at(step, args):
    if step < args.lr_warmup:
        return args.lr * (step + 1) / args.lr_warmup
    if args.lr_decay == "cosine":
        done = (step - args.lr_warmup) / max(1, args.tokens // args.batch - args.lr_warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * done))
    return args.lr


def dead_after(args):
    """Steps without firing after which a feature is dead (and gets ghost gradients or AuxK)."""
    return max(1, math.ceil(args.dead_tokens / args.batch))


def train_step(t, x, step, args, autocast, log, shared=False):
    """One optimizer step of one SAE on x [B, d]; returns the metrics when `log`. shared: x is
    this rank's slice of the batch, and every rank holds a copy of the SAE."""
    batch_mean = runs.all_mean if shared else (lambda v: v)
    x = x * t.scale
    lr = lr_at(step, args)
    l1 = args.l1 * min(1.0, (step + 1) / args.l1_warmup) if args.l1_warmup else args.l1
    for group in t.opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1)
    is_dead = t.since_fired >= dead_after(args)                        # [m]
    with autocast():
        if args.arch == "relu":
            dead = torch.nonzero(is_dead).squeeze(1) if args.ghost_grads else None
            loss, parts, fires, x_hat = sae_loss(t.sae, x, l1, dead, args.loss, args.kernels, batch_mean)
        else:
            sparsity = None if args.arch != "jumprelu" else (args.l0_coef * min(1.0, (step + 1) / max(1, args.l0_warmup)),
                                                             args.target_l0, args.bandwidth, args.sparsity, args.preact_coef)
            loss, parts, fires, x_hat, smallest_kept = topk_loss(t.sae, x, args.arch, args.k, is_dead, args.k_aux,
                                                                 args.auxk_coef, shared, args.kernels, args.prefixes, sparsity)
    t.opt.zero_grad(set_to_none=True)
    loss.backward()
    if shared:  # the whole batch's gradient is the mean of the slices'; the counts, their sum
        for param in t.sae.parameters():
            runs.all_sum(param.grad).div_(runs.WORLD)
        fires = runs.all_sum(fires)
    unit_rows = args.loss == "seed" or args.arch != "relu"
    if unit_rows:
        remove_parallel_grad(t.sae)
    if args.clip_grad:
        torch.nn.utils.clip_grad_norm_(t.sae.parameters(), args.clip_grad)
    t.opt.step()
    if unit_rows:
        normalize_decoder(t.sae)
    with torch.no_grad():
        if args.arch == "jumprelu":  # inference reads the threshold learnt
            t.sae.threshold.copy_(t.sae.log_threshold.exp())
        elif t.sae.arch == "jumprelu":  # BatchTopK's threshold: starts at the first batch's cut, then follows it
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
                **({"threshold": (t.sae.threshold.mean() / t.scale).item()} if t.sae.arch == "jumprelu" else {})}


@torch.no_grad()
def resample_dead(t, x, args, step):
    """Anthropic's resampling (Towards Monosemanticity, 2023), --resample: each dead feature
    restarts on a token of x [n, d] (scaled) drawn with probability proportional to its squared
    error. Its decoder row becomes that error's direction and its encoder column the same
    direction at a fifth of the live columns' mean norm, with b_enc 0 and fresh Adam moments, so
    it fires at once on inputs like that one and learns what the live features miss. The draw is
    seeded by the seed, the layer and the step: every rank and a resumed run draw alike, and a
    layer's SAE does not depend on which others train beside it."""
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

# -----------------------------------------------------------------------------
# The loop: refill the mixing buffer, serve its batches to every SAE, log, checkpoint; at the
# end, write each SAE's folder. The plumbing each line calls is in runs.py.

def train(args):
    layers = check_args(args)
    owned, shared = runs.split_work(layers, args)  # the layers this rank trains; whether ranks share SAEs
    if not args.resume:
        runs.check_run_folder(args.out, args.force)
    autocast = make_autocast(args)
    source = make_source(args, layers, owned, autocast)
    precision = matmul_precision(args)  # --kernels auto checks the kernels in exactly what will train
    args.kernels = kernels.choose(args.kernels, args.device, args.arch, "bf16" if precision == "bf16" else "fp32",
                                  "tf32" if precision == "tf32" else "ieee",
                                  (args.batch // runs.WORLD if shared else args.batch, source.d, args.d_sae))
    gen = torch.Generator(args.device).manual_seed(args.seed)
    kept = None if args.resume else runs.fill(source, args.buffer // 2, "filling the first half of the buffer")
    trainees = [new_trainee(layer, None if kept is None else kept[:, j], source.d, args) for j, layer in enumerate(owned)]
    step, served = 0, None if kept is None else kept[:0]  # served: this half's rows not yet trained on
    if args.resume:
        kept, served, step = runs.load_checkpoint(args.out, trainees, gen, source, args)
    elif runs.RANK == 0:  # only now: a run stopped while starting leaves no folder behind
        runs.start_run_folder(args)
    total, last_checkpoint = args.tokens // args.batch, step
    log = runs.Log(args, total, step)
    with runs.stop_on_signal(args.out) as stop:
        while step < total:
            if len(served) < args.batch:  # the half is served: checkpoint, refill
                if step - last_checkpoint >= max(1, args.checkpoint_every // args.batch):  # the smallest state
                    runs.save_checkpoint(args.out, trainees, kept, kept[:0], gen, source, step, args)
                    last_checkpoint = step
                tick = time.time()
                try:
                    kept, served = refill(kept, source, gen, args)
                except KeyboardInterrupt:  # a signal while GPT-2 refills the buffer: stop now, as before it
                    runs.stop_with_checkpoint(stop, trainees, kept, served, gen, source, step, args)
                log.refilled(tick)
                if args.resample:
                    for j, t in enumerate(trainees):
                        resample_dead(t, served[:16384, j] * t.scale, args, step)
            x, served = served[:args.batch], served[args.batch:]               # [batch, layers, d]
            x = runs.my_share(x) if shared else x                               # this rank's slice
            logging = log.due(step)
            tick = time.time()
            records = [train_step(t, x[:, j], step, args, autocast, logging, shared) for j, t in enumerate(trainees)]
            step += 1
            log.stepped(tick, step)
            if logging:
                log.write(trainees, records, step)
            if runs.any_rank(stop, args.device) and step < total:  # a signal: stop, keeping what is unserved
                runs.stop_with_checkpoint(stop, trainees, kept, served, gen, source, step, args)
        save_saes(trainees, step, layers, args)
    return trainees


def refill(kept, source, gen, args):
    """The seed's mixing buffer: the kept half and a fresh one, shuffled; returns (kept, served).
    A progress line if GPT-2's forwards take over 5 s; a signal during them stops the run at once."""
    half = len(kept)
    fresh = runs.fill(source, half, "refilling the buffer", runs.REFILL_QUIET, at_once=True)
    mixed = torch.cat([kept, fresh])                                         # [2 half, layers, d]
    mixed = mixed[torch.randperm(2 * half, generator=gen, device=args.device)]
    return mixed[:half], mixed[half:][:half // args.batch * args.batch]


def save_saes(trainees, step, layers, args):
    runs.check_finite(trainees, step, args.device, args.out)
    if args.parallel == "layers" or runs.RANK == 0:  # in data-parallel training the copies are identical
        for t in trainees:  # density: over the last full window, or the run so far if shorter
            density = t.density if step >= args.density_window else t.fires / (step * args.batch)
            save_sae(os.path.join(args.out, data.hook_name(t.layer)), t.sae, density, t.layer, args, t.scale.item())
    runs.finish(args, layers)


def save_sae(folder, sae, density, layer, args, scale=1.0):
    """SAELens's on-disk format, which sae_lens.SAE.load_from_disk reads as it is (eval.load_sae is
    our reader). The SAE trained on x * scale; the saved one takes x: both biases divided by the
    scale divide pre, f and x_hat by it too (ReLU, TopK and, with its threshold divided, JumpReLU
    are homogeneous). TopK is saved as "topk" with its k; BatchTopK as "jumprelu" with its
    threshold [m], as SAELens saves its own."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items() if k != "log_threshold"}
    for k in ("b_enc", "b_dec", "threshold"):  # the threshold compares with pre, which is divided too
        if k in weights:
            weights[k] = weights[k] / scale
    save_file(weights, os.path.join(tmp, "sae_weights.safetensors"))
    save_file({"sparsity": torch.log10(density.float().cpu() + 1e-10)}, os.path.join(tmp, "sparsity.safetensors"))
    d_in, d_sae = sae.W_enc.shape
    settings = runs.recorded(args)
    # SAELens 6 names the architecture; its older versions read activation_fn_str and its kwargs.
    arch = {"relu": ("standard", "relu", {}), "topk": ("topk", "topk", {"k": sae.k}),
            "jumprelu": ("jumprelu", "relu", {})}[sae.arch]
    cfg = {
        "architecture": arch[0], "d_in": d_in, "d_sae": d_sae, "activation_fn_str": arch[1], "activation_fn_kwargs": arch[2],
        **({"k": sae.k, "rescale_acts_by_decoder_norm": False} if sae.arch == "topk" else {}),
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "context_size": args.ctx, "model_name": args.model_name, "hook_name": data.hook_name(layer),
        "hook_layer": layer, "hook_head_index": None, "prepend_bos": True,
        "dataset_path": settings["activations"] or ("kjj0/fineweb10B-gpt2" if args.data == "fineweb" else settings["data"]),
        "dataset_trust_remote_code": False, "normalize_activations": "none",
        "dtype": "float32", "device": "cpu", "sae_lens_training_version": None, "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {"center_writing_weights": args.center},
        "seqpos_slice": [1, None] if args.exclude_bos else [None],
        **({"matryoshka_widths": args.prefixes} if args.arch == "matryoshka" else {}),  # SAELens's name for them
        "training_args": settings,  # ours, beyond SAELens's fields; it ignores unknown keys
    }
    data.write_atomically(os.path.join(tmp, "cfg.json"), json.dumps(cfg, indent=2))
    data.replace_folder(tmp, folder)

# -----------------------------------------------------------------------------
# main, and the setup it does before the loop.

def new_trainee(layer, x, d, args):
    """A fresh SAE for `layer`, started on x [half, d] (None on resume: the checkpoint has it).
    Seeded by layer, so that an SAE does not depend on which other layers train beside it."""
    k = None if args.arch == "relu" else round(args.target_l0) if args.target_l0 else args.k  # None: init as a ReLU
    sae = SAE(d, args.d_sae, args.seed * 1000 + layer, args.arch, k)
    if args.arch == "jumprelu":  # θ = exp(log θ), learnt per feature in fp32; init_from_data starts it
        sae.log_threshold = nn.Parameter(torch.zeros(args.d_sae))
    sae = sae.to(args.device)
    scale = 1.0
    if x is not None:
        if args.normalize:  # mean norm sqrt(d): a norm of 10 or of 1000 trains alike
            scale = math.sqrt(d) / x.norm(dim=1).mean().item()
        tick = time.time()
        init_from_data(sae, x * scale)
        if runs.RANK == 0:
            print(f"layer {layer}: b_dec starts at the geometric median of {len(x):,} activations "
                  f"({time.time() - tick:.1f} s)", file=sys.stderr)
    return Trainee(layer, sae, adam(sae, args.lr), args.device, scale)


def check_args(args):
    """One line naming the first flag with a value that cannot work; the layers, as a list."""
    runs.check_inputs(args, "d_sae", "batch", "tokens", "buffer", "gpt2_batch", "log_every", "density_window",
                      "checkpoint_every")
    for flag in ("lr_warmup", "l1_warmup", "dead_tokens", "l1", "clip_grad", "preact_coef"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected zero or more")
    for flag in sorted({f for flags in ARCH_FLAGS.values() for f in flags} - set(ARCH_FLAGS[args.arch])):
        if getattr(args, flag) != p.get_default(flag):  # another recipe's flag: this one would ignore it
            raise ValueError(f"--{flag} {getattr(args, flag)}: not a flag of --arch {args.arch}, which would ignore it")
    if args.prefixes and not (0 < args.prefixes[0] and all(a < b for a, b in zip(args.prefixes, args.prefixes[1:]))
                              and args.prefixes[-1] == args.d_sae):
        raise ValueError(f"--prefixes {','.join(map(str, args.prefixes))}: expected increasing widths ending at "
                         f"--d_sae ({args.d_sae})")
    if args.arch != "relu" and not 1 <= args.k <= args.d_sae:
        raise ValueError(f"--k {args.k}: expected 1..{args.d_sae} (--d_sae)")
    if args.k_aux < 1 or args.auxk_coef < 0:
        raise ValueError(f"--k_aux {args.k_aux} --auxk_coef {args.auxk_coef}: expected k_aux >= 1 and auxk_coef >= 0")
    for flag in ("lr", "l0_coef", "bandwidth", "target_l0"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    if not 0 < args.threshold_rate <= 1:
        raise ValueError(f"--threshold_rate {args.threshold_rate}: expected a rate in (0, 1]")
    if args.tokens < args.batch and not args.save_activations:
        raise ValueError(f"--tokens {args.tokens}: expected at least one batch ({args.batch})")
    if args.kernels == "triton":  # refused before any work; auto is settled once the shape is known
        kernels.choose("triton", args.device, args.arch, None, None, None)
    if args.buffer < 2 * args.batch:
        raise ValueError(f"--buffer {args.buffer}: expected at least two batches ({2 * args.batch})")
    layers = gpt2.parse_layers(args.layer)
    if (args.activations or args.save_activations) and len(layers) != 1:
        raise ValueError(f"--layer {args.layer}: expected one layer with --activations or --save_activations")
    return layers


ARCH_FLAGS = {"relu": ("l1", "l1_warmup", "loss", "ghost_grads"), "topk": ("k", "auxk_coef", "k_aux"),
              "batchtopk": ("k", "auxk_coef", "k_aux", "threshold_rate"),
              "matryoshka": ("k", "auxk_coef", "k_aux", "threshold_rate", "prefixes"),
              "jumprelu": ("k", "l0_coef", "target_l0", "l0_warmup", "bandwidth", "sparsity", "preact_coef")}


def matmul_precision(args):  # auto: bf16 on CUDA; fp32 elsewhere (CPU, Apple's MPS)
    return args.precision if args.precision != "auto" else ("bf16" if args.device.startswith("cuda") else "fp32")


def make_autocast(args):
    precision = matmul_precision(args)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    return lambda: torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=precision == "bf16")


def make_source(args, layers, keep, autocast):
    """Where the activations come from: an activation file, or GPT-2 forwards over the corpus."""
    if args.activations:  # every rank reads the rows itself
        source = data.FileSource(args.activations, args.center, args.device)
        if args.model_name == "unknown" and runs.RANK == 0:
            print(f"note: {args.activations} has no {os.path.basename(data.about_path(args.activations))} beside it "
                  f"(as --save_activations writes): the SAE is labelled model 'unknown', hook "
                  f"{data.hook_name(args.layer)} (from --layer)", file=sys.stderr)
        return source
    shards = data.corpus(args.data, "train", args.ctx, args.cache_dir)  # checks every file: before the model
    stream = data.Contexts(shards, args.ctx, seed=args.seed)
    model = gpt2.from_pretrained(args.weights, args.cache_dir).to(args.device)
    source = gpt2.ResidualSource(model, stream, layers, keep, args.gpt2_batch, args.center, args.exclude_bos,
                                 autocast, args.device, runs.WORLD, runs.my_share, runs.gather_rows)
    if args.compile:
        source.forward = torch.compile(model.residuals)
    return source


def save_activations(args):
    """--save_activations: --tokens raw (uncentred) residuals of one layer, for --activations; or
    the first --tokens rows of an --activations file, with its .json's provenance."""
    layers, path = check_args(args), args.save_activations
    if not path.endswith(".npy") or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"--save_activations {path}: expected a .npy path in a folder that exists")
    for target in (path, data.about_path(path)):
        if os.path.exists(target) and not args.force:
            raise ValueError(f"{target} exists: pass --force to overwrite it")
    if runs.WORLD > 1:
        raise ValueError("--save_activations: run it in one process, not under torchrun")
    args.center = False  # centring, if on, is applied when training
    source, settings = make_source(args, layers, layers, make_autocast(args)), runs.recorded(args)
    about = {"model": args.model_name, "hook_name": data.hook_name(layers[0]), "layer": layers[0], "d": source.d}
    if args.activations and args.tokens > source.n:
        raise ValueError(f"--tokens {args.tokens:,}: {args.activations} holds only {source.n:,} rows")
    about = ({**(data.read_about(args.activations) or about), "copied_from": settings["activations"]} if args.activations
             else {**about, "centered": False, "weights": settings["weights"] or gpt2.GPT2_URL, "data": settings["data"],
                   "ctx": args.ctx, "exclude_bos": args.exclude_bos, "seed": args.seed})
    gpt2.write_activations(path, source, args.tokens, args.buffer // 2, {**about, "rows": args.tokens})


def main(argv=None):
    args = parse_args(argv)
    if args.resume:
        args = runs.settings_for_resume(args, p, argv)
    with runs.processes(args):  # torchrun's ranks, if this is one of them
        if args.save_activations:
            return save_activations(args)
        args.out = args.out or os.path.join("runs", "L" + args.layer.replace(",", "-"))
        return train(args)


if __name__ == "__main__":
    runs.command_line(main, lambda: "nothing was written")  # a signal while starting; once training, see runs.py
