"""Seconds per search step and peak memory: the engine's fused cell versus the literal reference cell.

One search step is one `Search.train_epoch` step: an architect step on alpha (first or second order, on a
validation batch) plus a weight step (grads over the weights, clip_grad_norm_, optimizer.step). The script
drives the real engine (`Search.train_epoch`) and only switches `model.cell_impl` between "fused" and
"reference"; every timed step starts from the same saved search state. Each (size, order, impl) runs in
its own subprocess so that its peak RSS is its own. Other work on the machine skews the times: the
table's last column shows how many cores the benchmark and everything else kept busy.

    PYTHONPATH=. .venv/bin/python bench/search_step.py                      # everything (~12 min on 2 cores)
    PYTHONPATH=. .venv/bin/python bench/search_step.py --sizes small --orders first --repeats 3

PTB is read from $DARTS_DATA_DIR/ptb, else from ../shared/data/ptb next to the repository.
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/search_step.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(REPO))

from worker.search.data import Corpus, load_corpus  # noqa: E402
from worker.search.engine import Search, SearchDiverged  # noqa: E402
from worker.search.spec import JobSpec  # noqa: E402

MIB = 1024 * 1024
IMPLS = ("fused", "reference")
ORDERS = ("first", "second")


@dataclass(frozen=True)
class Size:
    emsize: int  # = nhid: the language model ties its decoder to the embedding
    steps: int
    batch: int
    bptt: int
    repeats: int  # timed steps when --repeats is not given


SIZES: dict[str, Size] = {
    "small": Size(emsize=64, steps=8, batch=32, bptt=35, repeats=10),
    "paper": Size(emsize=300, steps=8, batch=256, bptt=35, repeats=3),
}
# Only for the numerical check: small enough that float64 and the reference cell are cheap.
TINY = Size(emsize=8, steps=3, batch=4, bptt=5, repeats=0)


@dataclass
class Measurement:
    size: str
    order: str
    impl: str
    times: list[float]  # seconds of each timed step
    peak_rss_mib: float  # peak RSS during the steps minus the RSS just before them
    saved_mib: float  # peak bytes autograd held for backward during one step
    hwm_reset: bool  # whether the kernel let us reset the RSS high-water mark after setup
    diverged: bool  # the step's training loss was not finite (its time still counts)
    cores_busy: float  # this process's CPU seconds per wall second over the timed steps
    cores_others: float  # the same for everything else on the machine (from /proc/stat): contention

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def data_dir() -> Path:
    return Path(os.environ.get("DARTS_DATA_DIR") or REPO.parent / "shared" / "data")


def make_spec(size: Size, order: str, batches: int) -> JobSpec:
    """A language_model spec at `size`; dropouts, optimizer and the rest stay at the task's defaults."""
    return JobSpec.model_validate(
        {
            "task": "language_model",
            "dataset": {"builtin": "ptb"},
            "model": {"emsize": size.emsize, "nhid": size.emsize, "steps": size.steps},
            "search": {
                "epochs": 1,
                "batch_size": size.batch,
                "bptt": size.bptt,
                "order": order,
                "batches_per_epoch": batches,
            },
        }
    )


