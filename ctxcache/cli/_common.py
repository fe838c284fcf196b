"""Pieces every command shares: exit codes, provider flags and presets, sizes, durations, tables,
confirmation. Output goes through the functions here so that ``--format json`` stays machine-clean.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import ctxcache

# Exit codes (documented in README "Command line" and in `ctxcache --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and found a problem: a model failed to warm, damage found, a miss...
EXIT_USAGE = 2  # bad arguments or input: unknown provider, misspelt option, missing model (argparse uses 2 too)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`| head`): 128 + SIGPIPE, as a tool killed by it reports

#: Set to 1 to see a traceback with an error.
ENV_DEBUG = "CTXCACHE_DEBUG"


class UsageError(Exception):
    """Bad command-line input; ``main`` prints it as one line and exits with :data:`EXIT_USAGE`."""


class CommandFailed(Exception):
    """An expected failure (not a bug); ``main`` prints it as one line and exits with :data:`EXIT_FAILED`."""


EXIT_CODES = """\
exit codes:
  0    success (warm: every model cached; verify: all intact; explain: the load would hit)
  1    the command ran and found a problem (warm: a model failed to compile, the others are cached;
       verify: damaged entries; explain: the load would not hit; demo: not the expected sequence;
       doctor: a problem; clear, prune, verify --fix, stats --reset: could not change the cache, e.g. read-only)
  2    bad usage or input: unknown command or flag, a missing model or a file that is not one, unknown
       provider, misspelt option, a cache folder that is a file, an export destination that exists
  130  interrupted (Ctrl-C); no partial entry is left behind
  141  the reader of the output went away (`ctxcache ls | head`); nothing is printed about it

Set CTXCACHE_DEBUG=1 to see a traceback with an error."""

Command = Callable[[argparse.Namespace], int]


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def add_command(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, example: str, func: Command,
    *, cache: bool = True,
) -> argparse.ArgumentParser:
    """A subcommand with what every command has: ``-v``, ``--format`` and (``cache``) the cache location."""
    p = subs.add_parser(
        name,
        help=summary,
        description=summary,
        # The exit codes are listed once, in `ctxcache --help`, not under every command.
        epilog="example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  ") + "\n\nexit codes: see `ctxcache --help`",
        formatter_class=Formatter,
    )
    p.set_defaults(func=func)
    p.add_argument("-v", "--verbose", action="count", default=0, help="log what the cache does (-vv: debug)")
    add_format_flag(p)
    if cache:
        add_cache_flags(p)
    return p


# -- providers --------------------------------------------------------------------------------------
ALIASES = {
    "qnn": "QNNExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "nv": "NvTensorRTRTXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "vitisai": "VitisAIExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
}

DEFAULT_PRESET = "qnn-htp"
PRESETS = {
    "qnn-htp": "QNN HTP (Snapdragon NPU, soc_model 60 / htp_arch 73, fp16) with onnxruntime-qnn's own HTP backend",
}


def _known_providers() -> list[str]:
    return sorted(set(ALIASES.values()) | set(ctxcache.known_providers()))


def provider_name(name: str) -> str:
    """An alias or a provider name in any case -> ONNX Runtime's name (``QnnExecutionProvider`` -> ``QNNExecutionProvider``).

    A name close to an alias or a known provider but none of them is a :class:`UsageError` with the
    suggestion (``qnnn`` -> ``qnn``); any other name passes through, for the library to judge (a plugin EP
    the process registers is not known here)."""
    low = name.strip().lower()
    if low in ALIASES:
        return ALIASES[low]
    known = _known_providers()
    for full in known:
        if full.lower() in (low, low + "executionprovider"):
            return full
    import difflib

    by_lower = {a: a for a in ALIASES} | {k.lower(): k for k in known}
    close = difflib.get_close_matches(low, list(by_lower), n=1, cutoff=0.75)
    if close:
        alias = close[0]
        hint = f"{alias} ({ALIASES[alias]})" if alias in ALIASES else by_lower[alias]
        raise UsageError(f"unknown execution provider {name!r}; did you mean {hint}?")
    return name.strip()


def preset(name: str) -> tuple[str, dict[str, str]]:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if name == "qnn-htp":
        try:
            from ctxcache import models

            return "QNNExecutionProvider", models.qnn_htp_options()
        except ImportError:
            raise UsageError("preset qnn-htp needs onnxruntime-qnn: pip install 'ctxcache[qnn]'") from None
    raise AssertionError(name)


@dataclass
class ProviderConfig:
    """One provider with its options, as given on the command line or in a plan."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None

    @property
    def short(self) -> str:
        return self.name.removesuffix("ExecutionProvider")

    def label(self) -> str:
        """``QNN soc_model=60 htp_arch=73``: library paths left out (they differ per machine, and the key
        records the backend *type*), so lines stay short."""
        shown = [f"{k}={v}" for k, v in sorted(self.options.items()) if not k.endswith("_path")]
        return " ".join([self.short, *shown])

    def as_tuple(self) -> tuple[str, dict[str, Any]]:
        return (self.name, dict(self.options))

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": {k: str(v) for k, v in self.options.items()}, "preset": self.preset}


