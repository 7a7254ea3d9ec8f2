"""The ``flashoverlap`` command: ``info`` (what this machine can do) and ``tune``."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess

import click
import torch

from .availability import overlap_unavailable_reason


def _version(dist_names: tuple[str, ...], module: str | None = None) -> str:
    for name in dist_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if module:
        try:
            return str(getattr(importlib.import_module(module), "__version__", "installed"))
        except Exception:  # noqa: BLE001 - any import failure means "not usable"
            pass
    return "not installed"


def nccl_version() -> str:
    """NCCL as torch sees it, else the library flashoverlap would load, else why not."""
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # noqa: BLE001
            pass
    try:
        from .nccl_lib import get_nccl

        lib = get_nccl()
        return str(getattr(lib, "version_string", lambda: "loaded")())
    except Exception as exc:  # noqa: BLE001
        # Whole: the reason and the install hint are what the reader needs (was cut mid-word).
        return f"not loadable ({' '.join(str(exc).split())})"


def gpu_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["none visible to torch (CPU-only build or no driver)"]
    lines = []
    count = torch.cuda.device_count()
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                     f"{p.total_memory / 2**30:.0f} GiB")
    if count > 1:
        peers = [[("P2P" if i == j or torch.cuda.can_device_access_peer(i, j) else "-")
                  for j in range(count)] for i in range(count)]
        lines.append("peer access: " + " | ".join(" ".join(row) for row in peers))
    if shutil.which("nvidia-smi"):
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=10)
            if topo.returncode == 0:
                lines.append("links (nvidia-smi topo -m):")
                lines.extend("  " + line for line in topo.stdout.rstrip().splitlines())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return lines


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flashoverlap")
def main() -> None:
    """flashoverlap: overlap tensor-parallel GEMMs with their collectives."""


def _launch_path() -> str:
    """How the engine launches its kernels after the first call (host time per group)."""
    try:
        from flashoverlap.kernels import direct_launch
    except ImportError:
        return "none (Triton is not installed)"
    if direct_launch.ENABLED:
        return "direct (compiled kernels relaunched without the Triton JIT dispatch)"
    return ("through the Triton JIT (direct launches need Triton >= 3.4, no TRITON_INTERPRET, "
            "and FLASHOVERLAP_DIRECT_LAUNCH unset or 1)")


def _enqueue_path() -> str:
    """Which binding the engines' NCCL calls use (flashoverlap.nccl_enqueue), or why none."""
    try:
        from .nccl_enqueue import binding_status
        from .nccl_lib import get_nccl

        return binding_status(get_nccl())
    except Exception:  # noqa: BLE001 - no NCCL here (the NCCL row says why)
        return "none (NCCL not loadable)"


@main.command()
def info() -> None:
    """Versions, GPUs and links, and whether the overlap engine can run here."""
    rows = [
        ("flashoverlap", _version(("flashoverlap",))),
        ("torch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU)")),
        ("NCCL", nccl_version()),
        ("Triton", _version(("triton",))),
        ("CuPy", _version(("cupy-cuda13x", "cupy-cuda12x", "cupy"))),
        ("cuda-bindings", _version(("cuda-bindings", "cuda-python"))),
        ("nccl4py", _version(("nccl4py",))),
        ("mpi4py", _version(("mpi4py",))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    click.echo("GPUs:")
    for line in gpu_lines():
        click.echo(f"  {line}")
    click.echo(f"kernel launches: {_launch_path()}")
    click.echo(f"NCCL enqueue calls: {_enqueue_path()}")
    from . import settings

    for var in ("NCCL_P2P_DISABLE", "NCCL_NVLS_ENABLE", "NCCL_MAX_CTAS", *settings.ALL):
        if var in os.environ:
            click.echo(f"{var}={os.environ[var]}")
    reason = overlap_unavailable_reason()
    if reason is None:
        click.echo("overlap engine: available")
    else:
        click.echo(f"overlap engine: unavailable ({reason}); the reference engine is used")


def _mount_tune() -> None:
    try:
        from .tuning.cli import tune
    except ImportError:  # tuning not installed in this build
        return
    main.add_command(tune)


_mount_tune()


if __name__ == "__main__":
    main()
