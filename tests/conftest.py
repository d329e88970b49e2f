"""Shared test fixtures.

Tests never touch the network: the offline flags are set here, at import, because
huggingface_hub and datasets read them when they are first imported.

``tiny_models`` builds one set of tiny random Llama models (base + 3 fine-tune-like
sources, 4 layers, safetensors) once per test session; treat its folders as read-only
(copy them to ``tmp_path`` to modify). ``tiny_models_tied`` is the same with tied
embeddings (no ``lm_head.weight`` in the files). The builders live in
``tests/tiny_models.py`` so scripts can use them as well.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tiny_models import TinyModels, build_tiny_llama_set  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Base + 3 sources, untied embeddings; folders are shared by the whole session: do not modify."""
    return build_tiny_llama_set(tmp_path_factory.mktemp("tiny_models"), n_sources=3, seed=0)


@pytest.fixture(scope="session")
def tiny_models_tied(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Base + 2 sources with tied embeddings (lm_head absent from the files); read-only."""
    return build_tiny_llama_set(tmp_path_factory.mktemp("tiny_models_tied"), n_sources=2, seed=10,
                                tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ray_session():
    """A 2-CPU local Ray for one test module's searches (started and stopped per module)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()
