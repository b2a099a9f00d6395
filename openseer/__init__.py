"""openseer: SEER-style self-supervised pretraining (SwAV + RegNetY) on uncurated images."""

__version__ = "0.1.0"
