"""Models composed from :mod:`numformer.ops`; parameters live in one flat buffer."""
