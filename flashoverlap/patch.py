"""Patch an existing tensor-parallel model so its row-parallel linears use the overlapped ops.

:func:`patch_tensor_parallel` finds two kinds of row-parallel ``nn.Linear``:

* **DTensor** modules, as ``parallelize_module(..., RowwiseParallel())`` or transformers'
  ``tp_plan`` (5.x, ``"rowwise"``) leave them: weight a ``DTensor`` with placements
  ``(Shard(1),)`` on a 1-D mesh, bias (if any) ``Replicate()``.  Found automatically (or among
  the names ``pattern`` selects).
* **Local-shard** modules of plain models (weight already ``[N, K/W]``): only those whose name
  ``pattern`` selects.

Each gets an *instance* ``forward`` (the class's stays untouched); its Parameters, hooks and
everything else are kept, so optimizers, state dicts and checkpoints see the same objects.
:meth:`PatchResult.undo` (or :func:`unpatch_tensor_parallel`) removes the instance attribute,
or puts back one that was there, which restores the original behaviour exactly.

How a DTensor module keeps its contract.  ``RowwiseParallel`` wraps the module in two hooks:
a forward pre-hook that turns the input into a DTensor sharded on the last dim, and a forward
hook that redistributes the output (``Partial`` after a plain ``F.linear``) to the declared
``output_layouts`` (``Replicate()`` by default) and returns ``.to_local()`` when
``use_local_output`` (default) is set.  Both hooks stay.  The patched forward takes the
pre-hook's DTensor, computes on local tensors with the overlapped op, and returns a DTensor
that *already has* the declared layout, so the forward hook's redistribute is a no-op and only
its ``to_local`` (if any) remains:

* ``output_layouts=Replicate()`` -> GEMM + AllReduce, output ``Replicate()``.
* ``output_layouts=Shard(d)`` (sequence parallel) -> GEMM + ReduceScatter along ``d``
  (``d`` other than 0 costs a copy of the input that moves ``d`` first; ``Shard`` of the
  feature dim is handled as ``Replicate`` followed by the hook's local slice).
* ``Partial()`` -> skipped (nothing to reduce).

transformers' ``tp_plan`` (5.x) does not use hooks: its style's ``install_forward`` replaces
``module.forward`` with a closure that converts input and output around the class forward.
There the patched forward replaces that closure (``undo`` puts it back), takes the local
input shard (or a DTensor), and returns what the closure would: a plain tensor when the
style's ``use_local_output`` is set, else the DTensor.  Styles whose input is not sharded on
the last dim (``rowwise_split_input``) are skipped.

The declared output layout is read from the forward hook's ``functools.partial`` of
``RowwiseParallel._prepare_output_fn``.  If it cannot be found (another torch layout, a custom
style) the patched forward returns ``Replicate()``, which is correct for *any* declared layout
(the hook's redistribute from ``Replicate`` to ``Shard`` is a local slice); only the
ReduceScatter saving is lost.

Column-parallel linears (``colwise=True``; issue 16).  ``ColwiseParallel`` modules (weight
``(Shard(0),)`` on a 1-D mesh, bias ``Shard(0)``) whose declared input layout is
``Replicate()`` -- torch's hook-based style or transformers' ``"colwise"`` closure -- get a
forward that computes the local ``x @ w_r.T + b_r`` through
:func:`flashoverlap.column_parallel.column_parallel_linear`, whose backward runs the input
gradient as one overlapped GEMM + AllReduce (DTensor would reduce the ``Partial`` input
gradient after the GEMM); the output is the DTensor ``Shard(-1)`` the style's output hook
expects.  Sequence-parallel colwise modules (input ``Shard(d)``) are skipped with a reason:
their AllGather runs in the style's pre-hook, before the module, so it cannot overlap the
GEMM without replacing that hook -- use :class:`flashoverlap.ColumnParallelLinear` with
``sequence_parallel=True`` (``all_gather_gemm``) instead.

Rejected: removing RowwiseParallel's hooks and re-implementing their input/output conversions
(they are lambdas of private functions, version-dependent; keeping them keeps every layout
combination the user declared working); swapping modules for :class:`RowParallelLinear`
(breaks ``named_modules`` paths, hooks, and ``isinstance(m, nn.Linear)`` checks).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
import types
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from .dist_utils import resolve_group
from .nn import check_engine, row_parallel_linear
from .ops import EngineName

__all__ = ["PatchResult", "patch_tensor_parallel", "unpatch_tensor_parallel"]

_MARK = "_flashoverlap_patched"  # instance attribute on patched modules
_NO_FORWARD = object()  # the module had no instance-level forward before patching


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a patched forward needs besides the module: all static, all traceable."""

    group_name: str
    world_size: int
    scatter_dim: int | None  # None: AllReduce; d: ReduceScatter along output dim d
    engine: EngineName | None
    mesh: Any = None  # DeviceMesh for DTensor modules, None for local-shard modules
    out_placement: Any = None  # the output DTensor's placement (DTensor modules)
    local_output: bool = False  # return a plain tensor (the replaced forward did to_local)


