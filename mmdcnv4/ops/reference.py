"""Pure-PyTorch references of the project's operators.

They follow ``shared/spec/dcnv4-op.md`` line by line, favour clarity over speed and work in any floating
dtype and on any device, so the tests compare the compiled kernels against them in float64. Autograd
through them gives the reference gradients.
"""
import torch


def dcnv4_output_size(size, kernel, stride, pad, dilation):
    """Output length of one spatial dimension, as for a convolution."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def dcnv4_points(kernel_h, kernel_w, remove_center):
    """Sampling points ``(i, j)`` in the contract's order: width index ``i`` outer, height ``j`` inner."""
    return [(i, j) for i in range(kernel_w) for j in range(kernel_h)
            if not (remove_center and i == kernel_w // 2 and j == kernel_h // 2)]


def _bilinear_gather(value, y, x):
    """Samples ``value`` (N, H, W, G, D) at ``(y, x)`` (N, Ho, Wo, G, K) with the DCNv4 border rule.

    Returns ``(samples (N, Ho, Wo, G, K, D), used (N, Ho, Wo, G, K))``. A point is used only if
    ``-1 < y < H`` and ``-1 < x < W``; corners outside the image count as zero. A NaN coordinate gives a
    NaN sample and counts as used, so NaN offsets propagate instead of vanishing.
    """
    n, h, w, g, d = value.shape
    valid = (y > -1) & (y < h) & (x > -1) & (x < w)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly = y - y0
    lx = x - x0
    y0 = y0.long()
    x0 = x0.long()
    flat = value.permute(0, 3, 1, 2, 4).reshape(n, g, h * w, d)
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            yy = y0 + dy
            xx = x0 + dx
            inside = valid & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            weight = (ly if dy else 1 - ly) * (lx if dx else 1 - lx)
            weight = torch.where(inside, weight, torch.zeros_like(weight))
            index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1))  # (N, Ho, Wo, G, K)
            ho, wo, k = index.shape[1], index.shape[2], index.shape[4]
            index = index.permute(0, 3, 1, 2, 4).reshape(n, g, ho * wo * k, 1).expand(-1, -1, -1, d)
            corner = torch.gather(flat, 2, index).reshape(n, g, ho, wo, k, d).permute(0, 2, 3, 1, 4, 5)
            # Zero the weight rather than the product so that a NaN/Inf at a clamped (unused) corner
            # does not leak into the output through 0 * inf.
            corner = torch.where(inside.unsqueeze(-1), corner, torch.zeros_like(corner))
            out = out + weight.unsqueeze(-1) * corner
    nan_coord = torch.isnan(x) | torch.isnan(y)
    out = torch.where(nan_coord.unsqueeze(-1), torch.full_like(out, float('nan')), out)
    return out, valid | nan_coord


def dcnv4_reference(value, offset_mask, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), group=1, offset_scale=1.0, remove_center=False):
    """DCNv4 forward by the contract's formula. Arguments are already validated pairs ``(h, w)``."""
    n, h, w, c = value.shape
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    g = group
    d = c // g
    ho = dcnv4_output_size(h, kh, sh, ph, dh)
    wo = dcnv4_output_size(w, kw, sw, pw, dw)
    points = dcnv4_points(kh, kw, remove_center)
    k = len(points)
    om = offset_mask[..., :g * 3 * k].reshape(n, ho, wo, g, 3 * k)
    offsets = om[..., :2 * k].reshape(n, ho, wo, g, k, 2)
    mask = om[..., 2 * k:]

    half_w = (dw * (kw - 1)) // 2
    half_h = (dh * (kh - 1)) // 2
    dtype, device = value.dtype, value.device
    cx = (torch.arange(wo, device=device) * sw - pw + half_w).to(dtype)
    cy = (torch.arange(ho, device=device) * sh - ph + half_h).to(dtype)
    grid_x = torch.tensor([i * dw - half_w for i, _ in points], dtype=dtype, device=device)
    grid_y = torch.tensor([j * dh - half_h for _, j in points], dtype=dtype, device=device)
    x = cx.view(1, 1, wo, 1, 1) + (grid_x + offsets[..., 0]) * offset_scale
    y = cy.view(1, ho, 1, 1, 1) + (grid_y + offsets[..., 1]) * offset_scale

    sampled, used = _bilinear_gather(value.reshape(n, h, w, g, d), y, x)  # (N, Ho, Wo, G, K, D)
    # A point outside the image contributes nothing, whatever its weight (a NaN weight included).
    mask = torch.where(used, mask, torch.zeros_like(mask))
    out = (mask.unsqueeze(-1) * sampled).sum(dim=4)
    return out.reshape(n, ho, wo, c)


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Multi-scale deformable attention with mmcv's layout, by the contract's formula.

    value (N, Len_in, heads, D); sampling_locations (N, Len_q, heads, L, P, 2) normalised (x, y);
    attention_weights (N, Len_q, heads, L, P). Returns (N, Len_q, heads * D) in the dtype of ``value``.
    A point outside its level contributes nothing, whatever its weight (a NaN weight included); a NaN
    location gives a NaN output.
    """
    n, _, heads, d = value.shape
    _, len_q, _, levels, points, _ = sampling_locations.shape
    out = 0
    for lvl in range(levels):
        h_l, w_l = (int(s) for s in spatial_shapes[lvl])
        start = int(level_start_index[lvl])
        v = value[:, start:start + h_l * w_l].reshape(n, h_l, w_l, heads, d)
        x = sampling_locations[:, :, :, lvl, :, 0] * w_l - 0.5  # (N, Len_q, heads, P)
        y = sampling_locations[:, :, :, lvl, :, 1] * h_l - 0.5
        # Reuse the DCNv4 sampler: a (Len_q, 1) output map, heads as groups, points as K.
        sampled, used = _bilinear_gather(v, y.unsqueeze(2), x.unsqueeze(2))
        sampled = sampled.squeeze(2)  # (N, Lq, heads, P, D)
        weights = attention_weights[:, :, :, lvl, :]
        weights = torch.where(used.squeeze(2), weights, torch.zeros_like(weights))
        out = out + (weights.unsqueeze(-1) * sampled).sum(dim=3)
    return out.reshape(n, len_q, heads * d).to(value.dtype)


def flash_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points):
    """The packed "flash" layout: locations then logits per head, softmax over all levels and points.

    The softmax runs in fp32 (fp64 for fp64 inputs) and the probabilities stay in that precision, as in
    the kernels; the output has the dtype of ``value``.
    """
    n, len_q, heads, _ = sampling_loc_attn.shape
    levels = spatial_shapes.shape[0]
    lp = levels * num_points
    loc = sampling_loc_attn[..., :2 * lp].reshape(n, len_q, heads, levels, num_points, 2)
    logits = sampling_loc_attn[..., 2 * lp:3 * lp]
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    weights = weights.reshape(n, len_q, heads, levels, num_points)
    compute = torch.promote_types(value.dtype, weights.dtype)
    out = ms_deform_attn_reference(value.to(compute), spatial_shapes, level_start_index, loc.to(compute),
                                   weights)
    return out.to(value.dtype)
