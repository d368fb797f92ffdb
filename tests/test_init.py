import importlib.metadata

import still


def test_the_public_api_resolves_and_dir_lists_it():
    """Every name of `__all__` imports (lazily), `dir(still)` lists them (it listed none of the lazy
    ones), and the version is the package's."""
    for name in still.__all__:
        assert getattr(still, name) is not None, name
        assert name in dir(still), name
    assert still.__version__ == importlib.metadata.version("still")
    assert "importlib" not in dir(still) and "annotations" not in dir(still)  # (the module's own imports)
