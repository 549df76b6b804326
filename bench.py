"""
Benchmarks; each section prints a table. Timings live here, never in the tests.

    python bench.py                 # every section that this machine can run
    python bench.py --compile       # also the torch.compile'd GPT-2 forward (CUDA)

GPT-2 forward to layer 9 (blocks.9.hook_resid_pre) at context 128, in tokens per second:
- on CUDA: fp32, and bf16 autocast (flash attention), eager and compiled;
- on CPU: against transformers' GPT2 on the same input (needs `transformers`, a test-only package).
Weights are random: speed does not depend on their values, and nothing is downloaded.
"""

import argparse
import statistics
import tempfile
import time

import torch

import gpt2

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--layer", type=int, default=9, help="residual to stop at (blocks.L.hook_resid_pre)")
p.add_argument("--ctx", type=int, default=128, help="context length")
p.add_argument("--gpu_batch", type=int, default=512, help="contexts per forward on CUDA")
p.add_argument("--cpu_batch", type=int, default=8, help="contexts per forward on CPU")
p.add_argument("--reps", type=int, default=20, help="timed repetitions; the median is reported")
p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA)")
args = p.parse_args()


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


if torch.cuda.is_available():
    cuda_forward()
cpu_against_transformers()
