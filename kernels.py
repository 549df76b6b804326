"""
The SAE's training forward and backward: a plain-torch reference, and the same function with
its elementwise work fused into Triton GEMM kernels.

One training step of a ReLU SAE on B tokens (width d, m features) is five B x d x m GEMMs:

    forward    pre = x_in W_enc + b_enc      x_in = x - b_dec             (1)  -> [B, m]
               x_hat = f W_dec + b_dec       f = relu(pre)                (2)
    backward   d W_dec = f^T d_x_hat                                     (3)
               d f = d_x_hat W_dec^T                                     (4)  -> [B, m]
               d W_enc = x_in^T d pre        d pre = d f * [pre > 0] + ... (5)

Around (1) and (4), eager torch reads and writes B x m tensors several more times: b_enc and
the ReLU, the L1 row sums, the firing counts, the dead features' pre-activations for ghost
gradients; then the L1 gradient, the ReLU mask and the ghost gradient in the backward. At
B = 4096, m = 24576 each such pass moves 200-400 MB. The two kernels below do all of it in the
GEMMs' epilogues, in registers, so that the only B x m tensors written are f and d pre, once
each, in the matmul precision (bf16 on a GPU). (2), (3) and (5) have nothing to fuse and stay
cuBLAS GEMMs.

    encode_kernel    (1) + b_enc, f = relu, l1[b] += sum_i f_bi w_i, fires[i] += #{b: f_bi > 0},
                     pre_dead[b, slot(i)] = pre_bi for the dead features i
    pre_grad_kernel  (4) + d_l1[b] w_i, times [f > 0], + d pre_dead[b, slot(i)] on dead features

`sae_forward(..., impl="torch" | "triton")` is the entry point for both; the two compute the same
function. The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is
imported), which is how the tests check them; the interpreter is slow, so keep shapes tiny.

A TopK SAE's step is one dense GEMM, (1), and sparse work; its torch path is at the end of the
file (dense_pre, SparsePre, sparse_decode).
"""

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# -----------------------------------------------------------------------------
# The reference: plain torch, autograd for everything but the encoder.

