"""
Train sparse autoencoders on GPT-2 small's residual stream.

    python train_sae.py --layer 9

The trainer itself is not written yet (issue 3). Until it lands, this checks its inputs —
the layers, the token source, the weights — and prints what it would do.
"""

import argparse
import sys

import gpt2

p = argparse.ArgumentParser(description="Train SAEs on GPT-2 small's residual stream (plan only, for now).")
p.add_argument("--layer", default="9", help="'9', '3,7,9' or 'all': blocks.L.hook_resid_pre, one SAE each")
p.add_argument("--data", default="fineweb", help="'fineweb', or token files (.txt, .bin, .npy), comma-separated")
p.add_argument("--weights", default=None, help="local GPT-2 model.safetensors (default: download OpenAI's)")
p.add_argument("--ctx", type=int, default=128, help="context length, BOS included")
p.add_argument("--cache_dir", default=None, help=f"downloads go here (default {gpt2.default_cache_dir()})")


def main(args):
    layers = gpt2.parse_layers(args.layer)
    data = args.data if args.data == "fineweb" else args.data.split(",")
    shards = gpt2.corpus(data, "train", args.ctx, args.cache_dir)
    if data != "fineweb":  # local files are cheap to check now; FineWeb is fetched as training reaches it
        gpt2.Contexts(shards, args.ctx, seed=0).next(1)
    hooks = ", ".join(f"blocks.{L}.hook_resid_pre" for L in layers)
    print(f"would train {len(layers)} SAE(s) on {hooks}, from one GPT-2 forward stopped at block {max(layers)}, "
          f"on {'FineWeb-10B' if data == 'fineweb' else ', '.join(data)} in contexts of {args.ctx} tokens. "
          f"The trainer is not written yet.")


if __name__ == "__main__":
    try:
        main(p.parse_args())
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
