"""advdit: distributed DiT training with adversarial objectives (SADM, Diffusion-GAN, DDGAN).

The user's top-level folders models/, trainer/ and launchers/ are installed as the subpackages
advdit.models, advdit.trainer and advdit.launchers, so nothing generic such as ``models`` lands at
the top level of site-packages; configs/ and slurm/ likewise as advdit.configs and advdit.slurm.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("models", "trainer", "launchers")
# Folders of data, shipped as packages so that an installed advdit (a wheel, not only a checkout)
# has its presets (--config NAME) and job template; the code reads them with importlib.resources.
DATA_PACKAGES = {"configs": ["*.yaml", "*/*.yaml"], "slurm": ["*.sbatch"]}
PACKAGES = (*SUBPACKAGES, *DATA_PACKAGES)
# Each folder's own subpackages too (trainer/data, trainer/objectives, ...): package_dir maps the
# prefix, so advdit.trainer.data is read from trainer/data.
NESTED = [f"advdit.{name}.{sub}" for name in SUBPACKAGES for sub in find_packages(name)]

setup(
    name="advdit",
    version="0.1.0",
    description="Distributed class-conditional DiT training with SADM, Diffusion-GAN and DDGAN",
    python_requires=">=3.10",
    packages=[f"advdit.{name}" for name in PACKAGES] + NESTED,
    package_dir={f"advdit.{name}": name for name in PACKAGES},
    package_data={f"advdit.{name}": patterns for name, patterns in DATA_PACKAGES.items()},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0",
        "accelerate>=1.0",
        "deepspeed>=0.15",
        # accelerate's DeepSpeed integration reads transformers' version at set-up time.
        "transformers>=4.40",
        "diffusers>=0.30",
        "webdataset>=0.2.90",
        "mlflow>=2.16",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "scipy>=1.11",
        # FID's TF-ported Inception-v3 (its weights are a local file, never downloaded)
        "torch-fidelity>=0.4,<0.5",
        # the 25-Gaussians benchmark's figure
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["xformers>=0.0.28"],
        # `advdit data digits`: the UCI handwritten digits bundled with scikit-learn (no download)
        "digits": ["scikit-learn>=1.3"],
        "dev": ["pytest>=8.0", "ruff>=0.6", "scikit-learn>=1.3"],
        # data.shards on object stores through fsspec (s3://, gs://); http(s):// and pipe: need nothing
        "remote": ["fsspec>=2023.1", "s3fs", "gcsfs"],
    },
    entry_points={"console_scripts": ["advdit = advdit.launchers.cli:main"]},
)
