"""Times the DCNv4 op on a GPU against upstream's published figures (shared/bench/official-h200.md).

Same shapes, dtypes and method as that file: random inputs (value and offset_mask ~ N(0, 1)), 3x3,
stride 1, pad 1, offset_scale 1, offset_mask padded like upstream's modules (P = ceil(3GK/8)*8);
`triton.testing.do_bench` median over 200 ms of repeats after warm-up; "fwd+bwd" is one forward and one
backward from a stored output gradient; each figure is the fastest of `--repeats` such medians (default 3,
as the bench file reports the fastest of its runs: small calls are bound by host time, which moves between
measurements). GB/s counts the fewest bytes a forward must move (value read
once, offset_mask read once, output written once); the copy ceiling is a device-to-device copy measured
in the same run. The floors are those bytes at the copy ceiling, and the forward's arithmetic
(10 FLOP per point and channel: 4 bilinear multiply-adds, the weight, the sum) at the fp32 rate given.

    python tools/benchmark_op.py --out docs/benchmarks/dcnv4_op.md

With `--deterministic` it times instead, on the same rows, forward+backward with the default value gradient
(float atomics) against `torch.use_deterministic_algorithms(True)` (int64 fixed point; docs/dcnv4_op.md,
Determinism), the two interleaved:

    python tools/benchmark_op.py --deterministic --out docs/benchmarks/dcnv4_op_deterministic.md
"""
import argparse
import datetime
import math
import sys

import torch

# Upstream on an H200 (fastest of three runs): fwd ms, fwd+bwd ms (None: fails / cannot launch).
PAPER_SHAPES = {  # (N, H, W, C), D = 32
    (64, 56, 56, 128): {'fp32': (0.371, 2.869), 'fp16': (0.223, 2.753), 'bf16': (0.247, None)},
    (64, 28, 28, 256): {'fp32': (0.193, 1.458), 'fp16': (0.119, 1.398), 'bf16': (0.131, None)},
    (64, 14, 14, 512): {'fp32': (0.890, 1.272), 'fp16': (0.915, 1.388), 'bf16': (0.907, None)},
    (64, 7, 7, 1024): {'fp32': (0.237, 0.530), 'fp16': (0.238, 0.565), 'bf16': (0.285, None)},
    (64, 14, 14, 768): {'fp32': (0.871, 1.447), 'fp16': (0.929, 1.392), 'bf16': (1.091, None)},
    (1, 200, 320, 128): {'fp32': (0.131, 0.953), 'fp16': (0.080, 0.913), 'bf16': (0.088, None)},
    (1, 100, 160, 256): {'fp32': (0.078, 0.543), 'fp16': (0.054, 0.523), 'bf16': (0.059, None)},
    (1, 50, 80, 512): {'fp32': (0.122, 0.439), 'fp16': (0.158, 0.463), 'bf16': (0.384, None)},
    (1, 25, 40, 1024): {'fp32': (0.035, 0.288), 'fp16': (0.067, 0.325), 'bf16': (0.114, None)},
    (1, 64, 64, 1024): {'fp32': (0.297, 0.579), 'fp16': (0.126, 0.556), 'bf16': (0.377, None)},
}
FIM_SHAPES = {  # name: ((N, H, W, C), {dtype: (fwd, fwd+bwd)}), D = 16
    'T224 s1': ((64, 56, 56, 64), {'fp32': (0.220, 1.506), 'fp16': (0.122, 1.408), 'bf16': (0.132, None)}),
    'T224 s2': ((64, 28, 28, 128), {'fp32': (0.116, 0.776), 'fp16': (0.068, 0.727), 'bf16': (0.073, None)}),
    'T224 s3': ((64, 14, 14, 256), {'fp32': (0.385, 0.613), 'fp16': (0.384, 0.634), 'bf16': (0.395, None)}),
    'T224 s4': ((64, 7, 7, 512), {'fp32': (0.090, 0.270), 'fp16': (0.077, 0.274), 'bf16': (0.066, None)}),
    'T det s1': ((2, 200, 336, 64), {'fp32': (3.858, 4.474), 'fp16': (4.386, 4.705), 'bf16': (4.112, None)}),
    'T det s2': ((2, 100, 168, 128), {'fp32': (1.051, 1.516), 'fp16': (1.054, 1.450), 'bf16': (1.108, None)}),
    'T det s3': ((2, 50, 84, 256), {'fp32': (0.249, 0.432), 'fp16': (0.251, 0.510), 'bf16': (0.258, None)}),
    'T det s4': ((2, 25, 42, 512), {'fp32': (0.052, 0.200), 'fp16': (0.054, 0.227), 'bf16': (0.054, None)}),
    'L det s4': ((2, 25, 42, 1280), {'fp32': (0.067, None), 'fp16': (0.049, None), 'bf16': (0.049, None)}),
}
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
FP32_TFLOPS = 67.0  # H200 SXM non-tensor fp32 rate (datasheet), for the arithmetic floor only


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='write the markdown tables to this file')
    parser.add_argument('--rep', type=int, default=200, help='do_bench repeat time in ms (default 200)')
    parser.add_argument('--repeats', type=int, default=3, help='medians per figure; the fastest is kept')
    parser.add_argument('--dtypes', default='fp32,fp16,bf16')
    parser.add_argument('--quick', action='store_true', help='a few rows only (smoke test)')
    parser.add_argument('--deterministic', action='store_true',
                        help='forward+backward, default against deterministic mode, instead of the upstream table')
    return parser.parse_args()


