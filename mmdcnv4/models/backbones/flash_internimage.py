"""FlashInternImage: the DCNv4 backbone, its ImageNet classifier and the upstream checkpoint filter.

The architecture, the four size presets and the state_dict key names follow the upstream release
(``shared/spec/flash-internimage.md``), so upstream ImageNet, COCO and ADE20K checkpoints load unchanged.

Layout: every block works on a channels-last map ``(N, H, W, C)``; LayerNorm, Linear and DCNv4 act on the
last dimension, and the three strided convolutions (stem and downsampling) run on channels_last-memory
NCHW views of the same storage, so the trunk never permutes data into a new buffer. Upstream wraps each
LayerNorm in a Sequential next to permute modules, which is where key names such as ``norm1.1`` and
``norm.1`` come from; here parameter-free ``Identity`` entries hold those positions instead.
"""
import torch
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from torch import nn

from ...ops import DCNv4
from ...ops.layer_norm import residual_layer_norm
from ..registry import register_model

__all__ = ['ARCH_SETTINGS', 'FlashInternImage', 'FlashInternImageCls', 'filter_upstream_state_dict',
           'load_upstream_checkpoint', 'unwrap_checkpoint']

# Upstream's sizes (spec section 2). ``layer_scale`` is the ImageNet value; the dense-prediction recipes
# all override it with 1.0.
ARCH_SETTINGS = {
    't': dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), offset_scale=1.0, layer_scale=None,
              post_norm=False, dw_kernel_size=None, dcn_output_bias=False, mlp_fc2_bias=False),
    's': dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), offset_scale=1.0, layer_scale=1e-5,
              post_norm=True, dw_kernel_size=3, dcn_output_bias=False, mlp_fc2_bias=False),
    'b': dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), offset_scale=0.5,
              layer_scale=1e-5, post_norm=True, dw_kernel_size=3, dcn_output_bias=False, mlp_fc2_bias=False),
    'l': dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80), offset_scale=2.0,
              layer_scale=1e-5, post_norm=True, dw_kernel_size=3, dcn_output_bias=True, mlp_fc2_bias=True),
}
_ARCH_ALIASES = {'tiny': 't', 'small': 's', 'base': 'b', 'large': 'l'}

# Keys of the ImageNet classifier that a dense-prediction backbone does not have.
HEAD_PREFIXES = ('conv_head.', 'head.')


class _FromArch:
    """Default of the architecture keywords: take the value from the ``arch`` preset.

    A sentinel rather than None, because None is itself a setting (``layer_scale=None`` means no layer
    scale, ``dw_kernel_size=None`` no depthwise conv before the offsets).
    """

    def __repr__(self):
        return 'FROM_ARCH'


FROM_ARCH = _FromArch()


def _channels_last(x):
    """NCHW view -> (N, H, W, C) view of the same storage (free for channels_last-memory tensors)."""
    return x.permute(0, 2, 3, 1)


def _channels_first(x):
    """(N, H, W, C) view -> NCHW view with channels_last memory, the layout convolutions accept as is."""
    return x.permute(0, 3, 1, 2)


def _keyed_layer_norm(channels, index):
    """A LayerNorm (eps 1e-6, last dim) at position ``index`` of a Sequential, as upstream names it."""
    return nn.Sequential(*[nn.Identity() for _ in range(index)], nn.LayerNorm(channels, eps=1e-6))


