"""De-focus Mamba: the causal Mamba vision backbone that Mamba-CL builds on, in timm conventions.

Paper: "Learning 1D Causal Visual Representation with De-focus Attention Networks", Tao et al., arXiv 2406.04342.
Origin: OpenGVLab/De-focus-Attention-Networks ``classification/models/``, as vendored and used by Mamba-CL
(zugexiaodui/mamba-cl, commit 0ebac10). Facts, as read in zugexiaodui/mamba-cl:

- Model: ``utils/config.py:321-328`` builds ``defocus_mamba_large`` with ``utils/defocus_mamba_large_22k.yaml``:
  patch 16, width 1024, depth 48 (``utils/defocus_attention_network.py:294-298``, yaml:4), 192 px (yaml:27),
  so 144 patches + 1 cls token = 145 tokens. timm ``PatchEmbed`` (``defocus_attention_network.py:76-77``,
  ``patch_embed_change_res`` False, ``config.py:76``). No absolute position embedding (``use_pos_embed``
  False, ``config.py:69``; yaml leaves it); positions enter only through RoPE.
- cls token appended after the patches (``defocus_attention_network.py:214-216``); the head reads token -1
  (l. 232; ``head_type`` IN1k_cls, yaml:9, no aux loss, yaml:10). Final norm: LayerNorm eps 1e-6 (l. 109, 298).
- Block (``utils/mamba_block.py:243-264``): ``x + mixer(RMSNorm(x))``, RMSNorm eps 1e-5 (``config.py:97``),
  fp32 residual (``config.py:96``); drop path ``linspace(0, rate, depth)[i]`` on block i's output
  (``defocus_attention_network.py:221-224``), rate 0 (yaml:6). VisionMamba's add-norm layout gives the same.
- Mixer (``mamba_block.py:60-223``): d_inner 2048 (yaml:13), N 16 (``config.py:84``), dt_rank 48 (``config.py:87``,
  not ceil(1024/16) = 64), conv 4 with bias (yaml:14, ``config.py:93``), in_proj/out_proj without bias
  (``config.py:95``). Unidirectional. ``x, z = in_proj(u)``; ``x = silu(conv1d(x))`` (l. 184-195);
  ``[dt_low, B, C] = x_proj(x)``; RoPE on B and C over the token index (l. 139-142, 203-220):
  ``theta[t, n] = t / rope_scale_factor * freq[n]``, ``freq[n] = (100^(-n/N) - 1/100) / (1 - 1/100)``,
  n = 1..N, a frozen Parameter (l. 105-107), rotation of pairs (2k, 2k+1) with each element's own angle;
  ``delta = softplus(W_dt dt_low + b_dt) / delta_scale_factor`` (l. 144-150), scan with D, z and delta_bias
  None and ``delta_softplus=False`` (l. 156-167); ``y = GroupRMS_64(y)`` (eps 1e-6, no weight, yaml:15,
  l. 172-175); ``out_proj((y + D x) * silu(z))`` (l. 177-199).
- Scale factors: ``delta_scale_factor`` and ``rope_scale_factor`` are 1.0 in Mamba-CL (``config.py:103-104``;
  its yaml does not set them). OpenGVLab's 384-px fine-tuning sets 2.0 and 4.0; both are options here.
- Init (``defocus_attention_network.py:129-188``): trunc-normal(0.02) cls token and every Linear weight, zero
  Linear biases; dt_proj weight U(+-dt_rank^-0.5); dt_proj bias = softplus^-1(dt) with dt =
  exp(linspace(log 1e-3, log 0.1, d_inner)) (deterministic, not random) clamped >= 1e-4 (``config.py:88-92``);
  A_log S4D-real, D ones; no out_proj rescaling (``rescale_prenorm_residual`` False, ``config.py:99``).
- Mamba-CL trains x_proj (split into step/B/C by ``split_parameters``, ``mamba_block.py:115-129``), A_log,
  out_proj.weight and the head (``train_eval.py:99``); it loads ``ckpt['model']`` non-strictly
  (``train_eval.py:697-703``). Its taps (``mamba_block.py:131-154, 199``) are this package's ``tap_x`` (x after
  conv+SiLU), ``tap_delta`` (delta after the scale factor), ``tap_delta_x`` (delta x^T) and ``tap_out`` (the
  gated, group-normalised out_proj input).

Checkpoint layout (``defocus_mamba_large_cls_21k.pth``, OpenGVLab release v1.0): ``{'model': state_dict, ...}``
with ``patch_embed.proj.*``, ``cls_token``, ``blocks.{i}.norm.weight``, ``blocks.{i}.mixer.`` + {``in_proj.weight``,
``conv1d.*``, ``x_proj.weight``, ``dt_proj.*``, ``A_log``, ``D``, ``out_proj.weight``, ``freq``}, ``norm.*`` and
the 21k pretraining heads ``head.{0,2}.*`` / ``head2.{0,2}.*`` (Linear-Tanh-Linear, IN22k_cls with aux loss in
OpenGVLab's 22k config). The heads do not fit the linear head and are replaced by the model's own, as in
Mamba-CL, which replaces the head per task. Load with ``timm.create_model("defocus_mamba_large_patch16_192",
pretrained_file=PATH)``.

Deviations: none in the computation. The model is the Vim class with options (native key names ``layers`` /
``norm_f``; the loader renames). Weight-only loading refuses files that pickle other objects (e.g. a yacs
config); re-save ``{'model': ckpt['model']}`` then.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import apply_rot_embed, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from ..kernels import selective_scan
from .checkpoint import build_with_checkpoint, filter_state_dict, register_checkpoint_filter, split_x_proj
from .mamba import MambaBranch, SSMMixer, _at_least_fp32, register_mixer
from .vim import VisionMamba, _cfg

__all__ = ["DefocusMamba"]


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class DefocusBranch(MambaBranch):
    """The De-focus Mamba scan direction: RoPE on B and C, scaled step without softplus in the scan, group RMS norm.

    Args (beyond :class:`~mambacl.backbones.MambaBranch`):
        group_size: channels per group of the RMS norm on the scan output (must divide d_inner).
        delta_scale_factor: the step is ``softplus(dt + b) / delta_scale_factor``.
        rope_scale_factor: RoPE position of token t is ``t / rope_scale_factor``.

    ``tap_delta`` shows the step after the scale factor, the tensor the scan receives.
    """

    def __init__(self, d_inner: int, d_state: int = 16, dt_rank: int = 1, d_conv: int = 4, scan_impl: str = "auto",
                 group_size: int = 64, delta_scale_factor: float = 1.0, rope_scale_factor: float = 1.0,
                 **dt_init: float) -> None:
        super().__init__(d_inner, d_state, dt_rank, d_conv, scan_impl, **dt_init)
        if d_state % 2:
            raise ValueError(f"d_state must be even (RoPE rotates pairs of state dimensions), got {d_state}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or d_inner % group_size:
            raise ValueError(f"group_size must be a positive int dividing d_inner {d_inner}, got {group_size!r}")
        self.group_size = group_size
        self.delta_scale_factor = _check_positive_float("delta_scale_factor", delta_scale_factor)
        self.rope_scale_factor = _check_positive_float("rope_scale_factor", rope_scale_factor)
        n = torch.arange(1, d_state + 1) / d_state
        self.freq = nn.Parameter((100.0 ** -n - 0.01) / (1 - 0.01))

    @staticmethod
    def initial_dt(d_inner: int, dt_min: float, dt_max: float) -> torch.Tensor:
        """Initial per-channel steps ``[d_inner]``: log-spaced over [dt_min, dt_max] (the authors' init)."""
        return torch.exp(torch.linspace(math.log(dt_min), math.log(dt_max), d_inner))

    def step_size(self, dt: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``delta = softplus(dt + dt_proj.bias) / delta_scale_factor``, ``[b, L, D]``."""
        return F.softplus(dt + self.dt_proj.bias) / self.delta_scale_factor

    def rope(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate ``[b, N, L]`` B or C by the angles ``(l / rope_scale_factor) * freq[n]`` (timm's interleaved rotation)."""
        # angles up to L * freq in at least float32 even under autocast: bf16 would be off by ~0.4 rad at L = 145
        wide = _at_least_fp32(t)
        positions = torch.arange(t.shape[-1], device=t.device, dtype=wide.dtype) / self.rope_scale_factor
        theta = positions[:, None] * self.freq.to(wide.dtype)[None, :]  # [L, N]
        return apply_rot_embed(wide.transpose(1, 2), theta.sin(), theta.cos()).transpose(1, 2).to(t.dtype)

    def scan(self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             z: torch.Tensor) -> torch.Tensor:
        delta = self.step_size(dt.transpose(1, 2), B.transpose(1, 2)).transpose(1, 2)
        y = selective_scan(x, delta, -torch.exp(_at_least_fp32(self.A_log)), self.rope(B), self.rope(C),
                           delta_softplus=False, backend=self.scan_impl)
        tokens = _at_least_fp32(y).transpose(1, 2).unflatten(-1, (-1, self.group_size))  # [b, L, groups, g]
        y = F.rms_norm(tokens, (self.group_size,), eps=1e-6).flatten(-2).transpose(1, 2)
        return ((y + x * _at_least_fp32(self.D)[:, None]) * F.silu(_at_least_fp32(z))).to(x.dtype)


@register_mixer("defocus")
class DefocusMixer(SSMMixer):
    """De-focus Mamba mixer: one causal :class:`DefocusBranch` between in_proj and out_proj; see :class:`SSMMixer`.

    Examples:
        >>> DefocusMixer(16, group_size=8)(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    branch_cls = DefocusBranch

    def __init__(self, d_model: int, bidirectional: bool = False, **kwargs: Any) -> None:
        if bidirectional:
            raise ValueError("bidirectional must be False: De-focus Mamba is a causal model with one forward scan")
        super().__init__(d_model, bidirectional=False, **kwargs)


class DefocusMamba(VisionMamba):
    """De-focus Mamba: patch tokens with the cls token appended last, De-focus mixer blocks, LayerNorm, cls head.

    A :class:`~mambacl.backbones.VisionMamba` with ``mixer='defocus'``, no absolute position embedding and a
    LayerNorm before the head, initialised as the authors do (module docstring).

    Args:
        img_size, patch_size, in_chans, depth, embed_dim, d_state, expand: as for VisionMamba.
        dt_rank: rank of the step projection (48 in the authors' config, not ceil(embed_dim / 16)); 'auto' allowed.
        d_conv: causal conv kernel.
        group_size: channels per group of the scan-output RMS norm.
        delta_scale_factor, rope_scale_factor: see :class:`DefocusBranch` (1.0 in Mamba-CL).
        drop_rate, drop_path_rate, num_classes, scan_impl: as for VisionMamba.
        norm_eps: block RMSNorm epsilon; final_norm_eps: final LayerNorm epsilon.

    Examples:
        >>> model = DefocusMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, dt_rank=2,
        ...                      group_size=8, num_classes=3)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 192, patch_size: int = 16, in_chans: int = 3,
                 depth: int = 48, embed_dim: int = 1024, d_state: int = 16, expand: int = 2,
                 dt_rank: Union[int, str] = 48, d_conv: int = 4, group_size: int = 64,
                 delta_scale_factor: float = 1.0, rope_scale_factor: float = 1.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, scan_impl: str = "auto",
                 norm_eps: float = 1e-5, final_norm_eps: float = 1e-6) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, depth=depth, embed_dim=embed_dim,
                         d_state=d_state, expand=expand, mixer="defocus", bidirectional=False,
                         cls_token_position="last", drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         num_classes=num_classes, scan_impl=scan_impl, norm_eps=norm_eps, pos_embed="none",
                         final_norm="layernorm", final_norm_eps=final_norm_eps,
                         mixer_kwargs=dict(dt_rank=dt_rank, d_conv=d_conv, group_size=group_size,
                                           delta_scale_factor=delta_scale_factor,
                                           rope_scale_factor=rope_scale_factor))

    def init_weights(self) -> None:
        """The authors' init: trunc-normal(0.02) cls token and Linear weights, zero Linear biases, except dt_proj
        (uniform weight, inverse-softplus bias, set by the branch); no out_proj rescaling."""
        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


