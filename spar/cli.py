"""spar — one YAML spec per fine-tuning-generalization experiment; only what changed runs.

The only module that prints or sets up logging. Exit codes: 0 success; 2 invalid input (spec,
docs, template, missing file) found before any work, nothing written; 1 a failure while running.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from spar import quiet
from spar.errors import InputError, RunError
from spar.store import RunStore, StoreError

log = logging.getLogger("spar")

EPILOG = """\
examples:
  spar plan experiments/demo.yaml          what would run, and why (nothing is written)
  spar apply experiments/demo.yaml         run exactly what is not fresh
  spar show experiments/demo.yaml experiments/demo-negative.yaml
  spar gc experiments/*.yaml               cached outputs no listed spec uses (dry run)
  spar push experiments/demo.yaml          share its outputs and paid items ($SPAR_REMOTE)
  spar pull experiments/demo.yaml          a teammate's results, restored (0 paid calls)

Outputs go to ./runs (or --runs-dir / $SPAR_RUNS_DIR): runs/<experiment>/<stage>/, a params
file beside every output. Exit codes: 0 ok, 2 bad input (nothing written), 1 a run failed.
"""


def _load_plugins() -> None:
    """`SPAR_PLUGINS=pkg.mod,other.mod`: modules that register engines, judges or stage kinds."""
    for name in filter(None, os.environ.get("SPAR_PLUGINS", "").split(",")):
        try:
            importlib.import_module(name.strip())
        except ImportError as e:
            raise InputError(f"SPAR_PLUGINS: cannot import {name.strip()!r}: {e}") from None
    from spar.plugins import load_entry_points  # installed plugins: spar.engines/judges/stages

    load_entry_points()


def _load_dotenv() -> None:
    """`./.env` (KEY=value lines) into the environment, never over a variable already set. Only
    the CLI does this; `PYTHON_DOTENV_DISABLED=1` turns it off."""
    import dotenv

    dotenv.load_dotenv(Path.cwd() / ".env", override=False)


def _runs_dir(args: argparse.Namespace) -> Path:
    return Path(args.runs_dir or os.environ.get("SPAR_RUNS_DIR") or "runs")


def load_specs(paths: list[Path]) -> list[Any]:  # list[Spec]
    """Load and validate every spec completely (names, files, templates); writes nothing."""
    from spar.engines import engine_names
    from spar.judges import judge_kinds, rubric
    from spar.models import check_local_model, check_renderer
    from spar.spec import load_spec
    from spar.stages import generate, judge_also, logprob, track

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
        check_renderer(spec.model.renderer, str(path))
        check_local_model(spec.model.base_model, str(path))
        rubric.validate(
            spec.judge.rubric,
            spec.judge.mode,
            spec.judge.scale.min,
            spec.judge.scale.max,
            properties=spec.judge.properties is not None,
        )
        generate.validate(spec, str(path))
        logprob.validate(spec, str(path))  # logprob.template, when the spec has `logprob:`
        judge_also.validate(spec, str(path))  # judge.also: kinds and rubrics
        track.validate(spec, str(path))  # report.track: the trackers' packages installed
    return specs


def load_and_plan(paths: list[Path], store: RunStore, flags: Any = None) -> list[Any]:
    """Validate every spec (and every input's content) and plan; writes nothing."""
    from spar.plan import plan_specs

    specs = load_specs(paths)
    for spec in specs:  # a compared spec is validated like one given
        for other in spec.report.compare:
            load_specs([other])
    return plan_specs(specs, store, flags)


def cmd_plan(args: argparse.Namespace) -> int:
    from spar.plan import totals

    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store)
    store.hashes.save()  # valid input: keep the hashes, even before the first apply
    if args.json:
        print(json.dumps([p.as_json() for p in planned], indent=2))
        return 0
    for p in planned:
        why = f"  ({'; '.join(p.reasons)})" if p.reasons else ""
        then = "  -> restore from run cache" if p.action == "restore" else ""
        print(f"{p.node.experiment:<24} {p.node.name:<18} {p.status}{why}{then}")
    for experiment, est in totals(planned).items():
        parts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in est.items())
        print(f"estimate for {experiment}: {parts}")
    return 0


DEFAULT_JOBS = 4


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {n})")
    return n


def cmd_apply(args: argparse.Namespace) -> int:
    from spar.apply import apply_plan
    from spar.headline import headline_lines
    from spar.plan import check_budget
    from spar.stages.base import Flags

    flags = Flags(retry_invalid=args.retry_invalid)
    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store, flags)  # everything validates before any work
    check_budget(planned, args.max_judge_calls)
    if all(p.status == "fresh" for p in planned):
        store.hashes.save()
        print("nothing to do: every stage is fresh")
        print("\n".join(headline_lines(load_specs(args.specs), store)))
        return 0
    with store.lock(wait=args.lock_timeout):
        planned = load_and_plan(args.specs, store, flags)  # another apply may have finished
        check_budget(planned, args.max_judge_calls)
        outcome = apply_plan(store, planned, flags, jobs=args.jobs)
        store.hashes.save()
        headline = headline_lines(load_specs(args.specs), store)  # what `spar show` gives
    for p in outcome.ran:
        print(f"ran {p.node.experiment} / {p.node.name}")
    for p in outcome.restored:
        print(f"restored {p.node.experiment} / {p.node.name} (run cache)")
    if not outcome.ran and not outcome.restored:
        print("nothing to do: every stage is fresh")
    print("\n".join(headline))  # per experiment: effects with intervals, report path
    if outcome.incomplete:
        parts = ", ".join(f"{k}: {n}" for k, n in outcome.incomplete.items())
        print(
            f"spar: incomplete: items ended in error ({parts}); `spar apply` again retries them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from spar.show import format_table, show_rows

    store = RunStore(_runs_dir(args))
    specs = load_specs(args.specs)
    rows = show_rows(specs, store)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from spar.gc import collect

    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store)
    report = collect(store, {p.fingerprint for p in planned}, delete=args.yes)
    for line in report.lines():
        print(line)
    if not args.yes and report.entries:
        print("dry run: add --yes to delete")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Upload run-cache outputs (the specs' stages, or all) and memo items to the remote."""
    from spar.store.remote import open_remote, push, remote_url, save_fresh

    remote = open_remote(remote_url(args.remote))
    store = RunStore(_runs_dir(args))
    fingerprints: set[str] | None = None
    if args.specs:
        planned = load_and_plan(args.specs, store)  # everything validates before any upload
        save_fresh(store, planned)
        fingerprints = {p.fingerprint for p in planned}
    report = push(store, remote, fingerprints)
    store.hashes.save()
    for line in report.lines():
        print(line)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download the remote's outputs (the specs' stages, or all) and memo items; with specs,
    restore their stages into the runs directory (then `spar plan` says fresh)."""
    from spar.store.remote import open_remote, pull, remote_url, restore_layout

    remote = open_remote(remote_url(args.remote))
    store = RunStore(_runs_dir(args))
    planned = load_and_plan(args.specs, store) if args.specs else None
    with store.lock(wait=args.lock_timeout):
        report = pull(store, remote, None if planned is None else {p.fingerprint for p in planned})
        if args.specs:
            report.restored = restore_layout(store, load_and_plan(args.specs, store))
        store.hashes.save()
    for line in report.lines():
        print(line)
    for warning in report.warnings:
        print(f"spar: warning: {warning}", file=sys.stderr)
    return 0


def cmd_apply_remote(args: argparse.Namespace) -> int:
    """`apply --remote URL`: pull what the specs need, apply, push what it made."""
    if not args.remote:
        return cmd_apply(args)
    cmd_pull(args)
    code = cmd_apply(args)
    cmd_push(args)  # also after items ended in error: what was paid for is shared
    return code


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


def cmd_stats(args: argparse.Namespace) -> int:
    from spar.judged_stats import format_stats, judged_stats, read_judged

    if not 0 < args.confidence < 1:
        raise InputError(f"--confidence: {args.confidence} is not between 0 and 1")
    files = [(path, read_judged(path)) for path in args.results]  # every file checked first
    entries = [
        e
        for path, rows in files
        for e in judged_stats(path, rows, args.generalize, args.confidence)
    ]
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        print(format_stats(entries, args.generalize, args.confidence))
    return 0


def cmd_export_inspect(args: argparse.Namespace) -> int:
    from spar.export_inspect import export, require_inspect

    require_inspect()
    store = RunStore(_runs_dir(args))
    specs = load_specs(args.specs)
    planned = load_and_plan(args.specs, store)  # a stale or missing report is refused
    for path in export(specs, planned, store, args.output, args.format):
        print(f"wrote {path}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from spar.schema import check_schema, schema_text, write_schema

    if args.check:
        problem = check_schema(args.file)
        if problem is not None:
            print(f"spar: {problem}", file=sys.stderr)
            return 1
        print(f"{args.file}: up to date")
    elif args.write:
        print(f"wrote {args.file}" if write_schema(args.file) else f"{args.file}: up to date")
    else:
        print(schema_text(), end="")
    return 0


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """Options that work before or after the subcommand (`spar -v apply x` = `spar apply x -v`)."""
    d: Any = None if top else argparse.SUPPRESS
    p.add_argument(
        "--debug", action="store_true", default=d or False, help="tracebacks, debug logs"
    )
    p.add_argument("-v", "--verbose", action="store_true", default=d or False, help="progress logs")
    p.add_argument(
        "--runs-dir", default=d, help="where outputs go (default ./runs, $SPAR_RUNS_DIR)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spar",
        description="Make the world match your experiment specs: build the dataset, fine-tune, "
        "sample, judge, report — running only what changed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p, top=False)
        return p

    def with_specs(p: argparse.ArgumentParser) -> None:
        p.add_argument("specs", nargs="+", type=Path, metavar="SPEC", help="experiment YAML")

    p = command("plan", "show what is fresh, stale or missing, and why (writes nothing)")
    with_specs(p)
    p.add_argument("--json", action="store_true", help="machine-readable rows")
    p.set_defaults(func=cmd_plan)
    p = command("apply", "run exactly the stages that are not fresh")
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
    p.add_argument(
        "--retry-invalid",
        action="store_true",
        help="ask the judge again for every verdict recorded as invalid",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"stages run at once when their upstream is done (default {DEFAULT_JOBS}); "
        "the local engine and local judges still run one heavy stage at a time",
    )
    p.add_argument(
        "--remote",
        metavar="URL",
        help="team cache (any fsspec URL, e.g. s3://bucket/prefix): pull before, push after",
    )
    p.set_defaults(func=cmd_apply_remote)
    p = command("show", "compare experiments: differing params + effects with CIs")
    with_specs(p)
    p.add_argument("--json", action="store_true", help="machine-readable rows")
    p.set_defaults(func=cmd_show)
    p = command("gc", "delete cached outputs that none of the given specs uses")
    with_specs(p)
    p.add_argument("--yes", action="store_true", help="really delete (default: a dry run)")
    p.set_defaults(func=cmd_gc)
    remote_help = "the remote cache: any fsspec URL (default $SPAR_REMOTE)"
    p = command("push", "upload run-cache outputs and memo items to the team's remote cache")
    p.add_argument("specs", nargs="*", type=Path, metavar="SPEC", help="only these (default: all)")
    p.add_argument("--remote", metavar="URL", help=remote_help)
    p.set_defaults(func=cmd_push)
    p = command("pull", "download outputs and memo items from the team's remote cache")
    p.add_argument(
        "specs", nargs="*", type=Path, metavar="SPEC", help="only these, and restore them"
    )
    p.add_argument("--remote", metavar="URL", help=remote_help)
    p.add_argument(
        "--lock-timeout",
        type=float,
        default=None,
        help="seconds to wait for an apply on the same runs dir (default: wait)",
    )
    p.set_defaults(func=cmd_pull)
    p = command("plot", "overlay judged.jsonl files in one chart by tier")
    p.add_argument("results", nargs="+", type=Path, metavar="JUDGED_JSONL")
    p.add_argument("--labels", nargs="+", help="one label per file (default: its directory)")
    p.add_argument("--output", type=Path, default=Path("comparison.png"))
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
    p = command("stats", "means with honest intervals per tier and model of judged.jsonl files")
    p.add_argument("results", nargs="+", type=Path, metavar="JUDGED_JSONL")
    p.add_argument("--json", action="store_true", help="machine-readable rows")
    p.add_argument(
        "--generalize",
        choices=("questions", "samples"),
        default="questions",
        help="the intervals' estimand (default: questions; see report.generalize)",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (0.95)")
    p.set_defaults(func=cmd_stats)
    p = command("export", "write experiments' results in another tool's format")
    formats = p.add_subparsers(dest="target", required=True, metavar="FORMAT")
    p = formats.add_parser(
        "inspect",
        help="an Inspect AI eval log per experiment (`inspect view` opens it)",
        description="an Inspect AI eval log per experiment (`inspect view` opens it)",
    )
    _common(p, top=False)
    with_specs(p)
    p.add_argument("--output", type=Path, help="directory (default: runs/<experiment>/export/)")
    p.add_argument("--format", choices=("eval", "json"), default="eval", help="log format")
    p.set_defaults(func=cmd_export_inspect)
    p = command("schema", "print the spec's JSON Schema (or write / check the repo's copy)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--write", action="store_true", help="write it to --file")
    how.add_argument("--check", action="store_true", help="exit 1 if --file is not up to date")
    p.add_argument(
        "--file",
        type=Path,
        default=Path("schema/spar-spec.schema.json"),
        help="the schema file (default: schema/spar-spec.schema.json)",
    )
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _load_dotenv()
        quiet.configure(verbose=args.verbose or args.debug)  # third parties' noise: only with -v
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
