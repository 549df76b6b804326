"""
Plumbing: how the command lines start and stop, and all a training run does besides training (nothing
here knows an SAE's loss): shared flags and one-line errors; torchrun; run folder, --resume; checkpoints;
signals; the log and ETA.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import data

# -----------------------------------------------------------------------------
# The command lines' shared flags, and how every script ends.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None and "": such flags say what they do without one."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def add_input_flags(p):  # where the tokens, weights and downloads are; where and on what GPT-2 runs
    p.add_argument("--data", default="fineweb", help="'fineweb', or token files (.txt, .bin, .npy), comma-separated")
    p.add_argument("--weights", default=None, help="local GPT-2 model.safetensors (default: download OpenAI's)")
    p.add_argument("--cache_dir", default=None, help=f"downloads and tokenized text (default: {data.default_cache_dir()})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--ctx", type=int, default=128, help="context length, BOS included")


def check_inputs(args, *positive):
    """The shared flags' values, and the flags named in `positive`, checked before any slow work."""
    for flag in positive:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    if not 2 <= args.ctx <= 1024:
        raise ValueError(f"--ctx {args.ctx}: expected 2..1024 (BOS and at least one token; GPT-2's longest context)")
    kind, colon, index = args.device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit())):
        raise ValueError(f"--device {args.device}: expected cpu, cuda, cuda:N or mps")
    if not {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]:
        raise ValueError(f"--device {args.device}: {kind.upper()} is not available here; use --device cpu")
    if kind == "cuda" and int(index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if getattr(args, "activations", None):  # rows, not GPT-2 over a corpus: said, not refused
        if args.weights or args.data != "fineweb":
            print("note: --data and --weights are not used with --activations", file=sys.stderr)
    elif args.weights is not None:
        data.check_weights_path(args.weights)


def command_line(main, interrupted):
    """Run a script's main: bad input (ValueError, OSError, FloatingPointError: one line) prints `error: ...`
    and exits 1; Ctrl-C or SIGTERM prints `interrupted (SIGINT); ` + interrupted() and exits 128 + its number."""
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(signum)
    signal.signal(signal.SIGTERM, on_sigterm)
    rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"error: {rank}{e}")
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"\ninterrupted ({signal.Signals(signum).name}); {interrupted()}", file=sys.stderr)
        sys.exit(128 + signum)

# -----------------------------------------------------------------------------
# Several processes (torchrun). Every rank holds the buffer one process would and shuffles it
# alike; each trains its own layers' SAEs (--parallel layers) or a slice of every batch (data,
# averaging gradients and counts). Either way the SAEs equal one process's (docs/design.md).

RANK, WORLD = 0, 1


@contextlib.contextmanager
def processes(args):
    """Join torchrun's process group when there is one, and leave it at the end. A rank whose
    collective fails because another rank died or timed out stops with one line and exit 1."""
    global RANK, WORLD
    WORLD = int(os.environ.get("WORLD_SIZE", 1))
    if WORLD > 1:
        RANK = int(os.environ["RANK"])
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=args.dist_timeout))
    try:
        yield
    except RuntimeError as e:
        if WORLD == 1 or not any(s in str(e) for s in ("Connection closed", "Connection reset", "Broken pipe",
                                                       "NCCL", "Timed out", "timed out", "Socket")):
            raise
        print(f"error: rank {RANK} lost the other ranks ({str(e).splitlines()[0][:200]}); one of them failed or "
              f"was killed: see its output. Resume from the last checkpoint with --resume", file=sys.stderr, flush=True)
        # Not sys.exit: gloo's destructors can abort (SIGABRT) when a peer is gone. The checkpoint is on disk.
        sys.stdout.flush()
        os._exit(1)
    if WORLD > 1:
        dist.destroy_process_group()


def all_sum(t):
    if WORLD > 1:
        dist.all_reduce(t)
    return t


def all_mean(t):
    return all_sum(t.clone()) / WORLD