class Encode(torch.autograd.Function):
    """pre = (x - b_dec) @ W_enc + b_enc  [B, m].
    Plain autograd would send the gradient back into x - b_dec with a sixth B x m x d GEMM,
    only to sum it over the batch for b_dec. The sum commutes with the product, so a
    matrix-vector product does: grad b_dec = -W_enc @ sum_b grad pre_b."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec):
        x_in = x - b_dec                      # [B, d]
        ctx.save_for_backward(x_in, W_enc)
        return torch.addmm(b_enc, x_in, W_enc)  # under autocast, a bf16 GEMM

    @staticmethod
    def backward(ctx, d_pre):                 # [B, m], bf16 under autocast
        x_in, W_enc = (t.to(d_pre.dtype) for t in ctx.saved_tensors)  # GEMMs in the forward's precision
        d_sum = d_pre.float().sum(0)          # [m], summed in fp32
        # Gradients come back in d_pre's dtype; autograd casts them to the fp32 parameters'.
        return None, x_in.T @ d_pre, d_sum, -(W_enc.float() @ d_sum)


def sae_forward_torch(x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead):
    pre = Encode.apply(x, W_enc, b_enc, b_dec)           # [B, m]
    f = F.relu(pre)                                       # [B, m]; the kernels hard-code this ReLU
    x_hat = torch.addmm(b_dec, f, W_dec)                  # [B, d]
    l1 = f.float() @ l1_weights                           # [B]
    fires = torch.count_nonzero(f, dim=0)                 # [m]
    return x_hat, l1, pre[:, dead], fires

# -----------------------------------------------------------------------------
# The kernels. Each program computes one BM x BN tile of a [B, m] result: rows are tokens,
# columns are features, and the loop runs over d in steps of BK.

@triton.jit
def tile_product(a_ptr, stride_a, b_ptr, stride_bk, stride_bn, rows, cols, B, d, m,
                 FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc [BM, BN] = A[rows, :] @ Bm[:, cols] in fp32, for A [B, d] row-major and Bm [d, m]
    at b_ptr + k * stride_bk + col * stride_bn (so a transpose is read in place)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, d, BK):
        k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rows[:, None] * stride_a + k[None, :], mask=(rows[:, None] < B) & (k[None, :] < d), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < d) & (cols[None, :] < m), other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns wrongly; never on a GPU
            a, b = a.to(tl.float32), b.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def encode_kernel(x_ptr, w_ptr, b_ptr, l1w_ptr, slot_ptr, f_ptr, l1_ptr, fires_ptr, pre_dead_ptr,
                  B, d, m, stride_x, stride_w, stride_f, stride_pd,
                  HAS_DEAD: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)      # tokens
    cols = tl.program_id(1) * BN + tl.arange(0, BN)      # features
    row_in, col_in = rows < B, cols < m
    acc = tile_product(x_ptr, stride_x, w_ptr, stride_w, 1, rows, cols, B, d, m,
                       FP32_DOT, PRECISION, UPCAST, BM, BN, BK)                      # (x_in W_enc) tile
    # The epilogue: everything the step needs from pre, read off the accumulator.
    pre = acc + tl.load(b_ptr + cols, mask=col_in, other=0.0)[None, :]
    inside = row_in[:, None] & col_in[None, :]
    f = tl.where(inside, tl.maximum(pre, 0.0), 0.0)      # activation(): ReLU
    tl.store(f_ptr + rows[:, None] * stride_f + cols[None, :], f.to(f_ptr.dtype.element_ty), mask=inside)
    l1w = tl.load(l1w_ptr + cols, mask=col_in, other=0.0)
    tl.atomic_add(l1_ptr + rows, tl.sum(f * l1w[None, :], axis=1), mask=row_in)
    tl.atomic_add(fires_ptr + cols, tl.sum((f > 0).to(tl.int32), axis=0), mask=col_in)
    if HAS_DEAD:  # dead feature i goes to column slot[i] of pre_dead; the others have slot -1
        slot = tl.load(slot_ptr + cols, mask=col_in, other=-1)
        tl.store(pre_dead_ptr + rows[:, None] * stride_pd + slot[None, :], pre,
                 mask=inside & (slot[None, :] >= 0))


@triton.jit
def pre_grad_kernel(dxh_ptr, wdec_ptr, f_ptr, dl1_ptr, l1w_ptr, slot_ptr, dpd_ptr, dpre_ptr,
                    B, d, m, stride_dxh, stride_wdec, stride_f, stride_dpd, stride_dpre,
                    HAS_DEAD: tl.constexpr, FP32_DOT: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)      # tokens
    cols = tl.program_id(1) * BN + tl.arange(0, BN)      # features
    row_in, col_in = rows < B, cols < m
    acc = tile_product(dxh_ptr, stride_dxh, wdec_ptr, 1, stride_wdec, rows, cols, B, d, m,
                       FP32_DOT, PRECISION, UPCAST, BM, BN, BK)                      # (d_x_hat W_dec^T) tile
    # The epilogue: d f = acc plus the L1 term's gradient, through the ReLU, plus ghost grads.
    inside = row_in[:, None] & col_in[None, :]
    dl1 = tl.load(dl1_ptr + rows, mask=row_in, other=0.0)
    l1w = tl.load(l1w_ptr + cols, mask=col_in, other=0.0)
    f = tl.load(f_ptr + rows[:, None] * stride_f + cols[None, :], mask=inside, other=0.0)
    d_pre = tl.where(f > 0, acc + dl1[:, None] * l1w[None, :], 0.0)
    if HAS_DEAD:
        slot = tl.load(slot_ptr + cols, mask=col_in, other=-1)
        d_pre += tl.load(dpd_ptr + rows[:, None] * stride_dpd + slot[None, :],
                         mask=inside & (slot[None, :] >= 0), other=0.0)
    tl.store(dpre_ptr + rows[:, None] * stride_dpre + cols[None, :], d_pre.to(dpre_ptr.dtype.element_ty), mask=inside)


def tile_configs():
    """On a GPU, a few tile shapes to autotune over; under the interpreter, one large tile
    (each program's loop iteration costs milliseconds there, whatever its size)."""
    if INTERPRET:
        return [triton.Config({"BM": 64, "BN": 64, "BK": 32})]
    return [triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4)]]


# The atomics accumulate, so autotuning's trial runs must start from zero.
encode_tuned = triton.autotune(tile_configs(), key=["B", "d", "m"], reset_to_zero=["l1_ptr", "fires_ptr"])(encode_kernel)
pre_grad_tuned = triton.autotune(tile_configs(), key=["B", "d", "m"])(pre_grad_kernel)


def grid(B, m):
    return lambda meta: (triton.cdiv(B, meta["BM"]), triton.cdiv(m, meta["BN"]))


def dot_flags(dtype, precision):
    return dict(FP32_DOT=dtype == torch.float32, PRECISION=precision, UPCAST=INTERPRET)


