"""Everything a run leaves on disk and how it is read back: the run directory and its lock
(``session``, ``runlock``), the checkpoint format (``checkpoint``, ``integrity``; every file through
``atomic``), provenance, loggers, evaluation cards, the HTML report, and rebuilding a trained model
from a run (``restore``; the models themselves come from ``mergevq.models.factory``)."""
