"""Builds mmdcnv4 and its compiled extension ``mmdcnv4._C``.

The C++ CPU kernels are always built. The CUDA kernels are added when PyTorch was built with CUDA and a
CUDA toolkit is found (``CUDA_HOME`` or ``nvcc`` on ``PATH``); ``MMDCNV4_WITH_CUDA=0`` turns them off and
``MMDCNV4_WITH_CUDA=1`` insists on them. ``TORCH_CUDA_ARCH_LIST`` picks the GPU targets (default: sm_80
and sm_90 machine code plus PTX for newer GPUs). Build against the torch already installed:
``pip install --no-build-isolation -e .``
"""
import glob
import os
import sys

from setuptools import find_packages, setup

if sys.version_info < (3, 10):
    sys.exit(f'mmdcnv4 needs Python >= 3.10 (found {sys.version.split()[0]}).')

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit('mmdcnv4 builds against an installed PyTorch: install torch first, then build with '
             '`pip install --no-build-isolation -e .` (or run `make test`, which does both).')

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = '8.0;9.0+PTX'


def _version():
    scope = {}
    with open(os.path.join(ROOT, 'mmdcnv4', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def _want_cuda():
    """Decides whether to compile the CUDA kernels, with a reason printed either way."""
    flag = os.environ.get('MMDCNV4_WITH_CUDA', '').strip()
    if flag == '0':
        print('mmdcnv4: MMDCNV4_WITH_CUDA=0, building the CPU kernels only.')
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f'torch {torch.__version__} was built without CUDA')
    elif cpp_extension.CUDA_HOME is None:
        problems.append('no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)')
    if problems:
        message = 'mmdcnv4: building the CPU kernels only: ' + '; '.join(problems) + '.'
        if flag == '1':
            sys.exit(message + ' MMDCNV4_WITH_CUDA=1 asked for the CUDA kernels.')
        print(message)
        return False
    return True


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join('csrc', '*.cpp')) +
                     glob.glob(os.path.join('csrc', '*', '*.cpp')) +
                     glob.glob(os.path.join('csrc', '*', 'cpu', '*.cpp')))
    # No -std flag: torch's build helpers pick the standard its headers need.
    cxx_flags = ['-O3']
    define_macros = []
    extra = {'cxx': cxx_flags}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join('csrc', '*', 'cuda', '*.cu')))
        os.environ.setdefault('TORCH_CUDA_ARCH_LIST', DEFAULT_ARCH_LIST)
        define_macros.append(('MMDCNV4_WITH_CUDA', None))
        extra['nvcc'] = ['-O3', '--use_fast_math', '-lineinfo', '--expt-relaxed-constexpr']
        ext_class = cpp_extension.CUDAExtension
    else:
        ext_class = cpp_extension.CppExtension
    # OpenMP for at::parallel_for where torch was built with it.
    return ext_class(
        name='mmdcnv4._C',
        sources=sources,
        include_dirs=[os.path.join(ROOT, 'csrc')],
        define_macros=define_macros,
        extra_compile_args=extra,
    )


setup(
    name='mmdcnv4',
    version=_version(),
    description='DCNv4 operators and FlashInternImage models for the OpenMMLab 2.0 stack',
    long_description=open(os.path.join(ROOT, 'README.md')).read() if os.path.exists(
        os.path.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    packages=find_packages(include=['mmdcnv4', 'mmdcnv4.*']),
    include_package_data=True,
    ext_modules=[_extension()],
    cmdclass={'build_ext': cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
