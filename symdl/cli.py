"""The ``symdl`` command line: list, show, generate, check, derive, report.

Exit codes: 0 success, 1 a check failed (stale files, gradient mismatch), 2 bad usage or input
(one line on stderr, never a traceback; SYMDL_TRACEBACK=1 shows one for an unexpected error).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__, registry
from .errors import SymdlError, UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Set to anything but '' or '0' to see the traceback of an unexpected error.
ENV_TRACEBACK = "SYMDL_TRACEBACK"


def _entries(names) -> list:
    """The catalogue entries ``names`` (none: all of them, in ``symdl list`` order)."""
    if not names:
        return list(registry.entries().values())
    return [registry.get(n) for n in names]


def _output_dir(path) -> Path:
    """``path`` as an output directory: an existing file there is an error (before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {str(out)!r} requires a directory, got a file")
    return out


def _os_message(err: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` as ``cannot write 'x': no such file or
    directory`` (the command line writes files; it reads none but the ones it writes)."""
    what = (err.strerror or str(err)).rstrip(".")
    what = what[:1].lower() + what[1:]
    if err.filename is None:
        return f"cannot write the output: {what}"
    return f"cannot write {str(err.filename)!r}: {what}"


# ---- commands ------------------------------------------------------------------------------


def cmd_list(args) -> int:
    for entry in registry.entries().values():
        print(f"{entry.name:34s} {entry.summary}")
    return EXIT_OK


def _check_show_options(args, entry) -> None:
    """show's options that do not apply to ``entry`` are errors, never silently ignored."""
    kind = registry.kind(entry)
    asked = [o for o in ("steps", "expand") if getattr(args, o) and o not in kind.tools]
    if args.stage not in (None, *kind.stages):
        asked.append(f"stage {args.stage}")
    if asked:
        raise UsageError(
            f"show --{asked[0]} requires a layer, got {kind.refusal(entry, asked[0])}"
        )
    if args.steps and args.expand:
        raise UsageError("show --steps and --expand require one at a time, got both")
    if (args.steps or args.expand) and args.stage is not None:
        option = "steps" if args.steps else "expand"
        raise UsageError(
            f"show --{option} requires no --stage (it has its own output), got --stage "
            f"{args.stage}"
        )


def cmd_show(args) -> int:
    entry = registry.get(args.name)
    _check_show_options(args, entry)
    layer = entry.definition
    if args.steps:
        from .steps import steps_latex, steps_text

        print(steps_latex(layer, style=args.notation) if args.latex else steps_text(layer, style=args.notation))
        return EXIT_OK
    if args.expand:
        from .steps import expand, parse_sizes

        e = expand(layer, parse_sizes(args.expand))
        print(e.latex(args.notation) if args.latex else e.text(args.notation))
        return EXIT_OK
    stage = args.stage
    if stage == "spec":
        spec = layer.spec()
        print(repr(layer))
        for a in spec.assigns:
            red = f" over {', '.join(i.name for i in a.reduce)}" if a.reduce else ""
            print(f"  [{a.op}{red}] {a.target}[{', '.join(i.name for i in a.indices)}] <- {a.expr}")
        return EXIT_OK
    if stage == "code":
        print(registry.source(entry), end="")
        return EXIT_OK
    if stage == "lower":
        from .derive import derive
        from .lower import lower

        d = derive(layer)
        low = lower(d)
        print("# forward")
        for line in low.forward:
            print(line.code)
        print("# backward")
        for line in low.backward:
            print(line.code)
        print(_pass_table(d))
        return EXIT_OK
    if args.latex:
        for key, tex in registry.formulas(entry, style=args.notation).items():
            print(f"% {key}\n{tex}")
    else:
        print(registry.text(entry))
    return EXIT_OK


def _pass_table(d) -> str:
    """The passes of the lowering in pipeline order: on or off, what each one does, and the
    lines of forward and backward code with it against without it."""
    from .lower import pass_effects

    rows = ["# passes (pipeline order), and the lines of forward/backward code with -> without"]
    for p, on, changed, with_, without in pass_effects(d):
        change = f"{with_[0]}/{with_[1]} -> {without[0]}/{without[1]}" if changed else "-"
        rows.append(f"#   {'on ' if on else 'off'} {p.stage:<8} {p.name:<18} {change:<14} {p.summary}")
    return "\n".join(rows)


def _report_format(args) -> tuple[str, Path]:
    """--format (else the output's suffix: .tex is tex, anything else html) and the output
    file (default report.html or report.tex)."""
    fmt = args.format
    if fmt is None:
        fmt = "tex" if args.output and Path(args.output).suffix.lower() == ".tex" else "html"
    return fmt, Path(args.output or f"report.{fmt}")


def cmd_report(args) -> int:
    from .report import write_report

    fmt, output = _report_format(args)
    if output.is_dir():
        raise UsageError(
            f"the output file requires a file name, got the directory {str(output)!r}"
        )
    path = write_report(output, args.names or None, fmt=fmt, style=args.notation)
    n = len(_entries(args.names))
    print(f"symdl report: wrote {path} ({n} {'entry' if n == 1 else 'entries'}, {fmt})")
    return EXIT_OK


def cmd_generate(args) -> int:
    from .cache import write_atomic

    def is_hand_edited(text):
        from .codegen import is_hand_edited

        return is_hand_edited(text)

    out_dir = _output_dir(args.output)
    chosen = _entries(args.names)
    start = time.perf_counter()
    rendered = {}
    for entry in chosen:  # render everything first: one failure writes nothing
        rendered[entry.name] = registry.cached_source(entry, not args.no_cache)
    if args.check:
        stale = []
        for name, text in rendered.items():
            path = out_dir / f"{name}.py"
            if not path.exists():
                stale.append(f"{name} (missing)")
            else:
                current = path.read_text(encoding="utf-8")
                if current != text:
                    why = "edited by hand" if is_hand_edited(current) else "stale"
                    stale.append(f"{name} ({why})")
        if stale:
            print(
                f"symdl generate --check: {len(stale)} of {len(rendered)} modules in {out_dir} "
                f"differ from what the engine produces: {', '.join(stale)}; regenerate with "
                f"'symdl generate -o {out_dir}'"
            )
            return EXIT_FAILED
        print(f"symdl generate --check: {len(rendered)} modules in {out_dir} are up to date")
        return EXIT_OK
    edited = []
    for name, text in rendered.items():
        path = out_dir / f"{name}.py"
        if path.exists() and not args.force:
            current = path.read_text(encoding="utf-8")
            if current != text and is_hand_edited(current):  # the engine's text has a valid hash
                edited.append(str(path))
    if edited:
        print(
            f"symdl generate: {len(edited)} module(s) were edited by hand and are kept: "
            f"{', '.join(edited)}; use --force to overwrite them"
        )
        return EXIT_FAILED
    written = 0
    for name, text in rendered.items():
        path = out_dir / f"{name}.py"
        if path.is_file() and path.read_bytes() == text.encode("utf-8"):
            continue
        write_atomic(path, text)
        written += 1
    took = time.perf_counter() - start
    print(
        f"symdl generate: {len(rendered)} modules in {out_dir} ({written} written, "
        f"{len(rendered) - written} unchanged) in {took:.1f} s"
    )
    return EXIT_OK


def cmd_check(args) -> int:
    """Layers and sequences: a gradcheck against finite differences; optimizers: the generated
    step against the update equations evaluated one by one (symdl.testing.check_optimizer)."""
    failed = 0
    chosen = _entries(args.names)
    for entry in chosen:
        result = registry.check(entry, tol=args.tol)
        print(result)
        failed += not result.ok
    print(f"symdl check: {len(chosen) - failed} passed, {failed} failed")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_derive(args) -> int:
    from . import cache

    argv = sys.argv[1:] if args.argv is None else args.argv
    if not args.scan:
        alone = [o for o in ("state", "stack") if getattr(args, o)]
        if alone:
            raise UsageError(f"--{alone[0]} requires --scan (the per-step inputs), got it alone")
    _output_dir(args.output)
    # the header records the command; --no-cache and --force do not change the text, so they
    # are left out
    command = shlex.join(["symdl", *(a for a in argv if a not in ("--no-cache", "--force"))])
    options = ("equations", "inputs", "params", "consts", "hyper", "outputs")
    options += ("scan", "state", "stack")

    def parts():
        return {"name": args.name, **{k: getattr(args, k) for k in options}, "command": command}

    # --show prints the derivation, so it derives; otherwise an unchanged layer comes from the
    # cache without importing SymPy at all
    text, meta = cache.cached(
        "derive", parts, lambda: _derive_text(args, command), use=not (args.no_cache or args.show)
    )
    return _finish_derive(args, text, meta["what"])


def _derive_text(args, command: str) -> tuple[str, dict]:
    from .codegen import generate_source
    from .derive import derive
    from .parse import parse_layer

    layer = parse_layer(
        args.name,
        args.equations,
        inputs=args.inputs,
        params=args.params,
        consts=args.consts,
        hyper=args.hyper,
        outputs=args.outputs,
    )
    if args.scan:
        from .scan import report, scan_layer, sequence_source

        if not args.state:
            raise UsageError("--scan requires --state, e.g. --state h=h1 (input state = cell output)")
        pairs = _pairs(args.state, "--state")
        layer.name = f"{args.name}_cell"
        seq = scan_layer(
            layer,
            args.name,
            per_step=tuple(n for n in args.scan.replace(" ", "").split(",") if n),
            state=pairs,
            outputs=_pairs(args.stack, "--stack") if args.stack else None,
        )
        text = sequence_source(seq, "equations given to symdl derive", command)
        if args.show:
            print(report(seq))
        return text, {"what": f"a sequence layer; gradients for {', '.join(seq.args)}"}
    d = derive(layer)
    text = generate_source(d, "equations given to symdl derive", command)
    if args.show:
        print(repr(d))
    n = sum(1 for g in d.grads.values() if g is not None)
    return text, {"what": f"{n} gradient(s) derived for {', '.join(d.spec.args)}"}


def _pairs(text: str, option: str) -> dict[str, str]:
    out = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier() or not value.isidentifier():
            raise UsageError(f"{option} requires name=name pairs, got {item!r}")
        out[key] = value
    return out


def _check_values(args, module) -> dict[str, object]:
    """The hyperparameter values --check runs the module with: --check-hyper, else defaults;
    a hyperparameter without either is a usage error naming it."""
    import ast
    import math

    from .testing import required_hyperparameters

    known = getattr(module, "HYPERPARAMETERS", {})
    values: dict[str, object] = {}
    for item in args.check_hyper.replace(" ", "").split(","):
        if not item:
            continue
        name, eq, text = item.partition("=")
        try:
            value = ast.literal_eval(text) if eq else None
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (bool, int, float)) or not math.isfinite(value):
            raise UsageError(f"--check-hyper requires NAME=NUMBER pairs, got {item!r}")
        if name not in known:
            listed = ", ".join(known) if known else "none"
            raise UsageError(
                f"--check-hyper requires hyperparameters of the layer ({listed}), got {name!r}"
            )
        values[name] = value

    for name in required_hyperparameters(module):
        if name not in values:
            raise UsageError(
                f"--check requires a value of hyperparameter {name!r}, which has no default: "
                f"give one with --check-hyper {name}=VALUE (or a default with --hyper "
                f"{name}=VALUE)"
            )
    return values


def _kept_because(path: Path, text: str) -> str | None:
    """Why the file at ``path`` may not be replaced by ``text`` (None: it may): it is not a
    module symdl generated, or it is one edited by hand since."""
    if not path.is_file():
        return "is not a file"
    try:
        current = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "is not a module symdl generated"
    if current == text:
        return None
    from .codegen import is_hand_edited, recorded_digest  # (SymPy: only when it is needed)

    if recorded_digest(current) is None:
        return "is not a module symdl generated"
    if is_hand_edited(current):
        return "was edited by hand"
    return None


def _finish_derive(args, text: str, what: str) -> int:
    from .cache import write_atomic

    path = Path(args.output) / f"{args.name}.py"
    why = None if args.force or not path.exists() else _kept_because(path, text)
    if why:
        raise UsageError(f"{path} {why}; it is kept (use --force to overwrite it)", path=str(path))
    if args.check_hyper and not args.check:
        raise UsageError("--check-hyper requires --check, got it alone")
    if args.check:
        import numpy as np

        from .testing import gradcheck, load_module

        module = load_module(text, args.name)
        values = _check_values(args, module)
        with np.errstate(all="ignore"):  # a failure is reported in the result line
            result = gradcheck(module, checks={"hyper": values})
        print(result)
        if not result.ok:
            return EXIT_FAILED
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        print(f"symdl derive: {path} is up to date ({what})")
        return EXIT_OK
    write_atomic(path, text)
    print(f"symdl derive: wrote {path} ({what})")
    return EXIT_OK


# ---- parser ----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error format: one line, exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"requires a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"requires a positive finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="symdl",
        description="Deep-learning layers as equations: gradients derived, NumPy modules generated.",
    )
    p.add_argument("--version", action="version", version=f"symdl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="list the built-in layers, sequences and optimizers")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="show a layer's equations and derived gradients")
    s.add_argument("name", help="a name symdl list prints")
    s.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")
    s.add_argument(
        "--notation",
        choices=("partial", "bar"),
        default="partial",
        help="adjoints as dL/dx (partial) or x-bar (bar)",
    )
    s.add_argument(
        "--stage",
        choices=("spec", "derive", "lower", "code"),
        default=None,
        help="which pipeline stage to dump (default: derive); sequences and optimizers have "
        "derive and code",
    )
    s.add_argument(
        "--steps", action="store_true", help="walk the chain rule step by step, as a textbook does"
    )
    s.add_argument(
        "--expand",
        default="",
        metavar="SIZES",
        help="a worked instance at small sizes, every element written out, e.g. "
        "N=1,C=1,H=3,W=3,KH=2,KW=2,F=1 (hyperparameters too: stride=2)",
    )
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("report", help="write a formula report (HTML with MathML, or LaTeX)")
    s.add_argument(
        "names", nargs="*", metavar="NAME", help="names symdl list prints (default: all of them)"
    )
    s.add_argument(
        "-o", "--output", default=None, help="output file (default report.html, or report.tex)"
    )
    s.add_argument(
        "--format",
        choices=("html", "tex"),
        default=None,
        help="html or tex (default: tex for an output ending in .tex, else html)",
    )
    s.add_argument("--notation", choices=("partial", "bar"), default="partial")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("generate", help="generate NumPy modules for catalogue layers")
    s.add_argument(
        "names", nargs="*", metavar="NAME", help="names symdl list prints (default: all of them)"
    )
    s.add_argument("-o", "--output", default="generated", help="output directory (default: generated)")
    s.add_argument("--check", action="store_true", help="fail if any file differs from the engine's output")
    s.add_argument("--force", action="store_true", help="overwrite modules edited by hand")
    s.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the cache of generated modules (also: SYMDL_NO_CACHE=1)",
    )
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "check",
        help="gradcheck catalogue layers and sequences against finite differences; check "
        "optimizers' steps against their equations",
    )
    s.add_argument(
        "names", nargs="*", metavar="NAME", help="names symdl list prints (default: all of them)"
    )
    s.add_argument(
        "--tol", type=_positive_float, default=1e-6, help="max relative error (default 1e-6)"
    )
    s.set_defaults(func=cmd_check)

    _derive_parser(sub)
    return p


def _derive_parser(sub) -> None:
    """The options of ``symdl derive``: a custom layer (or sequence layer) from equation text."""
    s = sub.add_parser(
        "derive",
        help="derive and generate a custom layer from equation text",
        description=(
            'Example: symdl derive dense "y[n,o] = tanh(Sum(x[n,i]*w[o,i], i) + b[o])" '
            "--inputs x --params w,b"
        ),
    )
    s.add_argument("name", help="the layer (and module) name")
    s.add_argument("equations", help="equations 'lhs[idx] = rhs' separated by ';' or newlines")
    s.add_argument("--inputs", default="", help="differentiable inputs, comma separated")
    s.add_argument("--params", default="", help="trainable parameters, comma separated")
    s.add_argument("--consts", default="", help="non-differentiable tensors (targets, indices)")
    s.add_argument(
        "--hyper",
        default="",
        help="hyperparameters with optional defaults: eps=1e-5,lam (one used in an index, "
        "such as a stride, is an integer)",
    )
    s.add_argument("--outputs", default="", help="outputs (default: the last equation's left side)")
    s.add_argument("-o", "--output", default=".", help="output directory (default: .)")
    s.add_argument("--show", action="store_true", help="also print the derived gradients")
    s.add_argument(
        "--force",
        action="store_true",
        help="overwrite NAME.py in the output directory even if it was edited by hand or is "
        "not a module symdl generated (without it, such a file is kept and nothing written)",
    )
    s.add_argument(
        "--check",
        action="store_true",
        help="gradcheck before writing (exit 1 and nothing written if it fails)",
    )
    s.add_argument(
        "--check-hyper",
        default="",
        metavar="VALUES",
        help="hyperparameter values for --check, e.g. Dh=4,eps=0.1: required for a "
        "hyperparameter without a default, optional for the others",
    )
    s.add_argument(
        "--scan",
        default="",
        help="make a sequence layer of the cell: inputs that have one value per time step (x)",
    )
    s.add_argument(
        "--state",
        default="",
        help="with --scan: carried states as input=output pairs of the cell (h=h1,c=c1)",
    )
    s.add_argument(
        "--stack",
        default="",
        help="with --scan: outputs stacked over time as name=cell_output (default y=<first state>)",
    )
    s.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the cache of generated modules (also: SYMDL_NO_CACHE=1)",
    )
    s.set_defaults(func=cmd_derive, argv=None)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is cmd_derive and argv is not None:
        args.argv = list(argv)
    prefix = f"symdl {args.command}: error:"
    try:
        return args.func(args)
    except SymdlError as err:
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # pragma: no cover
        return EXIT_OK
    except OSError as err:  # an output path that cannot be written
        print(f"{prefix} {_one_line(_os_message(err))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a bug in symdl: still one line, the traceback on request
        if os.environ.get(ENV_TRACEBACK, "").strip() not in ("", "0"):
            raise
        print(
            f"symdl {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            f"(set {ENV_TRACEBACK}=1 to see the traceback)",
            file=sys.stderr,
        )
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
