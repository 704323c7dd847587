"""The fused post-norm residual ``x + gamma * LayerNorm(branch)``: kernel against float64, wrapper dispatch."""
import pytest
import torch
import torch.nn.functional as F

from mmdcnv4.ops import layer_norm as layer_norm_module
from mmdcnv4.ops import residual_layer_norm

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def make_inputs(gen, shape, branch_dtype, device, with_gamma=True):
    c = shape[-1]
    x = torch.randn(shape, generator=gen)
    # Offset and spread per row, so a LayerNorm that skips the mean or the variance is caught.
    branch = torch.randn(shape, generator=gen) * 3 + torch.randn(shape[:-1] + (1,), generator=gen) * 5
    norm = torch.nn.LayerNorm(c, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=gen))
        norm.bias.copy_(torch.randn(c, generator=gen))
    gamma = torch.randn(c, generator=gen) if with_gamma else None
    x, norm = x.to(device), norm.to(device)
    branch = branch.to(device, branch_dtype)
    gamma = None if gamma is None else gamma.to(device)
    return x, branch, norm, gamma


def reference(x, branch, norm, gamma):
    """float64 ``x + gamma * LN(branch)`` of the (already rounded) inputs."""
    normed = F.layer_norm(branch.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
    return x.double() + (normed if gamma is None else gamma.double() * normed)


def test_cpu_matches_eager_ops(rng):
    x, branch, norm, gamma = make_inputs(rng, (2, 5, 3, 80), torch.float32, 'cpu')
    with torch.no_grad():
        out = residual_layer_norm(x, branch, norm, gamma)
    torch.testing.assert_close(out.double(), reference(x, branch, norm, gamma), rtol=1e-5, atol=1e-5)


def test_cpu_gradients_flow(rng):
    """Outside no_grad the eager ops run, so training gets gradients for every input and parameter."""
    x, branch, norm, gamma = make_inputs(rng, (2, 4, 4, 16), torch.float32, 'cpu')
    x.requires_grad_()
    branch.requires_grad_()
    gamma.requires_grad_()
    residual_layer_norm(x, branch, norm, gamma).square().sum().backward()
    for tensor in (x, branch, gamma, norm.weight, norm.bias):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_op_refuses_calls_that_need_a_gradient(rng):
    """The op has no backward: with grad enabled and a parameter requiring grad it raises (any device)."""
    x, branch, norm, gamma = make_inputs(rng, (2, 3, 16), torch.float32, 'cpu')
    with pytest.raises(RuntimeError, match='no backward'):
        torch.ops.mmdcnv4._residual_layer_norm(x, branch, norm.weight, norm.bias, gamma, norm.eps)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', list(DTYPES))
@pytest.mark.parametrize('channels', [1, 16, 80, 112, 128, 224, 448, 896, 1280, 1536])
@pytest.mark.parametrize('with_gamma', [True, False])
def test_cuda_kernel_matches_float64(rng, dtype, channels, with_gamma):
    x, branch, norm, gamma = make_inputs(rng, (3, 7, 5, channels), DTYPES[dtype], 'cuda', with_gamma)
    # Poison: the output is allocated from this freed block, so an element the kernel skips stays NaN.
    poison = torch.full((x.numel() * 2,), float('nan'), device='cuda')
    del poison
    with torch.no_grad():
        out = torch.ops.mmdcnv4._residual_layer_norm(x, branch, norm.weight, norm.bias, gamma, norm.eps)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(x, branch, norm, gamma), rtol=2e-5, atol=2e-5)


