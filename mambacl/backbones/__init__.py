"""Vision Mamba backbones and sequence mixers on the ``mambacl.kernels`` scans.

Importing this package registers the Vim family with timm (``vim_{tiny,small,base}_patch16_224``,
``*_stride8``, ``longhorn_vim_*``, ``test_vim``, ``test_longhorn_vim``) and De-focus Mamba, the backbone of
Mamba-CL (``defocus_mamba_large_patch16_192``, ``test_defocus_mamba``), and the packaged ``test_vim.glyphs``
weights (:func:`pretrained_file`, ``weights/README.md``). ``timm.create_model(name, pretrained_file=PATH)``
loads the official checkpoint layouts; every model loaded from a file carries
``model.pretrained_source = str(PATH)``.

Mixer interface (for new mixers, e.g. B'MOJO / GD-SSM):
    - ``MixerCls(d_model, *, d_state, expand, bidirectional, scan_impl)`` accepting at least those keywords;
      ``forward(hidden [b, L, d_model]) -> [b, L, d_model]``.
    - Register with ``@register_mixer("name")`` so that ``VisionMamba(mixer="name")`` finds it.
    - Mamba-like mixers subclass :class:`SSMMixer` and set ``branch_cls`` to an :class:`SSMBranch` subclass
      implementing ``step_size(dt, B)`` and ``scan(x, dt, B, C, z)``; they inherit ``in_proj``, ``fwd`` /
      ``bwd`` branches, ``out_proj`` and the taps below.

Taps (:class:`Tap` identity modules; register a forward hook to read, ``tap.active`` iff hooked):
    ``SSMBranch.tap_x``        x after conv+SiLU, ``[b, L, d_inner]`` in the branch's own token order;
    ``SSMBranch.tap_delta``    the step entering the scan: delta after softplus (De-focus: also divided by its
                               delta_scale_factor; Longhorn: step eps), ``[b, L, d_inner]``, only when hooked;
    ``SSMBranch.tap_delta_x``  ``F[b, i, :] = sum_t delta[b, t, i] x[b, t, :]``, ``[b, d_inner, d_inner]``, only when hooked;
    ``SSMMixer.tap_out``       out_proj input ``[b, L, d_inner]`` ((y_f + flip(y_b)) / 2 when bidirectional;
                               De-focus: the gated, group-normalised scan output).
"""
from .longhorn import LonghornBranch, LonghornMixer
from .mamba import (
    MIXERS,
    MambaBranch,
    MambaMixer,
    SSMBranch,
    SSMMixer,
    no_weight_decay_names,
    register_mixer,
    ssm_param_groups,
)
from .taps import Tap, record_taps
from .gdssm import GDSSMLayer, GDSSMMixer
from .bmojo import BMojoLayer, BMojoMixer
from .seq_lm import SeqLM
from .checkpoint import load_checkpoint
from .vim import VisionMamba, checkpoint_filter_fn
from .defocus import DefocusBranch, DefocusMamba, DefocusMixer
from .pretrained import pretrained_file

__all__ = [
    "Tap", "record_taps", "SSMBranch", "SSMMixer", "MambaBranch", "MambaMixer", "LonghornBranch", "LonghornMixer",
    "MIXERS", "register_mixer", "no_weight_decay_names", "ssm_param_groups",
    "VisionMamba", "checkpoint_filter_fn", "load_checkpoint", "pretrained_file", "DefocusBranch", "DefocusMixer",
    "DefocusMamba",
    "GDSSMLayer", "GDSSMMixer", "BMojoLayer", "BMojoMixer", "SeqLM",
]
