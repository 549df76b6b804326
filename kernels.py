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

    encode_kernel    (1) + b_enc, f = relu, l1[b] += sum_i f_bi w_i, fires[i] += #{b: f_bi > 0}
    pre_grad_kernel  (4) + d_l1[b] w_i, times [f > 0]

The dead features' pre-activations and their ghost gradients, a few percent of the columns,
are a small GEMM and an index_add beside the kernels: in the epilogues they cost registers
that every tile pays for (they made the 128 x 128 tiles spill 600-1,100 bytes per thread).

`sae_forward(..., impl="torch" | "triton")` is the entry point for both; the two compute the same
function. The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (set before triton is
imported), which is how the tests check them; the interpreter is slow, so keep shapes tiny.
Without Triton installed (macOS, Windows) this file still imports, and the torch path runs.

A TopK SAE's step is one dense GEMM, (1), and sparse work: its torch path (dense_pre, SparsePre,
sparse_decode) and two Triton kernels for it (bag_sum_kernel, gathered_dot_kernel) follow; then
`choose`, which decides the path that trains (--kernels) after checking the kernels on the GPU.

`python kernels.py` compiles every kernel variant for GPUs from the T4 to the B200 and the MI300,
no GPU needed, and prints the registers, spills and shared memory each takes (gpu_check.py).
"""

from __future__ import annotations  # the kernels' `tl.constexpr` annotations, unevaluated without Triton

import functools
import os
import sys

import torch
import torch.nn.functional as F

try:  # only the kernels need Triton: without it (macOS, Windows, a CPU-only box) the torch path runs
    import triton
    import triton.language as tl
    jit = triton.jit
except ImportError:
    triton = None
    jit = lambda kernel: kernel  # noqa: E731; the kernels are then plain functions that nothing launches

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
        d_sum = d_pre.sum(0, dtype=torch.float32)  # [m] in fp32; on CUDA without an fp32 copy of d_pre
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

@jit
def tile_of(B, m, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr):
    """This program's (rows, cols). Programs are numbered along the columns of a band of GROUP
    row tiles, not along whole rows of tiles (Triton's matmul tutorial): programs that run at
    the same time then share the band's row tiles and each other's column tiles in L2."""
    pid = tl.program_id(0)
    row_tiles, col_tiles = tl.cdiv(B, BM), tl.cdiv(m, BN)
    band = pid // (GROUP * col_tiles)
    band_rows = min(row_tiles - band * GROUP, GROUP)       # the last band may be narrower
    in_band = pid % (GROUP * col_tiles)
    row_tile, col_tile = band * GROUP + in_band % band_rows, in_band // band_rows
    # int64, and so every offset computed from them: row * stride_f passes 2^31 once B m does (B
    # 16,384 x m 131,072), and a 32-bit offset would wrap to gigabytes before f.
    return (row_tile * BM + tl.arange(0, BM)).to(tl.int64), (col_tile * BN + tl.arange(0, BN)).to(tl.int64)


@jit
def tile_product(a_ptr, stride_a, b_ptr, stride_bk, stride_bn, rows, cols, B, d, m,
                 FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """acc [BM, BN] = A[rows, :] @ Bm[:, cols] in fp32, for A [B, d] row-major and Bm [d, m]
    at b_ptr + k * stride_bk + col * stride_bn (so a transpose is read in place)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, d, BK):
        k = (k0 + tl.arange(0, BK)).to(tl.int64)  # k * stride_bk is d m for W_enc: 64-bit as well
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


