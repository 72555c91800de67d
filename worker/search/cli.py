"""Command line for researchers: run a search with no service.

    python -m worker.search run SPEC.json --out DIR [--stop-after N] [--resume] [--device cpu]

DIR gets spec.json (defaults filled in), metrics.jsonl (one epoch record a line, as it goes),
architecture.json (the derived cell, updated every epoch) and checkpoints/. A `dataset.path` in the spec
is read relative to the spec file. Exit status: 0 done, 1 the search failed, 2 a bad spec or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .spec import PRIMITIVES, JobSpec

USAGE_ERROR, SEARCH_ERROR = 2, 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.search", description="DARTS recurrent-cell search")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a search from a JSON spec")
    run.add_argument("spec", type=Path, help="the job spec (JSON), as POST /jobs takes it")
    run.add_argument("--out", type=Path, required=True, help="folder for metrics, architecture and checkpoints")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    run.add_argument(
        "--data-dir", type=Path, default=None, help="built-in corpora (default: $DARTS_DATA_DIR, else ../shared/data)"
    )
    run.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop cleanly after epoch N")
    run.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        raw = json.loads(args.spec.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.spec}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    if isinstance(raw, dict) and isinstance(raw.get("dataset"), dict) and "path" in raw["dataset"]:
        path = Path(str(raw["dataset"]["path"]))
        raw["dataset"] = {**raw["dataset"], "path": str(path if path.is_absolute() else args.spec.parent / path)}
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        print(f"error: {args.spec} is not a valid job spec:", file=sys.stderr)
        for err in exc.errors():
            where = ".".join(str(part) for part in err["loc"]) or "(spec)"
            print(f"  {where}: {err['msg']}", file=sys.stderr)
        return USAGE_ERROR
    if args.stop_after is not None and args.stop_after < 1:
        print("error: --stop-after needs an epoch number >= 1", file=sys.stderr)
        return USAGE_ERROR

    out: Path = args.out
    stored = out / "spec.json"
    if args.resume and stored.exists() and JobSpec.model_validate_json(stored.read_text()) != spec:
        print(f"error: {stored} holds a different spec; resume needs the same one", file=sys.stderr)
        return USAGE_ERROR
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(spec.model_dump_json(indent=2) + "\n")

    # torch is imported only once the spec is known to be good: a bad spec fails fast.
    from .checkpoint import CheckpointStore
    from .data import DataError, load_dataset
    from .engine import SearchDiverged, run_search

    data_dir = args.data_dir or Path(os.environ.get("DARTS_DATA_DIR") or "../shared/data")
    try:
        data = load_dataset(spec.dataset, spec.task, data_dir=data_dir)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return SEARCH_ERROR

    resume_from = None
    history: list[dict[str, Any]] = []
    if args.resume:
        found = CheckpointStore(out / "checkpoints", keep_last=spec.checkpoint.keep_last).latest_valid(args.device)
        if found is None:
            print("no usable checkpoint in --out; starting from the beginning", file=sys.stderr)
        else:
            info, resume_from = found
            history = json.loads(resume_from["history"])
            print(f"resuming after epoch {info.epoch} ({info.name})", file=sys.stderr)
    metrics = out / "metrics.jsonl"
    # The checkpoint's history is authoritative: epochs after it are run again and written again.
    metrics.write_text("".join(json.dumps(r) + "\n" for r in history))

    progress = _Progress(spec, disabled=args.quiet, done_epochs=len(history))

    def on_epoch(record: dict[str, Any]) -> None:
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        _write_architecture(out, record["genotype"], record["alpha"], record["epoch"], final=False)
        progress.epoch_done(record)

    def should_stop() -> bool:
        return args.stop_after is not None and progress.epochs_done >= args.stop_after

    try:
        result = run_search(
            spec,
            data=data,
            device=args.device,
            on_epoch=on_epoch,
            should_stop=should_stop,
            resume_from=resume_from,
            checkpoint_dir=out / "checkpoints",
            on_step=progress.step,
        )
    except (SearchDiverged, DataError) as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return SEARCH_ERROR
    progress.close()
    final = result.stop_reason != "cancelled"
    epoch = result.records[-1]["epoch"] if result.records else 0
    _write_architecture(out, result.genotype, result.alpha, epoch, final=final)
    if final:
        print(f"{result.stop_reason} after epoch {epoch}; best val_loss {result.best_val_loss}", file=sys.stderr)
    else:
        print(f"stopped after epoch {epoch}; continue with --resume", file=sys.stderr)
    print(json.dumps(result.genotype))
    return 0


def _write_architecture(
    out: Path, genotype: dict[str, Any], alpha: list[list[float]], epoch: int, *, final: bool
) -> None:
    body = {"genotype": genotype, "alpha": alpha, "primitives": list(PRIMITIVES), "epoch": epoch, "final": final}
    tmp = out / ".architecture.json.tmp"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(out / "architecture.json")


class _Progress:
    """A tqdm bar over all weight steps of the run, with the latest epoch's losses."""

    def __init__(self, spec: JobSpec, *, disabled: bool, done_epochs: int) -> None:
        from tqdm import tqdm

        self.epochs_done = done_epochs
        self.total_epochs = spec.search.epochs
        self.bar = tqdm(total=None, disable=disabled, unit="step", desc=f"epoch {done_epochs + 1}/{self.total_epochs}")

    def step(self, step: int, steps_per_epoch: int) -> None:
        if self.bar.total is None:
            self.bar.total = steps_per_epoch * self.total_epochs
            self.bar.n = steps_per_epoch * self.epochs_done
        self.bar.update(1)

    def epoch_done(self, record: dict[str, Any]) -> None:
        self.epochs_done = record["epoch"]
        self.bar.set_description(f"epoch {min(self.epochs_done + 1, self.total_epochs)}/{self.total_epochs}")
        self.bar.set_postfix(
            train=f"{record['train_loss']:.4g}", val=f"{record['val_loss']:.4g}", lr=f"{record['lr']:.3g}"
        )

    def close(self) -> None:
        self.bar.close()
