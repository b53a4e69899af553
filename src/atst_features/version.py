"""The package version, in one place (``atst_features.__version__``)."""

__version__ = "0.1.0"
