"""The requester's Python client: submit records, predict, forget (ids pseudonymized inside);
answers are :class:`~jacfusion_fed.answer.FusedAnswer`."""

from jacfusion_fed.answer import FusedAnswer

from .requester import Forgotten, Requester, Submitted, load_labels

__all__ = ["Forgotten", "FusedAnswer", "Requester", "Submitted", "load_labels"]
