import logging

import pytest


@pytest.fixture(autouse=True)
def answers_fit_vllms_models(caplog):
    """Every answer a frontend under test sent fit vLLM's response models
    (frontend/responses.py logs one that does not, and sends it anyway)."""
    yield
    bad = [r.getMessage() for r in caplog.records
           if r.levelno >= logging.ERROR and "does not fit vLLM's" in r.getMessage()]
    assert not bad, bad
