"""
Plumbing: how the command lines start and stop, and everything a training run does besides
training; train_sae.py's loop calls into it, and nothing here knows what an SAE's loss is. In
order: the flags train_sae.py, eval.py and gpt2.py share, and the one line each ends with;
several processes (torchrun); the run folder and --resume; checkpoints, which a kill at any
moment leaves whole; signals, which stop a run after the current step; the log and the ETA.
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
    if args.weights is not None and not getattr(args, "activations", None):  # unused with --activations
        data.check_weights_path(args.weights)


def note_unused(args, parser, flags, why):
    """One line naming the flags among `flags` given a value other than their default, which
    do nothing `why`."""
    given = [f"--{flag}" for flag in flags if getattr(args, flag) != parser.get_default(flag)]
    if given:
        print(f"note: {', '.join(given)} {'is' if len(given) == 1 else 'are'} not used {why}", file=sys.stderr)


def command_line(main, interrupted):
    """Run a script's main: bad input (a ValueError, OSError or FloatingPointError, whose message
    is one line) prints `error: ...` (naming the rank under torchrun) and exits 1; Ctrl-C or
    SIGTERM prints `interrupted (SIGINT); ` + interrupted() and exits 128 + the signal's number."""
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
# Several processes (torchrun). Every rank holds the buffer a single process would (see
# gpt2.ResidualSource) and shuffles it alike. With --parallel layers each rank trains its own
# layers' SAEs on whole batches; with --parallel data every rank trains every SAE on its slice of
# each batch, averaging gradients, firing counts and the ghost-grad scale, so that the copies
# stay identical. Either way the SAEs equal a single process's.

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
        # Not sys.exit: tearing down a process group whose peer is gone can abort (SIGABRT) in gloo's
        # destructors, turning this clean exit 1 into a crash now and then. The checkpoint is on disk.
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
    if WORLD == 1:
        return bool(flag)  # and no device sync
    return all_sum(torch.tensor([float(bool(flag))], device=device)).item() > 0


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
# The run folder: run.json records the settings; an existing run is never overwritten without
# --force, and --resume continues one with its own settings.

def check_run_folder(args):
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