def encode(x_in, W_enc, b_enc, l1_weights, slot, n_dead, precision="ieee", f=None, pre_dead=None):
    """(1) and its epilogue. x_in [B, d] and W_enc [d, m] in the matmul dtype; b_enc, l1_weights
    [m] fp32; slot [m] int32; all row-major and contiguous. Returns f [B, m] (matmul dtype),
    l1 [B] fp32, fires [m] int32, pre_dead [B, n_dead] fp32. f and pre_dead may be passed in
    (the tests poison them)."""
    B, d = x_in.shape
    m = W_enc.shape[1]
    f = torch.empty(B, m, device=x_in.device, dtype=x_in.dtype) if f is None else f
    pre_dead = torch.empty(B, n_dead, device=x_in.device, dtype=torch.float32) if pre_dead is None else pre_dead
    l1 = torch.zeros(B, device=x_in.device, dtype=torch.float32)
    fires = torch.zeros(m, device=x_in.device, dtype=torch.int32)
    encode_tuned[grid(B, m)](x_in, W_enc, b_enc, l1_weights, slot, f, l1, fires, pre_dead,
                             B, d, m, x_in.stride(0), W_enc.stride(0), f.stride(0), max(1, pre_dead.stride(0)),
                             HAS_DEAD=n_dead > 0, **dot_flags(x_in.dtype, precision))
    return f, l1, fires, pre_dead


def pre_grad(d_x_hat, W_dec, f, d_l1, l1_weights, slot, d_pre_dead, precision="ieee", d_pre=None):
    """(4) and its epilogue: d pre [B, m] in f's dtype."""
    B, d = d_x_hat.shape
    m = W_dec.shape[0]
    d_pre = torch.empty_like(f) if d_pre is None else d_pre
    pre_grad_tuned[grid(B, m)](d_x_hat, W_dec, f, d_l1, l1_weights, slot, d_pre_dead, d_pre,
                               B, d, m, d_x_hat.stride(0), W_dec.stride(0), f.stride(0),
                               max(1, d_pre_dead.stride(0)), d_pre.stride(0),
                               HAS_DEAD=d_pre_dead.shape[1] > 0, **dot_flags(d_x_hat.dtype, precision))
    return d_pre