# --- memory probes ---------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM) in KiB; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_kib() -> int:
    rss = _status_kib("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    """The process's peak RSS. VmHWM rather than ru_maxrss: on Linux ru_maxrss also keeps the peak of the
    memory the process had before exec (the parent's, through fork), and clear_refs does not reset it."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0) so the peak excludes transient setup peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class SavedTensorBytes:
    """Peak bytes of the tensors autograd keeps for backward, counting each storage once.

    Views of one storage (slices of a state buffer, say) share memory, so the figure is by storage. A
    storage counts from the first pack until the graph releases its last saved reference to it, which is
    what the memory held for backward really is; the step's several graphs (architect, weights) are
    therefore not summed but overlap only as long as they are alive together.
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage pointer -> [references held by graphs, nbytes]
        self.bytes = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> _Held:
        return _Held(self, t)

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    @contextmanager
    def watch(self) -> Iterator[SavedTensorBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


class _Held:
    """What the graph stores instead of a tensor; its deletion tells us the graph let go of it."""

    def __init__(self, owner: SavedTensorBytes, t: torch.Tensor) -> None:
        self.owner, self.tensor = owner, t
        storage = t.untyped_storage()
        self.key = storage.data_ptr()
        entry = owner.live.setdefault(self.key, [0, storage.nbytes()])
        if entry[0] == 0:
            owner.bytes += entry[1]
            owner.peak = max(owner.peak, owner.bytes)
        entry[0] += 1

    def __del__(self) -> None:
        entry = self.owner.live[self.key]
        entry[0] -= 1
        if entry[0] == 0:
            self.owner.bytes -= entry[1]
            del self.owner.live[self.key]


# --- one configuration, in a subprocess ------------------------------------------------------------


def measure(size_name: str, order: str, impl: str, warmup: int, repeats: int) -> Measurement:
    """Warm up, time `repeats` search steps, then one more step under the saved-tensor probe.

    Every step starts from the same saved state (weights, alpha, optimizers, RNG) and reads the same
    batches, so both implementations time exactly the same computation, and a search that would drift
    to NaN over many steps at these settings cannot make later steps unrepresentative.
    """
    size = SIZES[size_name]
    corpus = load_corpus(data_dir() / "ptb")
    search = Search(make_spec(size, order, 1), corpus, torch.device("cpu"))
    search.model.cell_impl = impl
    del corpus  # the batches hold their own copies
    start = copy.deepcopy(search.state_dict())  # a deep copy: state_dict shares the live tensors
    diverged = False

    def step() -> float:
        """One Search.train_epoch step (should_stop is asked only after the first); returns its seconds."""
        nonlocal diverged
        search.load_state_dict(start)
        began = time.perf_counter()
        try:
            search.train_epoch(lambda: True, None)
        except SearchDiverged:  # raised after the step's work, which is what is being timed
            diverged = True
        return time.perf_counter() - began

    gc.collect()
    hwm_reset = reset_peak_rss()
    baseline_kib = current_rss_kib()
    for _ in range(warmup):
        step()
    cpu_before, machine_before, wall_before = _cpu_seconds(), _machine_cpu_seconds(), time.perf_counter()
    times = [step() for _ in range(repeats)]
    wall = time.perf_counter() - wall_before
    cores_busy = (_cpu_seconds() - cpu_before) / wall
    cores_others = max(0.0, (_machine_cpu_seconds() - machine_before) / wall - cores_busy)
    probe = SavedTensorBytes()
    with probe.watch():
        step()
    peak_kib = peak_rss_kib()
    return Measurement(
        size=size_name,
        order=order,
        impl=impl,
        times=times,
        peak_rss_mib=(peak_kib - baseline_kib) / 1024,
        saved_mib=probe.peak / MIB,
        hwm_reset=hwm_reset,
        diverged=diverged,
        cores_busy=cores_busy,
        cores_others=cores_others,
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait); 0 without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_child(size: str, order: str, impl: str, warmup: int, repeats: int) -> Measurement:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", size, order, impl]
    cmd += ["--warmup", str(warmup), "--repeats", str(repeats)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    line = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("RESULT "))
    return Measurement(**json.loads(line[len("RESULT ") :]))


# --- numerical check -------------------------------------------------------------------------------


@dataclass
class CheckRow:
    label: str
    loss_diff: float
    max_abs: float  # largest |fused - reference| over the gradients of all weights and alpha
    max_rel: float  # the same, per tensor divided by the tensor's largest |reference| entry
    ok: bool


def check_equivalence(corpus: Corpus, label: str, size: Size, dtype: torch.dtype, train: bool) -> CheckRow:
    """Same weights, alpha, buffers, batch and dropout masks: compare the loss, the gradients of all
    parameters (weights and alpha) and the buffers after the pass (the cell's running statistics)."""
    search = Search(make_spec(size, "first", 1), corpus, torch.device("cpu"))
    model = search.model.to(dtype)
    params = [p for _, p in model.named_parameters()]
    x, y = search.batches.train_batch(0)
    hidden = model.init_hidden(size.batch)
    # Running statistics as after some training: eval mode normalises with them, and with their initial
    # values (mean 0, var 1) the summed node states of an untrained cell grow geometrically.
    with torch.no_grad():
        model.train()
        model.loss(x, y, hidden)
    model.train(train)
    buffers = [b.detach().clone() for b in model.buffers()]
    masks = model.gen.get_state() if model.gen is not None else None
    results: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for impl in ("reference", "fused"):
        model.cell_impl = impl
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)  # the reference pass updated them in train mode
        if masks is not None and model.gen is not None:
            model.gen.set_state(masks)  # identical dropout masks for both implementations
        loss, _ = model.loss(x, y, hidden)
        grads = torch.autograd.grad(loss, params)
        results[impl] = (loss.detach(), [*grads, *(b.detach().clone() for b in model.buffers())])
    (ref_loss, ref_values), (loss, values) = results["reference"], results["fused"]
    abs_diffs = [float((v - r).abs().max()) for v, r in zip(values, ref_values, strict=True)]
    rel_diffs = [d / max(float(r.abs().max()), 1e-30) for d, r in zip(abs_diffs, ref_values, strict=True)]
    loss_diff = float((loss - ref_loss).abs())
    if dtype == torch.float64:
        ok = max([loss_diff, *abs_diffs]) < 1e-6
    else:
        ok = max(rel_diffs) < 1e-4 and loss_diff / float(ref_loss.abs()) < 1e-4
    return CheckRow(label, loss_diff, max(abs_diffs), max(rel_diffs), ok)


def numerical_check() -> list[CheckRow]:
    corpus = load_corpus(data_dir() / "ptb")
    rows = []
    for name, size in (("tiny", TINY), ("small", SIZES["small"])):
        for dtype in (torch.float64, torch.float32):
            for train in (False, True):
                mode = "train (same dropout masks)" if train else "eval (no dropout)"
                label = f"{name}, {str(dtype).removeprefix('torch.')}, {mode}"
                rows.append(check_equivalence(corpus, label, size, dtype, train))
    return rows


# --- report ----------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model}, {cores} cores available, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def command_line() -> str:
    env = [
        f"{k}={shlex.quote(os.environ[k])}"
        for k in ("PYTHONPATH", "DARTS_DATA_DIR", "OMP_NUM_THREADS")
        if k in os.environ
    ]
    return " ".join([*env, shlex.join(sys.orig_argv)])


def table(results: list[Measurement]) -> str:
    lines = [
        "| size | order | impl | s/step (median) | s/step (min) | peak RSS MiB | saved for backward MiB "
        "| cores: ours / others |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(m.size, m.order, m.impl): m for m in results}
    for m in results:
        impl = m.impl + (" (loss NaN)" if m.diverged else "")
        lines.append(
            f"| {m.size} | {m.order} | {impl} | {m.median:.3f} | {min(m.times):.3f} | "
            f"{m.peak_rss_mib:.0f} | {m.saved_mib:.0f} | {m.cores_busy:.2f} / {m.cores_others:.2f} |"
        )
        ref = by_key.get((m.size, m.order, "reference"))
        fused = by_key.get((m.size, m.order, "fused"))
        if m.impl == "reference" and fused is not None and ref is not None:
            lines.append(
                f"| {m.size} | {m.order} | **fused / reference** | **{fused.median / ref.median:.2f}** "
                f"(**{ref.median / fused.median:.2f}x faster**) | {min(fused.times) / min(ref.times):.2f} | "
                f"**{fused.peak_rss_mib / ref.peak_rss_mib:.2f}** | **{fused.saved_mib / ref.saved_mib:.2f}** | |"
            )
    return "\n".join(lines)


def targets(results: list[Measurement]) -> list[str]:
    """The goals the fused cell was written for, each stated as met or not."""
    by_key = {(m.size, m.order, m.impl): m for m in results}
    out = []
    for (size, order, impl), fused in by_key.items():
        ref = by_key.get((size, order, "reference"))
        if impl != "fused" or ref is None:
            continue
        t, mem = fused.median / ref.median, fused.peak_rss_mib / ref.peak_rss_mib
        if size == "paper" and order == "first":
            out.append(f"- paper, first order: time {t:.2f} of reference (target <= 0.75: {_met(t <= 0.75)}), ")
            out[-1] += f"peak RSS {mem:.2f} of reference (target <= 0.33: {_met(mem <= 1 / 3)}; "
            out[-1] += f"saved for backward {fused.saved_mib / ref.saved_mib:.2f})"
        if size == "small":
            out.append(f"- small, {order} order: {1 / t:.2f}x faster (target >= 3x: {_met(1 / t >= 3)})")
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, help="timed steps per configuration (default: 10 small, 3 paper)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--skip-check", action="store_true", help="skip the fused-vs-reference numerical check")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "ORDER", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        size, order, impl = args.child
        result = measure(size, order, impl, args.warmup, args.repeats or SIZES[size].repeats)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return

    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # keep the table and stderr's progress lines in order
    print(f"Machine: {machine()}")
    print(f"Command: `{command_line()}`")
    print(f"Data: {data_dir() / 'ptb'}\n", flush=True)

    if not args.skip_check:
        print("Numerical check, fused vs reference (loss; gradients of all weights and alpha; running statistics):\n")
        print("| case | abs diff of loss | max abs diff (grads, stats) | max rel diff (grads, stats) | ok |")
        print("| --- | ---: | ---: | ---: | --- |")
        rows = numerical_check()
        for r in rows:
            print(f"| {r.label} | {r.loss_diff:.1e} | {r.max_abs:.1e} | {r.max_rel:.1e} | {'yes' if r.ok else 'NO'} |")
        print(flush=True)
        bad = [r.label for r in rows if not r.ok]
        if bad:
            sys.exit(f"fused and reference disagree: {bad}")

    started = time.perf_counter()
    results = []
    for size in args.sizes:
        for order in args.orders:
            for impl in args.impls:
                repeats = args.repeats or SIZES[size].repeats
                m = run_child(size, order, impl, args.warmup, repeats)
                results.append(m)
                if m.diverged:
                    print(f"warning: {size} {order} {impl}: the step's loss was not finite", file=sys.stderr)
                if not m.hwm_reset:
                    print("warning: could not reset the RSS high-water mark; setup peaks may hide", file=sys.stderr)
                print(
                    f"# {size} {order} {impl}: median {m.median:.3f} s/step over {repeats} steps, "
                    f"peak RSS +{m.peak_rss_mib:.0f} MiB, saved {m.saved_mib:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    warmup = args.warmup
    print(f"Search step timings ({warmup} warm-up step(s), then median and min of the timed steps):\n")
    print(table(results))
    lines = targets(results)
    if lines:
        print("\nTargets:\n")
        print("\n".join(lines))
    print(f"\nBenchmark wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