def settings_for_resume(args, parser, argv=None):
    """The settings of the run in args.resume, with only RESUME_MAY_CHANGE taken from argv."""
    path = os.path.join(args.resume, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no run to resume in {args.resume} (expected {path})")
    if not os.path.isfile(os.path.join(args.resume, "checkpoint.json")):
        raise ValueError(f"{args.resume} has no checkpoint to resume from (finished, or stopped before the first)")
    saved = argparse.Namespace(**data.read_json(path))
    saved.model_name = getattr(saved, "model_name", "gpt2")  # runs from before it was recorded were gpt2's
    missing = sorted(set(vars(args)) - set(vars(saved)))
    if missing:
        raise ValueError(f"{path} has no setting for --{', --'.join(missing)}: the run was started by an older "
                         f"train_sae.py; resume it with that version")
    given, defaults = vars(parser.parse_args(argv)), vars(parser.parse_args([]))
    for flag in given:
        if flag != "resume" and given[flag] != defaults[flag] and flag not in RESUME_MAY_CHANGE:
            raise ValueError(f"--{flag} with --resume: a run continues with the settings in {path}; expected "
                             f"only --{', --'.join(RESUME_MAY_CHANGE)} (for inputs that moved, or another machine)")
    saved.resume, saved.out, saved.device, saved.kernels = args.resume, args.resume, args.device, args.kernels
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
    """Each writing rank's file: its SAEs' weights, Adam moments and feature counters, the kept
    half-buffer and the served rows not yet trained on (none but when a signal stops the run), the
    shuffle generator; the step and data position as metadata. Rank 0 then commits them by naming
    the step in checkpoint.json, and only then deletes older files: a kill leaves one whole."""
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
        data.write_atomically(os.path.join(run, "checkpoint.json"),
                              json.dumps({"step": step, "ranks": WORLD, "parallel": args.parallel}))
        size = 0
        for name in os.listdir(run):
            if name.startswith("ckpt-") and not name.startswith(f"ckpt-{step:09d}-"):
                os.remove(os.path.join(run, name))
            elif name.startswith("ckpt-"):
                size += os.path.getsize(os.path.join(run, name))
        print(f"checkpoint: step {step:,}, {size / 1e6:,.1f} MB in {run} ({time.time() - tick:.1f} s)", file=sys.stderr)


def load_checkpoint(run, trainees, gen, source, args):
    """Restore what save_checkpoint wrote; return the kept half-buffer, the served rows (None in
    older checkpoints) and the step."""
    saved = data.read_json(os.path.join(run, "checkpoint.json"))
    if (saved["ranks"], saved["parallel"]) != (WORLD, args.parallel):
        raise ValueError(f"{run} was checkpointed by {saved['ranks']} rank(s) in --parallel {saved['parallel']}, "
                         f"expected {WORLD} in --parallel {args.parallel}: resume it as it ran")
    path = os.path.join(run, f"ckpt-{saved['step']:09d}-rank{RANK if args.parallel == 'layers' else 0}.safetensors")
    try:
        with data.open_safetensors(path) as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    except (ValueError, OSError) as e:  # damaged after it was written (writes are atomic): by a copy, a disk
        earlier = sorted(n for n in os.listdir(run) if n.startswith("ckpt-") and n < os.path.basename(path))
        raise ValueError(f"{e}; the run cannot resume from it: " + (
            f"an earlier checkpoint is {os.path.join(run, earlier[-1])} (set its step in checkpoint.json)" if earlier
            else "no earlier checkpoint is kept; start again with --force")) from None
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
    served = tensors["served"].to(args.device) if "served" in tensors else None
    step, log = int(meta["step"]), os.path.join(run, "log.jsonl")
    if RANK == 0 and os.path.exists(log):  # drop the log lines of the steps that will run again
        with open(log) as f:
            data.write_atomically(log, "".join(line for line in f if json.loads(line)["step"] <= step))
    if RANK == 0:
        if getattr(args, "inputs_changed", None):
            data.write_atomically(os.path.join(run, "run.json"), json.dumps(recorded(args), indent=2))
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
    with open(path) as f:
        step = json.load(f)["step"]
    return f"the checkpoint of step {step:,} is kept: continue with --resume {run}"


def check_finite(trainees, step, device, run):
    """Stop before a NaN or Inf could be saved, keeping the last good checkpoint if there is one."""
    bad = [t.layer for t in trainees if not all(torch.isfinite(p).all() for p in t.sae.parameters())]
    if any_rank(bad, device):
        raise FloatingPointError(f"weights are not finite at step {step:,} (layer {bad or 'of another rank'}); "
                                 f"stopped. Lower --lr or raise --lr_warmup; {last_checkpoint_note(run)}")

# -----------------------------------------------------------------------------
# Signals. While the loop runs, the first SIGINT or SIGTERM asks it to stop after the current
# step, with a checkpoint, or at once while GPT-2 refills the buffer (a minute or more on CPU);
# a second quits at once. (Before the loop, command_line handles them.)

class Interrupted(Exception):
    """A signal arrived while GPT-2 refilled the buffer: stop now, from the state before the refill."""


class Stop(list):
    """The signals received, by number. While at_once is set (in fill, in one process), the first
    one raises Interrupted instead of waiting for the step to end."""
    at_once = False


@contextlib.contextmanager
def stop_on_signal(run):
    """Yields a Stop. Python runs a handler only between two torch operations, and two signals
    that arrive during one operation become one call; the bytes that the wakeup fd receives, one
    per signal, tell them apart."""
    stop, (r, w) = Stop(), os.pipe()
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
            print(f"\nstopping {'now' if stop.at_once else 'after this step'}, with a checkpoint (signal again to quit "
                  f"at once, without one)", file=sys.stderr, flush=True)
        if stop.at_once:
            raise Interrupted
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(w)
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(wakeup)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)