class FusedSAE(torch.autograd.Function):
    """sae_forward_torch's function, with (1) and (4) done by the kernels above. Matmul
    operands are cast to `dtype` (bf16 on a GPU); weights and their gradients stay fp32."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead, dtype, precision):
        m = W_enc.shape[1]
        slot = torch.full((m,), -1, dtype=torch.int32, device=x.device)
        slot[dead] = torch.arange(len(dead), dtype=torch.int32, device=x.device)
        x_in = (x - b_dec).to(dtype).contiguous()                              # [B, d]
        W_enc_c, W_dec_c = W_enc.to(dtype).contiguous(), W_dec.to(dtype).contiguous()
        l1_weights = l1_weights.float().contiguous()
        f, l1, fires, pre_dead = encode(x_in, W_enc_c, b_enc.float().contiguous(), l1_weights, slot, len(dead), precision)
        x_hat = torch.addmm(b_dec.to(dtype), f, W_dec_c)                       # (2) [B, d]
        ctx.save_for_backward(x_in, f, W_enc_c, W_dec_c, l1_weights, slot)
        ctx.precision = precision
        ctx.mark_non_differentiable(fires)
        return x_hat, l1, pre_dead, fires

    @staticmethod
    def backward(ctx, d_x_hat, d_l1, d_pre_dead, _):
        x_in, f, W_enc_c, W_dec_c, l1_weights, slot = ctx.saved_tensors
        g = d_x_hat.to(f.dtype).contiguous()                                   # [B, d]
        d_pre = pre_grad(g, W_dec_c, f, d_l1.float().contiguous(), l1_weights, slot,
                         d_pre_dead.float().contiguous(), ctx.precision)        # (4) [B, m]
        d_W_dec = f.T @ g                                                      # (3) [m, d]
        d_W_enc = x_in.T @ d_pre                                               # (5) [d, m]
        d_b_enc = d_pre.float().sum(0)                                         # [m]
        d_b_dec = d_x_hat.float().sum(0) - (W_enc_c @ d_b_enc.to(f.dtype)).float()  # decoder bias, and through x_in
        d_l1_weights = (f.T @ d_l1.to(f.dtype)).float() if ctx.needs_input_grad[5] else None
        return None, d_W_enc, d_b_enc, d_W_dec, d_b_dec, d_l1_weights, None, None, None


def sae_forward(x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead, impl="torch", dtype=None):
    """The SAE's training forward for x [B, d]:
        x_hat [B, d]       the reconstruction
        l1 [B]             sum_i f_bi l1_weights_i (the L1 penalty's per-token sum)
        pre_dead [B, n]    pre[:, dead], for ghost gradients
        fires [m]          #{b : f_bi > 0}, not differentiable
    impl "torch" runs under whatever autocast is on; "triton" takes its matmul dtype from the
    autocast state (or `dtype`) and rounds fp32 dots to TF32 when torch's matmuls would."""
    if impl == "torch":
        return sae_forward_torch(x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead)
    if impl != "triton":
        raise ValueError(f"impl {impl!r}: expected 'torch' or 'triton'")
    device = x.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    precision = "tf32" if device == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    with torch.autocast(device, enabled=False):  # the casts are explicit in FusedSAE
        return FusedSAE.apply(x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead, dtype, precision)


def check_fused(device):
    """Run the fused step once on a small random problem, forward and backward, against the torch
    reference: None if they agree, else what went wrong (a user's Triton may not compile these
    kernels). TF32 or not, agreement to 1e-2 is expected."""
    g = torch.Generator(device).manual_seed(0)
    B, d, m = 64, 48, 96
    x = torch.randn(B, d, device=device, generator=g)
    params = [torch.randn(d, m, device=device, generator=g) / d ** 0.5, 0.1 * torch.randn(m, device=device, generator=g),
              torch.randn(m, d, device=device, generator=g) / d ** 0.5, 0.1 * torch.randn(d, device=device, generator=g)]
    dead, l1_weights = torch.arange(0, m, 7, device=device), torch.ones(m, device=device)
    results = []
    try:
        for impl in ("torch", "triton"):
            ps = [p.clone().requires_grad_() for p in params]
            x_hat, l1, pre_dead, fires = sae_forward(x, *ps, l1_weights, dead, impl, dtype=torch.float32)
            (x_hat.pow(2).sum() + l1.sum() + pre_dead.exp().sum()).backward()
            results.append([x_hat, l1, pre_dead, fires.float()] + [p.grad for p in ps])
    except Exception as e:  # a compiler error, or a launch failure
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for a, b in zip(*results):
        if not (a.float() - b.float()).norm() <= 1e-2 * b.float().norm() + 1e-6:
            return "its results differ from the torch reference"
    return None

# -----------------------------------------------------------------------------
# The TopK step. A TopK or BatchTopK SAE keeps N = B k entries of pre. Only the encoder's
# forward (1) needs every entry, to choose them; the other four products touch the kept ones:
#
#   forward    x_hat_b = sum_{n: row_n = b} v_n W_dec[col_n] + b_dec         (2')  B k d
#   backward   d W_dec[i] = sum_{n: col_n = i} v_n d_x_hat[row_n]            (3')  B k d
#              d v_n = d_x_hat[row_n] . W_dec[col_n]                         (4')  B k d
#              d W_enc[:, i] = sum_{n: col_n = i} d pre_n x_in[row_n]        (5')  B k d
#
# At k = 32 and m = 24576 each is 768 times less work than its dense B x d x m product. The
# kept entries are lists (row, col, value), sorted by row. Every sum above is over a row or a
# column, which is an embedding bag: torch computes it without materialising the [N, d]
# products, and so never holds a B x m tensor but pre itself. Triton versions of (2')-(5')
# replace sparse_decode and SparsePre.backward, with the same arguments.

def dense_pre(x, W_enc, b_enc, b_dec):
    """pre = (x - b_dec) W_enc + b_enc [B, m], outside autograd: the selection reads it, and
    SparsePre gives the kept entries their gradient."""
    with torch.no_grad():
        return torch.addmm(b_enc, x - b_dec, W_enc)


def bag_offsets(index, n):
    """Where each of the n bags starts, for entries sorted by bag `index` (values 0..n-1)."""
    counts = torch.bincount(index, minlength=n)
    return torch.cumsum(counts, 0) - counts


class SparsePre(torch.autograd.Function):
    """The kept pre-activations values = pre[rows, cols] [N], as dense_pre computed them, made a
    function of W_enc, b_enc and b_dec: the backward of (1) on N entries only, (5')."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, rows, cols):
        ctx.save_for_backward(x - b_dec, W_enc, rows, cols)
        return values.to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx, d_pre):                                            # [N]
        x_in, W_enc, rows, cols = ctx.saved_tensors
        m = W_enc.shape[1]
        by_col = torch.argsort(cols, stable=True)
        d_W_enc_T = F.embedding_bag(rows[by_col], x_in.float(), bag_offsets(cols[by_col], m), mode="sum",
                                    per_sample_weights=d_pre[by_col])   # [m, d]
        d_b_enc = torch.zeros(m, device=d_pre.device).index_add_(0, cols, d_pre)  # [m]
        return None, None, d_W_enc_T.T, d_b_enc, -(W_enc.float() @ d_b_enc), None, None


def sparse_decode(rows, cols, values, W_dec, B):
    """(2') without b_dec: sum_{n: rows_n = b} values_n W_dec[cols_n] for b < B, [B, d], for
    entries sorted by row. embedding_bag's own backward is (3') and (4')."""
    return F.embedding_bag(cols, W_dec, bag_offsets(rows, B), mode="sum", per_sample_weights=values)
