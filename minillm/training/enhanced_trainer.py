"""The seed's module name for the Trainer (`from minillm.training.enhanced_trainer import Trainer`)."""
from minillm.training.trainer import Trainer

__all__ = ["Trainer"]