def bench(fn, rep):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode='median')


def copy_ceiling_gbps(rep):
    """Device-to-device copy of 2 GiB; bytes read plus written over the median time."""
    src = torch.empty(2 ** 31, dtype=torch.uint8, device='cuda').random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def make_case(shape, group_channels, dtype):
    from mmdcnv4.ops import dcnv4
    n, h, w, c = shape
    group = c // group_channels
    padded = int(math.ceil(3 * group * 9 / 8) * 8)
    value = torch.randn(n, h, w, c, device='cuda', dtype=dtype, requires_grad=True)
    offset_mask = torch.randn(n, h, w, padded, device='cuda', dtype=dtype, requires_grad=True)

    def forward():
        return dcnv4(value, offset_mask, 3, 1, 1, 1, group, 1.0, False)

    grad_output = torch.randn_like(forward())

    def forward_backward():
        torch.autograd.grad(forward(), (value, offset_mask), grad_output)

    fewest_bytes = (value.numel() + offset_mask.numel() + grad_output.numel()) * value.element_size()
    flops = 10 * 9 * grad_output.numel()
    return forward, forward_backward, fewest_bytes, flops


def measure(label, shape, group_channels, upstream, dtypes, rep, repeats, ceiling):
    rows = []
    for name in dtypes:
        forward, forward_backward, fewest_bytes, flops = make_case(shape, group_channels, DTYPES[name])
        fwd = fwd_bwd = math.inf
        for _ in range(max(1, repeats)):
            with torch.no_grad():
                fwd = min(fwd, bench(forward, rep))
            fwd_bwd = min(fwd_bwd, bench(forward_backward, rep))
        up_fwd, up_fwd_bwd = upstream[name]
        rows.append(dict(
            label=label, dtype=name, fwd=fwd, fwd_bwd=fwd_bwd, up_fwd=up_fwd, up_fwd_bwd=up_fwd_bwd,
            gbps=fewest_bytes / (fwd * 1e-3) / 1e9, bytes_floor=fewest_bytes / (ceiling * 1e9) * 1e3,
            flop_floor=flops / (FP32_TFLOPS * 1e12) * 1e3))
        print(format_row(rows[-1], ceiling), flush=True)
        torch.cuda.empty_cache()
    return rows