def any_rank(flag, device):
    """True on every rank if `flag` is true on any: the ranks must decide to stop together."""
    return bool(flag) if WORLD == 1 else all_sum(torch.tensor([float(bool(flag))], device=device)).item() > 0


def my_share(rows):  # [n, ...] -> this rank's n / WORLD
    return rows.chunk(WORLD)[RANK]


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
# The run folder: run.json records the settings; a run is overwritten only with --force.

def check_run_folder(run, force):
    if os.path.exists(run) and not os.path.isdir(run):
        raise ValueError(f"--out {run}: a file, expected a run folder (new, or one this script wrote)")
    if os.path.exists(os.path.join(run, "run.json")) and not force:
        if os.path.exists(os.path.join(run, "checkpoint.json")):
            raise ValueError(f"{run} holds an unfinished run: continue it with --resume {run}, or pass --force")
        raise ValueError(f"{run} holds a run already: pass --force to overwrite it, or choose --out")


def start_run_folder(args):
    """Clear what an overwritten run left (--force), its SAEs included, and write run.json."""
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
    data.write_atomically(os.path.join(run, "run.json"), json.dumps(recorded(args), indent=2))


def recorded(args):
    """The settings as run.json and cfg.json record them, input paths absolute: --resume works from anywhere."""
    settings = dict(vars(args))
    if args.data != "fineweb":
        settings["data"] = ",".join(os.path.abspath(path) for path in args.data.split(","))
    for flag in ("weights", "activations", "cache_dir"):
        if settings[flag]:
            settings[flag] = os.path.abspath(settings[flag])
    return settings


# What may be given again with --resume: where the run runs, and where its inputs now are.
RESUME_MAY_CHANGE = ("data", "weights", "activations", "cache_dir", "device", "kernels", "dist_timeout")


