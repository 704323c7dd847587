"""Runs the DCNv4 forward and backward a few times on one shape, for a profiler such as
`ncu --clock-control none -k regex:dcnv4 python tools/profile_op.py --shape 64,56,56,128 --dtype fp32`.
"""
import argparse

import torch

from mmdcnv4.ops import dcnv4

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument('--shape', default='64,56,56,128', help='N,H,W,C of value')
parser.add_argument('--group-channels', type=int, default=32)
parser.add_argument('--dtype', default='fp32', choices=['fp32', 'fp16', 'bf16'])
parser.add_argument('--iters', type=int, default=3)
args = parser.parse_args()
dtype = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}[args.dtype]
n, h, w, c = map(int, args.shape.split(','))
group = c // args.group_channels
value = torch.randn(n, h, w, c, device='cuda', dtype=dtype, requires_grad=True)
offset_mask = torch.randn(n, h, w, -(-27 * group // 8) * 8, device='cuda', dtype=dtype, requires_grad=True)
for _ in range(args.iters):
    out = dcnv4(value, offset_mask, group=group)
    out.backward(torch.ones_like(out))
torch.cuda.synchronize()
