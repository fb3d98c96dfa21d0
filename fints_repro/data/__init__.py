from fints_repro.data.schema import HistoryItem, Sample

__all__ = ["HistoryItem", "Sample"]