def settings_for_resume(args, parser, argv=None):
    """The settings of the run in args.resume, with only RESUME_MAY_CHANGE taken from argv."""
    path = os.path.join(args.resume, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run to resume in {args.resume} (expected {path})")
    if not os.path.isfile(os.path.join(args.resume, "checkpoint.json")):
        raise ValueError(f"{args.resume} has no checkpoint to resume from (finished, or stopped before the first)")
    saved = argparse.Namespace(**data.read_json(path))
    missing = sorted(set(vars(args)) - set(vars(saved)))
    if missing:
        raise ValueError(f"{path} has no setting for --{', --'.join(missing)}: the run was started by an older "
                         f"train_sae.py; resume it with that version")
    given, defaults = vars(parser.parse_args(argv)), vars(parser.parse_args([]))
    for flag in given:
        if flag != "resume" and given[flag] != defaults[flag] and flag not in RESUME_MAY_CHANGE:
            raise ValueError(f"--{flag} with --resume: a run continues with the settings in {path}; expected "
                             f"only --{', --'.join(RESUME_MAY_CHANGE)} (for inputs that moved, or another machine)")
    saved.resume = saved.out = args.resume
    for flag in ("device", "kernels", "dist_timeout"):  # where it runs now
        setattr(saved, flag, getattr(args, flag))
    for flag in ("data", "weights", "activations", "cache_dir"):
        if given[flag] != defaults[flag]:
            if flag == "data" and len(given[flag].split(",")) != len(saved.data.split(",")):
                raise ValueError(f"--data {given[flag]}: {len(given[flag].split(','))} file(s), but the run read "
                                 f"{len(saved.data.split(','))}: {saved.data}")
            was = getattr(saved, flag)
            setattr(saved, flag, given[flag])
            if recorded(saved)[flag] != was:  # run.json and the SAEs' cfg.json keep every input the run read
                step = data.read_json(os.path.join(args.resume, "checkpoint.json"))["step"]
                saved.inputs_changed = [*getattr(saved, "inputs_changed", []),
                                        {"flag": flag, "was": was, "now": recorded(saved)[flag], "at_step": step}]
    return saved

# -----------------------------------------------------------------------------
# Checkpoints. Every write goes to a temporary name first.

def save_checkpoint(run, trainees, kept, served, gen, source, step, args):
    """Each writing rank's file: its SAEs' weights, Adam moments and counters, the kept half-buffer,
    the served rows not yet trained on, the shuffle generator; the step and data position as
    metadata. Rank 0 commits them in checkpoint.json, then deletes older files: a kill leaves one."""
    check_finite(trainees, step, args.device, run)
    tick = time.time()
    if args.parallel == "layers" or RANK == 0:  # in data-parallel training the copies are identical
        tensors = {"buffer": kept.cpu(), "served": served.cpu(), "generator": gen.get_state()}
        for t in trainees:  # the weights (and batchtopk's threshold), Adam's step and moments (none before step 1)
            tensors.update({f"{t.layer}.{name}": value.cpu() for name, value in t.sae.state_dict().items()})
            tensors.update({f"{t.layer}.adam.{name}.{k}": v.cpu() for name, param in t.sae.named_parameters()
                            for k, v in t.opt.state[param].items()})
            tensors.update({f"{t.layer}.{k}": getattr(t, k).cpu() for k in ("since_fired", "fires", "density", "scale")})
        meta = {"step": str(step), "source": json.dumps(source.state_dict())}
        path = os.path.join(run, f"ckpt-{step:09d}-rank{RANK}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)
    if WORLD > 1:
        dist.barrier()
    if RANK == 0:
        data.write_atomically(os.path.join(run, "checkpoint.json"),
                              json.dumps({"step": step, "ranks": WORLD, "parallel": args.parallel}))
        for name in os.listdir(run):
            if name.startswith("ckpt-") and not name.startswith(f"ckpt-{step:09d}-"):
                os.remove(os.path.join(run, name))
        size = sum(os.path.getsize(os.path.join(run, name)) for name in os.listdir(run) if name.startswith("ckpt-"))
        print(f"checkpoint: step {step:,}, {size / 1e6:,.1f} MB in {run} ({time.time() - tick:.1f} s)", file=sys.stderr)


def load_checkpoint(run, trainees, gen, source, args):
    """Restore what save_checkpoint wrote; return the kept half-buffer, the served rows and the step."""
    saved = data.read_json(os.path.join(run, "checkpoint.json"))
    if (saved["ranks"], saved["parallel"]) != (WORLD, args.parallel):
        raise ValueError(f"{run} was checkpointed by {saved['ranks']} rank(s) in --parallel {saved['parallel']}, "
                         f"expected {WORLD} in --parallel {args.parallel}: resume it as it ran")
    path = os.path.join(run, f"ckpt-{saved['step']:09d}-rank{RANK if args.parallel == 'layers' else 0}.safetensors")
    try:  # writes are atomic: a damaged file was damaged later (a copy, a disk), and no older one is kept
        with data.open_safetensors(path) as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except (ValueError, OSError) as e:
        raise ValueError(f"{e}; the run cannot resume from it: start again with --force") from None
    for t in trainees:
        t.sae.load_state_dict({name: tensors[f"{t.layer}.{name}"] for name in t.sae.state_dict()})
        state = t.opt.state_dict()  # refill its per-parameter state, numbered in the order of its param groups
        at = {id(p): i for i, p in enumerate(p for group in t.opt.param_groups for p in group["params"])}
        state["state"] = {at[id(p)]: {k: tensors[f"{t.layer}.adam.{name}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
                          for name, p in t.sae.named_parameters() if f"{t.layer}.adam.{name}.step" in tensors}
        t.opt.load_state_dict(state)
        for k in ("since_fired", "fires", "density", "scale"):
            setattr(t, k, tensors[f"{t.layer}.{k}"].to(args.device))
    gen.set_state(tensors["generator"])
    source.load_state_dict(json.loads(meta["source"]))
    served = tensors.get("served", tensors["buffer"][:0]).to(args.device)  # older checkpoints: none
    step, log = int(meta["step"]), os.path.join(run, "log.jsonl")
    if RANK == 0:
        if os.path.exists(log):  # drop the log lines of the steps that will run again
            with open(log) as f:
                data.write_atomically(log, "".join(line for line in f if json.loads(line)["step"] <= step))
        data.write_atomically(os.path.join(run, "run.json"), json.dumps(recorded(args), indent=2))  # inputs moved
        print(f"resumed {run} at step {step:,}", file=sys.stderr)
    return tensors["buffer"].to(args.device), served, step


def finish(args, layers):
    """Once the SAEs are saved the checkpoint is spent: delete it, and say where they are."""
    if WORLD > 1:
        dist.barrier()
    if RANK == 0:
        for name in os.listdir(args.out):
            if name == "checkpoint.json" or name.startswith("ckpt-"):
                os.remove(os.path.join(args.out, name))
        print(f"done: {', '.join(os.path.join(args.out, data.hook_name(L)) for L in layers)}")


def last_checkpoint_note(run):
    """What a stopped run leaves to resume from, said only if it exists."""
    path = os.path.join(run, "checkpoint.json")
    if not os.path.isfile(path):
        return "no checkpoint was written yet: start again"
    return f"the checkpoint of step {data.read_json(path)['step']:,} is kept: continue with --resume {run}"


def check_finite(trainees, step, device, run):
    """Stop before a NaN or Inf could be saved, keeping the last good checkpoint if there is one."""
    bad = [t.layer for t in trainees if not all(torch.isfinite(p).all() for p in t.sae.parameters())]
    if any_rank(bad, device):
        raise FloatingPointError(f"weights are not finite at step {step:,} (layer {bad or 'of another rank'}); "
                                 f"stopped. Lower --lr or raise --lr_warmup; {last_checkpoint_note(run)}")

# -----------------------------------------------------------------------------
# Signals in the loop (before it, command_line's): the first stops the run with a checkpoint.

AT_ONCE = False  # set by fill: a signal raises KeyboardInterrupt at once instead of waiting for the step


@contextlib.contextmanager
def stop_on_signal(run):
    """Yields `stop`, a list that holds the signal's number once one arrives. Two signals within one
    torch operation make one call of the handler: the wakeup fd, written a byte per signal, counts them."""
    stop, (r, w) = [], os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)

    def on_signal(signum, frame):
        try:
            arrived = sum(b in (signal.SIGINT, signal.SIGTERM) for b in os.read(r, 256))
        except BlockingIOError:
            arrived = 1
        if stop or arrived > 1:  # asked twice: quit now. The last checkpoint on disk is whole (see save_checkpoint).
            if RANK == 0:
                print(f"\nsignal {signum} again: quitting without a checkpoint; {last_checkpoint_note(run)}",
                      file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        stop.append(signum)
        if RANK == 0:
            print(f"\nstopping {'now' if AT_ONCE else 'after this step'}, with a checkpoint (signal again to quit "
                  f"at once, without one)", file=sys.stderr, flush=True)
        if AT_ONCE:
            raise KeyboardInterrupt(signum)
    handlers, wakeup = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}, signal.set_wakeup_fd(w)
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(wakeup)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)


def stop_with_checkpoint(stop, trainees, kept, served, gen, source, step, args):
    """What a signal asked for: a checkpoint of this state, a line saying how to continue, exit."""
    save_checkpoint(args.out, trainees, kept, served, gen, source, step, args)
    signum = stop[0] if stop else signal.SIGTERM  # another rank's signal
    if RANK == 0:
        print(f"stopped by signal {signum} at step {step:,}; checkpoint saved. "
              f"Continue with: python train_sae.py --resume {args.out}", file=sys.stderr)
    sys.exit(128 + signum)

# -----------------------------------------------------------------------------
# The log: the first half-buffer's fill, the expected time, progress lines and log.jsonl.

OVER_A_DAY = ("that is more than a day: for a first run, try fewer --tokens (e.g. 10_000_000) or a smaller --d_sae "
              "(e.g. 4096), or a GPU (--device cuda)")


def fill(source, n, label, quiet=0.0, at_once=False):
    """source.next(n), with a progress line on rank 0 after `quiet` s; at_once: a signal stops it (one process)."""
    global AT_ONCE
    with data.progress_line(label, n, "tokens", quiet if RANK == 0 else 1e9) as shown:  # other ranks: never
        AT_ONCE = at_once and WORLD == 1
        try:
            return source.next(n, lambda rows: setattr(shown, "done", rows))
        finally:
            AT_ONCE = False


def expected_time(steps_left, step_s, refill_s_per_step):
    """One line: how long the rest of the run will take, and what to change if that is over a day."""
    seconds = steps_left * (step_s + refill_s_per_step)
    line = (f"expected time for the remaining {steps_left:,} steps: {data.duration(seconds)} "
            f"({step_s:.3g} s a step, and {refill_s_per_step:.3g} s a step filling the buffer)")
    return line + (f"\n{OVER_A_DAY}" if seconds > 86400 else "")


LOG_SECONDS = 10  # in one process, a step that follows this long without a line logs too (slow CPU steps)
REFILL_QUIET = 5  # a refill's progress line shows once it has taken this long (on a GPU it never does)


class Log:
    """What the loop reports (rank 0): after the first refill and three steps, the expected time; every
    --log_every steps or LOG_SECONDS, a line per SAE on stdout and the same records in log.jsonl."""

    def __init__(self, args, total, step):
        self.args, self.total, self.step0, self.t0, self.last_line = args, total, step, time.time(), time.time()
        self.refill_s, self.step_s = None, []  # the first refill's and steps' times

    def refilled(self, tick):
        self.refill_s = self.refill_s or time.time() - tick

    def stepped(self, tick, step):
        if RANK == 0 and self.refill_s is not None and len(self.step_s) < 3:
            if self.args.device.startswith("cuda"):
                torch.cuda.synchronize(self.args.device)  # the steps' queued work is part of their time
            self.step_s.append(time.time() - tick)
            if len(self.step_s) == 3 and step < self.total:  # a refill serves buffer / 2 / batch steps
                refill_s = self.refill_s / (self.args.buffer // 2 // self.args.batch)
                print(expected_time(self.total - step, sum(self.step_s) / 3, refill_s), file=sys.stderr)

    def due(self, step):  # whether step logs: every --log_every steps, the last, and after a long silence
        return ((step + 1) % self.args.log_every == 0 or step + 1 == self.total or
                WORLD == 1 and time.time() - self.last_line > LOG_SECONDS)

    def write(self, trainees, records, step):
        """A NaN or Inf in a record stops the run, on every rank."""
        args = self.args
        mine = [(t.layer, r) for t, r in zip(trainees, records)]
        if WORLD > 1 and args.parallel == "layers":  # every rank's SAEs, on every rank
            everyone = [None] * WORLD
            dist.all_gather_object(everyone, mine)
            mine = sorted(pair for part in everyone for pair in part)
        tokens_per_s = (step - self.step0) * args.batch / (time.time() - self.t0)
        eta = (self.total - step) * args.batch / tokens_per_s
        for layer, r in mine:
            if not all(math.isfinite(v) for v in r.values()):
                raise FloatingPointError(f"layer {layer}: loss is {r['loss']} at step {step:,}; stopped. Lower --lr "
                                         f"or raise --lr_warmup; {last_checkpoint_note(args.out)}")
        if RANK != 0:
            return
        self.last_line = time.time()
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            for layer, r in mine:
                r = {"step": step, "tokens": step * args.batch, "layer": layer, "tokens_per_s": round(tokens_per_s), **r}
                f.write(json.dumps(r) + "\n")
                print(f"step {step:>7,}/{self.total:,} | {step * args.batch / 1e6:7.1f}M tok | {tokens_per_s / 1e3:6.1f}k tok/s"
                      f" | eta {data.duration(eta):>9} | layer {layer:<2} | "
                      + " ".join(f"{k} {r[k]:.4g}" for k in ("mse", "l1", "ghost", "nested", "sparsity", "auxk") if k in r) +
                      f" | L0 {r['l0']:6.1f} | ev {r['explained_variance']:.3f} | dead {r['dead_pct']:5.1f}% | lr {r['lr']:.2e}")
