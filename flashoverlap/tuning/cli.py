"""The ``tune`` command: measure, search and cache the plan of one problem; list the cache.

Role
----
``flashoverlap tune -M 8192 -N 8192 -K 2048 --op all_reduce`` under ``torchrun`` (or
``mpirun``) measures bandwidth curves and GEMM wave times on every rank, searches tiles x SM
reservations with the exact band-grouping DP, runs the top-k plans and the sequential baseline for
real, and stores the winner (with the never-slower decision) in the cache that the engine
reads.  ``--list`` prints the cache; ``--analytic`` prints what the analytic model would
choose, without a GPU.

Design
------
* Mounted by ``flashoverlap.cli`` (``main.add_command(tune)``); also runnable alone as
  ``python -m flashoverlap.tuning.cli``.
* ``--help``, ``--list`` and ``--analytic`` work on CPU: torch, torch.distributed and the
  engine are imported only when a real tuning run starts.
* The machine-specific half (collectives, signal GEMM, overlapped op, baseline) comes from a
  backend factory, ``--backend module:function`` (default
  ``flashoverlap.tuning.measure:engine_backend``), called as ``factory(problem, group)`` and
  returning a :class:`~flashoverlap.tuning.measure.TuningBackend`.  The search depends on
  that small interface only; the engine is imported when the backend is built.
* Every rank runs the same measurements (medians reduced with max over ranks), so every rank
  computes the same plan; rank 0 alone prints, shows the progress bar and writes the cache.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from flashoverlap import collectives
from flashoverlap.plan import Problem
from flashoverlap.tuning import cache
from flashoverlap.tuning.model import overlap_wins
from flashoverlap.tuning.search import (
    DEFAULT_RESERVATIONS,
    DEFAULT_TILE_CONFIGS,
    AnalyticModel,
    Candidate,
    analytic_search,
    engine_default,
    predict_gain,
    predict_times,
)
from flashoverlap.tuning.search import (
    tune as run_tuning,
)

DEFAULT_BACKEND = "flashoverlap.tuning.measure:engine_backend"
DTYPES = ("bfloat16", "float16", "float32")


def format_groups(group_bands: Sequence[int] | None) -> str:
    """Run-length form of a grouping in bands: ``(1, 1, 2, 2, 2) -> "1x2,2x3"``."""
    if group_bands is None:
        return "per-band"
    parts = []
    for size, run in itertools.groupby(group_bands):
        count = len(list(run))
        parts.append(f"{size}x{count}" if count > 1 else str(size))
    return ",".join(parts)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain, aligned text table."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ms(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds * 1e3:.3f}"


def _candidate_rows(top: Sequence[Candidate]) -> list[list[Any]]:
    rows = []
    for i, c in enumerate(top):
        err = c.prediction_error
        rows.append([i + 1, f"{c.config.block_m}x{c.config.block_n}", c.config.num_ctas,
                     c.reserved_sms, c.config.group_m, format_groups(c.config.group_bands),
                     _ms(c.predicted_s),
                     _ms(c.measured_s), None if err is None else f"{100 * err:.1f}%"])
    return rows


_CANDIDATE_HEADERS = ("#", "tile", "P", "r", "group_m", "bands/group", "pred ms", "meas ms",
                      "err")


def _parse_tiles(text: str) -> tuple[tuple[int, int], ...]:
    try:
        tiles = tuple(tuple(int(v) for v in t.lower().split("x")) for t in text.split(","))
    except ValueError:
        tiles = ((),)
    if any(len(t) != 2 for t in tiles):
        raise click.BadParameter(f"expected BMxBN[,BMxBN...], got {text!r}")
    return tiles  # type: ignore[return-value]


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.ClickException(
            f"cannot import the tuning backend module {module_name!r} ({exc}); the overlap "
            f"engine is needed to measure (use --analytic for a model-only answer)") from exc
    factory = getattr(module, attr or "engine_backend", None)
    if factory is None:
        raise click.ClickException(f"{module_name!r} has no tuning backend factory {attr!r}")
    return factory


def _merge(value: int | None, old: int | None, name: str) -> int | None:
    """``-M`` and the old ``--m`` spelling of the same option: one value."""
    if value is not None and old is not None and value != old:
        raise click.UsageError(f"-{name} {value} and --{name.lower()} {old} disagree")
    return value if value is not None else old


def _require_overlap_engine() -> None:
    """The default backend measures the overlap engine: say so before anything starts."""
    from flashoverlap.availability import overlap_unavailable_reason

    reason = overlap_unavailable_reason()
    if reason is not None:
        raise click.ClickException(
            f"cannot tune on this machine: {reason}. Tuning measures the overlap engine on "
            f"CUDA GPUs (one process per GPU under torchrun or mpirun); without a GPU, "
            f"--analytic prints the analytic model's choice and --list the cache.")


def _list_cache(directory: Path | None) -> None:
    entries = cache.list_entries(directory=directory)
    if not entries:
        click.echo(f"no tuned configs in {directory or cache.cache_dir()}")
        return
    rows = []
    for e in entries:
        k, c = e.key, e.config
        rows.append([k.gpu_name, k.world_size, k.op, k.dtype, k.M, k.N, k.K, k.interconnect,
                     f"{c.block_m}x{c.block_n}", c.num_ctas, c.group_m,
                     format_groups(c.group_bands),
                     f"{e.predicted_ms:.3f}",
                     None if e.measured_ms is None else f"{e.measured_ms:.3f}",
                     None if e.sequential_ms is None else f"{e.sequential_ms:.3f}",
                     "yes" if e.use_overlap else "no"])
    click.echo(format_table(
        ("gpu", "W", "op", "dtype", "M", "N", "K", "link", "tile", "P", "group_m",
         "bands/group", "pred ms", "meas ms", "seq ms", "overlap"), rows))


def _analytic(problem: Problem, num_sms: int, p2p: bool, tiles, reservations, top_k) -> None:
    model = AnalyticModel()
    result = analytic_search(problem, num_sms, p2p=p2p, model=model, tile_configs=tiles,
                             reservations=reservations, top_k=top_k)
    sequential = model.sequential_time(problem, num_sms, p2p=p2p)
    click.echo(f"analytic model, {num_sms} SMs, {'p2p' if p2p else 'no p2p'}: {problem}")
    click.echo(format_table(_CANDIDATE_HEADERS, _candidate_rows(result.top)))
    best = result.best.predicted_s
    choice = "overlap" if overlap_wins(best, sequential) else "sequential (overlap not faster)"
    click.echo(f"sequential (predicted): {sequential * 1e3:.3f} ms; best overlap "
               f"{sequential / best:.2f}x -> {choice}")
    # What the engine runs without a tuned entry (sm_90 kernel table, SMs - 16 CTAs)
    untuned = engine_default(problem, num_sms, p2p=p2p, model=model)
    overlap_s, _ = predict_times(problem, untuned, num_sms, p2p=p2p, model=model)
    # The engine's decision (policy.predicts_gain): two groups at least, then the model
    groups = len(untuned.group_bands or ())
    runs = ("overlap" if problem.world_size > 1 and groups >= 2 and predict_gain(
        problem, untuned, num_sms, p2p=p2p, model=model) else "sequential")
    click.echo(f"untuned engine default: tile {untuned.block_m}x{untuned.block_n}, "
               f"P {untuned.num_ctas}, group_m {untuned.group_m}, bands/group "
               f"{format_groups(untuned.group_bands)}, predicted {overlap_s * 1e3:.3f} ms "
               f"-> {runs}")


def _measure(problem: Problem, world_size: int | None, backend_spec: str, tiles,
             reservations, top_k: int, iters: int, store: bool, directory: Path | None,
             link: str | None) -> None:
    import torch.distributed as dist
    from tqdm import tqdm

    from flashoverlap.dist_utils import init_from_env

    factory = _load_factory(backend_spec)  # fail before starting any process group
    rank, world = init_from_env()
    if world_size is not None and world_size != world:
        raise click.ClickException(f"--world-size {world_size} but the launcher started "
                                   f"{world} ranks")
    try:
        problem = Problem(problem.M, problem.N, problem.K, problem.dtype, world, problem.op)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    backend = factory(problem, None)
    bars: list[Any] = []

    def progress(total: int):
        # Rank 0 only, and only on a terminal (disable=None): logs get no bar lines.
        bars.append(tqdm(total=total, desc="tune", disable=True if rank != 0 else None))
        return bars[-1].update

    try:
        result = run_tuning(problem, backend, tile_configs=tiles, reservations=reservations,
                            top_k=top_k, iters=iters, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if rank == 0:
        click.echo(format_table(_CANDIDATE_HEADERS, _candidate_rows(result.top)))
        best = result.best
        click.echo(f"sequential: {_ms(result.sequential_s)} ms; chosen: "
                   f"{'overlap' if result.use_overlap else 'sequential (overlap not faster)'}")
        if store:
            path = cache.store(
                cache.detect_key(problem, link=link), best.config,
                predicted_ms=best.predicted_s * 1e3,
                measured_ms=None if best.measured_s is None else best.measured_s * 1e3,
                sequential_ms=None if result.sequential_s is None else result.sequential_s * 1e3,
                use_overlap=result.use_overlap, directory=directory)
            click.echo(f"stored {path}")
    dist.barrier()
    dist.destroy_process_group()


class _CollectiveName(click.ParamType):
    """A registered collective's name, looked up when used: collectives registered after
    this module was imported (a user's own) are valid choices too."""

    name = "collective"

    def get_metavar(self, param, *args, **kwargs) -> str:  # click 8.1 and 8.2 signatures
        return "[" + "|".join(collectives.registered()) + "]"

    def convert(self, value, param, ctx):
        if value not in collectives.registered():
            self.fail(f"{value!r} is not a registered collective (one of "
                      f"{', '.join(collectives.registered())})", param, ctx)
        return value


@click.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
# -M/-N/-K (and --rows/--cols/--inner): torchrun parses every option-like argument, even
# after ``-m module``, and rejects --m and --n as ambiguous prefixes of its own options
# (--max-restarts, --nnodes, ...).  Upper-case short options clash with nothing; the old
# --m/--n/--k still work where nothing else parses them (hidden, merged below).
@click.option("-M", "--rows", "m", type=click.IntRange(min=1), help="M: rows of A and of the output.")
@click.option("-N", "--cols", "n", type=click.IntRange(min=1), help="N: columns of B and of the output.")
@click.option("-K", "--inner", "k", type=click.IntRange(min=1), help="K: inner dimension (per rank).")
@click.option("--m", "m_old", type=click.IntRange(min=1), hidden=True)
@click.option("--n", "n_old", type=click.IntRange(min=1), hidden=True)
@click.option("--k", "k_old", type=click.IntRange(min=1), hidden=True)
@click.option("--op", type=_CollectiveName(), default=collectives.ALL_REDUCE.name,
              show_default=True, help="Collective (a registered name).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Ranks (default: the launcher's; required with --analytic).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Candidates run for real after the model ranks them.")
@click.option("--tiles", default=",".join(f"{m}x{n}" for m, n in DEFAULT_TILE_CONFIGS),
              show_default=True, help="Tile shapes BMxBN to search.")
@click.option("--reservations", default=",".join(map(str, DEFAULT_RESERVATIONS)),
              show_default=True, help="SM counts left to NCCL to search.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed iterations per measurement (median).")
@click.option("--list", "list_", is_flag=True, help="Print the cached configs and exit.")
@click.option("--analytic", is_flag=True,
              help="Print the analytic model's choice (no GPU, nothing stored).")
@click.option("--num-sms", type=click.IntRange(min=1), default=132, show_default=True,
              help="SMs per GPU for --analytic.")
@click.option("--p2p/--no-p2p", default=True, show_default=True,
              help="Interconnect for --analytic (--no-p2p: NCCL_P2P_DISABLE=1 class).")
@click.option("--link", default=None, help="Interconnect name for the cache key "
              "(default: detected, nvlink or pcie).")
@click.option("--backend", "backend_spec", default=DEFAULT_BACKEND, show_default=True,
              help="module:function returning a TuningBackend for (problem, group).")
@click.option("--store/--no-store", default=True, show_default=True,
              help="Write the result to the cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache directory (default: $FLASHOVERLAP_CACHE/tuning or the user cache).")
def tune(m, n, k, m_old, n_old, k_old, op, dtype, world_size, top_k, tiles, reservations,
         iters, list_, analytic, num_sms, p2p, link, backend_spec, store, cache_dir) -> None:
    """Tune the overlap plan of one GEMM + collective and cache it.

    Run under torchrun or mpirun with one process per GPU, e.g.

    \b
        torchrun --nproc-per-node 4 -m flashoverlap.cli tune -M 8192 -N 8192 -K 2048
        mpirun -n 4 flashoverlap tune -M 8192 -N 8192 -K 2048

    Without a GPU: --analytic (the model's choice) and --list (the cache).
    """
    m, n, k = (_merge(new, old, name) for new, old, name in
               ((m, m_old, "M"), (n, n_old, "N"), (k, k_old, "K")))
    if list_:
        _list_cache(cache_dir)
        return
    if m is None or n is None or k is None:
        raise click.UsageError("-M, -N and -K are required (or use --list)")
    tile_configs = _parse_tiles(tiles)
    reserved = _parse_ints(reservations)
    if analytic:
        if world_size is None:
            raise click.UsageError("--analytic needs --world-size")
        try:
            problem = Problem(m, n, k, dtype, world_size, op)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        _analytic(problem, num_sms, p2p, tile_configs, reserved, top_k)
        return
    if backend_spec == DEFAULT_BACKEND:
        _require_overlap_engine()
    try:
        # The world size is checked again once the process group exists.
        problem = Problem(m, n, k, dtype, world_size or 1, op)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _measure(problem, world_size, backend_spec, tile_configs, reserved, top_k, iters, store,
             cache_dir, link)


main = tune

if __name__ == "__main__":
    main()
