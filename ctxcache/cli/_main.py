"""``ctxcache`` / ``python -m ctxcache``: the parser, logging, and the mapping of failures to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import ctxcache

from ._common import (
    ENV_DEBUG,
    EXIT_BROKEN_PIPE,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Command,
    CommandFailed,
    Formatter,
    UsageError,
    add_command,
    add_confirm_flags,
    add_key_flags,
    add_provider_flags,
    add_tier_flag,
    parse_duration,
    parse_size,
)


def build_parser() -> argparse.ArgumentParser:
    from . import _commands, _demo, _warm

    parser = argparse.ArgumentParser(
        prog="ctxcache",
        description="Compile ONNX Runtime models for their NPU/GPU once per device (EP-context models), "
        "load them instantly after, and never break the app.",
        epilog="examples:\n  ctxcache demo\n  ctxcache warm models/ --jobs 2\n  ctxcache ls\n\n" + EXIT_CODES,
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"ctxcache {ctxcache.__version__}")
    # -v before the command counts too (a command's own -v would overwrite a shared dest, hence its own).
    parser.add_argument("-v", "--verbose", action="count", default=0, dest="global_verbose",
                        help="log what the cache does (-vv: debug); also accepted after the command")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = add_command(subs, "demo", "run 5 real launches on the QNN compiler: miss, hit, damage -> fallback, miss, hit",
             "ctxcache demo\nctxcache demo --dir /tmp/ctxcache-demo --format json", _demo.cmd_demo, cache=False)
    p.add_argument("--dir", help="work in this folder and keep its files (default: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")

    p = add_command(subs, "warm", "precompile models before the first launch (idempotent; parallel with --jobs)",
             """
             ctxcache warm app/models/ --preset qnn-htp --jobs 2
             ctxcache warm 'models/**/*.onnx' --provider qnn -o backend_type=htp -o soc_model=69 -o htp_arch=79
             ctxcache warm --plan warm.toml --cache-dir /opt/myapp/ctxcache --format json

             A plan (JSON, or TOML on Python 3.11+; paths relative to the plan):
               models = ["models/*.onnx"]
               [[providers]]
               preset = "qnn-htp"
               options = [{soc_model = 60, htp_arch = 73}, {soc_model = 69, htp_arch = 79}]
             Each --provider/--preset is one configuration; every model is warmed for each.
             """, _warm.cmd_warm)
    p.add_argument("models", nargs="*", metavar="MODEL", help="model files, globs (quote them; ** recurses) or folders")
    p.add_argument("--plan", metavar="FILE", help="a JSON or TOML plan: models x providers x options")
    p.add_argument("--detach", action="store_true",
                   help="return at once and warm in a detached process that outlives this one (installers that must not "
                        "block); its output goes to --log")
    p.add_argument("--log", metavar="FILE", help="with --detach: where the detached warm-up writes (default: a file in the "
                                                 "temp folder, printed)")
    p.add_argument("-j", "--jobs", type=int, metavar="N",
                   help="compile N models at once, in N processes (0: one per CPU; default 1)")
    p.add_argument("--free-dim", action="append", default=[], metavar="NAME=VALUE",
                   help="fix the input dimension named NAME to VALUE, as the app's "
                        "SessionOptions.add_free_dimension_override_by_name does: a model with dynamic shapes compiles "
                        "only with them fixed, and the app's loads with the same overrides hit; repeatable")
    p.add_argument("--free-dim-denotation", action="append", default=[], metavar="DENOTATION=VALUE",
                   help="the same by dimension denotation (add_free_dimension_override_by_denotation, e.g. "
                        "DATA_BATCH=1); repeatable")
    add_provider_flags(p, what="each one is a configuration to warm (default: --preset qnn-htp)")
    add_key_flags(p)

    p = add_command(subs, "ls", "list cached entries", "ctxcache ls\nctxcache ls --all --format json", _commands.cmd_ls)
    p.add_argument("--all", action="store_true", help="include damaged entries")

    p = add_command(subs, "explain", "would loading MODEL hit? if not, which key parts differ from the entries of that model",
             "ctxcache explain model.onnx --preset qnn-htp -o soc_model=69 -o htp_arch=79 --tier /opt/app/ctx.tar\n"
             "  -> miss: differs from entry 3f2a9c1e0b7d in ep_options.htp_arch 73 -> 79, ep_options.soc_model 60 -> 69",
             _commands.cmd_explain)
    p.add_argument("model", metavar="MODEL", help="the model file the application loads")
    add_provider_flags(p, what="the providers list the application passes, in order (default: --preset qnn-htp)")
    add_key_flags(p)
    add_tier_flag(p)

    p = add_command(subs, "verify", "re-hash every entry (all digests); --fix quarantines what fails",
             "ctxcache verify\nctxcache verify --fix", _commands.cmd_verify)
    p.add_argument("--fix", action="store_true", help="quarantine damaged entries (the next load recompiles them)")

    p = add_command(subs, "prune", "remove damaged entries and entries built for another environment, then by age / size (LRU)",
             "ctxcache prune --dry-run\nctxcache prune --max-size 2G --older-than 30d --yes", _commands.cmd_prune)
    p.add_argument("--max-size", type=parse_size, metavar="SIZE",
                   help="keep the cache under SIZE (500M, 2G): least recently used go first")
    p.add_argument("--older-than", type=parse_duration, metavar="AGE", help="remove entries unused for AGE (30d, 12h, 45m)")
    p.add_argument("--keep-other-env", action="store_true",
                   help="keep entries of other onnxruntime / EP versions unless a limit needs the room (a cache shared by apps)")
    add_confirm_flags(p, "only show what would go and how much is freed")

    p = add_command(subs, "clear", "remove every entry (and remembered compile failures)",
             "ctxcache clear --dry-run\nctxcache clear --yes", _commands.cmd_clear)
    add_confirm_flags(p, "only show what would be removed")

    p = add_command(subs, "stats", "app loads (hits, misses, fallbacks with reasons, bypasses) apart from warm-up "
                    "compiles; compile seconds spent and saved",
             "ctxcache stats\nctxcache stats --format json --reset", _commands.cmd_stats)
    p.add_argument("--reset", action="store_true", help="zero the counters (after showing them)")

    p = add_command(subs, "doctor", "packages, versions, EP devices, the cache folder, and what a key contains here",
             "ctxcache doctor\nctxcache doctor --provider qnn -o backend_type=htp --format json", _commands.cmd_doctor)
    add_provider_flags(p, what="show the key parts for these providers (default: --preset qnn-htp)")
    add_tier_flag(p)

    from . import tiers  # export / import / push / pull

    tiers.add_parsers(subs)
    from . import farm  # farm device / plan / run / report

    farm.add_parsers(subs)
    from . import tuf  # tuf init / rotate / timestamp / remove / status

    tuf.add_parsers(subs)
    return parser


def _attach_logging(verbose: int) -> logging.Handler:
    """The library logs to 'ctxcache' with no handler; the CLI is the one place that attaches one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ctxcache: %(message)s"))
    logger = logging.getLogger("ctxcache")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    try:
        return _run(argv)
    except BrokenPipeError:  # in --help, or in the error line of a failing command
        _silence_stdout()
        return EXIT_BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    debug = (os.environ.get(ENV_DEBUG) or "").strip().lower() in ("1", "true", "yes", "on")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(argv) if argv is not None else sys.argv[1:]
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, message printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.verbose += args.global_verbose
    handler = _attach_logging(args.verbose)
    try:
        if args.verbose < 2:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)  # ORT's own warnings are not the user's business here
        func: Command = args.func
        return func(args)
    except KeyboardInterrupt:
        print("ctxcache: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`ctxcache ls | head`): stop quietly, as other command-line tools do. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        code = _exit_code(e)
        if debug:
            import traceback

            traceback.print_exc()
        else:
            hint = "" if isinstance(e, (UsageError, CommandFailed)) or code == EXIT_USAGE else f" (set {ENV_DEBUG}=1 for details)"
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not isinstance(e, (UsageError, CommandFailed)) and code != EXIT_USAGE:
                text = f"{type(e).__name__}: {text}"
            print(f"ctxcache {args.command}: error: {text}{hint}", file=sys.stderr)
        return code
    finally:
        logging.getLogger("ctxcache").removeHandler(handler)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _exit_code(e: BaseException) -> int:
    from ctxcache.errors import (
        CacheLocationError,
        InvalidModelError,
        ModelNotFoundError,
        ProviderOptionError,
        SigningKeyError,
        UnknownProviderError,
    )

    if isinstance(e, (UsageError, CacheLocationError, UnknownProviderError, ProviderOptionError, ModelNotFoundError,
                      InvalidModelError, SigningKeyError)):
        return EXIT_USAGE
    return EXIT_FAILED
