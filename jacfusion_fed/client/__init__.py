"""The requester's Python client: submit records, predict, forget (ids pseudonymized inside)."""

from .requester import Forgotten, Prediction, Requester, Submitted, load_labels

__all__ = ["Forgotten", "Prediction", "Requester", "Submitted", "load_labels"]