@dataclasses.dataclass
class PatchResult:
    """What :func:`patch_tensor_parallel` changed; ``undo()`` puts it back.

    Attributes:
        patched: names (``model.named_modules()``) of the patched linears, in model order.
        skipped: name -> reason, for row-parallel DTensor linears left alone and for linears
            ``pattern`` selected that are not row-parallel (e.g. column-parallel ones).
    """

    patched: list[str]
    skipped: dict[str, str]
    _saved: list[tuple[nn.Module, Any]] = dataclasses.field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restore every patched module's original ``forward``; a second call does nothing."""
        for module, previous in reversed(self._saved):
            del module.__dict__["forward"]
            if previous is not _NO_FORWARD:
                module.forward = previous
            module.__dict__.pop(_MARK, None)
        self._saved.clear()

    def __len__(self) -> int:
        return len(self.patched)


def unpatch_tensor_parallel(result: PatchResult) -> None:
    """Same as ``result.undo()``."""
    result.undo()


def _local_forward(self: nn.Linear, x: Tensor, *, spec: _Spec) -> Tensor:
    return row_parallel_linear(x, self.weight, self.bias, spec.group_name, spec.world_size,
                               scatter_dim=spec.scatter_dim, engine=spec.engine)


def _dtensor_forward(self: nn.Linear, x: Tensor, *, spec: _Spec) -> Tensor:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(x, DTensor):
        last = x.dim() - 1
        placement = x.placements[0] if len(x.placements) == 1 else None
        if not (isinstance(placement, Shard) and placement.dim in (-1, last)):
            # The pre-hook only redistributes when the *declared* input layout differs from
            # Shard(-1); an input DTensor with another actual placement arrives as it is.
            x = x.redistribute(x.device_mesh, (Shard(last),))
        x = x.to_local()
    scatter_dim, placement = spec.scatter_dim, spec.out_placement
    if scatter_dim is not None and scatter_dim % x.dim() == x.dim() - 1:
        # Shard on the feature dim is no row scatter: all-reduce; the hook slices locally.
        scatter_dim, placement = None, Replicate()
    y = row_parallel_linear(x, self.weight.to_local(), None, spec.group_name, spec.world_size,
                            scatter_dim=scatter_dim, engine=spec.engine)
    if spec.local_output and self.bias is None:
        return y
    out = DTensor.from_local(y, spec.mesh, (placement,), run_check=False)
    if self.bias is not None:
        # Added as a DTensor: with a Shard(d) output each rank sees only its rows, and DTensor
        # turns the local bias gradients into the replicated sum the parameter needs.
        out = out + self.bias
    return out.to_local() if spec.local_output else out


def _declared_output_layout(module: nn.Module) -> Any:
    """The ``output_layouts[0]`` RowwiseParallel registered on ``module``, or None if unknown."""
    from torch.distributed.tensor.parallel.style import RowwiseParallel

    target = RowwiseParallel._prepare_output_fn
    for hook in module._forward_hooks.values():
        for cell in getattr(hook, "__closure__", None) or ():
            try:
                fn = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(fn, functools.partial) and fn.func is target and fn.args:
                return fn.args[0][0]
    return None


def _installed_style(forward: Any) -> Any:
    """The parallel style object whose closure is ``forward`` (transformers' tp_plan), or None."""
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            obj = cell.cell_contents
        except ValueError:
            continue
        if all(hasattr(obj, a) for a in ("input_layouts", "output_layouts", "use_local_output")):
            return obj
    return None


