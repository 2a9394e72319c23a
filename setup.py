"""hibari: one JAX/Flax codebase from corpus to evaluation."""
from setuptools import find_packages, setup

# The rooms stay at the repository root and install under the one name `hibari`:
# model/ -> hibari.model, data/ -> hibari.data, ... (`hibari/` holds the CLI and pipelines).
ROOMS = ("model", "data", "train", "align", "evaluation", "configs")
PACKAGE_DIR = {"hibari": "hibari", **{f"hibari.{room}": room for room in ROOMS}}
PACKAGES = ["hibari", *(f"hibari.{p}" for p in find_packages(where="hibari"))] + [
    f"hibari.{p}" for room in ROOMS for p in find_packages(include=[room, f"{room}.*"])]

RUNTIME = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "sentencepiece>=0.2.0,<0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "array_record>=0.8.6,<0.9",
    "ml-collections>=1.1.0,<2",
    "grain>=0.2.18,<0.3",
    "numpy>=1.26,<3",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "scipy>=1.11",
    "pyyaml>=6",
    "zstandard>=0.22",
    "pyarrow>=15",
]

BEAM = ["apache-beam>=2.70,<3", "sentencepiece>=0.2.0,<0.2.3"]

setup(
    name="hibari",
    version="0.1.0",
    description="Corpus to tokenizer to pretraining to SFT/DPO to evaluation in JAX/Flax",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # Vendored samples (corpus, instruction data, eval tasks) ship inside the packages.
    package_data={"": ["assets/**/*", "assets/*", "tasks/**/*", "tasks/*", "*.md"]},
    install_requires=RUNTIME,
    extras_require={
        # torch: the local CPU wheel; a bare `torch` may pull a multi-GB CUDA build.
        # lm_eval: the reference harness for tests/test_lm_eval_parity.py (pinned: its
        # request conventions are what the test holds hibari to). peft: the LoRA adapters'
        # round trip (tests/test_lora.py loads hibari's PEFT export with peft itself).
        # datatrove (+ spacy, its word tokenizer): the data filters' peer (bench/peers_data.py,
        # tests/test_peers_data.py).
        # apache-beam: `hibari data prepare --runner beam` (data/beam.py). Beam needs protobuf < 7, and
        # sentencepiece 0.2.3's model-proto module was generated for the protobuf 7 runtime (it
        # refuses an older one), so the Beam extra holds sentencepiece below 0.2.3.
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0,<6", "safetensors>=0.4",
                 "gguf>=0.10", "lm_eval[hf]==0.4.13", "peft>=0.13", "datatrove>=0.10,<0.11",
                 "spacy>=3.7,<4", *BEAM],
        "beam": BEAM,
        "gguf": ["gguf>=0.10"],  # llama.cpp GGUF import (model/gguf.py)
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "bench": ["datasketch>=1.6", "lm_eval[hf]==0.4.13", "datatrove>=0.10,<0.11",
                  "spacy>=3.7,<4"],
    },
    entry_points={"console_scripts": ["hibari=hibari.cli:main"]},
)
