"""Which features protect which parameter: the Mamba-CL SSM plan and the Adam-NSCL every-layer plan.

A plan maps feature keys to (module, row extractor) pairs, read with forward hooks, and protected parameter
names to (feature key, side). ``side='right'`` projects a weight update as ``dW @ P`` (Linear/Conv weights,
flattened to [out, fan_in]); ``side='left'`` as ``P @ dA`` (A_log). See mambacl.md section 2.

SSM modules are found by their contract, not their class: a *branch* has ``x_proj_dt``, ``x_proj_B``,
``x_proj_C`` and the taps ``tap_x`` (x after conv+SiLU), ``tap_delta`` and ``tap_delta_x``, optionally
``A_log``; a *mixer* has ``out_proj`` and ``tap_out`` (the input of ``out_proj``). Each direction of a
bidirectional mixer is its own branch, so it is protected by its own features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Literal, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from mambacl.backbones.taps import Tap

Side = Literal["right", "left"]
# A row extractor returns the feature rows, or (compressed rows, number of rows they stand for).
RowFn = Callable[[nn.Module, tuple, torch.Tensor], Union[torch.Tensor, Tuple[torch.Tensor, int]]]
Hook = Callable[[nn.Module, tuple, torch.Tensor], None]
BRANCH_ATTRS = ("x_proj_dt", "x_proj_B", "x_proj_C", "tap_x", "tap_delta", "tap_delta_x")
PAPER_TRAINABLE = ("x_proj_dt", "x_proj_B", "x_proj_C", "A_log", "out_proj", "head")
WB_FEATURES = ("aggregated", "token")


def tap_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Rows of a tap's output: [..., D] -> [rows, D]."""
    return output.reshape(-1, output.shape[-1])


