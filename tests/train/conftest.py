import pytest

from cqr_jax.testing import write_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  return write_tiny_hf_model(tmp_path_factory.mktemp("tiny_llama"), "llama")
