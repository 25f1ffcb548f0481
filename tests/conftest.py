import pytest

from scratchlm import assets


@pytest.fixture(scope="session")
def default_model_path():
    return assets.default_model_path()


@pytest.fixture(scope="session")
def llama3_tokenizer_path():
    return assets.llama3_tokenizer_path()