def _dtensor_spec(module: nn.Linear, engine: EngineName | None) -> _Spec | str:
    """The spec for a DTensor row-parallel linear, or why it is not one we can patch."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    weight, bias = module.weight, module.bias
    mesh = weight.device_mesh
    if bias is not None and not (isinstance(bias, DTensor) and tuple(bias.placements) == (Replicate(),)):
        return "bias is not a Replicate() DTensor"
    installed = module.__dict__.get("forward")
    if installed is None:  # torch's RowwiseParallel: hooks around the class forward
        layout, local_output = _declared_output_layout(module), False
    else:
        # transformers' tp_plan (5.x) replaces the forward with a closure over its style object
        # that converts the input and output itself; the patched forward takes over both.
        style = _installed_style(installed)
        if style is None:
            return "its forward was replaced by something other than a parallel style"
        inputs = style.input_layouts
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        if not (isinstance(inputs, Shard) and inputs.dim == -1):
            return f"input layout {inputs} (only inputs sharded on the last dim are supported)"
        layout = style.output_layouts
        layout = layout[0] if isinstance(layout, tuple) else layout
        local_output = bool(style.use_local_output)
    if isinstance(layout, Partial):
        return "output_layouts=Partial(): no reduction to overlap"
    group = mesh.get_group()
    if isinstance(layout, Shard):
        scatter_dim, out_placement = layout.dim, layout
    else:  # Replicate(), or unknown: Replicate is right for any declared layout (module doc)
        scatter_dim, out_placement = None, Replicate()
    return _Spec(group.group_name, mesh.size(), scatter_dim, engine, mesh, out_placement, local_output)


def _colwise_forward(self: nn.Linear, x: Tensor, *, spec: _Spec) -> Tensor:
    from torch.distributed.tensor import DTensor, Replicate

    from .column_parallel import column_parallel_linear

    if isinstance(x, DTensor):
        if tuple(x.placements) != (Replicate(),):
            x = x.redistribute(x.device_mesh, (Replicate(),))
        # the op's backward all-reduces the input gradient itself: hand it back replicated
        x = x.to_local(grad_placements=(Replicate(),))
    bias = self.bias.to_local() if self.bias is not None else None
    y = column_parallel_linear(x, self.weight.to_local(), bias, spec.group_name,
                               spec.world_size, engine=spec.engine)
    if spec.local_output:
        return y
    return DTensor.from_local(y, spec.mesh, (spec.out_placement,), run_check=False)


def _declared_colwise_layouts(module: nn.Module) -> tuple[Any, Any]:
    """``(input_layouts[0], output_layouts[0])`` ColwiseParallel registered on ``module``
    (None where not found)."""
    from torch.distributed.tensor.parallel.style import ColwiseParallel

    found = [None, None]
    for hooks, target, slot in ((module._forward_pre_hooks, ColwiseParallel._prepare_input_fn, 0),
                                (module._forward_hooks, ColwiseParallel._prepare_output_fn, 1)):
        for hook in hooks.values():
            for cell in getattr(hook, "__closure__", None) or ():
                try:
                    fn = cell.cell_contents
                except ValueError:
                    continue
                if isinstance(fn, functools.partial) and fn.func is target and fn.args:
                    layout = fn.args[0]
                    found[slot] = layout[0] if isinstance(layout, tuple) else layout
    return found[0], found[1]


def _colwise_spec(module: nn.Linear, engine: EngineName | None) -> _Spec | str:
    """The spec for a DTensor column-parallel linear, or why it is not patched."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    weight, bias = module.weight, module.bias
    mesh = weight.device_mesh
    if bias is not None and not (isinstance(bias, DTensor)
                                 and tuple(bias.placements) == (Shard(0),)):
        return "bias is not a Shard(0) DTensor"
    installed = module.__dict__.get("forward")
    if installed is None:  # torch's ColwiseParallel: hooks around the class forward
        inputs, output = _declared_colwise_layouts(module)
        local_output = False
    else:  # transformers' tp_plan closure
        style = _installed_style(installed)
        if style is None:
            return "its forward was replaced by something other than a parallel style"
        inputs = style.input_layouts
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        output = style.output_layouts
        output = output[0] if isinstance(output, tuple) else output
        local_output = bool(style.use_local_output)
        if local_output and not (isinstance(output, Shard) and output.dim == -1):
            return f"output layout {output} with a local output (only Shard(-1) is supported)"
    if inputs is not None and not isinstance(inputs, Replicate):
        return (f"input layout {inputs}: a sequence-parallel colwise linear all-gathers its "
                "input in the style's pre-hook, which cannot overlap the GEMM; use "
                "flashoverlap.ColumnParallelLinear(sequence_parallel=True)")
    placement = output if isinstance(output, Shard) and output.dim == -1 else Shard(-1)
    group = mesh.get_group()
    return _Spec(group.group_name, mesh.size(), None, engine, mesh, placement, local_output)


def _col_sharded(weight: Any) -> bool:
    """ColwiseParallel's weight layout: ``Shard(0)`` (the output features) on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    placements = tuple(weight.placements)
    return (weight.device_mesh.ndim == 1 and isinstance(placements[0], Shard)
            and placements[0].dim == 0)


def _is_dtensor(t: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _row_sharded(weight: Any) -> bool:
    """RowwiseParallel's weight layout: ``Shard(1)`` (the input features) on a 1-D mesh."""
    from torch.distributed.tensor import Shard

    placements = tuple(weight.placements)
    return (weight.device_mesh.ndim == 1 and isinstance(placements[0], Shard)
            and placements[0].dim in (1, -1))


