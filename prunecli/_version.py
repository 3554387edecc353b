"""The version, in one place: the package entry, the artifacts and ``--version`` all read it from here."""

__version__ = "0.1.0"
