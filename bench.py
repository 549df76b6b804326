"""
Benchmarks; each section prints a table. Timings live here, never in the tests.

    python bench.py                                   # every section this machine can run
    python bench.py --compile                         # also torch.compile'd GPT-2 (CUDA)
    python bench.py --saelens_python ENV/bin/python   # also SAELens's training step, for comparison
    python bench.py --sections realacts --saelens_python ENV/bin/python --saelens_l1 5,10 --ours_l1 4,8

Sections:
- gpt2: the GPT-2 forward to layer 9 at context 128, tokens/s. On CUDA: fp32 and bf16 autocast,
  eager and compiled. On CPU: against transformers' GPT2 on the same input (needs
  `transformers`, a test-only package).
- step: one SAE training step (forward, backward, Adam, decoder constraint) at d 768, m 24,576.
  On CPU, fp32, batch 1,024, against SAELens's StandardTrainingSAE step on identical
  activations (SAELens lives in a separate environment, never beside this project). On CUDA
  (instead), batch 4,096: the fused encoder against eager torch and a bare torch.mm; the whole
  relu step with the Triton kernels and with torch, bf16 / tf32 / fp32, against the five-GEMM
  floor; the topk and batchtopk steps (k 32) with the sparse kernels and with torch.
- train: end-to-end `train_sae.py` tokens/s for --layer 9 and --layer all (CUDA).
- precision: the metrics of short bf16 runs beside fp32 ones, two seeds each, on a known sparse
  dictionary (full width on CUDA; small on CPU, where autocast runs the same code).
- ranks: the communication per step of torchrun training, from the arithmetic; and where there
  are several GPUs, end-to-end tokens/s of --layer all and --layer 9 against the number of ranks.
- realacts (only when named): SAE quality on real activations (../shared/realacts): trains our
  ReLU recipe at --ours_l1 (or TopK at --ours_k) and SAELens's StandardTrainingSAE at --saelens_l1 on the same data
  and budget, scores both on eval.npy (L0, pooled explained variance, dead features) and
  compares the two frontiers at equal L0. Minutes per SAE on a CPU.
Weights are random: speed does not depend on their values, and nothing is downloaded.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

import data
import gpt2
import runs
import train_sae

SECTIONS = ("gpt2", "step", "train", "precision", "ranks", "realacts")  # described in the docstring above
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=runs.HelpFormatter)
p.add_argument("--layer", type=int, default=9, help="residual to stop at (blocks.L.hook_resid_pre)")
p.add_argument("--ctx", type=int, default=128, help="context length")
p.add_argument("--gpu_batch", type=int, default=512, help="contexts per forward on CUDA")
p.add_argument("--cpu_batch", type=int, default=8, help="contexts per forward on CPU")
p.add_argument("--reps", type=int, default=20, help="timed repetitions; the median is reported")
p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
p.add_argument("--sections", default="gpt2,step,train,precision,ranks",
               help=f"which sections to run, comma-separated, of {', '.join(SECTIONS)} (realacts only when named)")
p.add_argument("--saelens_python", default=None, help="python of an environment with sae-lens, for the step comparison")
p.add_argument("--realacts", default="~/.cache/realacts", help="folder of train.npy and eval.npy (../shared/realacts)")
p.add_argument("--realacts_runs", default="runs/realacts", help="where the realacts section keeps the SAEs it trains")
p.add_argument("--recipes", default="topk,batchtopk", help="realacts: which recipes, of relu, topk, batchtopk, matryoshka, jumprelu, jumprelu-tanh")
p.add_argument("--families", default="ours,saelens",
               help="realacts: whose trainers, of ours, saelens (our tuning) and saelens-defaults (its lr 3e-4, no warm-ups)")
p.add_argument("--lrs", default="0.0004,0.001,0.002,0.004", help="realacts: the lr grid every family is tuned over")
p.add_argument("--ours_values", default="16,32,64,128", help="realacts: our sparsity settings (k, target L0 or L1)")
p.add_argument("--saelens_values", default="16,32,64,128",
               help="realacts: SAELens's sparsity settings (k, l0_coefficient or l1_coefficient)")
p.add_argument("--tune_at", default="32", help="realacts: the sparsity setting at which each family's best lr is "
               "chosen; OURS,SAELENS when they differ (a target L0 and a coefficient)")
p.add_argument("--jobs", type=int, default=1, help="realacts: training runs at once")
p.add_argument("--threads", type=int, default=0, help="realacts: CPU threads per training run (0: torch's default)")
p.add_argument("--step_reps", type=int, default=5, help="timed repetitions of a CPU training step")
args = p.parse_args()
for name in args.sections.split(","):
    if name not in SECTIONS:
        sys.exit(f"error: --sections {name!r}: expected a comma-separated list of {', '.join(SECTIONS)}")
D, M = 768, 24576  # GPT-2 small's width; Bloom's SAE width
TOPK = 32  # the k of TopK steps


def flops_per_token(cfg, n_blocks, ctx):
    """Matmul FLOPs per token through n_blocks blocks: 24·d² for the weights (qkv 3d², out d²,
    MLP 8d², two FLOPs each), plus 4·T·d for attention scores and mixing (unmasked count)."""
    return n_blocks * (24 * cfg.n_embd ** 2 + 4 * ctx * cfg.n_embd)


def median_seconds(fn, reps, cuda):
    """Median wall time of fn() after two warm-up calls; with CUDA events on a GPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def cuda_forward():
    dev = "cuda"
    cfg = gpt2.GPTConfig()
    model = gpt2.GPT(cfg).to(dev).eval()
    idx = torch.randint(0, cfg.vocab_size, (args.gpu_batch, args.ctx), device=dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / median_seconds(lambda: a @ a, 10, True)  # measured, not the datasheet's
    fpt = flops_per_token(cfg, args.layer, args.ctx)
    variants = [("fp32", False, False), ("bf16 autocast", True, False)]
    if args.compile:
        variants.append(("bf16 autocast + compile", True, True))
    rows = []
    for name, bf16, compiled in variants:
        run = torch.compile(model.residuals) if compiled else model.residuals

        @torch.no_grad()
        def step():
            with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                run(idx, [args.layer])
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        s = median_seconds(step, args.reps, True)
        tps = idx.numel() / s
        rows.append([name, f"{s * 1e3:.2f}", f"{tps / 1e6:.2f}M", f"{tps * fpt / 1e12:.0f}", f"{100 * tps * fpt / peak:.0f}%"])
    table(f"GPT-2 forward to blocks.{args.layer}.hook_resid_pre, {args.gpu_batch}x{args.ctx} tokens, "
          f"{torch.cuda.get_device_name()} (bf16 matmul peak measured: {peak / 1e12:.0f} TFLOP/s, "
          f"{fpt / 1e6:.0f} MFLOP/token)",
          ["variant", "ms", "tokens/s", "TFLOP/s", "% of peak"], rows)


def cpu_against_transformers():
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("\n(transformers is not installed: skipping the CPU comparison; pip install -r requirements-test.txt)")
        return
    cfg = gpt2.GPTConfig()
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.config.use_cache = False
    with tempfile.TemporaryDirectory() as folder:  # the same weights in both, through our loader
        hf.save_pretrained(folder)
        ours = gpt2.from_pretrained(f"{folder}/model.safetensors")
    idx = torch.randint(0, cfg.vocab_size, (args.cpu_batch, args.ctx))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max() < 1e-3  # the same function, so a fair race
        cases = [
            ("logits (all 12 blocks + unembedding)", lambda: ours(idx), lambda: hf(idx)),
            # transformers has no early stop: hidden state 9 costs it the whole model.
            (f"residual at layer {args.layer}", lambda: ours.residuals(idx, [args.layer]),
             lambda: hf(idx, output_hidden_states=True).hidden_states[args.layer]),
        ]
        rows = []
        for name, mine, theirs in cases:
            t_ours, t_hf = median_seconds(mine, args.reps, False), median_seconds(theirs, args.reps, False)
            rows.append([name, f"{idx.numel() / t_ours:,.0f}", f"{idx.numel() / t_hf:,.0f}", f"{t_hf / t_ours:.2f}x"])
    table(f"CPU, {torch.get_num_threads()} threads, fp32, {args.cpu_batch}x{args.ctx} tokens: gpt2.py against "
          f"transformers {__import__('transformers').__version__}",
          ["output", "ours tokens/s", "transformers tokens/s", "speed-up"], rows)


def ours_step_seconds(device, batch, reps, loss="seed", precision="fp32", clip=0.0, kernels="torch", arch="relu",
                      dead=0, hot=0):
    """Median time of one train_sae.train_step on fixed activations (torch.manual_seed(0)). The first
    `dead` features never fire (AuxK trains them every step); the last `hot` fire on every token."""
    targs = train_sae.parse_args(["--batch", str(batch), "--loss", loss, "--clip_grad", str(clip), "--arch", arch,
                                    "--k", str(TOPK), "--precision", precision, "--device", device, "--kernels", kernels])
    torch.manual_seed(0)
    x = torch.randn(batch, D).to(device)
    sae = train_sae.SAE(D, M, arch=arch, k=TOPK).to(device)
    if arch == "jumprelu":  # its θ as training starts it: each feature fires on TOPK/M of the tokens
        sae.log_threshold = torch.nn.Parameter(torch.zeros(M, device=device))
        train_sae.init_from_data(sae, x)
    with torch.no_grad():  # 50: past every pre-activation (x, W_dec share seed 0: feature b < batch is ~28 on token b)
        sae.b_enc[:dead] -= 50
        sae.b_enc[M - hot:] += 50
    t = train_sae.Trainee(9, sae, train_sae.adam(sae, 4e-4), device)
    t.since_fired[:dead] = train_sae.dead_after(targs)
    autocast = train_sae.make_autocast(targs)
    step = iter(range(10 ** 9))
    return median_seconds(lambda: train_sae.train_step(t, x, next(step), targs, autocast, False), reps,
                          device == "cuda")


SAELENS_STEP = """
import statistics, sys, time, torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE
from sae_lens import MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig, LoggingConfig
B, D, M, reps = {batch}, {d}, {m}, {reps}
torch.manual_seed(0)
x = torch.randn(B, D)  # the same activations as ours: same seed, same torch
sae = {sae}
cfg = SAETrainerConfig(total_training_samples=10 ** 9, train_batch_size_samples=B, lr=4e-4, lr_end=4e-4,
                       device="cpu", logger=LoggingConfig(log_to_wandb=False), checkpoint_path="/tmp/saelens_ckpt",
                       save_final_checkpoint=False)
trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter([x]))
for _ in range(2):
    trainer.step(x)
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    trainer.step(x)
    times.append(time.perf_counter() - t0)
print(statistics.median(times))
"""


def cpu_step():
    batch = 1024
    rows = []
    theirs = topk_theirs = None
    same_kind = {}  # SAELens's trainers of matryoshka's and jumprelu's kind
    if args.saelens_python:
        import subprocess
        def saelens_seconds(sae):
            code = SAELENS_STEP.format(batch=batch, d=D, m=M, reps=args.step_reps, sae=sae)
            # From a folder of its own: transformers looks for Hugging Face's `kernels` package
            # and would find our kernels.py on the path.
            with tempfile.TemporaryDirectory() as elsewhere:
                r = subprocess.run([args.saelens_python, "-c", code], capture_output=True, text=True, cwd=elsewhere)
            if r.returncode:
                print(f"\n(SAELens step failed: {r.stderr.strip().splitlines()[-1]})")
                return None
            return float(r.stdout.strip().splitlines()[-1])
        theirs = saelens_seconds('StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D, d_sae=M, l1_coefficient=5.0, '
                                 'dtype="float32", device="cpu"))')
        # SAELens's TopK, dense (its default) and with its sparse activations, which its docs
        # recommend for fp32 with k much smaller than d_sae; we compare with the faster.
        topk = [saelens_seconds(f'TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k={TOPK}, '
                                f'use_sparse_activations={sparse}, dtype="float32", device="cpu"))')
                for sparse in (False, True)]
        if theirs:
            rows.append(["SAELens StandardTrainingSAE (MSE sum, L1 x ||W_dec||, clip 1.0)", f"{theirs:.3f}", "1.00x", "-"])
        for sparse, s in zip(("", ", use_sparse_activations"), topk):
            if s:
                rows.append([f"SAELens TopKTrainingSAE, k {TOPK}{sparse}", f"{s:.3f}", f"{s / theirs:.2f}x" if theirs else "-", "-"])
        topk_theirs = min(filter(None, topk), default=None)
        widths = sorted({M >> i for i in range(6)})  # our default prefixes
        same_kind = {"matryoshka": saelens_seconds(f'MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig('
                                                   f'd_in=D, d_sae=M, k={TOPK}, matryoshka_widths={widths}, '
                                                   f'dtype="float32", device="cpu"))'),
                     "jumprelu": saelens_seconds('JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=M, '
                                                 'dtype="float32", device="cpu"))')}
        for arch, s in same_kind.items():
            if s:
                rows.append([f"SAELens's {arch} trainer", f"{s:.3f}", f"{s / theirs:.2f}x" if theirs else "-", "-"])
    ours_relu = None
    for name, loss, clip, arch, dead in [("ours, --loss saelens --clip_grad 1 (the same math)", "saelens", 1.0, "relu", 0),
                                         ("ours, the seed's recipe: its loss, unit-norm decoder, no clip", "seed", 0.0, "relu", 0),
                                         (f"ours, --arch topk --k {TOPK}", "seed", 1.0, "topk", 0),
                                         (f"ours, --arch topk --k {TOPK}, 25% of features dead (AuxK, k_aux 512)", "seed",
                                          1.0, "topk", M // 4),
                                         (f"ours, --arch batchtopk --k {TOPK}", "seed", 1.0, "batchtopk", 0),
                                         (f"ours, --arch matryoshka --k {TOPK} (6 prefixes)", "seed", 1.0, "matryoshka", 0),
                                         (f"ours, --arch jumprelu, L0 {TOPK} at the start", "seed", 1.0, "jumprelu", 0)]:
        s = ours_step_seconds("cpu", batch, args.step_reps, loss, "fp32", clip, arch=arch, dead=dead)
        ours_relu = s if loss == "seed" and arch == "relu" else ours_relu
        kind = same_kind.get(arch, topk_theirs)  # SAELens's trainer of the same kind: TopK for topk and batchtopk
        vs_topk = f"{s / kind:.2f}x, {s / ours_relu:.2f}x of our relu" if arch != "relu" and kind else "-"
        rows.append([name, f"{s:.3f}", f"{s / theirs:.2f}x" if theirs else "-", vs_topk])
    gflop = 5 * 2 * batch * D * M / 1e9
    table(f"SAE training step on CPU ({torch.get_num_threads()} threads), fp32, batch {batch}, d {D}, m {M:,} "
          f"({gflop:.0f} GFLOP in five GEMMs for relu, SAELens does six; TopK: one, and sparse work)",
          ["step", "seconds", "time vs SAELens standard", "time vs SAELens's same kind (TopK's for batchtopk)"], rows)


def bf16_peak():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / median_seconds(lambda: a @ a, 10, True)  # measured, not the datasheet's


def cuda_encoder():
    """The fused encoder (GEMM (1) and its epilogue) against the same work in eager torch, and
    against a bare GEMM of the same shape, which does none of the epilogue."""
    import kernels
    batch, bf16 = 4096, torch.bfloat16
    x_in = torch.randn(batch, D, device="cuda", dtype=bf16)
    W = (torch.randn(D, M, device="cuda") / D ** 0.5).to(bf16)
    b = 0.1 * torch.randn(M, device="cuda")
    l1w = torch.ones(M, device="cuda")
    dead = torch.arange(0, M, 50, device="cuda")  # 2% dead

    def eager():
        pre = torch.addmm(b.to(bf16), x_in, W)
        f = torch.relu(pre)
        return f, f.float() @ l1w, torch.count_nonzero(f, dim=0), pre[:, dead].float()

    def fused():  # the kernel, and the dead features' columns beside it, as FusedSAE does them
        return kernels.encode(x_in, W, b, l1w), torch.addmm(b[dead].to(bf16), x_in, W[:, dead]).float()

    f_ref, l1_ref, fires_ref, pd_ref = eager()
    (f, l1, fires), pd = fused()
    assert torch.equal(fires, fires_ref.int()) or (fires - fires_ref).abs().max() <= 2  # bf16 ties at 0
    assert (f.float() - f_ref.float()).norm() < 1e-2 * f_ref.float().norm()
    assert (l1 - l1_ref).norm() < 1e-2 * l1_ref.norm() and (pd - pd_ref).norm() < 1e-2 * pd_ref.norm()
    peak, flop = bf16_peak(), 2 * batch * D * M
    rows = []
    for name, fn in [("bare torch.mm (no epilogue)", lambda: x_in @ W), ("eager torch", eager),
                     ("fused Triton", fused)]:
        s = median_seconds(fn, args.reps, True)
        rows.append([name, f"{s * 1e3:.3f}", f"{flop / s / 1e12:.0f}", f"{100 * flop / s / peak:.0f}%"])
    table(f"Encoder forward, bf16, {batch} x {D} x {M:,}, 2% of features dead, {torch.cuda.get_device_name()} "
          f"(bf16 peak measured: {peak / 1e12:.0f} TFLOP/s)", ["encoder", "ms", "TFLOP/s", "% of peak"], rows)


def cuda_step():
    batch = 4096
    floor_flop = 5 * 2 * batch * D * M
    peak = bf16_peak()
    rows = []
    for kernels, precision in (("triton", "bf16"), ("torch", "bf16"), ("triton", "tf32"), ("torch", "fp32")):
        s = ours_step_seconds("cuda", batch, args.reps, "seed", precision, kernels=kernels)
        rows.append(["relu", kernels, precision, f"{s * 1e3:.2f}", f"{floor_flop / s / 1e12:.0f}",
                     f"{100 * floor_flop / s / peak:.0f}%"])
    # TopK: one dense GEMM, (1), and sparse work; its floor is that GEMM alone.
    # Then with a quarter of the features dead (AuxK over them), and with one feature on every
    # token (a bag of 4,096 entries by feature, which bag_sum cuts into pieces).
    for arch, kernels, dead, hot in (("topk", "triton", 0, 0), ("topk", "torch", 0, 0), ("batchtopk", "triton", 0, 0),
                                     ("topk", "triton", M // 4, 0), ("topk", "torch", M // 4, 0),
                                     ("topk", "triton", 0, 1), ("batchtopk", "triton", 0, 1)):
        s = ours_step_seconds("cuda", batch, args.reps, precision="bf16", kernels=kernels, arch=arch, dead=dead, hot=hot)
        what = ", 25% dead (AuxK, k_aux 512)" if dead else ", 1 feature on every token" if hot else ""
        rows.append([f"{arch} k {TOPK}{what}", kernels, "bf16", f"{s * 1e3:.2f}", f"{floor_flop / 5 / s / 1e12:.0f}",
                     f"{100 * floor_flop / 5 / s / peak:.0f}%"])
    table(f"SAE training step on {torch.cuda.get_device_name()}, batch {batch}, d {D}, m {M:,}: relu "
          f"{floor_flop / 1e9:.0f} GFLOP, floor {floor_flop / peak * 1e3:.2f} ms at the measured bf16 peak "
          f"{peak / 1e12:.0f} TFLOP/s; TopK's GEMM a fifth of that",
          ["SAE", "kernels", "precision", "ms", "TFLOP/s", "% of peak"], rows)


def cuda_train():
    """End-to-end runs of train_sae.py on random GPT-2 weights and random tokens."""
    import json
    import numpy as np
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = gpt2.GPT(gpt2.GPTConfig())
        save_published(model, f"{tmp}/gpt2.safetensors")
        data.write_shard(f"{tmp}/tokens.bin", np.random.default_rng(0).integers(0, 50257, 20_000_000).astype(np.uint16))
        common = ["--weights", f"{tmp}/gpt2.safetensors", "--data", f"{tmp}/tokens.bin", "--log_every", "50",
                  "--checkpoint_every", str(10 ** 12), "--lr_warmup", "100"]
        peak = bf16_peak()
        for layer, tokens, deepest, saes in (("9", 4096 * 400, 9, 1), ("all", 4096 * 150, 11, 12)):
            out = f"{tmp}/run_{layer}"
            train_sae.main(common + ["--layer", layer, "--tokens", str(tokens), "--out", out])
            tps = [json.loads(line) for line in open(f"{out}/log.jsonl")][-1]["tokens_per_s"]
            flop = flops_per_token(gpt2.GPTConfig(), deepest, 128) + saes * 5 * 2 * D * M  # per token
            rows.append([f"--layer {layer}", f"{tps / 1e6:.2f}M", f"{tps * flop / 1e12:.0f}",
                         f"{100 * tps * flop / peak:.0f}%", f"{300e6 / tps / 60:.1f} min"])
        table("train_sae.py end to end (bf16, batch 4,096, 24,576 features, GPT-2 forward included; "
              f"tokens/s over the whole run, refills included; bf16 peak measured: {peak / 1e12:.0f} TFLOP/s)",
              ["run", "tokens/s", "TFLOP/s", "% of peak", "300M tokens"], rows)


def precision_runs():
    """Short runs in bf16 and in fp32 on a known sparse dictionary (atoms on a shared offset, as
    residuals have), two seeds each: bf16 should differ from fp32 by no more than one seed
    differs from another. Full width on CUDA, small on CPU (where autocast runs the same code)."""
    import json
    import numpy as np
    cuda = torch.cuda.is_available()
    d, atoms, m, steps = (768, 4096, 24576, 2000) if cuda else (64, 128, 256, 1500)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(atoms, d, generator=g)
    A /= A.norm(dim=1, keepdim=True)
    active = torch.rand(200_000, atoms, generator=g) < 4 / atoms
    x = ((1 + torch.rand(200_000, atoms, generator=g)) * active) @ A + torch.randn(d, generator=g) * 5 / d ** 0.5
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/acts.npy", x.numpy())
        for precision in ("fp32", "bf16"):
            for seed in (0, 1):
                out = f"{tmp}/{precision}{seed}"
                train_sae.main(["--activations", f"{tmp}/acts.npy", "--d_sae", str(m), "--batch", "1024",
                                "--tokens", str(1024 * steps), "--buffer", "65536", "--lr", "1e-3", "--l1", "1e-3",
                                "--lr_warmup", "100", "--no-center", "--precision", precision, "--seed", str(seed),
                                "--out", out, "--log_every", "100", "--device", "cuda" if cuda else "cpu"])
                last = [json.loads(line) for line in open(f"{out}/log.jsonl")][-10:]  # the last 1,000 steps
                mean = lambda k: sum(r[k] for r in last) / len(last)
                rows.append([precision, seed, f"{mean('mse'):.6f}", f"{mean('l0'):.2f}", f"{mean('explained_variance'):.4f}"])
    table(f"bf16 against fp32: {steps} steps of batch 1,024 (short of convergence; compare the rows in pairs), "
          f"d {d}, {m:,} features, {atoms:,} true atoms; means over the last 1,000 steps "
          f"({'CUDA' if cuda else 'CPU autocast'})",
          ["precision", "seed", "mse", "L0", "explained variance"], rows)


def save_published(model, path):
    """Our GPT-2's weights in OpenAI's layout (Conv1D weights [in, out]), for --weights."""
    from safetensors.torch import save_file
    sd = {k: (v.t() if k.endswith(gpt2.CONV1D) else v).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    save_file(sd, path)


def communication():
    """Bytes each rank receives per optimizer step, at Bloom's settings (batch 4,096, buffer
    524,288, fp32 residuals and gradients), with ring collectives."""
    half, steps_per_refill = 262144, 262144 // 4096
    rows = []
    for layers in (12, 1):
        for ranks in (2, 4, 8):
            gather = (ranks - 1) / ranks * half * layers * D * 4 / steps_per_refill  # the fresh residuals, all-gathered
            if layers >= ranks:
                mode, grads = "layers", 0.0
            else:  # every SAE's gradient all-reduced: 2 (R-1)/R of its size through each rank
                mode, grads = "data", 2 * (ranks - 1) / ranks * layers * (2 * D * M + M + D) * 4
            rows.append([f"--layer {'all' if layers == 12 else 9}", ranks, mode, f"{gather / 1e6:.0f}",
                         f"{grads / 1e6:.0f}", f"{(gather + grads) / 1e6:.0f}"])
    table("Communication per step under torchrun (MB received per rank; arithmetic, not measured)",
          ["run", "ranks", "--parallel", "residuals", "gradients", "total"], rows)


def cuda_ranks():
    """End-to-end tokens/s against the number of ranks, through torchrun."""
    import json
    import subprocess
    import numpy as np
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_published(gpt2.GPT(gpt2.GPTConfig()), f"{tmp}/gpt2.safetensors")
        data.write_shard(f"{tmp}/tokens.bin", np.random.default_rng(0).integers(0, 50257, 40_000_000).astype(np.uint16))
        for layer, tokens in (("all", 4096 * 150), ("9", 4096 * 400)):
            for ranks in sorted({1, 2, 4, torch.cuda.device_count()}):
                if ranks > torch.cuda.device_count():
                    continue
                out = f"{tmp}/run_{layer}_{ranks}"
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                                "train_sae.py", "--weights", f"{tmp}/gpt2.safetensors", "--data", f"{tmp}/tokens.bin",
                                "--layer", layer, "--tokens", str(tokens), "--out", out, "--log_every", "50",
                                "--lr_warmup", "100", "--checkpoint_every", str(10 ** 12)], check=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.DEVNULL)
                last = [json.loads(line) for line in open(f"{out}/log.jsonl")][-1]
                rows.append([f"--layer {layer}", ranks, f"{last['tokens_per_s'] / 1e6:.2f}M"])
    table(f"torchrun on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}: tokens/s by ranks",
          ["run", "ranks", "tokens/s"], rows)


# -----------------------------------------------------------------------------
# Quality on real activations (../shared/realacts): for each recipe, our trainer and SAELens's
# trainer of the same kind, each over the same lr grid, the same budget and the same warm-ups,
# scored alike on eval.npy. Every trained SAE lands in --realacts_runs with its score and is
# reused by later calls, so a sweep can be run a few points at a time.

STEPS, BATCH, D_SAE, LR_WARMUP = 488, 4096, 6144, 200  # the benchmark's budget: four passes over train.npy
TUNE = {"lr_warm_up_steps": LR_WARMUP, "dead_feature_window": STEPS // 10}  # what SAELens gets beside ours
WIDTHS = [D_SAE >> i for i in range(5, -1, -1)]  # our default matryoshka prefixes
# recipe: (our train_sae.py flags, SAELens's trainer, its settings beside TUNE, the sparsity setting
# each takes). Our warm-ups (lr; L1 or λ; the dead window) are given to SAELens too.
RECIPES = {
    "relu": ("--loss saelens --l1_warmup 488", "Standard", {"l1_warm_up_steps": STEPS}, ("l1", "l1_coefficient")),
    "topk": ("--arch topk", "TopK", {}, ("k", "k")),
    "batchtopk": ("--arch batchtopk", "BatchTopK", {}, ("k", "k")),
    "matryoshka": ("--arch matryoshka", "MatryoshkaBatchTopK", {"matryoshka_widths": WIDTHS}, ("k", "k")),
    "jumprelu": ("--arch jumprelu", "JumpReLU", {"l0_warm_up_steps": STEPS // 10}, ("target_l0", "l0_coefficient")),
    "jumprelu-tanh": ("--arch jumprelu --sparsity tanh --preact_coef 3e-6", "JumpReLU",
                      {"l0_warm_up_steps": STEPS // 10, "jumprelu_sparsity_loss_mode": "tanh",
                       "pre_act_loss_coefficient": 3e-6}, ("target_l0", "l0_coefficient")),
}

SAELENS_TRAIN = """
import json, os, shutil, numpy as np, torch, sae_lens
from sae_lens.config import SAETrainerConfig, LoggingConfig
train, out, trainer, settings, tune = {train!r}, {out!r}, {trainer!r}, {settings!r}, {tune!r}
d_sae, batch, steps, lr = {d_sae}, {batch}, {steps}, {lr}
torch.manual_seed(0)
x = torch.from_numpy(np.load(train))                        # [N, d]
sae = getattr(sae_lens, trainer + "TrainingSAE")(getattr(sae_lens, trainer + "TrainingSAEConfig")(
    d_in=x.shape[1], d_sae=d_sae, dtype="float32", device="cpu", **settings))
cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr,
                       device="cpu", logger=LoggingConfig(log_to_wandb=False), **tune)
t = sae_lens.SAETrainer(cfg=cfg, sae=sae, data_provider=iter([]))

def batches():  # shuffled passes over the file
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            yield x[perm[i:i + batch]]

# What SAETrainer.fit() does with normalize_activations "none" and no wandb, plus a progress line.
for step, xb in zip(range(steps), batches()):
    t.maybe_reset_sparsity()
    result = t.step(xb)
    t.n_training_steps += 1
    if (step + 1) % 50 == 0:
        print(f"step {{step + 1}}, L0 {{(result.feature_acts > 0).sum(1).float().mean():.1f}}", flush=True)
sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = "blocks.5.hook_resid_pre", "all-MiniLM-L6-v2"
shutil.rmtree(out + ".tmp", ignore_errors=True)
sae.save_inference_model(out + ".tmp")
os.replace(out + ".tmp", out)
"""


@torch.no_grad()
def realacts_score(sae, x):
    """L0, pooled explained variance and the fraction of features that never fire, of an SAE
    on eval activations x [N, d]."""
    sq_err, fires, l0 = 0.0, torch.zeros(sae.b_enc.shape[0]), 0.0
    for xb in x.split(4096):
        _, f, x_hat = sae(xb)                                                    # [b, m], [b, d]
        sq_err += (x_hat - xb).double().pow(2).sum().item()
        fires += (f > 0).sum(0)
        l0 += (f > 0).sum().item()
    total = (x.double() - x.double().mean(0)).pow(2).sum().item()
    return l0 / len(x), 1 - sq_err / total, (fires == 0).float().mean().item()


def interpolate_ev(points, l0):
    """(EV, dead) at l0 on the frontier of points [(L0, EV, dead)], linear in log L0, or at a
    point within 3% of l0; None outside it. The frontier keeps the points that no other beats on
    both L0 and EV (a λ so large that features die can give a higher L0 than a smaller λ, at a
    lower EV)."""
    import math
    pts = sorted(p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points))
    near = [p for p in pts if abs(p[0] / l0 - 1) <= 0.03]
    if near:
        return max(near, key=lambda p: p[1])[1:]
    for (a, ea, da), (b, eb, db) in zip(pts, pts[1:]):
        if a <= l0 <= b:
            t = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
            return ea + t * (eb - ea), da + t * (db - da)
    return None


def realacts_run(family, recipe, lr, value, train, x):
    """Trains one SAE of the benchmark if it is not there yet, and returns its (L0, EV, dead)
    on x, kept in the run folder's score.json."""
    import json
    import subprocess
    ours_flags, trainer, settings, (our_knob, their_knob) = RECIPES[recipe]
    run = os.path.join(args.realacts_runs, f"{family}-{recipe}-lr{lr}-{value}")
    folder, score = os.path.join(run, "blocks.5.hook_resid_pre"), os.path.join(run, "score.json")
    if os.path.isfile(score):
        return data.read_json(score)["score"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    here = os.path.dirname(os.path.abspath(__file__))
    if family == "ours":
        again = ["--resume", run] if os.path.isfile(os.path.join(run, "checkpoint.json")) else [
            "--force", "--activations", train, "--no-center", "--layer", "5", "--d_sae", str(D_SAE), "--batch",
            str(BATCH), "--tokens", str(STEPS * BATCH), "--lr", lr, "--lr_warmup", str(LR_WARMUP), "--device", "cpu",
            f"--{our_knob}", value, "--log_every", "50", "--out", run, *ours_flags.split()]
        command, cwd = [sys.executable, os.path.join(here, "train_sae.py"), *again], here
    else:  # SAELens with our tuning, or at its defaults (lr 3e-4, no warm-ups, a dead window of 1,000 steps)
        tune = TUNE if family == "saelens" else {}
        code = SAELENS_TRAIN.format(train=train, out=os.path.abspath(folder), trainer=trainer,
                                    settings={**(settings if tune else {k: v for k, v in settings.items()
                                                                        if "warm_up" not in k}),
                                              their_knob: float(value) if their_knob != "k" else int(value)},
                                    tune=tune, d_sae=D_SAE, batch=BATCH, steps=STEPS, lr=float(lr))
        os.makedirs(run, exist_ok=True)
        command, cwd = [args.saelens_python, "-c", code], run  # away from our kernels.py (see cpu_step)
    t0 = time.time()
    if family == "ours" or not os.path.isdir(folder):  # SAELens's folder appears whole (a rename), or not at all
        print(f"training {run} ...", flush=True)
        with open(run + ".log", "w") as log:
            if subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                sys.exit(f"error: training {run} failed: see {run}.log")
    import eval as evaluation
    result = realacts_score(evaluation.load_sae(folder, x.shape[1])[0], x)
    data.write_atomically(score, json.dumps({"score": result, "minutes": (time.time() - t0) / 60}))
    print(f"{run}: L0 {result[0]:.1f}, pooled EV {result[1]:.4f}, dead {result[2]:.2%} "
          f"({(time.time() - t0) / 60:.1f} min)", flush=True)
    return result


def realacts():
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    for recipe in args.recipes.split(","):
        if recipe not in RECIPES:
            sys.exit(f"error: --recipes {recipe!r}: expected a comma-separated list of {', '.join(RECIPES)}")
    families = args.families.split(",")
    for family in families:
        if family not in ("ours", "saelens", "saelens-defaults"):
            sys.exit(f"error: --families {family!r}: expected a comma-separated list of ours, saelens, saelens-defaults")
    if any(f.startswith("saelens") for f in families) and not args.saelens_python:
        sys.exit("error: the SAELens families need --saelens_python ENV/bin/python (a scratch environment with sae-lens)")
    acts = os.path.expanduser(args.realacts)
    train, evals = os.path.join(acts, "train.npy"), os.path.join(acts, "eval.npy")
    if not os.path.isfile(evals):
        sys.exit(f"error: {evals} not found: build it with bash ../shared/realacts/make_acts.sh")
    os.makedirs(args.realacts_runs, exist_ok=True)
    x = torch.from_numpy(np.load(evals))
    jobs = [(family, recipe, lr, value) for recipe in args.recipes.split(",") for family in families
            for lr in (["0.0003"] if family == "saelens-defaults" else args.lrs.split(","))
            for value in getattr(args, family.split("-")[0] + "_values").split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: realacts_run(*job, train, x), jobs))
    summary = {}
    for recipe in args.recipes.split(","):
        rows = []
        for family in families:  # every scored run of the family's, those of earlier calls too
            name, folder = f"{family}-{recipe}-lr", args.realacts_runs
            scored = [run for run in sorted(os.listdir(folder))
                      if run.startswith(name) and os.path.isfile(os.path.join(folder, run, "score.json"))]
            done = {tuple(run[len(name):].split("-")): data.read_json(os.path.join(folder, run, "score.json"))["score"]
                    for run in scored}  # (lr, sparsity setting): (L0, EV, dead)
            # The best lr is the one with the highest pooled EV at the --tune_at setting (k 32, say).
            tune_at = args.tune_at.split(",")[0 if family == "ours" else -1]
            at = {lr: s[1] for (lr, value), s in done.items() if value == tune_at}
            best = max(at, key=at.get, default=None)
            frontier = [s for (lr, value), s in done.items() if lr == best]
            summary[family, recipe] = [interpolate_ev(frontier, l0) for l0 in (16, 32, 64, 128)]
            rows += [[family, lr + (" (best)" if lr == best and len(at) > 1 else ""), value, f"{l0:.1f}", f"{ev:.4f}",
                      f"{dead:.2%}"] for (lr, value), (l0, ev, dead) in sorted(done.items(), key=lambda d: d[1][0])]
        table(f"{recipe} on {acts}: {STEPS} steps of {BATCH}, d_sae {D_SAE}, scored on eval.npy ({len(x):,} tokens)",
              ["family", "lr", "sparsity", "L0", "pooled EV", "dead"], rows)
    table("Best pooled EV (dead) at equal L0, at each family's best lr (each frontier linear in log L0)",
          ["recipe", "family", *[f"L0 {l0}" for l0 in (16, 32, 64, 128)]],
          [[recipe, family, *[f"{p[0]:.4f} ({p[1]:.2%})" if p else "-" for p in points]]
           for (family, recipe), points in summary.items()])


sections = args.sections.split(",")
if "gpt2" in sections:
    if torch.cuda.is_available():
        cuda_forward()
    cpu_against_transformers()
if "step" in sections:
    if torch.cuda.is_available():  # a GPU machine's CPU step is of no interest, and costs its time
        cuda_encoder()
        cuda_step()
    else:
        cpu_step()
if "train" in sections and torch.cuda.is_available():
    cuda_train()
if "precision" in sections:
    precision_runs()
if "realacts" in sections:
    realacts()
if "ranks" in sections:
    communication()
    if torch.cuda.device_count() > 1:
        cuda_ranks()