_BRANCH_KEYS = {"conv1d": "conv1d", "dt_proj": "dt_proj", "A_log": "A_log", "D": "D", "freq": "freq",
                "x_proj_step": "x_proj_dt", "x_proj_B": "x_proj_B", "x_proj_C": "x_proj_C"}


def _convert_defocus_key(key: str, value: torch.Tensor, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map one official De-focus entry to native names (``blocks`` -> ``layers``, branch tensors below ``fwd``,
    ``norm`` -> ``norm_f``, x_proj split, aux head dropped). Native keys pass unchanged."""
    if key.split(".")[0] == "head2":
        return {}  # auxiliary head on the patch tokens (use_aux_loss), used only in pretraining
    if key in ("norm.weight", "norm.bias"):
        return {"norm_f" + key[len("norm"):]: value}
    match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
    if not match:
        return {key: value}
    layer, sub = f"layers.{match.group(1)}.", match.group(2)
    if not sub.startswith("mixer."):
        return {layer + sub: value}
    head, _, tail = sub[len("mixer."):].partition(".")
    branch_prefix = f"{layer}mixer.fwd."
    if head == "x_proj" and tail == "weight":
        try:
            branch = model.get_submodule(branch_prefix[:-1])
        except AttributeError:
            return {key: value}  # left for the unexpected-key check
        return split_x_proj(value, branch, branch_prefix, key)
    if head in _BRANCH_KEYS:
        return {branch_prefix + _BRANCH_KEYS[head] + (f".{tail}" if tail else ""): value}
    return {f"{layer}{sub}": value}  # in_proj, out_proj


@register_checkpoint_filter(DefocusMamba)
def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DefocusMamba,
                         strict: bool = True) -> Dict[str, torch.Tensor]:
    """Convert an official De-focus Mamba (OpenGVLab / Mamba-CL) or native state dict for ``model``.

    Renames ``blocks.{i}`` to ``layers.{i}`` and the branch tensors below ``mixer.fwd``, splits ``x_proj`` into
    x_proj_dt/B/C (Mamba-CL's split ``x_proj_step``/``_B``/``_C`` are accepted too), renames ``norm`` to
    ``norm_f``, drops the auxiliary ``head2``, then applies the shared rules of
    :func:`~mambacl.backbones.checkpoint.filter_state_dict` (the 21k MLP head is replaced by the model's head;
    missing / unexpected keys: ValueError when strict, UserWarning otherwise; ValueError for wrong shapes).
    There is no position embedding to resample: RoPE's ``freq`` has shape [N] at every image size.
    """
    return filter_state_dict(state_dict, model, _convert_defocus_key, strict=strict)


default_cfgs = generate_default_cfgs({
    "defocus_mamba_large_patch16_192.in21k": _cfg(
        input_size=(3, 192, 192), crop_pct=192 / 224, interpolation="bilinear", license="mit",
        paper_ids="arXiv:2406.04342",
        origin_url="https://github.com/OpenGVLab/De-focus-Attention-Networks/releases/download/v1.0/"
                   "defocus_mamba_large_cls_21k.pth"),
    "test_defocus_mamba": _cfg(input_size=(3, 32, 32), crop_pct=1.0, license="mit"),
})


def _create_defocus(variant: str, pretrained: bool, defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> DefocusMamba:
    """Build through timm; ``pretrained_file=PATH`` (and ``pretrained_strict``) loads a local official checkpoint."""
    return build_with_checkpoint(DefocusMamba, variant, pretrained, **dict(defaults, **kwargs))


@register_model
def defocus_mamba_large_patch16_192(pretrained: bool = False, **kwargs: Any) -> DefocusMamba:
    """De-focus Mamba-Large as Mamba-CL uses it: 192 px, patch 16, dim 1024, depth 48, d_inner 2048, dt_rank 48."""
    return _create_defocus("defocus_mamba_large_patch16_192", pretrained, {}, kwargs)


@register_model
def test_defocus_mamba(pretrained: bool = False, **kwargs: Any) -> DefocusMamba:
    """Tiny CI model: 32 px, patch 4, dim 32, depth 2, dt_rank 4, groups of 16 channels."""
    return _create_defocus("test_defocus_mamba", pretrained,
                           dict(img_size=32, patch_size=4, embed_dim=32, depth=2, dt_rank=4, group_size=16), kwargs)
