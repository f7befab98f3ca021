"""The RFC 8684 requirement catalogue and its loader."""

from conformance.requirements.catalogue import Catalogue, Requirement, load_catalogue

__all__ = ["Catalogue", "Requirement", "load_catalogue"]