def measure_deterministic(label, shape, group_channels, dtypes, rep, repeats):
    """Forward+backward ms with the default and the deterministic value gradient, fastest of `repeats` each."""
    rows = []
    for name in dtypes:
        _, forward_backward, _, _ = make_case(shape, group_channels, DTYPES[name])
        default = deterministic = math.inf
        for _ in range(max(1, repeats)):
            torch.use_deterministic_algorithms(False)
            default = min(default, bench(forward_backward, rep))
            torch.use_deterministic_algorithms(True)
            deterministic = min(deterministic, bench(forward_backward, rep))
        torch.use_deterministic_algorithms(False)
        rows.append(dict(label=label, dtype=name, default=default, deterministic=deterministic))
        print(format_deterministic_row(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def format_deterministic_row(r):
    return (f"| {r['label']} | {r['dtype']} | {r['default']:.4f} | {r['deterministic']:.4f} | "
            f"{r['deterministic'] / r['default']:.2f}x |")


DETERMINISTIC_HEADER = ('| shape | dtype | fwd+bwd ms | fwd+bwd ms, deterministic | deterministic / default |\n'
                        '|---|---|---|---|---|')


def ratio(up, ours):
    return f'{up / ours:.2f}x' if up is not None else 'n/a'


def format_row(r, ceiling):
    up_fb = f"{r['up_fwd_bwd']:.3f}" if r['up_fwd_bwd'] is not None else 'fails'
    return (f"| {r['label']} | {r['dtype']} | {r['fwd']:.4f} | {r['up_fwd']:.3f} | {ratio(r['up_fwd'], r['fwd'])} | "
            f"{r['fwd_bwd']:.4f} | {up_fb} | {ratio(r['up_fwd_bwd'], r['fwd_bwd'])} | {r['gbps']:.0f} | "
            f"{100 * r['gbps'] / ceiling:.1f}% | {r['bytes_floor']:.4f} | {r['flop_floor']:.4f} |")


HEADER = ('| shape | dtype | fwd ms | upstream fwd ms | fwd speed-up | fwd+bwd ms | upstream fwd+bwd ms | '
          'fwd+bwd speed-up | fwd GB/s | % of copy | bytes floor ms | FLOP floor ms |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|---|')


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmark_op.py needs a CUDA GPU.')
    dtypes = args.dtypes.split(',')
    paper = list(PAPER_SHAPES.items())
    fim = list(FIM_SHAPES.items())
    if args.quick:
        paper, fim = paper[:1], fim[:1]
    if args.deterministic:
        print(DETERMINISTIC_HEADER)
        paper_rows = [r for shape, _ in paper
                      for r in measure_deterministic('x'.join(map(str, shape)), shape, 32, dtypes, args.rep,
                                                     args.repeats)]
        fim_rows = [r for name, (shape, _) in fim
                    for r in measure_deterministic(f"{name} {'x'.join(map(str, shape))}", shape, 16, dtypes,
                                                   args.rep, args.repeats)]
        if args.out:
            write_deterministic_markdown(args.out, paper_rows, fim_rows, args.repeats)
        return
    ceiling = copy_ceiling_gbps(args.rep)
    print(f'copy ceiling: {ceiling:.0f} GB/s\n{HEADER}')
    paper_rows = [r for shape, up in paper
                  for r in measure('x'.join(map(str, shape)), shape, 32, up, dtypes, args.rep, args.repeats,
                                   ceiling)]
    fim_rows = [r for name, (shape, up) in fim
                for r in measure(f"{name} {'x'.join(map(str, shape))}", shape, 16, up, dtypes, args.rep, args.repeats,
                                 ceiling)]
    if args.out:
        write_markdown(args.out, paper_rows, fim_rows, ceiling, args.repeats)


def write_markdown(path, paper_rows, fim_rows, ceiling, repeats):
    import triton
    worst = {}
    for r in paper_rows + fim_rows:
        for key, ours, up in (('fwd', r['fwd'], r['up_fwd']), ('fwd+bwd', r['fwd_bwd'], r['up_fwd_bwd'])):
            if up is not None and (key not in worst or up / ours < worst[key][0]):
                worst[key] = (up / ours, f"{r['label']} {r['dtype']}")
    lines = [
        '# DCNv4 op benchmark',
        '',
        f'Generated by `python tools/benchmark_op.py` on {datetime.date.today()} on '
        f'{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__}). '
        f'Each figure: the fastest of {repeats} do_bench medians. '
        'Upstream figures: `shared/bench/official-h200.md` (the fastest of its runs on the same GPU kind). '
        f'Copy ceiling measured in this run: {ceiling:.0f} GB/s (read + write).',
        '',
        'Worst rows: ' + '; '.join(f'{k} speed-up {v[0]:.2f}x ({v[1]})' for k, v in worst.items()) + '.',
        '',
        '## Paper shapes (D = 32)',
        '', HEADER, *[format_row(r, ceiling) for r in paper_rows], '',
        '## FlashInternImage shapes (D = 16)',
        '', HEADER, *[format_row(r, ceiling) for r in fim_rows], '',
    ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    print(f'wrote {path}')


def write_deterministic_markdown(path, paper_rows, fim_rows, repeats):
    import triton
    costs = [r['deterministic'] / r['default'] for r in paper_rows + fim_rows]
    lines = [
        '# DCNv4 op: forward+backward in deterministic mode',
        '',
        f'Generated by `python tools/benchmark_op.py --deterministic` on {datetime.date.today()} on '
        f'{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__}). '
        'The rows and inputs of `dcnv4_op.md`; each figure the fastest of '
        f'{repeats} do_bench medians, the two modes interleaved. Default: the value gradient by float atomics; '
        'deterministic (`torch.use_deterministic_algorithms(True)`): by int64 fixed point, whose sum does '
        'not depend on the order (docs/dcnv4_op.md, Determinism). The forward is the same in both.',
        '',
        f'Deterministic / default: {min(costs):.2f}x to {max(costs):.2f}x.',
        '',
        '## Paper shapes (D = 32)',
        '', DETERMINISTIC_HEADER, *[format_deterministic_row(r) for r in paper_rows], '',
        '## FlashInternImage shapes (D = 16)',
        '', DETERMINISTIC_HEADER, *[format_deterministic_row(r) for r in fim_rows], '',
    ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