class _ProviderAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items: list[ProviderConfig] = list(getattr(ns, "providers", None) or [])
        if option_string == "--preset":
            items.append(ProviderConfig(*_preset_or_exit(parser, str(values)), preset=str(values)))
        else:
            try:
                items.append(ProviderConfig(provider_name(str(values))))
            except UsageError as e:
                parser.error(str(e))
        ns.providers = items


class _OptionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items: list[ProviderConfig] = list(getattr(ns, "providers", None) or [])
        if not items:  # before any provider flag: an option of the default preset
            items.append(ProviderConfig(*_preset_or_exit(parser, DEFAULT_PRESET), preset=DEFAULT_PRESET))
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} takes KEY=VALUE, got {values!r}")
        items[-1].options[key.strip()] = value.strip()
        ns.providers = items


def _preset_or_exit(parser: argparse.ArgumentParser, name: str) -> tuple[str, dict[str, str]]:
    try:
        return preset(name)
    except UsageError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def add_provider_flags(p: argparse.ArgumentParser, *, what: str) -> None:
    g = p.add_argument_group("providers", what)
    g.add_argument("-p", "--provider", action=_ProviderAction, metavar="NAME", dest="providers", default=None,
                   help="execution provider: a full name (QNNExecutionProvider) or an alias (qnn, tensorrt, openvino, ...)")
    g.add_argument("-o", "--option", action=_OptionAction, metavar="KEY=VALUE", dest="providers",
                   help="an option of the provider given just before (repeatable), e.g. -o soc_model=60; "
                        "before any provider flag, an option of the default preset")
    g.add_argument("--preset", action=_ProviderAction, metavar="NAME", dest="providers",
                   help="a ready-made provider configuration: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items())
                   + ". Later -o flags override its options. Default when no provider is given: qnn-htp")


def providers_or_default(configs: list[ProviderConfig] | None) -> list[ProviderConfig]:
    if configs:
        return configs
    name, options = preset(DEFAULT_PRESET)
    return [ProviderConfig(name, options, preset=DEFAULT_PRESET)]


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cache location", "precedence: --cache-dir, then $CTXCACHE_DIR, then the app-data folder")
    g.add_argument("--cache-dir", metavar="DIR", help="the cache folder")
    g.add_argument("--app-name", default="ctxcache", help="the app whose data folder holds the cache (default: ctxcache)")
    g.add_argument("--app-author", default=None, help="the app's author, for platforms that use it (Windows)")


def add_key_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("key settings", "must match the application's ContextCache(...) arguments")
    g.add_argument("--extra-key", default=None, help="the app's extra_key")
    g.add_argument("--embed", action="store_true", help="the app uses embed=True")


def add_tier_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", action="append", default=[], metavar="PATH|URL",
                   help="a tier the application passes in ContextCache(tiers=[...]), in order (repeatable): "
                        "a bundle folder or .tar, an ORT model package folder, an s3:// or fsspec URL")
    add_trust_flags(p, dirs=True)