def exit_stopped(stop, step, run):  # after the checkpoint a signal asked for
    signum = stop[0] if stop else signal.SIGTERM  # another rank's signal
    if RANK == 0:
        print(f"stopped by signal {signum} at step {step:,}; checkpoint saved. "
              f"Continue with: python train_sae.py --resume {run}", file=sys.stderr)
    sys.exit(128 + signum)

# -----------------------------------------------------------------------------
# The log: the first half-buffer's fill, the expected time, progress lines and log.jsonl.

OVER_A_DAY = ("that is more than a day: for a first run, try fewer --tokens (e.g. 10_000_000) or a smaller --d_sae "
              "(e.g. 4096), or a GPU (--device cuda)")


def fill(source, n, label, quiet=0.0, stop=None):
    """source.next(n), with a progress line on rank 0 (none if it is done within `quiet` seconds).
    With `stop`, a signal meanwhile raises Interrupted at once (in one process; ranks stop together)."""
    with data.Progress(label, n, "tokens", quiet, on=RANK == 0) as shown:
        if stop is not None:
            stop.at_once = WORLD == 1
        try:
            return source.next(n, lambda rows: setattr(shown, "done", rows))
        finally:
            if stop is not None:
                stop.at_once = False


def first_half(source, args):
    """The first half of the mixing buffer, with a progress line; its rate bounds the run's length
    from below, so a run that would take over a day says so at once."""
    half, t0 = args.buffer // 2, time.time()
    kept = fill(source, half, "filling the first half of the buffer")     # [half, layers, d]
    gpt2_s = args.tokens * (time.time() - t0) / half
    if RANK == 0 and gpt2_s > 86400:
        print(f"at that rate the activations alone take {data.duration(gpt2_s)} for --tokens {args.tokens:,}; "
              f"{OVER_A_DAY}", file=sys.stderr)
    return kept


def expected_time(steps_left, step_s, refill_s_per_step):
    """One line: how long the rest of the run will take, and what to change if that is over a day."""
    seconds = steps_left * (step_s + refill_s_per_step)
    line = (f"expected time for the remaining {steps_left:,} steps: {data.duration(seconds)} "
            f"({step_s:.3g} s a step, and {refill_s_per_step:.3g} s a step filling the buffer)")
    return line + (f"\n{OVER_A_DAY}" if seconds > 86400 else "")


LOG_SECONDS = 10  # in one process, a step that follows this long without a line logs too (slow CPU steps)
REFILL_QUIET = 5  # a refill's progress line shows once it has taken this long (on a GPU it never does)


class Log:
    """What the loop reports: after the first refill and three steps, the expected time; every
    --log_every steps, a line per SAE on stdout and the same records in log.jsonl (rank 0)."""

    def __init__(self, args, total, step):
        self.args, self.total, self.step0, self.t0 = args, total, step, time.time()
        self.last_line = self.t0
        self.file = open(os.path.join(args.out, "log.jsonl"), "a") if RANK == 0 else None
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
        for layer, r in mine:
            r = {"step": step, "tokens": step * args.batch, "layer": layer, "tokens_per_s": round(tokens_per_s), **r}
            self.file.write(json.dumps(r) + "\n")
            print(f"step {step:>7,}/{self.total:,} | {step * args.batch / 1e6:7.1f}M tok | {tokens_per_s / 1e3:6.1f}k tok/s"
                  f" | eta {data.duration(eta):>9} | layer {layer:<2} | "
                  + " ".join(f"{k} {r[k]:.4g}" for k in ("mse", "l1", "ghost", "auxk") if k in r) +
                  f" | L0 {r['l0']:6.1f} | ev {r['explained_variance']:.3f} | dead {r['dead_pct']:5.1f}% | lr {r['lr']:.2e}")
        self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
