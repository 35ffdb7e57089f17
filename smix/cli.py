"""The `smix` console script: one dispatcher, a thin CLI per stage.

Stages are found by module name, so `smix` never imports a stage: each stage's `cli.py`
exposes `main(argv) -> int` and owns its own argument parsing. A `UserError` anywhere ends in
one line on stderr and exit code 2; other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Any, NoReturn, Sequence

from smix import cpus
from smix.errors import UserError, one_line

COMMANDS = {
    "pretrain": ("pretrain.cli", "train a backbone with a mixing method"),
    "transfer": ("transfer.cli", "fine-tune Faster R-CNN on Pascal VOC from a checkpoint"),
    "robustness": ("robustness.cli", "FGSM / PGD / corruption evaluation"),
    "cam": ("cam.cli", "class activation maps: export, mixed pairs, localisation"),
    "audit": ("smix.audit", "what mixing methods do to labels and objects (data with boxes)"),
    "report": ("smix.report", "paper-style tables and plots from run folders"),
    "demo": ("smix.demo", "the whole pipeline on generated shapes data"),
    "ckpt": ("smix.ckpt_cli", "inspect or import checkpoints"),
    "data": ("smix.data_cli", "generate the synthetic shapes dataset"),
}


# Commands that share their work over torchrun's processes (rank 0 writes). The others are one
# process's work: under torchrun every process would run all of it into the same output
# (`torchrun -m smix transfer` trained twice, each process writing the same run folder).
TORCHRUN_COMMANDS = ("pretrain", "robustness", "cam")
TORCHRUN_ADVICE = {"transfer": "for several GPUs or machines run it once with --num-gpus N "
                               "(--num-machines, --machine-rank, --dist-url): detectron2's "
                               "launcher starts the processes"}


def torchrun_problem(command: str) -> str | None:
    """Why `command` cannot run in this process group (None: it can)."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    try:
        world = int(raw or 1)
    except ValueError:
        if command not in TORCHRUN_COMMANDS:
            return None  # not torchrun's (it sets a count); these commands never read it
        return (f"WORLD_SIZE={raw!r} is not a number of processes (torchrun sets it); unset "
                "it or start the command with torchrun")
    if world <= 1 or command in TORCHRUN_COMMANDS:
        return None
    advice = TORCHRUN_ADVICE.get(command, "start it without torchrun")
    return (f"does not run under torchrun ({world} processes would each run all of it into the "
            f"same output); {advice}")


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are a `UserError` (one line, exit 2) instead of exit, and
    whose flags must be spelled out: with abbreviations, `cam mixed --method gradcam` (the flag
    of `cam export`) was silently read as `--methods` and failed on a mixer name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(message, prog=self.prog)


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`key=value` pairs from the command line, values kept as strings for the config."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def workers_arg(text: str) -> int:
    """A `--workers` value: a count of loader processes >= 0, or `auto`, this process's share
    of the machine's CPUs less one (`smix.cpus.auto_workers`, as pretraining's `workers=auto`)."""
    if text.strip().lower() == "auto":
        return cpus.auto_workers()
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"wants a count >= 0 or 'auto', got {text!r}")
    return count


_QUIET_RANK_EXIT_S = 3.0


def _clean_message(exc: BaseException) -> str:
    msg = str(exc)
    # A UserError raised in a DataLoader worker is re-raised with the worker traceback attached.
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split("UserError: ", 1)[-1]
    return one_line(msg)


def run(command: str, argv: Sequence[str]) -> int:
    """Run one subcommand; the single place where user errors become exit codes."""
    if command not in COMMANDS:
        print(f"smix: error: unknown command {command!r}; valid: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    problem = torchrun_problem(command)
    if problem:
        print(f"smix {command}: error: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(list(argv)) or 0)
    except UserError as e:
        if getattr(e, "every_rank", False) and os.environ.get("RANK", "0") != "0":
            # rank 0 prints it: once, not once per process. torchrun ends the group when the
            # first process exits, so this one waits for rank 0 to have printed and exited
            time.sleep(_QUIET_RANK_EXIT_S)
            return 2
        prog = getattr(e, "prog", None) or f"smix {command}"
        print(f"{prog}: error: {_clean_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"smix {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: smix COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<11} {help_text}")
        print("\n`smix COMMAND --help` for a command's options.")
        return 0 if argv else 2
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
