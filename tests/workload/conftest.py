"""Every test here may import a project's modules: they are forgotten afterwards."""

import pytest


@pytest.fixture(autouse=True)
def _forget_project_modules(isolated_imports: None) -> None:
    """(see tests/conftest.py)"""
