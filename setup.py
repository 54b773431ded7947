"""moejax: sparse Mixture-of-Experts and recursive transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="moejax",
    version="0.1.0",
    description="JAX research code for sparse Mixture-of-Experts and recursive transformers",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["moejax", "moejax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "ml_collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8.6",
        "grain>=0.2.18",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json files
        "safetensors>=0.4",  # Hugging Face checkpoints (moejax.hf)
        "pyarrow>=15.0",  # Parquet sources and Hugging Face datasets saved to disk
        "matplotlib>=3.8",  # experiment and scaling plots
    ],
    extras_require={
        "dev": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "nbformat>=5.9",  # tests/test_notebooks.py executes notebooks/ headless
            "nbclient>=0.10",
            "ipykernel>=6.29",
        ],
    },
    entry_points={
        "console_scripts": [
            "moejax-train=moejax.train.loop:main",
            "moejax-generate=moejax.generate:main",
        ],
    },
)