@jit
def encode_kernel(x_ptr, w_ptr, b_ptr, l1w_ptr, f_ptr, l1_ptr, fires_ptr,
                  B, d, m, stride_x, stride_w, stride_f,
                  FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    rows, cols = tile_of(B, m, BM, BN, GROUP)            # tokens, features
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


@jit
def pre_grad_kernel(dxh_ptr, wdec_ptr, f_ptr, dl1_ptr, l1w_ptr, dpre_ptr,
                    B, d, m, stride_dxh, stride_wdec, stride_f, stride_dpre,
                    FP32_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    rows, cols = tile_of(B, m, BM, BN, GROUP)            # tokens, features
    row_in, col_in = rows < B, cols < m
    acc = tile_product(dxh_ptr, stride_dxh, wdec_ptr, 1, stride_wdec, rows, cols, B, d, m,
                       FP32_DOT, PRECISION, UPCAST, BM, BN, BK)                      # (d_x_hat W_dec^T) tile
    # The epilogue: d f = acc plus the L1 term's gradient, through the ReLU.
    inside = row_in[:, None] & col_in[None, :]
    dl1 = tl.load(dl1_ptr + rows, mask=row_in, other=0.0)
    l1w = tl.load(l1w_ptr + cols, mask=col_in, other=0.0)
    f = tl.load(f_ptr + rows[:, None] * stride_f + cols[None, :], mask=inside, other=0.0)
    d_pre = tl.where(f > 0, acc + dl1[:, None] * l1w[None, :], 0.0)
    tl.store(dpre_ptr + rows[:, None] * stride_dpre + cols[None, :], d_pre.to(dpre_ptr.dtype.element_ty), mask=inside)


# The tiles the autotuner chooses from, as (BM, BN, BK, warps, stages), by the bytes of a matmul
# operand. Each keeps its accumulator and epilogue in registers: at most 64 fp32 accumulator
# values per thread (BM BN / (32 warps)). fp32 has no 128 x 128 tile: its IEEE variant took all
# 255 registers. A GPU is offered the tiles its shared memory per block holds: an A100 or H100
# all of them; the last of each list fits 64 KB (an MI300's LDS, a T4's). `python kernels.py`
# compiles each for every GPU we know, and the tests check them for sm_80, sm_90 and gfx942.
TILES = {
    2: [(128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4), (64, 128, 64, 4, 2)],   # bf16, fp16
    4: [(64, 128, 32, 8, 4), (128, 64, 32, 8, 4), (64, 64, 32, 4, 3)],                         # fp32 (tf32 or ieee)
}
GROUP = 8  # row tiles per band of the program order (tile_of)


def fits(tile, size, limit):
    """Whether a tile surely fits `limit` bytes of shared memory: `stages` buffers of its A and B
    slices (Ampere's pipeline keeps one fewer) and 1 KB for barriers and the epilogue's sums."""
    bm, bn, bk, _, stages = tile
    return stages * (bm + bn) * bk * size + 1024 <= limit


def shared_limit(device):
    """Bytes of shared memory (LDS, on AMD) that one block may take on this GPU."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


@functools.lru_cache  # every step asks: the device's properties are read once
def tiles_for(size, device):
    """The tiles offered on this GPU for operands of `size` bytes; under the interpreter, one large
    tile (a loop iteration costs milliseconds there, whatever its size)."""
    return ((64, 64, 32, 4, 1),) if INTERPRET else tuple(t for t in TILES[size] if fits(t, size, shared_limit(device)))


LAUNCHERS = {}  # (kernel, tiles): its autotuned launcher, made on first use


def launch(kernel, args, B, m, tiles, dtype, precision):
    """kernel(*args) over a [B, m] result, autotuned on (B, d, m) over `tiles`: the first time it
    meets a shape it times each tile (with one tile, it just runs it)."""
    if (kernel, tiles) not in LAUNCHERS:
        configs = [triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP=GROUP), num_warps=w, num_stages=s)
                   for bm, bn, bk, w, s in tiles]
        zeroed = ["l1_ptr", "fires_ptr"] if kernel is encode_kernel else None  # atomics: each trial starts at 0
        LAUNCHERS[kernel, tiles] = triton.autotune(configs, key=["B", "d", "m"], reset_to_zero=zeroed)(kernel)
    grid = lambda meta: (triton.cdiv(B, meta["BM"]) * triton.cdiv(m, meta["BN"]),)  # noqa: E731; a program a tile
    LAUNCHERS[kernel, tiles][grid](*args, FP32_DOT=dtype == torch.float32, PRECISION=precision, UPCAST=INTERPRET)


def encode(x_in, W_enc, b_enc, l1_weights, precision="ieee", f=None, tiles=None):
    """(1) and its epilogue. x_in [B, d] and W_enc [d, m] in the matmul dtype; b_enc, l1_weights
    [m] fp32; all row-major and contiguous. Returns f [B, m] (matmul dtype), l1 [B] fp32 and
    fires [m] int32. f may be passed in (the tests poison it); tiles: to choose from, if not tiles_for's."""
    (B, d), m = x_in.shape, W_enc.shape[1]
    f = torch.empty(B, m, device=x_in.device, dtype=x_in.dtype) if f is None else f
    l1 = torch.zeros(B, device=x_in.device, dtype=torch.float32)
    fires = torch.zeros(m, device=x_in.device, dtype=torch.int32)
    launch(encode_kernel, (x_in, W_enc, b_enc, l1_weights, f, l1, fires, B, d, m, x_in.stride(0), W_enc.stride(0),
                           f.stride(0)), B, m, tuple(tiles or tiles_for(x_in.element_size(), x_in.device)),
           x_in.dtype, precision)
    return f, l1, fires


def pre_grad(d_x_hat, W_dec, f, d_l1, l1_weights, precision="ieee", d_pre=None, tiles=None):
    """(4) and its epilogue: d pre [B, m] in f's dtype, before the dead features' ghost term."""
    (B, d), m = d_x_hat.shape, W_dec.shape[0]
    d_pre = torch.empty_like(f) if d_pre is None else d_pre
    launch(pre_grad_kernel, (d_x_hat, W_dec, f, d_l1, l1_weights, d_pre, B, d, m, d_x_hat.stride(0), W_dec.stride(0),
                             f.stride(0), d_pre.stride(0)), B, m,
           tuple(tiles or tiles_for(d_x_hat.element_size(), d_x_hat.device)), d_x_hat.dtype, precision)
    return d_pre


class FusedSAE(torch.autograd.Function):
    """sae_forward_torch's function, with (1) and (4) done by the kernels above. Matmul
    operands are cast to `dtype` (bf16 on a GPU); weights and their gradients stay fp32."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, l1_weights, dead, dtype, precision):
        x_in = (x - b_dec).to(dtype).contiguous()                              # [B, d]
        W_enc_c, W_dec_c = W_enc.to(dtype).contiguous(), W_dec.to(dtype).contiguous()
        l1_weights = l1_weights.float().contiguous()
        f, l1, fires = encode(x_in, W_enc_c, b_enc.float().contiguous(), l1_weights, precision)
        # The dead features' pre-activations, for ghost grads: a GEMM of their columns only, few
        # (a few percent of m), rounded to the matmul dtype as the torch path's pre is.
        pre_dead = torch.addmm(b_enc[dead].to(dtype), x_in, W_enc_c[:, dead]).float()  # [B, n_dead]
        x_hat = torch.addmm(b_dec.to(dtype), f, W_dec_c)                       # (2) [B, d]
        ctx.save_for_backward(x_in, f, W_enc_c, W_dec_c, l1_weights, dead)
        ctx.precision = precision
        ctx.mark_non_differentiable(fires)
        return x_hat, l1, pre_dead, fires

    @staticmethod
    def backward(ctx, d_x_hat, d_l1, d_pre_dead, _):
        x_in, f, W_enc_c, W_dec_c, l1_weights, dead = ctx.saved_tensors
        g = d_x_hat.to(f.dtype).contiguous()                                   # [B, d]
        d_pre = pre_grad(g, W_dec_c, f, d_l1.float().contiguous(), l1_weights, ctx.precision)  # (4) [B, m]
        d_pre.index_add_(1, dead, d_pre_dead.to(d_pre.dtype))                  # the ghost term, on dead columns
        d_W_dec = f.T @ g                                                      # (3) [m, d]
        d_W_enc = x_in.T @ d_pre                                               # (5) [d, m]
        d_b_enc = d_pre.sum(0, dtype=torch.float32)                           # [m], no fp32 [B, m] copy
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
# products, and so never holds a B x m tensor but pre itself. With impl="triton", two kernels
# below do the four products instead (on CUDA; the torch path is the reference and the CPU's).

def dense_pre(x, W_enc, b_enc, b_dec):
    """pre = (x - b_dec) W_enc + b_enc [B, m], outside autograd: the selection reads it, and
    SparsePre gives the kept entries their gradient."""
    with torch.no_grad():
        return torch.addmm(b_enc, x - b_dec, W_enc)


def bag_offsets(index, n):
    """Where each of the n bags starts, for entries sorted by bag `index` (values 0..n-1): the
    first entry >= j, for each j. (Not bincount: on CUDA it reads its input's max back to the host.)"""
    return torch.searchsorted(index, torch.arange(n, device=index.device, dtype=index.dtype))


class SparsePre(torch.autograd.Function):
    """The kept pre-activations values = pre[rows, cols] [N], as dense_pre computed them, made a
    function of W_enc, b_enc and b_dec: the backward of (1) on N entries only, (5'), by
    embedding_bag (impl "torch") or bag_sum (impl "triton")."""

    @staticmethod
    def forward(ctx, values, x, W_enc, b_enc, b_dec, rows, cols, impl="torch"):
        ctx.save_for_backward(x - b_dec, W_enc, rows, cols)
        ctx.impl = impl
        return values.to(torch.float32, copy=True)

    @staticmethod
    def backward(ctx, d_pre):                                            # [N]
        x_in, W_enc, rows, cols = ctx.saved_tensors
        m = W_enc.shape[1]
        by_col = torch.argsort(cols, stable=True)
        if ctx.impl == "triton":
            d_W_enc_T = bag_sum(rows[by_col], d_pre[by_col], bag_offsets(cols[by_col], m), x_in.float())  # [m, d]
        else:
            d_W_enc_T = F.embedding_bag(rows[by_col], x_in.float(), bag_offsets(cols[by_col], m), mode="sum",
                                        per_sample_weights=d_pre[by_col])   # [m, d]
        d_b_enc = torch.zeros(m, device=d_pre.device).index_add_(0, cols, d_pre)  # [m]
        return None, None, d_W_enc_T.T, d_b_enc, -(W_enc.float() @ d_b_enc), None, None, None


class SparseDecode(torch.autograd.Function):
    """sparse_decode with the kernels below: forward (2') by bag_sum over rows; backward (4') by
    gathered_dot and (3') by bag_sum over columns, for which the entries are re-sorted by column."""

    @staticmethod
    def forward(ctx, rows, cols, values, W_dec, B):
        ctx.save_for_backward(rows, cols, values, W_dec)
        # Bags are tokens, of about k entries: none long enough to be worth cutting (split=False).
        return bag_sum(cols, values, bag_offsets(rows, B), W_dec, split=False)  # [B, d] fp32

    @staticmethod
    def backward(ctx, d_x_hat):                                         # [B, d]
        rows, cols, values, W_dec = ctx.saved_tensors
        g = d_x_hat.float()
        d_values = d_W_dec = None
        if ctx.needs_input_grad[2]:
            d_values = gathered_dot(rows, g, cols, W_dec)               # (4') [N]
        if ctx.needs_input_grad[3]:
            by_col = torch.argsort(cols, stable=True)
            d_W_dec = bag_sum(rows[by_col], values[by_col], bag_offsets(cols[by_col], len(W_dec)), g)  # (3') [m, d]
        return None, None, d_values, d_W_dec, None


def sparse_decode(rows, cols, values, W_dec, B, impl="torch"):
    """(2') without b_dec: sum_{n: rows_n = b} values_n W_dec[cols_n] for b < B, [B, d], for
    entries sorted by row. impl "torch": embedding_bag, whose own backward is (3') and (4');
    "triton": SparseDecode (fp32 out, whatever W_dec's dtype)."""
    if impl == "triton":
        return SparseDecode.apply(rows, cols, values, W_dec, B)
    if impl != "torch":
        raise ValueError(f"impl {impl!r}: expected 'torch' or 'triton'")
    return F.embedding_bag(cols, W_dec, bag_offsets(rows, B), mode="sum", per_sample_weights=values)

# -----------------------------------------------------------------------------
# The TopK step's kernels. Two kernels do the four sparse products:
#
#   bag_sum       out[j] = sum_{n in bag j} w_n table[idx_n]    (2') by row; (3'), (5') by column
#   gathered_dot  out[n] = a[ia_n] . b[ib_n]                    (4')
#
# A bag is a run of entries sorted by bag: bag j is entries starts[j] up to starts[j + 1]
# (bag_offsets). A bag_sum program owns one bag and BAG_D columns, and walks the bag BAG_N
# entries at a time with runtime bounds, in fp32 and in a fixed order: no atomics, so the sums
# are deterministic, and bags of any size, empty ones included, need no other launch. Neither
# kernel writes an [N, d] tensor: their traffic is the N gathered table rows, read once.
# In training every table is fp32 (W_dec, d_x_hat, x_in, as on the torch path); the kernels
# also read fp16 and bf16 tables, and always accumulate in fp32.
#
# Launch constants (the cross-compile test builds these): for d = 768 a program holds a
# BLOCK_N x BLOCK_D = 16 x 128 fp32 tile, 16 values a thread at 4 warps, read as 16-byte vectors.

BAG_N, BAG_D, BAG_WARPS = 16, 128, 4     # bag_sum_kernel: grid (bags, cdiv(d, BAG_D))
BAG_PIECE = 256                          # bag_sum: longer bags are cut (a program walks its bag serially)
DOT_N, DOT_D, DOT_WARPS = 16, 128, 4     # gathered_dot_kernel: grid (cdiv(N, DOT_N),)


@jit
def bag_sum_kernel(idx_ptr, w_ptr, starts_ptr, table_ptr, out_ptr, N, n_bags, d, stride_table, stride_out,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)              # [BLOCK_D]
    col_in = cols < d
    start = tl.load(starts_ptr + bag)
    end = tl.load(starts_ptr + bag + 1, mask=bag + 1 < n_bags, other=N)   # the last bag ends at N
    # Summed over its rows once, at the end: rows lie across warps, and a sum over them each
    # step would go through shared memory each time.
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)                                     # entries
        n_in = n < end
        idx = tl.load(idx_ptr + n, mask=n_in, other=0).to(tl.int64)       # int64: idx * stride may pass 2^31
        w = tl.load(w_ptr + n, mask=n_in, other=0.0).to(tl.float32)
        rows = tl.load(table_ptr + idx[:, None] * stride_table + cols[None, :],
                       mask=n_in[:, None] & col_in[None, :], other=0.0)    # [BLOCK_N, BLOCK_D]
        acc += w[:, None] * rows.to(tl.float32)
    tl.store(out_ptr + bag.to(tl.int64) * stride_out + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty),
             mask=col_in)


def bag_sum(index, weights, starts, table, out=None, split=True):
    """out[j] = sum_{n in bag j} weights_n table[index_n], [len(starts), d] fp32, for entries sorted
    by bag with bag j starting at starts[j] (bag_offsets); an empty bag sums to 0. index [N] and
    starts integer, weights [N] and table [*, d] float. out may be passed in (the tests poison it);
    split=False walks each bag whole, in one program."""
    n, d = len(starts), table.shape[1]
    out = torch.empty(n, d, device=table.device, dtype=torch.float32) if out is None else out
    if len(index) == 0:  # nothing to read: every bag is empty
        return out.zero_()
    if split and n and d:
        # A long bag (a feature that fires on most tokens) would be one program's long serial walk.
        # So every bag is cut into pieces of at most BAG_PIECE entries, the pieces are summed, and
        # then each bag's pieces: two launches, as deterministic as one, and no host sync, for the
        # pieces are padded to a fixed count P with empty ones at entry 0.
        entry = torch.arange(len(index), device=index.device, dtype=starts.dtype)            # [N]
        bag_start = starts[torch.searchsorted(starts, entry, right=True) - 1]               # [N]
        cut = (entry - bag_start) % BAG_PIECE == 0                                           # [N] starts a piece
        P = min(n + len(index) // BAG_PIECE, len(index))  # >= the pieces, sum_j cdiv(len_j, BAG_PIECE)
        piece_starts = torch.where(cut, entry, 0).sort().values[-P:]                         # [P]
        pieces = bag_sum(index, weights, piece_starts, table, split=False)                  # [P, d]
        return bag_sum(entry[:P], torch.ones(P, device=table.device), torch.searchsorted(piece_starts, starts),
                       pieces, out, split=False)
    if n and d:
        table = table if table.stride(1) == 1 else table.contiguous()
        bag_sum_kernel[(n, triton.cdiv(d, BAG_D))](index.contiguous(), weights.contiguous(), starts.contiguous(),
                                                   table, out, len(index), n, d, table.stride(0), out.stride(0),
                                                   BLOCK_N=BAG_N, BLOCK_D=BAG_D, num_warps=BAG_WARPS)
    return out


def bag_sum_torch(index, weights, starts, table):
    """bag_sum's reference: embedding_bag (which wants weights in the table's dtype)."""
    return F.embedding_bag(index, table, starts, mode="sum", per_sample_weights=weights.to(table.dtype))


@jit
def gathered_dot_kernel(ia_ptr, a_ptr, ib_ptr, b_ptr, out_ptr, N, d, stride_a, stride_b,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                # entries
    n_in = n < N
    ia = tl.load(ia_ptr + n, mask=n_in, other=0).to(tl.int64)             # int64, as in bag_sum
    ib = tl.load(ib_ptr + n, mask=n_in, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)                   # summed over d once, at the end
    for d0 in range(0, d, BLOCK_D):
        k = d0 + tl.arange(0, BLOCK_D)
        mask = n_in[:, None] & (k[None, :] < d)
        a = tl.load(a_ptr + ia[:, None] * stride_a + k[None, :], mask=mask, other=0.0)   # [BLOCK_N, BLOCK_D]
        b = tl.load(b_ptr + ib[:, None] * stride_b + k[None, :], mask=mask, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)
    tl.store(out_ptr + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_in)


def gathered_dot(ia, a, ib, b, out=None):
    """out[n] = a[ia_n] . b[ib_n], [N] fp32, for a [*, d] and b [*, d] float, ia and ib [N] integer."""
    N, d = len(ia), a.shape[1]
    out = torch.empty(N, device=a.device, dtype=torch.float32) if out is None else out
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    if N:
        gathered_dot_kernel[(triton.cdiv(N, DOT_N),)](ia.contiguous(), a, ib.contiguous(), b, out, N, d,
                                                      a.stride(0), b.stride(0),
                                                      BLOCK_N=DOT_N, BLOCK_D=DOT_D, num_warps=DOT_WARPS)
    return out


def gathered_dot_torch(ia, a, ib, b, chunk=65536):
    """gathered_dot's reference, chunk entries at a time: [chunk, d] at most in memory."""
    return torch.cat([(a[ia[s:s + chunk]].float() * b[ib[s:s + chunk]].float()).sum(1)
                      for s in range(0, len(ia), chunk)] or [a.new_zeros(0, dtype=torch.float32)])


# -----------------------------------------------------------------------------
# Which path trains. A user's Triton may miscompile a kernel, a GPU may lack the shared memory,
# registers or tensor cores a tile needs, and a compiler abort or a sticky CUDA fault kills its
# process: so on CUDA, --kernels auto first checks the kernels, in a child process, on exactly
# what will train (gpu_check.py). `python kernels.py` cross-compiles every kernel variant for
# GPUs that need not be here and prints what each uses (gpu_check.cross_compile).

KERNEL_DEVICES = ("cuda",)  # where --kernels auto tries the kernels (ROCm's torch calls its GPUs cuda too)


def choose(requested, device, arch, dtype, precision, shape):
    """--kernels: "torch"; "triton", which insists; or "auto": the Triton kernels on CUDA once
    check_kernels passes for this very configuration (shape: B, d, m), else torch with a one-line
    WARNING that says why: never silently, though the torch path is correct, only slower."""
    kind = torch.device(device).type
    if requested == "triton" and triton is None:
        raise ValueError("--kernels triton: Triton is not installed here (pip install triton; Linux only)")
    if requested == "triton" and kind != "cuda" and not INTERPRET:
        raise ValueError(f"--kernels triton on {device}: expected a CUDA device (or TRITON_INTERPRET=1, for tests)")
    if requested != "auto" or kind not in KERNEL_DEVICES:
        return requested if requested != "auto" else "torch"
    import gpu_check  # the check's code, and its child process, only where it runs
    problem = "Triton is not installed" if triton is None else gpu_check.self_check(device, arch, dtype, precision, shape)
    if problem:
        print(f"WARNING: the Triton kernels failed their check on {device} ({problem}); training with the torch "
              f"path instead (--kernels torch)", file=sys.stderr)
    return "torch" if problem else "triton"


if __name__ == "__main__":
    import gpu_check
    gpu_check.cross_compile()