def _drop_path(x, rate, training):
    """Stochastic depth per sample (timm's DropPath with scale_by_keep)."""
    if rate == 0. or not training:
        return x
    keep = 1. - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class StemLayer(nn.Module):
    """conv 3x3 s2 -> LN -> GELU -> conv 3x3 s2 -> LN: an image becomes a stride-4 channels-last map."""

    def __init__(self, in_channels, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = _keyed_layer_norm(channels // 2, 1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels // 2, channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = _keyed_layer_norm(channels, 1)

    def forward(self, x):
        # Converting the 3-channel image is the cheapest place to enter channels_last memory: from here
        # on every conv output is channels_last, so the channels-last views below need no copy.
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        x = self.act(self.norm1(_channels_last(x)))
        x = self.conv2(_channels_first(x))
        return self.norm2(_channels_last(x))


class DownsampleLayer(nn.Module):
    """conv 3x3 s2 (no bias) doubling the channels -> LN, channels-last in and out."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = _keyed_layer_norm(2 * channels, 1)

    def forward(self, x):
        return self.norm(_channels_last(self.conv(_channels_first(x))))


class MLPLayer(nn.Module):
    """fc1 -> GELU (erf) -> fc2."""

    def __init__(self, channels, hidden_channels, fc2_bias=False):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden_channels)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_channels, channels, bias=fc2_bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class FlashInternImageLayer(nn.Module):
    """One block: a DCNv4 and an MLP, each in a residual branch (spec section 1.3).

    Pre-norm: ``x + DP(g * dcn(norm1(x)))``; post-norm: ``x + DP(g * norm1(dcn(x)))`` (likewise for the
    MLP), where ``g`` is the layer scale (absent when ``layer_scale`` is None).
    """

    def __init__(self, channels, groups, mlp_ratio=4., offset_scale=1.0, dw_kernel_size=None,
                 dcn_output_bias=False, mlp_fc2_bias=False, layer_scale=None, post_norm=False, drop_path=0.,
                 with_cp=False):
        super().__init__()
        self.post_norm = post_norm
        self.drop_path = float(drop_path)
        self.with_cp = with_cp
        self.norm1 = _keyed_layer_norm(channels, 0)
        self.dcn = DCNv4(channels=channels, group=groups, offset_scale=offset_scale,
                         dw_kernel_size=dw_kernel_size, output_bias=dcn_output_bias)
        self.norm2 = _keyed_layer_norm(channels, 0)
        self.mlp = MLPLayer(channels, int(channels * mlp_ratio), fc2_bias=mlp_fc2_bias)
        if layer_scale is None:
            self.register_parameter('gamma1', None)
            self.register_parameter('gamma2', None)
        else:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(layer_scale)))

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        if self.post_norm:
            x = self._post_norm_residual(x, self.dcn(x), self.norm1, self.gamma1)
            return self._post_norm_residual(x, self.mlp(x), self.norm2, self.gamma2)
        x = self._residual(x, self.dcn(self.norm1(x)), self.gamma1)
        return self._residual(x, self.mlp(self.norm2(x)), self.gamma2)

    def _post_norm_residual(self, x, branch, norm, gamma):
        """``x + DP(gamma * norm(branch))``; one fused kernel in CUDA inference (mmdcnv4.ops.layer_norm)."""
        if self.drop_path == 0. or not self.training:
            return residual_layer_norm(x, branch, norm[-1], gamma)
        return self._residual(x, norm(branch), gamma)

    def _residual(self, x, branch, gamma):
        """``x + DP(gamma * branch)``; one fused multiply-add when no path can be dropped."""
        if gamma is None:
            return x + _drop_path(branch, self.drop_path, self.training)
        if self.drop_path == 0. or not self.training:
            return torch.addcmul(x, branch, gamma)
        return x + _drop_path(branch * gamma, self.drop_path, self.training)


class FlashInternImageLevel(nn.Module):
    """The blocks of one resolution, the level LayerNorm (pre-norm models only) and the downsampling.

    ``forward`` returns the level output before downsampling; the backbone calls ``downsample`` itself,
    because the dense-prediction outputs are taken between the two.
    """

    def __init__(self, channels, depth, groups, drop_paths, post_norm, downsample, with_cp, **block_args):
        super().__init__()
        self.blocks = nn.ModuleList([
            FlashInternImageLayer(channels, groups, post_norm=post_norm, drop_path=drop_paths[i],
                                  with_cp=with_cp, **block_args) for i in range(depth)])
        self.norm = None if post_norm else _keyed_layer_norm(channels, 0)
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.norm is None else self.norm(x)


def _resolve_arch(arch, overrides):
    """The preset ``arch`` with every keyword that is not FROM_ARCH replacing the preset's value."""
    name = _ARCH_ALIASES.get(arch.lower(), arch.lower()) if isinstance(arch, str) else None
    if name not in ARCH_SETTINGS:
        raise ValueError(f'unknown FlashInternImage arch {arch!r}: choose one of {sorted(ARCH_SETTINGS)} '
                         f'(or {sorted(_ARCH_ALIASES)}) and override single settings by keyword')
    settings = dict(ARCH_SETTINGS[name])
    settings.update({key: value for key, value in overrides.items() if value is not FROM_ARCH})
    settings['depths'] = tuple(settings['depths'])
    settings['groups'] = tuple(settings['groups'])
    if len(settings['depths']) != len(settings['groups']):
        raise ValueError(f'depths {settings["depths"]} and groups {settings["groups"]} must have one entry '
                         'per level')
    for i, groups in enumerate(settings['groups']):
        if (settings['channels'] * 2 ** i) % groups:
            raise ValueError(f'level {i} has {settings["channels"] * 2 ** i} channels, not divisible by its '
                             f'{groups} groups')
    return settings


def _check_choice(name, value, supported):
    # Upstream configs name these explicitly; only upstream's values are implemented.
    if value != supported:
        raise ValueError(f'FlashInternImage supports {name}={supported!r} only, got {value!r}')


def _init_linear(module):
    """Upstream's initialisation of Linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@register_model
class FlashInternImage(BaseModule):
    """FlashInternImage backbone (DCNv4), returning NCHW feature maps of strides 4, 8, 16 and 32.

    Args:
        arch: size preset, ``'t'``, ``'s'``, ``'b'`` or ``'l'`` (also ``'tiny'``...). Every setting of the
            preset can be overridden by the keyword of the same name: ``channels``, ``depths``,
            ``groups``, ``offset_scale``, ``layer_scale`` (None: no gamma parameters; upstream's detection
            and segmentation configs all use 1.0), ``post_norm``, ``dw_kernel_size``,
            ``dcn_output_bias``, ``mlp_fc2_bias``.
        in_channels: image channels.
        mlp_ratio: MLP hidden width over the block width.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        out_indices: levels whose outputs ``forward`` returns (the level output before downsampling,
            after the level LayerNorm for pre-norm models). Levels after the last one listed are not run.
        frozen_stages: -1 freezes nothing, 0 the stem, ``k > 0`` the stem and levels ``0..k-1`` (with
            their downsampling); frozen parts stay in eval mode and get ``requires_grad=False``.
        with_cp: gradient checkpointing per block (non-reentrant), trading compute for memory.
        core_op, norm_layer, act_layer: accepted so that upstream configs build unchanged; only
            upstream's values (``'DCNv4'``, ``'LN'``, ``'GELU'``) exist.
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` loads an upstream ImageNet (or
            detector/segmentor) checkpoint through :func:`filter_upstream_state_dict`; other init_cfg
            types behave as in mmengine.

    The output maps are contiguous NCHW tensors, as upstream's, because some mmcv ops (RoIAlign) read
    their input as contiguous NCHW memory.
    """
    # Whether init_cfg=Pretrained keeps the ImageNet classifier keys (FlashInternImageCls).
    keeps_classifier = False

    def __init__(self, arch='t', *, channels=FROM_ARCH, depths=FROM_ARCH, groups=FROM_ARCH,
                 offset_scale=FROM_ARCH, layer_scale=FROM_ARCH, post_norm=FROM_ARCH, dw_kernel_size=FROM_ARCH,
                 dcn_output_bias=FROM_ARCH, mlp_fc2_bias=FROM_ARCH, in_channels=3, mlp_ratio=4.,
                 drop_path_rate=0., out_indices=(0, 1, 2, 3), frozen_stages=-1, with_cp=False,
                 core_op='DCNv4', norm_layer='LN', act_layer='GELU', init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        _check_choice('core_op', core_op, 'DCNv4')
        _check_choice('norm_layer', norm_layer, 'LN')
        _check_choice('act_layer', act_layer, 'GELU')
        settings = _resolve_arch(arch, dict(
            channels=channels, depths=depths, groups=groups, offset_scale=offset_scale,
            layer_scale=layer_scale, post_norm=post_norm, dw_kernel_size=dw_kernel_size,
            dcn_output_bias=dcn_output_bias, mlp_fc2_bias=mlp_fc2_bias))
        self.arch_settings = settings
        self.channels = settings['channels']
        self.depths = settings['depths']
        self.num_levels = len(self.depths)
        self.out_indices = self._check_out_indices(out_indices)
        self.num_features = [self.channels * 2 ** i for i in range(self.num_levels)]
        if not -1 <= frozen_stages <= self.num_levels:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_levels}], got {frozen_stages}')
        self.frozen_stages = frozen_stages

        self.patch_embed = StemLayer(in_channels, self.channels)
        total = sum(self.depths)
        # Python rather than torch.linspace, so that building under torch.device('meta') works too.
        drop_paths = [drop_path_rate * i / (total - 1) if total > 1 else 0. for i in range(total)]
        block_args = dict(mlp_ratio=mlp_ratio, offset_scale=settings['offset_scale'],
                          dw_kernel_size=settings['dw_kernel_size'],
                          dcn_output_bias=settings['dcn_output_bias'], mlp_fc2_bias=settings['mlp_fc2_bias'],
                          layer_scale=settings['layer_scale'])
        self.levels = nn.ModuleList()
        for i, depth in enumerate(self.depths):
            start = sum(self.depths[:i])
            self.levels.append(FlashInternImageLevel(
                self.num_features[i], depth, settings['groups'][i], drop_paths[start:start + depth],
                post_norm=settings['post_norm'], downsample=i < self.num_levels - 1, with_cp=with_cp,
                **block_args))
        self._init_default_weights()
        self._freeze_stages()

    def _check_out_indices(self, out_indices):
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(not -self.num_levels <= i < self.num_levels for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of 0..{self.num_levels - 1} (negative '
                             f'indices count from the last level), got {out_indices}')
        return tuple(sorted({i % self.num_levels for i in out_indices}))

    def _init_default_weights(self):
        self.apply(_init_linear)
        # DCNv4 owns its initialisation (zero offset/mask projection, xavier projections), as upstream
        # re-applies it after the generic pass above.
        for module in self.modules():
            if isinstance(module, DCNv4):
                module._reset_parameters()

    def init_weights(self):
        """Loads ``init_cfg=dict(type='Pretrained', checkpoint=...)`` as upstream does; else mmengine's."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            load_upstream_checkpoint(self, cfg['checkpoint'], keep_classifier=self.keeps_classifier,
                                     map_location=cfg.get('map_location', 'cpu'))
            self._is_init = True
            return
        super().init_weights()

    def _frozen_modules(self):
        if self.frozen_stages >= 0:
            yield self.patch_embed
        yield from self.levels[:max(self.frozen_stages, 0)]

    def _freeze_stages(self):
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        super().train(mode)
        self._freeze_stages()
        return self

    def forward_levels(self, x):
        """Runs the trunk; returns the channels-last ``(N, H, W, C)`` outputs of the ``out_indices`` levels."""
        x = self.patch_embed(x)
        last = self.out_indices[-1]
        outs = []
        for i, level in enumerate(self.levels[:last + 1]):
            x = level(x)
            if i in self.out_indices:
                outs.append(x)
            if i < last:
                x = level.downsample(x)
        return outs

    def forward(self, x):
        """``(N, C_in, H, W)`` -> tuple of NCHW maps, one per ``out_indices`` entry."""
        return tuple(_channels_first(out).contiguous() for out in self.forward_levels(x))


@register_model
class FlashInternImageCls(FlashInternImage):
    """FlashInternImage with upstream's ImageNet head, for evaluating the classification checkpoints.

    ``conv_head`` = 1x1 conv (8C -> 12C, no bias) -> BatchNorm -> GELU, global average pooling, ``head``
    Linear. ``forward`` returns logits; ``forward_features`` the pooled features. Takes the backbone's
    keywords except ``out_indices``; ``init_cfg=Pretrained`` loads the head too.
    """
    keeps_classifier = True

    def __init__(self, arch='t', num_classes=1000, cls_scale=1.5, **kwargs):
        if 'out_indices' in kwargs:
            raise TypeError('FlashInternImageCls always classifies the last level; out_indices is not an '
                            'argument')
        super().__init__(arch, out_indices=(-1,), **kwargs)
        features = self.num_features[-1]
        hidden = int(features * cls_scale)
        self.conv_head = nn.Sequential(
            nn.Conv2d(features, hidden, kernel_size=1, bias=False),
            nn.Sequential(nn.BatchNorm2d(hidden)),  # upstream's Sequential: keys conv_head.1.0.*
            nn.GELU())
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        _init_linear(self.head)

    def forward_features(self, x):
        """Pooled ``(N, 12C)`` features."""
        x = self.conv_head(_channels_first(self.forward_levels(x)[-1]))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))


def unwrap_checkpoint(checkpoint):
    """The state_dict inside an upstream file: the first of 'state_dict', 'model_ema', 'model' present."""
    for key in ('state_dict', 'model_ema', 'model'):
        if isinstance(checkpoint, dict) and key in checkpoint:
            return checkpoint[key]
    return checkpoint


def _strip_prefix(key, prefix):
    return key[len(prefix):] if key.startswith(prefix) else key


def filter_upstream_state_dict(checkpoint, keep_classifier=False):
    """The FlashInternImage state_dict held by an upstream checkpoint (cf. timm's checkpoint_filter_fn).

    Accepts a loaded ImageNet, detector or segmentor checkpoint (or a bare state_dict): takes the first of
    ``state_dict``, ``model_ema``, ``model`` present, strips ``module.`` and ``backbone.`` prefixes, keeps
    only the ``backbone.`` keys when the file is a detector/segmentor, and drops the ImageNet classifier
    (``conv_head``, ``head``) unless ``keep_classifier``. Key names are otherwise upstream's own.
    """
    state_dict = unwrap_checkpoint(checkpoint)
    if not isinstance(state_dict, dict):
        raise TypeError(f'expected a checkpoint dict or a state_dict, got {type(state_dict).__name__}')
    names = {key: _strip_prefix(key, 'module.') for key in state_dict}
    # A detector/segmentor file: only its backbone belongs to this model (not neck., decode_head., ...).
    is_detector = any(name.startswith('backbone.') for name in names.values())
    filtered = {}
    for key, value in state_dict.items():
        name = names[key]
        if is_detector:
            if not name.startswith('backbone.'):
                continue
            name = name[len('backbone.'):]
        if keep_classifier or not name.startswith(HEAD_PREFIXES):
            filtered[name] = value
    return filtered


def load_upstream_checkpoint(model, filename, keep_classifier=False, map_location='cpu', logger=None):
    """Loads an upstream checkpoint file or URL into ``model`` non-strictly and logs what did not match.

    Returns the ``(missing_keys, unexpected_keys)`` of ``load_state_dict``. Layer-scale parameters that
    the file lacks (the T ImageNet model has none, the detection recipes use ``layer_scale=1.0``) keep
    their initial value, as upstream; every other missing or unexpected key is logged as a warning.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    logger = logger or MMLogger.get_current_instance()
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location=map_location, logger=logger)
    result = model.load_state_dict(filter_upstream_state_dict(checkpoint, keep_classifier), strict=False)
    layer_scale = [k for k in result.missing_keys if k.rsplit('.', 1)[-1] in ('gamma1', 'gamma2')]
    missing = [k for k in result.missing_keys if k not in layer_scale]
    logger.info(f'FlashInternImage: loaded {filename}')
    if layer_scale:
        logger.info(f'{len(layer_scale)} layer-scale parameters (gamma1/gamma2) are not in the checkpoint '
                    'and keep their initial value')
    if missing:
        logger.warning(f'missing keys in {filename}: {missing}')
    if result.unexpected_keys:
        logger.warning(f'unexpected keys in {filename}: {result.unexpected_keys}')
    return result
