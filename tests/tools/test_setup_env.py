"""tools/setup_env.sh refuses a bad machine with a clear message (and installs nothing)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / 'tools' / 'setup_env.sh'


def run_setup(tmp_path, env_update, path_dirs=None):
    env = dict(os.environ, **env_update)
    if path_dirs is not None:
        env['PATH'] = os.pathsep.join(str(d) for d in path_dirs)
    return subprocess.run(['/bin/bash', str(SCRIPT), str(tmp_path / 'venv')], env=env, capture_output=True,
                          text=True, timeout=60)


def fake_python(tmp_path, version):
    """A 'python' that reports another version for the version check and is real otherwise."""
    path = tmp_path / 'fakepython'
    path.write_text(f'#!/bin/bash\nif [ "$1" = "--version" ]; then echo "Python {version}"; exit 0; fi\n'
                    f'if [ "$1" = "-c" ] && [[ "$2" == *version_info* ]]; then exit 1; fi\n'
                    f'exec {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def test_missing_python(tmp_path):
    result = run_setup(tmp_path, {'PYTHON': 'python-that-does-not-exist'})
    assert result.returncode != 0
    assert "no 'python-that-does-not-exist' on PATH" in result.stderr
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'venv').exists()


def test_wrong_python_version(tmp_path):
    result = run_setup(tmp_path, {'PYTHON': str(fake_python(tmp_path, '3.8.10'))})
    assert result.returncode != 0
    assert 'Python 3.8.10 found, but mmdcnv4 needs Python 3.10, 3.11 or 3.12' in result.stderr
    assert not (tmp_path / 'venv').exists()


def test_no_compiler(tmp_path):
    # A PATH with the basic tools and python, but no c++/g++.
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('dirname', 'nproc', 'cat', 'sha1sum', 'cut', 'ls', 'head'):
        for prefix in ('/usr/bin', '/bin'):
            if Path(prefix, tool).exists():
                (bin_dir / tool).symlink_to(Path(prefix, tool))
                break
    (bin_dir / 'python3').symlink_to(sys.executable)
    result = run_setup(tmp_path, {'CXX': ''}, path_dirs=[bin_dir])
    assert result.returncode != 0
    assert 'no C++ compiler found' in result.stderr
    assert not (tmp_path / 'venv').exists()
