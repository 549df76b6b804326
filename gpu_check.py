"""
The GPU path's checks, written without a GPU; each also runs on CPU, in a form the tests use.

- self_check: what `--kernels auto` runs before training on CUDA, in a child process (where a
  compiler abort or a sticky CUDA fault cannot take training down): every kernel variant that
  training will run, at its shape, dtype and precision, against float64; and the compiled code
  of each, which must not spill and must use the tensor cores that its dtype has.
- cross_compile, `python kernels.py [--arch 75,80,86,89,90,100,120,gfx942]`: every kernel variant
  compiled for GPUs that need not be here, by the compilers in Triton's wheel, with the
  registers, stack, spill stores and shared memory it takes and its tensor-core instructions
  (mma.sync: Ampere, Ada and the RTX 50s; wgmma: Hopper; tcgen05: B200; MFMA: MI300).
- the GPU script, `python gpu_check.py OUTDIR [--dry]`: every check and benchmark, once on a lent GPU.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import kernels

# -----------------------------------------------------------------------------
# The self-check.

TOLERANCE = {"bf16": 1e-2, "tf32": 3e-3, "ieee": 1e-5}  # relative error against float64
GEMMS = ("encode_kernel", "pre_grad_kernel")
SPARSE = ("bag_sum_kernel", "gathered_dot_kernel")


def variants(limit, arch=None, dtype=None, precision=None):
    """(label, kernel, operand dtype, constexprs, warps, stages) of each kernel variant that an
    `arch` step (None: any) runs in this dtype and precision (None: any) with `limit` bytes of
    shared memory a block: relu's kernels in each tile that fits; TopK's, in fixed blocks."""
    if arch in ("relu", None):
        for kernel in GEMMS:
            for dt, pr in (("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")):
                size = 2 if dt == "bf16" else 4
                for bm, bn, bk, warps, stages in kernels.TILES[size]:
                    if dtype in (None, dt) and precision in (None, pr) and \
                            kernels.fits((bm, bn, bk, warps, stages), size, limit):
                        label = f"{kernel} {dt}{'/' + pr if dt == 'fp32' else ''} {bm}x{bn}x{bk}/{warps}w/{stages}s"
                        yield label, kernel, dt, dict(FP32_DOT=dt == "fp32", PRECISION=pr, UPCAST=False, BM=bm, BN=bn,
                                                      BK=bk, GROUP=kernels.GROUP), warps, stages
    if arch != "relu":
        for kernel, (n, d, warps) in zip(SPARSE, ((kernels.BAG_N, kernels.BAG_D, kernels.BAG_WARPS),
                                                  (kernels.DOT_N, kernels.DOT_D, kernels.DOT_WARPS))):
            yield f"{kernel} fp32 {n}x{d}/{warps}w", kernel, "fp32", dict(BLOCK_N=n, BLOCK_D=d), warps, 3


def compiled_problems(row):
    """What is wrong in a compiled variant (a row of compile_for's): spills, or GEMM products that
    miss the tensor cores of their dtype (bf16, tf32; IEEE fp32 has none on NVIDIA)."""
    kernel, dtype = row["variant"].split()[:2]
    problems = [f"{row['variant']} spills ({row['spills']} stores)"] if row["spills"] else []
    if kernel in GEMMS and dtype != "fp32/ieee" and row["tensor_cores"] == "none":
        problems.append(f"{row['variant']} has no tensor cores on {row['target']}")
    return problems


def check_kernels(device, arch, dtype, precision, B, d, m, k=32):
    """Every kernel variant that an `arch` step runs at this shape, dtype ("bf16", "fp32") and
    precision ("tf32", "ieee"), against float64: relu's encode and pre_grad in each tile offered
    here; TopK's bag_sum (by token, and by feature, whose bags are long) and gathered_dot on B k
    entries. The [B, m] outputs are compared on 256 rows from the first to the last. Returns
    [(what, relative error, tolerance)], and the problems of the variants' code compiled for
    this GPU (compiled_problems; not looked for under the interpreter)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # Triton launches on the current device
    g = torch.Generator(device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    rel = lambda got, ref: ((got.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    results = []
    if arch == "relu":
        cast = torch.bfloat16 if dtype == "bf16" else torch.float32
        tol = TOLERANCE["bf16" if dtype == "bf16" else precision]
        x, W, b, l1w = rand(B, d).to(cast), (rand(d, m) / d ** 0.5).to(cast), 0.1 * rand(m), rand(m).abs()
        d_x_hat, W_dec, d_l1 = rand(B, d).to(cast), (rand(m, d) / d ** 0.5).to(cast), rand(B)
        rows = torch.linspace(0, B - 1, min(B, 256), device=device).long()
        f_ref = (x[rows].double() @ W.double() + b.double()).relu()                                  # [256, m]
        d_f = d_x_hat[rows].double() @ W_dec.double().T + d_l1[rows, None].double() * l1w.double()  # [256, m]
        if not (tiles := kernels.tiles_for(W.element_size(), device)):
            return results, [f"no {dtype} tile fits in {kernels.shared_limit(device):,} bytes of shared memory"]
        for tile in tiles:
            label = f"{dtype}{'/' + precision if dtype == 'fp32' else ''} {'x'.join(map(str, tile[:3]))}"
            f, l1, fires = kernels.encode(x, W, b, l1w, precision, tiles=[tile])
            miscounted = ((fires - (f > 0).sum(0)).abs().sum() / fires.sum().clamp_min(1)).item()  # against f itself
            error = max(rel(f[rows], f_ref), rel(l1[rows], f_ref @ l1w.double()), miscounted)
            results.append((f"encode_kernel {label}", error, tol))
            d_pre = kernels.pre_grad(d_x_hat, W_dec, f, d_l1, l1w, precision, tiles=[tile])
            results.append((f"pre_grad_kernel {label}", rel(d_pre[rows], d_f * (f[rows] > 0)), tol))
    else:
        token = torch.arange(B, device=device).repeat_interleave(k)                    # [B k], sorted
        feature = torch.randint(m, (B * k,), device=device, generator=g)               # [B k]
        w, W_dec, x_in, by_feature = rand(B * k), rand(m, d), rand(B, d), torch.argsort(feature, stable=True)

        def summed(n, bag, table, index):  # float64: out[j] = sum_{bag_i = j} w_i table[index_i]
            out = torch.zeros(n, d, device=device, dtype=torch.float64)
            return out.index_add_(0, bag, w.double()[:, None] * table.double()[index])

        decoded = kernels.bag_sum(feature, w, kernels.bag_offsets(token, B), W_dec)                    # (2')
        grad = kernels.bag_sum(token[by_feature], w[by_feature], kernels.bag_offsets(feature[by_feature], m), x_in)  # (5')
        dots = kernels.gathered_dot(token, x_in, feature, W_dec)                                       # (4')
        results += [(f"bag_sum_kernel, {B * k} entries by token", rel(decoded, summed(B, token, W_dec, feature)), 1e-5),
                    (f"bag_sum_kernel, {B * k} entries by feature", rel(grad, summed(m, feature, x_in, token)), 1e-5),
                    (f"gathered_dot_kernel, {B * k} entries",
                     rel(dots, (x_in.double()[token] * W_dec.double()[feature]).sum(1)), 1e-5)]
    if kernels.INTERPRET:
        return results, []
    target = kernels.triton.runtime.driver.active.get_current_target()
    compiled = [dict(target=target.arch, variant=label, **compile_for(target, *rest))
                for label, *rest in variants(kernels.shared_limit(device), arch, dtype, precision)]
    return results, [problem for row in compiled for problem in compiled_problems(row)]


def self_check(device, arch, dtype, precision, shape):
    """check_kernels in a child process, where a compiler abort or a sticky CUDA fault cannot take
    this one down: None if every variant passes, else what went wrong, in one line."""
    spec = json.dumps(dict(device=device, arch=arch, dtype=dtype, precision=precision, shape=list(shape)))
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--self_check", spec],
                           capture_output=True, text=True, timeout=900)
        if r.returncode == 0:
            results, problems = json.loads(r.stdout.strip().splitlines()[-1])  # its verdict: its last line
    except subprocess.TimeoutExpired:
        return "its process ran past 900 s"
    except (OSError, ValueError, IndexError) as e:  # it could not start, or printed no verdict
        return f"its process gave no verdict ({type(e).__name__}: {e})"
    if r.returncode:
        said = r.stderr.strip().splitlines()[-1:]  # a Python error's last line says what it was
        how = "failed" if r.returncode > 0 else f"died of signal {-r.returncode}"
        return f"its process {how}" + "".join(f": {line}" for line in said)
    failed = [f"{what}: relative error {error:.1e}, over {tol:.0e}" for what, error, tol in results if not error <= tol]
    return "; ".join(failed + problems) or None


# -----------------------------------------------------------------------------
# The cross-compile report.

SHARED_LIMIT = {"75": 65_536, "80": 166_912, "86": 101_376, "89": 101_376, "90": 232_448, "100": 232_448,
                "120": 101_376, "gfx942": 65_536}  # per block, opt-in: T4, A100, RTX 30, L4/RTX 40, H100, B200, RTX 50, MI300
# Each kernel's pointer arguments: "op" is the matmul operand dtype; the integers are i32.
POINTERS = {
    "encode_kernel": dict(x_ptr="op", w_ptr="op", f_ptr="op", b_ptr="*fp32", l1w_ptr="*fp32", l1_ptr="*fp32",
                        fires_ptr="*i32"),
    "pre_grad_kernel": dict(dxh_ptr="op", wdec_ptr="op", f_ptr="op", dpre_ptr="op", dl1_ptr="*fp32", l1w_ptr="*fp32"),
    "bag_sum_kernel": dict(idx_ptr="*i64", w_ptr="*fp32", starts_ptr="*i64", table_ptr="op", out_ptr="*fp32"),
    "gathered_dot_kernel": dict(ia_ptr="*i64", a_ptr="op", ib_ptr="*i64", b_ptr="op", out_ptr="*fp32"),
}
UNALIGNED = ("N",)  # the number of kept entries: BatchTopK's varies, so no divisibility is assumed
TENSOR_CORES = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync"), ("mfma", "v_mfma"))


def compile_for(target, name, dtype, constexprs, warps, stages, ir=False):
    """Compile one variant for a GPUTarget: its registers, stack and spill stores (by cuobjdump, on
    NVIDIA; off the AMD assembly's metadata), shared memory and tensor cores, and with ir, its
    Triton IR. Pointers and integers (but UNALIGNED) are taken as divisible by 16, as the JIT
    takes them at the shapes we train (d 768, m 24,576, batches of 4,096)."""
    from triton.compiler import ASTSource
    kernel = getattr(kernels, name)
    pointers = {arg: ("*" + dtype if kind == "op" else kind) for arg, kind in POINTERS[name].items()}
    signature = {p.name: "constexpr" if p.is_constexpr else pointers.get(p.name, "i32") for p in kernel.params}
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
               if not p.is_constexpr and p.name not in UNALIGNED}
    compiled = kernels.triton.compile(ASTSource(kernel, signature, constexprs, aligned), target=target,
                                      options=dict(num_warps=warps, num_stages=stages))
    asm = compiled.asm.get("ptx") or compiled.asm["amdgcn"]
    if target.backend == "cuda":
        cuobjdump = os.path.join(os.path.dirname(kernels.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            dump = lambda flag: subprocess.run([cuobjdump, flag, f.name], capture_output=True, text=True,  # noqa: E731
                                               check=True).stdout
            usage, sass = dump("-res-usage"), dump("-sass")
        fields = dict(item.split(":") for item in next(s for s in usage.splitlines() if "REG:" in s).split())
        reg, stack, shared = int(fields["REG"]), int(fields["STACK"]), int(fields["SHARED"])  # REG:168 STACK:0 ...
        spills = len(re.findall(r"\bSTL", sass))  # stores to local memory: a stack frame alone is harmless
    else:  # the AMD assembly's metadata: .vgpr_count, .vgpr_spill_count, .private_segment_fixed_size
        meta = lambda key: int(re.search(rf"\.{key}:\s+(\d+)", asm).group(1))  # noqa: E731
        reg, stack, shared, spills = meta("vgpr_count"), meta("private_segment_fixed_size"), 0, meta("vgpr_spill_count")
    row = dict(reg=reg, stack=stack, spills=spills, shared=shared + compiled.metadata.shared,
               tensor_cores=next((kind for kind, mark in TENSOR_CORES if mark in asm), "none"))
    return dict(row, ttir=compiled.asm["ttir"]) if ir else row


def cross_compile(argv=None):
    """`python kernels.py`: the table (or --json) of every variant compiled for every --arch."""
    from concurrent.futures import ProcessPoolExecutor
    from triton.backends.compiler import GPUTarget
    p = argparse.ArgumentParser(prog="kernels.py", description="Compile every kernel variant for GPUs, and say what each takes.")
    p.add_argument("--arch", default=",".join(SHARED_LIMIT), help="NVIDIA compute capabilities and AMD gfx targets")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--ir", action="store_true", help="with --json: each variant's Triton IR too (for the tests)")
    args = p.parse_args(argv)
    if unknown := [t for t in args.arch.split(",") if t not in SHARED_LIMIT]:
        sys.exit(f"error: --arch {unknown[0]}: expected some of {','.join(SHARED_LIMIT)}")
    cases = [(t, *case) for t in args.arch.split(",") for case in variants(SHARED_LIMIT[t])]
    targets = [GPUTarget("hip", t, 64) if t.startswith("gfx") else GPUTarget("cuda", int(t), 32) for t, *_ in cases]
    with ProcessPoolExecutor(args.jobs) as pool:
        compiled = list(pool.map(compile_for, targets, *zip(*[case[2:] for case in cases]), [args.ir] * len(cases)))
    rows = [dict(target=t, variant=label, limit=SHARED_LIMIT[t], **r) for (t, label, *_), r in zip(cases, compiled)]
    if args.json:
        return print(json.dumps(rows))
    print(f"{'target':>6}  {'variant':<48} {'REG':>4} {'STACK':>5} {'SPILLS':>6} {'SHARED':>7} {'LIMIT':>7}  tensor cores")
    for r in rows:
        problems = "".join(f"  {problem.split(' ', 3)[-1]}" for problem in compiled_problems(r))  # without the label
        print(f"{r['target']:>6}  {r['variant']:<48} {r['reg']:>4} {r['stack']:>5} {r['spills']:>6} {r['shared']:>7} "
              f"{r['limit']:>7}  {r['tensor_cores']}{problems}")


# -----------------------------------------------------------------------------
# The GPU script: `python gpu_check.py OUTDIR` on a lent GPU, `--dry` on CPU in the tests. Each part
# runs in a child process with a time limit, so that an exception, a compiler abort, a poisoned CUDA
# context or a hang costs that part's remaining numbers only; the child prints each row (a dict) as
# a JSON line once measured, and the parent keeps it and rewrites OUTDIR/results.json after each part.

SHAPES, DRY_SHAPES = [(4096, 768, 24576), (1000, 770, 3001)], [(33, 20, 65)]  # B, d, m: training's, odd ones
TINY_GPT2 = dict(block_size=16, n_layer=3, n_head=1, n_embd=48)  # --dry's GPT-2


def seconds(fn, device, reps):
    """Median wall time of fn() over reps calls, after warm-up calls (on a GPU two: the first
    compiles and autotunes); on a GPU the queued work is waited for before the clock is read."""
    cuda, times = device.startswith("cuda"), []
    for _ in range((2 if cuda else 1) + reps):
        torch.cuda.synchronize() if cuda else None
        tick = time.perf_counter()
        fn()
        torch.cuda.synchronize() if cuda else None
        times.append(time.perf_counter() - tick)
    return statistics.median(times[-reps:])


def attempt(what, measure):
    """A row: what, and measure()'s numbers, or the error that stopped them."""
    try:
        return {"what": what, **measure()}
    except Exception as e:  # a sticky CUDA fault fails the cases after it too, each saying so
        return {"verdict": "ERROR", "what": what, "error": f"{type(e).__name__}: {e}".splitlines()[0]}


def part_kernels(device, dry, out):
    """The self-check's verdicts at the training shape (each in a process of its own, so first),
    then each kernel against float64 in every dtype and precision that trains (check_kernels)."""
    shape = (DRY_SHAPES if dry else SHAPES)[0]
    for arch in ("relu", "topk"):
        tick, problem = time.time(), self_check(device, arch, "bf16", "ieee", shape)
        yield {"verdict": "FAIL" if problem else "PASS", "what": f"self_check {arch} bf16 at {'x'.join(map(str, shape))}",
               "seconds": time.time() - tick, **({"problem": problem} if problem else {})}
    for shape in DRY_SHAPES if dry else SHAPES:
        at = "x".join(map(str, shape))
        for arch, dtype, precision in (("relu", "bf16", "ieee"), ("relu", "fp32", "tf32"), ("relu", "fp32", "ieee"),
                                       ("topk", "fp32", "ieee")):
            case = attempt(f"check_kernels {arch} {dtype}/{precision} at {at}",  # its rows, as one value
                           lambda: {"checked": check_kernels(device, arch, dtype, precision, *shape)})
            results, problems = case.pop("checked", ([], []))
            yield from [case] if "error" in case else []
            yield from ({"verdict": "PASS" if error <= tol else "FAIL", "what": f"{what} at {at}",
                         "relative error": error, "tolerance": tol} for what, error, tol in results)
            yield from ({"verdict": "FAIL", "what": problem} for problem in problems)  # spills, no tensor cores


def part_encoder(device, dry, out):
    """The fused encoder (last) against cuBLAS: a bare GEMM of its shape (no epilogue), and eager
    torch doing the kernel's whole work; TFLOP/s count the GEMM's FLOPs, against a measured peak."""
    (B, d, m), n, reps = (DRY_SHAPES[0], 256, 1) if dry else (SHAPES[0], 8192, 20)
    bf16, flop = torch.bfloat16, 2 * B * d * m  # the GEMM's
    a = torch.randn(n, n, device=device, dtype=bf16)
    peak = 2 * n ** 3 / seconds(lambda: a @ a, device, reps)  # measured, not the datasheet's
    yield {"what": f"bf16 matmul peak, {n} x {n} x {n}", "TFLOP/s": peak / 1e12}
    x_in, W = torch.randn(B, d, device=device, dtype=bf16), (torch.randn(d, m, device=device) / d ** 0.5).to(bf16)
    b, l1w = 0.1 * torch.randn(m, device=device), torch.rand(m, device=device)

    def eager():  # what encode_kernel does in its epilogue: bias, ReLU, L1 row sums, firing counts
        f = torch.relu(torch.addmm(b.to(bf16), x_in, W))                         # [B, m]
        return f, f.float() @ l1w, torch.count_nonzero(f, dim=0)
    rate = lambda s: {"ms": 1e3 * s, "TFLOP/s": flop / s / 1e12, "% of peak": 100 * flop / s / peak}  # noqa: E731
    for what, fn in (("bare x_in @ W", lambda: x_in @ W), ("eager torch, the kernel's work", eager),
                     ("kernels.encode, fused", lambda: kernels.encode(x_in, W, b, l1w))):
        yield attempt(f"encoder bf16 {B}x{d}x{m}: {what}", lambda: rate(seconds(fn, device, reps)))


def part_step(device, dry, out):
    """One train_sae.train_step (forward, backward, Adam, decoder constraint) in bf16; Triton last."""
    import train_sae  # the parts import what they measure, so that --self_check's child stays light
    (B, d), k = ((8, 48), 4) if dry else ((4096, 768), 32)

    def measure(arch, impl, m):
        args = train_sae.parse_args(["--arch", arch, "--kernels", impl, "--precision", "bf16", "--device", device,
                                     "--batch", str(B), "--d_sae", str(m), "--k", str(k)])
        sae = train_sae.SAE(d, m, arch=arch, k=k).to(device)  # seeded
        trainee = train_sae.Trainee(9, sae, train_sae.adam(sae, args.lr), device)
        x, autocast, steps = torch.randn(B, d, device=device), train_sae.make_autocast(args), iter(range(10 ** 9))
        s = seconds(lambda: train_sae.train_step(trainee, x, next(steps), args, autocast, False), device, 1 if dry else 5)
        return {"ms": 1e3 * s, "tokens/s": B / s}
    for impl in ("torch", "triton"):
        for m in ((16,) if dry else (24576, 131072)):
            for arch in ("relu", "topk", "batchtopk"):
                yield attempt(f"{arch} step, --kernels {impl}, bf16, B {B} d {d} m {m}", lambda: measure(arch, impl, m))


def part_gpt2(device, dry, out):
    """GPT-2's forward to layer 9 as training runs it (random weights: the speed is the same)."""
    import gpt2
    cfg, layer, (batch, ctx) = (gpt2.GPTConfig(**TINY_GPT2), 1, (8, 16)) if dry else (gpt2.GPTConfig(), 9, (512, 128))
    model = gpt2.GPT(cfg).to(device).eval()
    idx = torch.randint(cfg.vocab_size, (batch, ctx), device=device)                # [batch, ctx]
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        def forward():
            with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                model.residuals(idx, [layer])
        yield attempt(f"GPT-2 forward to layer {layer}, {batch} x {ctx} tokens, {name}",
                      lambda: {"tokens/s": idx.numel() / seconds(forward, device, 1 if dry else 5)})


def part_train(device, dry, out):
    """`train_sae.py --layer 9` on a random GPT-2 (OpenAI's layout) and random tokens: its last log
    record's tokens/s. --tokens: a minute at a guessed 1M/s; a slower run is stopped, its log kept."""
    from safetensors.torch import save_file
    import data
    import gpt2
    work, big = os.path.join(out, "train"), os.path.join(out, "train", "big")  # big: deleted at the end
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(big)
    cfg, layer, tokens, deadline = ((gpt2.GPTConfig(**TINY_GPT2), "1", 64 * 20, 60) if dry else
                                    (gpt2.GPTConfig(), "9", 60_000_000, 75))  # 15 s to start: GPT-2, the self-check
    save_file({name: (t.T if name.endswith(gpt2.CONV1D) else t).contiguous()  # Conv1D weights [in, out]; lm_head
               for name, t in gpt2.GPT(cfg).state_dict().items() if name != "lm_head.weight"},  # is wte, tied
              f"{big}/gpt2.safetensors")
    data.write_shard(f"{big}/tokens.bin", torch.randint(cfg.vocab_size, (10 ** 6,)).numpy())  # epochs repeat
    flags = ["--layer", layer, "--weights", f"{big}/gpt2.safetensors", "--data", f"{big}/tokens.bin", "--tokens",
             str(tokens), "--checkpoint_every", str(10 ** 15), "--out", f"{big}/run", "--device", device]
    flags += ["--d_sae", "64", "--batch", "64", "--buffer", "512", "--ctx", "16", "--gpt2_batch", "8",
              "--lr_warmup", "5", "--log_every", "4"] if dry else []
    tick, script = time.time(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_sae.py")
    with open(f"{work}/train_sae.txt", "w") as printed:  # its stdout and stderr
        try:
            done = subprocess.run([sys.executable, "-u", script, *flags], stdout=printed, stderr=printed, timeout=deadline)
            ended = "finished" if done.returncode == 0 else f"exited {done.returncode}"
        except subprocess.TimeoutExpired:
            ended = f"stopped at its {deadline} s deadline"
    if os.path.exists(f"{big}/run/log.jsonl"):
        shutil.copy(f"{big}/run/log.jsonl", work)
    shutil.rmtree(big)  # GPT-2 (500 MB), the tokens, the SAE
    said = [line.strip() for line in open(f"{work}/train_sae.txt") if line.strip()]
    if not os.path.exists(f"{work}/log.jsonl"):
        raise RuntimeError(f"train_sae.py {ended} before its first log record" + "".join(f": {s}" for s in said[-1:]))
    last, warnings = json.loads(open(f"{work}/log.jsonl").readlines()[-1]), [s for s in said if s.startswith("WARNING")]
    yield {"what": f"train_sae.py --layer {layer}, random GPT-2 and tokens, {ended}", "tokens/s": last["tokens_per_s"],
           "steps": last["step"], "seconds": time.time() - tick, **({"warning": warnings[0]} if warnings else {})}


PARTS = {"kernels": (part_kernels, 170), "encoder": (part_encoder, 20), "step": (part_step, 60), "gpt2": (part_gpt2, 15),
         "train": (part_train, 90)}  # name: (its rows, the seconds it is allowed: 355 in all)


def show(row):
    """A row in one line: its verdict, what it is, then its numbers and notes."""
    number = lambda v: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"  # noqa: E731
    rest = "".join(f" | {k} {number(v)}" if isinstance(v, (int, float)) else f" | {k}: {v}" for k, v in row.items()
                   if k not in ("verdict", "what"))
    return f"  {row.get('verdict', ''):5} {row['what']}{rest}"


def run_child(name, out, dry, say):
    """One part in a process group of its own, its rows printed as they come; at the time limit
    the group is killed (the part's own children too: train_sae.py, the self-check). Its record."""
    limit, path, rows, tick = PARTS[name][1], os.path.join(out, f"{name}.stderr.txt"), [], time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONUNBUFFERED": "1"}
    with open(path, "w") as stderr:
        child = subprocess.Popen([sys.executable, "-u", os.path.abspath(__file__), "--part", name, out] + ["--dry"] * dry,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
                                 env=env | ({"TRITON_INTERPRET": "1"} if dry else {}))  # the interpreter for the GPU
        timer = threading.Timer(limit, os.killpg, [child.pid, signal.SIGKILL])
        timer.start()
        for line in child.stdout:
            try:
                row = json.loads(line)
                say(show(row))
                rows.append(row)
            except Exception:  # not a row (something else printed), or a row cut short by the kill
                say("  " + line.rstrip())
        code, taken = child.wait(), time.time() - tick
        timer.cancel()
    status = "ok" if code == 0 else "timed out" if taken >= limit else "failed"  # exit -N: killed by signal N
    said = ([line.strip() for line in open(path) if line.strip()] or [""])[-1]  # a Python error's last line
    if code:
        say(f"  {name} {status}, exit {code}{': ' + said if said else ''} (its stderr: {path})")
    return dict(status=status, seconds=taken, exit=code, said=said, rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check.py", description="Every GPU check and benchmark, in parts.")
    p.add_argument("out", metavar="OUTDIR", help="where log.txt, results.json and each part's stderr go")
    p.add_argument("--dry", action="store_true", help="rehearse on CPU: tiny shapes, Triton's interpreter for the GPU")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="those to run (all; to rerun some)")
    args = p.parse_args(argv)
    import data  # here and in part_train: the self-check's child imports this file, and stays light
    if not args.dry and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here: run on a GPU, or pass --dry to rehearse on CPU")
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "log.txt"), "w", buffering=1)  # line-buffered: written as printed

    def say(line=""):
        print(line, flush=True)
        print(line, file=log)
    header = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": os.uname().nodename,
              "gpu": "none: a dry run on CPU" if args.dry else torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": getattr(kernels.triton, "__version__", "not installed"),
              "cuda": torch.version.cuda, "python": sys.version.split()[0], "command": " ".join(sys.argv)}
    results, bad = {"header": header, "parts": {}}, []
    say("\n".join(f"{key}: {value}" for key, value in header.items()))
    for name in args.parts:
        say(f"\n== {name} (at most {PARTS[name][1]} s)")
        results["parts"][name] = run_child(name, args.out, args.dry, say)
        data.write_atomically(os.path.join(args.out, "results.json"), json.dumps(results, indent=1))
    say(f"\n{'part':<12} {'status':<10} {'seconds':>7} {'rows':>5} {'FAIL':>5} {'ERROR':>5}")
    for name, r in results["parts"].items():
        verdicts = [row.get("verdict") for row in r["rows"]]
        say(f"{name:<12} {r['status']:<10} {r['seconds']:>7.1f} {len(r['rows']):>5} {verdicts.count('FAIL'):>5} "
            f"{verdicts.count('ERROR'):>5}")
        bad += [name] if r["status"] != "ok" or {"FAIL", "ERROR"} & set(verdicts) else []
    say(f"\n{'trouble in ' + ', '.join(bad) if bad else 'every part ran, every check passed'}; all of it in {args.out}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--self_check"]:  # self_check's child: its verdict is its last line
        spec = json.loads(sys.argv[2])
        print(json.dumps(check_kernels(spec["device"], spec["arch"], spec["dtype"], spec["precision"], *spec["shape"])))
    elif sys.argv[1:2] == ["--part"]:  # a part's child (run_child's): each row a JSON line, once measured
        name, out, dry, errors = sys.argv[2], sys.argv[3], sys.argv[4:] == ["--dry"], []
        for row in PARTS[name][0]("cpu" if dry else "cuda", dry, out):
            print(json.dumps(row), flush=True)
            errors += [f"{row['what']}: {row['error']}"] if "error" in row else []
        if errors:  # exit 1, the last line on stderr naming the first
            sys.exit(f"{len(errors)} case(s) failed; the first: {errors[0]}")
    else:
        main()
