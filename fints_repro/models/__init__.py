from fints_repro.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