def add_trust_flags(p: argparse.ArgumentParser, *, dirs: bool = False) -> None:
    """The application's ContextCache(trusted_keys=, revoked_keys=, trusted_dirs=); public keys are not secret."""
    g = p.add_argument_group("trust", "must match the application's ContextCache(...) trust arguments "
                                      "(default: $CTXCACHE_TRUSTED_KEYS, plus $CTXCACHE_REVOKED_KEYS)")
    g.add_argument("--trusted-key", action="append", default=None, metavar="KEY|FILE",
                   help="a public key (ed25519:..., as `ctxcache keygen` prints it) or a file of them (repeatable)")
    g.add_argument("--revoked-key", action="append", default=None, metavar="ID|KEY",
                   help="a key id or public key whose signatures are refused (repeatable)")
    if dirs:
        g.add_argument("--trusted-dir", action="append", default=None, metavar="DIR",
                       help="the app's own install folder: bundles inside it may be unsigned (repeatable)")


def _keys_arg(values: list[str] | None) -> list[Any] | None:
    """A key (``ed25519:...``, PEM text) or key id (16 hex digits) as given, anything else as a key file."""
    if values is None:
        return None
    return [v if v.startswith(("ed25519:", "-----BEGIN")) or re.fullmatch(r"[0-9a-fA-F]{16}", v)
            else Path(os.path.expanduser(v)) for v in values]


def cache_dir_arg(args: argparse.Namespace) -> str | None:
    # Absolute, so that messages name the real folder and worker processes agree on it.
    return os.path.abspath(os.path.expanduser(args.cache_dir)) if args.cache_dir else None


def open_cache(args: argparse.Namespace, **kw: Any) -> ctxcache.ContextCache:
    if getattr(args, "tier", None):
        kw["tiers"] = list(args.tier)
    if getattr(args, "trusted_key", None) is not None:
        kw["trusted_keys"] = _keys_arg(args.trusted_key)
    if getattr(args, "revoked_key", None) is not None:
        kw["revoked_keys"] = _keys_arg(args.revoked_key)
    if getattr(args, "trusted_dir", None):
        kw["trusted_dirs"] = [os.path.abspath(os.path.expanduser(d)) for d in args.trusted_dir]
    return ctxcache.ContextCache(cache_dir_arg(args), app_name=args.app_name, app_author=args.app_author, **kw)


def why_not_removed(cache: ctxcache.ContextCache) -> str:
    return ("the cache folder is read-only" if cache.read_only()
            else "being rebuilt by another process, replaced meanwhile, or refused by the OS")


def add_confirm_flags(p: argparse.ArgumentParser, dry_run: str) -> None:
    """``--dry-run`` and ``--yes`` of a command that removes things (what :func:`confirm` asks about)."""
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def add_format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")


# -- units ------------------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``500M``, ``1.5G``, ``2GiB``, ``100MB``, ``4096`` (bytes). Binary units: 1K = 1024 bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtb]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}; write e.g. 500M, 2G or 1048576")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``45m``, ``12h``, ``30d``, ``2w`` (a unit is required, so ``30`` is never misread)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|min|h|d|w)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read duration {text!r}; write e.g. 30d, 12h, 45m or 90s")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_time(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


# -- output -----------------------------------------------------------------------------------------
def out(text: str = "", stream: IO[str] | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit_json(data: Any) -> None:
    out(json.dumps(data, indent=2, default=str))


def shown(text: object) -> str:
    """Text for one line of the terminal: characters that are not printable (a tab, a newline, a no-break
    or ideographic space, a zero-width joiner: all legal in file names) as their escapes. The library's
    logs use the same escaping (ctxcache._manifest.shown; the CLI sees only the public API)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in s)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()) -> str:
    """A plain text table: a header, a rule, columns padded to their widest cell (each cell one line)."""
    cells = [[shown(c) for c in headers]] + [[("-" if c is None else shown(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align_right = set(right)
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i in align_right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def confirm(question: str, *, yes: bool) -> bool:
    """``--yes`` confirms; on a terminal ask; without a terminal refuse (a script must say ``--yes``)."""
    if yes:
        return True
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(f"{question.rstrip('?')}: no terminal to confirm on; pass --yes (or --dry-run to only look)")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")