def _stash_output(stash: Dict[str, torch.Tensor], module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    stash["x"] = output


def delta_x_rows(stash: Dict[str, torch.Tensor], module: nn.Module, args: tuple,
                 delta: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """W_B feature rows ``F[b, i, :] = sum_t delta[b, t, i] x[b, t, :]`` from tap_delta and the stashed tap_x.

    ``F_b^T F_b = X_b^T (Delta_b Delta_b^T) X_b``; with ``Delta_b^T = Q R`` (reduced QR, R: [L, L]) the L rows
    ``R X_b`` have the same Gram matrix as the D rows of ``F_b``, at cost ``O(L^2 D)`` instead of ``O(D^3)``.
    They are used when L < D; otherwise F itself.

    Args:
        stash: holds ``"x"``, the tap_x output [b, L, D] of the same forward.
        delta: tap_delta output [b, L, D].

    Returns:
        (rows [b * min(L, D), D], b * D): the rows and the number of F rows they stand for.
    """
    x = stash.pop("x")
    b, length, width = delta.shape
    if length >= width:
        return torch.einsum("bti,btj->bij", delta.double(), x.double()).reshape(-1, width), b * width
    r = torch.linalg.qr(delta.double().transpose(1, 2), mode="r").R  # [b, L, L], R^T R = Delta Delta^T
    return (r @ x.double()).reshape(-1, width), b * width


def linear_input_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Input rows of an nn.Linear: [..., in_features] -> [rows, in_features]."""
    return args[0].reshape(-1, args[0].shape[-1])


def conv_input_rows(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """im2col patches of a zero-padded, ungrouped Conv1d/Conv2d input: [rows, C_in * prod(kernel)]."""
    x = args[0]
    k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
    if isinstance(module, nn.Conv1d):
        x, k, s, p, d = x.unsqueeze(2), (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
    cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s)  # [b, C*kh*kw, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class ProtectionPlan:
    """Feature sources and protected parameters of one model.

    Attributes:
        sources: {feature key: (module to hook, row extractor)}.
        params: {parameter name: (feature key, side)}.
        aux: extra forward hooks needed while collecting (e.g. stashing tap_x for ``delta_x_rows``).
    """

    sources: Dict[str, Tuple[nn.Module, RowFn]] = field(default_factory=dict)
    params: Dict[str, Tuple[str, Side]] = field(default_factory=dict)
    aux: List[Tuple[nn.Module, Hook]] = field(default_factory=list)

    def protect(self, param: str, key: str, module: nn.Module, rows: RowFn, side: Side = "right") -> None:
        """Protect ``param`` by the features ``rows(module, args, output)`` read from ``module``'s forward hook."""
        self.sources[key] = (module, rows)
        self.params[param] = (key, side)


def _components(name: str) -> set:
    return set(name.split("."))


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return bool(_components(name) & set(exclude))


def ssm_plan(model: nn.Module, wb_features: str = "aggregated", exclude: Sequence[str] = ()) -> ProtectionPlan:
    """Mamba-CL plan: W_dt, W_C by the tokens x_t; W_B by sum_t delta_t x_t (or x_t if ``wb_features='token'``);
    A_log by delta (left side); out_proj by its input.

    Args:
        model: any module containing SSM branches/mixers with the tap contract (module docstring).
        wb_features: 'aggregated' (the paper's F = sum_t delta x^T rows) or 'token' (exact B_t, less plastic).
        exclude: module-name components whose branches/mixers are not protected.

    Returns:
        The plan. Raises ValueError if the model exposes no SSM branch.
    """
    if wb_features not in WB_FEATURES:
        raise ValueError(f"wb_features must be one of {WB_FEATURES}, got {wb_features!r}")
    plan = ProtectionPlan()
    for name, mod in model.named_modules():
        if _excluded(name, exclude):
            continue
        pre = f"{name}." if name else ""
        if all(isinstance(getattr(mod, a, None), nn.Module) for a in BRANCH_ATTRS):
            for proj in ("x_proj_dt", "x_proj_C") + (("x_proj_B",) if wb_features == "token" else ()):
                plan.protect(f"{pre}{proj}.weight", f"{pre}tap_x", mod.tap_x, tap_rows)
            if wb_features == "aggregated":
                stash: Dict[str, torch.Tensor] = {}
                plan.aux.append((mod.tap_x, partial(_stash_output, stash)))
                plan.protect(f"{pre}x_proj_B.weight", f"{pre}tap_delta_x", mod.tap_delta,
                             partial(delta_x_rows, stash))
            if isinstance(getattr(mod, "A_log", None), nn.Parameter):
                plan.protect(f"{pre}A_log", f"{pre}tap_delta", mod.tap_delta, tap_rows, side="left")
        if isinstance(getattr(mod, "tap_out", None), Tap) and isinstance(getattr(mod, "out_proj", None), nn.Linear):
            plan.protect(f"{pre}out_proj.weight", f"{pre}tap_out", mod.tap_out, tap_rows)
    if not any(key.endswith("tap_x") for key in plan.sources):
        raise ValueError("model exposes no SSM branch with taps (x_proj_dt/x_proj_B/x_proj_C, tap_x, tap_delta, "
                         "tap_delta_x); NullSpacePlugin(protect='ssm') needs a mambacl SSM backbone")
    return plan


def layer_plan(model: nn.Module, exclude: Sequence[str] = ("head",)) -> ProtectionPlan:
    """Adam-NSCL plan: every nn.Linear and ungrouped, zero-padded Conv1d/Conv2d weight by its input (im2col
    patches for convolutions). Grouped/depthwise convolutions are not protected (leave them frozen).

    Args:
        model: any module.
        exclude: module-name components not protected (default the classifier ``head``).

    Returns:
        The plan. Raises ValueError if no layer qualifies.
    """
    plan = ProtectionPlan()
    for name, mod in model.named_modules():
        if not name or _excluded(name, exclude):
            continue
        if isinstance(mod, nn.Linear):
            plan.protect(f"{name}.weight", name, mod, linear_input_rows)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1 and mod.padding_mode == "zeros" \
                and not isinstance(mod.padding, str):
            plan.protect(f"{name}.weight", name, mod, conv_input_rows)
    if not plan.params:
        raise ValueError("model has no Linear or ungrouped Conv layer to protect (protect='layers')")
    return plan


def match_kinds(names: Sequence[str], kinds: Sequence[str], what: str, extra: Sequence[str] = ()) -> set:
    """Names having a dotted component equal to one of ``kinds``; every kind must match something.

    Args:
        names: parameter (or module) names.
        kinds: components to match, e.g. ``("x_proj_dt", "head")``; entries of ``extra`` are accepted unmatched.
        what: argument name used in the error message.

    Returns:
        The matching names.
    """
    if isinstance(kinds, str):
        raise TypeError(f"{what} must be a sequence of names, got the string {kinds!r}")
    matched = set()
    for kind in kinds:
        hits = {n for n in names if kind in _components(n)}
        if not hits and kind not in extra:
            raise ValueError(f"{what} entry {kind!r} matches no name of the model "
                             f"(entries are name components such as 'x_proj_dt', 'A_log', 'out_proj', 'head')")
        matched |= hits
    return matched