def _matcher(pattern: str | re.Pattern[str] | None) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        return lambda name: pattern.search(name) is not None
    if isinstance(pattern, str):
        return lambda name: fnmatch.fnmatchcase(name, pattern)
    raise TypeError(f"pattern must be a glob str, a compiled re.Pattern or None, got {type(pattern).__name__}")


def patch_tensor_parallel(
    model: nn.Module,
    group: ProcessGroup | None = None,
    *,
    pattern: str | re.Pattern[str] | None = None,
    engine: EngineName | None = None,
    sequence_parallel: bool = False,
    colwise: bool = False,
) -> PatchResult:
    """Make ``model``'s row-parallel ``nn.Linear`` modules use the overlapped GEMM+collective.

    Args:
        model: a model parallelized with ``parallelize_module`` + ``RowwiseParallel``, or a
            plain model whose row-parallel linears hold local ``[N, K/W]`` shards.
        group: tensor-parallel group of the local-shard modules (default: the world).  DTensor
            modules use their device mesh's group.
        pattern: which modules to consider, by name: a ``str`` is a glob matched against the
            whole name (``fnmatch``; ``*`` also crosses dots, e.g. ``"*.o_proj"``), an
            ``re.Pattern`` is searched (``re.search``).  ``None``: every DTensor
            row-parallel linear.  Local-shard modules are patched only when named.
        engine: ``"overlap"``, ``"reference"``, ``"sequential"`` or ``None`` (best available).
        sequence_parallel: local-shard modules reduce-scatter along dim 0 (see
            :mod:`flashoverlap.nn`) instead of all-reducing.  DTensor modules follow their
            declared ``output_layouts`` instead.
        colwise: also patch DTensor column-parallel linears (``ColwiseParallel`` /
            transformers' ``"colwise"`` with a replicated input): their input gradient becomes
            an overlapped GEMM + AllReduce (module docstring).  Default off: such modules are
            left alone (and reported in ``skipped`` when ``pattern`` names them).

    Returns:
        A :class:`PatchResult` naming what was patched; ``result.undo()`` restores the model.

    Raises:
        ValueError: nothing to patch, or a selected module is already patched.  The model is
            unchanged when this raises.
    """
    check_engine(engine)
    matches = _matcher(pattern)
    local_spec: _Spec | None = None
    todo: list[tuple[str, nn.Module, Callable[..., Tensor]]] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (matches is not None and not matches(name)):
            continue
        if _MARK in module.__dict__:
            raise ValueError(f"module {name!r} is already patched; undo the earlier patch first")
        if _is_dtensor(module.weight):
            if colwise and _col_sharded(module.weight):
                spec = _colwise_spec(module, engine)
                if isinstance(spec, str):
                    skipped[name] = spec
                    continue
                todo.append((name, module, functools.partial(_colwise_forward, spec=spec)))
                continue
            if not _row_sharded(module.weight):  # e.g. ColwiseParallel: report only if named
                if matches is not None:
                    skipped[name] = (f"weight placements {tuple(module.weight.placements)} are "
                                     "not RowwiseParallel's (Shard(1),) on a 1-D mesh")
                continue
            spec = _dtensor_spec(module, engine)
            if isinstance(spec, str):
                skipped[name] = spec
                continue
            todo.append((name, module, functools.partial(_dtensor_forward, spec=spec)))
        elif matches is not None:
            if local_spec is None:
                resolved = resolve_group(group)
                local_spec = _Spec(resolved.group_name, dist.get_world_size(resolved),
                                   0 if sequence_parallel else None, engine)
            todo.append((name, module, functools.partial(_local_forward, spec=local_spec)))
    if not todo:
        hint = ("" if pattern is not None else
                "; for models whose linears hold local shards, name them with pattern=")
        raise ValueError(f"found no row-parallel nn.Linear to patch in {type(model).__name__}"
                         f"{hint}" + (f" (skipped: {skipped})" if skipped else ""))
    result = PatchResult(patched=[], skipped=skipped)
    for name, module, forward in todo:
        result._saved.append((module, module.__dict__.get("forward", _NO_FORWARD)))
        # A bound method (not a closure over the module) so copy.deepcopy(model) rebinds it.
        module.forward = types.MethodType(forward, module)
        module.__dict__[_MARK] = True
        result.patched.append(name)
    return result