@pytest.mark.cuda
def test_cuda_wrapper_uses_the_kernel_only_without_grad(rng):
    x, branch, norm, gamma = make_inputs(rng, (2, 6, 6, 112), torch.float16, 'cuda')
    with torch.no_grad():
        fused = torch.ops.mmdcnv4._residual_layer_norm(x, branch, norm.weight, norm.bias, gamma, norm.eps)
    with torch.inference_mode():
        assert layer_norm_module._fusable(x, branch, norm, gamma)
        assert torch.equal(residual_layer_norm(x, branch, norm, gamma), fused)
    with torch.autocast('cuda', dtype=torch.float16), torch.no_grad():
        assert torch.equal(residual_layer_norm(x, branch, norm, gamma), fused)
    assert not layer_norm_module._fusable(x, branch, norm, gamma)  # grad enabled: eager ops
    with torch.autocast('cuda', dtype=torch.float16):  # as in the model: the LayerNorm runs in fp32
        eager = residual_layer_norm(x, branch, norm, gamma)
    assert eager.requires_grad
    torch.testing.assert_close(eager.detach(), fused, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_wrapper_falls_back_where_the_kernel_does_not_apply(rng):
    # More channels than the kernel holds, and an fp16 residual stream: the eager ops, same values.
    for shape, x_dtype in (((2, 3, 1600), torch.float32), ((2, 3, 64), torch.float16)):
        x, branch, norm, gamma = make_inputs(rng, shape, torch.float32, 'cuda')
        x = x.to(x_dtype)
        with torch.no_grad():
            assert not layer_norm_module._fusable(x, branch, norm, gamma)
            out = residual_layer_norm(x, branch, norm, gamma)
        tol = 1e-2 if x_dtype == torch.float16 else 1e-5
        torch.testing.assert_close(out.double(), reference(x, branch, norm, gamma), rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_ops_reject_bad_input_with_numbers_in_the_message():
    """Direct op calls with bad input raise errors that quote numbers and shapes. Runs in a child process:
    formatting integers through std::ostream from the extension once crashed the interpreter on the GPU
    machine (csrc/common/message.h), and a crash must fail this test without taking the suite down."""
    import subprocess
    import sys
    code = (
        'import torch, mmdcnv4\n'
        'def expect(fn, text):\n'
        '    try:\n'
        '        fn()\n'
        '    except RuntimeError as err:\n'
        '        assert text in str(err), str(err)\n'
        '        print("raised:", text)\n'
        'x = torch.randn(2, 3, 2000, device="cuda"); w = torch.ones(2000, device="cuda")\n'
        'expect(lambda: torch.ops.mmdcnv4._residual_layer_norm(x, x, w, w, None, 1e-6), "1..1536, got 2000")\n'
        'expect(lambda: torch.ops.mmdcnv4.dcnv4_forward(torch.randn(1, 4, 4, device="cuda"), '
        'torch.randn(1, 4, 4, 27, device="cuda"), 3, 3, 1, 1, 1, 1, 1, 1, 1, 1.0, False), "got [1, 4, 4]")\n'
        'expect(lambda: torch.ops.mmdcnv4.flash_deform_attn_forward(torch.randn(1, 4, 2, 8, device="cuda"), '
        'torch.tensor([[2, 2]], device="cuda"), torch.tensor([0], device="cuda"), '
        'torch.randn(1, 3, 2, 3, device="cuda"), 0), "num_points must be >= 1, got 0")\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f'child exited with {result.returncode}: {result.stderr[-2000:]}'
    assert result.stdout.count('raised:') == 3, result.stdout


@pytest.mark.cuda
@pytest.mark.parametrize('arch', ['s', 'b'])
def test_cuda_post_norm_backbone_same_output_fused_or_not(rng, monkeypatch, arch):
    """FlashInternImage-S/B (post-norm) inference gives the eager result with the fused residual."""
    from mmdcnv4.models import FlashInternImage
    # In TF32 (cuDNN's default for convolutions) a product's inputs are rounded to 10 bits: a last-bit
    # difference between the two paths can flip such a rounding, and the network grows it (one element of
    # 21504 once came out 1.4e-3 apart). In full fp32 only the fused kernel's own rounding is compared:
    # on an H200, max |fused - eager| was 1.1e-5 to 1.5e-5 over 12 fresh inputs per arch.
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    model = FlashInternImage(arch=arch, layer_scale=0.5).cuda().eval()  # large scale: the branch matters
    images = torch.randn(2, 3, 64, 96, generator=rng).cuda()
    with torch.inference_mode():
        fused = model(images)
        monkeypatch.setattr(layer_norm_module, '_fusable', lambda *args: False)
        eager = model(images)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
