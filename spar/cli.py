"""`spar plan | apply | show | plot | schema` — the only place that prints or sets up logging.

Exit codes: 0 success; 2 invalid input detected before any work; 1 a failure while running.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from spar.errors import InputError, RunError
from spar.store import RunStore, StoreError

log = logging.getLogger("spar")


def _load_plugins() -> None:
    """`SPAR_PLUGINS=pkg.mod,other.mod`: modules that register extra engines or judges."""
    for name in filter(None, os.environ.get("SPAR_PLUGINS", "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as e:
            raise InputError(f"SPAR_PLUGINS: cannot import {name.strip()!r}: {e}") from None


def _runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs_dir or os.environ.get("SPAR_RUNS_DIR") or "runs")


def load_and_plan(paths: list[Path], store: RunStore) -> list:  # list[PlannedStage]
    """Validate every spec completely (files, templates, docs lines) and plan; writes nothing."""
    from spar.engines import engine_names
    from spar.judges import judge_kinds, rubric
    from spar.plan import plan_specs
    from spar.spec import load_spec

    specs = [load_spec(p) for p in paths]
    for path, spec in zip(paths, specs, strict=True):
        if spec.model.engine not in engine_names():
            raise InputError(
                f"{path}: model.engine: unknown engine {spec.model.engine!r} "
                f"(available: {', '.join(engine_names()) or 'none'})"
            )
        if spec.judge.kind not in judge_kinds():
            raise InputError(
                f"{path}: judge.kind: unknown judge {spec.judge.kind!r} "
                f"(available: {', '.join(judge_kinds()) or 'none'})"
            )
        rubric.validate(
            spec.judge.rubric, spec.judge.mode, spec.judge.scale.min, spec.judge.scale.max
        )
    return plan_specs(specs, store)


def cmd_plan(args: argparse.Namespace) -> int:
    from spar.plan import totals

    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store)
    if store.root.exists():
        store.hashes.save()
    if args.json:
        print(json.dumps([p.as_json() for p in planned], indent=2))
        return 0
    for p in planned:
        why = f"  ({'; '.join(p.reasons)})" if p.reasons else ""
        print(f"{p.node.experiment:<24} {p.node.name:<18} {p.status}{why}")
    for experiment, est in totals(planned).items():
        parts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in est.items())
        print(f"estimate for {experiment}: {parts}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from spar.apply import apply_plan
    from spar.plan import check_budget

    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store)  # everything validates before any work
    check_budget(planned, args.max_judge_calls)
    if all(p.status == "fresh" for p in planned):
        if store.root.exists():
            store.hashes.save()
        print("nothing to do: every stage is fresh")
        return 0
    with store.lock(wait=args.lock_timeout):
        planned = load_and_plan(args.specs, store)  # another apply may have finished meanwhile
        check_budget(planned, args.max_judge_calls)
        ran = apply_plan(store, planned)
        store.hashes.save()
    for p in ran:
        print(f"ran {p.node.experiment} / {p.node.name}")
    if not ran:
        print("nothing to do: every stage is fresh")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from spar.show import format_table, show_rows
    from spar.spec import load_spec

    rows = show_rows([load_spec(p) for p in args.specs], RunStore(_runs_dir(args)))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from spar.plots import judged_figure, png
    from spar.spec import PlotSpec
    from spar.store import atomic_write_bytes, read_jsonl

    labels = args.labels or [p.parent.name or p.stem for p in args.results]
    if len(labels) != len(args.results):
        raise InputError(f"--labels: {len(labels)} labels for {len(args.results)} result files")
    runs = []
    for path, label in zip(args.results, labels, strict=True):
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            rows = read_jsonl(path)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {e.lineno}: invalid JSON") from None
        missing = [k for k in ("tier", "question", "score") if rows and k not in rows[0]]
        if not rows or missing:
            raise InputError(f"{path}: expected judged rows with tier, question, score")
        runs.append((label, rows))
    style = PlotSpec(title=args.title)
    atomic_write_bytes(args.output, png(judged_figure(runs, style), style.dpi))
    print(f"wrote {args.output}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from spar.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spar", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_specs(p: argparse.ArgumentParser) -> None:
        p.add_argument("specs", nargs="+", type=Path, metavar="SPEC")
        p.add_argument("--runs-dir", help="where outputs go (default: ./runs or $SPAR_RUNS_DIR)")

    p = sub.add_parser("plan", help="what is fresh, stale or missing, and why")
    with_specs(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("apply", help="run exactly the stages that are not fresh")
    with_specs(p)
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        help="seconds to wait for another apply on the same runs dir (default: wait)",
    )
    p.add_argument(
        "--max-judge-calls",
        type=int,
        default=None,
        help="refuse to start if any judge stage would make more calls (see `spar plan`)",
    )
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("show", help="compare experiments: differing params + effects with CIs")
    with_specs(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("plot", help="overlay judged.jsonl files in one chart by tier")
    p.add_argument("results", nargs="+", type=Path, metavar="JUDGED_JSONL")
    p.add_argument("--labels", nargs="+", help="one label per file (default: its directory)")
    p.add_argument("--output", type=Path, default=Path("comparison.png"))
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("schema", help="print the spec's JSON Schema")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _load_plugins()
        return int(args.func(args))
    except InputError as e:
        if args.debug:
            raise
        print(f"spar: error: {e}", file=sys.stderr)
        return 2
    except (RunError, StoreError) as e:
        if args.debug:
            raise
        print(f"spar: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spar: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected service failure: one line unless --debug
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"spar: failed: {type(e).__name__}: {msg} (rerun with --debug)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
