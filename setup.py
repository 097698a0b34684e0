"""Packaging for lmdeploy. Metadata lives here; pyproject.toml only names the build backend.

The C++ engine core (csrc/turbomind) is built by CMake into lmdeploy.turbomind._turbomind.
The CMake build tree is kept under build/cmake<version>-<generator>-<platform>-<python>, so
rebuilds are incremental for `pip install -e .`, `pip wheel .` and
`python setup.py build_ext --inplace` alike.
Parallel jobs: $CMAKE_BUILD_PARALLEL_LEVEL, else build_ext's -j, else 2.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version():
    text = (ROOT / 'lmdeploy' / 'version.py').read_text()
    return re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M).group(1)


def read_requirements(name):
    """Requirement lines of requirements/<name>, without comments and pip options (-r, -c, ...)."""
    reqs = []
    for line in (ROOT / 'requirements' / name).read_text().splitlines():
        line = re.split(r'(^|\s)#', line, maxsplit=1)[0].strip()
        if line and not line.startswith('-'):
            reqs.append(line)
    return reqs


class CMakeExtension(Extension):
    """An extension module built by the top-level CMakeLists.txt (no setuptools sources)."""

    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which('cmake')
        if cmake is None:  # the `cmake` wheel is installed but its bin dir is not on PATH
            import cmake as cmake_pkg
            cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, 'cmake')
        generator = 'Ninja' if shutil.which('ninja') else 'Unix Makefiles'
        # One build tree per CMake version and generator: pip's isolated builds bring their own
        # CMake, whose compile commands differ slightly, and a tree cannot switch generators.
        version = subprocess.check_output([cmake, '--version'], text=True).split()[2]
        build_dir = ROOT / 'build' / '-'.join((f'cmake{version}', generator.split()[0].lower(),
                                               sysconfig.get_platform(), sys.implementation.cache_tag))
        out_dir = build_dir / 'lib'
        pybind11_dir = _stable_pybind11_dir(ROOT / 'build')
        config = 'Debug' if self.debug else 'Release'
        jobs = os.environ.get('CMAKE_BUILD_PARALLEL_LEVEL') or (self.parallel if self.parallel else 2)

        subprocess.check_call([
            cmake, '-S', str(ROOT), '-B', str(build_dir), '-G', generator,
            f'-DCMAKE_BUILD_TYPE={config}',
            f'-DPython_EXECUTABLE={sys.executable}',
            f'-Dpybind11_DIR={pybind11_dir}',
            f'-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}',
        ])
        subprocess.check_call([cmake, '--build', str(build_dir), '--config', config, '--parallel', str(jobs)])

        module = ext.name.rpartition('.')[2]
        built = [p for p in out_dir.rglob(module + '.*') if p.suffix in ('.so', '.pyd')]
        if len(built) != 1:
            raise RuntimeError(f'expected one {module} module under {out_dir}, found {built}')
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy then rename, so a process that has the old module loaded keeps a valid file.
        tmp = dest.with_name(dest.name + '.tmp')
        shutil.copy2(built[0], tmp)
        os.replace(tmp, dest)


def _stable_pybind11_dir(build_root):
    """pybind11's CMake dir (from `python -m pybind11 --cmakedir`), copied to build/pybind11-<version>.

    pip's isolated builds install pybind11 into a new temporary prefix each time; pointing CMake
    there would change the include path, and so every compile command, on every build.
    """
    def ask_pybind11(flag):
        return subprocess.check_output([sys.executable, '-m', 'pybind11', flag], text=True).strip()

    cmake_dir = Path(ask_pybind11('--cmakedir'))  # <prefix>/share/cmake/pybind11
    prefix, stage = cmake_dir.parents[2], build_root / f'pybind11-{ask_pybind11("--version")}'
    if not (stage / 'share').is_dir():
        tmp = stage.with_name(stage.name + '.tmp')
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ('include', 'share'):
            shutil.copytree(prefix / sub, tmp / sub)
        os.replace(tmp, stage)
    return stage / cmake_dir.relative_to(prefix)


readme = ROOT / 'README.md'
serve_reqs, test_reqs = read_requirements('serve.txt'), read_requirements('test.txt')

setup(
    name='lmdeploy',
    version=read_version(),
    description='A toolkit for compressing, deploying and serving LLMs on the TurboMind engine',
    long_description=readme.read_text(encoding='utf-8') if readme.exists() else '',
    long_description_content_type='text/markdown',
    python_requires='>=3.8',
    packages=find_packages(include=['lmdeploy', 'lmdeploy.*']),
    package_data={
        'lmdeploy.serve.turbomind': ['triton_models/**/*', 'service_docker_up.sh', 'service_up.sh'],
        'lmdeploy.lite': ['data/calib_corpus.txt', 'data/README.md'],  # kv_qparams' default corpus
    },
    include_package_data=False,  # package_data says it all; MANIFEST.in is for the sdist
    install_requires=read_requirements('runtime.txt'),
    extras_require={
        'serve': serve_reqs,
        'test': test_reqs,
        'all': serve_reqs + test_reqs,
    },
    ext_modules=[CMakeExtension('lmdeploy.turbomind._turbomind')],
    cmdclass={'build_ext': CMakeBuild},
    zip_safe=False,
)
